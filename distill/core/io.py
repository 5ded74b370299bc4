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
from collections.abc import Callable, Iterator
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


TMP_INFIX = ".tmp-"  # atomic_dir's temporary folders: ".<name>.tmp-<random>"


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = True,
               keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A fresh temporary folder beside ``final``, renamed to ``final`` when the block ends
    without an error; on an error it is deleted and ``final`` is untouched.

    Args:
        final: the folder to write.
        replace: whether an existing ``final`` is replaced (moved aside, deleted once the
            new one is in place: :func:`replace_folder`). With False, a ``final`` that
            exists when the block ends (another process finished first) is kept and the
            new folder dropped.
        keep: called with an existing ``final`` when the block ends; True keeps it (a
            complete entry another process wrote) even when ``replace`` is set.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_INFIX}", dir=final.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # as mkdir would make it (mkdtemp makes 0700)

    def kept() -> bool:
        return not replace or (keep is not None and keep(final))

    try:
        yield tmp
        if final.exists():
            if not kept():
                replace_folder(tmp, final)
        else:
            try:
                os.rename(tmp, final)  # never moves aside what another process just wrote
            except OSError:
                if not final.exists():
                    raise
                if not kept():
                    replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Temporary folders :func:`atomic_dir` left beside ``final`` (a killed writer's)."""
    final = Path(final)
    return sorted(final.parent.glob(f".{final.name}{TMP_INFIX}*"))


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
