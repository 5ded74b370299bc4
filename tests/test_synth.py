"""Tests of the synthetic PTB-XL generator: layout, exact lead algebra, physiology, metadata.

Pathologies are checked with small signal detectors written here (band-passed spatial
velocity for R peaks and QRS width, PR-segment-referenced ST level, Sokolow-Lyon voltage),
never with the generator's own numbers, except the PR interval, which is taken from the
generator's parameters and cross-checked by locating the P wave on the signal, and the MI
stage, which PTB-XL also publishes (``infarction_stadium1``).

They measure the data the project ships: the generator's default, calibrated effect size
(``synth_physiology.EFFECT_SCALE``), at which many single records are borderline on purpose.
So each pathology is a group comparison against NORM + SR: the medians must differ in the
right direction by a stated margin AND a one-sided Mann-Whitney U test must give p < 1e-3.
Margins and p-values were checked with SEED = 0..11: the worst seed's shift is at least
1.45x the margin and its p at most 1.3e-4. Groups use different seeds: independent people.
Every physiology test runs on both generator versions (``GENERATORS``); version 2's own
properties (R-wave progression, zero-mean leads, broadband noise) are tested at the end.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb
from scipy.signal import butter, find_peaks, sosfiltfilt
from scipy.stats import mannwhitneyu

from distill.data import synth
from distill.data import synth_physiology as phys
from distill.core.leads import STANDARD_LEADS
from distill.data.synth import (
    PTBXL_COLUMNS, SCP, generate_ptbxl, synthesize, synthesize_codes, write_wfdb,
    write_wfdb_with_wfdb,
)

FS = 500
N_FILES = 40
SCP_COLUMNS = ["description", "diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass",
               "Statement Category", "SCP-ECG Statement Description", "AHA code", "aECG REFID",
               "CDISC Code", "DICOM Code"]
II, III, AVF, V1, V5, V6 = 1, 2, 5, 6, 10, 11


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ptbxl")
    generate_ptbxl(out, N_FILES, seed=3, progress=False)
    return out


# ----------------------------------------------------------------------------- detectors

def _smooth(v: np.ndarray, n: int) -> np.ndarray:
    return np.convolve(v, np.ones(n) / n, "same")


def _band(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return sosfiltfilt(butter(2, [lo, hi], "bandpass", fs=FS, output="sos"), x, axis=1)


def spatial_velocity(x: np.ndarray, lo: float = 1.0, hi: float = 40.0) -> np.ndarray:
    """|dX/dt| over all 12 leads of a band-passed [12, T] ECG, shape [T-1]."""
    return _smooth(np.sqrt((np.diff(_band(x, lo, hi), axis=1) ** 2).sum(0)), 5)


def rpeaks(x: np.ndarray) -> np.ndarray:
    """QRS locations (Pan-Tompkins-like: 5-20 Hz slope energy, 60 ms integration)."""
    e = _smooth(spatial_velocity(x, 5.0, 20.0) ** 2, int(0.06 * FS))
    peaks, _ = find_peaks(e, distance=int(0.28 * FS), height=0.3 * np.percentile(e, 99))
    return peaks


def rr_intervals(x: np.ndarray) -> np.ndarray:
    return np.diff(rpeaks(x)) / FS


def qrs_width_ms(x: np.ndarray) -> float:
    """Width of the median beat's spatial-velocity burst above 20 % of its peak."""
    v, h = spatial_velocity(x), int(0.11 * FS)
    pk = rpeaks(x)
    pk = pk[(pk > h) & (pk < len(v) - h)]
    beat = np.median(np.stack([v[p - h: p + h] for p in pk]), 0)
    base = np.median(v)
    above = np.flatnonzero(beat > base + 0.2 * (beat.max() - base))
    return float(above[-1] - above[0]) / FS * 1000


def median_beat(x: np.ndarray, before: float = 0.4, after: float = 0.5) -> np.ndarray:
    """Median of all beats aligned on their QRS, [12, (before + after) * FS]."""
    b, a = int(before * FS), int(after * FS)
    pk = rpeaks(x)
    pk = pk[(pk > b) & (pk < x.shape[1] - a)]
    return np.median(np.stack([x[:, p - b: p + a] for p in pk]), 0)


