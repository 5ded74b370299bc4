"""`ecg-distill run` end to end on a tiny recipe: every stage, every report artefact, a run
killed between stages continuing without redoing finished stages, and `ecg-distill eval`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import run_card_snippet
from distill.cli import main

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(root: Path) -> Path:
    d = {
        "name": "tiny",
        "output_dir": str(root / "runs" / "{name}"),
        "data": {"synthetic": {"records": 160, "seed": 2}, "cache_dir": str(root / "cache")},
        "teacher": {"kind": "vlm", "name_or_path": "tiny", "train_mode": "full", "epochs": 1},
        "students": [{"family": "xresnet1d", "size": "tiny"},
                     {"family": "leadformer", "size": "tiny"}],
        "distill": {"alpha": 0.5, "weights": {"kd": 1.0, "mhca": 1.0, "ot": 1.0, "relation": 1.0},
                    "mhca": {"dim": 32, "heads": 2},
                    "ot": {"dim": 32, "iters": 20, "lead_prior": 0.5}},
        "ablations": {"student": 1, "runs": ["kd_only"]},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.003},
        "evaluate": {"bootstrap": 50, "latency_repeats": 1},
        "quantize": {"formats": ["int8", "nf4", "onnx", "onnx-int8", "onnx-int4",
                                 "onnx-int8-qat"],
                     "calibration_records": 64, "kd_qat": {"epochs": 1}},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.mark.slow
def test_run_killed_between_stages_continues_and_writes_every_artefact(tmp_path, capsys) -> None:
    recipe = tiny_recipe(tmp_path)
    run = tmp_path / "runs" / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distill", "run", str(recipe), "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = run / "stages" / "baseline.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), proc.stderr.read().decode()[-2000:]
    assert not (run / "stages" / "evaluate.json").exists()
    teacher_log = (run / "teacher" / "log.csv").stat().st_mtime_ns

    capsys.readouterr()
    assert main(["run", str(recipe), "--quiet"]) == 0
    out = capsys.readouterr().out
    for stage in ("data", "teacher", "teacher_cache", "baseline"):
        assert f"[{stage}] complete, skipped" in out
    assert (run / "teacher" / "log.csv").stat().st_mtime_ns == teacher_log  # not retrained

    results = json.loads((run / "results.json").read_text())
    names = {"teacher", "baseline xresnet1d/tiny", "distill xresnet1d/tiny",
             "baseline leadformer/tiny", "distill leadformer/tiny",
             "ablation kd_only leadformer/tiny"}
    assert set(results["models"]) == names
    for name, m in results["models"].items():
        auc = m["macro_auc"]
        assert auc["low"] <= auc["value"] <= auc["high"]
        assert m["parameters"] > 0 and m["latency_ms"]["1"] > 0 and m["peak_memory_mb"]["64"] > 0
        assert 0 <= m["fmax"] <= 1 and 0 <= m["accuracy"] <= 1
        preds = np.load(run / "eval" / name.replace(" ", "_").replace("/", "-") / "predictions.npz")
        assert preds["test"].shape == (results["test_records"], 5)
        if name != "teacher":
            assert "vs_teacher" in m
    assert "vs_baseline" in results["models"]["distill leadformer/tiny"]
    assert "vs_full" in results["models"]["ablation kd_only leadformer/tiny"]
    report = (run / "report.md").read_text()
    assert "| model | parameters |" in report and "Ablations of leadformer/tiny" in report
    for name in names - {"ablation kd_only leadformer/tiny"}:
        assert f"| {name} |" in report
    for fig in ("auc_vs_params", "training_curves", "transport_plan", "spectrum"):
        with Image.open(run / "figures" / f"{fig}.png") as img:
            assert img.size[0] > 300 and img.size[1] > 200
        assert f"figures/{fig}.png" in report

    # the quantize stage: every trained student in every format its layers allow
    quantized = json.loads((run / "quantized.json").read_text())
    variants = ("xresnet1d/tiny int8", "leadformer/tiny int8", "leadformer/tiny nf4",
                "xresnet1d/tiny onnx", "leadformer/tiny onnx", "xresnet1d/tiny onnx-int8",
                "leadformer/tiny onnx-int8", "leadformer/tiny onnx-int4",
                "xresnet1d/tiny onnx-int8-qat", "leadformer/tiny onnx-int8-qat")
    assert set(quantized["models"]) == {f"{kind} {s}" for kind in ("baseline", "distill")
                                        for s in variants}
    assert "no layer of this model can be quantized to nf4" in \
        quantized["skipped"]["distill xresnet1d/tiny nf4"]
    assert "onnxruntime has no 4-bit convolution" in \
        quantized["skipped"]["distill xresnet1d/tiny onnx-int4"]
    for name, m in quantized["models"].items():
        d = m["vs_fp32"]
        assert d["low"] <= d["value"] <= d["high"]
        ref = quantized["reference"][m["fp32"]]
        if m["format"].startswith("onnx"):  # the source model's count (batch norms included)
            assert m["parameters"] == ref["parameters"]
        if m["format"] == "onnx":  # the same weights, run by onnxruntime: the same scores
            assert abs(d["value"]) < 1e-3 and m["quantization"]["max_abs_diff"] <= 1e-4
            assert "onnxruntime" in m["memory_method"]
            continue
        assert m["disk_mb"] < ref["disk_mb"] and m["weights_mb"] < ref["weights_mb"]
        if m["format"].startswith("onnx"):
            assert (Path(m["folder"]) / "model.onnx").is_file()
        else:
            assert json.loads((Path(m["folder"]) / "config.json").read_text())[
                "quantization_config"]
        assert m["quantization"]["ratio_part"] > (5 if m["format"] in ("nf4", "onnx-int4")
                                                  else 3)
        if m["format"] == "onnx-int8-qat":  # fine-tuned under fake quantization first
            qat = m["quantization"]["kd_qat"]
            assert qat["epochs"] == 1 and qat["teacher"] == "self" and qat["best_epoch"] == 1
            assert (Path(qat["fine_tuned"]) / "model.safetensors").is_file()
    # the fp32 rows measured beside the variants score what the evaluate stage scored
    assert quantized["reference"]["distill leadformer/tiny"]["macro_auc"] == \
        pytest.approx(results["models"]["distill leadformer/tiny"]["macro_auc"])
    mem = quantized["teacher_memory"]
    assert mem["4bit"]["weights_mb"] < mem["8bit"]["weights_mb"] < mem["none"]["weights_mb"]
    assert "Quantized students" in report and "| distill leadformer/tiny nf4 | nf4 |" in report
    assert "| distill xresnet1d/tiny onnx-int8 | onnx-int8 |" in report
    assert "| distill leadformer/tiny | fp32 |" in report
    assert "Teacher memory by precision" in report
    # the export stage: one verified hub-ready folder per distilled student and variant
    exported = sorted(p.name for p in (run / "export").iterdir())
    assert exported == sorted(["distill_xresnet1d-tiny", "distill_leadformer-tiny",
                               "distill_xresnet1d-tiny_int8", "distill_leadformer-tiny_int8",
                               "distill_leadformer-tiny_nf4", "distill_xresnet1d-tiny_onnx",
                               "distill_leadformer-tiny_onnx", "distill_xresnet1d-tiny_onnx-int8",
                               "distill_leadformer-tiny_onnx-int8",
                               "distill_leadformer-tiny_onnx-int4",
                               "distill_xresnet1d-tiny_onnx-int8-qat",
                               "distill_leadformer-tiny_onnx-int8-qat"])
    for name in exported:
        assert (run / "export" / name / "checksums.sha256").exists()
    onnx_export = run / "export" / "distill_leadformer-tiny_onnx-int8"
    assert (onnx_export / "model.onnx").is_file()
    assert not (onnx_export / "model.safetensors").exists()
    # the ONNX card's snippet scores a raw record with numpy, scipy, wfdb and onnxruntime only
    _run_onnx_snippet(run / "export" / "distill_xresnet1d-tiny_onnx",
                      next((tmp_path / "cache" / "synthetic").iterdir()), tmp_path)

    # ecg-distill eval on the same folder reproduces the run's numbers for a student
    data = next((tmp_path / "cache" / "synthetic").iterdir())
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(run / "distill" / "leadformer-tiny" / "best"), "--data", str(data),
                 "--bootstrap", "50", "--out", str(out_json), "--quiet"]) == 0
    mine = json.loads(out_json.read_text())
    theirs = results["models"]["distill leadformer/tiny"]
    assert mine["macro_auc"] == pytest.approx(theirs["macro_auc"])
    assert mine["accuracy"] == pytest.approx(theirs["accuracy"])
    assert mine["normalization"] == "stored"
    # ... and for a quantized variant, loaded from its folder as a device would
    assert main(["eval", str(run / "quantized" / "distill-leadformer-tiny-nf4"), "--data",
                 str(data),
                 "--bootstrap", "50", "--out", str(out_json), "--quiet"]) == 0
    assert json.loads(out_json.read_text())["macro_auc"] == pytest.approx(
        quantized["models"]["distill leadformer/tiny nf4"]["macro_auc"])


def _run_onnx_snippet(folder: Path, data: Path, tmp_path: Path) -> None:
    """The card's snippet, with MODEL and RECORD set, in a fresh interpreter that may not
    import ecg-distill or torch: it prints the run's stored probabilities of the record."""
    from safetensors.numpy import load_file

    samples = load_file(folder / "samples.safetensors")
    ecg_id = int(samples["ecg_id"][0])
    record = next(data.glob(f"records100/*/{ecg_id:05d}_lr.hea")).with_suffix("")
    after = ("\nimport sys\nbad = sorted(m for m in sys.modules if m.split('.')[0] in "
             "('distill', 'students', 'teachers', 'torch', 'transformers'))\n"
             "assert not bad, bad\n")
    printed = run_card_snippet((folder / "README.md").read_text(), str(folder / "model.onnx"),
                               str(record), tmp_path, after)
    assert list(printed) == ["CD", "HYP", "MI", "NORM", "STTC"]
    for got, want in zip(printed.values(), samples["probabilities"][0].tolist()):
        assert float(got) == pytest.approx(want, abs=1e-3)


