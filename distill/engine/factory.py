"""Recipe sections -> models: the one place that maps a recipe onto the model registries.

The engine stays model-agnostic: it calls ``teachers.create`` / ``students.create`` with
what the recipe says, and each consumer reads the view of the data the recipe gives it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from distill.core.schema import to_dict
from distill.core.errors import RecipeError
from distill.recipe import Recipe, StudentConfig, ViewConfig


def _view(recipe: Recipe, view: ViewConfig):
    from distill.data.dataset import SignalView

    leads = view.leads if view.leads is not None else recipe.data.leads
    rate = view.sampling_rate if view.sampling_rate is not None else recipe.data.sampling_rate
    return SignalView(leads=tuple(leads) if leads is not None else None, sampling_rate=rate)


def student_name(spec: StudentConfig) -> str:
    return f"{spec.family}/{spec.size}"


def consumer_views(recipe: Recipe) -> dict[str, Any]:
    """What each consumer sees of a record: ``teacher`` and ``student:<family>/<size>``.

    A view's unset leads fall back to ``data.leads`` (itself all 12 when unset), its unset
    rate to ``data.sampling_rate``.
    """
    views = {"teacher": _view(recipe, recipe.teacher.view)}
    for s in recipe.students:
        views[f"student:{student_name(s)}"] = _view(recipe, s.view)
    return views


def build_teacher(recipe: Recipe, classes: Sequence[str]):
    """The recipe's teacher adapter for these label classes. ``teacher.name_or_path`` may
    also be a folder written by a teacher's ``save_pretrained`` (e.g. an earlier run's
    ``teacher/best``) or the name of a teacher shipped with the package
    (:mod:`teachers.zoo`, e.g. ``ecg-vlm-small``): it is reloaded with the recipe's train
    mode (and, for an image teacher, the recipe's render size and layout)."""
    from pathlib import Path

    import teachers
    from teachers import zoo

    t = recipe.teacher
    img = recipe.data.image
    if t.kind == "vlm" and img.height != img.width:
        raise RecipeError(f"data.image: the vlm teacher reads square images, got "
                          f"{img.height}x{img.width}")
    saved = zoo.folder(t.name_or_path) or Path(t.name_or_path).expanduser()
    try:  # a render size or setting the model cannot take is a ValueError
        if (saved / "teacher.json").is_file():
            kind = json.loads((saved / "teacher.json").read_text()).get("kind")
            if kind != t.kind:
                raise RecipeError(f"teacher.name_or_path: {t.name_or_path} is a {kind} teacher, "
                                  f"but teacher.kind is {t.kind}")
            overrides: dict[str, Any] = {"train_mode": t.train_mode}
            if t.kind == "vlm":
                overrides.update(image_size=img.height, render=_render_fields(recipe))
            model = teachers.load(saved, **overrides)
            if list(model.id2label.values()) != list(classes):
                raise RecipeError(f"teacher.name_or_path: {saved} predicts "
                                  f"{list(model.id2label.values())}, the data has {list(classes)}")
        else:
            kwargs: dict[str, Any] = dict(
                num_labels=len(classes), id2label=dict(enumerate(classes)),
                train_mode=t.train_mode, load_in=t.load_in,
                trust_remote_code=t.trust_remote_code,
                lora=teachers.LoraSettings(r=t.lora_rank, alpha=t.lora_alpha,
                                           dropout=t.lora_dropout))
            if t.kind == "vlm":
                kwargs.update(tokens=t.tokens, prompt=t.prompt, pool=t.pool, image_size=img.height,
                              render=_render_fields(recipe))
            else:
                kwargs.update(sampling_rate=_view(recipe, t.view).sampling_rate,
                              seconds=t.seconds)
            model = teachers.create(t.kind, t.name_or_path, **kwargs)
    except RecipeError:
        raise
    except ValueError as exc:
        raise RecipeError(f"teacher: {exc}") from None
    patch = getattr(model, "patch_size", None)
    if t.kind == "vlm" and patch is not None and patch != img.patch_size:
        raise RecipeError(f"data.image.patch_size: {img.patch_size}, but the "
                          f"teacher's vision tower uses {patch}-pixel patches")
    return model


def build_student(recipe: Recipe, spec: StudentConfig, classes: Sequence[str]):
    """One student of the recipe, reading its own view of the data."""
    import students

    view = _view(recipe, spec.view)
    return students.create(spec.family, spec.size, num_labels=len(classes),
                           id2label=dict(enumerate(classes)), leads=view.leads,
                           sampling_rate=view.sampling_rate)


def build_objective(recipe: Recipe, student_dim: int, teacher_dim: int):
    """The recipe's distillation objective for a student/teacher pair of token widths:
    L = (1 - alpha) * BCE + alpha * sum of lambda_i * L_i over the terms with lambda_i > 0."""
    from distill.losses.objective import build_objective as _build

    d = recipe.distill
    return _build(
        d.alpha, to_dict(d.weights), student_dim, teacher_dim,
        kd={"temperature": d.temperature},
        mhca={"dim": d.align_dim, "heads": d.mhca_heads},
        ot={"dim": d.align_dim, "reg": d.ot_reg, "iters": d.ot_iters, "lead_prior": d.lead_prior},
        relation={"criterion": d.relation_criterion, "batch_rkd": d.batch_rkd},
    )


def _render_fields(recipe: Recipe) -> dict[str, Any]:
    """The render layout an image teacher's patch-to-lead map describes (its size is the
    tower's own)."""
    return {k: v for k, v in dataclasses.asdict(render_config(recipe)).items()
            if k not in ("height", "width")}


def render_config(recipe: Recipe):
    """The one render configuration of a recipe: what the data stage draws and what the
    image teacher's patch-to-lead map describes (they must never disagree)."""
    from distill.data.render import RenderConfig

    img = recipe.data.image
    return RenderConfig(height=img.height, width=img.width, grid=img.grid)