def st_level(x: np.ndarray, leads: list[int]) -> float:
    """ST level 80 ms after the QRS centre minus the PR segment, mean over ``leads``, mV."""
    beat, c = median_beat(x), int(0.4 * FS)
    pr = beat[:, c - int(0.07 * FS): c - int(0.045 * FS)].mean(1)
    st = beat[:, c + int(0.08 * FS): c + int(0.1 * FS)].mean(1)
    return float((st - pr)[leads].mean())


def sokolow_lyon(x: np.ndarray) -> float:
    """S in V1 + the larger R in V5/V6 of the median beat, mV."""
    beat, c, w = median_beat(x), int(0.4 * FS), int(0.06 * FS)
    qrs = beat[:, c - w: c + w] - beat[:, c - int(0.07 * FS): c - int(0.045 * FS)].mean(1, keepdims=True)
    return float(-qrs[V1].min() + max(qrs[V5].max(), qrs[V6].max()))


def p_height(x: np.ndarray) -> float:
    """Peak-to-peak of the median beat in II over the P-wave region, mV."""
    beat, c = median_beat(x)[II], int(0.4 * FS)
    return float(np.ptp(beat[c - int(0.3 * FS): c - int(0.06 * FS)]))


def p_lead_time(x: np.ndarray) -> float:
    """Seconds from the P-wave peak in II to the QRS centre of the median beat."""
    beat, c = median_beat(x)[II], int(0.4 * FS)
    seg = beat[c - int(0.38 * FS): c - int(0.07 * FS)]
    return (len(seg) - np.argmax(seg)) / FS + 0.07


def q_depth(x: np.ndarray) -> float:
    """How far the initial QRS in III/aVF goes below the PR segment, mV."""
    beat, c = median_beat(x), int(0.4 * FS)
    base = beat[:, c - int(0.07 * FS): c - int(0.045 * FS)].mean(1)
    return float(-(beat[[III, AVF], c - int(0.05 * FS): c].min(1) - base[[III, AVF]]).mean())


def t_to_qrs(x: np.ndarray, leads: list[int]) -> float:
    """T wave (mean of 150-400 ms after the QRS centre, minus the PR segment) over QRS
    peak-to-peak, summed over ``leads``: a T inversion measure free of the person's voltage."""
    beat, c = median_beat(x), int(0.4 * FS)
    pr = beat[:, c - int(0.07 * FS): c - int(0.045 * FS)].mean(1)
    t = beat[:, c + int(0.15 * FS): c + int(0.4 * FS)].mean(1) - pr
    qrs = np.ptp(beat[:, c - int(0.06 * FS): c + int(0.06 * FS)], 1)
    return float(t[leads].sum() / qrs[leads].sum())


def rr_cv(x: np.ndarray) -> float:
    rr = rr_intervals(x)
    return float(np.std(rr) / np.mean(rr))


# ----------------------------------------------------------------------------- groups

SEED = 0  # base seed of every group below (each adds its own offset); 0..11 all pass
NORM = {"NORM": 100.0, "SR": 0.0}
N_NORM = 80
INFERIOR, ANTERIOR, LATERAL = [II, III, AVF], [6, 7, 8, 9], [0, 4, 10, 11]  # V1-V4; I, aVL, V5, V6


GENERATORS = phys.GENERATOR_VERSIONS


def group(codes: dict[str, float], n: int, offset: int, generator: int = 1
          ) -> tuple[np.ndarray, list]:
    """``n`` ECGs with ``codes`` at the generator's default effect size, as shipped."""
    return synthesize_codes(codes, n, seed=SEED + offset, fs=FS, generator=generator)


