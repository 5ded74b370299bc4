"""Synthetic PTB-XL: labels, metadata, WFDB files and ``ptbxl_database.csv``.

``generate_ptbxl`` writes the real PTB-XL layout (``ptbxl_database.csv``,
``scp_statements.csv``, ``records100/``, ``records500/``) so a PTB-XL loader reads it
unchanged; ``synthesize`` returns the same signals in memory. The physiology (cardiac dipole,
pathologies, noise) lives in ``synth_physiology``.

Codes, their columns and attributes follow PTB-XL's ``scp_statements.csv`` (Wagner et al.
2020), so PTB-XL's aggregation (``diagnostic_class`` -> NORM, MI, STTC, CD, HYP) applies
unchanged. Prevalences roughly follow PTB-XL: NORM 44 %, MI 25 %, STTC 24 %, CD 22 %,
HYP 12 %, with co-occurrence (MI+STTC, LVH+STTC, AFIB with CD/HYP).
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import firwin, upfirdn
from distill.core.progress import progress_bar

from distill.data import synth_physiology as phys
from distill.data.parallel import chunk_ranges, chunk_size, data_workers, map_chunks
from distill.core.errors import DataError

# Rows of PTB-XL's scp_statements.csv for every code the generator can emit.
SCP_STATEMENTS_CSV = """\
,description,diagnostic,form,rhythm,diagnostic_class,diagnostic_subclass,Statement Category,SCP-ECG Statement Description,AHA code,aECG REFID,CDISC Code,DICOM Code
NDT,non-diagnostic T abnormalities,1.0,1.0,,STTC,STTC,other ST-T descriptive statements,non-diagnostic T abnormalities,,,,
NST_,non-specific ST changes,1.0,1.0,,STTC,NST_,Basic roots for coding ST-T changes and abnormalities,non-specific ST changes,145,MDC_ECG_RHY_STHILOST,,
LNGQT,long QT-interval,1.0,1.0,,STTC,STTC,other ST-T descriptive statements,long QT-interval,148,,,
NORM,normal ECG,1.0,,,NORM,NORM,Normal/abnormal,normal ECG,1,,,F-000B7
IMI,inferior myocardial infarction,1.0,,,MI,IMI,Myocardial Infarction,inferior myocardial infarction,161,,,
ASMI,anteroseptal myocardial infarction,1.0,,,MI,AMI,Myocardial Infarction,anteroseptal myocardial infarction,165,,,
LVH,left ventricular hypertrophy,1.0,,,HYP,LVH,Ventricular Hypertrophy,left ventricular hypertrophy,142,,C71076,
LAFB,left anterior fascicular block,1.0,,,CD,LAFB/LPFB,Intraventricular and intra-atrial Conduction disturbances,left anterior fascicular block,101,MDC_ECG_BEAT_BLK_ANT_L_HEMI,C62267,D3-33140
ISC_,non-specific ischemic,1.0,,,STTC,ISC_,Basic roots for coding ST-T changes and abnormalities,ischemic ST-T changes,226,,,
IRBBB,incomplete right bundle branch block,1.0,,,CD,IRBBB,Intraventricular and intra-atrial Conduction disturbances,incomplete right bundle branch block,105,MDC_ECG_BEAT_RBB_BLK_INCOMP,C71048,D3-33112
1AVB,first degree AV block,1.0,,,CD,_AVB,"Sinus node dysfunction, atrial and AV-conduction defects",first degree AV block,,MDC_ECG_RHY_AV_HEART_BLK_DEG_1,C111088,
ISCAL,ischemic in anterolateral leads,1.0,,,STTC,ISCA,ischemic ST-T changes,in anterolateral leads,,,,
CRBBB,complete right bundle branch block,1.0,,,CD,CRBBB,Intraventricular and intra-atrial Conduction disturbances,(complete) right bundle branch block,106,MDC_ECG_BEAT_RBB_BLK_COMP,C62270,D3-33110
CLBBB,complete left bundle branch block,1.0,,,CD,CLBBB,Intraventricular and intra-atrial Conduction disturbances,(complete) left bundle branch block,104,MDC_ECG_BEAT_LBB_BLK_COMP,C62269,D3-33120 or 122752
LAO/LAE,left atrial overload/enlargement,1.0,,,HYP,LAO/LAE,Atrial statements,left atrial overload/enlargement,140,,,
AMI,anterior myocardial infarction,1.0,,,MI,AMI,Myocardial Infarction,anterior myocardial infarction,160,,,
ISCIN,ischemic in inferior leads,1.0,,,STTC,ISCI,ischemic ST-T changes,in inferior leads,,,,
ABQRS,abnormal QRS,,1.0,,,,Normal/abnormal,abnormal QRS,,,,
STD_,non-specific ST depression,,1.0,,,,Basic roots for coding ST-T changes and abnormalities,non-specific ST depression,502,,,F-38278
QWAVE,Q waves present,,1.0,,,,Other QRS morphology descriptive statements,Q waves present,,,,
NT_,non-specific T-wave changes,,1.0,,,,Basic roots for coding ST-T changes and abnormalities,non-specific T-wave changes,,,,
INVT,inverted T-waves,,1.0,,,,other ST-T descriptive statements,inverted T-waves,367,,,
LVOLT,low QRS voltages in the frontal and horizontal leads,,1.0,,,,Other QRS morphology descriptive statements,low QRS voltages in the frontal and horizontal leads,,,,
HVOLT,high QRS voltage,,1.0,,,,Other QRS morphology descriptive statements,high QRS voltage,,,,
STE_,non-specific ST elevation,,1.0,,,,Basic roots for coding ST-T changes and abnormalities,non-specific ST elevation,501,MDC_ECG_RHY_STELVATION,,F-38277
SR,sinus rhythm,,,1.0,,,Statements related to impulse formation (abnormalities),sinus rhythm,20,MDC_ECG_RHY_SINUS_RHY,,
AFIB,atrial fibrillation,,,1.0,,,Statements related to impulse formation (abnormalities),atrial fibrillation,50,MDC_ECG_RHY_ATR_FIB,,D3-31520
STACH,sinus tachycardia,,,1.0,,,Statements related to impulse formation (abnormalities),sinus tachycardia,21,MDC_ECG_RHY_SINUS_TACHY,,
SBRAD,sinus bradycardia,,,1.0,,,Statements related to impulse formation (abnormalities),sinus bradycardia,22,MDC_ECG_RHY_SINUS_BRADY,,
"""

# Bump whenever the generator's output changes: a cached synthetic set is then regenerated,
# and a shipped teacher trained on an older version warns (teachers/zoo.py).
# Version 2 (synth_physiology's docstring: calibrated against real PTB-XL feature medians) is
# chosen per set (``data.synthetic.generator``); GENERATOR_VERSION stays the default.
GENERATOR_VERSION = 1
GENERATOR_VERSIONS = phys.GENERATOR_VERSIONS


def _scp_table() -> dict[str, dict[str, str]]:
    rows = list(csv.reader(io.StringIO(SCP_STATEMENTS_CSV)))
    header = rows[0]
    return {r[0]: dict(zip(header[1:], r[1:])) for r in rows[1:]}


SCP = _scp_table()
DIAGNOSTIC_CLASS = {code: a["diagnostic_class"] for code, a in SCP.items() if a["diagnostic"] == "1.0"}

_LIKELIHOODS = np.array([100.0, 80.0, 50.0, 35.0, 15.0])
_LIKELIHOOD_P = np.array([0.62, 0.13, 0.12, 0.08, 0.05])
_CODES = {
    "MI": (("IMI", "ASMI", "AMI"), (0.5, 0.35, 0.15)),
    "STTC": (("NDT", "NST_", "ISC_", "ISCAL", "ISCIN", "LNGQT"), (0.33, 0.15, 0.2, 0.15, 0.07, 0.1)),
    # PTB-XL's CD mix: fascicular blocks and incomplete RBBB far outnumber complete blocks.
    "CD": (("CLBBB", "CRBBB", "IRBBB", "LAFB", "1AVB"), (0.1, 0.11, 0.25, 0.32, 0.22)),
}
# Ischaemia co-labelled with an infarct sits in the infarct's territory.
_MI_STTC = {"IMI": "ISCIN", "ASMI": "ISCAL", "AMI": "ISCAL"}


def _likelihood(rng: np.random.Generator) -> float:
    return float(rng.choice(_LIKELIHOODS, p=_LIKELIHOOD_P))


def _pick(rng: np.random.Generator, group: str, exclude: tuple[str, ...] = ()) -> str:
    codes, p = _CODES[group]
    p = np.array([0.0 if c in exclude else q for c, q in zip(codes, p)])
    return str(rng.choice(codes, p=p / p.sum()))


def sample_codes(rng: np.random.Generator) -> dict[str, float]:
    """Diagnostic and rhythm SCP codes of one ECG, ordered diagnostic first.

    Returns:
        {code: likelihood}; rhythm codes have likelihood 0.0 as in PTB-XL.
    """
    if rng.random() < 0.43:
        codes = {"NORM": 100.0 if rng.random() < 0.92 else 80.0}
        rhythm = str(rng.choice(["SR", "STACH", "SBRAD"], p=[0.88, 0.05, 0.07]))
        codes[rhythm] = 0.0
        return codes
    while True:
        has = {"MI": rng.random() < 0.42, "CD": rng.random() < 0.38, "HYP": rng.random() < 0.2}
        p_sttc = 0.55 if has["HYP"] else 0.35 if has["MI"] else 0.3
        has["STTC"] = rng.random() < p_sttc
        if any(has.values()):
            break
    afib = rng.random() < (0.1 + 0.08 * (has["CD"] or has["HYP"]))
    codes: dict[str, float] = {}
    mi = None
    if has["MI"]:
        mi = _pick(rng, "MI")
        codes[mi] = _likelihood(rng)
    if has["STTC"]:
        sttc = _MI_STTC[mi] if mi and rng.random() < 0.6 else _pick(rng, "STTC")
        codes[sttc] = _likelihood(rng)
    if has["CD"]:
        first = _pick(rng, "CD", ("1AVB",) if afib else ())
        codes[first] = _likelihood(rng)
        if first in ("CRBBB", "LAFB", "1AVB") and rng.random() < 0.15:  # bi/trifascicular
            other = {"CRBBB": "LAFB", "LAFB": "1AVB" if not afib else "CRBBB", "1AVB": "CRBBB"}[first]
            codes[other] = _likelihood(rng)
    if has["HYP"]:
        codes["LVH"] = _likelihood(rng)
        if not afib and rng.random() < 0.2:
            codes["LAO/LAE"] = _likelihood(rng)
    rhythm = "AFIB" if afib else str(rng.choice(["SR", "STACH", "SBRAD"], p=[0.8, 0.1, 0.1]))
    codes[rhythm] = 0.0
    return codes


def form_codes(findings: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    """Form statements for the findings the physiology produced (coded ~70 % of the time)."""
    out: dict[str, float] = {}
    for key, code in (("qwave", "QWAVE"), ("ste", "STE_"), ("std", "STD_"), ("invt", "INVT"),
                      ("nt", "NT_"), ("lvolt", "LVOLT"), ("hvolt", "HVOLT")):
        if findings.get(key) and rng.random() < 0.7:
            out[code] = 0.0
    if (findings.get("qwave") or findings.get("bbb")) and rng.random() < 0.4:
        out["ABQRS"] = 0.0
    return out


def superclasses(codes: dict[str, float]) -> set[str]:
    """PTB-XL superdiagnostic labels of a code dict (any likelihood counts)."""
    return {DIAGNOSTIC_CLASS[c] for c in codes if c in DIAGNOSTIC_CLASS}


def heart_axis_label(axis_deg: float) -> str:
    """PTB-XL's heart_axis category for a frontal QRS axis in degrees."""
    a = (axis_deg + 180.0) % 360.0 - 180.0
    if -30 <= a <= 90:
        return "MID"
    if -45 <= a < -30:
        return "LAD"
    if -90 <= a < -45:
        return "ALAD"
    if 90 < a <= 120:
        return "RAD"
    if 120 < a <= 180:
        return "ARAD"
    return "SAG"


