"""Cardiac-dipole physiology behind the synthetic PTB-XL generator.

The heart is modelled as one moving current dipole (a vectorcardiogram, VCG): every wave
of every beat (P, septal q, R, S, ST plateau, T) is a pulse in time with a 3-D direction.
The 8 independent leads (I, II, V1..V6) are projections of that dipole onto per-record
lead vectors, so the limb leads stay mutually consistent and pathologies act where they
should: an inferior infarct turns the initial QRS vector away from the inferior wall, which
*is* a Q wave in II, III and aVF, without any lead-specific hacks.

Coordinates: x points to the patient's left, y to the feet (inferior), z to the front
(anterior). Times are in seconds, amplitudes in mV, everything at ``FS_BASE`` = 500 Hz.
Noise is produced at the electrodes (RA, LA, LL, V1..V6) and mapped onto the leads the way
an ECG amplifier does (I = LA - RA, Vi = Ei - Wilson terminal).

Two generator versions (``generator`` below; every record of a set uses one):

* 1, the default of every recipe so far (and of the shipped teacher's pretraining corpus):
  one R and one S vector, the R pointing posteriorly, so V3-V5 stay S-dominant.
* 2, calibrated against the medians of real PTB-XL features (benchmarks/realism.py, the
  training folds 1-8 of ``ptbxl-real-500`` only): the QRS loop turns as in a real heart (an
  early anterior-leftward force ``R1`` gives the precordial R-wave progression, the main
  force points left and slightly back, the terminal one back and up); chest leads larger
  than limb leads; the T vector more anterior; normal sinus rate centred near 70 bpm; less
  baseline wander, more high-frequency (EMG) noise; each lead zero-mean over the record, as
  PTB-XL's recordings are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.signal import butter, sosfilt
from scipy.special import ndtr, ndtri

FS_BASE = 500
DURATION_S = 10.0
MARGIN_S = 0.2  # synthesised on both sides so decimation filters have no edge effects
N_BASE = int(round((DURATION_S + 2 * MARGIN_S) * FS_BASE))

# Precordial electrodes: angle in the horizontal plane from +x towards +z, inferior
# component and lead-field gain (chest electrodes sit closer to the heart than limb ones).
_PRECORDIAL = np.array([
    [118.0, 0.00, 1.00],
    [94.0, 0.00, 1.40],
    [76.0, 0.05, 1.50],
    [58.0, 0.12, 1.40],
    [34.0, 0.15, 1.15],
    [6.0, 0.15, 0.95],
])
# Effect-size multiplier for every pathology; calibrated with benchmarks/synth_difficulty.py.
EFFECT_SCALE = 0.4
# Multiplier of all noise levels.
NOISE_SCALE = 1.0
# The generator versions (module docstring); 1 renders byte-identically to every release
# before version 2 existed.
GENERATOR_VERSIONS = (1, 2)
# Version 2: chest-lead gain over version 1's (real V4-V5 R waves are about twice lead I's)
_CHEST_GAIN_V2 = 1.5


def _unit(*v: float) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


# Territories: the outward normal of the wall an infarct or ischaemia affects.
TERRITORY = {
    "inferior": _unit(0.1, 1.0, -0.15),
    "anterior": _unit(0.35, 0.0, 0.94),
    "anteroseptal": _unit(-0.15, 0.0, 1.0),
    "lateral": _unit(0.85, 0.1, 0.45),
    "anterolateral": _unit(0.6, 0.0, 0.8),
}


@dataclass
class Wave:
    """One wave of the beat template: a time pulse exp(-|x|^power / 2) with a direction.

    Attributes:
        name: "P", "Q", "R", "S", "R2", "ST", "T1", "T2", ... (for the record's bookkeeping).
        offset: centre relative to QRS onset, seconds.
        sigma: width, seconds.
        vec: dipole direction times amplitude, shape [3], mV.
        power: 2 for a Gaussian, 4 for a flat-topped plateau (the ST segment).
        repol: repolarisation waves move with the QT interval beat by beat.
    """

    name: str
    offset: float
    sigma: float
    vec: np.ndarray
    power: float = 2.0
    repol: bool = False


@dataclass
class RecordParams:
    """Everything needed to render one record, sampled from its labels.

    Attributes:
        hr: mean heart rate, beats per minute.
        afib: atrial fibrillation (irregular RR, no P, f-waves).
        pr, qrs, qt: intervals of the template beat, seconds.
        waves: the beat template.
        lead_matrix: [8, 3] lead vectors of I, II, V1..V6.
        rr_cv: beat-to-beat RR variability (relative SD) beyond respiration.
        rsa: respiratory sinus-arrhythmia depth (relative RR modulation).
        resp_hz: respiration frequency.
        fwave: (amplitude mV, frequency Hz) of AF f-waves, or (0, 0).
        noise: levels of baseline wander, EMG, mains hum and EMG bursts (mV).
        findings: derived form findings (q waves, ST elevation ...) for the form codes.
    """

    hr: float
    afib: bool
    pr: float
    qrs: float
    qt: float
    waves: list[Wave]
    lead_matrix: np.ndarray
    rr_cv: float
    rsa: float
    resp_hz: float
    fwave: tuple[float, float]
    noise: dict[str, float]
    findings: dict[str, float] = field(default_factory=dict)
    generator: int = 1


def check_generator(generator: int) -> int:
    """``generator`` if it is a known version, else a ValueError naming the known ones."""
    if generator not in GENERATOR_VERSIONS:
        raise ValueError(f"generator version {generator!r} is not one of "
                         f"{', '.join(map(str, GENERATOR_VERSIONS))}")
    return int(generator)


def lead_matrix(rng: np.random.Generator, generator: int = 1) -> np.ndarray:
    """Per-record lead vectors with electrode-placement and torso variability.

    Returns:
        [8, 3] matrix; rows I, II, V1..V6.
    """
    limb = np.array([[1.0, 0.0, 0.0], [0.5, np.sqrt(3) / 2, 0.0]])
    limb *= rng.uniform(0.85, 1.15)
    angles = np.deg2rad(_PRECORDIAL[:, 0] + rng.normal(0, 5, 6))
    gains = _PRECORDIAL[:, 2] * rng.uniform(0.8, 1.2) * rng.uniform(0.92, 1.08, 6)
    chest = np.stack([np.cos(angles), _PRECORDIAL[:, 1] + rng.normal(0, 0.05, 6), np.sin(angles)], 1)
    chest = chest / np.linalg.norm(chest, axis=1, keepdims=True) * gains[:, None]
    if generator >= 2:
        chest = chest * _CHEST_GAIN_V2
    return np.concatenate([limb, chest], 0)


def _frontal(angle_deg: float, z: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return _unit(np.cos(a), np.sin(a), z)


def _intervals(rng: np.random.Generator, female: bool, axis: float, amp: float) -> dict:
    """A healthy person's PR, QRS and QTc (s), with the axis and voltage drawn before."""
    return {
        "pr": rng.uniform(0.12, 0.2),
        "qrs": rng.uniform(0.078, 0.108),
        "qtc": rng.normal(0.41 if female else 0.395, 0.015),
        "axis": axis,
        "amp": amp,
    }


def _normal_template(rng: np.random.Generator, age: float, female: bool) -> tuple[dict, dict]:
    """Intervals and wave vectors of a healthy heart for this person.

    Returns:
        (intervals {pr, qrs, qtc, axis}, vectors {P, Q, R, S, T, ST}: [3] arrays in mV).
    """
    axis = rng.normal(55 - 0.25 * (age - 50), 22)
    amp = rng.lognormal(np.log(1.45), 0.22) * (0.85 if female else 1.0)
    iv = _intervals(rng, female, axis, amp)
    vec = {
        "P": rng.uniform(0.1, 0.22) * _frontal(rng.normal(55, 12), 0.25),
        "Q": rng.uniform(0.1, 0.22) * amp * _unit(-0.6, rng.normal(0.1, 0.2), 0.8),
        "R": amp * _frontal(axis, rng.uniform(-0.55, -0.2)),
        "S": rng.uniform(0.25, 0.45) * amp * _unit(-0.4, -0.5, rng.uniform(-0.9, -0.4)),
        "T": rng.uniform(0.17, 0.3) * amp * _frontal(axis + rng.normal(-5, 14), rng.uniform(0.05, 0.5)),
        # Mild J-point elevation in V2-V3 is normal, especially in young men.
        "ST": rng.uniform(0.0, 0.06 if female else 0.12) * _unit(0.1, 0.2, 1.0),
    }
    return iv, vec


def _normal_template_v2(rng: np.random.Generator, age: float, female: bool) -> tuple[dict, dict]:
    """Version 2 of :func:`_normal_template`: the QRS as a turning loop of three forces
    (septal ``Q`` right-anterior, early ``R1`` left-anterior, main ``R`` left and slightly
    posterior, terminal ``S`` posterior-superior), a more anterior T vector and smaller
    limb-lead voltage (module docstring)."""
    axis = rng.normal(38 - 0.25 * (age - 50), 30)
    amp = rng.lognormal(np.log(1.05), 0.24) * (0.85 if female else 1.0)
    iv = _intervals(rng, female, axis, amp)
    vec = {
        "P": rng.uniform(0.08, 0.18) * _frontal(rng.normal(55, 12), 0.25),
        "Q": rng.uniform(0.1, 0.22) * amp * _unit(-0.6, rng.normal(0.1, 0.2), 0.8),
        "R1": rng.uniform(0.55, 0.9) * amp * _frontal(axis + rng.normal(10, 15),
                                                     rng.uniform(0.35, 0.8)),
        "R": amp * _frontal(axis, rng.uniform(-0.9, -0.4)),
        "S": rng.uniform(0.3, 0.5) * amp * _unit(-0.1, -0.5, rng.uniform(-1.3, -0.8)),
        "T": rng.uniform(0.2, 0.34) * amp * _frontal(axis + rng.normal(-5, 14),
                                                    rng.uniform(0.3, 0.8)),
        "ST": rng.uniform(0.0, 0.06 if female else 0.12) * _unit(0.1, 0.2, 1.0),
    }
    return iv, vec


def _severity(likelihood: float, rng: np.random.Generator) -> float:
    """Effect size of a finding in [0, ~1]: uncertain statements (low likelihood) are milder.

    Borderline cases are what make real ECG labels hard: a likelihood-15 statement is often
    barely visible, a likelihood-100 one ranges from mild to florid.
    """
    if likelihood >= 100:
        lo, hi = 0.25, 1.0
    elif likelihood >= 80:
        lo, hi = 0.15, 0.8
    else:
        lo, hi = 0.05, 0.5
    return EFFECT_SCALE * rng.uniform(lo, hi)


def _apply_mi(vec: dict, code: str, sev: float, rng: np.random.Generator, find: dict) -> None:
    """Necrosis turns the initial QRS away from the territory; injury lifts its ST."""
    n = TERRITORY["inferior" if code == "IMI" else "anteroseptal" if code == "ASMI" else "anterior"]
    q = rng.uniform(0.35, 0.75) * sev * np.linalg.norm(vec["R"])
    vec["QMI"] = -q * n
    for key in ("R", "R1"):  # R1: version 2's early force (lost R-wave progression)
        if key not in vec:
            continue
        r_along = float(vec[key] @ n)
        if r_along > 0:
            vec[key] = vec[key] - min(0.8, 0.7 * sev) * r_along * n
    if "Q" in vec:  # (a left bundle branch block has no septal q to turn)
        vec["Q"] = vec["Q"] - min(0.8, sev) * max(0.0, float(vec["Q"] @ n)) * n
    stage = rng.choice(3, p=[0.35, 0.4, 0.25])  # acute, evolving, old
    if stage == 0:
        vec["ST"] = vec["ST"] + rng.uniform(0.1, 0.3) * sev * n
        vec["T"] = vec["T"] + rng.uniform(0.05, 0.2) * sev * n
        find["ste"] = 1
    elif stage == 1:
        vec["ST"] = vec["ST"] + rng.uniform(0.02, 0.08) * sev * n
        vec["T"] = vec["T"] - rng.uniform(0.25, 0.5) * sev * n
        find["invt"] = 1
    find["qwave"] = 1
    find["mi_stage"] = float(stage)


def _apply_sttc(vec: dict, iv: dict, code: str, sev: float, rng: np.random.Generator, find: dict) -> None:
    """ST depression and T-wave flattening or inversion in the affected territory."""
    tmag = np.linalg.norm(vec["T"])
    if code == "NDT":
        k = min(1.0, sev + 0.3)  # blend of the normal T and a flat or slightly inverted one
        vec["T"] = vec["T"] * ((1 - k) + k * rng.uniform(-0.35, 0.35))
        find["nt"] = 1
    elif code == "NST_":
        vec["ST"] = vec["ST"] - rng.uniform(0.03, 0.08) * sev * _unit(*vec["R"])
        vec["T"] = vec["T"] * rng.uniform(0.4, 0.8)
        find["std"] = 1
    elif code == "LNGQT":
        iv["qtc"] = rng.uniform(0.48, 0.56)
    else:
        n = TERRITORY[{"ISC_": "lateral", "ISCAL": "anterolateral", "ISCIN": "inferior"}[code]]
        vec["ST"] = vec["ST"] - rng.uniform(0.06, 0.2) * sev * n
        vec["T"] = vec["T"] - rng.uniform(1.0, 2.0) * sev * max(tmag, 0.2) * n
        find["std"] = 1
        find["invt"] = 1


def _apply_cd(vec: dict, iv: dict, code: str, sev: float, rng: np.random.Generator, find: dict) -> None:
    """Conduction disturbances: block delays part of the ventricles, widening the QRS."""
    amp = np.linalg.norm(vec["R"])
    if code == "1AVB":
        iv["pr"] = 0.202 + rng.uniform(0.02, 0.14) * min(sev / EFFECT_SCALE, 1.0)
    elif code == "LAFB":
        axis = -35 - 45 * min(sev / EFFECT_SCALE, 1.0) * rng.uniform(0.5, 1.0)
        vec["R"] = amp * _frontal(axis, float(_unit(*vec["R"])[2]))
        vec["Q"] = np.linalg.norm(vec["Q"]) * _unit(0.2, 0.9, 0.2)
        iv["qrs"] = max(iv["qrs"], rng.uniform(0.09, 0.11))
    elif code == "CLBBB":
        # Septum is activated right-to-left: no septal q; the LV depolarises late and
        # slowly (broad notched R in I, aVL, V5-V6; QS in V1-V3); repolarisation is
        # discordant to the QRS.
        iv["qrs"] = rng.uniform(0.125, 0.17)
        a = amp * rng.uniform(1.0, 1.4)
        main = _unit(0.72, rng.uniform(0.0, 0.35), -0.7)
        vec.pop("Q")
        vec.pop("R1", None)  # version 2: the early left-anterior force belongs to the septum
        vec["S"] = 0.0 * vec["S"]
        vec["R"] = 0.75 * a * main
        vec["R2"] = 0.85 * a * _unit(0.8, 0.1, -0.6)
        vec["ST"] = -rng.uniform(0.06, 0.16) * main
        vec["T"] = -rng.uniform(0.25, 0.45) * a * main
        find["bbb"] = 1
    elif code in ("CRBBB", "IRBBB"):
        # Normal early LV activation, then the right ventricle late and slowly towards
        # right-anterior: R' in V1, broad S in I and V6, T inverted in V1-V2.
        complete = code == "CRBBB"
        iv["qrs"] = rng.uniform(0.12, 0.155) if complete else rng.uniform(0.1, 0.118)
        a = amp * (rng.uniform(0.55, 0.9) if complete else rng.uniform(0.1, 0.4) * (0.3 + sev))
        vec["RBB"] = a * _unit(-0.6, rng.normal(0.0, 0.2), 0.8)
        vec["T"] = vec["T"] - (0.3 if complete else 0.1) * a * _unit(-0.5, 0.0, 0.85)
        find["bbb"] = 1.0 if complete else 0.5


def _apply_lvh(vec: dict, iv: dict, sev: float, rng: np.random.Generator, find: dict) -> None:
    """A thick LV wall adds leftward-posterior QRS voltage (Sokolow-Lyon) and lengthens QRS."""
    extra = rng.uniform(1.2, 2.4) * sev
    vec["R"] = vec["R"] + extra * _unit(0.85, 0.15, -0.5)
    iv["qrs"] = iv["qrs"] + rng.uniform(0.005, 0.02)
    find["hvolt"] = 1


def sample_params(codes: dict[str, float], age: float, female: bool, rng: np.random.Generator,
                  generator: int = 1) -> RecordParams:
    """Physiology of one record given its SCP codes.

    Args:
        codes: diagnostic and rhythm SCP codes with likelihoods (0-100).
        age: years; female: sex.
        rng: the record's own generator.
        generator: the generator version (module docstring).

    Returns:
        The record's parameters, including ``findings`` for form codes.
    """
    v2 = check_generator(generator) >= 2
    iv, vec = (_normal_template_v2 if v2 else _normal_template)(rng, age, female)
    find: dict[str, float] = {}
    for code, lik in codes.items():
        sev = _severity(lik, rng)
        if code in ("IMI", "AMI", "ASMI"):
            _apply_mi(vec, code, sev, rng, find)
        elif code in ("NDT", "NST_", "ISC_", "ISCAL", "ISCIN", "LNGQT"):
            _apply_sttc(vec, iv, code, sev, rng, find)
        elif code in ("1AVB", "LAFB", "CLBBB", "CRBBB", "IRBBB"):
            _apply_cd(vec, iv, code, sev, rng, find)
        elif code == "LVH":
            _apply_lvh(vec, iv, sev, rng, find)
        elif code == "LAO/LAE":
            iv["p_wide"] = 1.0
    afib = "AFIB" in codes
    if afib:
        hr = rng.uniform(65, 135)
    elif "STACH" in codes:
        hr = rng.uniform(102, 140)
    elif "SBRAD" in codes:
        hr = rng.uniform(40, 57)
    elif v2:  # real PTB-XL sinus rhythm: a normal near 66 +- 9 bpm, truncated to 61-99
        lo, hi = ndtr((61 - 66) / 9), ndtr((99 - 66) / 9)
        hr = float(66 + 9 * ndtri(rng.uniform(lo, hi)))
    else:
        hr = rng.uniform(62, 97)
    rr = 60.0 / hr
    qt = iv["qtc"] * np.sqrt(rr)
    habitus = rng.lognormal(0.0, 0.18)  # obesity or emphysema lowers voltage
    if habitus < 0.72:
        find["lvolt"] = 1
    waves = _template_waves(iv, vec, qt, afib, habitus, rng)
    wander, emg = (0.03, 0.006) if v2 else (0.06, 0.012)
    noise = {
        "wander": NOISE_SCALE * rng.lognormal(np.log(wander), 0.7),
        "emg": NOISE_SCALE * rng.lognormal(np.log(emg), 0.7),
        "hum": NOISE_SCALE * rng.lognormal(np.log(0.008), 0.9),
        "burst": NOISE_SCALE * (rng.uniform(0.03, 0.12) if rng.random() < 0.1 else 0.0),
    }
    if v2:  # broadband (amplifier, skin-electrode and muscle) noise below about 50 Hz
        noise["white"] = NOISE_SCALE * rng.lognormal(np.log(_BROADBAND_V2), 0.5)
    mean_qrs = sum(w.vec * w.sigma for w in waves
                   if w.name in ("Q", "QMI", "R1", "R", "R2", "S", "RBB"))
    find["axis"] = float(np.rad2deg(np.arctan2(mean_qrs[1], mean_qrs[0])))
    return RecordParams(
        hr=hr, afib=afib, pr=iv["pr"], qrs=iv["qrs"], qt=qt, waves=waves,
        lead_matrix=lead_matrix(rng, generator),
        rr_cv=rng.uniform(0.12, 0.28) if afib else rng.uniform(0.005, 0.02),
        rsa=0.0 if afib else rng.uniform(0.0, 0.05) * (1.5 if age < 40 else 1.0),
        resp_hz=rng.uniform(0.15, 0.35),
        fwave=(rng.uniform(0.03, 0.14), rng.uniform(4.0, 9.0)) if afib else (0.0, 0.0),
        noise=noise, findings=find, generator=generator,
    )


def _template_waves(iv: dict, vec: dict, qt: float, afib: bool, habitus: float,
                    rng: np.random.Generator) -> list[Wave]:
    """Place the waves in time relative to QRS onset."""
    qrs = iv["qrs"]
    waves: list[Wave] = []
    if not afib:
        p_dur = rng.uniform(0.085, 0.11) + (0.03 if iv.get("p_wide") else 0.0)
        pc = -iv["pr"] + p_dur / 2
        if iv.get("p_wide"):  # bifid P (P mitrale): two atria out of step
            waves += [Wave("P", pc - 0.022, p_dur / 7, 0.7 * vec["P"]), Wave("P", pc + 0.022, p_dur / 7, 0.75 * vec["P"])]
        else:
            waves.append(Wave("P", pc, p_dur / 5, vec["P"]))
    if "Q" in vec:
        waves.append(Wave("Q", 0.16 * qrs, qrs / 14, vec["Q"]))
    if "QMI" in vec:
        waves.append(Wave("QMI", 0.022, 0.012, vec["QMI"]))
    if "R2" in vec:  # LBBB: two slow LV humps spread over the wide QRS
        waves += [Wave("R", 0.33 * qrs, qrs / 8, vec["R"]), Wave("R2", 0.65 * qrs, qrs / 7.5, vec["R2"])]
    elif "RBB" in vec:  # RBBB: normal first 80 ms, then the late RV vector
        if "R1" in vec:
            waves.append(Wave("R1", 0.022, 0.008, vec["R1"]))
        waves += [Wave("R", 0.036, 0.0105, vec["R"]), Wave("S", 0.062, 0.009, vec["S"]),
                  Wave("RBB", qrs - 0.03, 0.015, vec["RBB"])]
    else:
        if "R1" in vec:  # version 2: the early force before a sharper main one
            waves += [Wave("R1", 0.3 * qrs, qrs / 10, vec["R1"]),
                      Wave("R", 0.47 * qrs, qrs / 9.5, vec["R"]),
                      Wave("S", 0.76 * qrs, qrs / 12, vec["S"])]
        else:
            waves += [Wave("R", 0.45 * qrs, qrs / 8, vec["R"]),
                      Wave("S", 0.76 * qrs, qrs / 11, vec["S"])]
    sigma_t = rng.uniform(0.04, 0.055) * np.sqrt(qt / 0.4)
    t_peak = qt - 2.3 * sigma_t
    waves += [
        Wave("ST", (qrs + t_peak) / 2, max((t_peak - qrs) / 2.2, 0.02), vec["ST"], 4.0, True),
        Wave("T1", t_peak - 0.3 * sigma_t, sigma_t, 0.8 * vec["T"], 2.0, True),
        Wave("T2", t_peak + 0.45 * sigma_t, 0.6 * sigma_t, 0.45 * vec["T"], 2.0, True),
    ]
    for w in waves:
        w.vec = np.asarray(w.vec, dtype=np.float64) * habitus
    return waves


def beat_onsets(p: RecordParams, rng: np.random.Generator) -> np.ndarray:
    """QRS onset times (s, relative to the start of the synthesised window), shape [B]."""
    rr = 60.0 / p.hr
    n = int((DURATION_S + 2 * MARGIN_S + 1.5) / (rr * 0.6)) + 3
    k = np.arange(n)
    phase = rng.uniform(0, 2 * np.pi)
    if p.afib:
        # Irregularly irregular: independent intervals with a refractory floor.
        rrs = np.maximum(rr * (1 + p.rr_cv * rng.standard_normal(n)), 0.3)
    else:
        rrs = rr * (1 + p.rsa * np.sin(2 * np.pi * p.resp_hz * k * rr + phase) + p.rr_cv * rng.standard_normal(n))
    # Start before the window so the window opens mid-cycle, not on a beat.
    t = np.cumsum(rrs) - rrs[0] - rng.uniform(0, rrs[0]) - 0.5
    return t[t < DURATION_S + 2 * MARGIN_S + 0.1]


def render_dipole(p: RecordParams, rng: np.random.Generator) -> np.ndarray:
    """The heart's dipole over the synthesised window.

    Returns:
        [3, N_BASE] float64, mV, at FS_BASE.
    """
    onsets = beat_onsets(p, rng)
    b = len(onsets)
    rr_prev = np.diff(onsets, prepend=onsets[0] - 60.0 / p.hr)
    qt_stretch = np.clip(np.sqrt(rr_prev * p.hr / 60.0), 0.85, 1.15)
    scale = 1 + 0.04 * rng.standard_normal(b)  # beat-to-beat amplitude jitter
    scale *= 1 + 0.06 * np.sin(2 * np.pi * p.resp_hz * onsets + rng.uniform(0, 6.3))
    w_sig = np.zeros((len(p.waves), N_BASE))
    for m, w in enumerate(p.waves):
        off = w.offset * (qt_stretch if w.repol else 1.0) + 0.002 * rng.standard_normal(b)
        centers = onsets + off
        half = int(np.ceil(4.0 * w.sigma * FS_BASE))
        idx = np.rint(centers * FS_BASE).astype(np.int64)[:, None] + np.arange(-half, half + 1)
        x = np.abs((idx / FS_BASE - centers[:, None]) / w.sigma)
        g = np.exp(-0.5 * x ** w.power) * scale[:, None]
        ok = (idx >= 0) & (idx < N_BASE)
        w_sig[m] = np.bincount(idx[ok], weights=g[ok], minlength=N_BASE)
    vecs = np.stack([w.vec for w in p.waves], 1)  # [3, M]
    dipole = vecs @ w_sig
    if p.afib:
        dipole += _fwaves(p, rng)
    return dipole


def _fwaves(p: RecordParams, rng: np.random.Generator) -> np.ndarray:
    """Fibrillatory waves: a wandering 4-9 Hz atrial oscillation, largest in V1 and II."""
    amp, f0 = p.fwave
    t = _TIME
    drift = 0.6 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t + rng.uniform(0, 6.3))
    phase = 2 * np.pi * np.cumsum(f0 + drift) / FS_BASE + rng.uniform(0, 6.3)
    envelope = 1 + 0.35 * np.sin(2 * np.pi * rng.uniform(0.2, 0.8) * t)
    f = amp * envelope * (np.sin(phase) + 0.3 * np.sin(2 * phase + 1.0))
    direction = _unit(-0.2, 0.5, 0.85)
    return direction[:, None] * f[None, :]


