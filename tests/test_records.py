"""The signal path on real records: PTB-XL (.dat, 100 Hz) and CinC 2021 (.mat, 500 Hz)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import wfdb
from scipy.signal import resample_poly

from distill.data import (
    STANDARD_LEADS, load_cinc, parse_comments, read_record, resample, scan_folder,
)
from distill.data.cinc import hash_folds, label_matrix

PTBXL_ORDER = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def test_ptbxl_record_shape_order_units(real_ecg):
    path = real_ecg / "ptbxl-100hz" / "00001_lr"
    rec = read_record(path)
    assert rec.signal.shape == (12, 1000) and rec.signal.dtype == np.float32
    assert rec.fs == 100.0 and rec.lead_names == STANDARD_LEADS
    raw = wfdb.rdrecord(str(path))
    assert raw.sig_name == PTBXL_ORDER
    # Plausible millivolts: an ECG spans about a millivolt, never tens of them.
    assert 0.3 < np.ptp(rec.signal[1]) < 10 and np.abs(rec.signal).max() < 10
    for lead in ("I", "aVR", "aVF", "V6"):
        src = [n.lower() for n in raw.sig_name].index(lead.lower())
        dst = STANDARD_LEADS.index(lead)
        np.testing.assert_allclose(rec.signal[dst, :50], raw.p_signal[:50, src], atol=1e-6)
    # Einthoven: III = II - I within the 1 µV quantisation (and rounding of both leads).
    np.testing.assert_allclose(rec.signal[2], rec.signal[1] - rec.signal[0], atol=3e-3)


def test_cinc_mat_record_reads_and_resamples(real_ecg):
    path = real_ecg / "cinc2021-ptbxl-500hz" / "HR06000"
    native = read_record(path)
    assert native.signal.shape == (12, 5000) and native.fs == 500.0
    raw = wfdb.rdrecord(str(path))
    assert raw.units[0] == "mv"
    np.testing.assert_allclose(native.signal[3, 100:120], raw.p_signal[100:120, 3], atol=1e-6)
    down = read_record(path, fs=100)
    assert down.signal.shape == (12, 1000) and down.fs == 100.0
    direct = resample_poly(raw.p_signal.T.astype(np.float64), 1, 5, axis=-1)
    np.testing.assert_allclose(down.signal, direct, atol=1e-5)
    assert "Dx: 164934002,426783006" in down.comments


def test_resample_ratios():
    x = np.random.default_rng(0).normal(size=(2, 5000))
    assert resample(x, 500, 500).dtype == np.float32
    assert resample(x, 500, 100).shape == (2, 1000)
    assert resample(x, 500, 257).shape == (2, math.ceil(5000 * 257 / 500))
    # A 60 Hz tone at 500 Hz is above the 50 Hz Nyquist of 100 Hz: removed, not aliased.
    t = np.arange(5000) / 500
    tone = resample(np.sin(2 * np.pi * 60 * t), 500, 100)
    assert np.abs(tone[50:-50]).max() < 0.05


def test_cinc_header_parsing(real_ecg):
    out = parse_comments(["# Age: 59", "# Sex: Female", "# Dx: 164934002,426783006,164934002"])
    assert out == {"dx": ["164934002", "426783006"], "age": 59.0, "sex": "Female"}
    unknown = parse_comments(["Age: Unknown", "Sex: Unknown"])
    assert math.isnan(unknown["age"]) and unknown["sex"] == "" and unknown["dx"] == []
    table = scan_folder(real_ecg)
    assert table["path"].tolist() == [f"cinc2021-ptbxl-500hz/HR0600{i}" for i in range(4)] + [
        "ptbxl-100hz/00001_lr"]
    assert table["dx"].tolist()[:4] == [["164934002", "426783006"], ["426783006", "55930002"],
                                        ["426177001", "426783006", "713426002"],
                                        ["426783006", "427084000"]]
    assert table["age"].tolist()[:4] == [59.0, 78.0, 29.0, 46.0]
    assert table["sex"].tolist()[:4] == ["Female", "Female", "Male", "Female"]


def test_label_matrix_and_hash_folds():
    y, classes = label_matrix([["b", "a"], ["c"]], None)
    assert classes == ["a", "b", "c"]
    np.testing.assert_array_equal(y, [[1, 1, 0], [0, 0, 1]])
    y, classes = label_matrix([["b", "a"], ["c"]], ["c", "a"])
    np.testing.assert_array_equal(y, [[0, 1], [1, 0]])
    folds = hash_folds(["HR06000", "HR06001", "HR06000"])
    assert folds[0] == folds[2] and all(1 <= f <= 10 for f in folds)


def test_load_cinc_folder(real_ecg, cache_dir):
    folder = real_ecg / "cinc2021-ptbxl-500hz"
    data = load_cinc(folder, sampling_rate=100, folds={"train": range(1, 11)},
                     cache_dir=cache_dir, progress=False)
    assert data.signals.shape == (4, 12, 1000)
    assert data.classes == ["164934002", "426177001", "426783006", "427084000", "55930002",
                            "713426002"]
    np.testing.assert_array_equal(data.labels, [[1, 0, 1, 0, 0, 0], [0, 0, 1, 0, 1, 0],
                                                [0, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0]])
    direct = resample_poly(wfdb.rdrecord(str(folder / "HR06002")).p_signal.T, 1, 5, axis=-1)
    np.testing.assert_allclose(data.signal(2), direct, atol=1e-5)
    assert data.record_names[2] == "HR06002" and data.task == "snomed"
    assert data.split("train")[3]["signal"].shape == (12, 1000)
    fixed = load_cinc(folder, classes=["426783006", "427084000"], scaler="none",
                      cache_dir=cache_dir, progress=False)
    np.testing.assert_array_equal(fixed.labels, [[1, 0], [1, 0], [1, 0], [1, 1]])


@pytest.mark.parametrize("rate", [100, 50])
def test_ptbxl_record_at_other_rates(real_ecg, rate):
    rec = read_record(real_ecg / "ptbxl-100hz" / "00001_lr", fs=rate)
    assert rec.signal.shape == (12, 10 * rate)
