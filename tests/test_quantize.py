"""bitsandbytes 8/4-bit students: what is quantized, the Hugging Face folder round trip,
the forward on real records within a stated tolerance, sizes against what the quantized
fraction predicts, and the refusals."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import bitsandbytes as bnb  # a dependency of the project: never skipped
import numpy as np
import pytest
import torch
from torch import nn

import students
from distill.core.errors import ECGDistillError
from distill.compress.quantize import (
    BITS,
    FORMATS,
    QuantizeError,
    format_for_bits,
    load_student,
    plan,
    quantize_folder,
    read_summary,
)

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

REAL = Path(__file__).parent / "data" / "real-ecg"
CLASSES = ["CD", "HYP", "MI", "NORM", "STTC"]

# Relative error ||q(a) - fp32(a)|| / ||fp32(a)|| of each quantized Linear on the
# activations the real records produce, measured on leadformer/tiny (3 seeds): int8 at
# most 0.014 (mean 0.009), nf4 0.108 (0.093), fp4 0.142 (0.123), as expected of 8-bit
# rows and 4-bit codes for 64-weight blocks. The bounds leave room for other kernels.
# End to end, int8 probabilities moved by at most 0.010; 4-bit errors compound through
# an untrained network's layers, so their end-to-end cost is measured as the AUC drop of
# trained students (the quantize stage), not here.
TOLERANCE = {"int8": 0.03, "nf4": 0.15, "fp4": 0.2}
INT8_PROB_TOLERANCE = 0.03


def _student(tmp_path: Path, family: str = "leadformer", size: str = "tiny",
             seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = students.create(family, size, num_labels=len(CLASSES),
                            id2label=dict(enumerate(CLASSES)))
    with torch.no_grad():  # weights of a trained model's scale, not the init's 0.02
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 1.0 / np.sqrt(p.shape[-1]))
    folder = tmp_path / f"{family}-{size}"
    model.save_pretrained(folder)
    return folder


def _real_signals() -> torch.Tensor:
    """The real PTB-XL and CinC records at 100 Hz, 10 s, standardised per record."""
    from distill.data.records import fit_length, read_record

    out = []
    for hea in sorted(REAL.rglob("*.hea")):
        sig = fit_length(read_record(hea.with_suffix(""), fs=100).signal, 1000)  # (12, 1000) mV
        out.append((sig - sig.mean()) / sig.std())
    assert len(out) >= 3, f"the real records under {REAL}"
    return torch.from_numpy(np.stack(out).astype(np.float32))


def expected_part_bytes(plan_, *, double_quant: bool = False,
                        blocksize: int = 64) -> tuple[int, int]:
    """(ideal, bound): bytes of the quantized part at exactly ``bits`` per weight, and that
    plus the most its scales may add (int8: a 4-byte scale per row and a format byte;
    4-bit: a 4-byte absmax per block (1 byte + nested scales with double quantization),
    the 16-entry code book and a serialized state of under 1 KB per layer)."""
    bits = BITS[plan_.format]
    ideal = bound = 0
    for out_f, in_f in plan_.quantized.values():
        n = out_f * in_f
        ideal += n * bits // 8
        if bits == 8:
            bound += 4 * out_f + 1
        else:
            blocks = math.ceil(n / blocksize)
            scales = blocks + 4 * math.ceil(blocks / 256) + 256 * 4 if double_quant else 4 * blocks
            bound += scales + 16 * 4 + 1024
    return ideal, ideal + bound


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x).logits.float()


def test_plan_quantizes_linears_keeps_head_and_says_convs_stay_fp32() -> None:
    lf = students.create("leadformer", "tiny", num_labels=5)
    p8 = plan(lf, "int8")
    linears = {n for n, m in lf.named_modules() if isinstance(m, nn.Linear)}
    assert set(p8.quantized) == linears - {"classifier.1"}
    assert p8.kept == {"classifier.1": "the output layer is kept in full precision"}
    assert p8.fraction > 0.9 and p8.conv_parameters == 0
    p4 = plan(lf, "nf4")  # the 25-sample patch embedding cannot take the CPU 4-bit kernel
    assert set(p4.quantized) == linears - {"classifier.1", "patch_embed"}
    assert "in_features a multiple of 64" in p4.kept["patch_embed"]
    assert p4.skip_modules == ["classifier", "patch_embed"]

    xr = students.create("xresnet1d", "small", num_labels=5)
    px = plan(xr, "nf4")
    assert list(px.quantized) == ["pre_logits.3"]
    convs = sum(m.weight.numel() for m in xr.modules() if isinstance(m, nn.Conv1d))
    assert px.conv_parameters == convs and px.fraction < 0.2
    assert any("convolution weights, which stay in fp32" in n for n in px.notes())


@pytest.mark.parametrize("fmt,double", [("int8", False), ("nf4", False), ("fp4", False),
                                        ("nf4", True)])
def test_round_trip_restores_the_quantized_model(tmp_path, fmt, double) -> None:
    from transformers import AutoModel

    from distill.core.bnb import bnb_config

    source = _student(tmp_path)
    out = tmp_path / f"q-{fmt}"
    result = quantize_folder(source, fmt, out, double_quant=double)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "bitsandbytes"
    assert q["load_in_8bit"] == (fmt == "int8") and q["load_in_4bit"] == (fmt != "int8")
    if fmt != "int8":
        assert q["bnb_4bit_quant_type"] == fmt and q["bnb_4bit_use_double_quant"] == double
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "quantization.json"]
    summary = read_summary(out)
    assert summary["format"] == fmt and summary["bits"] == BITS[fmt]
    assert summary["quantized_parameters"] == result.plan.quantized_parameters

    loaded = load_student(out)  # plain from_pretrained: the config brings bitsandbytes back
    layer = bnb.nn.Linear8bitLt if fmt == "int8" else bnb.nn.Linear4bit
    modules = dict(loaded.named_modules())
    for name in result.plan.quantized:
        assert isinstance(modules[name], layer), name
    for name in result.plan.kept:
        assert type(modules[name]) is nn.Linear, name

    # the reloaded folder computes exactly what the freshly quantized model computes
    fresh = AutoModel.from_pretrained(source, dtype=torch.float32, quantization_config=bnb_config(
        fmt, skip_modules=result.plan.skip_modules, double_quant=double))
    x = _real_signals()
    assert torch.equal(_logits(loaded, x), _logits(fresh, x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_forward_on_real_records_within_tolerance(tmp_path, fmt) -> None:
    source = _student(tmp_path)
    x = _real_signals()
    fp32 = load_student(source)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in fp32.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(
                lambda m, args, out, n=name: seen.__setitem__(n, (args[0], out)))
    want = _logits(fp32, x)
    result = quantize_folder(source, fmt, tmp_path / fmt)
    quantized = load_student(tmp_path / fmt)
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name in result.plan.quantized:
            a, out = seen[name]
            rel = ((layers[name](a) - out).norm() / out.norm()).item()
            assert 0 < rel < TOLERANCE[fmt], f"{fmt} {name}: relative error {rel:.4f}"
    got = _logits(quantized, x)
    if fmt == "int8":
        assert (torch.sigmoid(got) - torch.sigmoid(want)).abs().max() < INT8_PROB_TOLERANCE
    assert torch.isfinite(got).all() and not torch.equal(got, want)


@pytest.mark.parametrize("fmt,double", [("int8", False), ("nf4", False), ("fp4", True)])
def test_sizes_match_what_the_quantized_fraction_predicts(tmp_path, fmt, double) -> None:
    source = _student(tmp_path, size="small")  # D=128: the targets' regime
    r = quantize_folder(source, fmt, tmp_path / fmt, double_quant=double)
    ideal, bound = expected_part_bytes(r.plan, double_quant=double)
    assert ideal <= r.part_stored_bytes <= bound
    # the file shrinks by exactly what the quantized part loses (headers aside)
    predicted = r.fp32_bytes - r.part_fp32_bytes + r.part_stored_bytes
    assert abs(r.stored_bytes - predicted) < 0.02 * r.stored_bytes + 8192
    # and the file ratio follows from the quantized fraction f and bits b:
    # fp32 / q ~ 1 / ((1 - f) + f * b / 32), up to the scales
    f = r.part_fp32_bytes / r.fp32_bytes
    ideal_ratio = 1 / ((1 - f) + f * BITS[fmt] / 32)
    assert 0.75 * ideal_ratio < r.file_ratio <= ideal_ratio
    assert r.part_ratio >= (3.0 if fmt == "int8" else 5.0)  # the targets


def test_refusals_name_the_folder(tmp_path) -> None:
    source = _student(tmp_path)
    quantize_folder(source, "int8", tmp_path / "q8")
    with pytest.raises(QuantizeError, match=r"q8 exists; pass --force"):
        quantize_folder(source, "int8", tmp_path / "q8")
    before = (tmp_path / "q8" / "model.safetensors").read_bytes()
    quantize_folder(source, "int8", tmp_path / "q8", force=True)
    assert (tmp_path / "q8" / "model.safetensors").read_bytes() == before
    with pytest.raises(QuantizeError, match=r"q8: already quantized \(8-bit, bitsandbytes\)"):
        quantize_folder(tmp_path / "q8", "nf4", tmp_path / "q4")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "teacher.json").write_text("{}")
    with pytest.raises(QuantizeError, match="a teacher folder"):
        quantize_folder(tmp_path / "t", "int8", tmp_path / "x")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text("{}")
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ECGDistillError, match=r"p: no model.safetensors \(found pytorch_model.bin"):
        quantize_folder(tmp_path / "p", "int8", tmp_path / "x")
    with pytest.raises(QuantizeError, match="no such folder"):
        quantize_folder(tmp_path / "missing", "int8", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "q4").exists()
    with pytest.raises(ECGDistillError, match="8 or 4 bits"):
        format_for_bits(3)


def test_cli_quantize_writes_beside_the_checkpoint(tmp_path, capsys) -> None:
    from distill.cli import main

    source = _student(tmp_path, family="xresnet1d", size="small")
    assert main(["quantize", str(source), "--bits", "4"]) == 0
    out = capsys.readouterr().out
    assert "nf4: 1 Linear layers quantized" in out
    assert "convolution weights, which stay in fp32" in out
    assert (tmp_path / "xresnet1d-small-nf4" / "quantization.json").exists()
    assert main(["quantize", str(source), "--bits", "4"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["quantize", str(source), "--bits", "8", "--out", str(tmp_path / "o")]) == 0
    assert load_student(tmp_path / "o").config.quantization_config.load_in_8bit
    # xresnet1d/tiny's one hidden Linear (128x32) is too narrow for the CPU 4-bit kernel
    tiny = _student(tmp_path, family="xresnet1d", size="tiny")
    assert main(["quantize", str(tiny), "--bits", "4"]) == 2
    err = capsys.readouterr().err
    assert "no layer of this model can be quantized to nf4" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("fmt,double", [("int8", False), ("nf4", True)])
def test_quant_state_bytes_count_every_tensor_once(tmp_path, fmt, double) -> None:
    """The memory of what bitsandbytes keeps beside the weights, walked generically: equal
    to the sum over the installed release's named fields, the same before and after a
    forward pass (LLM.int8 moves its scales from the weight to the layer's state there),
    and still counted when a release renames the fields (stand-in states)."""
    from types import SimpleNamespace

    from distill.metrics.footprint import quantized_weights_extra_bytes

    quantize_folder(_student(tmp_path), fmt, tmp_path / fmt, double_quant=double)
    model = load_student(tmp_path / fmt)

    def named_fields() -> int:
        # the reference names the fields of the bitsandbytes this was written against; a
        # release that renames them fails here loudly, not with a silent zero
        seen, total = set(), 0
        for module in model.modules():
            state = getattr(module, "state", None)  # LLM.int8's matmul state, after a forward
            for p in module.parameters(recurse=False):
                qs = getattr(p, "quant_state", None)
                parts = [getattr(p, "SCB", None), getattr(state, "SCB", None),
                         getattr(state, "idx", None)]
                if qs is not None:
                    parts += [getattr(qs, "absmax"), getattr(qs, "code"),
                              getattr(qs, "offset", None)]
                    if getattr(qs, "nested", False):
                        parts += [qs.state2.absmax, qs.state2.code]
                for t in parts:
                    if t is not None and t.numel() and t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        total += t.numel() * t.element_size()
        return total

    before = named_fields()
    assert before > 0 and quantized_weights_extra_bytes(model) == before
    # a forward moves things: LLM.int8 its scales to the layer's state (and it notes its
    # outlier columns), CPU 4-bit repacks its state without the nested quantization
    with torch.no_grad():
        model(signal=_real_signals()[:2])
    assert quantized_weights_extra_bytes(model) == named_fields() > 0

    renamed = nn.Module()
    renamed.w = nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
    renamed.w.quant_state = SimpleNamespace(
        scales=torch.zeros(8), qmap=torch.zeros(16), blocksize=64, dtype=torch.float32,
        inner=SimpleNamespace(scales=torch.zeros(2, dtype=torch.float64)))
    assert quantized_weights_extra_bytes(renamed) == 8 * 4 + 16 * 4 + 2 * 8
    in_layer = nn.Module()  # scales on the layer, in lists and dicts
    in_layer.w = nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False)
    in_layer.state = SimpleNamespace(parts=[torch.zeros(3), {"m": torch.zeros(5)}])
    assert quantized_weights_extra_bytes(in_layer) == (3 + 5) * 4
    assert quantized_weights_extra_bytes(nn.Linear(4, 4)) == 0

    codes = nn.Module()  # integer codes with their scales kept somewhere unknown
    codes.w = nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ECGDistillError, match=r"^w: stored as torch.uint8 codes but no scales"):
        quantized_weights_extra_bytes(codes)


def _measured(auc: float, disk_mb: float, b1_ms: float) -> dict:
    return {"macro_auc": {"value": auc, "low": auc - 0.03, "high": auc + 0.03},
            "disk_mb": disk_mb, "latency_ms": {"1": b1_ms, "64": b1_ms / 5},
            "peak_memory_mb": {"1": 1.0, "64": 10.0}}


def test_deployment_advice_picks_among_the_lossless_formats_only() -> None:
    """The report's "which target where": the fastest and the smallest ONNX format among
    those that lose at most the tolerance against fp32 (a gain never disqualifies); a faster
    or smaller one that loses AUC is passed over."""
    from distill.run.stages.report import DEPLOY_TOLERANCE, deployment_advice

    ref = "distill s/tiny"
    models = {ref: {"kind": "distill", **_measured(0.90, 1.0, 4.0)}}
    for fmt, auc, mb, ms in [("onnx", 0.900, 1.05, 2.0), ("onnx-int8", 0.899, 0.30, 1.5),
                             ("onnx-int8-qat", 0.910, 0.3004, 1.4),  # a gain; same kB, faster
                             ("onnx-int4", 0.880, 0.20, 1.0),   # smallest and fastest, lossy
                             ("int8", 0.900, 0.90, 9.0)]:
        models[f"{ref} {fmt}"] = {"kind": "quantized", "fp32": ref, "format": fmt,
                                  "vs_fp32": {"value": auc - 0.90, "low": -1, "high": 1},
                                  **_measured(auc, mb, ms)}
    results = {"models": models, "quantization": {"reference": {ref: models[ref]}}}

    def row() -> str:
        text = deployment_advice(results)
        return next(line for line in text.splitlines() if line.startswith(f"| {ref} |"))

    assert "| onnx-int8-qat: 1.40 (PyTorch fp32: 4.00) |" in row()
    assert "| onnx-int8-qat: 300 kB (fp32: 1000 kB) |" in row()
    assert "onnx-int4" not in row()
    # nothing lossless in ONNX: fp32 PyTorch is the CPU choice and the edge cell says why
    for fmt in ("onnx", "onnx-int8", "onnx-int8-qat"):
        models[f"{ref} {fmt}"]["vs_fp32"]["value"] = -2 * DEPLOY_TOLERANCE
    assert "| fp32 (PyTorch): 4.00 |" in row() and "none losing at most" in row()
    assert deployment_advice({"models": models, "quantization": {}}) is None
