"""Scoring models on a data set's folds under the PTB-XL protocol: predictions, macro AUC
with bootstrap intervals, per-label AUC, F-max, accuracy at thresholds chosen on the
validation fold, paired differences, and each model's footprint.

:func:`evaluate_candidates` is what the evaluate and quantize stages share: every
candidate predicted once, scored on the same bootstrap resamples, measured, and compared
with its teacher, its baseline, its full recipe or its fp32 model
(:class:`distill.core.layout.ModelId` says which is which).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from distill.core.layout import ModelId
from distill.core.progress import progress_bar
from distill.metrics.classification import (bootstrap_interval, bootstrap_samples,
                                            choose_thresholds, fmax, label_aucs,
                                            paired_difference, sample_accuracy)
from distill.metrics.footprint import footprint


@dataclass
class Candidate:
    """One model to evaluate."""

    model: ModelId
    folder: Path | None  # its saved folder (None: a frozen teacher used as built)
    load: Callable[[], nn.Module]
    inputs: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]
    view: str  # the batch entry it reads (the teacher: "teacher" or the image)

    @property
    def name(self) -> str:
        return self.model.name


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


def evaluate_candidates(candidates: list[Candidate], splits: Mapping[str, Any],
                        labels: Mapping[str, np.ndarray], classes: list[str], *,
                        bootstrap: int, seed: int, level: float, repeats: int,
                        make_inputs: Callable[[Candidate, nn.Module, int],
                                              dict[str, torch.Tensor]],
                        predictions_path: Callable[[ModelId], Path], progress: bool = True,
                        batch_size: int = 64) -> dict[str, Any]:
    """Predict, score and measure every candidate; the ``results.json`` content.

    Args:
        candidates: the models.
        splits: "val" and "test" datasets carrying every candidate's view.
        labels: "val" and "test" label matrices, rows in record-position order.
        classes: label names.
        bootstrap, seed, level: the resamples and the interval level.
        repeats: timed passes per batch size.
        make_inputs: (candidate, its loaded model, batch size) -> random inputs for the
            footprint.
        predictions_path: where a model's ``predictions.npz`` is written.
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
        path = predictions_path(cand.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **preds)
        probs[cand.name] = preds
        entry = {"kind": cand.model.result_kind, "student": cand.model.student_name,
                 "folder": None if cand.folder is None else str(cand.folder),
                 **_identity(cand.model), "predictions": str(path)}
        entry.update(model_metrics(labels["test"], preds["test"], labels["val"], preds["val"],
                                   samples, level, classes))
        entry.update(footprint(model, lambda b, c=cand, m=model: make_inputs(c, m, b),
                               cand.folder, repeats=repeats))
        models[cand.name] = entry
        del model
    _differences(models, {c.name: c.model for c in candidates}, probs, labels["test"],
                 samples, level)
    return {"classes": classes, "test_records": int(len(labels["test"])),
            "bootstrap": {"resamples": bootstrap, "seed": seed, "level": level},
            "models": models}


def _identity(model: ModelId) -> dict[str, Any]:
    """The results entry's fields that name an ablation or a quantized variant's source."""
    if model.kind == "ablation":
        return {"ablation": model.variant}
    if model.quantized:
        return {"fp32": model.fp32.name, "format": model.variant}
    return {}


def _differences(models: dict[str, Any], ids: dict[str, ModelId],
                 probs: dict[str, dict[str, np.ndarray]], labels: np.ndarray,
                 samples: np.ndarray, level: float) -> None:
    """Paired macro-AUC differences: vs the teacher, vs the baseline, vs the full recipe,
    vs the fp32 model."""
    def diff(a: str, b: str) -> dict[str, float]:
        return paired_difference(labels, probs[a]["test"], probs[b]["test"], samples,
                                 level=level).to_dict()

    teacher = ModelId.teacher().name
    for name, m in models.items():
        mid = ids[name]
        if mid.kind == "teacher":
            continue
        if mid.quantized and mid.fp32.name in models:
            m["vs_fp32"] = diff(name, mid.fp32.name)
        if teacher in models:
            m["vs_teacher"] = diff(name, teacher)
        if mid.kind in ("distill", "ablation") and not mid.quantized:
            base = mid.as_kind("baseline").name
            if base in models:
                m["vs_baseline"] = diff(name, base)
        if mid.kind == "ablation":
            full = mid.as_kind("distill").name
            if full in models:
                m["vs_full"] = diff(name, full)


