"""The ``data`` stage: generate the synthetic default if needed, decode and cache the
signals, serve one record through every consumer's view, and render and cache the
printouts when the teacher or a student reads them."""

from __future__ import annotations

from typing import Any

from distill.data.load import data_folder, load_data
from distill.data.tools import describe_data
from distill.engine.factory import consumer_views
from distill.engine.jobs import teacher_images
from distill.run.stage import STUDENT_ONLY, RunContext, Stage


def run(ctx: RunContext) -> dict[str, Any]:
    recipe = ctx.recipe
    folder = data_folder(recipe.data, progress=ctx.progress)
    data = load_data(recipe.data, progress=ctx.progress, folder=folder)
    print(describe_data(data, folder))
    # Serve one record through every consumer's view now, so a bad view fails here.
    views = consumer_views(recipe)
    item = data.split("train", views)[0]
    for name in views:
        print(f"view {name}: {list(item[name].shape)} (leads x samples)")
    summary: dict[str, Any] = {
        "folder": str(folder), "task": data.task, "classes": list(data.classes),
        "records": int(len(data.ecg_ids)), "sampling_rate": data.sampling_rate,
        "splits": {s: int(len(ix)) for s, ix in data.splits.items()},
        "fingerprint": data.fingerprint,
        "views": {name: list(item[name].shape) for name in views},
    }
    if data.label_report:  # CinC under a PTB-XL task: the codes not mapped, records dropped
        summary["label_report"] = data.label_report
    if data.flat_report:  # records with flat leads: skipped or kept with a lead mask
        summary["flat_leads"] = data.flat_report
    images = teacher_images(recipe, data, progress=ctx.progress)
    if images is not None:
        summary["images"] = {"shape": list(images.shape),
                             "patch_size": recipe.data.image.patch_size}
    return summary


STAGE = Stage("data", "decode and cache the signals (generating the synthetic default if "
                      "needed) and render the printouts a teacher or student reads", ("data", "teacher.kind"), run,
              ignores=STUDENT_ONLY)
