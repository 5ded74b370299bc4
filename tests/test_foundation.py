"""The masked-modelling foundation models (CSFM, LAMAE): masks, the pretraining wrapper, the
encoders' promises (channel-agnostic, lead-order invariant, independent-lead baseline), the
foundation teacher, ``ecg-distill pretrain`` and ``ecg-distill probe``.

The shared model contract of every csfm/lamae preset runs in test_students.py (they are
registered students); the teacher cases run here through the same ``ModelTester``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from model_tester import ModelCase, ModelTester, case_id
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

import students
import teachers
from distill.core.errors import ECGDistillError
from distill.core.leads import STANDARD_LEADS
from distill.models.masked import (MASK_STRATEGIES, masked_mse, record_generators, sample_mask,
                                   visible_index)
from students._masked import pretraining_model

NUM_LABELS = 5
SECONDS = 4.0  # 400 samples at 100 Hz: 8 patches of 0.5 s per lead
SMALL = {"width": 32, "depth": 1, "decoder_width": 32, "decoder_depth": 1}


def signal(batch: int, leads: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, leads, int(SECONDS * 100), generator=torch.Generator().manual_seed(seed))


def wrapper(family: str, **fields):
    return pretraining_model(family, "tiny", input_seconds=SECONDS, **{**SMALL, **fields})


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_masks_hide_the_ratio_and_the_same_count_in_every_record(strategy: str,
                                                                 ratio: float) -> None:
    hidden = sample_mask(16, 12, 20, ratio, strategy, block=3)
    assert hidden.shape == (16, 12, 20) and hidden.dtype == torch.bool
    counts = hidden.flatten(1).sum(1)
    assert (counts == counts[0]).all()
    assert abs(counts[0].item() / 240 - ratio) <= 0.05, counts[0].item()
    assert (~hidden).any(dim=2).any(dim=1).all()  # something visible in every record
    assert visible_index(hidden).shape == (16, 240 - counts[0].item())


def test_each_strategy_has_its_shape() -> None:
    torch.manual_seed(0)
    time = sample_mask(8, 12, 20, 0.5, "time", block=4)
    assert (time == time[:, :1]).all()  # whole columns: the same in every lead
    cols = time[:, 0].int()
    starts = (cols[:, 1:] - cols[:, :-1] == 1).sum(1) + cols[:, 0]
    assert (starts <= 3).all()  # 10 columns in blocks of 4: at most 3 runs
    channels = sample_mask(8, 12, 20, 0.75, "channels")
    assert (channels == channels[..., :1]).all() and (channels[..., 0].sum(1) == 9).all()
    both = sample_mask(8, 12, 20, 0.75, "time_channel", block=1)
    rows, cols = both.all(dim=2), both.all(dim=1)  # whole leads, whole columns
    assert (both == (rows[:, :, None] | cols[:, None, :])).all()
    assert (rows.sum(1) == 6).all() and (cols.sum(1) == 10).all()  # 1 - 0.5 * 0.5 = 0.75


def test_record_generators_fix_each_records_mask() -> None:
    a = sample_mask(3, 12, 8, 0.75, "patches", generators=record_generators(torch.tensor([4, 5, 6]), 0))
    b = sample_mask(2, 12, 8, 0.75, "patches", generators=record_generators(torch.tensor([5, 6]), 0))
    assert torch.equal(a[1:], b) and not torch.equal(a[0], a[1])


def test_bad_mask_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("mask_ratio must be in [0, 1), got 1.0")):
        sample_mask(1, 12, 8, 1.0, "patches")
    with pytest.raises(ValueError, match="unknown mask_strategy 'rows'; known: patches, time"):
        sample_mask(1, 12, 8, 0.5, "rows")
    with pytest.raises(ValueError, match="mask_strategy"):
        pretraining_model("csfm", "tiny", mask_strategy="rows")
    with pytest.raises(ValueError, match="xresnet1d cannot be pretrained by masked modelling"):
        pretraining_model("xresnet1d", "tiny")


# ---------------------------------------------------------------- the loss


def test_masked_mse_reads_the_hidden_patches_only() -> None:
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    hidden = torch.rand(2, 3, 4, generator=gen) > 0.5
    expected = ((pred - target) ** 2).mean(-1)[hidden].mean()
    torch.testing.assert_close(masked_mse(pred, target, hidden), expected)
    moved = pred.clone()
    moved[~hidden] += 100.0  # visible patches: anything
    torch.testing.assert_close(masked_mse(moved, target, hidden), expected)


@pytest.mark.parametrize("family", ["csfm", "lamae"])
def test_the_pretraining_loss_is_the_error_on_hidden_patches(family: str) -> None:
    model = wrapper(family).eval()
    x = signal(2)
    with torch.no_grad():
        out = model(x, generators=record_generators(torch.arange(2), 0))
    assert out.reconstruction.shape == out.target.shape == (2, 12, 8, 50)
    torch.testing.assert_close(out.target, x.view(2, 12, 8, 50))
    assert out.hidden.float().mean().item() == pytest.approx(0.75, abs=0.01)
    manual = ((out.reconstruction - out.target) ** 2).mean(-1)[out.hidden].mean()
    torch.testing.assert_close(out.loss, manual)
    model.train()
    loss = model(x).loss
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None and not n.endswith("classifier.1.weight")
            and not n.endswith("classifier.1.bias")]
    assert not dead, dead[:5]  # every encoder and decoder weight but the unused head learns


@pytest.mark.parametrize("family", ["csfm", "lamae"])
def test_a_visible_patch_reaches_the_reconstruction_only_through_the_encoder(family: str) -> None:
    """MAE: hidden patches are never read; changing one changes nothing but its target."""
    model = wrapper(family).eval()
    x = signal(1)
    hidden = sample_mask(1, 12, 8, 0.75, "patches", generators=record_generators(torch.arange(1), 3))
    lead, patch = [int(v) for v in hidden[0].nonzero()[0]]
    y = x.clone()
    y[0, lead, patch * 50:(patch + 1) * 50] += 5.0
    with torch.no_grad():
        a, b = model(x, hidden=hidden), model(y, hidden=hidden)
    torch.testing.assert_close(a.reconstruction, b.reconstruction)


def test_lamae_masked_encoding_matches_whole_record_encoding() -> None:
    """With nothing hidden, the visible-token path (same-lead attention mask) gives the
    tokens of the downstream path (each lead a sequence)."""
    model = wrapper("lamae").eval()
    x = signal(2)
    everything = visible_index(torch.zeros(2, 12, 8, dtype=torch.bool))
    with torch.no_grad():
        masked, _, _ = model.encoder.encode_visible(x, everything)
        whole, leads = model.encoder.forward_features(x)
    torch.testing.assert_close(masked, whole, rtol=1e-5, atol=1e-5)
    assert leads.tolist() == [i for i in range(12) for _ in range(8)]


def test_independent_lead_baseline_has_lamaes_parameters_and_no_cross_lead_path() -> None:
    lamae, independent = wrapper("lamae"), wrapper("lamae", cross_lead=False)
    assert lamae.num_parameters() == independent.num_parameters()
    hidden = sample_mask(1, 12, 8, 0.5, "patches", generators=record_generators(torch.arange(1), 0))
    x = signal(1)
    y = x.clone()
    y[0, 5] = torch.randn(400)  # another lead changes
    for model, crosses in ((lamae.eval(), True), (independent.eval(), False)):
        with torch.no_grad():
            a, b = model(x, hidden=hidden), model(y, hidden=hidden)
        moved = (a.reconstruction[0, 0] - b.reconstruction[0, 0]).abs().max().item()
        assert (moved > 1e-5) == crosses, (crosses, moved)


@pytest.mark.parametrize("cross_lead", [True, False])
def test_lamae_lead_aggregation_ignores_lead_order(cross_lead: bool) -> None:
    model = students.create("lamae", "tiny", num_labels=NUM_LABELS, input_seconds=SECONDS,
                            cross_lead=cross_lead, **SMALL).eval()
    x = signal(2)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = students.create("lamae", "tiny", num_labels=NUM_LABELS, input_seconds=SECONDS,
                               cross_lead=cross_lead, leads=[STANDARD_LEADS[i] for i in order],
                               **SMALL).eval()
    shuffled.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(signal=x), shuffled(signal=x[:, order])
    torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    assert sorted(b.token_leads.tolist()) == sorted(a.token_leads.tolist())


# ---------------------------------------------------------------- save, load, leads


@pytest.mark.parametrize("family", ["csfm", "lamae"])
def test_downstream_loading_drops_the_decoder_and_reads_any_leads(family: str,
                                                                  tmp_path: Path) -> None:
    model = wrapper(family).eval()
    model.save_pretrained(tmp_path)
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder).__name__ == {"csfm": "CSFMModel", "lamae": "LAMAEModel"}[family]
    assert not any(k.startswith("decoder") for k in encoder.state_dict())
    x = signal(2)
    with torch.no_grad():
        torch.testing.assert_close(encoder(signal=x).tokens,
                                   model.encoder.forward_features(x)[0])
    whole = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert type(whole) is type(model)
    for leads in (["I"], ["I", "II", "III", "aVR", "aVL", "aVF"], ["V1", "II"]):
        reader = AutoModel.from_pretrained(tmp_path, leads=leads).eval()
        with torch.no_grad():
            out = reader(signal=x[:, [STANDARD_LEADS.index(l) for l in leads]])
        idx = [STANDARD_LEADS.index(l) for l in leads]
        assert out.token_leads.tolist() == [i for i in idx for _ in range(8)]
        assert torch.isfinite(out.pooled).all()


def test_large_presets_are_teacher_sized() -> None:
    quickstart_largest = max(students.create(f, s, num_labels=5).num_parameters()
                             for f, s in [("xresnet1d", "small"), ("leadformer", "tiny")])
    for family in ("csfm", "lamae"):
        sizes = [s for f, s in students.presets() if f == family]
        assert sizes == ["tiny", "base", "large"]
        large = students.create(family, "large", num_labels=5).num_parameters()
        assert large >= 10 * quickstart_largest, (family, large)


# ---------------------------------------------------------------- the foundation teacher


def _saved_encoder(tmp: Path, family: str = "csfm") -> Path:
    torch.manual_seed(0)
    folder = tmp / f"{family}-pretrained"
    if not folder.exists():
        wrapper(family).save_pretrained(folder)
    return folder


def teacher_batch(batch_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch_size)
    return {"signal": torch.randn(batch_size, 12, 400, generator=gen),
            "labels": (torch.rand(batch_size, NUM_LABELS, generator=gen) > 0.5).float()}


def _teacher(family: str, mode: str):
    def build(tmp: Path):
        lora = {"r": 4, "alpha": 8, "init_lora_weights": False}
        return teachers.create("foundation", _saved_encoder(tmp, family), num_labels=NUM_LABELS,
                               train_mode=mode, lora=lora)
    return build


def _lora_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if "lora_" in n or n.startswith("head.")}


TEACHER_RELOAD = "import teachers\nmodel = teachers.load(folder)"
TEACHER_CASES = [
    ModelCase("foundation-csfm-full", _teacher("csfm", "full"), teacher_batch, NUM_LABELS,
              lambda m, f: m.save_pretrained(f), TEACHER_RELOAD, expect_lead_tokens=True),
    ModelCase("foundation-lamae-lora", _teacher("lamae", "lora"), teacher_batch, NUM_LABELS,
              lambda m, f: m.save_pretrained(f), TEACHER_RELOAD, trainable=_lora_names,
              expect_lead_tokens=True),
]


@pytest.mark.parametrize("case", TEACHER_CASES, ids=case_id)
class TestFoundationTeachers(ModelTester):
    pass


def test_foundation_teacher_refuses_other_models(tmp_path: Path) -> None:
    students.create("xresnet1d", "tiny", num_labels=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a ecg_xresnet1d model, not a csfm, lamae or hypnos encoder"):
        teachers.create("foundation", tmp_path, num_labels=2)
    with pytest.raises(ValueError, match=re.escape(
            f"foundation teacher: {tmp_path / 'none'} does not exist; make it with "
            f"`ecg-distill pretrain`")):
        teachers.create("foundation", tmp_path / "none", num_labels=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="foundation teacher: cannot load .*empty"):
        teachers.create("foundation", tmp_path / "empty", num_labels=2)


def test_foundation_teacher_reads_a_lead_subset_with_the_same_weights(tmp_path: Path) -> None:
    teacher = teachers.create("foundation", _saved_encoder(tmp_path), num_labels=2,
                              leads=["I"]).eval()
    with torch.no_grad():
        out = teacher(signal=signal(2, leads=1))
    assert out.tokens.shape == (2, 8, 32) and set(out.token_leads.tolist()) == {0}


# ---------------------------------------------------------------- pretrain and probe


def _recipe(tmp: Path, **pretrain) -> Path:
    import yaml

    recipe = {"name": "pt", "output_dir": str(tmp / "{name}"),
              "data": {"synthetic": {"records": 60}, "cache_dir": str(tmp / "cache")},
              "pretrain": {"family": "lamae", "size": "tiny", "epochs": 2, "batch_size": 16,
                           "options": {"width": 32, "depth": 1, "decoder_width": 32,
                                       "decoder_depth": 1}, **pretrain},
              "train": {"lr": 0.001}}
    path = tmp / "pt.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_pretrain_command_trains_resumes_and_refuses_other_settings(tmp_path: Path, capsys) -> None:
    from distill.cli import main

    recipe = _recipe(tmp_path, extra={"synthetic": 20, "seed": 3})
    assert main(["pretrain", str(recipe), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"pretrained lamae/tiny \([\d,]+ encoder parameters\) on 66 records", out)
    summary = json.loads((tmp_path / "pt" / "pretrain" / "pretrain.json").read_text())
    assert summary["records"] == {"train": 66, "val": 6} and summary["best_epoch"] in (1, 2)
    log = (tmp_path / "pt" / "pretrain" / "log.csv").read_text().splitlines()
    assert len(log) == 3 and "val_loss" in log[0]
    encoder = AutoModel.from_pretrained(tmp_path / "pt" / "pretrain" / "best")
    assert encoder.family == "lamae" and encoder.config.normalization["kind"] == "global"
    assert main(["pretrain", str(recipe), "--quiet"]) == 0
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(ECGDistillError, match="holds a pretraining of other settings; --force"):
        from distill.engine.pretrain import run_pretrain
        from distill.recipe import load_recipe

        run_pretrain(load_recipe(recipe, ["pretrain.mask.strategy=channels"]), progress=False)


def test_interrupted_pretraining_resumes_to_the_same_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from distill.data.load import load_data
    from distill.engine.pretrain import pretrain_job, run_pretrain
    from distill.engine.train import fit
    from distill.recipe import load_recipe

    path = _recipe(tmp_path)
    whole = load_recipe(path, [f"output_dir={tmp_path}/a", "train.checkpoint_every=2"])
    run_pretrain(whole, progress=False)
    broken = load_recipe(path, [f"output_dir={tmp_path}/b", "train.checkpoint_every=2"])

    class Stop(Exception):
        pass

    def stop_at(step: int) -> None:
        if step == 3:  # epoch 2, one batch in (2 batches an epoch)
            raise Stop

    job = pretrain_job(broken, load_data(broken.data, progress=False), None)
    with pytest.raises(Stop):
        fit(job, dataclasses.replace(broken.train, batch_size=16),
            tmp_path / "b" / "pretrain", seed=broken.seed, progress=False, epochs=2,
            on_step=stop_at)
    with pytest.raises(ECGDistillError, match="pass --resume"):
        run_pretrain(broken, progress=False)
    run_pretrain(broken, resume=True, progress=False)
    a = load_file(tmp_path / "a" / "pretrain" / "best" / "model.safetensors")
    b = load_file(tmp_path / "b" / "pretrain" / "best" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("decoder.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_probe_runs_every_protocol(tmp_path: Path, capsys) -> None:
    from distill.cli import main

    recipe = _recipe(tmp_path, family="csfm")
    assert main(["pretrain", str(recipe), "--quiet"]) == 0
    best = tmp_path / "pt" / "pretrain" / "best"
    args = ["probe", str(best), "--data", str(recipe), "--epochs", "1", "--bootstrap", "20",
            "--fractions", "0.5", "1", "--finetune-fractions", "0.5", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for line in ("linear probe, 50% labels", "fine-tuned, 50% labels", "from scratch",
                 "linear probe on lead I (same weights)", "reconstruction, channels mask"):
        assert line in text, text
    result = json.loads((best.parent / "probe" / "probe.json").read_text())
    assert set(result["reconstruction"]) == set(MASK_STRATEGIES)
    assert set(result["leads"]) == {"12 leads", "lead I", "limb leads"}
    preds = np.load(best.parent / "probe" / "predictions.npz")
    assert preds["linear_1.0"].shape == (result["test_records"], len(result["classes"]))
    with pytest.raises(ECGDistillError, match="--force"):
        from distill.run.probe import run_probe

        run_probe(best, recipe, progress=False)


def test_linear_probe_agrees_with_a_plain_scikit_learn_fit() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from distill.run.probe import linear_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0), np.zeros(80, bool)], 1).astype(float)
    probs = linear_probe(x[:60], y[:60], x[60:])
    s = StandardScaler().fit(x[:60])
    ref = LogisticRegression(max_iter=2000, random_state=0).fit(s.transform(x[:60]), y[:60, 1])
    np.testing.assert_allclose(probs[:, 1], ref.predict_proba(s.transform(x[60:]))[:, 1])
    assert (probs[:, 2] == 0).all()  # a label without positives: its training rate


def test_probe_refuses_models_that_are_not_masked_encoders(tmp_path: Path) -> None:
    from distill.run.probe import load_encoder

    students.create("xresnet1d", "tiny", num_labels=2).save_pretrained(tmp_path)
    with pytest.raises(ECGDistillError, match="a ecg_xresnet1d model; probing takes a pretrained encoder"):
        load_encoder(tmp_path)


def test_fm_teacher_recipe_runs_end_to_end_with_lead_to_lead_transport(tmp_path: Path) -> None:
    """recipes/fm-teacher.yaml, reduced: a pretrained LAMAE teacher (a tiny stand-in saved
    here), fine-tuned, cached, distilled into a lead-token student with OT, evaluated,
    reported (the report names the teacher family; the OT plan is drawn)."""
    from distill.run.pipeline import run_pipeline
    from distill.recipe import load_recipe

    torch.manual_seed(0)
    teacher = tmp_path / "lamae-pretrained"
    pretraining_model("lamae", "tiny", **SMALL).save_pretrained(teacher)
    repo = Path(__file__).resolve().parents[1]
    recipe = load_recipe(repo / "recipes" / "fm-teacher.yaml", [
        "data.synthetic.records=60", f"data.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'runs'}/{{name}}", f"teacher.name_or_path={teacher}",
        "teacher.epochs=1", "train.epochs=1", "students=[{family: leadformer, size: tiny}]",
        "quantize.formats=[]", "export.enabled=false", "evaluate.bootstrap=20"])
    run_pipeline(recipe, progress=False)
    report = (recipe.run_dir / "report.md").read_text()
    assert f"Teacher: foundation `{teacher}` (LAMAE), train mode full." in report
    assert (recipe.run_dir / "figures" / "transport_plan.png").stat().st_size > 0
    assert re.search(r"Lead-to-lead transport \(leadformer/tiny, \d+ test records\): [0-9.]+ of "
                     r"the transported mass stays on the same lead", report)
    results = json.loads((recipe.run_dir / "results.json").read_text())
    assert results["models"]["teacher"]["parameters"] > 0


def test_pretrain_section_refuses_what_it_sets_itself() -> None:
    from distill.core.errors import RecipeError
    from distill.recipe import load_recipe

    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(RecipeError, match=re.escape(
            "pretrain.options.mask_ratio: not a pretraining option; set it with "
            "pretrain.mask.ratio")):
        load_recipe(repo / "recipes" / "pretrain-lamae.yaml", ["pretrain.options={mask_ratio: 0.5}"])
    with pytest.raises(RecipeError, match="pretrain.family: 'xresnet1d' is not one of 'csfm', 'hypnos', 'lamae', 'rvq'"):
        load_recipe(repo / "recipes" / "pretrain-lamae.yaml", ["pretrain.family=xresnet1d"])
    with pytest.raises(ValueError, match="xresnet1d has no 'large' preset; its sizes: tiny, small, base"):
        students.create("xresnet1d", "large", num_labels=2)


@pytest.mark.parametrize("family", ["csfm", "lamae"])
def test_pretraining_runs_under_bf16_autocast(family: str) -> None:
    model = wrapper(family)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(signal(2))
    out.loss.backward()
    assert torch.isfinite(out.loss) and not model.encoder.classifier[1].weight.requires_grad


def test_foundation_teacher_loads_in_4bit_keeping_the_patch_embedding(tmp_path: Path) -> None:
    """bitsandbytes' CPU 4-bit kernel takes whole 64-weight blocks: the patch embedding
    (50 inputs) stays in full precision, every block's Linear is quantized."""
    torch.manual_seed(0)
    folder = tmp_path / "lamae64"
    wrapper("lamae", width=64, decoder_width=32).save_pretrained(folder)
    teacher = teachers.create("foundation", folder, num_labels=2, load_in="4bit",
                              train_mode="frozen").eval()
    encoder = teacher.hf_model
    assert type(encoder.tokenizer.proj).__name__ == "Linear"
    assert type(encoder.blocks[0].attn.q).__name__ == "Linear4bit"
    with torch.no_grad():
        out = teacher(signal=signal(2))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()
