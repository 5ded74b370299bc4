"""Metrics of multi-label ECG classifiers (PTB-XL benchmark protocol).

So far the validation metrics the training loop selects checkpoints by; the test-fold
evaluation with bootstrap intervals builds on these.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def label_aucs(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of every label; NaN for a label whose records are all positive or all
    negative (its AUC is undefined).

    Args:
        labels: [N, C] 0/1.
        scores: [N, C] scores (probabilities or logits).

    Returns:
        float64 [C].
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be [N, C]")
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        if 0 < labels[:, c].sum() < len(labels):
            out[c] = roc_auc_score(labels[:, c], scores[:, c])
    return out


def macro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro ROC AUC over the labels that have both classes (scikit-learn's ``macro``
    average when every label does); NaN when none does."""
    aucs = label_aucs(labels, scores)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
