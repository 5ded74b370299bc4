"""Metrics of multi-label ECG classifiers, as the PTB-XL benchmark reports them.

Strodthoff et al. 2021 ("Deep learning for ECG analysis: benchmarks and insights from
PTB-XL") evaluate on fold 10 with:

* macro ROC AUC over the labels (:func:`macro_auc`), with a bootstrap confidence interval
  over resampled test sets, where a resample that lacks a positive (or a negative) for a
  label that has both in the test set is drawn again (:func:`bootstrap_samples`);
* macro F-max, the sample-centred maximum F1 over decision thresholds (:func:`fmax`, as in
  CAFA protein-function prediction);
* differences between two models as *paired* bootstraps: both scored on the same resamples
  (:func:`paired_difference`), so the interval reflects the difference, not each model's
  own sampling noise.

This module also chooses per-label thresholds on the validation fold and scores
sample-wise (subset) accuracy on the test fold with them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

Metric = Callable[[np.ndarray, np.ndarray], float]


def label_aucs(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of every label; NaN for a label whose records are all positive or all
    negative (its AUC is undefined).

    Args:
        labels: [N, C] 0/1.
        scores: [N, C] scores (probabilities or logits).

    Returns:
        float64 [C].

    Raises:
        ValueError: shapes differ, or a score is NaN or infinite.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be [N, C]")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values (did training diverge?)")
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


def macro_auc_resampled(labels: np.ndarray, scores: np.ndarray, samples: np.ndarray
                        ) -> np.ndarray:
    """:func:`macro_auc` of every resample at once (the Mann-Whitney form of the AUC).

    AUC_c = (Σ ranks of the positives − P(P+1)/2) / (P·Q), ranks averaged over ties,
    which is exactly what ``roc_auc_score`` computes, batched over the resamples.

    Args:
        labels: [N, C] 0/1; scores: [N, C].
        samples: int [B, N] resample indices.

    Returns:
        float64 [B]: the macro AUC of each resample over the labels with both classes in it.
    """
    from scipy.stats import rankdata

    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    samples = np.asarray(samples)
    aucs = np.full((len(samples), labels.shape[1]), np.nan)
    for c in range(labels.shape[1]):
        y = labels[samples, c]  # (B, N)
        ranks = rankdata(scores[samples, c], axis=1)  # (B, N), ties averaged
        pos = y.sum(1).astype(np.float64)
        neg = y.shape[1] - pos
        ok = (pos > 0) & (neg > 0)
        u = (ranks * y).sum(1) - pos * (pos + 1) / 2
        aucs[ok, c] = u[ok] / (pos[ok] * neg[ok])
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(aucs).any(1), np.nanmean(np.where(np.isfinite(aucs), aucs,
                                                                      np.nan), axis=1), np.nan)


def fmax(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | None = None) -> float:
    """Macro F-max (sample-centred, CAFA style), as in the PTB-XL benchmark.

    For a threshold t, precision is averaged over the records with at least one label
    predicted (score >= t) and recall over all records with at least one true label;
    F(t) is their harmonic mean, and F-max its maximum over t.

    Args:
        labels: [N, C] 0/1.
        scores: [N, C] probabilities in [0, 1].
        thresholds: the t tried (default 0.00, 0.01, ..., 1.00).

    Returns:
        F-max in [0, 1].
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    ts = np.linspace(0.0, 1.0, 101) if thresholds is None else np.asarray(thresholds)
    has_true = labels.sum(1) > 0  # (N,)
    best = 0.0
    for t in ts:
        pred = scores >= t  # (N, C)
        tp = (pred & labels).sum(1)  # (N,)
        n_pred = pred.sum(1)
        covered = n_pred > 0
        if not covered.any() or not has_true.any():
            continue
        precision = (tp[covered] / n_pred[covered]).mean()
        recall = (tp[has_true] / labels[has_true].sum(1)).mean()
        if precision + recall > 0:
            best = max(best, 2 * precision * recall / (precision + recall))
    return float(best)


