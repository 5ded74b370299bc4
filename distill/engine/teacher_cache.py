"""A frozen teacher's outputs, computed once per record and memory-mapped from disk.

Distillation with a frozen teacher and deterministic inputs needs the teacher's logits,
tokens and pooled embedding of every training record in every epoch; computing them once
turns each later epoch into a read. The entry is a folder in the data cache::

    teacher-outputs-<key>/logits.npy   float32 [N, C]
                          tokens.npy   float16 [N, N_t, D_t] (float32 if fp16 would overflow)
                          pooled.npy   float16 [N, D_t]      (likewise)
                          token_mask.npy bool  [N, N_t]      where the teacher gives one
                          code_idx.npy int16   [N, N_t, K, 16]   a tokenized teacher's
                          code_logp.npy float16 [N, N_t, K, 16]  code distributions (top 16)
                          meta.json    token_leads, shapes, what the key was made of

The tokens may be stored smaller (``distill.cached_tokens``, :data:`TOKEN_FORMATS`):

* ``fp16`` (default): as the teacher gives them, [N, N_t, D_t];
* ``int8``: int8 with one float32 scale per token (``token_scale.npy`` [N, N_t]; the
  largest magnitude of each token maps to 127), half of fp16; every loss reads the
  dequantized tokens (relative error at most 1/254 of each token's largest feature);
* ``projected``: the tokens after the fixed map the ``ot`` term applies (layer norm, then a
  random semi-orthogonal [d, D_t] projection, stored as ``projection.npy``), [N, N_t, d]:
  the ``ot`` term, and ``relation`` on its barycentres, compute the same values as from
  the full tokens; ``mhca`` reads the full tokens through its learnable keys and refuses;
* ``lead_mean``: per record and lead, the mean of the layer-normalised tokens of that lead
  (over the real ones), [N, L, D_t] with token leads 0..L-1: what the ``ot`` term with
  ``teacher_pool: lead`` matches (its projection is linear, so pooling before or after it
  is the same).

A tokenized teacher asked for its per-token code distributions (``code_levels`` > 0, for
the ``codes`` loss) has the 16 most likely codes of each token and level stored with their
log-probabilities (:data:`CODE_TOP`; 38 KB per record for 12 leads x 25 patches x 2 levels,
against 307 KB for the whole distributions); :func:`expand_codes` spreads the remaining
mass evenly over the other codes when a batch is read (on the project's tokenizer the 16
hold 0.9997 of the mass at level 1 and 0.993 at level 2).

``key`` hashes the teacher's weights (:func:`weights_hash`: the identity of the files a
backbone was loaded from while it is unchanged, every other tensor's bytes), its class and
settings, the data set's fingerprint and the teacher's input settings (the render
configuration or the signal view, and with fixed augmentation draws the augmentation, the
seed and the draw), so a changed teacher or data set never reads a stale entry. The folder
is written under a temporary name and renamed into place when complete.

With ``train.augment.views`` = K there is one entry per draw, gathered in
:class:`DrawnOutputs`.

With several processes (``accelerate launch``), every process fills its share: the batches
of the single-process fill are dealt out in turn (batch b to process b mod P, so each batch
holds exactly the records it would hold in one process), each process writes its rows to a
shard folder (``<entry>.shard-<p>-of-<P>``, float32, so the join can still choose fp16 for
the whole entry exactly as one process would), and the main process joins the shards into
the one memory-mapped entry and deletes them: the entry is byte for byte the one a single
process writes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distill.data.cache import default_cache_dir
from distill.data.dataset import PerDraw
from distill.core.errors import ECGDistillError
from distill.core.hashing import stable_hash
from distill.core.weights import weights_hash as core_weights_hash
from distill.losses.alignment import lead_means as _lead_means
from distill.losses.alignment import semi_orthogonal
from distill.core.io import atomic_dir
from distill.core.progress import progress_bar

CACHE_VERSION = 1
CODE_TOP = 16  # the most likely codes of each code distribution that the cache keeps
FP16_MAX = float(np.finfo(np.float16).max)
PREFIX = "teacher-outputs"


WEIGHT_HASHES = "weight-file-hashes.json"  # in the data cache: local weight files' SHA-256


def weights_hash(model: nn.Module) -> str:
    """The identity of ``model``'s weights (:func:`distill.core.weights.weights_hash`): the
    files it was loaded from stand for its tensors while they are unchanged (a hub
    snapshot's blob names, a local folder's file hashes remembered in the data cache),
    every other tensor is hashed, and the result is kept until a tensor changes."""
    return core_weights_hash(model, memo_path=default_cache_dir() / WEIGHT_HASHES)


def cache_key(teacher: nn.Module, data_fingerprint: str, inputs: Mapping[str, Any]) -> str:
    """The entry's key: teacher weights and settings, data, input settings, version."""
    params = {
        "weights": weights_hash(teacher),
        "class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
        "settings": getattr(teacher, "settings", {}),
        "data": data_fingerprint,
        "inputs": dict(inputs),
        "version": CACHE_VERSION,
    }
    return stable_hash(params, length=20)


