"""Recipe sections -> models: the one place that maps a recipe onto the model registries.

The engine stays model-agnostic: it calls ``teachers.create`` / ``students.create`` /
``build_objective`` with what the recipe says; what a teacher kind takes from the recipe
is the adapter's own business (``TeacherAdapter.recipe_settings``), and each consumer
reads the view of the data the recipe gives it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import students
import teachers
from distill.core.errors import RecipeError
from distill.core.layout import ModelId
from distill.data.dataset import SignalView, lead_mask_key
from distill.data.load import signal_view
from distill.losses.objective import DistillationObjective
from distill.losses.objective import build_objective as _build_objective
from distill.models.translator import TranslatorConfig, Upsampler
from distill.recipe import Recipe, StudentConfig
from teachers import zoo


def student_name(spec: StudentConfig) -> str:
    """"family/size" of a student spec."""
    return ModelId.student("baseline", spec).student_name


def student_key(spec: StudentConfig) -> str:
    """The batch entry holding this student's view."""
    return f"student:{student_name(spec)}"


def student_reads_images(spec: StudentConfig) -> bool:
    """Whether a student reads the rendered printout (an image or VLM student)."""
    return students.reads_images(spec.family)


def reads_images(recipe: Recipe) -> bool:
    """Whether anything in the recipe reads the rendered printout (its teacher or one of its
    students): the data stage then renders every record."""
    return (teacher_class(recipe).reads_images()
            or any(student_reads_images(s) for s in recipe.students))


def student_inputs(spec: StudentConfig) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """Batch -> a student's keyword inputs: its own signal view (``student:<name>``) for a
    signal student, the rendered printout (``image``) for an image student; plus its view's
    lead mask (``lead_mask``) when the batch carries one (``data.on_flat_lead: mask``) and
    the family reads it (``students.reads_lead_mask``; others read the zeros)."""
    if student_reads_images(spec):
        return lambda batch: {"image": batch["image"]}
    key = student_key(spec)
    if not students.reads_lead_mask(spec.family):
        return lambda batch: {"signal": batch[key]}
    mask_key = lead_mask_key(key)

    def inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
        out = {"signal": batch[key]}
        if mask_key in batch:
            out["lead_mask"] = batch[mask_key]
        return out

    return inputs


def teacher_view(recipe: Recipe) -> SignalView:
    return signal_view(recipe.data, recipe.teacher.view)


def consumer_views(recipe: Recipe) -> dict[str, SignalView]:
    """What each consumer sees of a record: ``teacher`` and ``student:<family>/<size>``.

    A view's unset leads fall back to ``data.leads`` (itself all 12 when unset), its unset
    rate to ``data.sampling_rate``.
    """
    views = {"teacher": teacher_view(recipe)}
    for s in recipe.students:
        views[student_key(s)] = student_view(recipe, s)
    return views


def student_view(recipe: Recipe, spec: StudentConfig) -> SignalView:
    """A student's view; with ``view.translate``, the leads at the translator's source rate
    and the translator as the view's ``upsample`` step (the student reads its target rate).

    Raises:
        RecipeError: the translator folder is missing or not a translator, or the view's
        ``sampling_rate`` is neither the translator's source rate (the rate the device
        records) nor its target rate (the rate the student reads).
    """
    view = signal_view(recipe.data, spec.view)
    path = spec.view.translate
    if path is None:
        return view
    at = f"students.{recipe.students.index(spec)}.view"
    try:
        up = Upsampler(path)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{at}.translate: cannot read a translator in {path} "
                          f"({str(exc).splitlines()[0]}); make one with `ecg-distill "
                          f"translate` (its RUN/translator/best)") from None
    if not isinstance(up.config, TranslatorConfig):
        raise RecipeError(f"{at}.translate: {path} holds a {up.config.model_type} model, not "
                          f"a translator")
    if spec.view.sampling_rate not in (None, up.source_rate, up.target_rate):
        raise RecipeError(f"{at}.sampling_rate: {spec.view.sampling_rate} Hz, but the "
                          f"translator {path} reads {up.source_rate} Hz and writes "
                          f"{up.target_rate} Hz (give either, or leave it unset)")
    return SignalView(leads=view.leads, sampling_rate=up.source_rate, upsample=up)