def assign_patients(n_records: int, rng: np.random.Generator) -> np.ndarray:
    """Patient index of every record (ecg_id order); ~12 % of patients have 2-4 records.

    Returns:
        int array [n_records] with values 0..n_patients-1, shuffled over time.
    """
    counts: list[int] = []
    while sum(counts) < n_records:
        counts.append(int(rng.choice([1, 2, 3, 4], p=[0.88, 0.08, 0.03, 0.01])))
    counts[-1] -= sum(counts) - n_records
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner[rng.permutation(n_records)]


def stratified_folds(patient: np.ndarray, labels: list[set[str]], rng: np.random.Generator,
                     n_folds: int = 10) -> np.ndarray:
    """Folds 1..n_folds, patient-disjoint, with roughly equal label distribution.

    Greedy iterative stratification: patients carrying the rarest labels are placed first,
    each into the fold whose deficit for the patient's labels (and in size) is largest.

    Args:
        patient: [N] patient index per record.
        labels: per record, its superclass labels (plus rhythm if wanted).

    Returns:
        int array [N] of folds.
    """
    n_pat = int(patient.max()) + 1
    pat_labels: list[set[str]] = [set() for _ in range(n_pat)]
    pat_size = np.bincount(patient, minlength=n_pat)
    for p, lab in zip(patient, labels):
        pat_labels[p] |= lab
    names = sorted({lab for s in pat_labels for lab in s})
    total = {lab: sum(lab in s for s in pat_labels) for lab in names}
    order = sorted(range(n_pat), key=lambda p: (min((total[lab] for lab in pat_labels[p]), default=1 << 30),
                                                 rng.random()))
    counts = {lab: np.zeros(n_folds) for lab in names}
    sizes = np.zeros(n_folds)
    target_size = len(patient) / n_folds
    pat_fold = np.zeros(n_pat, dtype=np.int64)
    for p in order:
        need = (target_size - sizes) / target_size
        for lab in pat_labels[p]:
            need = need + (total[lab] / n_folds - counts[lab]) / max(total[lab] / n_folds, 1.0)
        need = need + 1e-6 * rng.random(n_folds)
        f = int(np.argmax(need))
        pat_fold[p] = f
        sizes[f] += pat_size[p]
        for lab in pat_labels[p]:
            counts[lab][f] += 1
    return pat_fold[patient] + 1


