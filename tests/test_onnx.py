"""ONNX deployment targets: the export reproduces PyTorch and carries the input contract,
static int8 covers the convolutions, 4-bit weight-only covers the MatMuls and says what it
cannot, the runner behaves like a student, and the refusals name the folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import students
from distill.compress.onnx import (CONTRACT_KEY, ONNX_FILE, OnnxStudent, export_is_current,
                                   export_onnx, quantize_onnx, read_contract)
from distill.compress.quantize import SUMMARY_FILE, QuantizeError
from distill.metrics.footprint import footprint

REAL = Path(__file__).parent / "data" / "real-ecg"
CLASSES = ["CD", "HYP", "MI", "NORM", "STTC"]


def _student(tmp_path: Path, family: str, size: str = "tiny") -> Path:
    torch.manual_seed(0)
    model = students.create(family, size, num_labels=len(CLASSES),
                            id2label=dict(enumerate(CLASSES)))
    with torch.no_grad():  # weights of a trained model's scale, not the init's 0.02
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 1.0 / np.sqrt(p[0].numel()))
    folder = tmp_path / f"{family}-{size}"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def records() -> np.ndarray:
    """The real PTB-XL and CinC records at 100 Hz, 10 s, standardised per record, and
    shifted copies of them (a calibration set of some size)."""
    from distill.data.records import fit_length, read_record

    out = []
    for hea in sorted(REAL.rglob("*.hea")):
        sig = fit_length(read_record(hea.with_suffix(""), fs=100).signal, 1000)
        out.append((sig - sig.mean()) / sig.std())
    base = np.stack(out).astype(np.float32)
    return np.concatenate([np.roll(base, s, axis=-1) for s in range(0, 1000, 125)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, records):
    """Both families exported once: {family: (student folder, onnx folder, summary)}."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for family in ("xresnet1d", "leadformer"):
        src = _student(root, family)
        summary = export_onnx(src, root / f"{family}-onnx", records[:8])
        out[family] = (src, root / f"{family}-onnx", summary)
    return out


def _torch_logits(folder: Path, x: np.ndarray) -> np.ndarray:
    from distill.compress.quantize import load_student

    with torch.no_grad():
        return load_student(folder)(signal=torch.from_numpy(x)).logits.numpy()


