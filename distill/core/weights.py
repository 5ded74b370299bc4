"""What identifies a model's weights, cheaply: the teacher-output cache's key.

Hashing every tensor of a 7B teacher (about 14 GB in fp16) each time a cache key is asked
for costs minutes; the weights were just read from files whose own hashes say the same.
:func:`weights_hash` therefore

* hashes every state-dict entry's name, dtype and shape (so another architecture, a
  quantized copy or a new head never share a key);
* for a module loaded from files (:func:`mark_loaded`, which the teachers' loader calls
  right after ``from_pretrained``) whose tensors have not changed since, puts the files'
  identity in place of its tensors' bytes: for a Hugging Face hub snapshot the blob names,
  which *are* the files' SHA-256 (nothing is read); for a local folder each file's SHA-256,
  read once and remembered by (path, size, modification time) in a small JSON file;
* hashes the bytes of every other tensor (a freshly built head, a locally built model);
* remembers the result on the model until any of its tensors changes.

"Changed" is read from PyTorch's own bookkeeping: every in-place write to a tensor (an
optimizer step, ``copy_``, ``load_state_dict``) increments its version counter, and a new
tensor has another storage address; :func:`weights_stamp` is a hash of both over the state
dict, so it costs microseconds per tensor and reads no weight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.core.hashing import sha256_file

# the files of a weights folder whose bytes define the model
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.json")
_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git sha1 (small files) or sha256 (LFS)


def weights_stamp(model: nn.Module) -> str:
    """A hash of every state-dict tensor's name, storage address, version counter, dtype and
    shape: it changes whenever a tensor is written in place or replaced, and reads no
    weight."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(f"{name}\0{t.data_ptr()}\0{t._version}\0{t.dtype}\0{tuple(t.shape)}\n"
                 .encode())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes | None:
    t = t.detach().cpu().contiguous()
    if not t.numel():
        return None
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()  # (0-d tensors viewed as 1-d)


def full_weights_hash(model: nn.Module) -> str:
    """SHA-256 of every tensor in ``model.state_dict()`` (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        data = _tensor_bytes(t)
        if data is not None:
            h.update(data)
    return h.hexdigest()


def _memo_read(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged memo is only a lost shortcut


def _memo_write(path: Path | None, memo: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the hashes are computed again next time


def file_identity(path: Path, memo: dict[str, Any]) -> str:
    """What identifies one weight file: its hub blob name when it is a link into a hub
    cache's ``blobs/`` (the name is the content's hash), else its SHA-256, taken from
    ``memo`` when its size and modification time match the remembered ones (``memo`` is
    updated in place)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _BLOB.fullmatch(real.name):
        return f"blob:{real.name}"
    st = real.stat()
    key = str(real)
    seen = memo.get(key)
    if seen and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
        return seen["sha256"]
    digest = sha256_file(real)
    memo[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def folder_identity(folder: str | os.PathLike, memo_path: Path | None = None) -> str | None:
    """A hash of the identities of a weights folder's files (:data:`WEIGHT_PATTERNS`), or
    None when it has no weight file."""
    folder = Path(folder)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)
                    if p.is_file()})
    if not any(p.suffix != ".json" for p in files):
        return None
    memo = _memo_read(memo_path)
    before = json.dumps(memo, sort_keys=True)
    parts = [f"{p.name}\0{file_identity(p, memo)}" for p in files]
    if json.dumps(memo, sort_keys=True) != before:
        _memo_write(memo_path, memo)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def mark_loaded(model: nn.Module, folder: str | os.PathLike | None) -> nn.Module:
    """Record that ``model``'s tensors are, right now, exactly what ``folder`` holds (a local
    folder or a hub snapshot folder): :func:`weights_hash` then reads the files' identity
    instead of the tensors, for as long as none of them changes. ``folder`` None: nothing
    recorded."""
    if folder is not None and Path(folder).is_dir():
        model._ecg_weights_folder = str(folder)
        model._ecg_weights_stamp = weights_stamp(model)
    return model


def weights_hash(model: nn.Module, memo_path: Path | None = None) -> str:
    """The identity of ``model``'s weights (module docstring): equal for equal weights of
    the same architecture, different when any tensor differs. ``memo_path``: where file
    hashes of local folders are remembered (None: not remembered)."""
    stamp = weights_stamp(model)
    cached = getattr(model, "_ecg_weights_hash", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    covered: dict[str, str] = {}  # state-dict prefix -> its files' identity
    for name, module in model.named_modules():
        folder = getattr(module, "_ecg_weights_folder", None)
        if folder is None or getattr(module, "_ecg_weights_stamp", None) != weights_stamp(module):
            continue
        ident = folder_identity(folder, memo_path)
        if ident is not None:
            covered[f"{name}." if name else ""] = ident
    prefixes = sorted(covered, key=len, reverse=True)  # the innermost marked module wins
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        if not any(name.startswith(p) for p in prefixes):
            data = _tensor_bytes(t)
            if data is not None:
                h.update(data)
    for prefix in sorted(covered):
        h.update(f"files\0{prefix}\0{covered[prefix]}\n".encode())
    digest = h.hexdigest()
    try:
        model._ecg_weights_hash = (stamp, digest)
    except AttributeError:  # a module that refuses attributes: computed again next time
        pass
    return digest


__all__ = ["WEIGHT_PATTERNS", "file_identity", "folder_identity", "full_weights_hash",
           "mark_loaded", "weights_hash", "weights_stamp"]