@dataclass
class TeacherOutputs:
    """The cached outputs, memory-mapped read-only, indexed by record position."""

    folder: Path
    key: str
    logits: np.ndarray  # (N, C) float32
    tokens: np.ndarray  # (N, N_t, D_t)
    pooled: np.ndarray  # (N, D_t)
    token_leads: torch.Tensor  # (N_t,) int64
    token_mask: np.ndarray | None = None  # (N, N_t) bool, where the teacher gave one
    code_idx: np.ndarray | None = None  # (N, N_t, K, CODE_TOP) int16
    code_logp: np.ndarray | None = None  # (N, N_t, K, CODE_TOP) float16
    codebook_size: int = 0  # C of the code distributions (0: none stored)
    token_scale: np.ndarray | None = None  # (N, N_t) float32 (int8 tokens)
    token_format: str = "fp16"  # TOKEN_FORMATS
    projection: np.ndarray | None = None  # (d, D_t) float32 (projected tokens)

    def extras(self) -> dict[str, np.ndarray]:
        """Per-record arrays for ``ECGData.split(extras=...)``."""
        out = {"teacher.logits": self.logits, "teacher.tokens": self.tokens,
               "teacher.pooled": self.pooled}
        if self.token_scale is not None:
            out["teacher.token_scale"] = self.token_scale
        if self.token_mask is not None:
            out["teacher.token_mask"] = self.token_mask
        if self.code_idx is not None:
            out.update({"teacher.code_idx": self.code_idx, "teacher.code_logp": self.code_logp})
        return out

    @property
    def code_shape(self) -> tuple[int, int] | None:
        """(levels, C) of the stored code distributions, or None."""
        return None if self.code_idx is None else (self.code_idx.shape[2], self.codebook_size)


@dataclass
class DrawnOutputs:
    """The teacher's outputs on K fixed augmented draws of every record: one
    :class:`TeacherOutputs` per draw, read by a split with ``draws`` = K."""

    draws: list[TeacherOutputs]

    def __post_init__(self) -> None:
        if not self.draws:
            raise ECGDistillError("DrawnOutputs needs at least one draw")

    @property
    def key(self) -> str:
        return stable_hash([d.key for d in self.draws], length=20)

    @property
    def tokens(self) -> np.ndarray:
        return self.draws[0].tokens

    @property
    def token_leads(self) -> torch.Tensor:
        return self.draws[0].token_leads

    @property
    def codebook_size(self) -> int:
        return self.draws[0].codebook_size

    @property
    def code_shape(self) -> tuple[int, int] | None:
        return self.draws[0].code_shape

    def extras(self) -> dict[str, PerDraw]:
        """Per-record, per-draw arrays for ``ECGData.split(extras=..., draws=K)``."""
        names = self.draws[0].extras()
        return {n: PerDraw([d.extras()[n] for d in self.draws]) for n in names}


