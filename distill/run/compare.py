"""The evaluation stage: every model of a run on the test fold, with intervals and costs.

For the teacher, each student's label-only baseline, each distilled student and each
ablation, predictions on the validation and test folds are computed once and kept
(``eval/<model>/predictions.npz``); then, under the PTB-XL protocol
(:mod:`distill.metrics.classification`), on the same bootstrap resamples of the test fold for every
model:

* macro AUC [CI], per-label AUC, macro F-max, sample-wise accuracy at thresholds chosen on
  the validation fold;
* paired differences: each student minus the teacher, each distilled student minus its
  baseline, each ablation minus the full distillation of its student;
* size (parameters, MB on disk), memory (weights + peak activations at batch 1 and 64) and
  CPU latency per record at batch 1 and 64 (:func:`footprint`).

Everything lands in ``results.json`` in the run folder, the report's single source.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from distill.metrics.classification import (bootstrap_interval, bootstrap_samples, choose_thresholds, fmax,
                              label_aucs, paired_difference, sample_accuracy)
from distill.core.io import atomic_write_text
from distill.core.progress import progress_bar

RESULTS_FILE = "results.json"


@dataclass
class Candidate:
    """One model of the run to evaluate."""

    name: str  # "teacher", "baseline xresnet1d/tiny", "distill ...", "ablation no_ot ..."
    kind: str  # teacher | baseline | distill | ablation
    folder: Path | None  # its saved folder (None: a frozen teacher used as built)
    load: Callable[[], nn.Module]
    inputs: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]
    view: str  # the batch entry it reads (the teacher: "teacher" or the image)
    student: str | None = None  # family/size
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def predict(model: nn.Module, dataset, inputs: Callable, batch_size: int = 64,
            progress: bool = False, desc: str = "predicting") -> tuple[np.ndarray, np.ndarray]:
    """(record positions [N], probabilities [N, C]) of ``model`` over ``dataset``, sorted by
    record position."""
    model.eval()
    device = next(model.parameters()).device
    index, probs = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in progress_bar(loader, enabled=progress, desc=desc, leave=False, unit="batch"):
        logits = model(**{k: v.to(device) for k, v in inputs(batch).items()}).logits
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        index.append(batch["index"].numpy())
    index_all, probs_all = np.concatenate(index), np.concatenate(probs)
    order = np.argsort(index_all, kind="stable")
    return index_all[order], probs_all[order]


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers in memory (shared tensors once), plus the
    scales and quant states bitsandbytes keeps beside quantized weights."""
    from distill.compress.quantize import quantized_weights_extra_bytes

    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total + quantized_weights_extra_bytes(model)