def recording_dates(n: int, rng: np.random.Generator) -> list[datetime]:
    """Increasing recording times between 1984 and 2001 (PTB-XL's span), from the seed."""
    start = datetime(1984, 11, 9, 8, 0, 0)
    span = (datetime(2001, 6, 1) - start).total_seconds()
    secs = np.sort(rng.uniform(0, span, n))
    return [start + timedelta(seconds=int(s)) for s in secs]


def report_text(codes: dict[str, float]) -> str:
    """A short free-text report from the statement descriptions, as cardiologists wrote them."""
    return ". ".join(SCP[c]["description"] for c in codes) + "."


# --------------------------------------------------------------------------- metadata

PTBXL_COLUMNS = (
    "patient_id", "age", "sex", "height", "weight", "nurse", "site", "device", "recording_date",
    "report", "scp_codes", "heart_axis", "infarction_stadium1", "infarction_stadium2",
    "validated_by", "second_opinion", "initial_autogenerated_report", "validated_by_human",
    "baseline_drift", "static_noise", "burst_noise", "electrodes_problems", "extra_beats",
    "pacemaker", "strat_fold", "filename_lr", "filename_hr",
)
WFDB_LEAD_NAMES = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
SAMPLING_RATES = (100, 500)
_DEVICES = ("CS-12   E", "AT-6 C 5.5", "AT-6     6", "CS100    3", "AT-60    3", "AT-6 C")
_STADIUM = ("Stadium I", "Stadium II", "Stadium III")


