"""How real does a data set look? Simple per-record ECG features and a real-vs-synthetic
classifier's held-out AUC (0.5: indistinguishable by these features).

:func:`ecg_features` measures, on unscaled signals in mV, what a generator controls cheaply:
amplitudes (QRS R and S, T wave, robust peak-to-peak), baseline wander and noise (power in
frequency bands), heart rate and its variability (R peaks found on all leads together) and
the frontal QRS axis. :func:`realism_auc` trains a gradient-boosted classifier to tell the
two sets' training records apart and scores it on held-out records of each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import signal as sps

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# per-lead features (name suffixes), each measured on every lead
LEAD_FEATURES = ("p2p", "std", "offset", "R", "S", "QRS_net", "T", "band_0-0.7Hz",
                 "band_0.7-5Hz", "band_5-15Hz", "band_15-30Hz", "band_30-50Hz")
RECORD_FEATURES = ("heart_rate", "rr_cv", "beats_found", "qrs_axis")
BANDS = ((0.0, 0.7), (0.7, 5.0), (5.0, 15.0), (15.0, 30.0), (30.0, 50.0))


def feature_names() -> list[str]:
    """The columns of :func:`ecg_features`: ``<lead>_<feature>`` lead by lead, then the
    record-level ones."""
    return [f"{lead}_{f}" for lead in LEADS for f in LEAD_FEATURES] + list(RECORD_FEATURES)


def r_peaks(x: np.ndarray, rate: int) -> np.ndarray:
    """R-peak sample positions of one record ``x`` [12, T] (mV): peaks of the summed
    absolute slope of the 5-15 Hz band of every lead, at least 0.3 s apart."""
    b, a = sps.butter(2, [5.0 / (rate / 2), min(15.0 / (rate / 2), 0.99)], btype="band")
    energy = np.abs(np.diff(sps.filtfilt(b, a, x, axis=-1), axis=-1)).sum(0)
    energy = np.convolve(energy, np.ones(max(1, rate // 20)) / max(1, rate // 20), "same")
    peaks, _ = sps.find_peaks(energy, distance=int(0.3 * rate),
                              height=0.35 * np.percentile(energy, 99))
    # the R peak: the largest absolute deflection (summed over leads) within 50 ms
    half = max(1, int(0.05 * rate))
    mag = np.abs(x - np.median(x, axis=-1, keepdims=True)).sum(0)
    out = [p - half + int(np.argmax(mag[max(0, p - half):p + half + 1])) if p >= half
           else int(np.argmax(mag[:p + half + 1])) for p in peaks]
    return np.unique(np.asarray(out, dtype=np.int64))


def record_features(x: np.ndarray, rate: int) -> np.ndarray:
    """The feature vector of one record ``x`` [12, T] (mV); order :func:`feature_names`."""
    x = np.asarray(x, dtype=np.float64)
    base = np.median(x, axis=-1, keepdims=True)
    c = x - base
    peaks = r_peaks(x, rate)
    q = max(1, int(0.06 * rate))  # QRS window: +-60 ms around R
    t0, t1 = int(0.15 * rate), int(0.40 * rate)  # T wave: 150-400 ms after R
    inner = peaks[(peaks >= q) & (peaks + t1 < x.shape[-1])]
    if len(inner):
        qrs = np.stack([c[:, p - q:p + q + 1] for p in inner])  # [B, 12, W]
        r_amp = np.median(qrs.max(-1), 0)
        s_amp = np.median(qrs.min(-1), 0)
        tw = np.stack([c[:, p + t0:p + t1] for p in inner])
        t_amp = np.median(np.take_along_axis(tw, np.abs(tw).argmax(-1)[..., None], -1)[..., 0], 0)
    else:
        r_amp = s_amp = t_amp = np.full(12, np.nan)
    freqs, power = sps.welch(x, fs=rate, nperseg=min(256, x.shape[-1]), axis=-1)
    bands = np.stack([np.log10(power[:, (freqs >= lo) & (freqs < hi)].sum(-1) + 1e-12)
                      for lo, hi in BANDS], 1)  # [12, 5]
    lo, hi = np.percentile(x, [1, 99], axis=-1)
    per_lead = np.column_stack([hi - lo, x.std(-1), base[:, 0], r_amp, s_amp, r_amp + s_amp,
                                t_amp, bands])  # [12, F]
    rr = np.diff(peaks) / rate
    hr = 60.0 / np.median(rr) if len(rr) else np.nan
    rr_cv = rr.std() / rr.mean() if len(rr) > 1 else np.nan
    axis = np.degrees(np.arctan2(r_amp[5] + s_amp[5], r_amp[0] + s_amp[0]))
    return np.concatenate([per_lead.ravel(), [hr, rr_cv, len(peaks), axis]])


def ecg_features(signals: np.ndarray | Sequence[np.ndarray], rate: int) -> np.ndarray:
    """Features [N, 12 * len(LEAD_FEATURES) + len(RECORD_FEATURES)] of records [N, 12, T]
    in mV (unscaled); NaN where a record has no measurable beat."""
    return np.stack([record_features(np.asarray(s), rate) for s in signals])


def lead_columns(lead: str) -> list[int]:
    """The columns of :func:`ecg_features` measured on ``lead`` alone."""
    names = feature_names()
    return [i for i, n in enumerate(names) if n.startswith(f"{lead}_")]


def realism_auc(real_train: np.ndarray, synth_train: np.ndarray, real_test: np.ndarray,
                synth_test: np.ndarray, seed: int = 0):
    """Train a classifier (gradient-boosted trees, classes weighted equally) to tell real
    (1) from synthetic (0) feature rows; -> (held-out AUC, scores of real_test, scores of
    synth_test). 0.5: the features cannot tell the held-out records apart; 1.0: always."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    x = np.concatenate([real_train, synth_train])
    y = np.concatenate([np.ones(len(real_train)), np.zeros(len(synth_train))])
    clf = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                         class_weight="balanced", random_state=seed)
    clf.fit(x, y)
    s_real = clf.predict_proba(real_test)[:, 1]
    s_syn = clf.predict_proba(synth_test)[:, 1]
    auc = roc_auc_score(np.r_[np.ones(len(s_real)), np.zeros(len(s_syn))], np.r_[s_real, s_syn])
    return float(auc), s_real, s_syn


def auc_interval(s_real: np.ndarray, s_syn: np.ndarray, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """AUC of real-vs-synthetic scores with a percentile bootstrap interval (each group
    resampled on its own): (value, low, high)."""
    from sklearn.metrics import roc_auc_score

    def auc(a: np.ndarray, b: np.ndarray) -> float:
        return float(roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b]))

    rng = np.random.default_rng(seed)
    draws = [auc(rng.choice(s_real, len(s_real)), rng.choice(s_syn, len(s_syn)))
             for _ in range(n)]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    return auc(s_real, s_syn), float(lo), float(hi)


def single_feature_auc(real: np.ndarray, synth: np.ndarray) -> np.ndarray:
    """Per column, the AUC of the raw feature value for real (1) vs synthetic (0) (NaNs
    left out): > 0.5 real larger, < 0.5 synthetic larger."""
    from scipy.stats import mannwhitneyu

    out = np.full(real.shape[1], np.nan)
    for j in range(real.shape[1]):
        a, b = real[:, j], synth[:, j]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if len(a) and len(b):
            out[j] = mannwhitneyu(a, b).statistic / (len(a) * len(b))
    return out
