"""Signal fidelity of a codec or a translator: PRD, Pearson correlation, codebook usage.

PRD here is the mean-removed percentage root-mean-square difference (PRDN),
``100 * sqrt(sum((x - y)^2) / sum((x - mean(x))^2))``, per lead of a record: unlike the
plain PRD it does not flatter a signal far from zero, and a global affine scaling of the
record (the data's scaler) leaves it unchanged. Its clinical bands (Zigel, Cohen and Katz,
IEEE Trans. Biomed. Eng. 2000): 0-2% "very good", 2-9% "good" reconstruction.
"""

from __future__ import annotations

import numpy as np

from distill.metrics.classification import Interval

PRD_BANDS: dict[str, tuple[float, float]] = {"very good": (0.0, 2.0), "good": (2.0, 9.0)}


def _pairs(reference: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(estimate, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"reference {list(x.shape)} and estimate {list(y.shape)} differ in shape")
    return x, y


def prd(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Mean-removed PRD in % over the last axis ([..., T] -> [...]); NaN for a flat
    reference."""
    x, y = _pairs(reference, estimate)
    centred = x - x.mean(axis=-1, keepdims=True)
    power = (centred ** 2).sum(axis=-1)
    err = ((x - y) ** 2).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(power > 0, 100.0 * np.sqrt(err / power), np.nan)


def pearson(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Pearson correlation over the last axis ([..., T] -> [...]); NaN where either is
    flat."""
    x, y = _pairs(reference, estimate)
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc ** 2).sum(axis=-1) * (yc ** 2).sum(axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=-1) / den, np.nan)


def codebook_usage(codes: np.ndarray, codebook_size: int) -> list[dict[str, float]]:
    """Per codebook (the last axis of ``codes`` [..., K]): perplexity (exp of the entropy of
    the code frequencies, in codes: ``codebook_size`` when all are used evenly, 1 when one
    code takes everything), codes used and dead codes (never chosen)."""
    flat = np.asarray(codes).reshape(-1, np.asarray(codes).shape[-1])
    out = []
    for k in range(flat.shape[1]):
        counts = np.bincount(flat[:, k], minlength=codebook_size).astype(np.float64)
        p = counts / max(counts.sum(), 1.0)
        nz = p[p > 0]
        out.append({"perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
                    "used": int((counts > 0).sum()), "dead": int((counts == 0).sum())})
    return out


def mean_interval(values: np.ndarray, *, resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> Interval:
    """The mean of per-record ``values`` [n] (NaN ignored) with a percentile bootstrap
    interval over records."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = np.array([np.nanmean(v[rng.integers(0, len(v), len(v))])
                      for _ in range(resamples)]) if len(v) else np.array([np.nan])
    alpha = (1.0 - level) / 2
    lo, hi = np.nanquantile(draws, [alpha, 1 - alpha])
    return Interval(float(np.nanmean(v)) if len(v) else float("nan"), float(lo), float(hi))


def paired_mean_difference(a: np.ndarray, b: np.ndarray, **kwargs: float) -> Interval:
    """mean(a - b) over records, both measured on the same records, with its interval
    (:func:`mean_interval` of the per-record differences)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values of different shapes: {list(a.shape)} and {list(b.shape)}")
    return mean_interval(a - b, **kwargs)
