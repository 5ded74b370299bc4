"""The student training stages: ``baseline`` (every student on the labels alone),
``distill`` (every student with the distillation objective) and ``ablation`` (the recipe's
ablations of one student). Each job trains under its :class:`~distill.core.layout.ModelId`'s
folder and is skipped when a complete run of the same job is there."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from distill.core.layout import ModelId
from distill.engine.accel import process_state
from distill.engine.factory import student_name
from distill.engine.jobs import (ablation_recipe, baseline_job, build_teacher_cache, distill_job,
                                 load_frozen_teacher, teacher_runs_live)
from distill.engine.train import TrainJob, fit
from distill.run.stage import RunContext, Stage, distill_stage_settings, student_stage_settings


def fit_job(ctx: RunContext, job: TrainJob, folder: Path, **kwargs: Any) -> dict[str, Any]:
    """Train one job under ``folder``, or skip it when a complete run of it is there."""
    metrics_path = folder / "metrics.json"
    if metrics_path.exists():
        try:
            done = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("complete") and done.get("fingerprint") == job.fingerprint:
            print(f"{job.name}: complete in {folder}, skipped")
            return _summary(done, folder)
    cfg = kwargs.pop("cfg", ctx.recipe.train)
    result = fit(job, cfg, folder, seed=ctx.recipe.seed, resume=ctx.resume,
                 progress=ctx.progress, **kwargs)
    return _summary(result.metrics, folder)


def _summary(metrics: dict[str, Any], folder: Path) -> dict[str, Any]:
    return {"folder": str(folder), "best_epoch": metrics.get("best_epoch"),
            "best_val_macro_auc": metrics.get("best_val_macro_auc"),
            "epochs_run": metrics.get("epochs_run"), "stopped_early": metrics.get("stopped_early")}


def _teacher_and_cache(ctx: RunContext):
    """The frozen teacher, its cached outputs and those on the extra transfer records
    (None when augmentation runs it live, or when there are none)."""
    jd = ctx.job_data()
    teacher = load_frozen_teacher(jd, ctx.run_dir)
    cache = transfer = None
    if not teacher_runs_live(ctx.recipe):
        with process_state().main_process_first():
            cache = build_teacher_cache(jd, teacher, progress=ctx.progress)
            if jd.transfer is not None:
                transfer = build_teacher_cache(jd, teacher, progress=ctx.progress,
                                               transfer=True)
    return teacher, cache, transfer


def run_baseline(ctx: RunContext) -> dict[str, Any]:
    jd = ctx.job_data()
    return {student_name(s): fit_job(ctx, baseline_job(jd, s),
                                     ctx.layout.job_dir(ModelId.student("baseline", s)),
                                     epochs=s.epochs, lr=s.lr)
            for s in ctx.recipe.students}


def run_distill(ctx: RunContext) -> dict[str, Any]:
    jd = ctx.job_data()
    teacher, cache, transfer = _teacher_and_cache(ctx)
    return {student_name(s): fit_job(ctx, distill_job(jd, s, teacher, cache,
                                                      transfer_cache=transfer),
                                     ctx.layout.job_dir(ModelId.student("distill", s)),
                                     epochs=s.epochs, lr=s.lr)
            for s in ctx.recipe.students}


def run_ablation(ctx: RunContext) -> dict[str, Any]:
    recipe = ctx.recipe
    if not recipe.ablations.runs:
        print("no ablations in the recipe (ablations.runs)")
        return {}
    jd = ctx.job_data()
    spec = recipe.students[recipe.ablations.student]
    teacher, cache, transfer = _teacher_and_cache(ctx)
    out = {}
    for name in recipe.ablations.runs:
        model = ModelId.student("ablation", spec, name)
        job = distill_job(dataclasses.replace(jd, recipe=ablation_recipe(recipe, name)), spec,
                          teacher, cache, model_id=model, transfer_cache=transfer)
        out[name] = fit_job(ctx, job, ctx.layout.job_dir(model), epochs=spec.epochs, lr=spec.lr)
    return out


BASELINE_STAGE = Stage("baseline", "train every student on the labels alone",
                       ("data", "students"), run_baseline, ("baseline",), collective=True,
                       settings=student_stage_settings)
DISTILL_STAGE = Stage("distill", "train every student with the distillation objective",
                      ("data", "students", "distill"), run_distill, ("distill",),
                      collective=True, settings=distill_stage_settings)
ABLATION_STAGE = Stage("ablation", "train the recipe's ablations (distillation with terms "
                                   "removed)", ("data", "students", "distill", "ablations"),
                       run_ablation, ("ablation",), collective=True,
                       settings=distill_stage_settings)
