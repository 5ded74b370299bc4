"""Training checkpoints: Accelerate ``save_state`` folders written atomically and verified.

Layout under a training folder::

    checkpoints/step_00000120/      accelerate's save_state (model, optimiser, scheduler,
                                    RNG states) + trainer_state.json (the loop's position,
                                    its history, and a SHA-256 of every file)
    checkpoints/.tmp-step_00000120/ a checkpoint being written (never read; removed on start)

A checkpoint is written into the temporary folder and renamed into place only when every
file is there, so a process killed while saving leaves no half checkpoint behind. On
resume the newest checkpoint whose files all match their recorded checksums is used; one
that does not (a disk fault, a truncated copy) is reported and the one before it is tried.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill.core.errors import ECGDistillError
from distill.core.hashing import sha256_file
from distill.core.io import atomic_write_text, replace_folder

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainerState:
    """Where the loop stands, saved with every checkpoint.

    Attributes:
        step: micro-batches consumed since the start (all epochs).
        updates: optimiser steps taken since the start.
        epoch: the epoch in progress (0-based); ``batch`` batches of it are done.
        batch: batches of ``epoch`` already consumed (0 = the epoch has not started).
        history: one dict per finished epoch (the CSV log's rows).
        best_metric: best validation macro AUC so far (None before the first evaluation).
        best_epoch: the epoch that reached it.
        stale_epochs: epochs since the best one (for early stopping).
        stopped_early: whether early stopping ended the run.
        fingerprint: identifies the job (recipe sections, data); a checkpoint of another
            job is refused on resume.
        processes: how many processes wrote it (a resume must use as many).
        running: per process, the sums of the training terms over the epoch in progress
            (``{"sums": {...}, "count": n}``), so a resumed epoch logs the same means.
    """

    step: int = 0
    updates: int = 0
    epoch: int = 0
    batch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    stale_epochs: int = 0
    stopped_early: bool = False
    fingerprint: str = ""
    processes: int = 1
    running: list[dict[str, Any]] = field(default_factory=list)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def clean_partial(root: Path) -> None:
    """Remove temporary folders a killed save left behind (main process only)."""
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def seal(tmp: Path, final: Path, state: TrainerState) -> Path:
    """Record the checksums and the loop state in ``tmp``, then rename it to ``final``."""
    manifest = {"state": asdict(state),
                "files": {str(p.relative_to(tmp)): sha256_file(p) for p in _files(tmp)}}
    atomic_write_text(tmp / STATE_FILE, json.dumps(manifest, indent=1))
    # the same step may be saved again (an epoch end on a step boundary): replaced whole
    return replace_folder(tmp, final)


def prune(root: Path, keep: int, protect: set[Path] = frozenset()) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for p in list_checkpoints(root)[:-keep] if keep > 0 else []:
        if p not in protect:
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)),
                  key=lambda p: int(_NAME.match(p.name).group(1)))


def verify(folder: Path) -> TrainerState:
    """The state of a checkpoint whose files match their checksums.

    Raises:
        ECGDistillError: naming the checkpoint and what is wrong with it.
    """
    manifest_path = folder / STATE_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        state = TrainerState(**manifest["state"])
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ECGDistillError(f"checkpoint {folder}: unreadable {STATE_FILE} ({exc})") from None
    present = {str(p.relative_to(folder)) for p in _files(folder)}
    missing = sorted(set(files) - present)
    if missing:
        raise ECGDistillError(f"checkpoint {folder}: missing file {missing[0]}")
    for name, digest in files.items():
        if sha256_file(folder / name) != digest:
            raise ECGDistillError(f"checkpoint {folder}: {name} does not match its checksum")
    return state


def peek_fingerprint(folder: Path) -> str | None:
    """The job fingerprint a checkpoint records (unverified), or None if unreadable."""
    try:
        return json.loads((folder / STATE_FILE).read_text())["state"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_valid(root: Path, warn=print) -> tuple[Path, TrainerState] | None:
    """The newest checkpoint that verifies, reporting each bad one it skips; None if none."""
    for folder in reversed(list_checkpoints(root)):
        try:
            return folder, verify(folder)
        except ECGDistillError as exc:
            warn(f"warning: {exc}; trying an earlier checkpoint")
    return None
