"""File-system helpers shared by every layer: atomic files and folders, and the refusal of
pickle weights.

Everything the suite writes that a later step reads (a model folder, a checkpoint, an
export, a data set, a cache entry) is written under a temporary name and renamed into
place when complete (:func:`atomic_dir`, :func:`atomic_write_text`), so a killed run never
leaves half a folder where a whole one is expected, and an existing one is replaced only
once its successor is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from distill.core.errors import ECGDistillError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


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


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """A fresh temporary folder beside ``final``, renamed to ``final`` when the block ends
    without an error (:func:`replace_folder`); on an error it is deleted and ``final`` is
    untouched.

    Args:
        final: the folder to write.
        replace: whether an existing ``final`` is replaced; with False, a ``final`` that
            appeared meanwhile (another process finished first) is kept and the new one
            dropped.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if replace or not final.exists():
            try:
                replace_folder(tmp, final)
            except OSError:
                if replace or not final.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def pickle_files(folder: Path) -> list[str]:
    """Names (relative to ``folder``) of the pickle-format files in it, recursively."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def require_safetensors(folder: str | os.PathLike) -> list[Path]:
    """The safetensors weight files of a saved model folder, or a one-line refusal.

    Raises:
        ECGDistillError: the folder holds no ``*.safetensors`` (naming any pickle
            checkpoint found: those are refused, never unpickled).
    """
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        found = pickle_files(folder) if folder.is_dir() else []
        what = (f" (found {', '.join(found)}: pickle weights are refused, only safetensors "
                f"are read)") if found else ""
        raise ECGDistillError(f"{folder}: no model.safetensors{what}")
    return weights
