"""Students: the shared model contract over every preset, plus what each family promises.

Every ``(family, size)`` preset runs through ``ModelTester`` (output contract, gradients,
batch independence, fresh-process reload). The rest checks the registry, the size spread,
lead subsets and sampling rates, input errors, leadformer's invariance to lead order and
the in-process AutoModel round trip.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from model_tester import ModelCase, ModelTester, case_id
from transformers import AutoConfig, AutoModel

import students
from distill.core.leads import STANDARD_LEADS
from distill.core.contract import check_output
from distill.metrics.footprint import linear_share
from students.csfm import CSFMConfig, CSFMModel
from students.lamae import LAMAEConfig, LAMAEModel
from students.leadformer import LeadFormerConfig, LeadFormerModel
from students.xresnet1d import XResNet1dConfig, XResNet1dModel

NUM_LABELS = 5
RATE, SECONDS = 100, 10.0
RELOAD = "import students\nfrom transformers import AutoModel\nmodel = AutoModel.from_pretrained(folder)"


def make_image_batch(batch_size: int, size: int = 224) -> dict[str, torch.Tensor]:
    """A seeded batch of printouts: uint8 images [B, 3, S, S] and 0/1 labels [B, 5]."""
    gen = torch.Generator().manual_seed(batch_size)
    return {"image": torch.randint(0, 256, (batch_size, 3, size, size), generator=gen,
                                   dtype=torch.uint8),
            "labels": (torch.rand(batch_size, NUM_LABELS, generator=gen) > 0.5).float()}


def make_batch(batch_size: int, n_leads: int = 12, samples: int = 1000) -> dict[str, torch.Tensor]:
    """A seeded random batch: signal [B, L, T] in mV-like scale and 0/1 labels [B, 5]."""
    gen = torch.Generator().manual_seed(batch_size)
    return {"signal": torch.randn(batch_size, n_leads, samples, generator=gen),
            "labels": (torch.rand(batch_size, NUM_LABELS, generator=gen) > 0.5).float()}


def build(family: str, size: str, **overrides):
    return students.create(family, size, num_labels=NUM_LABELS, sampling_rate=RATE,
                           input_seconds=SECONDS, **overrides)


SIGNAL_PRESETS = [(f, s) for f, s in students.presets() if not students.reads_images(f)]
IMAGE_PRESETS = [(f, s) for f, s in students.presets() if students.reads_images(f)]


def _lora_trainable(model) -> set[str]:
    return {n for n, _ in model.named_parameters()
            if "lora_" in n or "multi_modal_projector" in n or n.startswith("classifier.")}


def case(family: str, size: str, **extra) -> ModelCase:
    # The zero-initialised last BN of each residual block (the default) blocks the gradient
    # to the branch convolutions at step 0 by design, so the gradient check would fail for
    # a reason that is not a bug; the contract runs with a small scale there instead (same
    # architecture; as after a few steps), test_xresnet1d_blocks_start_as_identity checks
    # the default.
    overrides = {"residual_init_scale": 0.1} if family == "xresnet1d" else {}
    overrides.update(extra)
    image = students.reads_images(family)
    return ModelCase(
        name=f"{family}-{size}" + ("-lora" if "lora" in extra else ""),
        build=lambda tmp, f=family, s=size: build(f, s, **overrides),
        make_batch=make_image_batch if image else make_batch,
        num_labels=NUM_LABELS,
        save=lambda m, f: m.save_pretrained(f),
        reload_code=RELOAD,
        expect_lead_tokens=family in ("leadformer", "csfm", "lamae"),
        # LoRA: the adapters (random A and B, so both get gradients), the projector, the head
        trainable=_lora_trainable if "lora" in extra else None,
    )


# csfm/lamae base is the code of their tiny and large presets at another width: left out
CASES = [case(family, size) for family, size in students.presets()
         if (family, size) not in (("csfm", "base"), ("lamae", "base"))] + [
    case("llava", "tiny", lora={"r": 4, "alpha": 8, "init_lora_weights": False})]


@pytest.mark.parametrize("case", CASES, ids=case_id)
class TestStudents(ModelTester):
    pass


# ---------------------------------------------------------------- registry and sizes

def test_presets_list_every_family_and_size() -> None:
    assert students.FAMILIES == ("convnext", "csfm", "lamae", "leadformer", "llava", "vit",
                                 "xresnet1d")
    assert students.SIZES == ("tiny", "small", "base", "large")
    masked = ("csfm", "lamae")  # the seed papers' sizes: tiny, base and a teacher-sized large
    assert students.presets() == [
        (f, s) for f in students.FAMILIES for s in students.SIZES
        if (s in ("tiny", "base", "large") if f in masked else s != "large")
        and (f, s) != ("llava", "base")]
    assert [f for f in students.FAMILIES if students.reads_images(f)] == [
        "convnext", "llava", "vit"]


def test_unknown_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "unknown student family 'x'; known: convnext, csfm, lamae, leadformer, llava, vit, "
            "xresnet1d")):
        students.create("x", num_labels=2)
    with pytest.raises(ValueError, match=re.escape(
            "unknown student size 'huge'; known: tiny, small, base, large")):
        students.create("xresnet1d", "huge", num_labels=2)
    with pytest.raises(ValueError, match=r"unknown leadformer option 'widht'; known: .*width"):
        students.create("leadformer", num_labels=2, widht=64)
    with pytest.raises(ValueError, match="unknown lead name 'V7'"):
        students.create("leadformer", num_labels=2, leads=("I", "V7"))


@pytest.mark.parametrize("family", ["leadformer", "xresnet1d"])
def test_parameter_counts_span_30x(family: str) -> None:
    counts = {size: build(family, size).num_parameters() for size in ("tiny", "small", "base")}
    assert counts["tiny"] < counts["small"] < counts["base"], counts
    assert counts["base"] / counts["tiny"] >= 30, counts


def test_leadformer_parameters_sit_in_linear_layers() -> None:
    for size in ("tiny", "small", "base"):
        assert linear_share(build("leadformer", size)) > 0.9, size


def test_create_sets_labels_and_dials() -> None:
    names = {0: "NORM", 1: "MI", 2: "STTC"}
    model = students.create("xresnet1d", num_labels=3, id2label=names)
    assert model.config.id2label == names and model.config.label2id == {"NORM": 0, "MI": 1,
                                                                         "STTC": 2}
    assert model.config.num_labels == 3
    narrow = students.create("xresnet1d", num_labels=3, width=8)
    assert narrow.config.stage_widths == [8] * 4
    assert narrow.num_parameters() < model.num_parameters()
    with pytest.raises(ValueError, match="id2label names 3 labels but num_labels is 2"):
        students.create("xresnet1d", num_labels=2, id2label=names)


# ---------------------------------------------------------------- leads, rates, errors

def test_leadformer_single_lead_at_50hz() -> None:
    model = students.create("leadformer", num_labels=NUM_LABELS, leads=("I",),
                            sampling_rate=50).eval()
    assert model.config.input_samples == 500 and model.config.patch_size == 25  # 0.5 s
    with torch.no_grad():
        out = model(**make_batch(2, n_leads=1, samples=500))
    check_output(out, batch_size=2, num_labels=NUM_LABELS)
    assert out.loss is not None and out.loss.ndim == 0
    assert out.tokens.shape[1] == model.config.num_patches == 20  # 500 / 25
    assert (out.token_leads == 0).all()


def test_leadformer_tokens_keep_their_lead_in_lead_major_order() -> None:
    model = students.create("leadformer", num_labels=NUM_LABELS, leads=("V6", "aVR")).eval()
    with torch.no_grad():
        out = model(signal=make_batch(2, n_leads=2)["signal"])
    n = model.config.num_patches
    assert set(out.token_leads.tolist()) == {11, 3}
    assert out.token_leads.tolist() == [11] * n + [3] * n
    assert out.tokens.shape == (2, 2 * n, model.config.hidden_size)


def test_xresnet1d_single_lead_at_50hz() -> None:
    model = students.create("xresnet1d", num_labels=NUM_LABELS, leads=("II",),
                            sampling_rate=50).eval()
    with torch.no_grad():
        out = model(**make_batch(2, n_leads=1, samples=500))
    check_output(out, batch_size=2, num_labels=NUM_LABELS)
    assert (out.token_leads == -1).all() and out.tokens.shape[1] == 16  # 500 / 32, rounded up


@pytest.mark.parametrize("family", ["leadformer", "xresnet1d"])
def test_mismatched_input_names_expected_and_got(family: str) -> None:
    model = students.create(family, num_labels=NUM_LABELS)
    with pytest.raises(ValueError, match=re.escape(
            f"{family} expects signal [B, 12, 1000] (leads I..V6 at 100 Hz, 10 s), "
            f"got [4, 1, 1000]")):
        model(signal=torch.randn(4, 1, 1000))
    with pytest.raises(ValueError, match=re.escape("got [4, 12, 5000]")):
        model(signal=torch.randn(4, 12, 5000))  # a 500 Hz record into a 100 Hz model
    with pytest.raises(ValueError, match=re.escape("got [12, 1000]")):
        model(signal=torch.randn(12, 1000))
    with pytest.raises(ValueError, match="floating-point signal .* got torch.int64"):
        model(signal=torch.zeros(4, 12, 1000, dtype=torch.long))
    subset = students.create(family, num_labels=NUM_LABELS, leads=("V6", "aVR"),
                             sampling_rate=50, input_seconds=5.0)
    with pytest.raises(ValueError, match=re.escape(
            f"{family} expects signal [B, 2, 250] (leads V6, aVR at 50 Hz, 5 s), "
            f"got [1, 12, 250]")):
        subset(signal=torch.randn(1, 12, 250))


# ---------------------------------------------------------------- leadformer: lead order

def test_leadformer_latent_attention_ignores_lead_order() -> None:
    """Permuting the rows of the signal together with config.leads leaves pooled/logits."""
    model = build("leadformer", "tiny").eval()
    perm = [7, 2, 11, 0, 5, 9, 1, 3, 10, 4, 8, 6]
    permuted = build("leadformer", "tiny", leads=[STANDARD_LEADS[i] for i in perm]).eval()
    permuted.load_state_dict(model.state_dict())
    signal = make_batch(3)["signal"]
    with torch.no_grad():
        out, out_perm = model(signal=signal), permuted(signal=signal[:, perm])
        shuffled_only = model(signal=signal[:, perm])  # rows moved, leads not: must differ
    torch.testing.assert_close(out_perm.pooled, out.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_perm.logits, out.logits, rtol=1e-5, atol=1e-5)
    n = model.config.num_patches
    tokens = out.tokens.view(3, 12, n, -1)[:, perm].reshape(3, 12 * n, -1)  # lead blocks moved
    torch.testing.assert_close(out_perm.tokens, tokens, rtol=1e-5, atol=1e-5)
    assert torch.equal(out_perm.token_leads, out.token_leads.view(12, n)[perm].reshape(-1))
    assert not torch.allclose(shuffled_only.logits, out.logits, atol=1e-4)


# ---------------------------------------------------------------- xresnet1d: init

def test_xresnet1d_blocks_start_as_identity() -> None:
    """Default init: each branch's last BN scale is 0, so a block is relu(shortcut(x))."""
    model = build("xresnet1d", "tiny").eval()
    blocks = [b for stage in model.stages for b in stage]
    assert all(torch.count_nonzero(b.convs[-1][1].weight) == 0 for b in blocks)
    x = torch.randn(2, model.config.stem_widths[-1], 250)  # (B, C, T) after the stem
    block = blocks[0]
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))
    # the zero scales themselves still learn, so training moves off the identity
    model.train()
    out = model(**make_batch(4))
    out.loss.backward()
    assert all(b.convs[-1][1].weight.grad.abs().sum() > 0 for b in blocks)


# ---------------------------------------------------------------- save / AutoModel

CLASSES = {"leadformer": (LeadFormerConfig, LeadFormerModel),
           "xresnet1d": (XResNet1dConfig, XResNet1dModel),
           "csfm": (CSFMConfig, CSFMModel), "lamae": (LAMAEConfig, LAMAEModel)}


@pytest.mark.parametrize("family,size", SIGNAL_PRESETS)
def test_auto_classes_round_trip_in_process(family: str, size: str, tmp_path: Path) -> None:
    config_cls, model_cls = CLASSES[family]
    model = students.create(family, size, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                            leads=("V1", "I", "aVF"), sampling_rate=50).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is config_cls and config.model_type == f"ecg_{family}"
    assert config.leads == ["V1", "I", "aVF"] and config.sampling_rate == 50
    assert config.input_samples == 500 and config.id2label == {0: "a", 1: "b", 2: "c"}
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is model_cls
    signal = make_batch(2, n_leads=3, samples=500)["signal"]
    with torch.no_grad():
        expected, got = model(signal=signal), loaded(signal=signal)
    for key in ("logits", "tokens", "pooled", "token_leads"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