def assert_shifted(a: list[float], b: list[float], margin: float, direction: int = 1,
                   p_max: float = 1e-3) -> None:
    """Group ``a`` lies above (``direction`` 1) or below (-1) group ``b``: its median is more
    than ``margin`` beyond b's, and a one-sided Mann-Whitney U test gives p < ``p_max``."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    shift = direction * (np.median(a_) - np.median(b_))
    p = mannwhitneyu(a_, b_, alternative="greater" if direction > 0 else "less").pvalue
    msg = (f"median shift {shift:+.4g} (need > {margin}), U-test p = {p:.2g} (need < {p_max}), "
           f"n = {len(a_)} vs {len(b_)}")
    assert shift > margin, msg
    assert p < p_max, msg


@pytest.fixture(scope="module", params=GENERATORS, ids=lambda g: f"generator{g}")
def gen(request: pytest.FixtureRequest) -> int:
    """The generator version a physiology test runs on."""
    return request.param


@pytest.fixture(scope="module")
def normal_group(gen: int) -> tuple[np.ndarray, list]:
    return group(NORM, N_NORM, 100, gen)


@pytest.fixture(scope="module")
def normal(normal_group: tuple[np.ndarray, list]) -> np.ndarray:
    return normal_group[0]


# ----------------------------------------------------------------------------- files

def test_layout_and_filenames(written: Path) -> None:
    for ecg_id, fs, suffix in ((1, 100, "lr"), (1, 500, "hr"), (N_FILES, 100, "lr")):
        base = written / f"records{fs}" / "00000" / f"{ecg_id:05d}_{suffix}"
        assert base.with_suffix(".hea").is_file() and base.with_suffix(".dat").is_file()
    db = pd.read_csv(written / "ptbxl_database.csv", index_col="ecg_id")
    assert db.loc[1, "filename_lr"] == "records100/00000/00001_lr"
    assert db.loc[1, "filename_hr"] == "records500/00000/00001_hr"
    assert synth.record_filename(1234, 500) == "records500/01000/01234_hr"


def test_record_headers_match_ptbxl(written: Path) -> None:
    for fs, n in ((100, 1000), (500, 5000)):
        rec = wfdb.rdrecord(str(written / synth.record_filename(7, fs)))
        assert rec.fs == fs and rec.sig_len == n and rec.n_sig == 12
        assert rec.sig_name == ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
        assert rec.fmt == ["16"] * 12 and rec.adc_gain == [1000.0] * 12 and rec.units == ["mV"] * 12
        assert rec.baseline == [0] * 12


@pytest.mark.parametrize("fs", [100, 500])
def test_einthoven_goldberger_exact_in_files(written: Path, fs: int) -> None:
    for ecg_id in range(1, N_FILES + 1):
        p = wfdb.rdrecord(str(written / synth.record_filename(ecg_id, fs))).p_signal
        i, ii = p[:, 0], p[:, 1]
        assert np.abs(p[:, 2] - (ii - i)).max() < 1e-6
        assert np.abs(p[:, 3] + (i + ii) / 2).max() < 1e-6
        assert np.abs(p[:, 4] - (i - ii / 2)).max() < 1e-6
        assert np.abs(p[:, 5] - (ii - i / 2)).max() < 1e-6
        assert np.abs(p).max() > 0.3  # a real signal, not zeros


def test_fast_writer_matches_wfdb_wrsamp(tmp_path: Path) -> None:
    x, _ = group(NORM, 1, 0)
    digital = np.rint(x[0].T * 1000).astype(np.int16)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_wfdb(tmp_path / "a" / "00001_hr", 500, digital)
    write_wfdb_with_wfdb(tmp_path / "b" / "00001_hr", 500, digital)
    for ext in (".hea", ".dat"):
        assert (tmp_path / "a" / f"00001_hr{ext}").read_bytes() == (tmp_path / "b" / f"00001_hr{ext}").read_bytes()


def test_100hz_is_decimated_500hz(written: Path) -> None:
    lr = wfdb.rdrecord(str(written / synth.record_filename(2, 100))).p_signal
    hr = wfdb.rdrecord(str(written / synth.record_filename(2, 500))).p_signal
    hr_low = _band(hr.T, 0.5, 30.0).T[::5]
    lr_low = sosfiltfilt(butter(2, [0.5, 30.0], "bandpass", fs=100, output="sos"), lr, axis=0)
    corr = np.corrcoef(hr_low[100:-100, 1], lr_low[100:-100, 1])[0, 1]
    assert corr > 0.98


def test_in_memory_equals_files(written: Path) -> None:
    x, meta = synthesize(N_FILES, seed=3, fs=100)
    rec = wfdb.rdrecord(str(written / synth.record_filename(5, 100))).p_signal
    assert x.shape == (N_FILES, 12, 1000) and x.dtype == np.float32
    assert np.abs(x[4].T - rec).max() < 1e-6
    db = pd.read_csv(written / "ptbxl_database.csv", index_col="ecg_id")
    assert list(db["scp_codes"]) == list(meta["scp_codes"])


def _all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_identical_bytes_different_seed_differs(written: Path, tmp_path: Path) -> None:
    generate_ptbxl(tmp_path / "again", N_FILES, seed=3, progress=False)
    generate_ptbxl(tmp_path / "other", N_FILES, seed=4, progress=False)
    ref, again, other = _all_bytes(written), _all_bytes(tmp_path / "again"), _all_bytes(tmp_path / "other")
    assert len(ref) == 2 + 4 * N_FILES
    assert ref == again
    assert ref.keys() == other.keys()
    assert ref["ptbxl_database.csv"] != other["ptbxl_database.csv"]
    assert ref["records100/00000/00001_lr.dat"] != other["records100/00000/00001_lr.dat"]


def test_single_rate_leaves_other_column_empty(tmp_path: Path) -> None:
    summary = generate_ptbxl(tmp_path, 5, seed=0, sampling_rates=(100,), progress=False)
    db = pd.read_csv(tmp_path / "ptbxl_database.csv", index_col="ecg_id")
    assert db["filename_hr"].isna().all() and db["filename_lr"].notna().all()
    assert not (tmp_path / "records500").exists()
    assert summary["records"] == 5 and summary["records_per_s"] > 0


def test_rejects_unknown_rate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sampling_rates"):
        generate_ptbxl(tmp_path, 2, sampling_rates=(250,), progress=False)


# ----------------------------------------------------------------------------- csv files

def test_database_columns_and_codes(written: Path) -> None:
    db = pd.read_csv(written / "ptbxl_database.csv", index_col="ecg_id")
    assert db.index.name == "ecg_id" and list(db.index) == list(range(1, N_FILES + 1))
    assert list(db.columns) == list(PTBXL_COLUMNS)
    assert set(db["sex"]) <= {0, 1}
    assert db["age"].between(0, 100).all() and db["age"].std() > 5
    for text in db["scp_codes"]:
        codes = ast.literal_eval(text)
        assert isinstance(codes, dict) and codes
        assert all(c in SCP and 0.0 <= v <= 100.0 for c, v in codes.items())
        rhythm = [c for c in codes if SCP[c]["rhythm"] == "1.0"]
        assert len(rhythm) == 1
        if "NORM" in codes:  # NORM excludes every other diagnostic statement
            assert [c for c in codes if SCP[c]["diagnostic"] == "1.0"] == ["NORM"]


def test_scp_statements_attributes(written: Path) -> None:
    scp = pd.read_csv(written / "scp_statements.csv", index_col=0)
    assert list(scp.columns) == SCP_COLUMNS
    expect = {"NORM": ("NORM", "NORM"), "IMI": ("MI", "IMI"), "AMI": ("MI", "AMI"), "ASMI": ("MI", "AMI"),
              "NDT": ("STTC", "STTC"), "ISC_": ("STTC", "ISC_"), "CLBBB": ("CD", "CLBBB"),
              "CRBBB": ("CD", "CRBBB"), "1AVB": ("CD", "_AVB"), "LVH": ("HYP", "LVH")}
    for code, (cls, sub) in expect.items():
        assert (scp.loc[code, "diagnostic_class"], scp.loc[code, "diagnostic_subclass"]) == (cls, sub)
        assert scp.loc[code, "diagnostic"] == 1.0
    assert scp.loc["NDT", "form"] == 1.0  # both diagnostic and form, as in PTB-XL
    for code in ("SR", "AFIB", "STACH", "SBRAD"):
        assert scp.loc[code, "rhythm"] == 1.0 and np.isnan(scp.loc[code, "diagnostic"])
    for code in ("ABQRS", "QWAVE", "STD_", "STE_", "INVT", "LVOLT", "HVOLT", "NT_"):
        assert scp.loc[code, "form"] == 1.0 and np.isnan(scp.loc[code, "diagnostic"])
    db = pd.read_csv(written / "ptbxl_database.csv", index_col="ecg_id")
    used = {c for t in db["scp_codes"] for c in ast.literal_eval(t)}
    assert used <= set(scp.index)


def test_patients_folds_and_label_balance() -> None:
    _, meta = synthesize(300, seed=11, fs=100)
    assert meta["patient_id"].nunique() < len(meta)  # some patients have several ECGs
    assert (meta.groupby("patient_id")["strat_fold"].nunique() == 1).all()
    sizes = meta["strat_fold"].value_counts()
    assert sorted(sizes.index) == list(range(1, 11))
    assert sizes.min() >= 20 and sizes.max() <= 40
    norm = meta["scp_codes"].map(lambda t: "NORM" in ast.literal_eval(t))
    per_fold = norm.groupby(meta["strat_fold"]).mean()
    assert per_fold.min() > 0.2 and per_fold.max() < 0.65
    assert 0.3 < norm.mean() < 0.55
    assert meta["recording_date"].is_monotonic_increasing


# ----------------------------------------------------------------------------- physiology

def test_bundle_branch_blocks_widen_qrs(normal: np.ndarray, gen: int) -> None:
    w_norm = [qrs_width_ms(x) for x in normal]
    for offset, code in ((200, "CLBBB"), (210, "CRBBB")):
        w = [qrs_width_ms(x) for x in group({code: 100.0, "SR": 0.0}, 24, offset, gen)[0]]
        assert_shifted(w, w_norm, 30.0)  # ms; seen +44 (CRBBB) to +79 (CLBBB)
        assert np.median(w) > 110, (code, np.median(w))  # seen 120-155 ms


def test_afib_irregular_without_p_waves(normal: np.ndarray, gen: int) -> None:
    afib = group({"NDT": 100.0, "AFIB": 0.0}, 24, 300, gen)[0]
    cv_norm, cv_afib = [rr_cv(x) for x in normal], [rr_cv(x) for x in afib]
    assert_shifted(cv_afib, cv_norm, 0.08)  # seen +0.13 to +0.17
    assert np.median(cv_afib) > 4 * np.median(cv_norm)  # seen 6.4-9.5x
    assert min(cv_afib) > max(cv_norm)  # irregularly irregular: no overlap (worst 0.064 vs 0.048)
    # No P wave: the PR-region bump of the median beat in II is small next to sinus rhythm.
    ph_norm, ph_afib = [p_height(x) for x in normal], [p_height(x) for x in afib]
    assert_shifted(ph_afib, ph_norm, 0.05, direction=-1)  # mV; seen -0.09 to -0.13
    assert np.median(ph_afib) < 0.6 * np.median(ph_norm)  # seen 0.32-0.50


def test_rate_codes_measured_from_r_peaks(normal: np.ndarray, gen: int) -> None:
    for offset, code, lo, hi in ((400, "STACH", 100, 200), (410, "SBRAD", 30, 60)):
        x, _ = group({"NORM": 100.0, code: 0.0}, 16, offset, gen)
        rates = [60 / np.median(rr_intervals(r)) for r in x]
        assert all(lo < hr < hi for hr in rates), (code, rates)
    rates = [60 / np.median(rr_intervals(r)) for r in normal]  # SR
    assert all(60 < hr < 100 for hr in rates), rates


def test_first_degree_av_block_prolongs_pr(normal_group: tuple[np.ndarray, list], gen: int) -> None:
    normal, norm_params = normal_group
    avb, params = group({"1AVB": 100.0, "SR": 0.0}, 24, 500, gen)
    assert all(p.pr > 0.2 for p in params)
    assert all(p.pr < 0.2 for p in norm_params)
    # On the signal: the P wave peak in II sits further before the QRS.
    assert_shifted([p_lead_time(x) for x in avb], [p_lead_time(x) for x in normal],
                   0.05)  # s; seen +0.076 to +0.105


def test_inferior_mi_st_elevation_and_q_waves(normal: np.ndarray, gen: int) -> None:
    imi, params = group({"IMI": 100.0, "SR": 0.0}, 120, 600, gen)
    acute = [x for x, p in zip(imi, params) if p.findings["mi_stage"] == 0]
    assert len(acute) >= 25  # stage "acute" has probability 0.35 (expect 42)
    # ST elevation in II, III, aVF belongs to the acute stage only.
    assert_shifted([st_level(x, INFERIOR) for x in acute], [st_level(x, INFERIOR) for x in normal],
                   0.025)  # mV; seen +0.042 to +0.070
    # Q waves, at every stage: the initial QRS in III/aVF goes deeper below the PR segment.
    assert_shifted([q_depth(x) for x in imi], [q_depth(x) for x in normal],
                   0.03)  # mV; seen +0.053 to +0.088


def test_anterior_mi_st_elevation_in_v1_v4(normal: np.ndarray, gen: int) -> None:
    ami, params = group({"ASMI": 100.0, "SR": 0.0}, 120, 700, gen)
    acute = [x for x, p in zip(ami, params) if p.findings["mi_stage"] == 0]
    assert len(acute) >= 25
    # Normal men have some J-point elevation in V2-V3 too, so this is the subtlest shift.
    assert_shifted([st_level(x, ANTERIOR) for x in acute], [st_level(x, ANTERIOR) for x in normal],
                   0.02)  # mV; seen +0.031 to +0.097, p <= 1.3e-4


def test_ischaemia_depresses_st_and_t(normal: np.ndarray, gen: int) -> None:
    isc = group({"ISC_": 100.0, "SR": 0.0}, 120, 800, gen)[0]
    assert_shifted([st_level(x, LATERAL) for x in isc], [st_level(x, LATERAL) for x in normal],
                   0.015, direction=-1)  # mV; seen -0.024 to -0.036
    # T flattening / inversion in the same leads, relative to each record's QRS voltage.
    assert_shifted([t_to_qrs(x, LATERAL) for x in isc], [t_to_qrs(x, LATERAL) for x in normal],
                   0.015, direction=-1)  # seen -0.035 to -0.065


def test_lvh_raises_qrs_voltage(normal: np.ndarray, gen: int) -> None:
    lvh = group({"LVH": 100.0, "SR": 0.0}, 80, 900, gen)[0]
    assert_shifted([sokolow_lyon(x) for x in lvh], [sokolow_lyon(x) for x in normal],
                   0.3)  # mV; seen +0.44 to +0.90


def test_effect_scale_grows_pathologies_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The calibration knob (benchmarks/synth_difficulty.py) scales pathologies and nothing else:
    the same seed draws the same random numbers, so records differ only in effect size."""
    default_norm = group(NORM, 4, 1000)[0]
    default_lvh = group({"LVH": 100.0, "SR": 0.0}, 8, 1010)[0]
    monkeypatch.setattr(phys, "EFFECT_SCALE", 2.5 * phys.EFFECT_SCALE)
    assert np.array_equal(group(NORM, 4, 1000)[0], default_norm)
    strong_lvh = group({"LVH": 100.0, "SR": 0.0}, 8, 1010)[0]
    gain = np.array([sokolow_lyon(s) - sokolow_lyon(d) for s, d in zip(strong_lvh, default_lvh)])
    assert (gain > 0.2).all(), gain  # mV; seen >= 0.38