# Electrode -> lead map: rows I, II, V1..V6; columns RA, LA, LL, C1..C6.
_ELECTRODE_TO_LEAD = np.zeros((8, 9))
_ELECTRODE_TO_LEAD[0, :2] = [-1, 1]
_ELECTRODE_TO_LEAD[1, [0, 2]] = [-1, 1]
_ELECTRODE_TO_LEAD[2:, :3] = -1.0 / 3.0
_ELECTRODE_TO_LEAD[2:, 3:] = np.eye(6)
_TIME = np.arange(N_BASE) / FS_BASE
# Version 2's broadband noise: its level (median, mV), its weight per electrode (RA, LA, LL,
# C1..C6) and its spectrum (white, low-passed at 40 Hz: real PTB-XL 500 Hz records have
# little noise above 50 Hz, the 100 Hz ones about 0.02 mV RMS in 30-50 Hz)
_BROADBAND_V2 = 0.06
_WHITE_WEIGHTS = np.array([1.5, 1.5, 1.5, 0.4, 0.8, 1.5, 2.5, 2.8, 2.0])
_BROADBAND_SOS = butter(4, 40.0, fs=FS_BASE, output="sos")


def render_noise(p: RecordParams, rng: np.random.Generator) -> np.ndarray:
    """Baseline wander, EMG (with bursts) and 50 Hz mains at the electrodes, as leads.

    Wander and hum come from a few shared sources (respiration, body motion, the mains)
    coupled into each electrode with its own weight: that is physically what happens and
    costs a handful of sines instead of one per electrode.

    Returns:
        [8, N_BASE] float64 noise in mV for I, II, V1..V6.
    """
    t = _TIME
    nz = p.noise
    freqs = rng.uniform(0.05, 0.6, 3)
    sources = np.sin(2 * np.pi * freqs[:, None] * t + rng.uniform(0, 2 * np.pi, (3, 1)))
    hum_phase = rng.uniform(0, 2 * np.pi)
    hum = np.sin(2 * np.pi * 50.0 * t + hum_phase) + 0.15 * np.sin(2 * np.pi * 150.0 * t + 2 * hum_phase)
    coupling = np.concatenate([
        nz["wander"] * rng.uniform(-1.0, 1.0, (9, 3)),
        nz["hum"] * rng.uniform(0.2, 1.0, (9, 1)),  # unequal electrode impedances
    ], 1)
    electrodes = coupling @ np.concatenate([sources, hum[None, :]], 0)
    # First difference of white noise: EMG energy sits above ~20 Hz.
    white = rng.standard_normal((9, N_BASE + 1), dtype=np.float32)
    level = nz["emg"] * 0.7 * rng.uniform(0.3, 1.0, (9, 1))
    if nz["burst"] > 0:
        c, wdt = rng.uniform(0, DURATION_S), rng.uniform(0.3, 1.5)
        level = level + nz["burst"] * np.exp(-0.5 * ((t - MARGIN_S - c) / wdt) ** 2)[None, :]
    electrodes += (white[:, 1:] - white[:, :-1]) * level
    if nz.get("white"):  # version 2; chest electrodes V3-V6 over the pectoral muscles
        white = sosfilt(_BROADBAND_SOS, rng.standard_normal((9, N_BASE)), axis=-1)
        electrodes += white * (nz["white"] * _WHITE_WEIGHTS[:, None])
    return _ELECTRODE_TO_LEAD @ electrodes


def render_leads(p: RecordParams, rng: np.random.Generator) -> np.ndarray:
    """Independent leads with noise at 500 Hz, including the decimation margins; from
    version 2 each lead is zero-mean over the record's 10 s (margins excluded).

    Returns:
        [8, N_BASE] float64 in mV: I, II, V1..V6.
    """
    leads = p.lead_matrix @ render_dipole(p, rng) + render_noise(p, rng)
    if p.generator >= 2:
        m = int(round(MARGIN_S * FS_BASE))
        leads -= leads[:, m:N_BASE - m].mean(-1, keepdims=True)
    return leads
