"""Reading one WFDB record into float32 [12, T] millivolts in the standard lead order.

Both layouts the project meets go through :func:`read_record`:

- PTB-XL: ``<name>.hea`` + ``<name>.dat`` (format 16), lead names ``I II III AVR AVL AVF V1..V6``;
- PhysioNet/CinC 2020-2021: ``<name>.hea`` + ``<name>.mat`` (MATLAB v4 with a 24-byte
  preamble, header format ``16x1+24``), lead names ``... aVR aVL aVF ...``, units ``mv``.

Every problem a user can meet with real files (a missing or truncated file, a header wfdb
cannot parse, NaN samples, a flat or missing lead) is reported as one line of
:class:`~distill.core.errors.DataError` that names the record, never as a traceback from inside
wfdb or numpy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import wfdb
from scipy.signal import resample_poly

from distill.core.leads import NUM_LEADS, STANDARD_LEADS, standard_order
from distill.core.errors import DataError

# A lead whose standard deviation over the whole record is below this (in mV) carries no
# signal: 1e-4 mV is a tenth of one ADC step at the usual 1 µV resolution, so any lead
# that moves by even one count passes, and an all-constant (disconnected) lead fails.
FLAT_STD_MV = 1e-4

# Bytes per sample of the WFDB storage formats, used to tell a truncated signal file
# before wfdb fails on it with a reshape error.
_BYTES_PER_SAMPLE = {
    "8": 1.0, "16": 2.0, "24": 3.0, "32": 4.0, "61": 2.0, "80": 1.0, "160": 2.0,
    "212": 1.5, "310": 4.0 / 3.0, "311": 4.0 / 3.0,
}

# Physical units wfdb may report, as a factor to millivolts.
_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}


@dataclass
class Record:
    """One decoded record.

    Attributes:
        signal: float32 [12, T], millivolts, rows in ``STANDARD_LEADS`` order.
        fs: sampling rate of ``signal`` in Hz (after any resampling).
        lead_names: the standard lead names (the rows of ``signal``).
        comments: the header's ``#`` comment lines, without the ``#``.
        path: the record path without extension.
        flat: the rows of the flat leads (:func:`flat_leads`), only when read with
            ``flat_ok``; those rows are zeros.
    """

    signal: np.ndarray
    fs: float
    lead_names: tuple[str, ...] = STANDARD_LEADS
    comments: list[str] = field(default_factory=list)
    path: str = ""
    flat: tuple[int, ...] = ()


def resample(signal: np.ndarray, fs_from: float, fs_to: float) -> np.ndarray:
    """Resample along the last axis with a polyphase anti-aliasing filter.

    ``scipy.signal.resample_poly`` low-pass filters before decimating, so 500 Hz -> 100 Hz
    is a proper decimation (no aliasing of content above 50 Hz).

    Args:
        signal: [..., T] array.
        fs_from: its sampling rate in Hz.
        fs_to: the wanted rate in Hz.

    Returns:
        float32 [..., ceil(T * fs_to / fs_from)] (the input itself, as float32, when the
        rates are equal).
    """
    if fs_from <= 0 or fs_to <= 0:
        raise DataError(f"sampling rates must be positive, got {fs_from} -> {fs_to}")
    ratio = (Fraction(fs_to) / Fraction(fs_from)).limit_denominator(10_000)
    if ratio == 1:
        return np.asarray(signal, dtype=np.float32)
    out = resample_poly(np.asarray(signal, dtype=np.float64), ratio.numerator,
                        ratio.denominator, axis=-1)
    return out.astype(np.float32)


def fit_length(signal: np.ndarray, n_samples: int) -> np.ndarray:
    """Crop ([..., :n]) or zero-pad at the end to exactly ``n_samples`` along the last axis."""
    t = signal.shape[-1]
    if t >= n_samples:
        return signal[..., :n_samples]
    pad = [(0, 0)] * (signal.ndim - 1) + [(0, n_samples - t)]
    return np.pad(signal, pad)


def flat_leads(signal: np.ndarray) -> np.ndarray:
    """The rows of ``signal`` [L, T] (mV) that are flat: a standard deviation over the
    record below :data:`FLAT_STD_MV` (a constant, e.g. disconnected, lead); int64 [F]."""
    return np.flatnonzero(signal.std(axis=1) < FLAT_STD_MV)


def flat_message(source: str, leads: Sequence[str]) -> str:
    """The one-line error of a record with flat leads (``data.on_flat_lead: error``)."""
    return f"{source}: flat lead(s) {', '.join(leads)} (zero variance over the record)"


def check_signal(signal: np.ndarray, source: str,
                 lead_names: tuple[str, ...] = STANDARD_LEADS,
                 flat_ok: bool = False) -> list[int]:
    """Refuse a signal with NaN/inf samples or (unless ``flat_ok``) a flat lead.

    Args:
        signal: [L, T] in mV.
        source: what to name in the message (record id and path).
        lead_names: the names of the L rows, for the message.
        flat_ok: return the flat rows instead of refusing them.

    Returns:
        The rows of the flat leads (empty unless ``flat_ok``).

    Raises:
        DataError: one line naming ``source``, the lead and the problem.
    """
    if signal.ndim != 2 or signal.shape[1] == 0:
        raise DataError(f"{source}: empty or malformed signal of shape {signal.shape}")
    finite = np.isfinite(signal)
    if not finite.all():
        lead = int(np.argmin(finite.all(axis=1)))
        n_bad = int((~finite).sum())
        raise DataError(f"{source}: {n_bad} NaN/inf sample(s), first in lead {lead_names[lead]}")
    flat = [int(i) for i in flat_leads(signal)]
    if flat and not flat_ok:
        raise DataError(flat_message(source, [lead_names[i] for i in flat]))
    return flat


def _read_header(path: Path, source: str) -> wfdb.Record:
    hea = path.with_name(path.name + ".hea")
    if not hea.is_file():
        raise DataError(f"{source}: missing header file {hea}")
    try:
        return wfdb.rdheader(str(path))
    except Exception as e:  # wfdb raises many types for bad headers; one line is what helps
        raise DataError(f"{source}: corrupt header {hea} ({type(e).__name__}: {e})") from None


def _check_signal_files(header: wfdb.Record, path: Path, source: str) -> None:
    """Each signal file exists and is long enough for the samples the header promises."""
    n_sig_in_file: dict[str, int] = {}
    for name in header.file_name or []:
        n_sig_in_file[name] = n_sig_in_file.get(name, 0) + 1
    if not n_sig_in_file:
        raise DataError(f"{source}: header {path}.hea names no signal file")
    for name, n_sig in n_sig_in_file.items():
        f = path.parent / name
        if not f.is_file():
            raise DataError(f"{source}: missing signal file {f}")
        i = header.file_name.index(name)
        bps = _BYTES_PER_SAMPLE.get(str(header.fmt[i]))
        if bps is None or header.sig_len is None:
            continue
        offset = (header.byte_offset[i] if header.byte_offset else None) or 0
        expected = offset + math.ceil(header.sig_len * n_sig * bps)
        size = os.path.getsize(f)
        if size < expected:
            raise DataError(
                f"{source}: truncated signal file {f} ({size} bytes, header needs {expected})"
            )


def _to_mv(p_signal: np.ndarray, units: list[str] | None, source: str) -> np.ndarray:
    factors = []
    for u in units or [""] * p_signal.shape[1]:
        key = (u or "").strip().lower()
        if key not in _TO_MV:
            raise DataError(f"{source}: unsupported signal unit {u!r}")
        factors.append(_TO_MV[key])
    return p_signal * np.asarray(factors)[None, :]


def read_record(path: str | os.PathLike, *, fs: float | None = None,
                source: str | None = None, check: bool = True,
                expect_fs: float | None = None, flat_ok: bool = False) -> Record:
    """Read one WFDB record (``.hea`` + ``.dat`` or ``.mat``) as [12, T] mV, standard order.

    Args:
        path: the record path without extension (``.../records100/00000/00001_lr``).
        fs: resample to this rate (Hz); None keeps the record's own rate.
        source: how to name the record in errors (default: the path); loaders pass
            ``"ecg_id 17 (path)"``.
        check: refuse NaN/inf samples and flat leads (:func:`check_signal`).
        expect_fs: the rate the record's folder promises (PTB-XL's records100 / records500);
            a header that states another rate is refused rather than silently resampled.
        flat_ok: with ``check``, keep a record with flat leads: their rows are zeros and
            ``Record.flat`` lists them (the data loaders apply ``data.on_flat_lead``).

    Returns:
        A :class:`Record` with ``signal`` float32 [12, T'] in mV.

    Raises:
        DataError: a missing, truncated or corrupt file, a missing/unknown lead, an unknown
        unit, NaN or a flat lead, each as one line naming ``source``.
    """
    path = Path(path)
    source = source or str(path)
    hea = path.with_name(path.name + ".hea")
    if not hea.is_file():
        raise DataError(f"{source}: missing header file {hea}")
    try:
        # wfdb's header parsing dominates the decoding time, so a good record is parsed
        # once; the header is read again only to explain a failure.
        rec = wfdb.rdrecord(str(path), physical=True)
    except Exception as e:  # wfdb/numpy fail in many ways on bad files
        header = _read_header(path, source)
        _check_signal_files(header, path, source)
        raise DataError(f"{source}: cannot decode signal ({type(e).__name__}: {e})") from None
    if rec.p_signal is None or rec.p_signal.ndim != 2:
        raise DataError(f"{source}: no signal decoded")
    if rec.sig_len is not None and rec.p_signal.shape[0] != rec.sig_len:
        raise DataError(f"{source}: decoded {rec.p_signal.shape[0]} samples, header says "
                        f"{rec.sig_len} (truncated file?)")
    order = standard_order(rec.sig_name or [], source=source)
    mv = _to_mv(rec.p_signal, rec.units, source)
    signal = np.ascontiguousarray(mv[:, order].T, dtype=np.float32)
    assert signal.shape[0] == NUM_LEADS
    flat: list[int] = []
    if check:
        flat = check_signal(signal, source, flat_ok=flat_ok)
    rate = float(rec.fs)
    if expect_fs is not None and rate != float(expect_fs):
        raise DataError(f"{source}: header says {rate:g} Hz, but its folder holds "
                        f"{float(expect_fs):g} Hz records")
    if fs is not None and fs != rate:
        signal, rate = resample(signal, rate, fs), float(fs)
    if flat:  # a constant lead carries nothing; zeros also after resampling's edge ripple
        signal[flat] = 0.0
    return Record(signal=signal, fs=rate, comments=list(rec.comments or []), path=str(path),
                  flat=tuple(flat))
