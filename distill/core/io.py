"""Small file-system helpers shared by every stage."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the finished folder ``tmp`` to ``final``. An existing ``final`` is moved aside
    first, deleted only once ``tmp`` is in place, and put back if that rename fails, so
    ``final`` is never half written and never lost. Both must be on one file system."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    had = final.exists()
    if had:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if had:
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file renamed into place, so a reader
    (or a killed writer) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
