"""A record -> the input a saved student expects, from what its config stores.

A student's config says what it reads and how its inputs were scaled in training:
``leads`` (the rows of ``signal``, any subset and order), ``sampling_rate``,
``input_samples`` and ``normalization`` (the scaler fitted on the training folds: kind,
mean and std per standard lead, in mV). :func:`prepare_record` applies all of it to a
WFDB file (PTB-XL ``.hea`` + ``.dat`` or CinC ``.hea`` + ``.mat``), so a published student
can be used on any record without the training code's data set::

    import torch
    from transformers import AutoModel

    import students
    from students.preprocess import prepare_record

    model = AutoModel.from_pretrained("path/to/exported/folder").eval()
    signal = prepare_record("records100/00000/00001_lr", model.config)  # (1, L, T)
    probs = torch.sigmoid(model(signal=signal).logits)

The steps are those of the training data path (:class:`distill.data.dataset.ECGSplit`),
built from the same pieces: the record is read in millivolts in the standard lead order
(:func:`distill.data.records.read_record`), the model's leads are picked, scaled with the
stored statistics (:class:`distill.data.dataset.Scaler`), resampled to the model's rate
(:func:`distill.data.records.resample`) and cropped or zero-padded to ``input_samples``
(:func:`distill.data.records.fit_length`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from distill.core.leads import STANDARD_LEADS, lead_indices
from distill.core.errors import DataError
from distill.data.dataset import Scaler
from distill.data.records import fit_length, read_record, resample
from distill.data.render import render_12lead
from distill.data.render_layout import RenderConfig

REQUIRED_FIELDS = ("leads", "sampling_rate", "input_samples")


def _field(config: Any, name: str) -> Any:
    value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    if value is None and name in REQUIRED_FIELDS:
        raise DataError(f"the model config has no {name!r}; not an ecg-distill student config")
    return value


def scaler_from_config(config: Any):
    """The :class:`~distill.data.dataset.Scaler` stored in a student config's
    ``normalization`` ({kind, mean, std, ...}); the identity (kind ``"none"``) when the
    config stores none.

    Args:
        config: a student config (``PretrainedConfig``) or its dict (``config.json``).
    """
    norm = _field(config, "normalization")
    if not norm:
        return Scaler("none")
    try:
        kind = norm["kind"]
        mean, std = np.asarray(norm["mean"], float), np.asarray(norm["std"], float)
    except (KeyError, TypeError) as exc:
        raise DataError(f"the model config's normalization lacks {exc}") from None
    if kind != "none" and (mean.shape != (len(STANDARD_LEADS),) or std.shape != mean.shape):
        raise DataError(f"the model config's normalization must give 12 means and stds (one per "
                        f"standard lead), got {mean.shape} and {std.shape}")
    return Scaler(kind, mean, std) if kind != "none" else Scaler("none")


def prepare_signal(signal: np.ndarray, fs: float, config: Any,
                   lead_names: Sequence[str] = STANDARD_LEADS) -> np.ndarray:
    """An ECG in millivolts -> one model input row set, float32 ``[len(leads), input_samples]``.

    Args:
        signal: ``[L_in, T]`` in mV, rows named by ``lead_names`` (any order; every lead the
            model reads must be among them).
        fs: its sampling rate in Hz.
        config: the student's config (or its dict).
        lead_names: the names of ``signal``'s rows (default: the 12 standard leads in order).

    Returns:
        float32 ``[len(config.leads), config.input_samples]``: the model's leads in its
        order, scaled with its stored statistics, at its rate, cropped or zero-padded.

    Raises:
        DataError: a lead the model reads is missing, or the config lacks a field.
    """
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 2 or signal.shape[0] != len(lead_names):
        raise DataError(f"expected a signal of shape [{len(lead_names)}, T] for leads "
                        f"{', '.join(lead_names)}, got {list(signal.shape)}")
    wanted = lead_indices(_field(config, "leads"))  # standard index of each model row
    have = {i: row for row, i in enumerate(lead_indices(lead_names))}
    missing = [STANDARD_LEADS[i] for i in wanted if i not in have]
    if missing:
        raise DataError(f"the model reads lead(s) {', '.join(missing)}, which the signal lacks")
    x = signal[[have[i] for i in wanted]]  # (L, T) in the model's lead order
    x = scaler_from_config(config).apply(x, wanted)  # scaled before resampling, as in training
    rate = int(_field(config, "sampling_rate"))
    if float(fs) != rate:
        x = resample(x, float(fs), rate)
    return np.ascontiguousarray(fit_length(x, int(_field(config, "input_samples"))),
                                dtype=np.float32)


def prepare_record(record: str | os.PathLike, config: Any) -> torch.Tensor:
    """Read a WFDB record and make it the student's input: a batch of one.

    Args:
        record: the record path without extension (``.../00001_lr`` for ``00001_lr.hea``
            + ``.dat``, or a CinC ``.hea`` + ``.mat`` pair); any lead order and names
            (``AVR`` / ``aVR``), units mV or µV, any sampling rate.
        config: the student's config (``model.config``) or its dict.

    Returns:
        float32 tensor ``[1, len(config.leads), config.input_samples]``.

    Raises:
        DataError: one line naming the record: missing or corrupt files, a missing lead,
        NaN samples or a flat lead. (The reader expects the 12 standard leads; for a
        record with fewer, read it with ``wfdb.rdrecord`` and pass its ``p_signal.T``,
        ``fs`` and ``sig_name`` to :func:`prepare_signal`, which needs only the model's
        leads.)
    """
    rec = read_record(record)  # (12, T) mV in the standard order, at the record's own rate
    return torch.from_numpy(prepare_signal(rec.signal, rec.fs, config))[None]


def printout_config(config: Any) -> RenderConfig:
    """The printout an image student reads (its ``image_size`` and ``render`` settings)."""
    size = _field(config, "image_size")
    if not size:
        raise DataError("the model config has no 'image_size'; not an image student's config")
    render = _field(config, "render") or {}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in render.items()}
    return RenderConfig(height=int(size), width=int(size), **fields)


def prepare_printout_signal(signal: np.ndarray, fs: float, config: Any) -> np.ndarray:
    """A 12-lead ECG in millivolts (standard order) -> the printout an image student reads,
    uint8 ``[3, S, S]``: resampled to the rate it was trained on, cropped or zero-padded to
    its length, and printed with its render settings, as the training data path printed
    every record (unscaled: a printout shows millivolts)."""
    x = np.asarray(signal, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != len(STANDARD_LEADS):
        raise DataError(f"expected a 12-lead signal [12, T] in the standard order, got "
                        f"{list(x.shape)}")
    rate = int(_field(config, "sampling_rate"))
    if float(fs) != rate:
        x = resample(x, float(fs), rate)
    x = fit_length(x, int(_field(config, "input_samples")))
    return render_12lead(x, rate, printout_config(config))


def prepare_printout(record: str | os.PathLike, config: Any) -> torch.Tensor:
    """Read a WFDB record and print it as an image student's input: a batch of one,
    uint8 ``[1, 3, S, S]`` (:func:`prepare_printout_signal`). A scanned or photographed
    printout goes in instead as an RGB uint8 array resized to S x S."""
    rec = read_record(record)  # (12, T) mV in the standard order
    return torch.from_numpy(prepare_printout_signal(rec.signal, rec.fs, config))[None]


__all__ = ["prepare_printout", "prepare_printout_signal", "prepare_record", "prepare_signal",
           "printout_config", "scaler_from_config"]
