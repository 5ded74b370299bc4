"""The transfer set: records whose labels the students never see, for the distillation terms.

Two kinds of records make it up (``distill.transfer``):

* the training records whose labels ``data.label_fraction`` hides (``rest``), chosen by
  :func:`distill.data.subset.labeled_subset`;
* extra records from outside the labeled data set: a folder in the data's layout (PTB-XL or
  PhysioNet/CinC; records without a label of the task are kept), or ``synthetic`` records
  of the generator with their own seed and a patient range disjoint from the labeled set's.

Extra records are loaded at the data's rate and scaled with the labeled data's scaler
(fitted on its labeled training folds), so the students see them exactly as they see the
labeled ones. Every one of them is in the transfer set (their folds are not used).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from distill.data.dataset import ECGData, load_cinc, load_ptbxl
from distill.data.load import cache_root, synthetic_set_folder
from distill.data.subset import labeled_subset, patient_groups
from distill.data.synth import patient_id_range

ALL_FOLDS = {"train": tuple(range(1, 11))}  # every record: the transfer set has no folds


def labeled_training_rows(data: ECGData, fraction: float, seed: int) -> np.ndarray:
    """Positions of the training records whose labels the students see (all at 1.0)."""
    train = data.splits["train"]
    if fraction >= 1.0:
        return train
    keep = labeled_subset(data.labels[train], patient_groups(data.info, train), fraction, seed)
    return train[keep]


def unlabeled_training_rows(data: ECGData, fraction: float, seed: int) -> np.ndarray:
    """The training records whose labels ``fraction`` hides."""
    return np.setdiff1d(data.splits["train"], labeled_training_rows(data, fraction, seed))


def synthetic_first_patient_id(data_cfg: Any, transfer: Any) -> int:
    """Where the synthetic transfer records' patient ids start: as set, or just above the
    labeled synthetic set's range (above 1,000,000 for a real data set)."""
    if transfer.first_patient_id is not None:
        return transfer.first_patient_id
    if data_cfg.path is not None:
        return 1_000_001
    return patient_id_range(data_cfg.synthetic.records, data_cfg.synthetic.first_patient_id)[1] + 1


def transfer_folder(data_cfg: Any, transfer: Any, progress: bool = True) -> Path | None:
    """The folder of the extra transfer records (generated on first use), or None."""
    if transfer.path is not None:
        return Path(transfer.path).expanduser()
    if not transfer.synthetic:
        return None
    rates = tuple(sorted(set(data_cfg.synthetic.rates))) if data_cfg.path is None else (100, 500)
    return synthetic_set_folder(cache_root(data_cfg), records=transfer.synthetic,
                                seed=transfer.seed,
                                first_patient_id=synthetic_first_patient_id(data_cfg, transfer),
                                rates=rates, progress=progress,
                                generator=data_cfg.synthetic.generator)


def load_transfer(data_cfg: Any, transfer: Any, labeled: ECGData,
                  progress: bool = True) -> ECGData | None:
    """The extra transfer records as an :class:`ECGData` (every record in its ``train``
    split, labels all zero for the task's classes it lacks, the labeled data's scaler), or
    None when the recipe names none."""
    folder = transfer_folder(data_cfg, transfer, progress=progress)
    if folder is None:
        return None
    fmt = data_cfg.format if transfer.path is not None else "ptbxl"
    common = dict(sampling_rate=data_cfg.sampling_rate, scaler="none",
                  on_bad_record=data_cfg.on_bad_record, cache_dir=data_cfg.cache_dir,
                  progress=progress, folds=ALL_FOLDS, classes=list(labeled.classes),
                  keep_unlabeled=True)
    extra = (load_cinc(folder, **common) if fmt == "cinc"
             else load_ptbxl(folder, task=labeled.task, **common))
    # the students see these records scaled as the labeled ones; caches keyed on the data
    # (teacher outputs of a signal teacher) must know the scaler came from elsewhere
    return dataclasses.replace(extra, scaler=labeled.scaler,
                               fingerprint=f"{extra.fingerprint}+scaler:{labeled.fingerprint}")


class Flagged(Dataset):
    """A dataset whose items say whether their labels may be read: ``labeled`` 1.0 or 0.0;
    a transfer item's ``labels`` are zeroed as well, so nothing can read them by accident."""

    def __init__(self, dataset: Dataset, labeled: bool) -> None:
        self.dataset = dataset
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        item["labeled"] = torch.tensor(1.0 if self.labeled else 0.0)
        if not self.labeled:
            item["labels"] = torch.zeros_like(item["labels"])
        return item

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class MixedSet(ConcatDataset):
    """Labeled and transfer records in one training set (the loader shuffles them together,
    so a batch holds both in the proportion of their counts); ``set_epoch`` reaches every
    part (augmentation draws are keyed by epoch)."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
