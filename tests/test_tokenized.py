"""The tokenized foundation models (Hypnos-style): the RVQ tokenizer, the next-token model,
the signal metrics, the codec protocol, ``ecg-distill pretrain`` of both and the
``foundation`` teacher over a Hypnos model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_tester import ModelCase, ModelTester, case_id
from transformers import AutoModel, AutoModelForPreTraining

import teachers
from distill.core.errors import ECGDistillError
from distill.metrics.signal import (codebook_usage, mean_interval, paired_mean_difference,
                                    pearson, prd)
from distill.models.hypnos import HypnosForNextToken, HypnosModel, hypnos_config
from distill.models.rvq import RVQTokenizer, RVQTokenizerConfig
from students._masked import pretraining_families, pretraining_model

SAMPLES = 400  # 4 s at 100 Hz: 10 patches of 0.4 s
SMALL_RVQ = {"stem_channels": 8, "hidden_size": 16, "codebook_dim": 8, "num_quantizers": 4,
             "codebook_size": 16}
SMALL_HYPNOS = {"hidden_size": 32, "num_layers": 1, "num_heads": 1, "depth_hidden_size": 32,
                "depth_layers": 1}
NUM_LABELS = 3
ROOT = Path(__file__).resolve().parent.parent


def signal(batch: int, leads: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, leads, SAMPLES, generator=torch.Generator().manual_seed(seed))


def tokenizer(seed: int = 0) -> RVQTokenizer:
    """A small tokenizer whose codebooks were initialised (k-means on one batch)."""
    torch.manual_seed(seed)
    tok = RVQTokenizer(RVQTokenizerConfig(input_samples=SAMPLES, patch_size=40, **SMALL_RVQ))
    tok.quantizer.quantize_dropout = False  # every depth this once
    tok(signal(8, seed=seed))  # training mode: k-means initialisation of every codebook
    tok.quantizer.quantize_dropout = True
    return tok.eval()


def next_token_model(seed: int = 0) -> HypnosForNextToken:
    tok = tokenizer(seed)
    model = HypnosForNextToken(hypnos_config(tok, num_labels=NUM_LABELS, **SMALL_HYPNOS))
    model.hypnos.tokenizer.load_state_dict(tok.state_dict())
    return model.eval()


# ---------------------------------------------------------------- the RVQ tokenizer


def test_rvq_codes_have_one_stack_per_lead_and_patch_and_decode_back() -> None:
    tok = tokenizer()
    x = signal(3)
    codes = tok.encode(x)
    assert codes.shape == (3, 12, 10, 4) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 16
    with torch.no_grad():
        out = tok(x)
    assert torch.equal(out.codes, codes)  # eval-mode forward: the same codes
    torch.testing.assert_close(tok.decode(codes), out.reconstruction)  # decode = forward
    assert tok.decode(codes).shape == x.shape


def test_rvq_decoding_a_prefix_of_depths_sums_those_codebooks_only() -> None:
    tok = tokenizer()
    codes = tok.encode(signal(2))
    with torch.no_grad():  # the library's own decoding of two codebooks (-1: dropped)
        flat = codes.reshape(24, 10, 4).clone()
        flat[..., 2:] = -1
        two = tok._samples(tok.quantizer.get_output_from_indices(flat), 2)
    torch.testing.assert_close(tok.decode(codes, depth=2), two)
    torch.testing.assert_close(tok.decode(codes[..., :2]), two)
    # the stored codebooks are what quantization picked: the nearest code to each residual
    latents = tok._latents(signal(2)).reshape(-1, 8)
    first = tok.quantizer.codebooks[0]
    nearest = torch.cdist(latents, first).argmin(dim=1)
    assert torch.equal(nearest, codes[..., 0].reshape(-1))


def test_rvq_leads_are_tokenized_independently_with_the_same_weights() -> None:
    tok = tokenizer()
    x = signal(2)
    y = x.clone()
    y[:, 5] = torch.randn(2, SAMPLES)
    a, b = tok.encode(x), tok.encode(y)
    keep = [i for i in range(12) if i != 5]
    assert torch.equal(a[:, keep], b[:, keep]) and not torch.equal(a[:, 5], b[:, 5])
    tok1 = RVQTokenizer(RVQTokenizerConfig(input_samples=SAMPLES, patch_size=40, leads=["V1"],
                                           **SMALL_RVQ))
    tok1.load_state_dict(tok.state_dict())
    assert torch.equal(tok1.eval().encode(x[:, 6:7]), a[:, 6:7])  # the same weights, one lead


def test_rvq_bit_rate_and_bad_settings() -> None:
    cfg = RVQTokenizerConfig(sampling_rate=100, patch_size=40, num_quantizers=8, codebook_size=256)
    assert cfg.bits_per_second() == 160.0 and cfg.bits_per_second(1) == 20.0
    with pytest.raises(ValueError, match="codebook_size must be a power of two"):
        RVQTokenizerConfig(codebook_size=100)
    tok = tokenizer()
    with pytest.raises(ValueError, match=re.escape("rvq decodes codes [B, L, 10, <=4], got")):
        tok.decode(torch.zeros(1, 12, 9, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="depth must be in 1..4"):
        tok.decode(torch.zeros(1, 12, 10, 4, dtype=torch.long), depth=5)


def test_rvq_training_step_moves_the_codebooks_only_in_training_mode() -> None:
    tok = tokenizer()
    before = tok.quantizer.codebooks.clone()
    with torch.no_grad():
        out = tok(signal(4, seed=1))  # an eval-mode forward
    assert torch.equal(tok.quantizer.codebooks, before)  # eval: no EMA update
    assert out.commit_loss == 0 and out.loss == out.mse
    tok.train()
    out = tok(signal(4, seed=1))
    out.loss.backward()
    assert not torch.equal(tok.quantizer.codebooks, before)
    assert out.commit_loss > 0
    assert tok.encoder[0].weight.grad.abs().sum() > 0  # gradients pass the quantizer


def test_rvq_reloads_with_its_codebooks_and_constant_buffers(tmp_path: Path) -> None:
    tok = tokenizer()
    tok.save_pretrained(tmp_path)
    again = RVQTokenizer.from_pretrained(tmp_path).eval()
    x = signal(2, seed=5)
    assert torch.equal(again.encode(x), tok.encode(x))
    with torch.no_grad():
        out = again(x)
    assert out.loss == out.mse  # the library's unsaved zero buffer is zero again


def test_an_untrained_tokenizer_is_refused_rather_than_fitted_on_the_fly() -> None:
    tok = RVQTokenizer(RVQTokenizerConfig(input_samples=SAMPLES, patch_size=40, **SMALL_RVQ))
    with pytest.raises(ValueError, match="codebooks were never initialised"):
        tok.eval().encode(signal(2))
    with pytest.raises(ValueError, match=re.escape("rvq expects a float signal [B, leads, 400]")):
        tokenizer().encode(signal(2)[..., :300])


# The default architecture (no patch_strides, 2 patch-rate and 1 sample-rate blocks): its
# parameter names and weight shapes for SMALL_RVQ, as tokenizers trained before the optional
# architecture fields existed saved them (they must load unchanged).
DEFAULT_WEIGHTS = {
    "encoder.0": (8, 1, 7), "encoder.1.body.1": (8, 8, 5), "encoder.1.body.3": (8, 8, 1),
    "encoder.2": (16, 8, 40), "encoder.3.body.1": (16, 16, 3), "encoder.3.body.3": (16, 16, 1),
    "encoder.4.body.1": (16, 16, 3), "encoder.4.body.3": (16, 16, 1), "encoder.6": (8, 16, 1),
    "decoder.0": (16, 8, 3), "decoder.1.body.1": (16, 16, 3), "decoder.1.body.3": (16, 16, 1),
    "decoder.2.body.1": (16, 16, 3), "decoder.2.body.3": (16, 16, 1), "decoder.4": (16, 8, 40),
    "decoder.5.body.1": (8, 8, 5), "decoder.5.body.3": (8, 8, 1), "decoder.7": (1, 8, 7),
}


def test_rvq_default_architecture_keeps_its_parameter_names_and_shapes() -> None:
    tok = RVQTokenizer(RVQTokenizerConfig(input_samples=SAMPLES, patch_size=40, **SMALL_RVQ))
    params = {n: tuple(p.shape) for n, p in tok.named_parameters()}
    expected = {f"{k}.weight": v for k, v in DEFAULT_WEIGHTS.items()}
    expected.update({f"{k}.bias": (v[1] if k == "decoder.4" else v[0],)  # 4: transposed
                     for k, v in DEFAULT_WEIGHTS.items()})
    assert params == expected
    explicit = RVQTokenizer(RVQTokenizerConfig(input_samples=SAMPLES, patch_size=40,
                                               patch_strides=None, patch_blocks=2,
                                               sample_blocks=1, **SMALL_RVQ))
    assert {n: tuple(p.shape) for n, p in explicit.named_parameters()} == params


def _strided(**fields) -> RVQTokenizer:
    """A small tokenizer with the strided hierarchy, its codebooks initialised."""
    torch.manual_seed(0)
    fields = {"patch_size": 20, "patch_strides": [2, 2, 5], "patch_blocks": 1,
              "sample_blocks": 2, **fields}
    tok = RVQTokenizer(RVQTokenizerConfig(input_samples=SAMPLES, **{**SMALL_RVQ, **fields}))
    tok.quantizer.quantize_dropout = False  # every depth this once
    tok(signal(4))  # k-means initialisation (training mode)
    tok.quantizer.quantize_dropout = True
    return tok.eval()


def test_rvq_strided_hierarchy_codes_shapes_and_round_trip(tmp_path: Path) -> None:
    tok = _strided()
    x = signal(2, seed=2)
    codes = tok.encode(x)
    assert codes.shape == (2, 12, 20, 4)  # 0.2 s patches: 20 steps of 4 s
    with torch.no_grad():
        out = tok(x)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(tok.decode(codes), out.reconstruction)
    assert tok.decode(codes, depth=2).shape == x.shape
    assert tok.config.bits_per_second() == 4 * 4 * 100 / 20
    # every stage maps lengths exactly: the latents are one vector per patch
    assert tok._latents(x).shape == (24, 20, 8)
    residuals = [m for m in tok.encoder if type(m).__name__ == "_Residual"]
    assert len(residuals) == 2 + 3 + 1  # sample-rate, one per stage, patch-rate
    tok.save_pretrained(tmp_path)
    again = RVQTokenizer.from_pretrained(tmp_path).eval()
    assert again.config.patch_strides == [2, 2, 5] and again.config.sample_blocks == 2
    assert torch.equal(again.encode(x), codes)
    torch.testing.assert_close(again.decode(codes), tok.decode(codes))


def test_rvq_strided_hierarchy_odd_and_single_strides() -> None:
    for strides, patch in (([5, 8], 40), ([40], 40), ([3, 1], 3)):
        cfg = RVQTokenizerConfig(input_samples=120, patch_size=patch, patch_strides=strides,
                                 **SMALL_RVQ)
        tok = RVQTokenizer(cfg)
        x = torch.randn(1, 2, 120)
        assert tok._latents(x).shape == (2, cfg.num_patches, 8), strides
        assert tok(x).reconstruction.shape == x.shape, strides


def test_rvq_architecture_fields_are_checked() -> None:
    with pytest.raises(ValueError, match=re.escape("product is patch_size 20, got [2, 5]")):
        RVQTokenizerConfig(patch_size=20, patch_strides=[2, 5])
    with pytest.raises(ValueError, match="patch_strides must be positive"):
        RVQTokenizerConfig(patch_size=20, patch_strides=[-2, -10])
    with pytest.raises(ValueError, match="patch_blocks and sample_blocks must be >= 0"):
        RVQTokenizerConfig(patch_blocks=-1)
    tok = RVQTokenizer(RVQTokenizerConfig(input_samples=SAMPLES, patch_size=40, patch_blocks=0,
                                          sample_blocks=0, **SMALL_RVQ))
    assert not any(type(m).__name__ == "_Residual" for m in [*tok.encoder, *tok.decoder])
    assert tok(signal(1)).reconstruction.shape == (1, 12, SAMPLES)


# ---------------------------------------------------------------- signal metrics


def test_prd_and_pearson_match_their_formulas() -> None:
    from scipy.stats import pearsonr

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 50)) + 5.0  # far from zero: PRD removes the mean
    y = x + rng.normal(scale=0.1, size=x.shape)
    ref = 100 * np.sqrt(((x - y) ** 2).sum(-1) / ((x - x.mean(-1, keepdims=True)) ** 2).sum(-1))
    np.testing.assert_allclose(prd(x, y), ref)
    np.testing.assert_allclose(prd(2 * x + 1, 2 * y + 1), ref)  # affine scaling: unchanged
    np.testing.assert_allclose(pearson(x, y)[1, 2], pearsonr(x[1, 2], y[1, 2]).statistic)
    assert np.isnan(prd(np.ones((1, 10)), np.zeros((1, 10))))[0]
    with pytest.raises(ValueError, match="differ in shape"):
        prd(x, y[..., :10])


def test_codebook_usage_perplexity_used_and_dead_codes() -> None:
    even = np.arange(64).reshape(-1, 1) % 8  # 8 codes used evenly of 16
    one = np.zeros((64, 1), dtype=np.int64)
    usage = codebook_usage(np.concatenate([even, one], axis=1), 16)
    assert usage[0] == {"perplexity": pytest.approx(8.0), "used": 8, "dead": 8}
    assert usage[1] == {"perplexity": pytest.approx(1.0), "used": 1, "dead": 15}


def test_mean_intervals_cover_the_mean_and_pair_the_records() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.1, 200)
    iv = mean_interval(a, resamples=300)
    assert iv.low < iv.value < iv.high and iv.value == pytest.approx(a.mean())
    b = a - 0.01 + rng.normal(0, 0.001, 200)  # a shared per-record part: a tight pairing
    diff = paired_mean_difference(a, b, resamples=300)
    assert 0.0099 < diff.low < diff.high < 0.0101 + 0.0005


# ---------------------------------------------------------------- the next-token model


def test_next_token_predictions_never_read_the_future() -> None:
    model = next_token_model()
    codes = torch.randint(0, 16, (2, 12, 10, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(codes=codes).logits  # (B, L, N-1, K, C): index n predicts step n + 1
        later = codes.clone()
        later[:, :, 6:] = (later[:, :, 6:] + 3) % 16  # change steps 6..9 of every lead
        moved = model(codes=later).logits
        deeper = codes.clone()
        deeper[:, :, 6, 2:] = (deeper[:, :, 6, 2:] + 1) % 16  # step 6, codebooks 2..3
        moved_deep = model(codes=deeper).logits
    assert torch.equal(base[:, :, :5], moved[:, :, :5])  # predictions of steps 1..5
    assert torch.equal(base[:, :, 5, 0], moved[:, :, 5, 0])  # step 6's first code
    assert not torch.equal(base[:, :, 6:], moved[:, :, 6:])  # later ones do read them
    assert torch.equal(base[:, :, 5, :3], moved_deep[:, :, 5, :3])  # depth is causal too
    assert not torch.equal(base[:, :, 5, 3], moved_deep[:, :, 5, 3])


def test_next_token_loss_is_the_cross_entropy_of_the_next_codes() -> None:
    model = next_token_model()
    x = signal(2)
    with torch.no_grad():
        out = model(signal=x)
    codes = model.hypnos.tokenizer.encode(x)
    assert torch.equal(out.codes, codes)
    logits = out.logits.reshape(-1, 16)
    target = codes[:, :, 1:].reshape(-1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, target))


def test_hypnos_tokens_are_per_lead_and_step_and_the_tokenizer_stays_fixed() -> None:
    model = next_token_model()
    enc = model.hypnos
    out = enc(signal=signal(2, seed=3))
    assert out.tokens.shape == (2, 120, 32) and out.pooled.shape == (2, 32)
    assert torch.equal(out.token_leads, torch.arange(12).repeat_interleave(10))
    enc.train()
    assert not enc.tokenizer.training  # the codebooks never move
    assert not any(p.requires_grad for p in enc.tokenizer.parameters())
    before = {k: v.clone() for k, v in enc.tokenizer.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(signal=signal(2)).loss.backward()
    opt.step()
    after = enc.tokenizer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # buffers included


def test_hypnos_reloads_in_a_fresh_process(tmp_path: Path) -> None:
    model = next_token_model()
    model.save_pretrained(tmp_path)
    x = signal(2, seed=4)
    np.save(tmp_path / "x.npy", x.numpy())
    with torch.no_grad():
        expected = model.hypnos(signal=x).pooled.numpy()
    np.save(tmp_path / "expected.npy", expected)
    code = (
        "import numpy as np, torch, students\n"
        "from transformers import AutoModel, AutoModelForPreTraining\n"
        f"folder = {str(tmp_path)!r}\n"
        "enc = AutoModel.from_pretrained(folder).eval()\n"
        "assert type(enc).__name__ == 'HypnosModel', type(enc)\n"
        "x = torch.from_numpy(np.load(folder + '/x.npy'))\n"
        "with torch.no_grad():\n"
        "    got = enc(signal=x).pooled.numpy()\n"
        "np.testing.assert_allclose(got, np.load(folder + '/expected.npy'), atol=1e-5)\n"
        "full = AutoModelForPreTraining.from_pretrained(folder)\n"
        "assert type(full).__name__ == 'HypnosForNextToken'\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_hypnos_without_a_tokenizer_config_is_refused() -> None:
    from distill.models.hypnos import HypnosConfig

    with pytest.raises(ValueError, match="no tokenizer configuration"):
        HypnosModel(HypnosConfig())


# ---------------------------------------------------------------- the foundation teacher


def _saved_hypnos(tmp: Path) -> Path:
    folder = tmp / "hypnos-pretrained"
    if not folder.exists():
        next_token_model().save_pretrained(folder)
    return folder


def teacher_batch(batch_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch_size)
    return {"signal": torch.randn(batch_size, 12, SAMPLES, generator=gen),
            "labels": (torch.rand(batch_size, NUM_LABELS, generator=gen) > 0.5).float()}


def _teacher(tmp: Path):
    return teachers.create("foundation", _saved_hypnos(tmp), num_labels=NUM_LABELS,
                           train_mode="full")


def _trainable_without_tokenizer(model) -> set[str]:
    return {n for n, _ in model.named_parameters()
            if ".tokenizer." not in n and ".classifier." not in n}


TEACHER_CASES = [
    ModelCase("foundation-hypnos-full", _teacher, teacher_batch, NUM_LABELS,
              lambda m, f: m.save_pretrained(f), "import teachers\nmodel = teachers.load(folder)",
              trainable=_trainable_without_tokenizer, expect_lead_tokens=True),
]


@pytest.mark.parametrize("case", TEACHER_CASES, ids=case_id)
class TestHypnosTeacher(ModelTester):
    pass


def test_foundation_teacher_names_the_hypnos_family(tmp_path: Path) -> None:
    from teachers.foundation import FoundationTeacher

    assert FoundationTeacher.family_of(str(_saved_hypnos(tmp_path))) == "Hypnos"


def test_hypnos_teacher_reads_a_lead_subset_with_the_same_weights(tmp_path: Path) -> None:
    full = teachers.create("foundation", _saved_hypnos(tmp_path), num_labels=2).eval()
    sub = teachers.create("foundation", _saved_hypnos(tmp_path), num_labels=2,
                          leads=["I", "V1", "V6"]).eval()
    x = signal(2, seed=6)
    with torch.no_grad():
        out = sub(signal=x[:, [0, 6, 11]])
        whole = full(signal=x)
    assert out.tokens.shape == (2, 30, 32)
    assert out.token_leads.tolist() == [0] * 10 + [6] * 10 + [11] * 10
    # lead I's first step reads only step 0 of the leads given: its codes are the same
    codes = full.hf_model.tokenizer.encode(x)
    assert torch.equal(sub.hf_model.tokenizer.encode(x[:, [0, 6, 11]]), codes[:, [0, 6, 11]])
    assert not torch.equal(out.tokens[:, 0], whole.tokens[:, 0])  # other leads are context


def test_masked_teachers_still_train_their_patch_embedding_in_full_mode(tmp_path: Path) -> None:
    from students._masked import pretraining_model as masked

    folder = tmp_path / "csfm"
    masked("csfm", "tiny", input_seconds=4.0, width=32, depth=1, decoder_width=32,
           decoder_depth=1).save_pretrained(folder)
    teacher = teachers.create("foundation", folder, num_labels=2, train_mode="full")
    frozen = {n for n, p in teacher.hf_model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in teacher.hf_model.named_parameters()
                      if n.startswith("classifier.")}


# ---------------------------------------------------------------- pretrain and probe


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _recipe(tmp: Path, name: str, **pretrain) -> Path:
    import yaml

    recipe = {"name": name, "output_dir": str(tmp / "{name}"),
              "data": {"synthetic": {"records": 60}, "cache_dir": str(tmp / "cache"),
                       "task": "rhythm"},
              "pretrain": {"epochs": 1, "batch_size": 16, **pretrain},
              "train": {"lr": 0.002}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_mlp_probe_handles_one_or_several_varying_labels() -> None:
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from distill.run.probe import mlp_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = np.stack([x[:, 0] > 0, np.zeros(60, bool)], 1).astype(float)  # one label varies
    probs = mlp_probe(x[:40], y[:40], x[40:])
    s = StandardScaler().fit(x[:40])
    ref = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=500, random_state=0)
    ref.fit(s.transform(x[:40]), y[:40, 0])
    np.testing.assert_allclose(probs[:, 0], ref.predict_proba(s.transform(x[40:]))[:, 1])
    assert (probs[:, 1] == 0).all()
    y2 = np.stack([x[:, 0] > 0, x[:, 1] > 0], 1).astype(float)
    assert mlp_probe(x[:40], y2[:40], x[40:]).shape == (20, 2)


def test_masked_pretraining_fingerprints_are_unchanged_by_the_tokenizer_key() -> None:
    from distill.engine.pretrain import pretrain_settings
    from distill.recipe import load_recipe

    settings = pretrain_settings(load_recipe(ROOT / "recipes" / "pretrain-lamae.yaml"))
    assert "tokenizer" not in settings["pretrain"] and "tokenizer_weights" not in settings


def test_pretraining_families_include_the_tokenized_ones() -> None:
    assert {"csfm", "lamae", "rvq", "hypnos"} <= set(pretraining_families())
    model = pretraining_model("rvq", "tiny", sampling_rate=25, input_seconds=10)
    assert model.config.patch_size == 10 and model.config.input_samples == 250  # 0.4 s
    with pytest.raises(ValueError, match="unknown rvq option 'width'"):
        pretraining_model("rvq", "tiny", width=3)
    with pytest.raises(ValueError, match="rvq has no 'large' preset; its sizes: tiny, small, "
                                         "base"):
        pretraining_model("rvq", "large")
    small = pretraining_model("rvq", "small", input_seconds=10).config  # 0.2 s patches
    assert small.patch_size == 20 and small.num_patches == 50 and not small.quantize_dropout
    assert small.bits_per_second() == 320.0 and small.patch_strides is None
    assert pretraining_model("rvq", "tiny", patch_size=20).config.patch_size == 20
    with pytest.raises(ValueError, match="unknown hypnos option 'patch_seconds'"):
        pretraining_model("hypnos", "tiny", patch_seconds=0.2)


def test_rvq_then_hypnos_pretrain_and_probe(tmp_path: Path, capsys) -> None:
    from distill.cli import main

    rvq = _recipe(tmp_path, "tok", family="rvq", size="tiny", options=SMALL_RVQ)
    assert main(["pretrain", str(rvq), "--quiet"]) == 0
    assert re.search(r"pretrained rvq/tiny \([\d,]+ parameters\) on \d+ records: best "
                     r"validation reconstruction MSE \(all codebooks\)", capsys.readouterr().out)
    tok = tmp_path / "tok" / "pretrain" / "best"
    assert main(["probe", str(tok), "--data", str(rvq), "--bootstrap", "20", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "RVQ tokenizer" in text and "codebook usage" in text, text
    codec = json.loads((tok.parent / "probe" / "codec.json").read_text())
    assert [d["bits_per_second"] for d in codec["depths"]] == [10.0, 20.0, 30.0, 40.0]  # 4 bits a code, 0.4 s
    assert set(codec["per_lead"]) == set(AutoModel.from_pretrained(tok).config.leads)
    assert len(codec["usage"]) == 4 and (tok.parent / "probe" / "rate-distortion.png").exists()

    hyp = _recipe(tmp_path, "hyp", family="hypnos", size="tiny", tokenizer=str(tok),
                  options=SMALL_HYPNOS)
    assert main(["pretrain", str(hyp), "--quiet"]) == 0
    assert "next-code cross-entropy" in capsys.readouterr().out
    best = tmp_path / "hyp" / "pretrain" / "best"
    summary = json.loads((best.parent / "pretrain.json").read_text())
    assert summary["tokenizer"] == str(tok) and summary["depth_parameters"] > 0
    enc = AutoModel.from_pretrained(best)
    trained_tok = AutoModel.from_pretrained(tok)
    assert_same_state(enc.tokenizer, trained_tok)  # the tokenizer is carried, unchanged
    args = ["probe", str(best), "--data", str(hyp), "--epochs", "1", "--bootstrap", "20",
            "--fractions", "0.5", "--finetune-fractions", "0.5", "--label", "AFIB", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for line in ("MLP probe, 50% labels", "then AFIB AUC", "mlp - scratch"):
        assert line in text, text
    result = json.loads((best.parent / "probe" / "probe.json").read_text())
    assert "AFIB" in result["scratch_minus"]["0.5"]["linear"]
    scratch = AutoModel.from_pretrained(best.parent / "probe" / "scratch-0.5" / "best")
    assert_same_state(scratch.tokenizer, trained_tok)  # "scratch" keeps the input codes
    with pytest.raises(ECGDistillError, match="--label XYZ: not a class"):
        from distill.run.probe import run_probe

        run_probe(best, hyp, label="XYZ", force=True, progress=False)


def test_hypnos_recipes_name_their_tokenizer(tmp_path: Path) -> None:
    from distill.engine.pretrain import run_pretrain
    from distill.core.errors import RecipeError
    from distill.recipe import load_recipe

    with pytest.raises(RecipeError, match="pretrain.tokenizer: hypnos models a trained "
                                          "tokenizer's codes"):
        load_recipe(_recipe(tmp_path, "a", family="hypnos", size="tiny"))
    with pytest.raises(RecipeError, match="pretrain.tokenizer: only hypnos reads a tokenizer"):
        load_recipe(_recipe(tmp_path, "b", family="rvq", size="tiny", tokenizer="x"))
    missing = _recipe(tmp_path, "c", family="hypnos", size="tiny", tokenizer=str(tmp_path / "no"))
    with pytest.raises(ECGDistillError, match=re.escape(
            f"pretrain.tokenizer: {tmp_path / 'no'} holds no saved model")):
        run_pretrain(load_recipe(missing), progress=False)
