"""The CLMT-style 25 Hz -> 100 Hz translator: the model (rate, length, prompt, loss,
reloading in a fresh process), ``upsample_record`` on WFDB records, the cubic baseline, the
R-peak F1, and a whole tiny training + evaluation run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from distill.core.errors import ECGDistillError, RecipeError
from distill.engine.jobs import normalization
from distill.models.rvq import RVQTokenizer, RVQTokenizerConfig
from distill.models.translator import TranslatorConfig, TranslatorModel, translator_config
from distill.run.upsample import (cubic_upsample, detect_rpeaks, format_evaluation,
                                  load_translate_recipe, rpeak_f1, run_translate,
                                  translate_signal, upsample_record)

SECONDS = 4  # 10 patches of 0.4 s
SMALL_RVQ = {"stem_channels": 8, "hidden_size": 16, "codebook_dim": 8, "num_quantizers": 4,
             "codebook_size": 16}
SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


def signal(batch: int, rate: int, leads: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, leads, SECONDS * rate, generator=torch.Generator().manual_seed(seed))


def tokenizer(rate: int, seed: int = 0) -> RVQTokenizer:
    """A small tokenizer at ``rate`` with 0.4 s patches, its codebooks initialised."""
    torch.manual_seed(seed)
    tok = RVQTokenizer(RVQTokenizerConfig(sampling_rate=rate, input_samples=SECONDS * rate,
                                          patch_size=round(0.4 * rate), **SMALL_RVQ))
    tok.quantizer.quantize_dropout = False
    tok(signal(8, rate, seed=seed))  # k-means initialisation of every codebook
    tok.quantizer.quantize_dropout = True
    return tok.eval()


def translator(**fields) -> TranslatorModel:
    torch.manual_seed(0)
    model = TranslatorModel.from_tokenizers(tokenizer(25), tokenizer(100, seed=1),
                                            **{**SMALL, **fields})
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster than two that wait on each other (and much faster
    on a machine whose cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Scaler:  # what normalization() reads of a data set
    class scaler:
        kind, mean, std = "global", np.full(12, 0.05), np.full(12, 0.2)


# ---------------------------------------------------------------- the model


def test_translation_is_at_the_target_rate_and_length() -> None:
    model = translator()
    cfg = model.config
    assert (cfg.sampling_rate, cfg.input_samples, cfg.target_rate, cfg.target_samples) == \
        (25, 100, 100, 400)
    x = signal(2, 25)
    out = model(signal=x)
    assert out.signal.shape == (2, 12, 400)  # 4 s at 100 Hz
    assert out.codes.shape == (2, 12, 10, 4) and out.codes.dtype == torch.int64
    assert out.loss is None
    # the output is the 100 Hz tokenizer's decoding of the output codes
    torch.testing.assert_close(model.target_tokenizer.decode(out.codes), out.signal)
    # one stream per row: any lead, given by index
    one = model.translate(x[:, 3:4], lead_ids=torch.tensor([3, 3]))
    torch.testing.assert_close(one, out.signal[:, 3:4])
    with pytest.raises(ValueError, match=re.escape("translator expects signal [B, L, 100]")):
        model(signal=signal(1, 100))


def test_the_prompt_conditions_the_translation() -> None:
    model = translator()
    x = signal(1, 25, leads=1)
    with torch.no_grad():
        a = model(signal=x, lead_ids=torch.tensor([0])).latents
        b = model(signal=x, lead_ids=torch.tensor([7])).latents
        c = model.predict_latents(model.source_codes(x), torch.tensor([[0]]), target_rate=50)
    assert not torch.allclose(a, b)  # the lead token
    assert not torch.allclose(a.reshape(c.shape), c)  # the target-rate token
    with pytest.raises(ValueError, match="not in its rate vocabulary"):
        model.predict_latents(model.source_codes(x), torch.tensor([[0]]), target_rate=77)


def test_training_moves_the_translator_only() -> None:
    model = translator()
    model.train()
    assert not model.source_tokenizer.training and not model.target_tokenizer.training
    before = model.target_tokenizer.quantizer.codebooks.clone()
    out = model(signal=signal(2, 25), target=signal(2, 100, seed=3))
    torch.testing.assert_close(out.loss, out.latent_loss + out.signal_loss)
    out.loss.backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert model.code_embed.weight.grad is not None
    assert all(p.grad is None for tok in (model.source_tokenizer, model.target_tokenizer)
               for p in tok.parameters())
    assert torch.equal(model.target_tokenizer.quantizer.codebooks, before)


def test_precomputed_stream_inputs_give_the_same_result() -> None:
    model = translator()
    x, y = signal(2, 25), signal(2, 100, seed=3)
    with torch.no_grad():
        a = model(signal=x, target=y)
        b = model(target=y, **model.stream_inputs(x, y))
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.signal, b.signal)


def test_tokenizers_must_share_the_patch_duration() -> None:
    src, tgt = tokenizer(25), tokenizer(100)
    tgt.config.patch_size = 20  # 0.2 s at 100 Hz against 0.4 s at 25 Hz
    with pytest.raises(ValueError, match="patches must last equally long"):
        translator_config(src, tgt)
    with pytest.raises(ValueError, match="no source tokenizer configuration"):
        TranslatorModel(TranslatorConfig())


def test_translator_reloads_in_a_fresh_process(tmp_path: Path) -> None:
    model = translator()
    model.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # both tokenizers inside
    x = signal(2, 25, seed=4)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "expected.npy", model.translate(x).numpy())
    code = (
        "import numpy as np, torch\n"
        "import distill.models.translator\n"
        "from transformers import AutoModel\n"
        f"folder = {str(tmp_path)!r}\n"
        "model = AutoModel.from_pretrained(folder).eval()\n"
        "assert type(model).__name__ == 'TranslatorModel', type(model)\n"
        "x = torch.from_numpy(np.load(folder + '/x.npy'))\n"
        "got = model.translate(x).numpy()\n"
        "np.testing.assert_allclose(got, np.load(folder + '/expected.npy'), atol=1e-5)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ---------------------------------------------------------------- WFDB records


def _saved(tmp: Path) -> Path:
    folder = tmp / "translator"
    if not folder.exists():
        model = translator()
        model.config.normalization = normalization(_Scaler)
        model.save_pretrained(folder)
    return folder


def _record(folder: Path, name: str, fs: int, seconds: float, leads=("I", "II")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * fs)) / fs
    sig = np.stack([0.5 * np.sin(2 * np.pi * (1.1 + 0.2 * i) * t) for i in range(len(leads))])
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads),
                p_signal=np.ascontiguousarray(sig.T), fmt=["16"] * len(leads),
                write_dir=str(folder))
    return folder / name


def test_upsample_writes_a_100hz_record(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path)
    rec = _record(tmp_path / "in", "strip", 25, 9.2)  # 230 samples: three 4 s windows
    header = upsample_record(ckpt, rec.with_suffix(".hea"), to=100)
    assert header == tmp_path / "in" / "strip_100hz.hea"
    out = wfdb.rdrecord(str(header.with_suffix("")))
    assert out.fs == 100 and out.sig_len == 920 and out.sig_name == ["I", "II"]
    assert out.units == ["mV", "mV"] and np.isfinite(out.p_signal).all()
    with pytest.raises(ECGDistillError, match="strip_100hz.hea exists; --force replaces it"):
        upsample_record(ckpt, rec, to=100)
    upsample_record(ckpt, rec, to=100, force=True)
    short = _record(tmp_path / "in", "short", 25, 1.0, leads=("V1",))  # below one window
    there = upsample_record(ckpt, short, out=tmp_path / "outdir" / "v1")
    assert wfdb.rdrecord(str(there.with_suffix(""))).sig_len == 100


def test_upsample_refuses_other_rates_and_bad_records(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path)
    rec = _record(tmp_path / "in", "fast", 100, 4.0)
    with pytest.raises(ECGDistillError) as info:
        upsample_record(ckpt, rec, to=100)
    message = str(info.value)
    assert "\n" not in message and "fast.hea" in message
    assert "the record is at 100 Hz; the translator reads 25 Hz" in message
    with pytest.raises(ECGDistillError, match="missing.hea: no such WFDB header"):
        upsample_record(ckpt, tmp_path / "missing", to=100)
    with pytest.raises(ECGDistillError, match="writes 100 Hz"):
        upsample_record(ckpt, rec, to=200)
    broken = tmp_path / "in" / "broken.hea"
    broken.write_text("broken 2 25 100\nnot a signal line\n")
    with pytest.raises(ECGDistillError, match="broken.hea: unreadable WFDB record"):
        upsample_record(ckpt, broken, to=100)
    with pytest.raises(ECGDistillError, match="not a translator"):
        tok = tmp_path / "tok"
        tokenizer(25).save_pretrained(tok)
        upsample_record(tok, rec, to=100)


def test_windows_join_into_the_single_window_translation(tmp_path: Path) -> None:
    model = translator()
    model.config.normalization = normalization(_Scaler)
    x = signal(1, 25, leads=2, seed=5)[0].numpy() * 0.2 + 0.05  # mV, exactly one window
    whole = translate_signal(model, x, [0, 1])
    direct = model.translate(torch.from_numpy((x - 0.05) / 0.2)[None].float(),
                             lead_ids=torch.tensor([0, 1]))[0].numpy() * 0.2 + 0.05
    np.testing.assert_allclose(whole, direct, atol=1e-5)


# ---------------------------------------------------------------- baseline and metrics


def test_cubic_baseline_recovers_a_smooth_signal() -> None:
    t25, t100 = np.arange(250) / 25, np.arange(1000) / 100
    x = np.stack([np.sin(2 * np.pi * 1.0 * t25), np.cos(2 * np.pi * 0.5 * t25 + 1)])
    y = cubic_upsample(x, 25, 100)
    truth = np.stack([np.sin(2 * np.pi * 1.0 * t100), np.cos(2 * np.pi * 0.5 * t100 + 1)])
    assert y.shape == (2, 1000)
    np.testing.assert_allclose(y[:, ::4], x, atol=1e-6)  # through the samples
    assert np.abs(y - truth)[:, :990].max() < 2e-3  # and smooth between them
    with pytest.raises(ValueError, match="at least 2 samples"):
        cubic_upsample(np.zeros((1, 1)), 25, 100)


def test_rpeak_f1_on_known_cases() -> None:
    peaks = np.array([50, 130, 210, 290, 370])
    assert rpeak_f1(peaks, peaks, tolerance=5) == 1.0
    assert rpeak_f1(peaks, peaks + 6, tolerance=5) == 0.0  # beyond the tolerance
    assert rpeak_f1(peaks, peaks + 5, tolerance=5) == 1.0  # at it
    assert rpeak_f1(peaks, peaks[:4], tolerance=5) == pytest.approx(8 / 9)  # one missed
    assert rpeak_f1(peaks, np.array([52, 53]), tolerance=5) == pytest.approx(2 / 7)  # one each
    assert rpeak_f1(np.array([]), np.array([]), tolerance=5) == 1.0
    assert rpeak_f1(peaks, np.array([]), tolerance=5) == 0.0


def test_xqrs_finds_the_beats_of_a_spiky_signal() -> None:
    fs = 100
    t = np.arange(10 * fs) / fs
    beats = np.arange(0.5, 10, 0.8)
    ecg = sum(np.exp(-0.5 * ((t - b) / 0.015) ** 2) for b in beats) + 0.05 * np.sin(t)
    found = detect_rpeaks(ecg, fs)
    truth = np.round(beats * fs).astype(int)
    assert rpeak_f1(truth, found, tolerance=5) > 0.9
    assert len(detect_rpeaks(np.zeros(1000), fs)) == 0  # flat: nothing, no crash


# ---------------------------------------------------------------- training and evaluation


def _recipe(tmp: Path, **translate) -> Path:
    import yaml

    recipe = {"name": "tr", "output_dir": str(tmp / "{name}"),
              "data": {"synthetic": {"records": 40}, "cache_dir": str(tmp / "cache"),
                       "task": "rhythm"},
              "train": {"warmup_ratio": 0.0},
              "translate": {"leads": ["I", "V2"],
                            "tokenizer": {"options": SMALL_RVQ, "epochs": 1, "batch_size": 16},
                            "translator": {"options": SMALL, "epochs": 1, "batch_size": 32},
                            "evaluate": {"leads": ["II"], "bootstrap": 20}, **translate}}
    path = tmp / "tr.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_and_evaluate_a_tiny_translator(tmp_path: Path, capsys) -> None:
    path = _recipe(tmp_path)
    tr = load_translate_recipe(path, ["translate.translator.lr=0.003"])
    assert tr.translate.translator.lr == 0.003 and tr.translate.source_rate == 25
    summary = run_translate(tr, progress=False)
    run = tmp_path / "tr"
    assert json.loads((run / "translate.json").read_text())["translator"]["best_epoch"] == 1
    for folder in ("tokenizer-25hz", "tokenizer-100hz", "translator"):
        assert (run / folder / "best" / "config.json").exists(), folder
    assert summary["translator"]["records"]["train"] % 2 == 0  # two streams per record
    ev = summary["evaluation"]
    assert ev["leads"] == ["II"] and set(ev["methods"]) == {"translator", "cubic", "tokenizer"}
    for m in ev["methods"].values():
        assert -1 <= m["r"]["value"] <= 1 and 0 <= m["f1"]["value"] <= 1
        assert m["r"]["low"] <= m["r"]["value"] <= m["r"]["high"]
    table = format_evaluation(ev)
    assert "translator - cubic (paired)" in table and "within 50 ms" in table
    capsys.readouterr()
    again = run_translate(tr, progress=False)  # nothing to redo
    assert "already trained" in capsys.readouterr().out
    assert again["evaluation"] == ev
    with pytest.raises(ECGDistillError, match="holds a translator of other settings"):
        run_translate(load_translate_recipe(path, ["translate.translator.epochs=2"]),
                      progress=False)


def test_translate_recipes_are_checked(tmp_path: Path) -> None:
    path = _recipe(tmp_path)
    with pytest.raises(RecipeError, match="unknown key 'translate.tokenizer.epoch'; did you mean"):
        load_translate_recipe(path, ["translate.tokenizer.epoch=3"])
    with pytest.raises(RecipeError, match="translate.source_rate: 100 Hz is not below"):
        load_translate_recipe(path, ["translate.source_rate=100"])
    with pytest.raises(RecipeError, match="patch_seconds: 0.3 s is not a whole number"):
        load_translate_recipe(path, ["translate.patch_seconds=0.3"])
    with pytest.raises(RecipeError, match="translate.leads: unknown lead name 'V7'"):
        load_translate_recipe(path, ["translate.leads=[V7]"])
    with pytest.raises(RecipeError, match="unknown translator option 'width'; known: dropout"):
        load_translate_recipe(path, ["translate.translator.options={width: 3}"])
    with pytest.raises(RecipeError, match="options.patch_size: not an option; "
                                          "translate.patch_seconds sets it"):
        load_translate_recipe(path, ["translate.tokenizer.options={patch_size: 4}"])
    with pytest.raises(RecipeError, match="unknown rvq option 'depth'"):
        load_translate_recipe(path, ["translate.tokenizer.options={depth: 4}"])
