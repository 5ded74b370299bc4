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
from distill.data.records import fit_length, read_record, resample
from distill.core.errors import DataError
from distill.data.render import render_12lead

SCALERS = ("global", "per_lead", "none")
BAD_RECORD_MODES = ("error", "skip")
_STORE_VERSION = 1  # bump when the decoding changes, so old cache entries are not trusted
_RESERVED = ("labels", "index", "ecg_id", "draw")
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
    def fit(cls, store: np.ndarray, rows: np.ndarray, kind: str, chunk: int = 256) -> Scaler:
        """Fit on ``store[rows]`` ([n, 12, T]) in chunks, so memory stays small."""
        if kind not in SCALERS:
            raise DataError(f"unknown scaler {kind!r}; expected one of {', '.join(SCALERS)}")
        if kind == "none":
            return cls(kind)
        if len(rows) == 0:
            raise DataError("cannot fit the scaler: the train split is empty")
        axes = (0, 1, 2) if kind == "global" else (0, 2)
        n, mean, m2 = 0, 0.0, 0.0
        for start in range(0, len(rows), chunk):
            x = np.asarray(store[np.sort(rows[start:start + chunk])], dtype=np.float64)
            nb = x.size // (1 if kind == "global" else NUM_LEADS)
            mb = x.mean(axis=axes)
            centred = x - (np.expand_dims(mb, (0, 2)) if kind == "per_lead" else mb)
            m2b = (centred ** 2).sum(axis=axes)
            # Chan et al.'s pairwise update: exact merge of two (count, mean, M2) summaries.
            delta = mb - mean
            m2 = m2 + m2b + delta ** 2 * n * nb / (n + nb)
            mean = mean + delta * nb / (n + nb)
            n += nb
        std = np.sqrt(m2 / n)
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
            if name in taken or name in self.views:
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
        for name, view in self.views.items():
            idx = self._leads[name]
            v = self.data.scaler.apply(x[list(idx)], idx)
            rate = view.sampling_rate or fs
            if rate != fs:
                v = resample(v, fs, rate)
            if view.upsample is not None:
                v = view.upsample(np.asarray(v, dtype=np.float32), idx)
            item[name] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
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
                  ) -> tuple[np.ndarray, dict[int, str]]:
    """Decode consecutive records (run in a worker process): ``(signals [n, 12, n_samples],
    {index in the chunk: why it failed})``; a failed record is zeros, or raises in
    ``error`` mode."""
    out = np.zeros((len(paths), NUM_LEADS, n_samples), dtype=np.float32)
    problems: dict[int, str] = {}
    for i, (path, name) in enumerate(zip(paths, names)):
        try:
            rec = read_record(path, fs=sampling_rate, source=name, expect_fs=source_fs)
            length = rec.signal.shape[-1]
            if strict_length and length < 0.99 * n_samples:
                raise DataError(f"{name}: {length / sampling_rate:.2f} s long, "
                                f"expected {n_samples / sampling_rate:.2f} s")
            out[i] = fit_length(rec.signal, n_samples)
        except DataError as e:
            if on_bad_record == "error":
                raise
            problems[i] = str(e)
    return out, problems


