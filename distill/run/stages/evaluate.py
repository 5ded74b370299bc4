"""The ``evaluate`` stage: every model of a run on the test fold, with intervals and costs;
and ``ecg-distill eval``, one saved student on any PTB-XL-layout or PhysioNet/CinC folder.

For the teacher, each student's label-only baseline, each distilled student and each
ablation, predictions on the validation and test folds are computed once and kept
(``eval/<model>/predictions.npz``); then, under the PTB-XL protocol
(:mod:`distill.metrics.classification`), on the same bootstrap resamples of the test fold
for every model (:mod:`distill.metrics.scoring`):

* macro AUC [CI], per-label AUC, macro F-max, sample-wise accuracy at thresholds chosen on
  the validation fold;
* paired differences: each student minus the teacher, each distilled student minus its
  baseline, each ablation minus the full distillation of its student;
* size (parameters, MB on disk), memory (weights + peak activations at batch 1 and 64) and
  CPU latency per record at batch 1 and 64 (:func:`distill.metrics.footprint.footprint`);
* with a student that reads printouts (``evaluate.stress``), every model reading them on
  the test fold's perturbed printouts too (grid colour, line width, rotation, scale, blur,
  JPEG, lighting), each against its clean score (:mod:`distill.metrics.stress`).

Everything lands in ``results.json`` in the run folder, the report's single source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

import students  # registers the student classes with AutoModel; says which read printouts
from distill.compress.onnx import OnnxStudent, is_onnx_folder
from distill.core.errors import ECGDistillError
from distill.core.io import require_safetensors
from distill.core.layout import TEACHER, ModelId, RunLayout
from distill.data import cinc
from distill.data.dataset import load_cinc, load_ptbxl
from distill.engine.factory import (saved_student_view, student_inputs, student_key,
                                    student_rate, student_reads_images)
from distill.engine.jobs import JobData, load_frozen_teacher, teacher_inputs
from distill.metrics.classification import bootstrap_samples
from distill.metrics.results import write_results
from distill.metrics.scoring import Candidate, evaluate_candidates, model_metrics, predict
from distill.metrics.stress import stress_scores
from distill.run.stage import TRAINED, RunContext, Stage, distill_stage_settings
from students.preprocess import scaler_from_config


def run_candidates(jd: JobData, run_dir: Path) -> list[Candidate]:
    """The teacher, every baseline and distilled student, and every ablation of a run,
    from what the training stages saved."""
    recipe = jd.recipe
    layout = RunLayout(run_dir)
    t_folder = None if recipe.teacher.train_mode == "frozen" else layout.teacher_best
    out = [Candidate(ModelId.teacher(), t_folder, lambda: load_frozen_teacher(jd, run_dir),
                     teacher_inputs(recipe), TEACHER)]
    for spec in recipe.students:
        for kind in ("baseline", "distill"):
            out.append(student_candidate(layout, ModelId.student(kind, spec), spec))
    if recipe.ablations.runs:
        spec = recipe.students[recipe.ablations.student]
        for run in recipe.ablations.runs:
            out.append(student_candidate(layout, ModelId.student("ablation", spec, run), spec))
    return out


def student_candidate(layout: RunLayout, model: ModelId, spec, load=None) -> Candidate:
    """A saved student as the evaluation sees it: loaded from its folder, reading its view."""
    folder = layout.model_dir(model)
    return Candidate(model, folder, load or (lambda: AutoModel.from_pretrained(folder)),
                     student_inputs(spec), student_key(spec))


def example_inputs(jd: JobData, cand: Candidate, model: nn.Module,
                   batch: int) -> dict[str, torch.Tensor]:
    """Random inputs for a candidate's footprint: the teacher's own (its adapter knows its
    input), an image student's printouts, a signal student's 10-second records of its view."""
    g = torch.Generator().manual_seed(0)
    if cand.model.kind == TEACHER:
        return model.example_inputs(batch, g)
    if "image" in getattr(model, "input_names", ()):
        img = jd.recipe.data.image
        return {"image": torch.randint(0, 256, (batch, 3, img.height, img.width), generator=g,
                                       dtype=torch.uint8)}
    view = jd.views[cand.view]
    n_leads = len(view.lead_index())
    rate = student_rate(view) or jd.data.sampling_rate  # a translated view: its output's
    return {"signal": torch.randn(batch, n_leads, int(round(rate * 10.0)), generator=g)}


def evaluate_run(jd: JobData, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Evaluate every model of the run and write ``results.json``; its content."""
    recipe = jd.recipe
    layout = RunLayout(run_dir)
    splits = {s: jd.data.split(s, jd.views, extras=jd.image_extras()) for s in ("val", "test")}
    labels = {s: jd.data.labels[np.sort(jd.data.splits[s])] for s in ("val", "test")}
    ev = recipe.evaluate
    results = evaluate_candidates(
        run_candidates(jd, run_dir), splits, labels, list(jd.classes), bootstrap=ev.bootstrap,
        seed=ev.seed, level=ev.level, repeats=ev.latency_repeats,
        make_inputs=lambda c, m, b: example_inputs(jd, c, m, b),
        predictions_path=layout.predictions, progress=progress,
        batch_size=recipe.train.batch_size)
    if ev.stress and any(student_reads_images(spec) for spec in recipe.students):
        results["stress"] = stress_run(jd, run_dir, labels["test"], progress=progress)
    results["recipe"] = recipe.name
    results["task"] = jd.data.task
    results["records"] = {s: int(len(ix)) for s, ix in jd.data.splits.items()}
    write_results(run_dir, results)
    return results


