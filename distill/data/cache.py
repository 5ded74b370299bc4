"""Memory-mapped array cache keyed by the source files and the processing settings.

Decoded signals, rendered images and (later) teacher outputs are stored as ``.npy`` files
opened with ``mmap_mode="r"``, so the second epoch and the second run read pages from disk
instead of parsing WFDB or drawing images again. An entry is written to a temporary file
and renamed into place, so a killed build never leaves a half-written entry that a later
run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from distill.core.errors import DataError
from distill.core.io import atomic_write_text

CACHE_ENV = "ECG_DISTILL_CACHE"


def default_cache_dir() -> Path:
    """``$ECG_DISTILL_CACHE`` if set, else ``~/.cache/ecg-distill``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ecg-distill"


def fingerprint(files: Iterable[str | os.PathLike] = (), params: Mapping[str, Any] | None = None) -> str:
    """A short hash of the files' identities (path, size, mtime) and of ``params``.

    Changing, touching, adding or removing a source file, or changing a setting, gives a
    new key, so a stale entry is never read.
    """
    h = hashlib.sha256()
    for f in files:
        p = Path(f)
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(params or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


class ArrayCache:
    """A folder of read-only memory-mapped arrays, one per (name, key).

    Args:
        root: the cache folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key}.npy"

    def load(self, name: str, key: str) -> np.ndarray | None:
        """The cached array, memory-mapped read-only, or None when absent or unreadable."""
        p = self.path(name, key)
        if not p.exists():
            return None
        try:
            return np.load(p, mmap_mode="r")
        except (ValueError, OSError):  # truncated or foreign file: rebuild it
            return None

    def get_or_build(
        self,
        name: str,
        key: str,
        shape: tuple[int, ...],
        dtype: Any,
        fill: Callable[[np.ndarray], None],
        meta: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """Load ``name``/``key``, or create it by calling ``fill(out)`` on a writable memmap.

        ``fill`` writes every element of ``out`` (shape ``shape``). The entry appears only
        after ``fill`` returns; if it raises, nothing is left behind.
        """
        cached = self.load(name, key)
        if cached is not None and cached.shape == tuple(shape) and cached.dtype == np.dtype(dtype):
            return cached
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cache folder {self.root}: cannot create it ({exc.strerror}); "
                            f"set ${CACHE_ENV} or data.cache_dir to a writable folder") from None
        final = self.path(name, key)
        tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.npy")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
            fill(out)
            out.flush()
            del out
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        if meta is not None:
            atomic_write_text(final.with_suffix(".json"), json.dumps(dict(meta), indent=1, default=str))
        result = self.load(name, key)
        assert result is not None
        return result
