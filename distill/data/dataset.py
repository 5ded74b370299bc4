"""The loaded data set: cached signals, labels, splits, scaler, and per-consumer views.

``load_ptbxl`` (and ``load_cinc``) decode every record of a folder once into a
memory-mapped [N_store, 12, T] float32 array (mV, standard lead order) keyed by the record
files and the settings (:mod:`distill.data.cache`); the second load memory-maps it and
never calls wfdb. The task's label selection, the folds and the scaler are cheap and are
recomputed on every load, so one decoded store serves every task.

Consumers read records through :meth:`ECGData.split`, a torch ``Dataset`` whose items carry
one tensor per *view*: a lead subset at a sampling rate (a student may see lead I at 50 Hz
while the teacher sees 12 leads at 100 Hz, both of the same record at the same index).
Scaling and resampling are applied per item (a [12, T] record costs microseconds).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from distill.core.progress import progress_bar

from distill.data import cinc, ptbxl
from distill.data.cache import ArrayCache, fingerprint
from distill.core.leads import NUM_LEADS, lead_indices
from distill.data.parallel import chunk_ranges, chunk_size, data_workers, map_chunks
from distill.core.leads import STANDARD_LEADS
from distill.data.records import fit_length, flat_message, read_record, resample
from distill.core.errors import DataError
from distill.data.render import render_12lead

SCALERS = ("global", "per_lead", "none")
BAD_RECORD_MODES = ("error", "skip")
FLAT_LEAD_MODES = ("error", "skip", "mask")
LEAD_MASK_PREFIX = "lead_mask:"  # batch key of a view's lead mask: "lead_mask:<view name>"
_STORE_VERSION = 1  # bump when the decoding changes, so old cache entries are not trusted
_RESERVED = ("labels", "index", "ecg_id", "draw")


def lead_mask_key(view: str) -> str:
    """The batch entry holding view ``view``'s lead mask (``data.on_flat_lead: mask``):
    bool [L_view], True where the lead is present, in the view's lead order; a batch
    [B, L_view]."""
    return f"{LEAD_MASK_PREFIX}{view}"
# the streams of fixed augmentation draws (ECGSplit ``draws``): a draw's own random numbers,
# and the pick of a record's draw in an epoch; 4-tuples, so never equal to an epoch key
_DRAW_STREAM, _PICK_STREAM = 0xD4A3, 0x91C4


@dataclass(frozen=True)
class SignalView:
    """What one consumer sees of a record.

    Attributes:
        leads: lead names (any case) in the order wanted, or None for all 12 standard leads.
        sampling_rate: Hz; None = the data set's rate.
        upsample: optional; a callable ``(signal [L, T] float32 at sampling_rate, standard
            lead indices) -> [L, T']`` applied last (after scaling and resampling): a learned
            upsampler, e.g. the 25 -> 100 Hz translator, so the consumer reads its output.
    """

    leads: tuple[str, ...] | None = None
    sampling_rate: int | None = None
    upsample: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None = field(
        default=None, compare=False)

    def lead_index(self) -> tuple[int, ...]:
        """Standard indices of ``leads`` (validated)."""
        return lead_indices(self.leads)


@dataclass
class Scaler:
    """A standard scaler fitted on the training records only.

    Attributes:
        kind: ``"global"`` (one mean/std over all train samples of all leads, as the
            PTB-XL benchmark), ``"per_lead"`` (one per lead) or ``"none"``.
        mean: float64 [12] (the same value repeated for ``"global"``).
        std: float64 [12], population std (ddof=0, like sklearn's StandardScaler).
    """

    kind: str
    mean: np.ndarray = field(default_factory=lambda: np.zeros(NUM_LEADS))
    std: np.ndarray = field(default_factory=lambda: np.ones(NUM_LEADS))

    @classmethod
    def fit(cls, store: np.ndarray, rows: np.ndarray, kind: str, chunk: int = 256,
            present: np.ndarray | None = None) -> Scaler:
        """Fit on ``store[rows]`` ([n, 12, T]) in chunks, so memory stays small.

        ``present``: optional bool [n, 12] aligned with ``rows``; the leads marked False
        (missing, ``data.on_flat_lead: mask``) are left out of the statistics."""
        if kind not in SCALERS:
            raise DataError(f"unknown scaler {kind!r}; expected one of {', '.join(SCALERS)}")
        if kind == "none":
            return cls(kind)
        if len(rows) == 0:
            raise DataError("cannot fit the scaler: the train split is empty")
        axes = (0, 1, 2) if kind == "global" else (0, 2)
        n, mean, m2 = 0, 0.0, 0.0
        for start in range(0, len(rows), chunk):
            order = np.argsort(rows[start:start + chunk], kind="stable")
            x = np.asarray(store[rows[start:start + chunk][order]], dtype=np.float64)
            if present is None:
                nb = x.size // (1 if kind == "global" else NUM_LEADS)
                mb = x.mean(axis=axes)
                centred = x - (np.expand_dims(mb, (0, 2)) if kind == "per_lead" else mb)
                m2b = (centred ** 2).sum(axis=axes)
            else:  # the same sums over the present leads only
                w = np.asarray(present[start:start + chunk][order], dtype=np.float64)[:, :, None]
                nb = (w.sum(axis=axes) * x.shape[-1])
                mb = (x * w).sum(axis=axes) / np.maximum(nb, 1)
                centred = x - (np.expand_dims(mb, (0, 2)) if kind == "per_lead" else mb)
                m2b = (w * centred ** 2).sum(axis=axes)
            # Chan et al.'s pairwise update: exact merge of two (count, mean, M2) summaries.
            delta = mb - mean
            total = np.maximum(n + nb, 1)
            m2 = m2 + m2b + delta ** 2 * n * nb / total
            mean = mean + delta * nb / total
            n = n + nb
        std = np.sqrt(m2 / np.maximum(n, 1))
        std = np.where(std > 0, std, 1.0)  # a constant train set: scale by 1, not by 0
        return cls(kind, np.broadcast_to(mean, NUM_LEADS).copy(),
                   np.broadcast_to(std, NUM_LEADS).copy())

    def apply(self, x: np.ndarray, leads: Sequence[int]) -> np.ndarray:
        """Scale x [L, T] whose rows are the standard leads ``leads``; float32."""
        if self.kind == "none":
            return np.asarray(x, dtype=np.float32)
        idx = list(leads)
        return ((x - self.mean[idx, None]) / self.std[idx, None]).astype(np.float32)


class KeptRows:
    """Rows ``rows`` of a store [N_store, 12, T], indexed lazily: ``view[a:b]`` reads only
    those records from the memmap, so a pass in batches never holds the whole set."""

    def __init__(self, store: np.ndarray, rows: np.ndarray):
        self.store, self.rows = store, rows
        self.shape = (len(rows), *store.shape[1:])
        self.dtype = store.dtype
        self.ndim = store.ndim

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        return np.asarray(self.store[self.rows[key]])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = np.asarray(self.store[self.rows])
        return out if dtype is None else out.astype(dtype)


@dataclass
class ECGData:
    """A loaded data set: N kept records over a decoded store.

    Attributes:
        store: float32 [N_store, 12, T] memmap of every decoded record of the folder (mV,
            unscaled); rows of bad (skipped) records are zero and never referenced.
        rows: int64 [N], the store row of each kept record.
        labels: float32 [N, C] multi-hot.
        classes: the C class names (sorted SCP codes / classes, or SNOMED codes).
        ecg_ids: int64 [N] (PTB-XL ecg_id; for CinC the record's position in the scan).
        record_names: N record paths relative to the root, without extension.
        strat_fold: int64 [N].
        splits: split name -> int64 positions into the N records.
        sampling_rate: Hz of the stored signals (T = duration * sampling_rate).
        scaler: fitted on the ``train`` split only.
        fingerprint: a key of the source files and every setting; later caches (rendered
            images, teacher outputs) key on it.
        task: the label task (``ptbxl.TASKS`` or ``"snomed"``).
        info: per kept record metadata (the database rows), index aligned with N.
        label_report: CinC records under a PTB-XL task: the SNOMED codes that could not be
            mapped (:func:`cinc.map_to_task`) and ``dropped_without_label``; else None.
        lead_mask: with ``on_flat_lead="mask"``, bool [N, 12], True where record i's lead
            is present (False: flat, stored as zeros); None otherwise (every lead present).
        flat_report: what ``on_flat_lead`` did (:func:`flat_lead_report`), or None when no
            record had a flat lead.
    """

    store: np.ndarray
    rows: np.ndarray
    labels: np.ndarray
    classes: list[str]
    ecg_ids: np.ndarray
    record_names: list[str]
    strat_fold: np.ndarray
    splits: dict[str, np.ndarray]
    sampling_rate: int
    scaler: Scaler
    fingerprint: str
    task: str
    info: pd.DataFrame
    label_report: dict[str, Any] | None = None
    lead_mask: np.ndarray | None = None
    flat_report: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def signal(self, i: int) -> np.ndarray:
        """Record ``i``'s unscaled signal, float32 [12, T] mV (a memmap row)."""
        return self.store[self.rows[i]]

    @property
    def signals(self) -> np.ndarray | KeptRows:
        """All kept records, [N, 12, T] mV: the memmap itself when every store row is
        kept in order, otherwise a lazy view that reads only the rows it is indexed with
        (``np.asarray`` on it copies everything into memory)."""
        identity = np.arange(len(self.store))
        if len(self.rows) == len(self.store) and np.array_equal(self.rows, identity):
            return self.store
        return KeptRows(self.store, self.rows)

    def split(self, name: str, views: Mapping[str, SignalView] | None = None, *,
              extras: Mapping[str, Any] | None = None, transform: Any = None,
              render: Any = None, seed: int = 0, draws: int = 0,
              draw: int | None = None) -> ECGSplit:
        """A torch Dataset over split ``name`` (``"all"`` = every record, unless a split
        of that name exists). ``views`` default: ``{"signal": SignalView()}``; ``extras``,
        ``transform``, ``render``, ``seed``, ``draws`` and ``draw``: see :class:`ECGSplit`."""
        if name in self.splits:
            indices = self.splits[name]
        elif name == "all":
            indices = np.arange(len(self), dtype=np.int64)
        else:
            raise DataError(f"unknown split {name!r}; have {', '.join(self.splits)} (and 'all')")
        return ECGSplit(self, indices, views, extras=extras, transform=transform, render=render,
                        seed=seed, draws=draws, draw=draw)


class PerDraw:
    """A per-record extra with one array per fixed augmentation draw (for example the
    teacher's outputs on each of K augmented draws): an :class:`ECGSplit` item reads
    ``arrays[d][index]`` for the item's draw ``d``."""

    def __init__(self, arrays: Sequence[Any]) -> None:
        if not arrays:
            raise DataError("PerDraw needs at least one array")
        if len({len(a) for a in arrays}) != 1:
            raise DataError(f"PerDraw arrays differ in length: {[len(a) for a in arrays]}")
        self.arrays = list(arrays)

    def __len__(self) -> int:
        return len(self.arrays[0])

    def at(self, draw: int, index: int) -> np.ndarray:
        return np.array(self.arrays[draw][index])


class ECGSplit(Dataset):
    """Items of one split. Each item is a dict:

    - one float32 tensor [len(view leads), T'] per view name, scaled, then resampled to the
      view's rate (T' = ceil(T * rate / data rate));
    - with a data set loaded with ``on_flat_lead="mask"`` (``data.lead_mask``), one bool
      tensor [len(view leads)] per view under :func:`lead_mask_key` (``lead_mask:<view>``),
      True where the lead is present; a missing lead's row of the view is zeros (after
      scaling, resampling and any upsampler, so a model that ignores the mask reads 0);
    - ``labels`` float32 [C]; ``index`` int (the record's position in the ECGData, the same
      for every view); ``ecg_id`` int;
    - one tensor per ``extras`` entry: ``extras[name][index]`` (per-record arrays such as
      the cached images or a teacher's cached outputs, indexed by record position);
    - ``image`` uint8 [3, H, W] when ``render`` (a RenderConfig) is given: the record drawn
      live, after ``transform`` (for augmentation; otherwise read cached images as an extra).

    ``transform(signal, fs, rng)`` changes the unscaled [12, T] record before the views are
    cut (augmentation); ``rng`` is a numpy Generator seeded by (``seed``, epoch, index),
    so an item is the same whenever it is drawn in the same epoch (resumable, and the same
    in every data-loader worker). :meth:`set_epoch` selects the epoch.

    With ``draws`` = K > 0 the augmentation comes from K fixed draws per record instead:
    draw ``d`` of record ``index`` is seeded by (``seed``, a draw stream, d, index), and the
    draw an item uses in an epoch is picked by a generator seeded by (``seed``, a pick
    stream, epoch, index), so it too depends on nothing but the epoch (resume stays
    exact). The item carries ``draw`` (int), and a :class:`PerDraw` extra gives the row of
    that draw: this is how a student reads the teacher's cached outputs on the very
    augmented record it sees. ``draw`` pins every item to one draw (to compute such a
    cache).
    """

    def __init__(self, data: ECGData, indices: np.ndarray,
                 views: Mapping[str, SignalView] | None = None, *,
                 extras: Mapping[str, Any] | None = None, transform: Any = None,
                 render: Any = None, seed: int = 0, draws: int = 0, draw: int | None = None):
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.views = dict(views) if views is not None else {"signal": SignalView()}
        self.extras = dict(extras or {})
        self.transform = transform
        self.render = render
        self.seed = seed
        self.epoch = 0
        self.draws = int(draws)
        self.draw = draw
        if not self.views:
            raise DataError("a split needs at least one view")
        if self.draws < 0 or (draw is not None and not 0 <= draw < self.draws):
            raise DataError(f"draw {draw} of {draws} fixed augmentation draws")
        if self.draws and transform is None:
            raise DataError("fixed augmentation draws need a transform (the augmentation)")
        for name, arr in self.extras.items():
            if isinstance(arr, PerDraw) and len(arr.arrays) != self.draws:
                raise DataError(f"extra {name!r} has {len(arr.arrays)} draws, the split "
                                f"{self.draws}")
        self._leads = {}
        taken = set(_RESERVED) | ({"image"} if render is not None else set())
        for name in self.extras:
            if name in taken or name in self.views or name.startswith(LEAD_MASK_PREFIX):
                raise DataError(f"extra {name!r} clashes with a view or a reserved name")
            if len(self.extras[name]) != len(data):
                raise DataError(f"extra {name!r} has {len(self.extras[name])} rows for "
                                f"{len(data)} records")
        for name, view in self.views.items():
            if name in taken:
                raise DataError(f"view name {name!r} is reserved ({', '.join(sorted(taken))})")
            if view.sampling_rate is not None and view.sampling_rate <= 0:
                raise DataError(f"view {name!r}: sampling_rate must be positive")
            self._leads[name] = view.lead_index()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws the items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def draw_of(self, index: int) -> int | None:
        """The fixed draw record ``index`` uses in the current epoch (None without draws)."""
        if not self.draws:
            return None
        if self.draw is not None:
            return self.draw
        pick = np.random.default_rng((self.seed, _PICK_STREAM, self.epoch, index))
        return int(pick.integers(self.draws))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        k = int(self.indices[i])
        x = np.asarray(self.data.signal(k))
        fs = self.data.sampling_rate
        d = self.draw_of(k)
        if self.transform is not None:
            rng = np.random.default_rng((self.seed, self.epoch, k) if d is None
                                        else (self.seed, _DRAW_STREAM, d, k))
            x = np.asarray(self.transform(x, fs, rng), dtype=np.float32)
        item: dict[str, torch.Tensor | int] = {}
        present = self.data.lead_mask[k] if self.data.lead_mask is not None else None
        for name, view in self.views.items():
            idx = self._leads[name]
            v = self.data.scaler.apply(x[list(idx)], idx)
            rate = view.sampling_rate or fs
            if rate != fs:
                v = resample(v, fs, rate)
            if view.upsample is not None:
                v = view.upsample(np.asarray(v, dtype=np.float32), idx)
            v = np.ascontiguousarray(v, dtype=np.float32)
            if present is not None:
                here = present[list(idx)]  # (L_view,)
                if not here.all():
                    v = v.copy()
                    v[~here] = 0.0  # a missing lead reads zeros, not -mean/std
                item[lead_mask_key(name)] = torch.from_numpy(here.copy())
            item[name] = torch.from_numpy(v)
        if self.render is not None:
            item["image"] = torch.from_numpy(render_12lead(x, fs, self.render))
        for name, arr in self.extras.items():
            item[name] = torch.from_numpy(arr.at(d, k) if isinstance(arr, PerDraw)
                                          else np.array(arr[k]))
        item["labels"] = torch.from_numpy(self.data.labels[k].copy())
        item["index"] = k
        item["ecg_id"] = int(self.data.ecg_ids[k])
        if d is not None:
            item["draw"] = d
        return item


def _decode_chunk(paths: list[Path], names: list[str], sampling_rate: int, n_samples: int,
                  source_fs: float | None, strict_length: bool, on_bad_record: str,
                  ) -> tuple[np.ndarray, dict[int, str], np.ndarray]:
    """Decode consecutive records (run in a worker process): ``(signals [n, 12, n_samples],
    {index in the chunk: why it failed}, flat bool [n, 12])``; a failed record is zeros,
    or raises in ``error`` mode. A flat lead is not a failure here: its row is zeros and
    ``flat`` marks it (the loaders apply ``on_flat_lead``)."""
    out = np.zeros((len(paths), NUM_LEADS, n_samples), dtype=np.float32)
    flat = np.zeros((len(paths), NUM_LEADS), dtype=bool)
    problems: dict[int, str] = {}
    for i, (path, name) in enumerate(zip(paths, names)):
        try:
            rec = read_record(path, fs=sampling_rate, source=name, expect_fs=source_fs,
                              flat_ok=True)
            length = rec.signal.shape[-1]
            if strict_length and length < 0.99 * n_samples:
                raise DataError(f"{name}: {length / sampling_rate:.2f} s long, "
                                f"expected {n_samples / sampling_rate:.2f} s")
            out[i] = fit_length(rec.signal, n_samples)
            flat[i, list(rec.flat)] = True
        except DataError as e:
            if on_bad_record == "error":
                raise
            problems[i] = str(e)
    return out, problems, flat


def flat_lead_report(policy: str, flat: np.ndarray, names: Sequence[str],
                     lead_names: Sequence[str] = STANDARD_LEADS) -> dict[str, Any] | None:
    """What ``on_flat_lead`` did to the records with a flat lead (``flat`` bool [N, 12] of
    the otherwise good records): ``{"policy", "action" ("errored", "skipped",
    "skipped as bad records", "masked"), "records", "leads": {lead: records}, "first"}``;
    None when no record has a flat lead."""
    with_flat = np.flatnonzero(flat.any(axis=1))
    if not len(with_flat):
        return None
    counts = flat[with_flat].sum(axis=0)
    first = int(with_flat[0])
    return {"policy": policy, "action": {"error": "errored", "skip": "skipped",
                                          "mask": "masked"}[policy],
            "records": int(len(with_flat)),
            "leads": {lead_names[i]: int(c) for i, c in enumerate(counts) if c},
            "first": flat_message(names[first], [lead_names[i] for i in np.flatnonzero(flat[first])])}


def format_flat_report(report: Mapping[str, Any], total: int | None = None) -> str:
    """One line of the data report: ``on_flat_lead: mask: 3 record(s) with flat leads
    masked (V1 3, V2 2)``."""
    of = f" of {total}" if total is not None else ""
    leads = ", ".join(f"{lead} {n}" for lead, n in report["leads"].items())
    line = (f"on_flat_lead: {report['policy']}: {report['records']} record(s){of} with flat "
            f"leads {report['action']} ({leads})")
    if report.get("kept") is not None:
        line += f"; {report['kept']} kept with a lead mask"
    return line


def _decode_store(paths: Sequence[Path], names: Sequence[str], signal_ext: str, *,
                  sampling_rate: int, n_samples: int, kind: str, on_bad_record: str,
                  cache_dir: str | Path | None, progress: bool,
                  source_fs: float | None = None, strict_length: bool = False,
                  on_flat_lead: str = "error",
                  ) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None, dict | None]:
    """Decode (or load from cache) every record into [N, 12, n_samples].

    ``source_fs`` is the rate the folder promises (a header stating another is refused);
    with ``strict_length`` a record shorter than ``n_samples`` (beyond 1%) is refused
    instead of zero-padded (PTB-XL records are all 10 s; CinC records vary, so are padded).

    The store does not depend on ``on_flat_lead``: flat leads are stored as zeros and
    listed in a bool [N, 12] array cached beside it; the policy is applied here. ``error``:
    a record with a flat lead is a bad record (raise, or skip it under ``on_bad_record:
    skip``, as before the policy existed); ``skip``: it is dropped with a warning; ``mask``:
    it is kept, its flat leads marked missing.

    Returns:
        ``(store, drop, key, present, flat_report)``: the memmap, bool [N] marking records
        left out (failed in skip mode, or flat under ``skip``), the cache key, bool [N, 12]
        True where a lead is present (``mask`` only, else None) and
        :func:`flat_lead_report` (None without flat leads).
    """
    if on_bad_record not in BAD_RECORD_MODES:
        raise DataError(f"on_bad_record must be one of {', '.join(BAD_RECORD_MODES)}, "
                        f"got {on_bad_record!r}")
    if on_flat_lead not in FLAT_LEAD_MODES:
        raise DataError(f"on_flat_lead must be one of {', '.join(FLAT_LEAD_MODES)}, "
                        f"got {on_flat_lead!r}")
    files, missing = [], []
    for p in paths:
        for ext in (".hea", signal_ext):
            f = p.with_name(p.name + ext)
            (files if f.is_file() else missing).append(f)
    params = {"kind": kind, "version": _STORE_VERSION, "fs": sampling_rate, "n": n_samples,
              "records": [str(p) for p in paths], "missing": [str(m) for m in missing]}
    key = fingerprint(files, params)
    cache = ArrayCache(cache_dir)
    shape = (len(paths), NUM_LEADS, n_samples)

    def fill(out: np.ndarray) -> None:
        problems: dict[str, str] = {}
        n = len(paths)
        workers = data_workers(n)
        chunk = chunk_size(n, workers, 1000)
        ranges = chunk_ranges(n, chunk)
        tasks = [(list(paths[s:e]), list(names[s:e]), sampling_rate, n_samples, source_fs,
                  strict_length, on_bad_record) for s, e in ranges]
        flat = np.zeros((n, NUM_LEADS), dtype=bool)
        with progress_bar(total=n, desc=f"decoding {n} records", unit="ecg", enabled=progress) as bar:
            for (s, e), (signals, failed, flats) in zip(ranges,
                                                         map_chunks(_decode_chunk, tasks, workers)):
                out[s:e] = signals
                flat[s:e] = flats
                problems.update({str(s + i): msg for i, msg in failed.items()})
                bar.update(e - s)
        bad = np.zeros(len(paths), dtype=bool)
        bad[[int(i) for i in problems]] = True
        # Written before the store is renamed into place, so a store never exists
        # without its bad-record and flat-lead lists.
        cache.get_or_build(f"{kind}-bad", key, bad.shape, bool,
                           lambda o: o.__setitem__(slice(None), bad), {"problems": problems})
        cache.get_or_build(f"{kind}-flat", key, flat.shape, bool,
                           lambda o: o.__setitem__(slice(None), flat))

    store = cache.get_or_build(kind, key, shape, np.float32, fill, {"params": params})
    bad = cache.load(f"{kind}-bad", key)
    flat = cache.load(f"{kind}-flat", key)
    if bad is None or flat is None:
        # a list was deleted by hand, or the store predates the flat-lead list (its bad
        # list then counts flat records as failed): decode again rather than guess
        for name in (kind, f"{kind}-bad", f"{kind}-flat"):
            cache.path(name, key).unlink(missing_ok=True)
        return _decode_store(paths, names, signal_ext, sampling_rate=sampling_rate,
                             n_samples=n_samples, kind=kind, on_bad_record=on_bad_record,
                             cache_dir=cache_dir, progress=progress, source_fs=source_fs,
                             strict_length=strict_length, on_flat_lead=on_flat_lead)
    bad = np.asarray(bad, dtype=bool)
    flat = np.asarray(flat, dtype=bool) & ~bad[:, None]  # a failed record has no leads
    report = flat_lead_report(on_flat_lead, flat, names)
    problems: dict[str, str] = {}
    if bad.any():
        meta = cache.path(f"{kind}-bad", key).with_suffix(".json")
        try:
            problems = json.loads(meta.read_text())["problems"]
        except (OSError, ValueError, KeyError):  # metadata lost or damaged: the flags suffice
            problems = {}
    with_flat = flat.any(axis=1)
    drop = bad.copy()
    if on_flat_lead == "error" and with_flat.any():
        # as before on_flat_lead existed: a flat lead makes a bad record
        for i in np.flatnonzero(with_flat):
            problems[str(i)] = flat_message(
                names[i], [STANDARD_LEADS[j] for j in np.flatnonzero(flat[i])])
        problems = dict(sorted(problems.items(), key=lambda kv: int(kv[0])))
        drop |= with_flat
        if on_bad_record == "skip":
            report["action"] = "skipped as bad records"
    if drop.any():
        first = next(iter(problems.values()), f"record {names[int(np.argmax(drop))]} is bad")
        if on_bad_record == "error":
            raise DataError(first)
        warnings.warn(f"skipped {int(drop.sum())} bad record(s) of {len(paths)}; first: {first}",
                      stacklevel=3)
    if on_flat_lead == "skip" and with_flat.any():
        drop |= with_flat
        warnings.warn(f"skipped {int(with_flat.sum())} record(s) with flat leads of "
                      f"{len(paths)} (on_flat_lead: skip); first: {report['first']}",
                      stacklevel=3)
    present = ~flat if on_flat_lead == "mask" else None
    return store, drop, key, present, report


def _cached_scaler(store: np.ndarray, train_rows: np.ndarray, kind: str, store_key: str,
                   cache_dir: str | Path | None, present: np.ndarray | None = None) -> Scaler:
    """Scaler.fit, with its statistics cached next to the store (a pass over the whole
    train array costs seconds at 500 Hz; the statistics are 2 x 12 numbers). ``present``:
    bool [len(train_rows), 12], the leads to fit on (missing ones left out), or None."""
    if kind == "none" or len(train_rows) == 0:
        return Scaler.fit(store, train_rows, kind, present=present)
    rows_hash = hashlib.sha256(np.ascontiguousarray(train_rows, dtype=np.int64).tobytes())
    params = {"store": store_key, "kind": kind, "rows": rows_hash.hexdigest()}
    if present is not None:
        params["present"] = hashlib.sha256(np.ascontiguousarray(present).tobytes()).hexdigest()
    key = fingerprint((), params)

    def fill(out: np.ndarray) -> None:
        fitted = Scaler.fit(store, train_rows, kind, present=present)
        out[0], out[1] = fitted.mean, fitted.std

    stats = ArrayCache(cache_dir).get_or_build("scaler", key, (2, NUM_LEADS), np.float64, fill)
    return Scaler(kind, np.array(stats[0]), np.array(stats[1]))


def _finish(store: np.ndarray, rows: np.ndarray, labels: np.ndarray, classes: list[str],
            ecg_ids: np.ndarray, names: list[str], strat_fold: np.ndarray, info: pd.DataFrame,
            *, folds: Mapping[str, Sequence[int]] | None, scaler: str, sampling_rate: int,
            store_key: str, task: str, settings: Mapping[str, object],
            cache_dir: str | Path | None, present: np.ndarray | None = None,
            flat_report: dict[str, Any] | None = None) -> ECGData:
    splits = ptbxl.fold_indices(strat_fold, folds)
    if scaler != "none" and "train" not in splits:
        raise DataError("the folds need a 'train' split to fit the scaler (or use scaler='none')")
    lead_mask = None
    if present is not None:  # on_flat_lead: mask (only then does it enter the fingerprint)
        lead_mask = np.ascontiguousarray(present[rows], dtype=bool)
        settings = {**settings, "on_flat_lead": "mask"}
        if flat_report is not None:
            flat_report = {**flat_report, "kept": int((~lead_mask.all(axis=1)).sum())}
    train_rows = rows[splits["train"]] if scaler != "none" else rows[:0]
    train_present = None
    if lead_mask is not None and scaler != "none" and not lead_mask[splits["train"]].all():
        train_present = lead_mask[splits["train"]]
    fitted = _cached_scaler(store, train_rows, scaler, store_key, cache_dir, train_present)
    # Rows, ids and labels enter the key too: an edited database that keeps the same
    # counts but other records or labels must not reuse images or teacher outputs.
    content = hashlib.sha256()
    for array in (rows, ecg_ids, labels):
        content.update(np.ascontiguousarray(array).tobytes())
    key = fingerprint((), {"store": store_key, "task": task, "scaler": scaler, "classes": classes,
                           "folds": {k: list(map(int, v)) for k, v in splits.items()},
                           "content": content.hexdigest(), **settings})
    return ECGData(store=store, rows=rows, labels=labels, classes=classes, ecg_ids=ecg_ids,
                   record_names=names, strat_fold=strat_fold, splits=splits,
                   sampling_rate=sampling_rate, scaler=fitted, fingerprint=key, task=task,
                   info=info.reset_index(drop=False), lead_mask=lead_mask,
                   flat_report=flat_report)


def load_ptbxl(root: str | Path, *, task: str = "superdiagnostic", sampling_rate: int = 100,
               folds: Mapping[str, Sequence[int]] | None = None, min_samples: int = 0,
               scaler: str = "global", on_bad_record: str = "error",
               cache_dir: str | Path | None = None, progress: bool = True,
               duration: float = 10.0, classes: Sequence[str] | None = None,
               keep_unlabeled: bool = False, on_flat_lead: str = "error") -> ECGData:
    """Load a PTB-XL-layout folder with the benchmark's labels, folds and scaler.

    Args:
        root: folder with ``ptbxl_database.csv``, ``scp_statements.csv`` and ``records100/``
            (for rates up to 100 Hz) or ``records500/`` (above).
        task: one of ``ptbxl.TASKS``.
        sampling_rate: Hz of the stored signals; 100 reads ``filename_lr``, 500
            ``filename_hr``, other rates are resampled from the nearest folder.
        folds: split name -> strat_folds (default train 1-8, val 9, test 10).
        min_samples: drop classes carried by ``min_samples`` records or fewer.
        scaler: ``"global"`` (benchmark), ``"per_lead"`` or ``"none"``; fitted on train.
        on_bad_record: ``"error"`` raises DataError at the first bad record; ``"skip"``
            warns with a count and drops bad records from labels, folds and scaler.
        on_flat_lead: a record with a flat (constant) lead: ``"error"`` makes it a bad
            record (``on_bad_record`` decides); ``"skip"`` drops it with a warning;
            ``"mask"`` keeps it with the lead marked missing (``ECGData.lead_mask``; the
            lead is zeros in every view and each view's mask is served, see
            :class:`ECGSplit`). ``ECGData.flat_report`` counts what happened.
        cache_dir: the decoded-signal cache (default ``default_cache_dir()``).
        progress: show a tqdm bar while decoding for the first time.
        duration: seconds per record; longer records are cropped, shorter zero-padded.
        classes: a fixed class list instead of the classes present.
        keep_unlabeled: keep the records without a label of ``task`` (all-zero label
            rows; the benchmark drops them): a transfer set's records, whose labels are
            never read.

    Returns:
        An :class:`ECGData` with signals [N, 12, duration * sampling_rate].
    """
    root = Path(root)
    db, statements = ptbxl.read_database(root), ptbxl.read_statements(root)
    _, column, source_rate = ptbxl.record_folder(root, sampling_rate)
    ptbxl.require_columns(db, [column], root / ptbxl.DATABASE_FILE)
    empty = db.index[db[column].isna() | (db[column].astype(str).str.strip() == "")]
    if len(empty):
        raise DataError(f"{root / ptbxl.DATABASE_FILE}: ecg_id {empty[0]}: empty {column} "
                        f"({len(empty)} record(s)); sampling_rate={sampling_rate} needs it")
    paths = [root / str(f) for f in db[column]]
    names = [f"ecg_id {i} ({p})" for i, p in zip(db.index, paths)]
    n_samples = int(round(duration * sampling_rate))
    store, bad, store_key, present, flat_report = _decode_store(
        paths, names, ".dat", sampling_rate=sampling_rate, n_samples=n_samples,
        kind=f"ptbxl{sampling_rate}", on_bad_record=on_bad_record, cache_dir=cache_dir,
        progress=progress, source_fs=source_rate, strict_length=True,
        on_flat_lead=on_flat_lead)
    good = db[~bad]
    labels, cls, keep = ptbxl.aggregate_labels(good, statements, task, min_samples, classes)
    settings: dict[str, Any] = {"min_samples": min_samples}
    if keep_unlabeled:
        labels = _unlabeled_rows_kept(labels, keep)
        keep = np.ones(len(keep), dtype=bool)
        settings["keep_unlabeled"] = True
    rows = np.flatnonzero(~bad)[keep].astype(np.int64)
    kept = db.iloc[rows]
    return _finish(store, rows, labels, cls, kept.index.to_numpy(np.int64),
                   [str(f) for f in kept[column]], kept["strat_fold"].to_numpy(np.int64),
                   kept, folds=folds, scaler=scaler, sampling_rate=sampling_rate,
                   store_key=store_key, task=task, settings=settings,
                   cache_dir=cache_dir, present=present, flat_report=flat_report)


def _unlabeled_rows_kept(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Labels [K, C] of the kept rows of ``keep`` [N] -> [N, C] with zeros elsewhere."""
    full = np.zeros((len(keep), labels.shape[1]), dtype=labels.dtype)
    full[keep] = labels
    return full


def load_cinc(folder: str | Path, *, task: str = "snomed", sampling_rate: int = 100,
              duration: float = 10.0,
              classes: Sequence[str] | None = None, min_samples: int = 0,
              folds: Mapping[str, Sequence[int]] | None = None, n_folds: int = 10,
              scaler: str = "global", on_bad_record: str = "error",
              cache_dir: str | Path | None = None, progress: bool = True,
              keep_unlabeled: bool = False, on_flat_lead: str = "error") -> ECGData:
    """Load a PhysioNet/CinC folder (``.hea`` + ``.mat``, recursively) with SNOMED labels.

    Folds are assigned by :func:`cinc.hash_folds` (deterministic from the record name);
    ``folds`` maps split names onto them as for PTB-XL. Records without any label in
    ``classes`` (default: the sorted codes present, less those carried by ``min_samples``
    records or fewer) are dropped, unless ``keep_unlabeled``. ``ecg_ids`` are the
    records' positions in the sorted scan. Other arguments (``on_flat_lead`` too) as
    :func:`load_ptbxl`.

    ``task``: ``"snomed"`` (default) makes the SNOMED codes the classes; one of
    ``ptbxl.TASKS`` maps the codes onto PTB-XL statements and that task's classes
    (:func:`cinc.map_to_task`); the codes it could not map are listed in the returned
    data's ``label_report`` (records left without a label are dropped, as on PTB-XL,
    unless ``keep_unlabeled``; the report counts them as ``dropped_without_label``).
    """
    folder = Path(folder)
    table = cinc.scan_folder(folder)
    paths = [folder / p for p in table["path"]]
    names = [f"record {r} ({p})" for r, p in zip(table["path"], paths)]
    store, bad, store_key, present, flat_report = _decode_store(
        paths, names, ".mat", sampling_rate=sampling_rate,
        n_samples=int(round(duration * sampling_rate)), kind=f"cinc{sampling_rate}",
        on_bad_record=on_bad_record, cache_dir=cache_dir, progress=progress,
        on_flat_lead=on_flat_lead)
    good = np.flatnonzero(~bad)
    dx = [table.at[i, "dx"] for i in good]
    settings: dict[str, Any] = {"n_folds": n_folds, "min_samples": min_samples}
    report: dict[str, Any] | None = None
    if task == cinc.SNOMED_TASK:
        labels, cls = cinc.label_matrix(dx, classes)
        if classes is None and min_samples > 0:
            frequent = labels.sum(axis=0) > min_samples
            labels, cls = labels[:, frequent], [c for c, f in zip(cls, frequent) if f]
        keep = labels.sum(axis=1) > 0
        labels = labels[keep]
    else:
        sets, report = cinc.map_to_task(dx, task)
        known = set(ptbxl.label_map(cinc.read_statements(), task).values())
        labels, cls, keep = ptbxl.label_sets_matrix(sets, known, task, min_samples, classes)
        report["dropped_without_label"] = 0 if keep_unlabeled else int((~keep).sum())
        settings["mapping"] = cinc.mapping_digest()  # an edited table must not reuse caches
    if keep_unlabeled:
        labels = _unlabeled_rows_kept(labels, keep)
        keep = np.ones(len(keep), dtype=bool)
        settings["keep_unlabeled"] = True
    rows = good[keep].astype(np.int64)
    kept = table.iloc[rows]
    data = _finish(store, rows, labels, cls, rows.copy(), list(kept["path"]),
                   cinc.hash_folds(list(kept["path"]), n_folds), kept, folds=folds,
                   scaler=scaler, sampling_rate=sampling_rate, store_key=store_key,
                   task=task, settings=settings, cache_dir=cache_dir, present=present,
                   flat_report=flat_report)
    data.label_report = report
    return data


__all__ = ["SignalView", "Scaler", "ECGData", "ECGSplit", "load_ptbxl", "load_cinc",
           "SCALERS", "BAD_RECORD_MODES", "FLAT_LEAD_MODES", "lead_mask_key",
           "flat_lead_report", "format_flat_report"]
