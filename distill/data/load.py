"""Recipe -> data: the one place a run's data set is found, generated and loaded.

The functions read a recipe's ``data`` section (and a consumer's ``view``) by attribute, so
this layer needs nothing above it (docs/architecture.md): the synthetic default is
generated on first use into a folder shared by every run with the same settings, a real
folder is read in its own layout (PTB-XL or PhysioNet/CinC), and the signals are decoded
and cached once (:mod:`distill.data.cache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.core.errors import DataError
from distill.data.cache import default_cache_dir
from distill.data.dataset import ECGData, SignalView, load_cinc, load_ptbxl
from distill.data.render import RenderConfig
from distill.data.synth import GENERATOR_VERSION
from distill.data.tools import write_synthetic

SYNTHETIC_VERSION = GENERATOR_VERSION  # in the cached set's folder name


def cache_root(data: Any) -> Path:
    """The decoded-signal and image cache of a ``data`` section."""
    return Path(data.cache_dir) if data.cache_dir else default_cache_dir()


def synthetic_set_folder(root: Path, *, records: int, seed: int, first_patient_id: int = 1,
                         rates: tuple[int, ...] = (100, 500), progress: bool = True,
                         create: bool = True, generator: int = SYNTHETIC_VERSION) -> Path:
    """The cached synthetic set of these settings under ``root`` (shared by every run that
    asks for it), generated on first use unless ``create`` is False; ``generator`` is the
    generator version (its number ends the folder's name)."""
    name = f"ptbxl-n{records}-seed{seed}"
    if first_patient_id != 1:
        name += f"-pid{first_patient_id}"
    if sorted(rates) != [100, 500]:
        name += "-" + "-".join(f"{r}hz" for r in sorted(set(rates)))
    folder = root / "synthetic" / f"{name}-v{generator}"
    if create and not (folder / "ptbxl_database.csv").exists():
        write_synthetic(folder, records=records, seed=seed, force=True, progress=progress,
                        sampling_rates=tuple(sorted(set(rates))),
                        first_patient_id=first_patient_id, generator=generator)
    return folder


def synthetic_folder(data: Any) -> Path:
    """Where a ``data`` section's synthetic set lives: shared by every run with the same
    settings."""
    syn = data.synthetic
    return synthetic_set_folder(cache_root(data), records=syn.records, seed=syn.seed,
                                first_patient_id=syn.first_patient_id, rates=tuple(syn.rates),
                                create=False, generator=syn.generator)


def data_folder(data: Any, progress: bool = True) -> Path:
    """The folder of a ``data`` section; the synthetic default is generated on first use."""
    if data.path is not None:
        folder = Path(data.path).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.path: folder {folder} does not exist")
        return folder
    syn = data.synthetic
    return synthetic_set_folder(cache_root(data), records=syn.records, seed=syn.seed,
                                first_patient_id=syn.first_patient_id, rates=tuple(syn.rates),
                                progress=progress, generator=syn.generator)


def load_data(data: Any, progress: bool = True, folder: Path | None = None) -> ECGData:
    """Load (decoding and caching on first use) a ``data`` section's data set.

    ``format: cinc`` labels records by their SNOMED codes (``task: snomed``) or maps them
    onto a PTB-XL task's classes (``task`` one of ``ptbxl.TASKS``; the codes it could not
    map are listed in the data's ``label_report``).
    """
    folder = folder if folder is not None else data_folder(data, progress=progress)
    folds = {"train": tuple(data.folds.train), "val": tuple(data.folds.val),
             "test": tuple(data.folds.test)}
    common = dict(sampling_rate=data.sampling_rate, scaler=data.scaler,
                  on_bad_record=data.on_bad_record,
                  on_flat_lead=getattr(data, "on_flat_lead", "error"),
                  cache_dir=data.cache_dir, progress=progress,
                  min_samples=data.min_samples, folds=folds)
    if data.format == "cinc":
        return load_cinc(folder, task=data.task, **common)
    return load_ptbxl(folder, task=data.task, **common)


def render_config(data: Any) -> RenderConfig:
    """The one render configuration of a ``data`` section: what the data stage draws and
    what an image teacher's patch-to-lead map describes (they must never disagree)."""
    img = data.image
    return RenderConfig(height=img.height, width=img.width, grid=img.grid)


def signal_view(data: Any, view: Any) -> SignalView:
    """A consumer's view (``leads``, ``sampling_rate``; unset ones fall back to the
    ``data`` section's, and its unset leads to all 12)."""
    leads = view.leads if view.leads is not None else data.leads
    rate = view.sampling_rate if view.sampling_rate is not None else data.sampling_rate
    return SignalView(leads=tuple(leads) if leads is not None else None, sampling_rate=rate)
