"""Runs over seeds and label fractions: the two-level interval and the sweep end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill.cli import main
from distill.metrics.classification import (bootstrap_interval, bootstrap_samples,
                                            macro_auc, macro_auc_resampled, over_seeds,
                                            paired_difference)


def _scores(seed: int, labels: np.ndarray, signal: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return labels * signal + rng.normal(size=labels.shape)


def test_over_seeds_is_the_plain_bootstrap_for_one_seed_and_pools_several() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((80, 3)) < 0.4).astype(np.float32)
    samples = bootstrap_samples(labels, 200, 0)
    a, b = _scores(1, labels, 1.5), _scores(2, labels, 0.5)
    assert over_seeds(labels, [a], None, samples) == bootstrap_interval(labels, a, samples)
    assert over_seeds(labels, [a], [b], samples) == paired_difference(labels, a, b, samples)
    seeds_a = [_scores(s, labels, 1.5) for s in (3, 4, 5)]
    seeds_b = [_scores(s, labels, 0.5) for s in (6, 7, 8)]
    iv = over_seeds(labels, seeds_a, seeds_b, samples, seed=9, level=0.9)
    assert iv.value == pytest.approx(np.mean([macro_auc(labels, x) - macro_auc(labels, y)
                                              for x, y in zip(seeds_a, seeds_b)]))
    # the draws by hand: resample b, seeds drawn with replacement, mean of their differences
    diff = np.stack([macro_auc_resampled(labels, x, samples) - macro_auc_resampled(labels, y,
                                                                                   samples)
                     for x, y in zip(seeds_a, seeds_b)])
    picks = np.random.default_rng([9, 1]).integers(0, 3, size=(200, 3))
    draws = np.array([diff[picks[k], k].mean() for k in range(200)])
    assert (iv.low, iv.high) == pytest.approx(tuple(np.nanquantile(draws, [0.05, 0.95])))
    # seed variation widens the interval beyond one seed's
    one = over_seeds(labels, seeds_a[:1], seeds_b[:1], samples)
    assert iv.high - iv.low > 0 and one.high - one.low > 0
    with pytest.raises(ValueError, match="3 seed"):
        over_seeds(labels, seeds_a, seeds_b[:2], samples)


def test_a_sweep_runs_every_point_and_summarizes(tmp_path, capsys) -> None:
    import yaml

    recipe = {
        "name": "sw", "output_dir": str(tmp_path / "runs" / "{name}"), "seed": 0,
        "data": {"synthetic": {"records": 80, "seed": 0}, "cache_dir": str(tmp_path / "c")},
        "teacher": {"kind": "vlm", "name_or_path": "tiny", "train_mode": "frozen"},
        "students": [{"family": "xresnet1d", "size": "tiny"}],
        "distill": {"mhca": {"dim": 32, "heads": 2}, "ot": {"dim": 32, "iters": 5}},
        "train": {"epochs": 1, "batch_size": 16},
        "evaluate": {"bootstrap": 20, "latency_repeats": 1},
        "quantize": {"formats": []}, "export": {"enabled": False},
    }
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--quiet", "--seeds", "0", "1",
                 "--label-fractions", "0.5", "1"]) == 0
    root = tmp_path / "runs" / "sw"
    for f in ("0.5", "1"):
        for s in (0, 1):
            point = root / f"labels-{f}" / f"seed-{s}"
            assert (point / "results.json").is_file()
            assert yaml.safe_load((point / "recipe.yaml").read_text())["seed"] == s
    summary = json.loads((root / "sweep.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["label_fractions"] == [0.5, 1.0]
    point = summary["points"]["0.5"]["models"]
    distilled = point["distill xresnet1d/tiny"]
    assert len(distilled["per_seed"]) == 2
    assert distilled["vs_baseline"]["low"] <= distilled["vs_baseline"]["value"] \
        <= distilled["vs_baseline"]["high"]
    assert (root / "figures" / "learning_curve.png").stat().st_size > 1000
    # the fractions of one seed share its teacher's stages (linked, not retrained)
    for s in (0, 1):
        a, b = (root / f"labels-{f}" / f"seed-{s}" / "stages" / "teacher_cache.json"
                for f in ("0.5", "1"))
        assert json.loads(a.read_text()) == json.loads(b.read_text())
    assert "## Label fraction 0.5" in (root / "sweep.md").read_text()
    # a second call finds every point complete and only summarizes again
    capsys.readouterr()
    assert main(["run", str(path), "--quiet", "--seeds", "0", "1",
                 "--label-fractions", "0.5", "1"]) == 0
    assert capsys.readouterr().out.count("complete, skipped") >= 4 * 5


def test_overrides_after_the_list_options_go_with_the_recipe(tmp_path, capsys) -> None:
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "o", "output_dir": str(tmp_path / "{name}")}))
    assert main(["run", str(path), "--dry-run", "--seeds", "3", "4", "seed=9",
                 "--label-fractions", "0.5", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "== label fraction 0.5, seed 3" in out and "== label fraction 0.5, seed 4" in out