def patient_id_range(n_records: int, first_patient_id: int = 1) -> tuple[int, int]:
    """The lowest and highest patient id a set of ``n_records`` records can hold: a set
    has at most one patient per record, and its ids are drawn from ``first_patient_id``
    up to ``first_patient_id - 1 + int(1.3 * patients) + 9``."""
    return first_patient_id, first_patient_id - 1 + int(n_records * 1.3) + 9


def record_filename(ecg_id: int, fs: int) -> str:
    """PTB-XL's relative record path without extension, e.g. ``records100/00000/00001_lr``."""
    suffix = "lr" if fs == 100 else "hr"
    return f"records{fs}/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_{suffix}"


def _metadata(n_records: int, seed: int, first_patient_id: int = 1) -> list[dict]:
    """Patients, demographics, diagnostic/rhythm codes and folds of every record.

    Patient ids are drawn from ``first_patient_id`` up to about 1.3 x the number of patients
    above it, so two sets whose ranges do not overlap share no patient.

    Returns:
        One dict per record in ecg_id order (ecg_id = index + 1); ``codes`` holds the
        diagnostic and rhythm codes, form codes are added after the physiology.
    """
    rng = np.random.default_rng([seed, 0])
    patient = assign_patients(n_records, rng)
    n_pat = int(patient.max()) + 1
    pat_ids = rng.choice(np.arange(1, int(n_pat * 1.3) + 10), n_pat, replace=False)
    pat_ids += first_patient_id - 1
    female = rng.random(n_pat) < 0.48
    dates = recording_dates(n_records, rng)
    birth: dict[int, datetime] = {}
    pat_codes: dict[int, dict[str, float]] = {}
    rows = []
    for i in range(n_records):
        p = int(patient[i])
        if p not in pat_codes or rng.random() > 0.75:  # follow-ups mostly keep the diagnosis
            codes = sample_codes(rng)
        else:
            codes = dict(pat_codes[p])
        if p not in pat_codes:
            pat_codes[p] = codes
            normal = "NORM" in codes
            age0 = float(np.clip(rng.normal(47, 17) if normal else rng.normal(66, 13), 18, 95))
            birth[p] = dates[i] - timedelta(days=age0 * 365.25)
        rows.append({
            "ecg_id": i + 1, "patient": p, "patient_id": float(pat_ids[p]),
            "age": float(int((dates[i] - birth[p]).days / 365.25)), "sex": int(female[p]),
            "codes": codes, "recording_date": dates[i].strftime("%Y-%m-%d %H:%M:%S"),
        })
    folds = stratified_folds(patient, [superclasses(r["codes"]) for r in rows], rng)
    for r, f in zip(rows, folds):
        r["strat_fold"] = int(f)
        _admin_fields(r, rng)
    return rows