@pytest.mark.slow
def test_distillation_from_a_4bit_lora_teacher(tmp_path) -> None:
    """QLoRA-style: the teacher's backbone loaded in 4-bit, adapted with LoRA, then
    distilled from (its cached outputs come from the 4-bit model)."""
    import bitsandbytes as bnb

    import teachers

    path = tiny_recipe(tmp_path)
    d = yaml.safe_load(path.read_text())
    d["teacher"].update(load_in="4bit", train_mode="lora", lora_rank=4)
    d["students"] = [{"family": "xresnet1d", "size": "tiny"}]
    d["ablations"] = {"runs": []}
    d["train"]["epochs"] = 1
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    assert main(["distill", str(path), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    meta = json.loads((run / "teacher" / "best" / "teacher.json").read_text())
    assert meta["load_in"] == "4bit" and meta["saved_backbone"] == "lora"
    assert json.loads((run / "distill" / "xresnet1d-tiny" / "metrics.json").read_text())["complete"]
    teacher = teachers.load(run / "teacher" / "best", train_mode="frozen")
    assert teacher.quantized
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in teacher.modules())


def test_eval_refuses_teachers_pickles_and_wrong_tasks(tmp_path) -> None:
    from distill.run.stages.evaluate import evaluate_checkpoint
    from distill.core.errors import ECGDistillError

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "teacher.json").write_text("{}")
    with pytest.raises(ECGDistillError, match="a teacher folder"):
        evaluate_checkpoint(tmp_path / "t", tmp_path)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text("{}")
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ECGDistillError, match=r"no model.safetensors \(found pytorch_model.bin: "
                                              r"pickle weights are refused"):
        evaluate_checkpoint(tmp_path / "p", tmp_path)
