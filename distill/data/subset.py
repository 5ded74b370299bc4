"""The labeled part of a training split: a stratified, patient-grouped, seeded subset.

``data.label_fraction`` (0 < f <= 1) lets the students see the labels of a fraction of the
training folds only, as a hospital with a few hundred labeled ECGs would; the rest of the
training records become unlabeled transfer records for distillation. The subset is chosen
so that a comparison of students trained on it is fair and repeatable:

* **patient-grouped**: all records of a patient are in it or none is (a patient's records
  are alike; splitting them leaks labels into the "unlabeled" part);
* **stratified**: each patient is put in the stratum of the rarest class among its
  records' labels (patients with no positive label form a stratum of their own), and each
  stratum gives ``round(f * patients)`` patients, at least one when it has any and f > 0,
  so that rare classes keep labeled examples at small fractions;
* **seeded**: the patients of a stratum are taken in an order drawn from ``seed``; the same
  data, fraction and seed give the same subset in every process and run.

The label-only baseline and the distilled student read the same subset.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from distill.core.errors import DataError


def patient_groups(info: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """The patient of each of ``rows`` (positions into the data set): the database's
    ``patient_id`` where it has one, else the record itself (its own group)."""
    if "patient_id" in info.columns:
        ids = pd.to_numeric(info["patient_id"].iloc[rows], errors="coerce").to_numpy()
        missing = np.isnan(ids)
        if missing.any():  # a record without a patient id is a patient of its own
            ids = ids.astype(np.float64)
            ids[missing] = -1.0 - rows[missing]
        return ids.astype(np.int64)
    return -1 - rows.astype(np.int64)


def labeled_subset(labels: np.ndarray, groups: np.ndarray, fraction: float,
                   seed: int) -> np.ndarray:
    """Which rows keep their labels: bool [N].

    Args:
        labels: [N, C] multi-hot labels of the training rows.
        groups: [N] patient of each row.
        fraction: share of the patients (per stratum) whose records are labeled, in (0, 1].
        seed: the draw.

    Raises:
        DataError: a fraction outside (0, 1], or rows and groups of different lengths.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"data.label_fraction: {fraction} is not in (0, 1]")
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if len(labels) != len(groups):
        raise DataError(f"{len(labels)} label rows but {len(groups)} patient ids")
    if fraction == 1.0:
        return np.ones(len(labels), dtype=bool)
    patients, inverse = np.unique(groups, return_inverse=True)
    # each patient's labels: any of its records positive
    per_patient = np.zeros((len(patients), labels.shape[1]), dtype=bool)
    np.logical_or.at(per_patient, inverse, labels > 0.5)
    counts = per_patient.sum(axis=0)  # patients per class
    rarest = np.full(len(patients), -1, dtype=np.int64)  # -1: no positive label
    for p in range(len(patients)):
        positive = np.flatnonzero(per_patient[p])
        if len(positive):
            rarest[p] = positive[np.argmin(counts[positive])]
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(patients), dtype=bool)
    for stratum in np.unique(rarest):
        members = np.flatnonzero(rarest == stratum)
        take = max(1, int(round(fraction * len(members))))
        chosen[rng.permutation(members)[:take]] = True
    return chosen[inverse]
