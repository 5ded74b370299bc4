"""The labeled subset of ``data.label_fraction``: patient-grouped, stratified, seeded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from distill.core.errors import DataError
from distill.data.subset import labeled_subset, patient_groups


def _toy(n_patients: int = 200, seed: int = 0):
    """Patients with 1-3 records each; class 2 rare (5% of patients)."""
    rng = np.random.default_rng(seed)
    groups, labels = [], []
    for p in range(n_patients):
        cls = 2 if p % 20 == 0 else int(rng.integers(0, 2))
        for _ in range(int(rng.integers(1, 4))):
            row = np.zeros(3, dtype=np.float32)
            row[cls] = 1
            if cls != 2 and rng.random() < 0.3:
                row[1 - cls] = 1  # multi-label rows
            groups.append(1000 + p)
            labels.append(row)
    return np.stack(labels), np.asarray(groups)


def test_patients_are_never_split_and_the_draw_is_seeded() -> None:
    labels, groups = _toy()
    chosen = labeled_subset(labels, groups, 0.1, seed=3)
    for g in np.unique(groups):  # all of a patient's records, or none
        assert len(set(chosen[groups == g])) == 1
    assert np.array_equal(chosen, labeled_subset(labels, groups, 0.1, seed=3))
    assert not np.array_equal(chosen, labeled_subset(labels, groups, 0.1, seed=4))
    assert labeled_subset(labels, groups, 1.0, seed=3).all()


def test_each_stratum_gives_its_share_and_rare_classes_keep_examples() -> None:
    labels, groups = _toy()
    patients = np.unique(groups)
    for fraction in (0.05, 0.1, 0.25, 0.5):
        chosen = labeled_subset(labels, groups, fraction, seed=0)
        picked = np.unique(groups[chosen])
        assert abs(len(picked) - fraction * len(patients)) <= 3  # one rounding per stratum
        # the rare class (10 patients) keeps max(1, round(f * 10)) labeled patients
        rare = np.unique(groups[labels[:, 2] > 0])
        assert len(np.intersect1d(rare, picked)) == max(1, round(fraction * len(rare)))


def test_bad_fractions_and_patient_ids() -> None:
    labels, groups = _toy(20)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(DataError, match=r"^data\.label_fraction: .* is not in \(0, 1\]"):
            labeled_subset(labels, groups, bad, seed=0)
    info = pd.DataFrame({"patient_id": [7.0, None, 7.0, 9.0]})
    rows = np.arange(4)
    ids = patient_groups(info, rows)
    assert ids[0] == ids[2] and ids[1] != ids[0] and len(set(ids)) == 3
    assert len(set(patient_groups(pd.DataFrame({"x": range(4)}), rows))) == 4