def _decode_store(paths: Sequence[Path], names: Sequence[str], signal_ext: str, *,
                  sampling_rate: int, n_samples: int, kind: str, on_bad_record: str,
                  cache_dir: str | Path | None, progress: bool,
                  source_fs: float | None = None, strict_length: bool = False,
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode (or load from cache) every record into [N, 12, n_samples].

    ``source_fs`` is the rate the folder promises (a header stating another is refused);
    with ``strict_length`` a record shorter than ``n_samples`` (beyond 1%) is refused
    instead of zero-padded (PTB-XL records are all 10 s; CinC records vary, so are padded).

    Returns:
        ``(store, bad, key)``: the memmap, bool [N] marking records that failed (only in
        skip mode) and the cache key.
    """
    if on_bad_record not in BAD_RECORD_MODES:
        raise DataError(f"on_bad_record must be one of {', '.join(BAD_RECORD_MODES)}, "
                        f"got {on_bad_record!r}")
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
        with progress_bar(total=n, desc=f"decoding {n} records", unit="ecg", enabled=progress) as bar:
            for (s, e), (signals, failed) in zip(ranges, map_chunks(_decode_chunk, tasks, workers)):
                out[s:e] = signals
                problems.update({str(s + i): msg for i, msg in failed.items()})
                bar.update(e - s)
        bad = np.zeros(len(paths), dtype=bool)
        bad[[int(i) for i in problems]] = True
        # Written before the store is renamed into place, so a store never exists
        # without its bad-record list.
        cache.get_or_build(f"{kind}-bad", key, bad.shape, bool,
                           lambda o: o.__setitem__(slice(None), bad), {"problems": problems})

    store = cache.get_or_build(kind, key, shape, np.float32, fill, {"params": params})
    bad = cache.load(f"{kind}-bad", key)
    if bad is None:  # the list was deleted by hand: decode again rather than guess
        cache.path(kind, key).unlink(missing_ok=True)
        return _decode_store(paths, names, signal_ext, sampling_rate=sampling_rate,
                             n_samples=n_samples, kind=kind, on_bad_record=on_bad_record,
                             cache_dir=cache_dir, progress=progress)
    if bad.any():
        meta = cache.path(f"{kind}-bad", key).with_suffix(".json")
        try:
            problems = json.loads(meta.read_text())["problems"]
        except (OSError, ValueError, KeyError):  # metadata lost or damaged: the flags suffice
            problems = {}
        first = next(iter(problems.values()), f"record {names[int(np.argmax(bad))]} is bad")
        if on_bad_record == "error":
            raise DataError(first)
        warnings.warn(f"skipped {int(bad.sum())} bad record(s) of {len(paths)}; first: {first}",
                      stacklevel=3)
    return store, np.asarray(bad, dtype=bool), key


def _cached_scaler(store: np.ndarray, train_rows: np.ndarray, kind: str, store_key: str,
                   cache_dir: str | Path | None) -> Scaler:
    """Scaler.fit, with its statistics cached next to the store (a pass over the whole
    train array costs seconds at 500 Hz; the statistics are 2 x 12 numbers)."""
    if kind == "none" or len(train_rows) == 0:
        return Scaler.fit(store, train_rows, kind)
    rows_hash = hashlib.sha256(np.ascontiguousarray(train_rows, dtype=np.int64).tobytes())
    key = fingerprint((), {"store": store_key, "kind": kind, "rows": rows_hash.hexdigest()})

    def fill(out: np.ndarray) -> None:
        fitted = Scaler.fit(store, train_rows, kind)
        out[0], out[1] = fitted.mean, fitted.std

    stats = ArrayCache(cache_dir).get_or_build("scaler", key, (2, NUM_LEADS), np.float64, fill)
    return Scaler(kind, np.array(stats[0]), np.array(stats[1]))


def _finish(store: np.ndarray, rows: np.ndarray, labels: np.ndarray, classes: list[str],
            ecg_ids: np.ndarray, names: list[str], strat_fold: np.ndarray, info: pd.DataFrame,
            *, folds: Mapping[str, Sequence[int]] | None, scaler: str, sampling_rate: int,
            store_key: str, task: str, settings: Mapping[str, object],
            cache_dir: str | Path | None) -> ECGData:
    splits = ptbxl.fold_indices(strat_fold, folds)
    if scaler != "none" and "train" not in splits:
        raise DataError("the folds need a 'train' split to fit the scaler (or use scaler='none')")
    fitted = _cached_scaler(store, rows[splits["train"]] if scaler != "none" else rows[:0],
                            scaler, store_key, cache_dir)
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
                   info=info.reset_index(drop=False))


def load_ptbxl(root: str | Path, *, task: str = "superdiagnostic", sampling_rate: int = 100,
               folds: Mapping[str, Sequence[int]] | None = None, min_samples: int = 0,
               scaler: str = "global", on_bad_record: str = "error",
               cache_dir: str | Path | None = None, progress: bool = True,
               duration: float = 10.0, classes: Sequence[str] | None = None,
               keep_unlabeled: bool = False) -> ECGData:
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
    store, bad, store_key = _decode_store(
        paths, names, ".dat", sampling_rate=sampling_rate, n_samples=n_samples,
        kind=f"ptbxl{sampling_rate}", on_bad_record=on_bad_record, cache_dir=cache_dir,
        progress=progress, source_fs=source_rate, strict_length=True)
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
                   cache_dir=cache_dir)


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
              keep_unlabeled: bool = False) -> ECGData:
    """Load a PhysioNet/CinC folder (``.hea`` + ``.mat``, recursively) with SNOMED labels.

    Folds are assigned by :func:`cinc.hash_folds` (deterministic from the record name);
    ``folds`` maps split names onto them as for PTB-XL. Records without any label in
    ``classes`` (default: the sorted codes present, less those carried by ``min_samples``
    records or fewer) are dropped, unless ``keep_unlabeled``. ``ecg_ids`` are the
    records' positions in the sorted scan. Other arguments as :func:`load_ptbxl`.

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
    store, bad, store_key = _decode_store(
        paths, names, ".mat", sampling_rate=sampling_rate,
        n_samples=int(round(duration * sampling_rate)), kind=f"cinc{sampling_rate}",
        on_bad_record=on_bad_record, cache_dir=cache_dir, progress=progress)
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
                   task=task, settings=settings, cache_dir=cache_dir)
    data.label_report = report
    return data


__all__ = ["SignalView", "Scaler", "ECGData", "ECGSplit", "load_ptbxl", "load_cinc",
           "SCALERS", "BAD_RECORD_MODES"]
