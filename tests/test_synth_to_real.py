"""The realism score's building blocks (distill.metrics.realism), on hand-made signals."""

from __future__ import annotations

import numpy as np
import pytest

from distill.metrics.realism import (LEAD_FEATURES, RECORD_FEATURES, auc_interval,
                                     ecg_features, feature_names, lead_columns, r_peaks,
                                     realism_auc, single_feature_auc)

RATE = 100


def pulse_train(bpm: float, amplitude: float = 1.0, noise: float = 0.0, seed: int = 0
                ) -> np.ndarray:
    """[12, 1000] mV: a narrow Gaussian 'QRS' every 60/bpm s on every lead (lead aVF at
    ``amplitude``, lead I at half of it), plus white noise."""
    t = np.arange(10 * RATE) / RATE
    beats = np.arange(0.4, 10.0, 60.0 / bpm)
    wave = sum(np.exp(-0.5 * ((t - b) / 0.015) ** 2) for b in beats)
    x = np.tile(wave * amplitude, (12, 1))
    x[0] *= 0.5
    return x + np.random.default_rng(seed).normal(0, noise, x.shape)


@pytest.mark.parametrize("bpm", [50, 75, 120])
def test_r_peaks_and_heart_rate(bpm):
    x = pulse_train(bpm, noise=0.01)
    peaks = r_peaks(x, RATE)
    expected = np.arange(0.4, 10.0, 60.0 / bpm)
    assert len(peaks) == len(expected)
    assert np.abs(peaks / RATE - expected).max() <= 0.02
    f = ecg_features([x], RATE)[0]
    names = feature_names()
    assert f[names.index("heart_rate")] == pytest.approx(bpm, rel=0.03)
    assert f[names.index("rr_cv")] < 0.03


def test_features_shape_amplitude_and_axis():
    x = pulse_train(70, amplitude=2.0)
    f = ecg_features([x, x], RATE)
    names = feature_names()
    assert f.shape == (2, 12 * len(LEAD_FEATURES) + len(RECORD_FEATURES)) == (2, len(names))
    assert f[0, names.index("aVF_R")] == pytest.approx(2.0, rel=0.05)
    assert f[0, names.index("I_R")] == pytest.approx(1.0, rel=0.05)
    # net QRS: I = 1, aVF = 2 -> atan2(2, 1)
    assert f[0, names.index("qrs_axis")] == pytest.approx(np.degrees(np.arctan2(2, 1)), abs=2)
    assert len(lead_columns("V1")) == len(LEAD_FEATURES)
    assert all(names[j].startswith("V1_") for j in lead_columns("V1"))


def test_realism_auc_separates_only_what_differs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (300, 4)), rng.normal(0, 1, (300, 4))
    same, _, _ = realism_auc(a[:200], b[:200], a[200:], b[200:])
    assert 0.35 < same < 0.65
    shifted = b + np.array([3.0, 0, 0, 0])
    far, s_real, s_syn = realism_auc(a[:200], shifted[:200], a[200:], shifted[200:])
    assert far > 0.95
    value, low, high = auc_interval(s_real, s_syn, n=200)
    assert low <= value <= high and value == pytest.approx(far)
    single = single_feature_auc(a, shifted)
    assert single[0] < 0.05 and abs(single[1] - 0.5) < 0.1
