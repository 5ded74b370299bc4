"""Shared fixtures: a hand-written PTB-XL-layout folder and the real records' location."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs the suite on one worker a core:
    # one thread each (two workers' thread pools would fight over the same cores), and
    # OpenMP threads that sleep rather than spin while they wait; set before torch loads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

REAL_ECG = Path(__file__).parent / "data" / "real-ecg"
PTBXL_LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")

# Real SCP codes with their real PTB-XL attributes (diagnostic, form, rhythm, class, subclass).
STATEMENTS = {
    "NORM": (1, None, None, "NORM", "NORM"),
    "IMI": (1, None, None, "MI", "IMI"),
    "ASMI": (1, None, None, "MI", "AMI"),
    "NDT": (1, 1, None, "STTC", "STTC"),
    "CLBBB": (1, None, None, "CD", "CLBBB"),
    "LVH": (1, None, None, "HYP", "LVH"),
    "SR": (None, None, 1, None, None),
    "AFIB": (None, None, 1, None, None),
    "STACH": (None, None, 1, None, None),
    "ABQRS": (None, 1, None, None, None),
    "INVT": (None, 1, None, None, None),
}

# ecg_id -> (scp_codes, strat_fold). Likelihood 0 entries count as positive in the benchmark.
RECORDS = {
    1: ({"NORM": 100.0, "SR": 0.0}, 1),
    2: ({"IMI": 50.0, "ABQRS": 0.0, "SR": 0.0}, 2),
    3: ({"ASMI": 100.0, "IMI": 15.0, "AFIB": 0.0}, 3),
    4: ({"NDT": 100.0, "STACH": 0.0}, 4),
    5: ({"CLBBB": 100.0, "INVT": 0.0, "SR": 0.0}, 5),
    6: ({"LVH": 50.0, "NDT": 0.0, "SR": 0.0}, 8),
    7: ({"SR": 0.0}, 9),
    8: ({"ABQRS": 0.0}, 10),
    9: ({"NORM": 80.0, "AFIB": 0.0}, 9),
    10: ({"LVH": 100.0, "ABQRS": 0.0, "STACH": 0.0}, 10),
}
# Record 3 is written with its leads in reverse order, to prove the loader reorders.
REVERSED_LEADS = {3}


def true_signal(ecg_id: int, fs: int, seconds: float = 10.0) -> np.ndarray:
    """The [12, T] mV signal the fixture writes for a record (standard lead order).

    A per-record offset (0.1 mV * ecg_id) makes the train mean differ from the all-record
    mean, so a scaler fitted on the wrong records is caught.
    """
    t = np.arange(int(seconds * fs)) / fs
    lead = np.arange(12)[:, None]
    return (0.1 * ecg_id + 0.05 * lead
            + 0.5 * np.sin(2 * np.pi * (1.0 + 0.1 * lead) * t + ecg_id))


def write_record(folder: Path, name: str, signal: np.ndarray, fs: int,
                 lead_names: tuple[str, ...] = PTBXL_LEADS) -> None:
    """Write [12, T] mV as a WFDB format-16 record (gain 1000/mV, like PTB-XL)."""
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(lead_names), sig_name=list(lead_names),
                p_signal=np.ascontiguousarray(signal.T), fmt=["16"] * len(lead_names),
                adc_gain=[1000.0] * len(lead_names), baseline=[0] * len(lead_names),
                write_dir=str(folder))


def make_ptbxl(root: Path, records: dict = RECORDS, rates: tuple[int, ...] = (100, 500)) -> Path:
    """Write a PTB-XL-layout folder: the two csv files and records100/records500."""
    root.mkdir(parents=True, exist_ok=True)
    st = pd.DataFrame.from_dict(
        STATEMENTS, orient="index",
        columns=["diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"])
    st.insert(0, "description", [f"statement {c}" for c in st.index])
    st.to_csv(root / "scp_statements.csv")
    rows = []
    for eid, (codes, fold) in records.items():
        lr, hr = f"records100/00000/{eid:05d}_lr", f"records500/00000/{eid:05d}_hr"
        rows.append({"ecg_id": eid, "patient_id": 100 + eid, "age": 40 + eid, "sex": eid % 2,
                     "scp_codes": repr(codes), "strat_fold": fold,
                     "filename_lr": lr, "filename_hr": hr})
        for fs, rel in ((100, lr), (500, hr)):
            if fs not in rates:
                continue
            sig, names = true_signal(eid, fs), PTBXL_LEADS
            if eid in REVERSED_LEADS:
                sig, names = sig[::-1], PTBXL_LEADS[::-1]
            path = root / rel
            write_record(path.parent, path.name, sig, fs, names)
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    return root


@pytest.fixture(scope="session")
def ptbxl_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture folder, written once per session (writing WFDB files is the slow part)."""
    return make_ptbxl(tmp_path_factory.mktemp("template") / "ptbxl")


@pytest.fixture
def ptbxl_root(ptbxl_template: Path, tmp_path: Path) -> Path:
    """A fresh, writable copy of the 10-record PTB-XL-layout folder (100 and 500 Hz)."""
    return Path(shutil.copytree(ptbxl_template, tmp_path / "ptbxl"))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty decoded-signal cache folder for one test."""
    return tmp_path / "cache"


@pytest.fixture
def real_ecg() -> Path:
    return REAL_ECG


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """No test reads or writes the user's ~/.cache/ecg-distill."""
    import os

    old = os.environ.get("ECG_DISTILL_CACHE")
    os.environ["ECG_DISTILL_CACHE"] = str(tmp_path_factory.mktemp("ecg-distill-cache"))
    yield
    if old is None:
        os.environ.pop("ECG_DISTILL_CACHE", None)
    else:
        os.environ["ECG_DISTILL_CACHE"] = old


def run_card_snippet(card: str, model: str, record: str, cwd: Path, after: str = "") -> dict:
    """A model card's usage snippet with its MODEL and RECORD set (and ``after`` appended),
    run in a fresh interpreter: {label: printed probability}."""
    from distill.hub.model_card import card_snippet

    code = card_snippet(card)
    assert re.search(r'^MODEL = ".*"', code, flags=re.MULTILINE)
    code = re.sub(r'^MODEL = ".*"', f"MODEL = {model!r}", code, flags=re.MULTILINE)
    code = re.sub(r'^RECORD = ".*"', f"RECORD = {record!r}", code, flags=re.MULTILINE)
    proc = subprocess.run([sys.executable, "-c", code + after], capture_output=True, text=True,
                          cwd=cwd, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {k: float(v) for k, v in (line.split() for line in proc.stdout.strip().splitlines())}
