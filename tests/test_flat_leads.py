"""data.on_flat_lead: records with flat (constant) leads stop the load (error), are dropped
(skip), or are kept with the leads marked missing (mask): zeros in every view after scaling,
a per-view lead mask in the batch, honoured by lead-token models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PTBXL_LEADS, true_signal, write_record
from distill.core.errors import DataError
from distill.data import SignalView, load_ptbxl
from distill.data.dataset import lead_mask_key
from distill.data.tools import describe_data

CHEST = ("V1", "V2", "V3", "V4", "V5", "V6")


def lr(root, eid):
    return root / f"records100/00000/{eid:05d}_lr"


def flatten(root, eid, leads, value=0.0):
    """Rewrite record ``eid`` with ``leads`` constant at ``value`` mV."""
    sig = true_signal(eid, 100)
    for lead in leads:
        sig[PTBXL_LEADS.index(lead.upper())] = value
    path = lr(root, eid)
    write_record(path.parent, path.name, sig, 100)


def load(root, cache_dir, **kw):
    return load_ptbxl(root, cache_dir=cache_dir, progress=False, **kw)


def test_error_names_record_and_leads(ptbxl_root, cache_dir):
    flatten(ptbxl_root, 2, CHEST)
    with pytest.raises(DataError) as e:
        load(ptbxl_root, cache_dir)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("ecg_id 2 (") and "flat lead(s) V1, V2, V3, V4, V5, V6" in msg
    # the decoded store is cached: the second load refuses it the same way, without wfdb
    with pytest.raises(DataError, match=r"ecg_id 2 .*flat lead\(s\) V1, V2, V3, V4, V5, V6"):
        load(ptbxl_root, cache_dir, on_flat_lead="error")
    # under on_bad_record: skip, a flat record is a bad record, as before the policy existed
    with pytest.warns(UserWarning, match=r"skipped 1 bad record\(s\) of 10; first: ecg_id 2 "):
        data = load(ptbxl_root, cache_dir, on_bad_record="skip")
    assert 2 not in data.ecg_ids.tolist() and data.lead_mask is None
    assert data.flat_report["action"] == "skipped as bad records"


def test_skip_drops_and_counts(ptbxl_root, cache_dir):
    flatten(ptbxl_root, 2, CHEST)
    flatten(ptbxl_root, 5, ("V1",), value=0.3)
    with pytest.warns(UserWarning, match=r"skipped 2 record\(s\) with flat leads of 10 "
                                         r"\(on_flat_lead: skip\); first: ecg_id 2"):
        data = load(ptbxl_root, cache_dir, on_flat_lead="skip")
    assert data.ecg_ids.tolist() == [1, 3, 4, 6, 9, 10]  # 7, 8: no superdiagnostic label
    assert data.lead_mask is None
    report = data.flat_report
    assert report["records"] == 2 and report["action"] == "skipped"
    assert report["leads"] == {"V1": 2, "V2": 1, "V3": 1, "V4": 1, "V5": 1, "V6": 1}
    text = describe_data(data)
    assert "on_flat_lead: skip: 2 record(s) with flat leads skipped (V1 2, V2 1" in text
    assert lead_mask_key("signal") not in data.split("all")[0]


def test_mask_keeps_zeros_after_scaling_and_serves_the_mask(ptbxl_root, cache_dir):
    flatten(ptbxl_root, 2, CHEST, value=0.4)
    data = load(ptbxl_root, cache_dir, on_flat_lead="mask")
    assert data.ecg_ids.tolist() == [1, 2, 3, 4, 5, 6, 9, 10]  # 7, 8: unlabeled
    k = data.ecg_ids.tolist().index(2)
    expected = np.ones((8, 12), dtype=bool)
    expected[k, 6:] = False
    np.testing.assert_array_equal(data.lead_mask, expected)
    assert data.flat_report["records"] == 1 and data.flat_report["kept"] == 1
    assert "1 kept with a lead mask" in describe_data(data)
    assert data.scaler.mean[0] != 0  # a scaler that would turn 0 mV into -mean/std
    views = {"all": SignalView(), "some": SignalView(("V2", "I", "V6")),
             "slow": SignalView(("I", "V3"), sampling_rate=50)}
    item = data.split("all", views)[k]
    np.testing.assert_array_equal(item["all"][6:].numpy(), 0.0)
    assert item["all"][:6].abs().sum() > 0
    np.testing.assert_array_equal(item[lead_mask_key("some")].numpy(), [False, True, False])
    np.testing.assert_array_equal(item["some"][[0, 2]].numpy(), 0.0)
    np.testing.assert_array_equal(item["slow"][1].numpy(), 0.0)
    assert item[lead_mask_key("slow")].dtype == torch.bool
    other = data.split("all", views)[0 if k else 1]
    assert other[lead_mask_key("all")].all()
    # batches carry [B, L_view] masks
    loader = torch.utils.data.DataLoader(data.split("all", views), batch_size=4)
    assert next(iter(loader))[lead_mask_key("some")].shape == (4, 3)


def test_mask_scaler_leaves_missing_leads_out(ptbxl_root, cache_dir):
    flatten(ptbxl_root, 1, CHEST)  # a train record (fold 1)
    data = load(ptbxl_root, cache_dir, on_flat_lead="mask", scaler="per_lead")
    train = data.splits["train"]
    present = [i for i in train if data.lead_mask[i, 7]]
    values = np.stack([data.signal(i)[7] for i in present]).astype(np.float64)
    np.testing.assert_allclose(data.scaler.mean[7], values.mean(), rtol=1e-9)
    np.testing.assert_allclose(data.scaler.std[7], values.std(), rtol=1e-6)


def test_fingerprints_unchanged_without_mask(ptbxl_root, cache_dir, tmp_path):
    from distill.core.schema import to_hash_dict
    from distill.recipe import Recipe

    flatten(ptbxl_root, 2, CHEST)
    clean = tmp_path / "clean"
    import shutil

    shutil.copytree(ptbxl_root.parent / "ptbxl", clean)
    flatten(clean, 2, ())  # restore record 2
    before = load(clean, cache_dir)
    assert load(clean, cache_dir, on_flat_lead="error").fingerprint == before.fingerprint
    assert load(clean, cache_dir, on_flat_lead="skip").fingerprint == before.fingerprint
    assert load(clean, cache_dir, on_flat_lead="mask").fingerprint != before.fingerprint
    # a recipe that leaves on_flat_lead at its default hashes as before the field existed
    assert "on_flat_lead" not in to_hash_dict(Recipe().data)
    masked = Recipe()
    masked.data.on_flat_lead = "mask"
    assert to_hash_dict(masked.data)["on_flat_lead"] == "mask"


def _leadformer(leads=PTBXL_LEADS):
    import students

    torch.manual_seed(0)
    return students.create("leadformer", "tiny", num_labels=3, leads=list(leads)).eval()


def test_leadformer_masked_lead_reads_as_the_present_leads_only():
    model = _leadformer()
    x = torch.randn(2, 12, 1000)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 6:] = False
    with torch.no_grad():
        out = model(signal=x, lead_mask=mask)
        noisy = x.clone()
        noisy[0, 6:] = torch.randn(6, 1000) * 5  # the missing leads' values do not matter
        again = model(signal=noisy, lead_mask=mask)
        subset = _leadformer(PTBXL_LEADS[:6])
        subset.load_state_dict(model.state_dict())
        alone = subset(signal=x[:1, :6])
    torch.testing.assert_close(out.logits, again.logits)
    torch.testing.assert_close(out.logits[:1], alone.logits, atol=1e-5, rtol=1e-4)
    assert out.token_mask.shape == (2, 12 * model.config.num_patches)
    assert not out.token_mask[0, 6 * model.config.num_patches:].any()
    assert out.token_mask[1].all()
    assert model(signal=x).token_mask is None  # without a mask: as before


def test_cnn_student_reads_the_zeros_and_ignores_the_mask():
    import students
    from distill.engine.factory import student_inputs
    from distill.recipe import StudentConfig

    model = students.create("xresnet1d", "tiny", num_labels=3).eval()
    x = torch.randn(2, 12, 1000)
    x[0, 6:] = 0.0
    with torch.no_grad():
        plain = model(signal=x)
        masked = model(signal=x, lead_mask=torch.ones(2, 12, dtype=torch.bool))
    torch.testing.assert_close(plain.logits, masked.logits)
    assert torch.isfinite(plain.logits).all() and plain.token_mask is None
    # only a family that reads the mask gets it from the batch
    batch = {"student:xresnet1d/tiny": x, "lead_mask:student:xresnet1d/tiny": torch.ones(2, 12),
             "student:leadformer/tiny": x,
             "lead_mask:student:leadformer/tiny": torch.ones(2, 12, dtype=torch.bool)}
    assert set(student_inputs(StudentConfig(family="xresnet1d", size="tiny"))(batch)) == {"signal"}
    assert set(student_inputs(StudentConfig(family="leadformer", size="tiny"))(batch)) == {
        "signal", "lead_mask"}


@pytest.mark.parametrize("family,options", [("csfm", {}), ("lamae", {}),
                                            ("lamae", {"cross_lead": False})])
def test_foundation_encoders_read_masked_records_as_their_present_leads(family, options):
    """CSFM and LAMAE (the foundation teacher's encoders, also student families) leave the
    missing leads out of attention and pooling: the same as the model given only the
    present leads."""
    import students

    torch.manual_seed(0)
    model = students.create(family, "tiny", num_labels=3, **options).eval()
    subset = students.create(family, "tiny", num_labels=3, leads=list(PTBXL_LEADS[:6]),
                             **options).eval()
    subset.load_state_dict(model.state_dict())
    x = torch.randn(2, 12, 1000)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 6:] = False
    noisy = x.clone()
    noisy[0, 6:] = torch.randn(6, 1000) * 5
    with torch.no_grad():
        a = model(signal=x, lead_mask=mask)
        b = model(signal=noisy, lead_mask=mask)
        alone = subset(signal=x[:1, :6])
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.logits[:1], alone.logits, atol=1e-5, rtol=1e-4)
    assert a.token_mask is not None and not a.token_mask[0].all() and a.token_mask[1].all()


def test_foundation_teacher_takes_the_teacher_views_mask():
    from teachers.foundation import FoundationTeacher

    batch = {"teacher": torch.zeros(2, 12, 1000), "lead_mask:teacher": torch.ones(2, 12).bool()}
    assert set(FoundationTeacher.batch_inputs(batch)) == {"signal", "lead_mask"}
    del batch["lead_mask:teacher"]
    assert set(FoundationTeacher.batch_inputs(batch)) == {"signal"}


def test_a_family_without_lead_masks_refuses_to_make_token_masks() -> None:
    import students

    cnn = students.create("xresnet1d", "tiny", num_labels=2)
    with pytest.raises(TypeError, match="xresnet1d does not read a lead mask"):
        cnn.token_mask(torch.ones(1, 12, dtype=torch.bool))