def reads_printouts(cand: Candidate, jd: JobData) -> bool:
    """Whether a candidate reads the rendered printout (an image teacher or student)."""
    if cand.model.kind == TEACHER:
        return jd.teacher_class.reads_images()
    return students.reads_images(cand.model.family)  # the family's, as factory asks it


def stress_run(jd: JobData, run_dir: Path, test_labels: np.ndarray,
               progress: bool = True) -> dict[str, Any]:
    """Every model of the run that reads printouts (the image teacher, image students), on
    the test fold's clean and perturbed printouts (:func:`distill.metrics.stress.stress_scores`)."""
    recipe = jd.recipe
    ev = recipe.evaluate
    chosen = [c for c in run_candidates(jd, run_dir) if reads_printouts(c, jd)]
    models = {c.name: (lambda c=c: (c.load(), c.inputs)) for c in chosen}
    images = np.asarray(jd.images[np.sort(jd.data.splits["test"])])  # (n, 3, S, S)
    samples = bootstrap_samples(test_labels, ev.bootstrap, ev.seed)
    return stress_scores(models, images, test_labels, samples, level=ev.level, seed=ev.seed,
                         batch_size=recipe.train.batch_size, progress=progress)


def run(ctx: RunContext) -> dict[str, Any]:
    results = evaluate_run(ctx.job_data(), ctx.run_dir, progress=ctx.progress)
    for name, m in results["models"].items():
        auc = m["macro_auc"]
        print(f"{name:<28} macro AUC {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]")
    return {"results": str(ctx.layout.results_file),
            "macro_auc": {n: m["macro_auc"]["value"] for n, m in results["models"].items()}}


STAGE = Stage("evaluate", "evaluate every model on the test fold (bootstrap intervals, size, "
                          "memory, latency)", TRAINED, run, ("eval", "results.json"),
              main_only=True, settings=distill_stage_settings)