@pytest.mark.parametrize("family", ["xresnet1d", "leadformer"])
def test_export_reproduces_pytorch_at_any_batch_and_carries_the_contract(
        exported, records, family) -> None:
    src, folder, summary = exported[family]
    assert summary["max_abs_diff"] <= 1e-4 and summary["check_records"] == 8
    runner = OnnxStudent(folder)
    for batch in (records[:1], records[3:8], records):  # the batch dimension is dynamic
        got = runner(signal=torch.from_numpy(batch)).logits.numpy()
        np.testing.assert_allclose(got, _torch_logits(src, batch), atol=1e-4, rtol=0)
    contract = read_contract(folder / ONNX_FILE)
    config = json.loads((src / "config.json").read_text())
    assert contract["input"]["leads"] == config["leads"]
    assert contract["input"]["shape"] == ["batch", 12, 1000]
    assert contract["input"]["sampling_rate"] == 100
    assert contract["output"]["classes"] == CLASSES
    assert contract["model"]["parameters"] == sum(
        p.numel() for p in students.create(family, "tiny", num_labels=5).parameters())
    model = onnx.load(str(folder / ONNX_FILE))
    assert [i.name for i in model.graph.input] == ["signal"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert not any(n.metadata_props for n in model.graph.node)  # debugging metadata gone
    assert json.loads((folder / SUMMARY_FILE).read_text())["format"] == "onnx"


def test_static_int8_covers_the_convolutions(exported, records, tmp_path) -> None:
    _, fp32, _ = exported["xresnet1d"]
    s = quantize_onnx(fp32, "onnx-int8", tmp_path / "int8", records, check=records[:8])
    model = onnx.load(str(tmp_path / "int8" / ONNX_FILE))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    # every convolution reads a dequantized int8 weight (QDQ)
    for conv in convs:
        w = producers[conv.input[1]]
        assert w.op_type == "DequantizeLinear", conv
    assert s["nodes"]["DequantizeLinear"] > len(convs) and s["nodes"].get("QuantizeLinear")
    assert "Conv" in s["notes"][0] and f"calibrated on {len(records)}" in s["notes"][0]
    # int8 weights: the quantized part is about 4x smaller, the file well below fp32's
    assert s["fraction"] > 0.9 and 3.5 < s["ratio_part"] <= 4.0
    assert s["bytes"]["quantized_file"] < s["bytes"]["onnx_fp32_file"] / 2
    # logits stay close to the fp32 graph's on the real records: 0.13 relative error measured
    # on this untrained network (its 19 layers' errors compound; a trained student's cost is
    # its AUC difference, scored by the quantize stage); a broken scale would give ~1
    ref = OnnxStudent(fp32)(signal=torch.from_numpy(records)).logits
    got = OnnxStudent(tmp_path / "int8")(signal=torch.from_numpy(records)).logits
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.25, rel
    assert s["max_abs_diff_vs_onnx_fp32"] == pytest.approx(
        float((got[:8] - ref[:8]).abs().max()), rel=1e-5)
    assert read_contract(tmp_path / "int8" / ONNX_FILE)["format"] == "onnx-int8"


def test_int4_weight_only_covers_matmuls_and_says_what_it_cannot(exported, records,
                                                                 tmp_path) -> None:
    _, fp32, _ = exported["leadformer"]
    s = quantize_onnx(fp32, "onnx-int4", tmp_path / "int4", check=records[:8])
    assert s["nodes"]["MatMulNBits"] > 0 and s["fraction"] > 0.5
    assert s["bytes"]["quantized_file"] < s["bytes"]["onnx_fp32_file"] / 3
    assert any("Gemm" in n for n in s["notes"]) or "Gemm" not in s["nodes"]
    ref = OnnxStudent(fp32)(signal=torch.from_numpy(records)).logits
    got = OnnxStudent(tmp_path / "int4")(signal=torch.from_numpy(records)).logits
    assert float((got - ref).norm() / ref.norm()) < 0.25
    # a convolutional student has no MatMul to take: refused, saying why
    _, conv_fp32, _ = exported["xresnet1d"]
    with pytest.raises(QuantizeError, match=r"no MatMul node with a constant weight.*Conv nodes "
                                            r"stay fp32: onnxruntime has no 4-bit convolution"):
        quantize_onnx(conv_fp32, "onnx-int4", tmp_path / "conv-int4")
    assert not (tmp_path / "conv-int4").exists()


def test_the_runner_is_measured_like_a_student(exported, records) -> None:
    src, folder, _ = exported["xresnet1d"]
    runner = OnnxStudent(folder)
    m = footprint(runner, lambda b: {"signal": torch.from_numpy(records[:1].repeat(b, 0))},
                  folder, batch_sizes=(1, 4), repeats=2)
    assert m["parameters"] == runner.num_parameters
    assert m["disk_mb"] == pytest.approx((folder / ONNX_FILE).stat().st_size / 1e6)
    assert 0 < m["weights_mb"] <= m["disk_mb"]
    assert m["peak_memory_mb"]["1"] > m["weights_mb"] and m["latency_ms"]["4"] > 0
    assert "onnxruntime" in m["memory_method"]


def test_refusals_name_the_folder(exported, records, tmp_path) -> None:
    src, fp32, _ = exported["xresnet1d"]
    with pytest.raises(QuantizeError, match=rf"{re.escape(str(fp32))} exists; pass --force"):
        export_onnx(src, fp32, records[:2])
    with pytest.raises(QuantizeError, match=r"ONNX check: records of shape \[N, 12, 1000\] "
                                            r"needed .* got \[2, 12, 500\]"):
        export_onnx(src, tmp_path / "x", records[:2, :, :500])
    with pytest.raises(QuantizeError, match="static int8 needs calibration records"):
        quantize_onnx(fp32, "onnx-int8", tmp_path / "y")
    with pytest.raises(QuantizeError, match=rf"{re.escape(str(src))}: no model.onnx; export the "
                                            rf"student first"):
        quantize_onnx(src, "onnx-int8", tmp_path / "z", records)
    with pytest.raises(QuantizeError, match="unknown ONNX quantization 'onnx-int2'"):
        quantize_onnx(fp32, "onnx-int2", tmp_path / "w", records)
    with pytest.raises(QuantizeError, match=rf"^{re.escape(str(tmp_path))}: no model.onnx$"):
        OnnxStudent(tmp_path)
    bare = tmp_path / "bare.onnx"
    onnx.save_model(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(bare))
    with pytest.raises(QuantizeError, match=rf"^{re.escape(str(bare))}: no '{CONTRACT_KEY}' "
                                            rf"metadata"):
        read_contract(bare)
    assert not any(p.name in ("x", "y", "z", "w") for p in tmp_path.iterdir())


def test_a_stale_export_is_recognised(exported, tmp_path) -> None:
    """The quantized formats reuse the fp32 export only while it was made from the weights
    the student folder holds now."""
    import shutil

    src, fp32, _ = exported["leadformer"]
    assert export_is_current(fp32, src)
    retrained = tmp_path / "retrained"
    shutil.copytree(src, retrained)
    model = students.create("leadformer", "tiny", num_labels=5,
                            id2label=dict(enumerate(CLASSES)))
    model.save_pretrained(retrained)  # other weights, same folder layout
    assert not export_is_current(fp32, retrained)
    assert not export_is_current(tmp_path, src)  # no export at all


def test_eval_scores_an_onnx_folder_as_its_pytorch_student(exported, ptbxl_template,
                                                          tmp_path) -> None:
    """`ecg-distill eval` on an ONNX folder runs it with onnxruntime on the same inputs the
    PyTorch folder gets: the same probabilities, so the same scores."""
    from distill.run.stages.evaluate import evaluate_checkpoint

    src, folder, _ = exported["xresnet1d"]
    kwargs = dict(split="all", bootstrap=20, cache_dir=str(tmp_path / "cache"), progress=False)
    a = evaluate_checkpoint(src, ptbxl_template, **kwargs)
    b = evaluate_checkpoint(folder, ptbxl_template, **kwargs)
    assert a["records"] == b["records"] > 0
    assert b["macro_auc"]["value"] == pytest.approx(a["macro_auc"]["value"], abs=1e-6)
    for label, value in a["label_auc"].items():
        assert (value is None and b["label_auc"][label] is None) or \
            b["label_auc"][label] == pytest.approx(value, abs=1e-6)
