"""Image models on perturbed printouts: the test fold under every variation of
:data:`distill.data.perturb.STRESS_SET` (grid colour, line width, rotation, scale, blur,
JPEG, lighting, all of them), scored against the clean printouts.

Each perturbed test set is drawn once, with a fixed seed per variation, and every model
reads the same perturbed images; its macro AUC under a variation is scored on the same
bootstrap resamples of the test fold as the clean evaluation, with the paired difference
to its own clean score (what the variation costs the model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.core.hashing import stable_hash
from distill.core.progress import progress_bar
from distill.data.perturb import STRESS_SET, stress_images
from distill.metrics.classification import bootstrap_interval, paired_difference


def stress_seed(seed: int, name: str) -> int:
    """The seed of one variation's perturbed test set (the same for every model)."""
    return int(stable_hash({"stress": name, "seed": seed})[:8], 16)


@torch.no_grad()
def _probs(model: nn.Module, inputs: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]],
           images: np.ndarray, batch_size: int) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = {"image": torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))}
        logits = model(**{k: v.to(device) for k, v in inputs(batch).items()}).logits
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out)


def stress_scores(models: Mapping[str, Callable[[], tuple[nn.Module, Callable]]],
                  images: np.ndarray, labels: np.ndarray, samples: np.ndarray, *,
                  level: float = 0.95, seed: int = 0, batch_size: int = 64,
                  progress: bool = True) -> dict[str, Any]:
    """Every model's macro AUC on the clean and the perturbed test printouts.

    Args:
        models: name -> a loader giving (model, batch -> its keyword inputs); each model
            reads ``image``. Models are loaded one at a time (and freed).
        images: uint8 [n, 3, S, S], the clean printouts of the test fold, in label order.
        labels: [n, C] 0/1.
        samples: [R, n] bootstrap resamples (those of the clean evaluation).
        level: interval level.
        seed: the evaluation seed (each variation's seed derives from it).
        batch_size: records per forward pass.
        progress: a progress bar over the models.

    Returns:
        {"variations": {name: [kinds]}, "seeds": {name: seed}, "models": {model:
        {variation: {"macro_auc": interval, "vs_clean": paired interval (absent for
        "clean")}}}}.
    """
    seeds = {name: stress_seed(seed, name) for name in STRESS_SET}
    # every variation's printouts, drawn once: every model reads the same ones
    shown = {name: images if not kinds else stress_images(images, name, seed=seeds[name])
             for name, kinds in STRESS_SET.items()}
    out: dict[str, Any] = {"variations": {k: list(v) for k, v in STRESS_SET.items()},
                           "seeds": seeds, "models": {}}
    for model_name, load in progress_bar(list(models.items()), enabled=progress,
                                         desc="stress test", unit="model"):
        model, inputs = load()
        per: dict[str, Any] = {}
        clean = None
        for name in STRESS_SET:
            probs = _probs(model, inputs, shown[name], batch_size)
            entry = {"macro_auc": bootstrap_interval(labels, probs, samples, level=level).to_dict()}
            if clean is None:
                clean = probs  # "clean" comes first
            else:
                entry["vs_clean"] = paired_difference(labels, probs, clean, samples,
                                                      level=level).to_dict()
            per[name] = entry
        out["models"][model_name] = per
        del model
    return out
