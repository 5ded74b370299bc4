"""The PTB-XL benchmark on a hand-written fixture: labels derived by hand, folds, scaler,
views and the decoded-signal cache."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
import wfdb
from scipy.signal import resample_poly

from conftest import RECORDS, true_signal
from distill.core.errors import DataError
from distill.data import (
    SignalView, aggregate_labels, fold_indices, load_ptbxl, read_database, read_statements,
)

# Expected label matrices, derived by hand from conftest.RECORDS / STATEMENTS:
# task -> (classes, kept ecg_ids, rows).
EXPECTED = {
    "superdiagnostic": (
        ["CD", "HYP", "MI", "NORM", "STTC"], [1, 2, 3, 4, 5, 6, 9, 10],
        [[0, 0, 0, 1, 0],   # 1 NORM
         [0, 0, 1, 0, 0],   # 2 IMI -> MI
         [0, 0, 1, 0, 0],   # 3 ASMI, IMI -> MI (once)
         [0, 0, 0, 0, 1],   # 4 NDT -> STTC
         [1, 0, 0, 0, 0],   # 5 CLBBB -> CD
         [0, 1, 0, 0, 1],   # 6 LVH -> HYP, NDT (likelihood 0) -> STTC
         [0, 0, 0, 1, 0],   # 9 NORM
         [0, 1, 0, 0, 0]]),  # 10 LVH
    "subdiagnostic": (
        ["AMI", "CLBBB", "IMI", "LVH", "NORM", "STTC"], [1, 2, 3, 4, 5, 6, 9, 10],
        [[0, 0, 0, 0, 1, 0],
         [0, 0, 1, 0, 0, 0],
         [1, 0, 1, 0, 0, 0],
         [0, 0, 0, 0, 0, 1],
         [0, 1, 0, 0, 0, 0],
         [0, 0, 0, 1, 0, 1],
         [0, 0, 0, 0, 1, 0],
         [0, 0, 0, 1, 0, 0]]),
    "diagnostic": (
        ["ASMI", "CLBBB", "IMI", "LVH", "NDT", "NORM"], [1, 2, 3, 4, 5, 6, 9, 10],
        [[0, 0, 0, 0, 0, 1],
         [0, 0, 1, 0, 0, 0],
         [1, 0, 1, 0, 0, 0],
         [0, 0, 0, 0, 1, 0],
         [0, 1, 0, 0, 0, 0],
         [0, 0, 0, 1, 1, 0],
         [0, 0, 0, 0, 0, 1],
         [0, 0, 0, 1, 0, 0]]),
    "form": (
        ["ABQRS", "INVT", "NDT"], [2, 4, 5, 6, 8, 10],
        [[1, 0, 0],   # 2
         [0, 0, 1],   # 4
         [0, 1, 0],   # 5
         [0, 0, 1],   # 6
         [1, 0, 0],   # 8
         [1, 0, 0]]),  # 10
    "rhythm": (
        ["AFIB", "SR", "STACH"], [1, 2, 3, 4, 5, 6, 7, 9, 10],
        [[0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 0], [0, 1, 0],
         [1, 0, 0], [0, 0, 1]]),
    "all": (
        ["ABQRS", "AFIB", "ASMI", "CLBBB", "IMI", "INVT", "LVH", "NDT", "NORM", "SR", "STACH"],
        list(range(1, 11)),
        [[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],   # 1 NORM SR
         [1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],   # 2 IMI ABQRS SR
         [0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0],   # 3 ASMI IMI AFIB
         [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1],   # 4 NDT STACH
         [0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0],   # 5 CLBBB INVT SR
         [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0],   # 6 LVH NDT SR
         [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],   # 7 SR
         [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],   # 8 ABQRS
         [0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0],   # 9 NORM AFIB
         [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]]),  # 10 LVH ABQRS STACH
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_aggregation_matches_hand_derived(ptbxl_root, task):
    db, st = read_database(ptbxl_root), read_statements(ptbxl_root)
    y, classes, keep = aggregate_labels(db, st, task)
    exp_classes, exp_ids, exp_rows = EXPECTED[task]
    assert classes == exp_classes
    assert db.index[keep].tolist() == exp_ids
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.array(exp_rows, dtype=np.float32))


def test_min_samples_drops_rare_classes_like_select_data(ptbxl_root):
    db, st = read_database(ptbxl_root), read_statements(ptbxl_root)
    # CD is carried by 1 record: not > 1, so dropped, and record 5 (CD only) with it.
    y, classes, keep = aggregate_labels(db, st, "superdiagnostic", min_samples=1)
    assert classes == ["HYP", "MI", "NORM", "STTC"]
    assert db.index[keep].tolist() == [1, 2, 3, 4, 6, 9, 10]
    np.testing.assert_array_equal(y[4], [1, 0, 0, 1])  # record 6: HYP, STTC
    # AFIB and STACH have exactly 2 records each: not > 2.
    y, classes, keep = aggregate_labels(db, st, "rhythm", min_samples=2)
    assert classes == ["SR"]
    assert db.index[keep].tolist() == [1, 2, 5, 6, 7]
    # The benchmark applies no min_samples filter to "diagnostic".
    y, classes, _ = aggregate_labels(db, st, "diagnostic", min_samples=5)
    assert classes == EXPECTED["diagnostic"][0]


def test_folds_and_scaler_fitted_on_train_only(ptbxl_root, cache_dir):
    data = load_ptbxl(ptbxl_root, cache_dir=cache_dir, progress=False)
    assert data.ecg_ids.tolist() == [1, 2, 3, 4, 5, 6, 9, 10]
    assert data.strat_fold.tolist() == [1, 2, 3, 4, 5, 8, 9, 10]
    assert {k: v.tolist() for k, v in data.splits.items()} == {
        "train": [0, 1, 2, 3, 4, 5], "val": [6], "test": [7]}
    np.testing.assert_array_equal(data.labels, EXPECTED["superdiagnostic"][2])
    train = np.stack([data.signal(i) for i in range(6)]).astype(np.float64)
    everything = np.stack([data.signal(i) for i in range(8)]).astype(np.float64)
    assert data.scaler.kind == "global"
    np.testing.assert_allclose(data.scaler.mean, train.mean(), rtol=1e-9)
    np.testing.assert_allclose(data.scaler.std, train.std(), rtol=1e-9)
    assert abs(data.scaler.mean[0] - everything.mean()) > 0.05
    item = data.split("train")[2]
    expected = (data.signal(2) - train.mean()) / train.std()
    np.testing.assert_allclose(item["signal"].numpy(), expected, atol=1e-5)
    assert item["ecg_id"] == 3 and item["index"] == 2


def test_configurable_folds_and_per_lead_scaler(ptbxl_root, cache_dir):
    folds = {"train": (1, 2, 3, 4, 5), "val": (8,), "test": (9, 10)}
    data = load_ptbxl(ptbxl_root, folds=folds, scaler="per_lead", cache_dir=cache_dir,
                      progress=False)
    assert data.splits["test"].tolist() == [6, 7]
    train = np.stack([data.signal(i) for i in range(5)]).astype(np.float64)
    np.testing.assert_allclose(data.scaler.mean, train.mean(axis=(0, 2)), rtol=1e-9)
    np.testing.assert_allclose(data.scaler.std, train.std(axis=(0, 2)), rtol=1e-9)
    none = load_ptbxl(ptbxl_root, scaler="none", cache_dir=cache_dir, progress=False)
    np.testing.assert_array_equal(none.split("all")[0]["signal"].numpy(), none.signal(0))
    assert none.fingerprint != data.fingerprint


def test_fold_indices_refuses_overlap():
    with pytest.raises(DataError, match="fold 9 is in both"):
        fold_indices(np.array([1, 9, 10]), {"train": (1, 9), "val": (9,)})


def test_signals_match_written_records_in_standard_order(ptbxl_root, cache_dir):
    data = load_ptbxl(ptbxl_root, task="all", cache_dir=cache_dir, progress=False)
    assert data.signals.shape == (10, 12, 1000) and data.signals.dtype == np.float32
    assert isinstance(data.store, np.memmap)
    for i, eid in enumerate(data.ecg_ids):  # record 3 is stored with reversed leads
        np.testing.assert_allclose(data.signal(i), true_signal(int(eid), 100), atol=6e-4)


def test_views_lead_subset_and_rate_of_the_same_record(ptbxl_root, cache_dir):
    data = load_ptbxl(ptbxl_root, cache_dir=cache_dir, progress=False)
    views = {"teacher": SignalView(None, 100), "student": SignalView(("i",), 50),
             "pair": SignalView(("V6", "avr"))}
    ds = data.split("train", views)
    item = ds[1]
    assert item["teacher"].shape == (12, 1000) and item["teacher"].dtype == torch.float32
    assert item["student"].shape == (1, 500)
    assert item["pair"].shape == (2, 1000)
    assert item["labels"].tolist() == [0, 0, 1, 0, 0] and item["index"] == 1
    mean, std = data.scaler.mean[0], data.scaler.std[0]
    scaled = (data.signal(1).astype(np.float64) - mean) / std
    np.testing.assert_allclose(item["teacher"].numpy(), scaled, atol=1e-5)
    np.testing.assert_allclose(item["pair"].numpy(), scaled[[11, 3]], atol=1e-5)
    np.testing.assert_allclose(item["student"].numpy()[0], resample_poly(scaled[0], 1, 2),
                               atol=1e-4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    assert batch["student"].shape == (4, 1, 500) and batch["ecg_id"].tolist() == [1, 2, 3, 4]


def test_500hz_reads_records500_and_decimates_properly(ptbxl_root, cache_dir):
    data = load_ptbxl(ptbxl_root, sampling_rate=500, scaler="none", cache_dir=cache_dir,
                      progress=False)
    assert data.signals.shape == (8, 12, 5000)
    np.testing.assert_allclose(data.signal(0), true_signal(1, 500), atol=6e-4)
    item = data.split("all", {"s": SignalView(sampling_rate=100)})[0]
    direct = resample_poly(data.signal(0).astype(np.float64), 1, 5, axis=-1)
    assert item["s"].shape == (12, 1000)
    np.testing.assert_allclose(item["s"].numpy(), direct, atol=1e-5)
    # A 250 Hz data set is resampled from records500.
    half = load_ptbxl(ptbxl_root, sampling_rate=250, scaler="none", cache_dir=cache_dir,
                      progress=False)
    assert half.signals.shape == (8, 12, 2500)


def test_second_load_uses_cache_without_wfdb(ptbxl_root, cache_dir, monkeypatch):
    first = load_ptbxl(ptbxl_root, cache_dir=cache_dir, progress=False)

    def boom(*args, **kwargs):
        raise AssertionError("wfdb parsed again")

    monkeypatch.setattr(wfdb, "rdrecord", boom)
    monkeypatch.setattr(wfdb, "rdheader", boom)
    second = load_ptbxl(ptbxl_root, cache_dir=cache_dir, progress=False)
    np.testing.assert_array_equal(second.signals, first.signals)
    assert second.fingerprint == first.fingerprint
    # Another task shares the decoded store.
    rhythm = load_ptbxl(ptbxl_root, task="rhythm", cache_dir=cache_dir, progress=False)
    assert rhythm.classes == ["AFIB", "SR", "STACH"]
    assert rhythm.fingerprint != first.fingerprint


def test_touching_a_record_changes_fingerprint_and_rebuilds(ptbxl_root, cache_dir, monkeypatch):
    first = load_ptbxl(ptbxl_root, cache_dir=cache_dir, progress=False)
    dat = ptbxl_root / "records100/00000/00002_lr.dat"
    st = dat.stat()
    os.utime(dat, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    calls = []
    real = wfdb.rdrecord
    monkeypatch.setattr(wfdb, "rdrecord", lambda *a, **k: calls.append(a) or real(*a, **k))
    second = load_ptbxl(ptbxl_root, cache_dir=cache_dir, progress=False)
    assert second.fingerprint != first.fingerprint
    assert len(calls) == len(RECORDS)  # rebuilt: every record decoded again
    np.testing.assert_array_equal(second.signals, first.signals)


def _statements(rows: dict) -> pd.DataFrame:
    st = pd.DataFrame.from_dict(rows, orient="index", columns=[
        "diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"])
    st.index.name = None
    return st


def test_all_task_takes_every_listed_code_and_unclassed_codes_count_nowhere():
    """The benchmark: 'all' = the keys of scp_codes (listed in scp_statements or not); a
    diagnostic code without a (sub)class contributes nothing to (sub)diagnostic tasks."""
    st = _statements({"NORM": (1.0, None, None, "NORM", "NORM"),
                      "XDIAG": (1.0, None, None, None, None),  # diagnostic, no class
                      "SR": (None, None, 1.0, None, None)})
    db = pd.DataFrame({"scp_codes": [{"NORM": 100.0, "SR": 0.0}, {"XDIAG": 50.0},
                                     {"NEWCODE": 0.0, "SR": 0.0}]}, index=[1, 2, 3])
    y, classes, keep = aggregate_labels(db, st, "all")
    assert classes == ["NEWCODE", "NORM", "SR", "XDIAG"]
    assert keep.tolist() == [True, True, True]
    np.testing.assert_array_equal(y, [[0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 1, 0]])
    y, classes, keep = aggregate_labels(db, st, "superdiagnostic")
    assert classes == ["NORM"] and keep.tolist() == [True, False, False]
    y, classes, keep = aggregate_labels(db, st, "diagnostic")
    assert classes == ["NORM", "XDIAG"] and keep.tolist() == [True, True, False]


def test_fingerprint_follows_labels_even_when_counts_do_not_change(ptbxl_root, cache_dir):
    """Swapping two records' labels keeps every count but must change the key that image
    and teacher-output caches are keyed on."""
    before = load_ptbxl(ptbxl_root, cache_dir=cache_dir, progress=False)
    db_path = ptbxl_root / "ptbxl_database.csv"
    db = pd.read_csv(db_path)
    a, b = db.index[db.ecg_id == 2][0], db.index[db.ecg_id == 5][0]
    db.loc[[a, b], "scp_codes"] = db.loc[[b, a], "scp_codes"].to_numpy()
    db.to_csv(db_path, index=False)
    after = load_ptbxl(ptbxl_root, cache_dir=cache_dir, progress=False)
    assert after.labels.sum(axis=0).tolist() == before.labels.sum(axis=0).tolist()
    assert after.fingerprint != before.fingerprint
