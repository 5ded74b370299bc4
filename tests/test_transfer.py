"""data.label_fraction and distill.transfer: the labeled subset is the same for the baseline
and the distilled student, transfer records never reach the label term, and the teacher's
outputs cover them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill.core.contract import ECGModelOutput
from distill.core.errors import RecipeError
from distill.data.subset import patient_groups
from distill.data.transfer import Flagged, MixedSet
from distill.engine.jobs import (baseline_job, build_teacher_cache, distill_job,
                                 load_frozen_teacher, load_job_data)
from distill.engine.factory import build_objective
from distill.recipe import recipe_from_dict
from distill.run import pipeline


def _recipe(root: Path, cache: Path, **changes):
    d = {
        "name": "tr", "output_dir": str(root / "runs" / "{name}"), "seed": 0,
        "data": {"synthetic": {"records": 120, "seed": 0}, "cache_dir": str(cache),
                 "label_fraction": 0.25},
        "teacher": {"kind": "vlm", "name_or_path": "tiny", "train_mode": "frozen"},
        "students": [{"family": "xresnet1d", "size": "tiny"}],
        "distill": {"alpha": 0.5, "mhca": {"dim": 32, "heads": 2},
                    "ot": {"dim": 32, "iters": 10},
                    "transfer": {"synthetic": 30, "seed": 5}},
        "train": {"epochs": 1, "batch_size": 16},
    }
    for section, values in changes.items():
        d[section] = {**d.get(section, {}), **values}
    return recipe_from_dict(d)


@pytest.fixture(scope="module")
def jd(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    return load_job_data(_recipe(root, root / "cache"), progress=False)


def test_the_labeled_subset_is_grouped_and_shared_by_baseline_and_distillation(jd) -> None:
    data, train = jd.data, jd.data.splits["train"]
    assert set(jd.labeled_rows) | set(jd.unlabeled_rows) == set(train)
    assert not set(jd.labeled_rows) & set(jd.unlabeled_rows)
    assert 0.15 < len(jd.labeled_rows) / len(train) < 0.45  # about a quarter, by patient
    groups = patient_groups(data.info, np.arange(len(data)))
    assert not set(groups[jd.labeled_rows]) & set(groups[jd.unlabeled_rows])
    spec = jd.recipe.students[0]
    base = baseline_job(jd, spec)
    teacher = load_frozen_teacher(jd, jd.recipe.run_dir)
    cache = build_teacher_cache(jd, teacher, progress=False)
    transfer = build_teacher_cache(jd, teacher, progress=False, transfer=True)
    dist = distill_job(jd, spec, teacher, cache, transfer_cache=transfer)
    assert sorted(base.train_set[i]["index"] for i in range(len(base.train_set))) == \
        sorted(int(k) for k in jd.labeled_rows)
    assert isinstance(dist.train_set, MixedSet)
    labeled, rest, extra = dist.train_set.datasets
    assert [int(labeled[i]["index"]) for i in range(len(labeled))] == \
        [base.train_set[i]["index"] for i in range(len(base.train_set))]
    assert len(rest) == len(jd.unlabeled_rows) and len(extra) == len(jd.transfer) == 30
    # the transfer records carry the teacher's outputs, and no labels
    item = extra[3]
    assert item["labeled"] == 0 and not item["labels"].any()
    np.testing.assert_array_equal(item["teacher.logits"].numpy(),
                                  transfer.logits[int(item["index"])])
    assert labeled[0]["labeled"] == 1
    # the transfer set's patients are not the labeled set's
    t_ids = set(jd.transfer.info["patient_id"].astype(int))
    assert not t_ids & set(data.info["patient_id"].astype(int))


def test_transfer_records_never_reach_the_label_term(jd) -> None:
    """Flipping a transfer record's labels (or its very presence as labeled) changes no
    gradient of the task term; its distillation terms still count."""
    objective = build_objective(jd.recipe, 8, 16)
    g = torch.Generator().manual_seed(0)

    def out(d: int) -> ECGModelOutput:
        return ECGModelOutput(logits=torch.randn(4, 5, generator=g, requires_grad=True),
                              tokens=torch.randn(4, 6, d, generator=g),
                              token_leads=torch.arange(6) % 12,
                              pooled=torch.randn(4, d, generator=g))

    student, teacher = out(8), out(16)
    labels = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0.0], [0, 0, 0, 0, 0]])
    labeled = torch.tensor([1.0, 1.0, 0.0, 0.0])
    a = objective(student, teacher, {"labels": labels, "labeled": labeled})
    flipped = labels.clone()
    flipped[2:] = 1.0
    b = objective(student, teacher, {"labels": flipped, "labeled": labeled})
    torch.testing.assert_close(a.terms["task"], b.terms["task"])
    two = torch.nn.functional.binary_cross_entropy_with_logits(student.logits[:2], labels[:2])
    torch.testing.assert_close(a.terms["task"], two.detach())
    # through the objective itself: the gradient on the logits is the same whatever the
    # transfer records' labels say, and the distillation terms still reach those logits
    def grad(lab: torch.Tensor) -> torch.Tensor:
        total = objective(student, teacher, {"labels": lab, "labeled": labeled}).total
        return torch.autograd.grad(total, student.logits)[0]

    torch.testing.assert_close(grad(labels), grad(flipped))
    assert grad(labels)[2:].abs().sum() > 0
    unmasked = objective(student, teacher, {"labels": flipped}).total
    changed = torch.autograd.grad(unmasked, student.logits)[0]
    assert not torch.allclose(changed[2:], grad(labels)[2:])  # without the mask they would


def test_flagged_parts_and_the_mixed_set_follow_epochs() -> None:
    class Part(torch.utils.data.Dataset):
        epoch = -1

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"labels": torch.ones(3), "index": i}

        def set_epoch(self, e):
            self.epoch = e

    a, b = Part(), Part()
    mixed = MixedSet([Flagged(a, labeled=True), Flagged(b, labeled=False)])
    mixed.set_epoch(4)
    assert a.epoch == b.epoch == 4
    assert [int(mixed[i]["labeled"]) for i in range(4)] == [1, 1, 0, 0]
    assert mixed[3]["labels"].sum() == 0 and mixed[0]["labels"].sum() == 3


def test_recipe_checks_and_unchanged_hashes(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"^data\.label_fraction: must be > 0"):
        _recipe(tmp_path, tmp_path, data={"label_fraction": 0})
    with pytest.raises(RecipeError, match=r"distill\.transfer\.first_patient_id: patient ids "
                                          r"\d+-\d+ overlap the labeled set's"):
        _recipe(tmp_path, tmp_path, distill={"transfer": {"synthetic": 30,
                                                          "first_patient_id": 50}})
    with pytest.raises(RecipeError, match="give one source of extra records"):
        _recipe(tmp_path, tmp_path, distill={"transfer": {"synthetic": 30, "path": "x"}})
    # at their defaults the new settings leave every stage hash as before
    plain = _recipe(tmp_path, tmp_path, data={"label_fraction": 1.0},
                    distill={"transfer": {"synthetic": 0}})
    assert "label_fraction" not in plain.hash_dict()["data"]
    assert "transfer" not in plain.distill.hash_dict()
    scarce = _recipe(tmp_path, tmp_path)
    stages = {s.name: s for s in pipeline.STAGES}
    for name in ("baseline", "distill"):
        assert pipeline.stage_hash(stages[name], scarce) != pipeline.stage_hash(stages[name],
                                                                               plain)
    for name in ("data", "teacher", "teacher_cache"):  # the teacher sees every label
        assert pipeline.stage_hash(stages[name], scarce) == pipeline.stage_hash(stages[name],
                                                                               plain)


def test_a_label_scarce_distillation_trains_on_labeled_and_transfer_records(jd, tmp_path) -> None:
    """One epoch of the mixed set through the training loop: every record is seen, the task
    term is logged from labeled records only, and the student is saved."""
    from distill.engine.train import fit

    spec = jd.recipe.students[0]
    teacher = load_frozen_teacher(jd, jd.recipe.run_dir)
    job = distill_job(jd, spec, teacher, build_teacher_cache(jd, teacher, progress=False),
                      transfer_cache=build_teacher_cache(jd, teacher, progress=False,
                                                         transfer=True))
    result = fit(job, jd.recipe.train, tmp_path / "d", progress=False)
    row = result.metrics["history"][0]
    assert row["train_records_per_s"] > 0 and np.isfinite(row["train_task"])
    assert result.metrics["steps"] == len(job.train_set) // jd.recipe.train.batch_size
    assert (result.best_folder / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="pass the teacher's outputs on them"):
        distill_job(jd, spec, teacher, build_teacher_cache(jd, teacher, progress=False))