@torch.no_grad()
def peak_activation_bytes(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """Peak bytes allocated on the CPU during one forward pass beyond the weights.

    Measured with the PyTorch profiler's memory events: the running sum of every
    operator's allocations and every release, in time order; its maximum is the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    model(**inputs)  # warm-up: lazy buffers and caches do not count
    with _silent_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**inputs)
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += (event.cpu_memory_usage if event.name == "[memory]"
                    else event.self_cpu_memory_usage)
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _silent_stderr():
    """The profiler's C++ back end (kineto) writes start/stop lines straight to file
    descriptor 2, with no setting to turn them off; they are noise in a run's log."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def folder_bytes(folder: Path | None) -> int | None:
    """Bytes of the weight files (``*.safetensors``) a saved model needs: those in its
    folder, plus, for a teacher saved without its backbone (``head`` or ``lora`` mode),
    those of the backbone it loads from (a shipped teacher or a local folder)."""
    if folder is None or not folder.exists():
        return None

    def weights(root: Path) -> int:
        return sum(p.stat().st_size for p in root.rglob("*.safetensors")
                   if p.name != "objective.safetensors")

    total = weights(folder)
    meta_file = folder / "teacher.json"
    if meta_file.is_file():
        from teachers import zoo

        meta = json.loads(meta_file.read_text())
        source = str(meta.get("source", ""))
        if meta.get("saved_backbone") != "full" and source:
            backbone = zoo.backbone_folder(source) or Path(source).expanduser()
            if backbone.is_dir():
                total += weights(backbone)
    return total


def footprint(model: nn.Module, make_inputs: Callable[[int], dict[str, torch.Tensor]],
              folder: Path | None = None, batch_sizes: tuple[int, ...] = (1, 64),
              repeats: int = 5) -> dict[str, Any]:
    """Size, memory and CPU latency of ``model``.

    Returns:
        {"parameters", "disk_mb", "weights_mb", "peak_memory_mb": {batch: MB},
        "latency_ms": {batch: ms per record}}; memory is weights + peak activations;
        latency is the fastest of ``repeats`` timed passes (the least disturbed by other
        work on the machine; a median moves with the load of a shared CPU).
    """
    from distill.metrics.footprint import count_parameters, latency

    model = model.to("cpu").eval()
    weights = weights_bytes(model)
    disk = folder_bytes(folder)
    out: dict[str, Any] = {"parameters": count_parameters(model),
                           "disk_mb": None if disk is None else disk / 1e6,
                           "weights_mb": weights / 1e6, "peak_memory_mb": {}, "latency_ms": {}}
    for b in batch_sizes:
        inputs = make_inputs(b)
        out["peak_memory_mb"][str(b)] = (weights + peak_activation_bytes(model, inputs)) / 1e6
        out["latency_ms"][str(b)] = latency(model, lambda _, x=inputs: x, b, repeats=repeats,
                                            warmup=0, statistic=min) * 1e3
    return out


def model_metrics(labels: np.ndarray, probs: np.ndarray, val_labels: np.ndarray,
                  val_probs: np.ndarray, samples: np.ndarray, level: float,
                  classes: list[str]) -> dict[str, Any]:
    """The test-fold metrics of one model (see the module docstring)."""
    thresholds = choose_thresholds(val_labels, val_probs)
    return {
        "macro_auc": bootstrap_interval(labels, probs, samples, level=level).to_dict(),
        "label_auc": {c: (None if np.isnan(a) else float(a))
                      for c, a in zip(classes, label_aucs(labels, probs))},
        "fmax": fmax(labels, probs),
        "accuracy": sample_accuracy(labels, probs, thresholds),
        "thresholds": {c: float(t) for c, t in zip(classes, thresholds)},
    }


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    return atomic_write_text(run_dir / RESULTS_FILE, json.dumps(results, indent=1))


def prediction_folder(name: str) -> str:
    """A model's folder name under ``eval/``: "distill leadformer/tiny" -> "distill_leadformer-tiny"."""
    return name.replace(" ", "_").replace("/", "-")


def load_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``results.json`` of a run, with the quantize stage's variants (``quantized.json``)
    merged into ``models`` and its other entries under ``quantization``; the fp32 figures
    of the quantize stage (measured beside the variants) stay under
    ``quantization.reference``."""
    from distill.core.errors import ECGDistillError
    from distill.compress.quantize import QUANTIZED_FILE

    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ECGDistillError(f"{path}: no results; run `ecg-distill run` (its evaluate "
                              f"stage) on the recipe first") from None
    except json.JSONDecodeError as exc:
        raise ECGDistillError(f"{path}: not valid JSON ({exc})") from None
    qpath = run_dir / QUANTIZED_FILE
    if qpath.exists():
        quantized = json.loads(qpath.read_text())
        results["models"].update(quantized.pop("models", {}))
        results["quantization"] = quantized
    return results


def evaluate_candidates(candidates: list[Candidate], splits: Mapping[str, Any],
                        labels: Mapping[str, np.ndarray], classes: list[str], *,
                        bootstrap: int, seed: int, level: float, repeats: int,
                        make_inputs: Callable[[Candidate, int], dict[str, torch.Tensor]],
                        out_dir: Path, progress: bool = True,
                        batch_size: int = 64) -> dict[str, Any]:
    """Predict, score and measure every candidate; the ``results.json`` content.

    Args:
        candidates: the models.
        splits: "val" and "test" datasets carrying every candidate's view.
        labels: "val" and "test" label matrices, rows in record-position order.
        classes: label names.
        bootstrap, seed, level: the resamples and the interval level.
        repeats: timed passes per batch size.
        make_inputs: (candidate, batch size) -> random inputs for the footprint.
        out_dir: where ``<model>/predictions.npz`` are written.
        progress: progress bars.
        batch_size: prediction batch size.
    """
    samples = bootstrap_samples(labels["test"], bootstrap, seed)
    probs: dict[str, dict[str, np.ndarray]] = {}
    models: dict[str, Any] = {}
    for cand in progress_bar(candidates, enabled=progress, desc="evaluating", unit="model"):
        model = cand.load()
        preds = {}
        for split in ("val", "test"):
            index, p = predict(model, splits[split], cand.inputs, batch_size=batch_size)
            preds[split] = p
            preds[f"{split}_index"] = index
        folder = out_dir / prediction_folder(cand.name)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "predictions.npz", **preds)
        probs[cand.name] = preds
        entry = {"kind": cand.kind, "student": cand.student,
                 "folder": None if cand.folder is None else str(cand.folder), **cand.extra,
                 "predictions": str(folder / "predictions.npz")}
        entry.update(model_metrics(labels["test"], preds["test"], labels["val"], preds["val"],
                                   samples, level, classes))
        entry.update(footprint(model, lambda b, c=cand: make_inputs(c, b), cand.folder,
                               repeats=repeats))
        models[cand.name] = entry
        del model
    _differences(models, probs, labels["test"], samples, level)
    return {"classes": classes, "test_records": int(len(labels["test"])),
            "bootstrap": {"resamples": bootstrap, "seed": seed, "level": level},
            "models": models}


def _differences(models: dict[str, Any], probs: dict[str, dict[str, np.ndarray]],
                 labels: np.ndarray, samples: np.ndarray, level: float) -> None:
    """Paired macro-AUC differences: vs the teacher, vs the baseline, vs the full recipe."""
    def diff(a: str, b: str) -> dict[str, float]:
        return paired_difference(labels, probs[a]["test"], probs[b]["test"], samples,
                                 level=level).to_dict()

    teacher = next((n for n, m in models.items() if m["kind"] == "teacher"), None)
    for name, m in models.items():
        if m["kind"] == "teacher":
            continue
        if m["kind"] == "quantized" and m.get("fp32") in models:
            m["vs_fp32"] = diff(name, m["fp32"])
        if teacher is not None:
            m["vs_teacher"] = diff(name, teacher)
        if m["kind"] in ("distill", "ablation"):
            base = f"baseline {m['student']}"
            if base in models:
                m["vs_baseline"] = diff(name, base)
        if m["kind"] == "ablation":
            full = f"distill {m['student']}"
            if full in models:
                m["vs_full"] = diff(name, full)


def run_candidates(jd, run_dir: Path) -> list[Candidate]:
    """The teacher, every baseline and distilled student, and every ablation of a run,
    from what the training stages saved."""
    from transformers import AutoModel

    import students  # noqa: F401  (registers the student classes with AutoModel)
    from distill.engine.jobs import (ablation_folder, load_frozen_teacher, student_folder, student_key,
                              teacher_inputs)
    from distill.engine.factory import student_name

    recipe = jd.recipe
    t_folder = None if recipe.teacher.train_mode == "frozen" else run_dir / "teacher" / "best"
    out = [Candidate("teacher", "teacher", t_folder, lambda: load_frozen_teacher(jd, run_dir),
                     teacher_inputs(recipe.teacher.kind), "teacher")]

    def student(kind: str, folder: Path, spec, name: str) -> Candidate:
        key = student_key(spec)
        return Candidate(name, kind, folder, lambda: AutoModel.from_pretrained(folder),
                         lambda b, k=key: {"signal": b[k]}, key, student_name(spec))

    for spec in recipe.students:
        sname = student_name(spec)
        out.append(student("baseline", run_dir / "baseline" / student_folder(spec) / "best",
                           spec, f"baseline {sname}"))
        out.append(student("distill", run_dir / "distill" / student_folder(spec) / "best",
                           spec, f"distill {sname}"))
    if recipe.ablations.runs:
        spec = recipe.students[recipe.ablations.student]
        for run in recipe.ablations.runs:
            cand = student("ablation", run_dir / ablation_folder(run, spec) / "best", spec,
                           f"ablation {run} {student_name(spec)}")
            cand.extra["ablation"] = run
            out.append(cand)
    return out


def _random_inputs(jd, cand: Candidate, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if cand.kind == "teacher" and jd.recipe.teacher.kind == "vlm":
        img = jd.recipe.data.image
        return {"image": torch.randint(0, 256, (batch, 3, img.height, img.width), generator=g,
                                       dtype=torch.uint8)}
    view = jd.views[cand.view]
    n_leads = len(view.lead_index())
    rate = view.sampling_rate or jd.data.sampling_rate
    seconds = jd.recipe.teacher.seconds if cand.kind == "teacher" else 10.0
    return {"signal": torch.randn(batch, n_leads, int(round(rate * seconds)), generator=g)}


def evaluate_run(jd, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Evaluate every model of the run and write ``results.json``; its content."""
    recipe = jd.recipe
    extras = {"image": jd.images} if recipe.teacher.kind == "vlm" else None
    splits = {s: jd.data.split(s, jd.views, extras=extras) for s in ("val", "test")}
    labels = {s: jd.data.labels[np.sort(jd.data.splits[s])] for s in ("val", "test")}
    ev = recipe.evaluate
    results = evaluate_candidates(
        run_candidates(jd, run_dir), splits, labels, list(jd.classes), bootstrap=ev.bootstrap,
        seed=ev.seed, level=ev.level, repeats=ev.latency_repeats,
        make_inputs=lambda c, b: _random_inputs(jd, c, b), out_dir=run_dir / "eval",
        progress=progress, batch_size=recipe.train.batch_size)
    results["recipe"] = recipe.name
    results["task"] = jd.data.task
    results["records"] = {s: int(len(ix)) for s, ix in jd.data.splits.items()}
    write_results(run_dir, results)
    return results


def evaluate_checkpoint(checkpoint: str | Path, data_folder: str | Path, *,
                        task: str = "superdiagnostic", split: str = "test",
                        bootstrap: int = 1000, seed: int = 0, level: float = 0.95,
                        batch_size: int = 64, cache_dir: str | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Evaluate a saved student on a PTB-XL-layout folder (``ecg-distill eval``).

    The student's config says what it reads (leads, rate, labels) and how its inputs are
    scaled (``normalization``, stored at training time), so any folder in the PTB-XL
    layout can be scored: the labels of ``task`` are mapped onto the student's classes,
    and decision thresholds are chosen on fold 9 (when ``split`` is "test").

    Returns:
        {"checkpoint", "data", "split", "records", "classes", metrics (as in results.json)}.

    Raises:
        ECGDistillError: not a student folder, a pickle checkpoint, or labels the data lack.
    """
    from transformers import AutoConfig, AutoModel

    import students  # noqa: F401
    from distill.data.dataset import SignalView, load_ptbxl
    from distill.core.errors import ECGDistillError
    from distill.hub.publish import require_safetensors
    from students.preprocess import scaler_from_config

    checkpoint = Path(checkpoint)
    if (checkpoint / "teacher.json").exists():
        raise ECGDistillError(f"{checkpoint}: a teacher folder; `ecg-distill eval` scores saved "
                              f"students (teachers are evaluated by `ecg-distill run`)")
    if not (checkpoint / "config.json").exists():
        raise ECGDistillError(f"{checkpoint}: no config.json; not a saved student folder")
    require_safetensors(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint, use_safetensors=True).eval()
    classes = [config.id2label[i] for i in range(config.num_labels)]
    rate = int(config.sampling_rate)
    data = load_ptbxl(data_folder, task=task, sampling_rate=100 if rate <= 100 else 500,
                      classes=classes, cache_dir=cache_dir, progress=progress)
    norm = getattr(config, "normalization", None)
    if norm:
        data.scaler = scaler_from_config(config)
    view = {"signal": SignalView(leads=tuple(config.leads), sampling_rate=rate)}
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
    return {"checkpoint": str(checkpoint), "data": str(data_folder), "split": split,
            "task": task, "records": int(len(index)), "classes": classes,
            "normalization": "stored" if norm else "fitted on this folder's train folds",
            "bootstrap": {"resamples": bootstrap, "seed": seed, "level": level}, **metrics}
