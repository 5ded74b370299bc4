"""The ``quantize`` stage: every trained student (label-only baseline and distilled) in every
``quantize.formats`` (bitsandbytes int8, nf4, fp4: :mod:`distill.compress.quantize`; ONNX
fp32, static int8 and 4-bit weight-only with onnxruntime: :mod:`distill.compress.onnx`),
each scored and measured beside its fp32 model, and the teacher's memory at each
precision (``quantized.json``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import teachers
from distill.compress.onnx import FORMATS as ONNX_FORMATS
from distill.compress.onnx import OnnxStudent, export_is_current, export_onnx, quantize_onnx
from distill.compress.quantize import QuantizeError, load_student, quantize_folder
from distill.core.io import atomic_write_text
from distill.core.layout import QUANTIZED_DIR, QUANTIZED_FILE, ModelId, RunLayout
from distill.compress.qat import kd_qat_job, plain_job_data
from distill.core.schema import to_dict
from distill.engine.factory import build_teacher, student_key, student_reads_images
from distill.engine.jobs import JobData, build_teacher_cache, load_frozen_teacher
from distill.engine.accel import process_state
from distill.engine.train import fit
from distill.metrics.footprint import peak_activation_bytes, weights_bytes
from distill.metrics.scoring import evaluate_candidates
from distill.run.stage import TRAINED, RunContext, Stage, distill_stage_settings
from distill.run.stages.evaluate import example_inputs, student_candidate

TEACHER_PRECISIONS: tuple[str, ...] = ("none", "8bit", "4bit")


def quantize_run(jd: JobData, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """The ``quantize`` stage: every trained student (label-only baseline and distilled) in
    every ``quantize.formats``.

    Each variant is written to ``quantized/<kind>-<family>-<size>-<format>/`` and reloaded from
    there (the folder a device would load); then each fp32 student and its variants are
    scored on the same bootstrap resamples of the test fold (macro AUC [CI], the paired
    difference to fp32) and measured side by side in this one process (size on disk,
    memory, CPU latency at batch 1 and 64). The teacher's memory at each precision
    (fp32, 8-bit, 4-bit) is measured too. Everything goes to ``quantized.json``.
    """
    recipe = jd.recipe
    layout = RunLayout(run_dir)
    q = recipe.quantize
    candidates: list = []
    summaries: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for kind, spec in ((k, s) for s in recipe.students for k in ("baseline", "distill")):
        fp32 = ModelId.student(kind, spec)
        source = layout.model_dir(fp32)
        fp32_name = fp32.name
        variants = []
        for fmt in q.formats:
            model = ModelId.student(kind, spec, fmt)
            out = layout.model_dir(model)
            try:
                if fmt in ONNX_FORMATS:
                    summary = onnx_variant(jd, layout, kind, spec, fmt, progress)
                    load = lambda f=out: OnnxStudent(f)  # noqa: E731
                else:
                    summary = quantize_folder(source, fmt, out, double_quant=q.double_quant,
                                              force=True).to_dict()
                    load = lambda f=out: load_student(f)  # noqa: E731
            except QuantizeError as exc:
                skipped[f"{fp32_name} {fmt}"] = str(exc)
                print(f"{fp32_name} {fmt}: not quantized ({exc})")
                continue
            name = model.name
            print(f"{name}: {summary['fraction']:.0%} of the parameters quantized, "
                  f"{summary['ratio_file']:.2f}x smaller on disk (quantized part "
                  f"{summary['ratio_part']:.2f}x)")
            summaries[name] = summary
            variants.append(student_candidate(layout, model, spec, load=load))
        if variants:
            candidates.append(student_candidate(layout, fp32, spec,
                                                load=lambda f=source: load_student(f)))
            candidates += variants
    results: dict[str, Any] = {"formats": list(q.formats), "double_quant": q.double_quant,
                               "models": {}, "reference": {}, "skipped": skipped}
    if candidates:
        views = {c.view: jd.views[c.view] for c in candidates}
        splits = {s: jd.data.split(s, views, extras=jd.image_extras()) for s in ("val", "test")}
        labels = {s: jd.data.labels[np.sort(jd.data.splits[s])] for s in ("val", "test")}
        ev = recipe.evaluate
        scored = evaluate_candidates(
            candidates, splits, labels, list(jd.classes), bootstrap=ev.bootstrap, seed=ev.seed,
            level=ev.level, repeats=ev.latency_repeats,
            make_inputs=lambda c, m, b: example_inputs(jd, c, m, b),
            predictions_path=lambda m: layout.predictions(m, quantized_stage=True),
            progress=progress,
            batch_size=recipe.train.batch_size)
        for name, entry in scored["models"].items():
            if entry["kind"] == "quantized":
                entry["quantization"] = summaries[name]
                results["models"][name] = entry
            else:
                results["reference"][name] = entry
        results["bootstrap"] = scored["bootstrap"]
    results["teacher_memory"] = teacher_memory(jd, run_dir)
    atomic_write_text(layout.quantized_file, json.dumps(results, indent=1))
    return results


# student families the ONNX formats do not export, and why
ONNX_UNSUPPORTED = {
    "llava": "the ONNX formats export signal and image students; a VLM student is quantized "
             "with bitsandbytes (int8, nf4: its language model)"}


def student_records(jd: JobData, spec, split: str, n: int, seed: int) -> np.ndarray:
    """``n`` records of ``split`` as the student reads them: float32 [n, leads, samples] in
    its view (scaled, at its rate), or an image student's printouts uint8 [n, 3, S, S];
    drawn without replacement with ``seed`` (all of them when fewer)."""
    key = student_key(spec)
    data = jd.data.split(split, {key: jd.views[key]})
    rows = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    if student_reads_images(spec):
        return np.stack([np.asarray(jd.images[int(data[int(i)]["index"])]) for i in rows])
    return np.stack([data[int(i)][key].numpy() for i in rows])


def onnx_variant(jd: JobData, layout: RunLayout, kind: str, spec, fmt: str,
                 progress: bool = True) -> dict[str, Any]:
    """The student's ONNX variant ``fmt``: the fp32 export (``onnx``, checked against
    PyTorch on validation records), made first when a quantized format needs it, its
    static int8 / 4-bit weight-only quantization (:mod:`distill.compress.onnx`), or its
    distillation-aware int8 (``onnx-int8-qat``: :func:`kd_qat_variant`)."""
    if spec.family in ONNX_UNSUPPORTED:
        raise QuantizeError(ONNX_UNSUPPORTED[spec.family])
    if fmt == "onnx-int8-qat" and student_reads_images(spec):
        raise QuantizeError(f"KD + QAT trains signal students; {spec.family} reads printouts "
                            f"(its onnx-int8 format is post-training quantized)")
    q, seed = jd.recipe.quantize, jd.recipe.evaluate.seed
    fp32 = layout.model_dir(ModelId.student(kind, spec, "onnx"))
    check = student_records(jd, spec, "val", 32, seed)
    if fmt == "onnx-int8-qat":
        return kd_qat_variant(jd, layout, kind, spec, check, progress)
    source = layout.model_dir(ModelId.student(kind, spec))
    if fmt == "onnx" or not export_is_current(fp32, source):
        summary = export_onnx(source, fp32, check, force=True)
        if fmt == "onnx":
            return summary
    calibration = (student_records(jd, spec, "train", q.calibration_records, seed)
                   if fmt == "onnx-int8" else None)
    return quantize_onnx(fp32, fmt, layout.model_dir(ModelId.student(kind, spec, fmt)),
                         calibration, check=check, force=True)


def kd_qat_variant(jd: JobData, layout: RunLayout, kind: str, spec, check: np.ndarray,
                   progress: bool = True) -> dict[str, Any]:
    """``onnx-int8-qat``: fine-tune the student under fake int8 quantization with the
    distillation loss (:mod:`distill.compress.qat`; through the shared loop, with its
    checkpoints, under ``quantized/<kind>-<student>-kdqat/``: an interrupted fine-tune of the
    same job resumes, a finished one is reused, one of other settings is replaced), then
    export the result and quantize it like ``onnx-int8``."""
    recipe = jd.recipe
    q, k, seed = recipe.quantize, recipe.quantize.kd_qat, recipe.evaluate.seed
    if process_state().num_processes > 1:
        raise QuantizeError("onnx-int8-qat trains, and the quantize stage runs on the main "
                            "process only: run it in one process (without accelerate launch)")
    source = layout.model_dir(ModelId.student(kind, spec))
    work = layout.job_dir(ModelId.student(kind, spec, "kdqat"))
    teacher_logits = None
    if k.teacher == "teacher":  # its outputs on the plain records (augmentation off)
        plain = plain_job_data(jd)
        cache = build_teacher_cache(plain, load_frozen_teacher(plain, layout.root),
                                    progress=progress)
        teacher_logits = np.asarray(cache.logits)
    job = kd_qat_job(jd, spec, source, alpha=k.alpha, temperature=k.temperature,
                     epochs=k.epochs, lr=k.lr, teacher_logits=teacher_logits,
                     calibration_records=q.calibration_records, seed=seed)
    cfg = recipe.train
    done = _metrics(work)
    if done.get("complete") and done.get("fingerprint") == job.fingerprint:
        print(f"{job.name}: complete in {work}, skipped")
        best, m = work / "best", done
    else:
        if done.get("fingerprint") not in (None, job.fingerprint):
            shutil.rmtree(work)  # this stage's own output, made with other settings
        # an interrupted fine-tune of the same job resumes (the stage itself has no --resume)
        fitted = fit(job, cfg, work, seed=recipe.seed, epochs=k.epochs, lr=k.lr, resume=True,
                     progress=progress)
        best, m = fitted.best_folder, fitted.metrics
    export_onnx(best, work / "onnx", check, force=True)
    summary = quantize_onnx(work / "onnx", "onnx-int8",
                            layout.model_dir(ModelId.student(kind, spec, "onnx-int8-qat")),
                            student_records(jd, spec, "train", q.calibration_records, seed),
                            check=check, force=True)
    summary["format"] = "onnx-int8-qat"
    summary["kd_qat"] = {**to_dict(k), "best_epoch": m.get("best_epoch"),
                         "best_val_macro_auc": m.get("best_val_macro_auc"),
                         "fine_tuned": str(best)}
    summary["notes"].append(f"fine-tuned {k.epochs} epoch(s) under fake int8 quantization "
                            f"with KD from its {'fp32 self' if k.teacher == 'self' else 'teacher'}"
                            f" (alpha {k.alpha}, T {k.temperature}) before the int8 conversion")
    return summary


def _metrics(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def teacher_memory(jd: JobData, run_dir: Path,
                   precisions: Sequence[str] = TEACHER_PRECISIONS) -> dict[str, Any]:
    """The run's teacher loaded at each precision: weights MB (with bitsandbytes' scales)
    and weights + peak activations at batch 1, on the CPU. A precision that cannot load
    here records its error instead."""
    recipe = jd.recipe
    best = RunLayout(run_dir).teacher_best
    out: dict[str, Any] = {}
    for precision in precisions:
        try:
            if recipe.teacher.train_mode != "frozen" and (best / "teacher.json").exists():
                teacher = teachers.load(best, load_in=precision, train_mode="frozen")
            else:
                teacher = build_teacher(recipe, jd.classes, load_in=precision,
                                        train_mode="frozen")
        except (ValueError, RuntimeError, ImportError, OSError) as exc:
            out[precision] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            continue
        teacher = teacher.eval()
        weights = weights_bytes(teacher)
        peak = peak_activation_bytes(teacher,
                                     teacher.example_inputs(1, torch.Generator().manual_seed(0)))
        out[precision] = {"weights_mb": weights / 1e6, "peak_memory_mb": (weights + peak) / 1e6,
                          "parameters_quantized": teacher.quantized}
        del teacher
    return out


def run(ctx: RunContext) -> dict[str, Any]:
    if not ctx.recipe.quantize.formats:
        print("no quantized variants in the recipe (quantize.formats is empty)")
        return {}
    results = quantize_run(ctx.job_data(), ctx.run_dir, progress=ctx.progress)
    for name, m in results["models"].items():
        auc, d = m["macro_auc"], m["vs_fp32"]
        print(f"{name:<28} macro AUC {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]"
              f", vs fp32 {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
    for precision, m in results["teacher_memory"].items():
        if "error" in m:
            print(f"teacher {precision}: {m['error']}")
        else:
            print(f"teacher {precision}: weights {m['weights_mb']:.1f} MB")
    return {"results": str(ctx.layout.quantized_file),
            "macro_auc": {n: m["macro_auc"]["value"] for n, m in results["models"].items()}}


STAGE = Stage("quantize", "quantize every trained student (quantize.formats) and measure each "
                          "variant beside its fp32 model; the teacher's memory per precision",
              (*TRAINED, "quantize"), run, (QUANTIZED_DIR, QUANTIZED_FILE), main_only=True,
              settings=distill_stage_settings)
