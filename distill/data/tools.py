"""Data commands: write the synthetic set, summarise a loaded set, render records to PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill.core.errors import DataError
from distill.core.io import atomic_dir
from distill.data.cinc import format_unmapped
from distill.data.dataset import format_flat_report
from distill.data.synth import GENERATOR_VERSION, generate_ptbxl
from distill.data.records import read_record
from distill.data.render import RenderConfig, render_12lead
from distill.data.ptbxl import aggregate_labels, read_database, read_statements
from distill.data.ptbxl import record_folder


def _folder_has_content(folder: Path) -> bool:
    return folder.exists() and any(folder.iterdir())


def write_synthetic(out: str | os.PathLike, *, records: int, seed: int,
                    sampling_rates: Sequence[int] = (100, 500), force: bool = False,
                    progress: bool = True, first_patient_id: int = 1,
                    generator: int = GENERATOR_VERSION) -> dict[str, Any]:
    """Generate the synthetic PTB-XL-layout set into ``out`` (``generator``: the generator
    version, :mod:`~distill.data.synth_physiology`).

    The set is written to a temporary sibling folder and renamed into place, so ``out``
    never holds half a data set; an existing non-empty ``out`` is replaced only with
    ``force`` (and only after the new set is complete).
    """

    target = Path(out)
    if target.exists() and not target.is_dir():
        raise DataError(f"{target}: exists and is not a folder")
    if _folder_has_content(target) and not force:
        raise DataError(f"{target}: folder is not empty; pass --force to replace it")
    if records < 1:
        raise DataError(f"--records must be at least 1, got {records}")
    with atomic_dir(target) as tmp:
        summary = generate_ptbxl(tmp, records, seed=seed, sampling_rates=tuple(sampling_rates),
                                 progress=progress, first_patient_id=first_patient_id,
                                 generator=generator)
    return summary


def describe_data(data, folder: str | os.PathLike = "") -> str:
    """A short table: records per split and positives per class; what the CinC label
    mapping left out and what ``on_flat_lead`` did to records with flat leads."""
    splits = tuple(data.splits)
    rows = [f"data: {folder}  ({len(data)} records, {data.sampling_rate} Hz, "
            f"{data.store.shape[-1]} samples, task {data.task})"]
    header = f"{'class':<12}" + "".join(f"{s:>8}" for s in splits)
    rows.append(header)
    per_split = {s: data.labels[data.splits[s]] for s in splits}
    rows.append(f"{'records':<12}" + "".join(f"{len(per_split[s]):>8}" for s in splits))
    for c, name in enumerate(data.classes):
        rows.append(f"{name:<12}" + "".join(f"{int(per_split[s][:, c].sum()):>8}" for s in splits))
    report = getattr(data, "label_report", None)
    if report:  # CinC records under a PTB-XL task: what the SNOMED mapping left out
        rows.append(format_unmapped(report))
        if report.get("dropped_without_label"):
            rows.append(f"{report['dropped_without_label']} record(s) without a label of "
                        f"task {data.task} left out")
    flat = getattr(data, "flat_report", None)
    if flat:  # records with a flat lead: skipped, or kept with the lead masked
        rows.append(format_flat_report(flat))
    return "\n".join(rows)


def render_record_png(record: str | os.PathLike, out: str | os.PathLike, *, height: int = 448,
                      width: int = 448, grid: bool = True) -> Path:
    """Render one WFDB record (any rate, any lead-name case) to a PNG file."""
    import matplotlib.image

    rec = read_record(record)
    image = render_12lead(rec.signal, rec.fs, RenderConfig(height=height, width=width, grid=grid))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(out, image.transpose(1, 2, 0))
    return out


def gallery_picks(folder: str | os.PathLike, task: str = "superdiagnostic") -> list[tuple[str, Any]]:
    """For each class of ``task``, the first record (test fold first) whose ONLY label for
    the task is that class: ``[(class, database row), ...]`` (classes without one are left out)."""

    root = Path(folder)
    db = read_database(root)
    labels, classes, keep = aggregate_labels(db, read_statements(root), task)
    kept = db[keep]
    order = np.argsort(kept["strat_fold"].to_numpy() != 10, kind="stable")  # test fold first
    single = labels[order].sum(axis=1) == 1
    picks = []
    for c, name in enumerate(classes):
        alone = np.flatnonzero(single & (labels[order, c] == 1))
        if len(alone):
            picks.append((name, kept.iloc[order[alone[0]]]))
    if not picks:
        raise DataError(f"{root}: no record carries a single {task} class")
    return picks


def gallery(folder: str | os.PathLike, out: str | os.PathLike, *, task: str = "superdiagnostic",
            size: int = 448) -> Path:
    """One record per class of ``task`` from a PTB-XL-layout folder, rendered into one PNG
    (the 500 Hz records when the folder has them, else the 100 Hz ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(folder)
    rate = 500 if (root / "records500").is_dir() else 100
    _folder, column, _rate = record_folder(root, rate)
    picks = gallery_picks(root, task)
    config = RenderConfig(height=size, width=size)
    cols = min(3, len(picks))
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.5 * rows), dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, row) in zip(axes.flat, picks):
        rec = read_record(root / row[column], source=f"ecg_id {row.name}")
        ax.imshow(render_12lead(rec.signal, rec.fs, config).transpose(1, 2, 0))
        codes = ", ".join(row["scp_codes"])
        ax.set_title(f"{name}  (ecg_id {row.name}: {codes})", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
