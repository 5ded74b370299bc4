"""Teachers shipped with the package: trained weights under ``teachers/zoo/<name>/``.

Each entry is a folder written by a teacher's ``save_pretrained`` (``teacher.json``, the
head, the full backbone with its processor in ``backbone/``), plus

- ``card.json``: what the model is and how it was made (parameters, training corpus with
  its generator version, seed, records and patient-id range, the reproducing commands,
  validation and test AUC on its corpus's held-out folds, the macro AUC on a fixed check
  set of synthetic records) and the SHA-256 of every file above;
- ``README.md``: the same as a model card.

A recipe names one by its folder name (``teacher.name_or_path: ecg-vlm-small``). Every
resolution checks the files against their SHA-256 (a damaged or edited file is an error,
never a silently different teacher) and warns when the synthetic generator has changed
since the teacher was trained.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from distill.core.errors import DataError
from distill.core.hashing import sha256_file
from distill.data.synth import GENERATOR_VERSION

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
CARD_FILE = "card.json"
_checked: set[Path] = set()


def names() -> list[str]:
    """The shipped teachers' names."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / CARD_FILE).is_file())


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a zoo folder except its card and README (relative paths)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (CARD_FILE, "README.md")}


def card(name: str) -> dict[str, Any]:
    """The parsed ``card.json`` of a shipped teacher."""
    return json.loads((ZOO_DIR / name / CARD_FILE).read_text())


def verify(folder: Path) -> dict[str, Any]:
    """Check a zoo folder's files against its card; warn on a changed generator.

    Raises:
        DataError: a file is missing, extra or differs from its recorded SHA-256 (the
            message names the file).
    """
    info = json.loads((folder / CARD_FILE).read_text())
    recorded = info["files"]
    found = file_hashes(folder)
    for rel in sorted(set(recorded) | set(found)):
        if rel not in found:
            raise DataError(f"{folder / rel}: missing (listed in {folder / CARD_FILE}); "
                             f"reinstall ecg-distill")
        if rel not in recorded:
            raise DataError(f"{folder / rel}: not listed in {folder / CARD_FILE}; remove it or "
                             f"reinstall ecg-distill")
        if found[rel] != recorded[rel]:
            raise DataError(f"{folder / rel}: SHA-256 {found[rel][:16]}... differs from its "
                             f"card's {recorded[rel][:16]}...; reinstall ecg-distill")
    trained_on = info.get("corpus", {}).get("generator_version")
    if trained_on is not None and trained_on != GENERATOR_VERSION:
        warnings.warn(f"teacher {folder.name} was trained on synthetic generator version "
                      f"{trained_on}; this installation generates version {GENERATOR_VERSION}, "
                      f"so its stated AUCs may not hold on newly generated data (retrain it "
                      f"with {info.get('recipe', 'its recipe')})", stacklevel=3)
    return info


def folder(name: str | Any) -> Path | None:
    """The verified folder of a shipped teacher named ``name``; None for any other name."""
    text = str(name)
    if "/" in text or "\\" in text or text in (".", "..") or not text:
        return None
    path = ZOO_DIR / text
    if not (path / CARD_FILE).is_file():
        return None
    if path not in _checked:
        verify(path)
        _checked.add(path)
    return path


def backbone_folder(name: str | Any) -> Path | None:
    """The ``backbone/`` folder of a shipped teacher (what ``from_pretrained`` loads)."""
    path = folder(name)
    return None if path is None else path / "backbone"