def evaluate_checkpoint(checkpoint: str | Path, data_folder: str | Path, *,
                        task: str = "superdiagnostic", split: str | None = None,
                        bootstrap: int = 1000, seed: int = 0, level: float = 0.95,
                        batch_size: int = 64, cache_dir: str | None = None,
                        progress: bool = True, fmt: str = "ptbxl") -> dict[str, Any]:
    """Evaluate a saved student on a PTB-XL-layout or CinC folder (``ecg-distill eval``).

    The student's config says what it reads (leads, rate, labels) and how its inputs are
    scaled (``normalization``, stored at training time), so any folder in the PTB-XL
    layout can be scored: the labels of ``task`` are mapped onto the student's classes,
    and decision thresholds are chosen on fold 9 (when ``split`` is "test", the default).

    ``fmt="cinc"``: a PhysioNet/CinC folder has no folds, so every record is scored
    (``split`` None or "all"); its SNOMED codes are mapped onto ``task``'s classes
    (:func:`distill.data.cinc.map_to_task`), records left without a label of the student's
    classes are left out (counted in ``label_report.dropped_without_label``), the codes that
    could not be mapped are listed in ``label_report.unmapped``, and the thresholds are
    chosen on the scored records themselves.

    Returns:
        {"checkpoint", "data", "format", "split", "records", "classes", metrics (as in
        results.json)}, plus ``label_report`` for a CinC folder.

    Raises:
        ECGDistillError: not a student folder, a pickle checkpoint, labels the data lack,
            an unknown format or a split other than "all" on a CinC folder.
    """
    if fmt not in ("ptbxl", "cinc"):
        raise ECGDistillError(f"unknown data format {fmt!r}; expected ptbxl or cinc")
    if fmt == "cinc":
        if split not in (None, "all"):
            raise ECGDistillError(f"{data_folder}: a CinC folder has no folds; every record is "
                                  f"scored (split all), not split {split!r}")
        if task == cinc.SNOMED_TASK:
            raise ECGDistillError("task snomed cannot score a PTB-XL-trained student; name the "
                                  "PTB-XL task its classes come from (e.g. superdiagnostic)")
    split = split or ("all" if fmt == "cinc" else "test")
    checkpoint = Path(checkpoint)
    if (checkpoint / "teacher.json").exists():
        raise ECGDistillError(f"{checkpoint}: a teacher folder; `ecg-distill eval` scores saved "
                              f"students (teachers are evaluated by `ecg-distill run`)")
    if not (checkpoint / "config.json").exists():
        raise ECGDistillError(f"{checkpoint}: no config.json; not a saved student folder")
    onnx = is_onnx_folder(checkpoint)  # an ONNX variant: run by onnxruntime
    if not onnx:
        require_safetensors(checkpoint)  # before the config is read: the clearer refusal
    config = AutoConfig.from_pretrained(checkpoint)
    if onnx:
        model = OnnxStudent(checkpoint)
    else:
        model = AutoModel.from_pretrained(checkpoint, use_safetensors=True).eval()
    classes = [config.id2label[i] for i in range(config.num_labels)]
    rate = int(config.sampling_rate)
    source_rate = 100 if rate <= 100 else 500
    if fmt == "cinc":  # every record in one split: the scaler (when none is stored) sees all
        data = load_cinc(data_folder, task=task, sampling_rate=source_rate, classes=classes,
                         folds={"train": tuple(range(1, 11))}, cache_dir=cache_dir,
                         progress=progress)
    else:
        data = load_ptbxl(data_folder, task=task, sampling_rate=source_rate,
                          classes=classes, cache_dir=cache_dir, progress=progress)
    norm = getattr(config, "normalization", None)
    if norm:
        data.scaler = scaler_from_config(config)
    view = {"signal": saved_student_view(config)}  # a translated student: its translator's output
    inputs = (lambda b: {"signal": b["signal"]})
    chosen = data.split(split, view)
    index, probs = predict(model, chosen, inputs, batch_size=batch_size, progress=progress)
    labels = data.labels[index]
    if split == "test" and "val" in data.splits and len(data.splits["val"]):
        v_index, v_probs = predict(model, data.split("val", view), inputs, batch_size=batch_size)
        val_labels = data.labels[v_index]
    else:  # no validation fold: thresholds from the evaluated records themselves
        v_probs, val_labels = probs, labels
    samples = bootstrap_samples(labels, bootstrap, seed)
    metrics = model_metrics(labels, probs, val_labels, v_probs, samples, level, classes)
    out = {"checkpoint": str(checkpoint), "data": str(data_folder), "format": fmt,
           "split": split, "task": task, "records": int(len(index)), "classes": classes,
           "normalization": "stored" if norm else (
               "fitted on this folder's train folds" if fmt == "ptbxl"
               else "fitted on this folder's records"),
           "bootstrap": {"resamples": bootstrap, "seed": seed, "level": level}, **metrics}
    if data.label_report is not None:
        out["label_report"] = data.label_report
    return out