def load_outputs(folder: Path) -> TeacherOutputs | None:
    """A complete entry, or None when absent or unreadable (then it is rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        names = ["logits", "tokens", "pooled"]
        if meta.get("token_mask"):
            names.append("token_mask")
        if meta.get("codebook_size"):
            names += ["code_idx", "code_logp"]
        fmt = meta.get("token_format", "fp16")
        if fmt == "int8":
            names.append("token_scale")
        arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}
        projection = np.load(folder / "projection.npy") if fmt == "projected" else None
    except (OSError, ValueError, KeyError):
        return None
    n = {len(a) for a in arrays.values()}
    if len(n) != 1 or n.pop() != meta.get("records"):
        return None
    return TeacherOutputs(folder=folder, key=meta["key"], token_leads=torch.tensor(
        meta["token_leads"], dtype=torch.long), codebook_size=int(meta.get("codebook_size", 0)),
        token_format=fmt, projection=projection, **arrays)


def top_codes(code_logits: torch.Tensor, top: int = CODE_TOP
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., C] log-probabilities -> the ``top`` most likely codes: (indices int16,
    log-probabilities float32), each [..., top]."""
    logp = code_logits.float().log_softmax(-1)
    values, idx = logp.topk(min(top, logp.shape[-1]), dim=-1)
    return idx.to(torch.int16), values


