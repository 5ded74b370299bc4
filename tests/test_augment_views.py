"""train.augment.views: the students draw one of K fixed augmented views of each record per
epoch, and the teacher's outputs on every view of every record (transfer records included)
are cached, so distillation reads the teacher on the very record the student sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.core.errors import DataError, RecipeError
from distill.data.dataset import PerDraw, SignalView
from distill.data.load import render_config
from distill.engine.factory import student_key
from distill.engine.jobs import (augmentation, baseline_job, build_teacher_cache, distill_job,
                                 load_frozen_teacher, load_job_data, student_settings,
                                 teacher_settings)
from distill.engine.teacher_cache import DrawnOutputs
from distill.recipe import recipe_from_dict
from distill.run import pipeline

AUGMENT = {"noise": 0.05, "amplitude": 0.1, "shift": 0.5, "views": 3}


def _recipe(root, **train):
    return recipe_from_dict({
        "name": "views", "output_dir": str(root / "runs" / "{name}"), "seed": 2,
        "data": {"synthetic": {"records": 120, "seed": 0}, "cache_dir": str(root / "cache"),
                 "label_fraction": 0.5},
        "teacher": {"kind": "vlm", "name_or_path": "tiny", "train_mode": "frozen"},
        "students": [{"family": "xresnet1d", "size": "tiny"}],
        "distill": {"alpha": 0.5, "mhca": {"dim": 32, "heads": 2}, "ot": {"dim": 32, "iters": 10},
                    "transfer": {"synthetic": 20, "seed": 5}},
        "train": {"epochs": 1, "batch_size": 16, "augment": AUGMENT, **train},
    })


@pytest.fixture(scope="module")
def jd(tmp_path_factory):
    return load_job_data(_recipe(tmp_path_factory.mktemp("views")), progress=False)


def test_fixed_draws_are_picked_per_epoch_and_reproducible(jd) -> None:
    data, aug = jd.data, augmentation(jd.recipe)
    views = {"s": SignalView()}
    split = data.split("train", views, transform=aug, seed=4, draws=3)
    pinned = [data.split("train", views, transform=aug, seed=4, draws=3, draw=d)
              for d in range(3)]
    picked: dict[int, list[int]] = {}
    for epoch in range(6):
        split.set_epoch(epoch)
        for i in range(8):
            item = split[i]
            d = item["draw"]
            picked.setdefault(i, []).append(d)
            # whichever epoch draws it, view d of a record is the same augmented record
            assert torch.equal(item["s"], pinned[d][i]["s"])
    assert {d for ds in picked.values() for d in ds} == {0, 1, 2}
    assert any(len(set(ds)) > 1 for ds in picked.values())  # the pick changes with the epoch
    pinned[0].set_epoch(5)  # a pinned split ignores the epoch
    first = pinned[0][0]["s"]
    assert not torch.equal(first, pinned[1][0]["s"])
    assert not torch.allclose(first, data.split("train", views)[0]["s"])  # it is augmented
    # the draws are not the epoch-keyed draws of views: 0 (a stream of their own)
    fresh = data.split("train", views, transform=aug, seed=4)
    assert all(not torch.equal(fresh[0]["s"], p[0]["s"]) for p in pinned)

    per = PerDraw([np.full((len(data), 1), d, dtype=np.float32) for d in range(3)])
    with_extra = data.split("train", views, transform=aug, seed=4, draws=3, extras={"x": per})
    with_extra.set_epoch(2)
    assert all(with_extra[i]["x"].item() == with_extra[i]["draw"] for i in range(8))
    with pytest.raises(DataError, match="fixed augmentation draws need a transform"):
        data.split("train", views, draws=3)
    with pytest.raises(DataError, match=r"extra 'x' has 3 draws, the split 2"):
        data.split("train", views, transform=aug, draws=2, extras={"x": per})
    with pytest.raises(DataError, match="draw 3 of 3 fixed augmentation draws"):
        data.split("train", views, transform=aug, draws=3, draw=3)


def test_the_teacher_cache_covers_every_view_of_every_record(jd, monkeypatch) -> None:
    import distill.engine.teacher_cache as tc

    recipe = jd.recipe
    teacher = load_frozen_teacher(jd, recipe.run_dir)
    cache = build_teacher_cache(jd, teacher, progress=False)
    transfer = build_teacher_cache(jd, teacher, progress=False, transfer=True)
    assert isinstance(cache, DrawnOutputs) and isinstance(transfer, DrawnOutputs)
    assert len(cache.draws) == len(transfer.draws) == 3
    assert all(len(e.logits) == len(jd.data) for e in cache.draws)
    assert all(len(e.logits) == len(jd.transfer) == 20 for e in transfer.draws)
    assert len({e.key for e in cache.draws + transfer.draws}) == 6
    assert not np.allclose(cache.draws[0].logits, cache.draws[1].logits)

    # distillation reads, for every item, the teacher's outputs on the very augmented record
    # its student sees: the row of the item's draw, equal to the teacher run on that record
    spec = recipe.students[0]
    key = student_key(spec)
    job = distill_job(jd, spec, teacher, cache, transfer_cache=transfer)
    job.train_set.set_epoch(1)
    render = render_config(recipe.data)
    both = {"teacher": jd.views["teacher"], key: jd.views[key]}
    parts = job.train_set.datasets  # labeled, hidden-label, transfer records
    assert len(parts) == 3
    checked = 0
    for part, source, entries in ((parts[0], jd.data, cache), (parts[1], jd.data, cache),
                                  (parts[2], jd.transfer, transfer)):
        for i in range(0, len(part), max(1, len(part) // 3)):
            item = part[i]
            d, k = item["draw"], int(item["index"])
            np.testing.assert_array_equal(item["teacher.logits"].numpy(),
                                          entries.draws[d].logits[k])
            same = source.split("all", both, transform=augmentation(recipe), render=render,
                                seed=recipe.seed, draws=3, draw=d)[k]
            assert torch.equal(item[key], same[key])
            with torch.no_grad():
                live = teacher(image=same["image"][None])
            np.testing.assert_allclose(item["teacher.logits"].numpy(), live.logits[0].numpy(),
                                       atol=1e-5)
            checked += 1
    assert checked >= 6
    # the baseline draws the same views of the same labeled records in the same epoch
    base = baseline_job(jd, spec).train_set
    base.set_epoch(1)
    for i in (0, 5, len(base) - 1):
        a, b = base[i], parts[0][i]
        assert a["draw"] == b["draw"] and torch.equal(a[key], b[key])

    # a second build reads every entry; the teacher does not run again
    def no_run(*_a, **_k):
        raise AssertionError("the teacher ran although its outputs were cached")

    monkeypatch.setattr(tc, "_fill", no_run)
    again = build_teacher_cache(jd, teacher, progress=False)
    assert [e.folder for e in again.draws] == [e.folder for e in cache.draws]
    # a cache of another number of views is refused by the job
    with pytest.raises(ValueError, match=r"train\.augment\.views is 3; the teacher outputs "
                                         r"given \(.*teacher-outputs-.*\) cover 2 augmented "
                                         r"views per record"):
        distill_job(jd, spec, teacher, DrawnOutputs(cache.draws[:2]), transfer_cache=transfer)


def test_views_change_the_students_and_the_cache_but_not_the_teacher(tmp_path) -> None:
    four, three = _recipe(tmp_path, augment={**AUGMENT, "views": 4}), _recipe(tmp_path)
    live = _recipe(tmp_path, augment={**AUGMENT, "views": 0})
    assert teacher_settings(four) == teacher_settings(three) == teacher_settings(live)
    assert student_settings(four) != student_settings(three) != student_settings(live)
    stages = {s.name: s for s in pipeline.STAGES}
    h = {name: [pipeline.stage_hash(stages[name], r) for r in (four, three, live)]
         for name in ("teacher", "teacher_cache", "baseline", "distill")}
    assert len(set(h["teacher"])) == 1
    for name in ("teacher_cache", "baseline", "distill"):
        assert len(set(h[name])) == 3, name
    with pytest.raises(RecipeError, match=r"^train\.augment\.views: 2, but no augmentation "
                                          r"is on"):
        _recipe(tmp_path, augment={"views": 2})
