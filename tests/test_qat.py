"""KD + QAT: the fake quantizers simulate onnxruntime's per-channel symmetric int8 weights
and uint8 activations, the ranges freeze after calibration, and removing them leaves a
plain student with the fine-tuned weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

import students
from distill.compress.qat import ACT, attach_fake_quant, calibrate, detach_fake_quant


def _batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [{"signal": torch.randn(8, 12, 1000, generator=g)} for _ in range(n)]


def test_weights_are_rounded_to_the_per_channel_int8_grid_and_ranges_freeze() -> None:
    torch.manual_seed(0)
    model = students.create("xresnet1d", "tiny", num_labels=5)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    assert attach_fake_quant(model) == len(layers)
    calibrate(model, DataLoader(_batches(), batch_size=None), "signal")
    for layer in layers:
        latent = layer.parametrizations.weight.original.detach()
        scale = latent.flatten(1).abs().amax(1) / 127  # per output channel, symmetric
        shape = (-1,) + (1,) * (latent.dim() - 1)
        grid = torch.clamp(torch.round(latent / scale.view(shape)), -127, 127) * scale.view(shape)
        torch.testing.assert_close(layer.weight, grid, atol=1e-6, rtol=1e-5)
        act = getattr(layer, ACT)
        assert act.dtype == torch.quint8 and float(act.scale) > 0
    # frozen: another pass (training mode, new data) moves no range
    scales = [getattr(m, ACT).scale.clone() for m in layers]
    model.train()
    model(signal=torch.randn(8, 12, 1000) * 5)
    assert all(torch.equal(s, getattr(m, ACT).scale) for s, m in zip(scales, layers))
    # the output moved (the fake quantization is on), but not far
    x = _batches(1)[0]["signal"]
    model.eval()
    with torch.no_grad():
        fq = model(signal=x).logits
    detach_fake_quant(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(model.state_dict()) == set(plain)  # a plain student again
    for k, v in model.named_parameters():  # the latent weights (no step was taken; the
        torch.testing.assert_close(v, plain[k])  # training-mode pass moved only BN statistics)
    with torch.no_grad():
        fp = model(signal=x).logits
    assert not torch.equal(fq, fp)
    assert float((fq - fp).norm() / fp.norm()) < 0.3


def test_gradients_reach_the_latent_weights_through_the_fake_quantizers() -> None:
    torch.manual_seed(0)
    model = students.create("leadformer", "tiny", num_labels=5)
    attach_fake_quant(model)
    calibrate(model, DataLoader(_batches(2), batch_size=None), "signal")
    model.train()
    model(signal=_batches(1)[0]["signal"]).logits.sum().backward()
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    grad = linear.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0  # the straight-through estimator


def test_the_fine_tuning_reads_plain_records_and_its_fingerprint_covers_its_settings(
        tmp_path) -> None:
    """With augmentation on, KD-QAT still trains and calibrates on the records as the
    deployed model reads them; its soft labels are the fp32 student's own logits on them;
    a changed epoch count, rate or training setting is another job (never reused)."""
    from distill.compress.qat import kd_qat_job
    from distill.engine.factory import build_student, student_key
    from distill.engine.jobs import load_job_data
    from distill.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "name": "qat", "output_dir": str(tmp_path / "runs" / "{name}"),
        "data": {"synthetic": {"records": 120, "seed": 0}, "cache_dir": str(tmp_path / "c")},
        "teacher": {"kind": "vlm", "name_or_path": "tiny", "train_mode": "frozen"},
        "students": [{"family": "xresnet1d", "size": "tiny"}],
        "train": {"batch_size": 16, "augment": {"noise": 0.1, "shift": 0.5, "views": 2}}})
    jd = load_job_data(recipe, progress=False)
    spec = recipe.students[0]
    torch.manual_seed(0)
    build_student(recipe, spec, jd.classes).save_pretrained(tmp_path / "fp32")
    kwargs = dict(alpha=0.5, temperature=2.0, epochs=1, lr=1e-4, calibration_records=32)
    job = kd_qat_job(jd, spec, tmp_path / "fp32", **kwargs)
    key = student_key(spec)
    item = job.train_set[0]
    plain = jd.data.split("train", {key: jd.views[key]})[0]
    assert "draw" not in item and torch.equal(item[key], plain[key])
    from distill.compress.quantize import load_student

    with torch.no_grad():
        own = load_student(tmp_path / "fp32")(signal=plain[key][None]).logits[0]
    torch.testing.assert_close(item["kd.soft"], own, atol=1e-5, rtol=1e-5)
    for change in ({"epochs": 2}, {"lr": 1e-3}, {"alpha": 0.9}):
        assert kd_qat_job(jd, spec, tmp_path / "fp32", **{**kwargs, **change}).fingerprint \
            != job.fingerprint, change
    recipe.train.weight_decay = 0.5
    assert kd_qat_job(jd, spec, tmp_path / "fp32", **kwargs).fingerprint != job.fingerprint
