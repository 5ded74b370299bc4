"""The ``teacher`` stage (fine-tune the teacher on the labels) and the ``teacher_cache``
stage (the frozen teacher's outputs on every record, computed once;
:mod:`distill.engine.teacher_cache`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from distill.core.layout import TEACHER, ModelId
from distill.engine.jobs import build_teacher_cache, load_frozen_teacher, teacher_job, \
    teacher_runs_live
from distill.engine.teacher_cache import DrawnOutputs, TeacherOutputs
from distill.run.stage import STUDENT_ONLY, RunContext, Stage, cache_stage_settings, \
    teacher_stage_settings
from distill.run.stages.train import fit_job


def run_teacher(ctx: RunContext) -> dict[str, Any]:
    t = ctx.recipe.teacher
    if t.train_mode == "frozen":
        print(f"teacher.train_mode is frozen: {t.name_or_path} is used as it is")
        return {"frozen": True}
    job = teacher_job(ctx.job_data())
    cfg = ctx.recipe.train
    if t.batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=t.batch_size)
    return fit_job(ctx, job, ctx.layout.job_dir(ModelId.teacher()), epochs=t.epochs, lr=t.lr,
                   cfg=cfg)


def _entries(cache: TeacherOutputs | DrawnOutputs) -> list[TeacherOutputs]:
    return cache.draws if isinstance(cache, DrawnOutputs) else [cache]


def run_cache(ctx: RunContext) -> dict[str, Any]:
    if teacher_runs_live(ctx.recipe):
        print("train.augment is on with views: 0: the teacher's input changes every epoch, so "
              "distillation runs it live instead of reading a cache (train.augment.views: K "
              "caches it on K fixed augmented views per record)")
        return {"live": True}
    jd = ctx.job_data()
    # every process runs this stage together: each fills its share of a missing entry
    rebuild = "teacher_cache" in ctx.force
    teacher = load_frozen_teacher(jd, ctx.run_dir)
    cache = build_teacher_cache(jd, teacher, progress=ctx.progress, rebuild=rebuild,
                                collective=True)
    entries = _entries(cache)
    for e in entries:
        print(f"teacher outputs: {e.folder} (tokens {list(e.tokens.shape)}, {e.tokens.dtype})")
    summary: dict[str, Any] = {"folder": str(entries[0].folder), "key": cache.key,
                               "tokens": list(cache.tokens.shape),
                               "storage": str(cache.tokens.dtype)}
    if isinstance(cache, DrawnOutputs):
        summary["views"] = [str(e.folder) for e in entries]
    if jd.transfer is not None:
        extra = build_teacher_cache(jd, teacher, progress=ctx.progress, rebuild=rebuild,
                                    transfer=True, collective=True)
        extras = _entries(extra)
        for e in extras:
            print(f"teacher outputs on the transfer records: {e.folder} "
                  f"({len(e.logits)} records)")
        summary["transfer"] = {"folder": str(extras[0].folder), "key": extra.key,
                               "records": int(len(extras[0].logits))}
        if isinstance(extra, DrawnOutputs):
            summary["transfer"]["views"] = [str(e.folder) for e in extras]
    return summary


TEACHER_STAGE = Stage("teacher", "fine-tune the teacher on the labels (full, lora or head)",
                      ("data",), run_teacher, (TEACHER,), collective=True,
                      settings=teacher_stage_settings, ignores=STUDENT_ONLY)
CACHE_STAGE = Stage("teacher_cache", "compute the frozen teacher's outputs on every record once",
                    ("data",), run_cache, collective=True, settings=cache_stage_settings,
                    ignores=STUDENT_ONLY)