def choose_thresholds(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-label decision thresholds that maximise the label's F1 on (validation) data.

    Candidates are the observed scores; a label without positives keeps 0.5.

    Returns:
        float64 [C].
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    out = np.full(labels.shape[1], 0.5)
    for c in range(labels.shape[1]):
        y = labels[:, c]
        if not y.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        s, yy = scores[order, c], y[order]
        tp = np.cumsum(yy)  # predicting the top k positive
        k = np.arange(1, len(s) + 1)
        f1 = 2 * tp / (k + y.sum())
        last = np.r_[s[1:] != s[:-1], True]  # only cut between distinct scores
        f1 = np.where(last, f1, -1)
        out[c] = s[int(np.argmax(f1))]
    return out


def sample_accuracy(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> float:
    """Sample-wise (subset) accuracy: the share of records whose every label is right
    when label c is predicted where score >= thresholds[c]."""
    pred = np.asarray(scores) >= np.asarray(thresholds)[None, :]
    return float(accuracy_score(np.asarray(labels, dtype=bool), pred))


def bootstrap_samples(labels: np.ndarray, n: int, seed: int, max_tries: int = 1000
                      ) -> np.ndarray:
    """``n`` bootstrap resamples of the records (indices drawn with replacement).

    A resample in which a label that has both classes in ``labels`` lacks a positive or a
    negative is drawn again, so every resample scores the same labels.

    Args:
        labels: [N, C] 0/1 of the evaluated records.
        n: number of resamples.
        seed: numpy seed.
        max_tries: redraws allowed per resample before giving up.

    Returns:
        int64 [n, N].

    Raises:
        ValueError: a valid resample could not be drawn (a label with almost no positives).
    """
    labels = np.asarray(labels, dtype=bool)
    count = len(labels)
    scored = (labels.sum(0) > 0) & (labels.sum(0) < count)  # (C,)
    rng = np.random.default_rng(seed)
    out = np.empty((n, count), dtype=np.int64)
    for b in range(n):
        for _ in range(max_tries):
            idx = rng.integers(0, count, count)
            pos = labels[idx][:, scored].sum(0)
            if ((pos > 0) & (pos < count)).all():
                out[b] = idx
                break
        else:
            raise ValueError(f"bootstrap: no resample in {max_tries} draws has every label's "
                             f"positives and negatives; the test set is too small")
    return out


@dataclass(frozen=True)
class Interval:
    """A point estimate on the whole test set and a percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _interval(value: float, draws: np.ndarray, level: float) -> Interval:
    alpha = (1.0 - level) / 2
    lo, hi = np.nanquantile(draws, [alpha, 1 - alpha])
    return Interval(float(value), float(lo), float(hi))


def _draws(labels: np.ndarray, scores: np.ndarray, samples: np.ndarray,
           metric: Metric) -> np.ndarray:
    if metric is macro_auc:
        label_aucs(labels, scores)  # the same input checks
        return macro_auc_resampled(labels, scores, samples)
    return np.array([metric(labels[idx], scores[idx]) for idx in samples])


def bootstrap_interval(labels: np.ndarray, scores: np.ndarray, samples: np.ndarray,
                       metric: Metric = macro_auc, level: float = 0.95) -> Interval:
    """``metric`` on all records with its percentile bootstrap interval over ``samples``."""
    return _interval(metric(labels, scores), _draws(labels, scores, samples, metric), level)


def paired_difference(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                      samples: np.ndarray, metric: Metric = macro_auc,
                      level: float = 0.95) -> Interval:
    """metric(a) - metric(b), both scored on the same resamples (a paired bootstrap)."""
    draws = _draws(labels, scores_a, samples, metric) - _draws(labels, scores_b, samples, metric)
    value = metric(labels, scores_a) - metric(labels, scores_b)
    return _interval(value, draws, level)


def over_seeds(labels: np.ndarray, scores_a: Sequence[np.ndarray],
               scores_b: Sequence[np.ndarray] | None, samples: np.ndarray, *, seed: int = 0,
               level: float = 0.95) -> Interval:
    """Macro AUC of a model trained with several seeds (``scores_a``: one score matrix per
    seed), or the paired difference a − b (``scores_b``, the same seeds in the same order),
    with one interval for both sources of variation.

    The value is the mean over seeds on all records. Each draw takes one bootstrap
    resample of the test records (``samples``, shared by every model) and a resample of
    the seeds, with replacement, and averages the per-seed values of that test resample
    over the drawn seeds (a two-level bootstrap: training randomness and test sampling
    together); the interval is the percentile interval of the draws.
    """
    n = len(scores_a)
    if n < 1 or (scores_b is not None and len(scores_b) != n):
        raise ValueError(f"over_seeds: {n} seed(s) for a, "
                         f"{None if scores_b is None else len(scores_b)} for b")
    per_seed = np.stack([_draws(labels, s, samples, macro_auc) for s in scores_a])  # (S, B)
    value = float(np.mean([macro_auc(labels, s) for s in scores_a]))
    if scores_b is not None:
        per_seed = per_seed - np.stack([_draws(labels, s, samples, macro_auc)
                                        for s in scores_b])
        value -= float(np.mean([macro_auc(labels, s) for s in scores_b]))
    rng = np.random.default_rng([seed, 1])  # not the stream of the test resamples
    picks = rng.integers(0, n, size=(per_seed.shape[1], n))  # (B, S): seeds drawn per resample
    draws = per_seed[picks, np.arange(per_seed.shape[1])[:, None]].mean(axis=1)
    return _interval(value, draws, level)
