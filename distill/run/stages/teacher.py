"""The ``teacher`` stage (fine-tune the teacher on the labels) and the ``teacher_cache``
stage (the frozen teacher's outputs on every record, computed once;
:mod:`distill.engine.teacher_cache`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from distill.core.layout import TEACHER, ModelId
from distill.engine.accel import process_state
from distill.engine.jobs import augmentation, build_teacher_cache, load_frozen_teacher, \
    teacher_job
from distill.run.stage import STUDENT_ONLY, RunContext, Stage, teacher_stage_settings
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


def run_cache(ctx: RunContext) -> dict[str, Any]:
    if augmentation(ctx.recipe).active:
        print("train.augment is on: the teacher's input changes every epoch, so distillation "
              "runs it live instead of reading a cache")
        return {"live": True}
    jd = ctx.job_data()
    # every process runs this stage, the main one first: only it recomputes on --force
    rebuild = "teacher_cache" in ctx.force and process_state().is_main_process
    teacher = load_frozen_teacher(jd, ctx.run_dir)
    cache = build_teacher_cache(jd, teacher, progress=ctx.progress, rebuild=rebuild)
    print(f"teacher outputs: {cache.folder} (tokens {list(cache.tokens.shape)}, "
          f"{cache.tokens.dtype})")
    summary = {"folder": str(cache.folder), "key": cache.key, "tokens": list(cache.tokens.shape),
               "storage": str(cache.tokens.dtype)}
    if jd.transfer is not None:
        extra = build_teacher_cache(jd, teacher, progress=ctx.progress, rebuild=rebuild,
                                    transfer=True)
        print(f"teacher outputs on the transfer records: {extra.folder} "
              f"({len(extra.logits)} records)")
        summary["transfer"] = {"folder": str(extra.folder), "key": extra.key,
                               "records": int(len(extra.logits))}
    return summary


TEACHER_STAGE = Stage("teacher", "fine-tune the teacher on the labels (full, lora or head)",
                      ("data",), run_teacher, (TEACHER,), collective=True,
                      settings=teacher_stage_settings, ignores=STUDENT_ONLY)
CACHE_STAGE = Stage("teacher_cache", "compute the frozen teacher's outputs on every record once",
                    ("data",), run_cache, settings=teacher_stage_settings,
                    ignores=STUDENT_ONLY)
