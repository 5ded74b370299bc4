"""Evaluation metrics against scikit-learn and hand-written reference computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from distill.metrics.classification import (Interval, bootstrap_interval, bootstrap_samples, choose_thresholds,
                              fmax, label_aucs, macro_auc, macro_auc_resampled, paired_difference,
                              sample_accuracy)


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    labels = (rng.random((120, 5)) < [0.3, 0.1, 0.5, 0.2, 0.05]).astype(np.float32)
    scores = np.clip(labels * 0.3 + rng.random((120, 5)) * 0.8, 0, 1)
    return labels, scores


def test_macro_auc_equals_scikit_learn(case) -> None:
    labels, scores = case
    assert macro_auc(labels, scores) == pytest.approx(
        roc_auc_score(labels, scores, average="macro"), abs=1e-12)
    per = label_aucs(labels, scores)
    for c in range(5):
        assert per[c] == pytest.approx(roc_auc_score(labels[:, c], scores[:, c]))
    # a label without positives is left out of the macro average, not counted as 0.5
    labels2 = labels.copy()
    labels2[:, 4] = 0
    assert np.isnan(label_aucs(labels2, scores)[4])
    assert macro_auc(labels2, scores) == pytest.approx(
        roc_auc_score(labels2[:, :4], scores[:, :4], average="macro"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        macro_auc(labels, np.where(labels > 0, np.nan, scores))


def test_fmax_equals_a_hand_written_loop(case) -> None:
    labels, scores = case
    best = 0.0
    for t in np.linspace(0, 1, 101):
        precisions, recalls = [], []
        for y, s in zip(labels.astype(bool), scores):
            pred = s >= t
            if pred.sum():
                precisions.append((pred & y).sum() / pred.sum())
            if y.sum():
                recalls.append((pred & y).sum() / y.sum())
        if precisions and recalls:
            p, r = np.mean(precisions), np.mean(recalls)
            if p + r:
                best = max(best, 2 * p * r / (p + r))
    assert fmax(labels, scores) == pytest.approx(best, abs=1e-12)
    assert fmax(labels, labels) == pytest.approx(1.0)


def test_thresholds_maximise_validation_f1_and_accuracy_is_subset_accuracy(case) -> None:
    labels, scores = case
    th = choose_thresholds(labels, scores)
    for c in range(5):
        chosen = f1_score(labels[:, c], scores[:, c] >= th[c])
        every = max(f1_score(labels[:, c], scores[:, c] >= t) for t in np.unique(scores[:, c]))
        assert chosen == pytest.approx(every)
    pred = scores >= th
    exact = np.mean([(p == y.astype(bool)).all() for p, y in zip(pred, labels)])
    assert sample_accuracy(labels, scores, th) == pytest.approx(exact)


def test_bootstrap_matches_a_hand_computed_one(case) -> None:
    labels, scores = case
    samples = bootstrap_samples(labels, 50, seed=7)
    assert samples.shape == (50, 120)
    assert np.array_equal(samples, bootstrap_samples(labels, 50, seed=7))  # seeded
    for idx in samples:  # every resample has both classes of every label
        pos = labels[idx].sum(0)
        assert ((pos > 0) & (pos < 120)).all()
    # the same redraw rule written out: draw, check, redraw
    rng = np.random.default_rng(7)
    hand = []
    while len(hand) < 50:
        idx = rng.integers(0, 120, 120)
        pos = labels[idx].sum(0)
        if ((pos > 0) & (pos < 120)).all():
            hand.append(idx)
    assert np.array_equal(samples, np.stack(hand))
    draws = sorted(roc_auc_score(labels[i], scores[i], average="macro") for i in hand)
    # the batched Mann-Whitney form equals scikit-learn on every resample (ties included)
    tied = np.round(scores, 1)
    np.testing.assert_allclose(
        macro_auc_resampled(labels, tied, samples),
        [roc_auc_score(labels[i], tied[i], average="macro") for i in samples], atol=1e-12)
    ci = bootstrap_interval(labels, scores, samples, level=0.9)
    assert ci.value == pytest.approx(roc_auc_score(labels, scores, average="macro"))
    assert ci.low == pytest.approx(np.quantile(draws, 0.05))
    assert ci.high == pytest.approx(np.quantile(draws, 0.95))
    assert ci.low <= ci.value <= ci.high


def test_paired_difference(case) -> None:
    labels, scores = case
    samples = bootstrap_samples(labels, 40, seed=1)
    worse = np.clip(scores + np.random.default_rng(2).normal(0, 0.3, scores.shape), 0, 1)
    d = paired_difference(labels, scores, worse, samples)
    assert d.value == pytest.approx(macro_auc(labels, scores) - macro_auc(labels, worse))
    assert d.low > 0  # clearly better on every resample's scale
    back = paired_difference(labels, worse, scores, samples)
    assert back.value == pytest.approx(-d.value) and back.high == pytest.approx(-d.low)
    same = paired_difference(labels, scores, scores, samples)
    assert same == Interval(0.0, 0.0, 0.0)
    # a label that is too rare for any valid resample is a clear error
    rare = np.zeros((30, 1))
    rare[0] = 1
    with pytest.raises(ValueError, match="test set is too small"):
        bootstrap_samples(np.c_[rare, 1 - rare], 5, seed=0, max_tries=3)


def test_folder_bytes_counts_the_backbone_a_head_only_teacher_loads(tmp_path) -> None:
    """A teacher adapted in ``head`` mode saves only its head; its size on disk is the head
    plus the backbone it loads from (a shipped teacher or a folder), not the head alone."""
    from distill.metrics.footprint import folder_bytes

    backbone = tmp_path / "backbone-source"
    backbone.mkdir()
    (backbone / "model.safetensors").write_bytes(b"w" * 1000)
    saved = tmp_path / "best"
    saved.mkdir()
    (saved / "head.safetensors").write_bytes(b"h" * 10)
    (saved / "teacher.json").write_text(json.dumps({"saved_backbone": None, "source": str(backbone)}))
    assert folder_bytes(saved) == 1010
    (saved / "teacher.json").write_text(json.dumps({"saved_backbone": "full", "source": str(backbone)}))
    assert folder_bytes(saved) == 10  # a full save holds its own backbone
    assert folder_bytes(tmp_path / "missing") is None