def saved_student_view(config: Any, folder: str | Path | None = None) -> SignalView:
    """The view a saved student reads (its config, a dict or a config object): its leads at
    its rate, or, for a student trained on a translator's output (``config.translate``,
    written by the distillation jobs), its leads at the translator's source rate, upsampled
    by that translator (:class:`Upsampler`; the folder must still be where it was). A
    relative translator path (an exported student bundles its translator) is read under
    the student's own ``folder``."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    leads, rate = tuple(get("leads")), int(get("sampling_rate"))
    translate = get("translate")
    if not translate:
        return SignalView(leads=leads, sampling_rate=rate)
    path = Path(translate["checkpoint"])
    if folder is not None and not path.is_absolute():
        path = Path(folder) / path
    if not (path / "config.json").exists():
        raise RecipeError(f"this student reads the translator {path}'s output, and that folder "
                          f"is gone; restore it to score or export the student")
    up = Upsampler(path)
    return SignalView(leads=leads, sampling_rate=up.source_rate, upsample=up)


def student_rate(view: SignalView) -> int | None:
    """The rate a student with this view reads: its upsampler's output rate, or the view's."""
    up = view.upsample
    return int(up.target_rate) if up is not None else view.sampling_rate


def teacher_class(recipe: Recipe) -> type[teachers.TeacherAdapter]:
    """The adapter class of the recipe's ``teacher.kind``."""
    return teachers.teacher_class(recipe.teacher.kind)


def saved_teacher_folder(name_or_path: str) -> Path | None:
    """The folder of a saved or shipped teacher named by ``name_or_path``, or None."""
    folder = zoo.folder(name_or_path) or Path(name_or_path).expanduser()
    return folder if (folder / "teacher.json").is_file() else None


def build_teacher(recipe: Recipe, classes: Sequence[str], **changes: Any):
    """The recipe's teacher adapter for these label classes. ``teacher.name_or_path`` may
    also be a folder written by a teacher's ``save_pretrained`` (e.g. an earlier run's
    ``teacher/best``) or the name of a teacher shipped with the package
    (:mod:`teachers.zoo`, e.g. ``ecg-vlm-small``): it is reloaded with the recipe's train
    mode and the adapter's recipe settings (for an image teacher, the render size and
    layout). ``changes`` replace fields of the ``teacher`` section (``load_in``,
    ``train_mode``)."""
    t = dataclasses.replace(recipe.teacher, **changes) if changes else recipe.teacher
    cls = teacher_class(recipe)
    saved = saved_teacher_folder(t.name_or_path)
    try:  # a render size or setting the model cannot take is a ValueError
        settings = cls.recipe_settings(t, recipe.data, teacher_view(recipe),
                                       saved=saved is not None)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    try:
        if saved is not None:
            kind = json.loads((saved / "teacher.json").read_text()).get("kind")
            if kind != t.kind:
                raise RecipeError(f"teacher.name_or_path: {t.name_or_path} is a {kind} teacher, "
                                  f"but teacher.kind is {t.kind}")
            model = teachers.load(saved, train_mode=t.train_mode, **settings)
            if list(model.id2label.values()) != list(classes):
                raise RecipeError(f"teacher.name_or_path: {saved} predicts "
                                  f"{list(model.id2label.values())}, the data has {list(classes)}")
        else:
            model = teachers.create(
                t.kind, t.name_or_path, num_labels=len(classes),
                id2label=dict(enumerate(classes)), train_mode=t.train_mode, load_in=t.load_in,
                trust_remote_code=t.trust_remote_code,
                lora=teachers.LoraSettings(r=t.lora_rank, alpha=t.lora_alpha,
                                           dropout=t.lora_dropout),
                **settings)
    except RecipeError:
        raise
    except ValueError as exc:
        raise RecipeError(f"teacher: {exc}") from None
    try:
        model.check_recipe(recipe.data)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    return model


def build_student(recipe: Recipe, spec: StudentConfig, classes: Sequence[str]):
    """One student of the recipe, reading its own view of the data: a signal student its
    leads and rate; an image student the run's printout (``data.image``: size, grid),
    with LoRA adapters when ``train_mode`` is lora."""
    view = student_view(recipe, spec)
    extra: dict[str, Any] = {}
    if student_reads_images(spec):
        img = recipe.data.image
        if img.height != img.width:
            raise RecipeError(f"data.image: image students read square printouts, got "
                              f"{img.height}x{img.width}")
        extra.update(image_size=img.height, render={"grid": img.grid})
    if spec.train_mode == "lora":
        extra["lora"] = {"r": spec.lora_rank, "alpha": spec.lora_alpha}
    try:
        return students.create(spec.family, spec.size, num_labels=len(classes),
                               id2label=dict(enumerate(classes)), leads=view.leads,
                               sampling_rate=student_rate(view), **extra)
    except ValueError as exc:
        raise RecipeError(f"students ({spec.family}/{spec.size}): {exc}") from None


def build_objective(recipe: Recipe, student_dim: int, teacher_dim: int,
                    teacher_codes: tuple[int, int] | None = None,
                    student_leads: tuple[int, ...] | None = None,
                    teacher_form: str | None = None) -> DistillationObjective:
    """The recipe's distillation objective for a student/teacher pair of token widths:
    L = (1 - alpha) * BCE + alpha * sum of lambda_i * L_i over the terms with lambda_i > 0,
    each term configured by its own recipe section (``distill.<loss>``)."""
    d = recipe.distill
    return _build_objective(d.alpha, dict(d.weights), student_dim, teacher_dim,
                            teacher_codes=teacher_codes, student_leads=student_leads,
                            teacher_form=teacher_form, **d.losses)