def _admin_fields(r: dict, rng: np.random.Generator) -> None:
    """Body size, site, device and validation columns (folds 9-10 are human-validated)."""
    has_size = rng.random() < 0.35
    male = r["sex"] == 0
    r["height"] = float(round(rng.normal(178 if male else 165, 7))) if has_size else np.nan
    r["weight"] = float(round(rng.normal(82 if male else 68, 13))) if has_size else np.nan
    r["nurse"] = float(rng.integers(0, 12)) if rng.random() < 0.3 else np.nan
    r["site"] = float(rng.integers(0, 51))
    r["device"] = str(rng.choice(_DEVICES))
    r["validated_by"] = float(rng.integers(0, 12)) if rng.random() < 0.55 else np.nan
    r["second_opinion"] = bool(rng.random() < 0.02)
    r["initial_autogenerated_report"] = bool(rng.random() < 0.08)
    r["validated_by_human"] = bool(r["strat_fold"] >= 9 or rng.random() < 0.7)


# --------------------------------------------------------------------------- signals

def quantise(leads: np.ndarray) -> np.ndarray:
    """mV -> PTB-XL digital values (gain 1000/mV) with exact Einthoven/Goldberger leads.

    I and II are rounded to even ADC values, so III = II - I, aVR = -(I + II)/2,
    aVL = I - II/2 and aVF = II - I/2 are exact integers.

    Args:
        leads: [8, T] float mV, rows I, II, V1..V6.

    Returns:
        [T, 12] int16 in the standard lead order.
    """
    i = np.clip(2 * np.rint(leads[0] * 500.0), -16000, 16000).astype(np.int64)
    ii = np.clip(2 * np.rint(leads[1] * 500.0), -16000, 16000).astype(np.int64)
    v = np.clip(np.rint(leads[2:] * 1000.0), -32767, 32767).astype(np.int64)
    limb = np.stack([i, ii, ii - i, -(i + ii) // 2, i - ii // 2, ii - i // 2])
    return np.concatenate([limb, v]).T.astype(np.int16)


# Anti-aliasing low-pass for 500 -> 100 Hz: flat to 30 Hz, -82 dB at 50 Hz so mains hum
# cannot alias onto the 100 Hz Nyquist frequency.
_DECIMATION_FIR = firwin(81, 36.0, fs=phys.FS_BASE, window=("kaiser", 5.0))
_FIR_DELAY = (len(_DECIMATION_FIR) - 1) // 2


def _to_rates(leads: np.ndarray, rates: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Crop the margin; 100 Hz is a filtered decimation of 500 Hz, as PTB-XL's files are.

    Args:
        leads: [8, N_BASE] float mV at 500 Hz including margins.

    Returns:
        {fs: [T, 12] int16}.
    """
    out = {}
    m = int(round(phys.MARGIN_S * phys.FS_BASE))
    for fs in rates:
        n = int(round(phys.DURATION_S * fs))
        if fs == phys.FS_BASE:
            out[fs] = quantise(leads[:, m: m + n])
            continue
        step = phys.FS_BASE // fs
        # Only every step-th output is computed; output j is centred on input
        # j * step - delay, so skipping (m + delay) / step outputs aligns sample 0.
        y = upfirdn(_DECIMATION_FIR, leads, up=1, down=step, axis=1)
        first = (m + _FIR_DELAY) // step
        out[fs] = quantise(y[:, first: first + n])
    return out


def _noise_flag(level: float, threshold: float, rng: np.random.Generator) -> str | float:
    """PTB-XL-style affected-lead note (e.g. ``", I-AVF"``) when a noise level is high."""
    if level < threshold:
        return np.nan
    first, last = sorted(rng.choice(len(WFDB_LEAD_NAMES), 2, replace=False))
    return f", {WFDB_LEAD_NAMES[first]}-{WFDB_LEAD_NAMES[last]}" if last > first else "alles"


def _render_record(r: dict, seed: int, rates: tuple[int, ...],
                   generator: int = GENERATOR_VERSION) -> dict[int, np.ndarray]:
    """Physiology of one record (``generator``: the version); completes its metadata row
    in place.

    Returns:
        {fs: [T, 12] int16 digital signal}.
    """
    rng = np.random.default_rng([seed, 1, r["ecg_id"]])
    params = phys.sample_params(r["codes"], r["age"], r["sex"] == 1, rng, generator)
    digital = _to_rates(phys.render_leads(params, rng), rates)
    find = params.findings
    codes = {**r["codes"], **form_codes(find, rng)}
    rhythm = [c for c in codes if SCP[c]["rhythm"] == "1.0"]
    codes = {**{c: v for c, v in codes.items() if c not in rhythm}, **{c: codes[c] for c in rhythm}}
    stage = find.get("mi_stage")
    r.update({
        "scp_codes": repr(codes), "report": report_text(codes),
        "heart_axis": heart_axis_label(find["axis"]),
        "infarction_stadium1": _STADIUM[int(stage)] if stage is not None else np.nan,
        "infarction_stadium2": np.nan,
        "baseline_drift": _noise_flag(params.noise["wander"], 0.15, rng),
        "static_noise": _noise_flag(params.noise["emg"], 0.03, rng),
        "burst_noise": _noise_flag(params.noise["burst"], 0.05, rng),
        "electrodes_problems": np.nan, "extra_beats": np.nan, "pacemaker": np.nan,
        "synth_hr": params.hr, "synth_pr_ms": params.pr * 1000, "synth_qrs_ms": params.qrs * 1000,
        "synth_qt_ms": params.qt * 1000, "synth_axis": find["axis"],
    })
    return digital


def _check_generator(generator: int) -> int:
    try:
        return phys.check_generator(generator)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _check_rates(rates: tuple[int, ...]) -> tuple[int, ...]:
    rates = tuple(sorted({int(f) for f in rates}))
    if not rates or any(f not in SAMPLING_RATES for f in rates):
        raise DataError(f"sampling_rates must be a non-empty subset of {SAMPLING_RATES}, got {rates}")
    return rates


def _frame(rows: list[dict], rates: tuple[int, ...]) -> pd.DataFrame:
    """PTB-XL database table (index ecg_id) plus ``synth_*`` ground-truth columns."""
    df = pd.DataFrame(rows).set_index("ecg_id")
    df["filename_lr"] = [record_filename(i, 100) if 100 in rates else "" for i in df.index]
    df["filename_hr"] = [record_filename(i, 500) if 500 in rates else "" for i in df.index]
    extra = [c for c in df.columns if c.startswith("synth_")]
    return df[list(PTBXL_COLUMNS) + extra]


def synthesize(n_records: int, seed: int = 0, fs: int = 100, progress: bool = False,
               first_patient_id: int = 1, generator: int = GENERATOR_VERSION
               ) -> tuple[np.ndarray, pd.DataFrame]:
    """Generate records in memory, exactly as ``generate_ptbxl`` would write them.

    Args:
        n_records: number of ECGs (ecg_id 1..n_records).
        seed: everything is a function of the seed.
        fs: 100 or 500 Hz.
        progress: show a tqdm bar.
        first_patient_id: the lowest patient id (see :func:`patient_id_range`).
        generator: the generator version (:mod:`~distill.data.synth_physiology`).

    Returns:
        signals: [n_records, 12, 10 * fs] float32 in mV, standard lead order.
        meta: DataFrame indexed by ecg_id with PTB-XL's columns plus ``synth_hr``,
            ``synth_pr_ms``, ``synth_qrs_ms``, ``synth_qt_ms``, ``synth_axis``.
    """
    rates = _check_rates((fs,))
    generator = _check_generator(generator)
    rows = _metadata(n_records, seed, first_patient_id)
    out = np.empty((n_records, 12, int(phys.DURATION_S * fs)), dtype=np.float32)
    for k, r in enumerate(progress_bar(rows, desc="synthesising ECGs", enabled=progress)):
        out[k] = _render_record(r, seed, rates, generator)[fs].T / np.float32(1000.0)
    return out, _frame(rows, rates)


def synthesize_codes(codes: dict[str, float], n: int, seed: int = 0, fs: int = 500,
                     age: float = 60.0, female: bool = False, generator: int = GENERATOR_VERSION
                     ) -> tuple[np.ndarray, list[phys.RecordParams]]:
    """Render ECGs with chosen SCP codes (for tests, demos and sanity checks).

    Args:
        codes: diagnostic and rhythm codes with likelihoods, e.g. {"CLBBB": 100.0, "SR": 0.0}.
        n: number of ECGs, each with its own random physiology.
        seed: base seed; fs: 100 or 500; age, female: demographics of every ECG.
        generator: the generator version.

    Returns:
        ([n, 12, 10 * fs] float32 mV as the files would hold it, the n parameter sets).
    """
    rates = _check_rates((fs,))
    generator = _check_generator(generator)
    out = np.empty((n, 12, int(phys.DURATION_S * fs)), dtype=np.float32)
    params = []
    for k in range(n):
        rng = np.random.default_rng([seed, 2, k])
        p = phys.sample_params(codes, age, female, rng, generator)
        out[k] = _to_rates(phys.render_leads(p, rng), rates)[fs].T / np.float32(1000.0)
        params.append(p)
    return out, params


def write_wfdb(path: Path, fs: int, digital: np.ndarray) -> None:
    """Write a format-16 WFDB record byte-identical to ``wfdb.wrsamp`` with PTB-XL's fields.

    wfdb.wrsamp spends ~18 ms per record building its header through pandas; this writes
    the same bytes (the tests compare both) in well under a millisecond.

    Args:
        path: record path without extension; its name is the record name.
        fs: sampling rate.
        digital: [T, 12] int16 ADC values, gain 1000/mV, baseline 0.
    """
    name = path.name
    d = np.ascontiguousarray(digital, dtype="<i2")
    checksum = d.astype(np.int64).sum(axis=0) % 65536
    lines = [f"{name} {d.shape[1]} {fs} {d.shape[0]}"]
    lines += [f"{name}.dat 16 1000.0(0)/mV 16 0 {d[0, j]} {checksum[j]} 0 {lead}"
              for j, lead in enumerate(WFDB_LEAD_NAMES)]
    path.with_suffix(".hea").write_text("\n".join(lines) + "\n")
    path.with_suffix(".dat").write_bytes(d.tobytes())


def write_wfdb_with_wfdb(path: Path, fs: int, digital: np.ndarray) -> None:
    """The same record written by ``wfdb.wrsamp`` itself (slow; the reference writer)."""
    import wfdb

    wfdb.wrsamp(path.name, fs=fs, units=["mV"] * 12, sig_name=list(WFDB_LEAD_NAMES),
                d_signal=digital.astype(np.int64), fmt=["16"] * 12, adc_gain=[1000.0] * 12,
                baseline=[0] * 12, write_dir=str(path.parent))


def _write_records(out: str, rows: list[dict], seed: int, rates: tuple[int, ...],
                   use_wfdb_writer: bool, generator: int = GENERATOR_VERSION) -> list[dict]:
    """Write the WFDB files of ``rows`` (a chunk of the metadata) and return the rows
    completed as :func:`_render_record` completes them (run in a worker process)."""
    writer = write_wfdb_with_wfdb if use_wfdb_writer else write_wfdb
    for r in rows:
        for fs, digital in _render_record(r, seed, rates, generator).items():
            path = Path(out) / record_filename(r["ecg_id"], fs)
            path.parent.mkdir(parents=True, exist_ok=True)
            writer(path, fs, digital)
    return rows


def generate_ptbxl(out_dir: str | Path, n_records: int, seed: int = 0,
                   sampling_rates: tuple[int, ...] = (100, 500), progress: bool = True,
                   use_wfdb_writer: bool = False, first_patient_id: int = 1,
                   workers: int | None = None, generator: int = GENERATOR_VERSION) -> dict:
    """Write a synthetic data set in PTB-XL's layout.

    Args:
        out_dir: created if missing; existing files of the same names are overwritten.
        n_records: number of ECGs.
        seed: same seed -> byte-identical files.
        sampling_rates: any of 100, 500; a missing rate leaves its filename column empty.
        progress: show a tqdm bar.
        use_wfdb_writer: write through ``wfdb.wrsamp`` (identical bytes, ~20x slower).
        first_patient_id: the lowest patient id (see :func:`patient_id_range`).
        workers: processes writing records (default: :func:`distill.data.parallel.data_workers`);
            the files are byte-identical for any number.
        generator: the generator version (:mod:`~distill.data.synth_physiology`).

    Returns:
        {"out_dir", "records", "sampling_rates", "seconds", "records_per_s",
         "superclass_counts", "code_counts", "fold_sizes"}.
    """
    if n_records < 1:
        raise DataError(f"n_records must be >= 1, got {n_records}")
    rates = _check_rates(sampling_rates)
    generator = _check_generator(generator)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if first_patient_id < 1:
        raise DataError(f"first_patient_id must be >= 1, got {first_patient_id}")
    rows = _metadata(n_records, seed, first_patient_id)
    n_workers = data_workers(n_records, workers)
    chunk = chunk_size(n_records, n_workers, 500)
    tasks = [(str(out), rows[s:e], seed, rates, use_wfdb_writer, generator)
             for s, e in chunk_ranges(n_records, chunk)]
    done: list[dict] = []
    with progress_bar(total=n_records, desc="writing synthetic PTB-XL", unit="ecg", enabled=progress) as bar:
        for part in map_chunks(_write_records, tasks, n_workers):
            done.extend(part)
            bar.update(len(part))
    rows = done
    df = _frame(rows, rates)
    df[list(PTBXL_COLUMNS)].to_csv(out / "ptbxl_database.csv")
    (out / "scp_statements.csv").write_text(SCP_STATEMENTS_CSV)
    seconds = time.perf_counter() - start
    codes = [r["codes"] for r in rows]
    return {
        "out_dir": str(out), "records": n_records, "sampling_rates": list(rates),
        "generator": generator,
        "seconds": round(seconds, 3), "records_per_s": round(n_records / seconds, 1),
        "superclass_counts": dict(sorted(Counter(s for c in codes for s in superclasses(c)).items())),
        "code_counts": dict(sorted(Counter(c for cs in codes for c in cs).items())),
        "fold_sizes": {int(k): int(v) for k, v in sorted(Counter(df["strat_fold"]).items())},
    }