def test_lead_order_is_standard() -> None:
    assert STANDARD_LEADS[:6] == ("I", "II", "III", "aVR", "aVL", "aVF")
    assert [n.lower() for n in synth.WFDB_LEAD_NAMES] == [n.lower() for n in STANDARD_LEADS]


# ----------------------------------------------------------------------------- version 2

def qrs_r_s(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per lead, the median beat's largest positive (R) and negative (S) QRS deflection
    from the PR segment, mV, each [12]."""
    beat, c, w = median_beat(x), int(0.4 * FS), int(0.06 * FS)
    qrs = beat[:, c - w: c + w] - beat[:, c - int(0.07 * FS): c - int(0.045 * FS)].mean(1, keepdims=True)
    return qrs.max(1), qrs.min(1)


@pytest.fixture(scope="module")
def normal_v2() -> np.ndarray:
    return group(NORM, 40, 1100, 2)[0]


def test_generator2_r_wave_progression(normal_v2: np.ndarray) -> None:
    """Version 2's chest leads go from S-dominant in V1 to R-dominant in V5-V6 with R
    growing from V1 to V4, as in real hearts (version 1's V3-V5 stay S-dominant)."""
    r, s = np.median(np.stack([np.stack(qrs_r_s(x)) for x in normal_v2]), 0)
    v1, v2, v3, v4, v5, v6 = range(6, 12)
    assert r[v1] + s[v1] < -0.3, (r[v1], s[v1])  # seen R 0.2, S -1.0 mV
    for v in (v5, v6):
        assert r[v] + s[v] > 0.3, (v, r[v], s[v])  # seen net +0.6 to +0.9 mV
    assert r[v1] < r[v2] < r[v3] < r[v4], r[v1:v4 + 1]
    assert r[v4] > 0.6  # real PTB-XL median 1.15 mV, version 2 about 0.9
    r1, s1 = np.median(np.stack([np.stack(qrs_r_s(x)) for x in group(NORM, 40, 1100, 1)[0]]), 0)
    assert r1[v4] + s1[v4] < 0 < r[v4] + s[v4]  # where the two versions differ most


def test_generator2_anterior_mi_loses_r_progression(normal_v2: np.ndarray) -> None:
    """An anteroseptal infarct removes the early anterior force: lower R in V2-V3."""
    ami = group({"ASMI": 100.0, "SR": 0.0}, 40, 1200, 2)[0]
    r_norm = [qrs_r_s(x)[0][7:9].mean() for x in normal_v2]
    r_ami = [qrs_r_s(x)[0][7:9].mean() for x in ami]
    assert_shifted(r_ami, r_norm, 0.05, direction=-1)


def test_generator2_zero_mean_leads_and_noise_spectrum(normal_v2: np.ndarray) -> None:
    """Each lead of a version-2 record averages zero over its 10 s (to the files' 1 uV and
    the decimation filter); its noise sits below 50 Hz as in real PTB-XL records (much more
    30-45 Hz power than version 1, less above 150 Hz)."""
    means = np.abs(normal_v2.mean(-1))
    assert means.max() < 0.01, means.max()  # mV; version 1 has wander offsets of ~0.05
    v1 = group(NORM, 40, 1100, 1)[0]

    def power(x: np.ndarray, lo: float, hi: float) -> float:
        return float(np.median((_band(x, lo, hi) ** 2).mean(-1)))

    def median_power(group_: np.ndarray, lo: float, hi: float) -> float:
        return float(np.median([power(x, lo, hi) for x in group_]))

    assert median_power(normal_v2, 30, 45) > 5 * median_power(v1, 30, 45)  # seen 17x
    assert median_power(normal_v2, 150, 240) < 0.5 * median_power(v1, 150, 240)  # seen 0.2x


def test_generator_versions_share_labels_and_refuse_unknown(tmp_path: Path) -> None:
    """Version 1 stays the default (same bytes as asked for by number); version 2 draws the
    same patients and diagnostic codes, other signals; an unknown version is refused."""
    a, meta_a = synthesize(6, seed=4, fs=100)
    b, _ = synthesize(6, seed=4, fs=100, generator=1)
    c, meta_c = synthesize(6, seed=4, fs=100, generator=2)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c, atol=0.05)
    assert list(meta_a["patient_id"]) == list(meta_c["patient_id"])
    diag = [{k for k in ast.literal_eval(v) if SCP[k]["diagnostic"] == "1.0"}
            for v in meta_a["scp_codes"]]
    assert diag == [{k for k in ast.literal_eval(v) if SCP[k]["diagnostic"] == "1.0"}
                    for v in meta_c["scp_codes"]]
    from distill.core.errors import DataError
    with pytest.raises(DataError, match="generator version 3 is not one of 1, 2"):
        synthesize(2, generator=3)
    summary = generate_ptbxl(tmp_path / "v2", 3, seed=1, sampling_rates=(100,), progress=False,
                             generator=2, workers=1)
    assert summary["generator"] == 2
    files, _ = synthesize(3, seed=1, fs=100, generator=2)
    rec = wfdb.rdsamp(str(tmp_path / "v2" / synth.record_filename(1, 100)))[0]
    np.testing.assert_allclose(rec.T, files[0], atol=1e-6)


def test_recipe_generator_names_the_folder_and_hashes_only_when_set(tmp_path: Path) -> None:
    from distill.core.schema import to_hash_dict
    from distill.data.load import synthetic_folder
    from distill.recipe import recipe_from_dict

    r1 = recipe_from_dict({"data": {"cache_dir": str(tmp_path)}})
    r2 = recipe_from_dict({"data": {"cache_dir": str(tmp_path), "synthetic": {"generator": 2}}})
    assert synthetic_folder(r1.data).name.endswith("-v1")
    assert synthetic_folder(r2.data).name.endswith("-v2")
    assert "generator" not in to_hash_dict(r1)["data"]["synthetic"]  # hashes made before it
    assert to_hash_dict(r2)["data"]["synthetic"]["generator"] == 2
    from distill.core.errors import RecipeError
    with pytest.raises(RecipeError, match="data.synthetic.generator"):
        recipe_from_dict({"data": {"synthetic": {"generator": 3}}})
