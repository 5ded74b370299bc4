"""PhysioNet/CinC Challenge 2020-2021 folders: ``.hea`` + ``.mat`` records, SNOMED CT labels.

A header carries its labels and demographics as comment lines::

    # Age: 59
    # Sex: Female
    # Dx: 164934002,426783006

The comments are read as plain text (no WFDB parsing), so a cached load of a CinC folder
never calls wfdb. The signals themselves go through :func:`distill.data.records.read_record`
(wfdb reads these MATLAB v4 ``.mat`` files directly, from the header's ``16x1+24`` format).

The challenge data come without folds; :func:`hash_folds` assigns one from the record
name (``load_cinc`` passes the path relative to the folder, e.g. ``g1/HR06000``):
``1 + int(md5(name)[:8], 16) % n_folds``. It depends only on the name, so a record
keeps its fold when records are added or removed and on every machine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from distill.core.errors import DataError


def parse_comments(lines: Sequence[str]) -> dict[str, object]:
    """Dx codes, age and sex from a header's comment lines (with or without the ``#``).

    Returns:
        ``{"dx": list[str] (order kept, duplicates dropped), "age": float (NaN when absent or
        "Unknown"), "sex": str ("" when absent)}``.
    """
    out: dict[str, object] = {"dx": [], "age": math.nan, "sex": ""}
    for line in lines:
        key, sep, value = line.lstrip("#").strip().partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "dx":
            codes = [c.strip() for c in value.split(",") if c.strip()]
            out["dx"] = list(dict.fromkeys(codes))
        elif key == "age":
            try:
                out["age"] = float(value)
            except ValueError:  # "Unknown", "NaN"
                out["age"] = math.nan
        elif key == "sex":
            out["sex"] = value if value.lower() not in ("unknown", "nan") else ""
    return out


def read_header_comments(hea: Path, source: str | None = None) -> list[str]:
    """The ``#`` comment lines of a ``.hea`` file, as plain text."""
    try:
        text = hea.read_text(errors="replace")
    except OSError as e:
        raise DataError(f"{source or hea}: cannot read header {hea} ({e.strerror})") from None
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


def scan_folder(folder: str | Path) -> pd.DataFrame:
    """Every record (a ``.hea`` file) under ``folder``, recursively, sorted by relative path.

    Args:
        folder: a CinC-layout folder (``.hea`` + ``.mat`` pairs, in any subfolders).

    Returns:
        A table with one row per record: ``name`` (file stem), ``path`` (record path without
        extension, relative to ``folder``), ``dx`` (list of SNOMED CT code strings), ``age``
        (float, NaN when unknown), ``sex`` (str).

    Raises:
        DataError: the folder does not exist or holds no ``.hea`` file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"CinC folder {folder} does not exist")
    heads = sorted(folder.rglob("*.hea"), key=lambda p: p.relative_to(folder).as_posix())
    if not heads:
        raise DataError(f"{folder}: no .hea record headers found")
    rows = []
    for hea in heads:
        rel = hea.relative_to(folder).with_suffix("").as_posix()
        info = parse_comments(read_header_comments(hea, f"record {rel} ({hea})"))
        rows.append({"name": hea.stem, "path": rel, **info})
    return pd.DataFrame(rows)


def label_matrix(dx: Sequence[Sequence[str]],
                 classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Multi-hot SNOMED labels.

    Args:
        dx: per record, its codes.
        classes: the code list to use (in this order); None = the sorted set of codes
            present (codes compared as strings, so sorting is lexicographic).

    Returns:
        ``(Y float32 [N, C], classes)``; codes outside ``classes`` are ignored.
    """
    if classes is None:
        classes = sorted({c for codes in dx for c in codes})
    classes = [str(c) for c in classes]
    column = {c: j for j, c in enumerate(classes)}
    y = np.zeros((len(dx), len(classes)), dtype=np.float32)
    for i, codes in enumerate(dx):
        for c in codes:
            if c in column:
                y[i, column[c]] = 1.0
    return y, classes


def hash_folds(names: Sequence[str], n_folds: int = 10) -> np.ndarray:
    """A deterministic fold 1..n_folds per record name (see the module docstring)."""
    return np.array(
        [1 + int(hashlib.md5(n.encode()).hexdigest()[:8], 16) % n_folds for n in names],
        dtype=np.int64,
    )
