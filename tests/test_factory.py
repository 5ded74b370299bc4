"""Recipes -> models: the quickstart's teacher and students, views, size mismatches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data.render import RenderConfig, render_batch
from distill.core.errors import RecipeError
from distill.engine.factory import build_student, build_teacher, consumer_views
from distill.core.contract import check_output, model_inputs
from distill.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["CD", "HYP", "MI", "NORM", "STTC"]


def quickstart(*overrides: str):
    return load_recipe(REPO / "recipes" / "quickstart.yaml", list(overrides))


def test_quickstart_teacher_reads_the_rendered_images() -> None:
    recipe = quickstart()
    teacher = build_teacher(recipe, CLASSES).eval()
    assert teacher.patch_size == recipe.data.image.patch_size
    signals = np.random.default_rng(0).normal(0, 0.3, (2, 12, 1000)).astype(np.float32)
    images = render_batch(signals, 100, RenderConfig(height=224, width=224))
    with torch.no_grad():
        out = teacher(**model_inputs(teacher, {"image": torch.from_numpy(images)}))
    check_output(out, batch_size=2, num_labels=5, where="teacher")
    assert teacher.id2label == dict(enumerate(CLASSES))


def test_students_read_their_own_view() -> None:
    recipe = quickstart("students=[{family: leadformer, size: tiny, view: {leads: [I], "
                        "sampling_rate: 50}}, {family: xresnet1d, size: tiny}]")
    views = consumer_views(recipe)
    wearable = build_student(recipe, recipe.students[0], CLASSES).eval()
    full = build_student(recipe, recipe.students[1], CLASSES).eval()
    assert views["student:leadformer/tiny"].leads == ("I",)
    with torch.no_grad():
        out = wearable(signal=torch.randn(2, 1, 500))
        check_output(out, batch_size=2, num_labels=5)
        assert (out.token_leads == 0).all()
        check_output(full(signal=torch.randn(2, 12, 1000)), batch_size=2, num_labels=5)
    assert wearable.config.id2label[0] == "CD"


def test_render_size_the_teacher_cannot_read_is_a_recipe_error() -> None:
    recipe = quickstart("data.image.height=336", "data.image.width=336")
    with pytest.raises(RecipeError, match=r"^teacher: .*render at height=224, width=224"):
        build_teacher(recipe, CLASSES)
    recipe = quickstart("data.image.patch_size=32")
    with pytest.raises(RecipeError, match="data.image.patch_size: 32, but the teacher's vision "
                                          "tower uses 16-pixel patches"):
        build_teacher(recipe, CLASSES)


def test_signal_teacher_from_recipe() -> None:
    recipe = quickstart("teacher.kind=signal", "teacher.name_or_path=tiny", "teacher.train_mode=full",
                        "teacher.seconds=5")
    teacher = build_teacher(recipe, CLASSES).eval()
    with torch.no_grad():
        out = teacher(**model_inputs(teacher, {"signal": torch.randn(2, 12, 1000)}))
    check_output(out, batch_size=2, num_labels=5)
    assert set(out.token_leads.tolist()) <= set(range(-1, 12))


def test_objective_from_the_recipe_trains_student_and_alignment() -> None:
    """The quickstart's objective (relation on, ot off) on the tiny VLM teacher and a tiny
    student: every term the recipe weights is computed, gradients reach the student and the learnable losses."""
    from distill.engine.factory import build_objective

    recipe = quickstart("teacher.name_or_path=tiny", "teacher.train_mode=full",
                        "distill.weights.ot=0", "distill.weights.relation=1",
                        "distill.mhca.dim=32", "distill.mhca.heads=2")
    teacher = build_teacher(recipe, CLASSES).eval()
    student = build_student(recipe, recipe.students[0], CLASSES).train()
    rng = np.random.default_rng(1)
    signals = rng.normal(0, 0.3, (3, 12, 1000)).astype(np.float32)
    batch = {"signal": torch.from_numpy(signals),
             "image": torch.from_numpy(render_batch(signals, 100, RenderConfig(224, 224))),
             "labels": torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 1.0]])}
    with torch.no_grad():
        t_out = teacher(**model_inputs(teacher, batch))
    s_out = student(**model_inputs(student, batch))
    objective = build_objective(recipe, s_out.tokens.shape[-1], t_out.tokens.shape[-1])
    out = objective(s_out, t_out, batch)
    assert set(out.terms) == {"task", "kd", "mhca", "relation"}  # ot has weight 0
    d = recipe.distill
    expected = (1 - d.alpha) * out.terms["task"] + d.alpha * (
        d.weights["kd"] * out.terms["kd"] + d.weights["mhca"] * out.terms["mhca"]
        + d.weights["relation"] * out.terms["relation"])
    torch.testing.assert_close(out.total.detach(), expected)
    out.total.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    learnable = [p for p in objective.parameters() if p.requires_grad]
    assert learnable and all(p.grad is not None for p in learnable)


def test_mhca_dim_must_split_into_heads() -> None:
    with pytest.raises(RecipeError, match=r"distill\.mhca\.dim: 30 must be a multiple of heads "
                                          r"\(distill\.mhca\.heads=4\)"):
        quickstart("distill.mhca.dim=30")


def test_legacy_flat_distill_keys_still_load_into_the_loss_sections() -> None:
    """0.1 recipes wrote distill.temperature, distill.align_dim ...: they still load (with a
    warning), into the loss families' sections, and hash as before."""
    with pytest.warns(FutureWarning, match="distill.align_dim is now distill.mhca.dim"):
        old = quickstart("distill.align_dim=64", "distill.ot_reg=0.1", "distill.temperature=3",
                         "distill.mhca.teacher_rank=0")  # 0.1 had no teacher_rank
    new = quickstart("distill.mhca.dim=64", "distill.ot.dim=64", "distill.ot.reg=0.1",
                     "distill.kd.temperature=3", "distill.mhca.teacher_rank=0")
    assert old == new and old.distill.losses["ot"].dim == 64
    flat = old.distill.hash_dict()
    assert flat["align_dim"] == 64 and flat["ot_reg"] == 0.1 and flat["temperature"] == 3.0
    assert set(flat) == {"alpha", "weights", "temperature", "ot_reg", "ot_iters", "lead_prior",
                         "mhca_heads", "align_dim", "relation_criterion", "batch_rkd"}
    # a setting the flat layout cannot write: the section as it is
    assert "mhca" in quickstart("distill.mhca.dim=64").distill.hash_dict()


def test_a_shipped_teacher_of_another_kind_is_refused() -> None:
    """``teacher.kind: signal`` naming the shipped VLM stops with the key and both kinds."""
    with pytest.raises(RecipeError, match="teacher.name_or_path: ecg-vlm-small is a vlm teacher, "
                                          "but teacher.kind is signal"):
        build_teacher(quickstart("teacher.kind=signal"), CLASSES)