def expand_codes(idx: torch.Tensor, logp: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Whole distributions [..., C] (log-probabilities) from the stored top codes: each code
    kept has its log-probability, the mass left is spread evenly over the others."""
    logp = logp.float()
    rest = (1.0 - logp.exp().sum(-1, keepdim=True)).clamp_min(1e-12)  # (..., 1)
    others = max(codebook_size - idx.shape[-1], 1)
    out = (rest / others).log().expand(*logp.shape[:-1], codebook_size).clone()
    return out.scatter_(-1, idx.long(), logp)


class _Overflow(Exception):
    pass


STORED = {"logits": np.float32, "token_mask": np.bool_, "code_idx": np.int16,
          "code_logp": np.float16, "token_scale": np.float32}  # storage types never changed
TOKEN_FORMATS = ("fp16", "int8", "projected", "lead_mean")
INT8_MAX = 127


@dataclass(frozen=True)
class TokenFormat:
    """How the cache stores the teacher tokens (module docstring): ``name`` one of
    :data:`TOKEN_FORMATS`; for ``projected``, the width ``dim`` and the ``seed`` of the
    fixed [dim, D_t] projection (:meth:`projection`, drawn once the teacher's D_t is seen)."""

    name: str = "fp16"
    dim: int = 0
    seed: int = 0

    def key(self) -> dict[str, Any] | None:
        """What the cache key adds (None for fp16: entries made before formats stay valid)."""
        if self.name == "fp16":
            return None
        out: dict[str, Any] = {"format": self.name}
        if self.name == "projected":
            out.update(dim=self.dim, seed=self.seed)
        return out

    def projection(self, width: int) -> torch.Tensor:
        """The fixed [dim, width] map: semi-orthogonal, from ``seed`` (the same matrix in
        every process and run)."""
        return semi_orthogonal(self.dim, width, generator=torch.Generator().manual_seed(self.seed))

    def stored(self) -> dict[str, Any]:
        """Arrays of a fixed storage type under this format."""
        return {**STORED, "tokens": np.int8} if self.name == "int8" else STORED

    def encode(self, tokens: torch.Tensor, leads: list[int], mask: torch.Tensor | None
               ) -> tuple[dict[str, torch.Tensor], list[int], torch.Tensor | None]:
        """(arrays to store for the tokens, the stored tokens' leads, their mask)."""
        x = tokens.float()
        if self.name == "int8":
            peak = x.abs().amax(-1)  # (B, N_t)
            scale = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
            q = torch.round(x / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
            return {"tokens": q, "token_scale": scale}, leads, mask
        if self.name == "projected":
            p = self.projection(x.shape[-1]).to(x.device)
            return {"tokens": F.layer_norm(x, (x.shape[-1],)) @ p.T}, leads, mask
        if self.name == "lead_mean":
            return lead_means(x, leads, mask)
        return {"tokens": x}, leads, mask


def lead_means(tokens: torch.Tensor, leads: list[int], mask: torch.Tensor | None
               ) -> tuple[dict[str, torch.Tensor], list[int], torch.Tensor]:
    """:func:`distill.losses.alignment.lead_means` for the cache (an ECGDistillError naming
    the recipe key when no token names a lead)."""
    try:
        return _lead_means(tokens, leads, mask)
    except ValueError:
        raise ECGDistillError("distill.cached_tokens: lead_mean pools the teacher's tokens by "
                              "lead, and no token of this teacher names a lead") from None


def decode_tokens(tokens: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Float tokens from a batch's stored ones (int8 times their per-token scale)."""
    if scale is None:
        return tokens.float()
    return tokens.float() * scale.float()[..., None]


def _fill(teacher: nn.Module, loader: Any, inputs_fn: Callable, folder: Path,
          n: int, dtype: np.dtype, device: torch.device, progress: bool,
          desc: str = "teacher outputs", rows: np.ndarray | None = None,
          fmt: TokenFormat = TokenFormat()) -> tuple[list[int], int, bool, int]:
    """Run the teacher over every batch of ``loader``, writing its arrays of ``n`` rows
    (``rows``: the record positions those rows hold, sorted; default every record, row =
    position); (the token leads, the code distributions' C or 0, whether a token mask was
    stored, the teacher's token width D_t; the tokens stored in ``fmt``)."""
    arrays: dict[str, np.ndarray] = {}
    leads: list[int] = []
    codebook = width = 0
    stored = fmt.stored()
    with progress_bar(total=n, desc=desc, unit="ecg", enabled=progress) as bar, \
            torch.no_grad():
        for batch in loader:
            out = teacher(**{k: v.to(device) for k, v in inputs_fn(batch).items()})
            idx = batch["index"].numpy()  # (B,)
            if rows is not None:
                idx = np.searchsorted(rows, idx)
            width = int(out.tokens.shape[-1])
            token_parts, token_leads, token_mask = fmt.encode(
                out.tokens, out.token_leads.cpu().tolist(),
                None if out.token_mask is None else out.token_mask.bool())
            parts = {"logits": out.logits.float(), **token_parts, "pooled": out.pooled.float()}
            if token_mask is not None:  # padding, or leads missing from the record
                parts["token_mask"] = token_mask.bool()
            if out.code_logits is not None:
                codebook = out.code_logits.shape[-1]
                if codebook > np.iinfo(np.int16).max:
                    raise ECGDistillError(f"teacher cache: {codebook} codes per codebook do "
                                          f"not fit the cache's int16 code indices")
                parts["code_idx"], logp = top_codes(out.code_logits)
                parts["code_logp"] = logp.clamp_min(-FP16_MAX)  # a code of probability 0
            if not arrays:
                leads = list(token_leads)
                for name, t in parts.items():
                    arrays[name] = np.lib.format.open_memmap(
                        folder / f"{name}.npy", mode="w+", shape=(n, *t.shape[1:]),
                        dtype=stored.get(name, dtype))
            for name, t in parts.items():
                x = t.cpu().numpy()
                if name not in stored and dtype == np.float16 and np.abs(x).max() > FP16_MAX:
                    raise _Overflow
                arrays[name][idx] = x
            bar.update(len(idx))
    for a in arrays.values():
        a.flush()
    return leads, codebook, "token_mask" in arrays, width


def dealt_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """The batches (record positions) process ``rank`` of ``world`` computes: the
    single-process fill's batches of ``batch_size`` consecutive records, dealt out in turn."""
    starts = range(rank * batch_size, n, world * batch_size)
    return [list(range(s, min(s + batch_size, n))) for s in starts]


def shard_folder(entry: Path, rank: int, world: int) -> Path:
    return entry.with_name(f"{entry.name}.shard-{rank}-of-{world}")


def fill_shard(teacher: nn.Module, dataset: Dataset, inputs_fn: Callable, entry: Path, *,
               rank: int, world: int, batch_size: int, device: torch.device | str = "cpu",
               progress: bool = False, desc: str = "teacher outputs",
               fmt: TokenFormat = TokenFormat()) -> Path:
    """Process ``rank``'s share of the fill (:func:`dealt_batches`) as a shard folder beside
    ``entry``: float32 features, the rows' record positions (``rows.npy``) and meta.json."""
    n = len(dataset)
    batches = dealt_batches(n, batch_size, rank, world)
    rows = np.asarray([i for b in batches for i in b], dtype=np.int64)
    loader = DataLoader(dataset, batch_sampler=batches) if batches else []
    folder = shard_folder(entry, rank, world)
    with atomic_dir(folder) as tmp:
        leads, codebook, masked, width = (
            _fill(teacher, loader, inputs_fn, tmp, len(rows), np.dtype(np.float32),
                  torch.device(device), progress, f"{desc} (process {rank + 1}/{world})",
                  rows=rows, fmt=fmt) if len(rows) else ([], 0, False, 0))
        np.save(tmp / "rows.npy", rows)
        (tmp / "meta.json").write_text(json.dumps(
            {"records": n, "rows": len(rows), "token_leads": leads, "codebook_size": codebook,
             "token_mask": masked, "width": width}))
    return folder


def join_shards(entry: Path, world: int, key: str, fmt: TokenFormat = TokenFormat()
                ) -> None:
    """Join the ``world`` shards of ``entry`` into the entry (written atomically, then the
    shards deleted): the features in fp16 when every value fits, as one process stores
    them, else float32.

    Raises:
        ECGDistillError: a shard missing or unreadable, or shards that disagree.
    """
    shards = [shard_folder(entry, r, world) for r in range(world)]
    metas, parts = [], []
    for f in shards:
        try:
            metas.append(json.loads((f / "meta.json").read_text()))
            parts.append((np.load(f / "rows.npy"), {
                p.stem: np.load(p, mmap_mode="r") for p in f.glob("*.npy")
                if p.stem != "rows"}))
        except (OSError, ValueError) as exc:
            raise ECGDistillError(f"teacher cache {entry}: shard {f.name} unreadable ({exc}); "
                                  f"run the stage again") from None
    filled = [m for m in metas if m["rows"]]
    first = filled[0]
    for m in filled[1:]:
        if (m["records"], m["token_leads"], m["codebook_size"], m["token_mask"]) != (
                first["records"], first["token_leads"], first["codebook_size"],
                first["token_mask"]):
            raise ECGDistillError(f"teacher cache {entry}: the processes' shards disagree "
                                  f"(records, token leads or code distributions)")
    n = first["records"]
    if sum(m["rows"] for m in metas) != n:
        raise ECGDistillError(f"teacher cache {entry}: the shards hold "
                              f"{sum(m['rows'] for m in metas)} of {n} records")
    names = sorted(next(a for _, a in parts if a))
    stored = fmt.stored()
    features = [k for k in names if k not in stored]
    fits = all(float(np.abs(a[k]).max()) <= FP16_MAX for _, a in parts if a
               for k in features if a[k].size)
    dtype = np.dtype(np.float16 if fits else np.float32)
    with atomic_dir(entry, keep=lambda f: load_outputs(f) is not None) as tmp:
        for name in names:
            ref = next(a[name] for _, a in parts if a)
            out = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+",
                                            shape=(n, *ref.shape[1:]),
                                            dtype=stored.get(name, dtype))
            for rows, arrays in parts:
                if len(rows):
                    out[rows] = arrays[name]
            out.flush()
            del out
        meta = {"key": key, "records": n, "token_leads": first["token_leads"],
                "storage": dtype.name, "version": CACHE_VERSION}
        if first["codebook_size"]:
            meta["codebook_size"] = first["codebook_size"]
        if first["token_mask"]:
            meta["token_mask"] = True
        _write_format(tmp, meta, fmt, first.get("width", 0))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    del parts
    for f in shards:
        shutil.rmtree(f, ignore_errors=True)


def _write_format(folder: Path, meta: dict[str, Any], fmt: TokenFormat, width: int) -> None:
    """The token format into an entry's meta (and, for ``projected``, the projection of
    the teacher's ``width`` beside it)."""
    if fmt.name != "fp16":
        meta["token_format"] = fmt.name
    if fmt.name == "projected":
        np.save(folder / "projection.npy", fmt.projection(width).numpy())


def teacher_outputs(teacher: nn.Module, dataset: Dataset,
                    inputs_fn: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]], *,
                    key: str, cache_dir: str | os.PathLike | None = None,
                    batch_size: int = 64, device: torch.device | str = "cpu",
                    progress: bool = True, rebuild: bool = False,
                    desc: str = "teacher outputs", processes: Any = None,
                    fmt: TokenFormat = TokenFormat()) -> TeacherOutputs:
    """Load the teacher's outputs for every record of ``dataset``, computing them once.

    Args:
        teacher: the frozen teacher (evaluation mode is set here).
        dataset: items with ``index`` (the record position) covering every record once;
            ``inputs_fn(batch)`` turns a batch into the teacher's keyword inputs.
        key: :func:`cache_key` of this teacher, data and input settings.
        cache_dir: the cache root (default: the data cache).
        batch_size: records per forward pass.
        device: where the teacher runs.
        progress: a tqdm bar while computing.
        desc: the bar's label.
        rebuild: compute the outputs again even if the entry exists.
        processes: Accelerate's process state (``process_index``, ``num_processes``,
            ``is_main_process``, ``wait_for_everyone``) when every process of a run calls
            this together: each fills its share, the main process joins them (module
            docstring). None: this process fills the entry alone.
        fmt: how the tokens are stored (:class:`TokenFormat`; the key must name it).

    Returns:
        TeacherOutputs with arrays of ``len(dataset)`` rows.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"{PREFIX}-{key}"
    found = None if rebuild else load_outputs(folder)
    n = len(dataset)
    world = 1 if processes is None else int(processes.num_processes)
    if world > 1:
        # every process decides alike: the entry was complete before any of them wrote
        if found is not None and len(found.logits) == n:
            return found
        teacher.eval()
        fill_shard(teacher, dataset, inputs_fn, folder, rank=int(processes.process_index),
                   world=world, batch_size=batch_size, device=device,
                   progress=progress and processes.is_main_process, desc=desc, fmt=fmt)
        processes.wait_for_everyone()
        if processes.is_main_process:
            join_shards(folder, world, key, fmt)
        processes.wait_for_everyone()
        loaded = load_outputs(folder)
        if loaded is None:
            raise ECGDistillError(f"teacher cache {folder}: joined but unreadable")
        return loaded
    if found is not None and len(found.logits) == n:
        return found
    teacher.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    # another process that finished the same key first wins (its entry is complete and
    # identical in content); a rebuild, or an unreadable entry, is replaced
    with atomic_dir(folder, keep=None if rebuild else (lambda f: load_outputs(f) is not None)
                    ) as tmp:
        for dtype in (np.float16, np.float32):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                leads, codebook, masked, width = _fill(
                    teacher, loader, inputs_fn, tmp, n, dtype, torch.device(device), progress,
                    desc, fmt=fmt)
                break
            except _Overflow:  # a feature beyond fp16's range: store float32 instead
                continue
        meta = {"key": key, "records": n, "token_leads": leads, "storage": np.dtype(dtype).name,
                "version": CACHE_VERSION}
        if codebook:
            meta["codebook_size"] = codebook
        if masked:
            meta["token_mask"] = True
        _write_format(tmp, meta, fmt, width)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    loaded = load_outputs(folder)
    if loaded is None:
        raise ECGDistillError(f"teacher cache {folder}: written but unreadable")
    return loaded
