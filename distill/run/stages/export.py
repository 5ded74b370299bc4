"""The ``export`` stage: every distilled student and quantized variant as a hub-ready
folder under ``export/``, each verified in a fresh process (:mod:`distill.hub.export`);
publishing is the explicit ``ecg-distill publish``."""

from __future__ import annotations

from typing import Any

from distill.core.layout import EXPORT_DIR
from distill.hub.export import export_run
from distill.run.stage import TRAINED, RunContext, Stage, distill_stage_settings


def run(ctx: RunContext) -> dict[str, Any]:
    if not ctx.recipe.export.enabled:
        print("export.enabled is false: no hub-ready folders written")
        return {}
    folders = export_run(ctx.run_dir, force=True, progress=ctx.progress,
                         data=ctx.job_data().data, recipe=ctx.recipe)
    for folder in folders:
        print(f"exported {folder} (verified in a fresh process)")
    return {"folders": [str(f) for f in folders]}


STAGE = Stage("export", "write every distilled student and quantized variant as a hub-ready "
                        "folder, each verified in a fresh process (export/)",
              (*TRAINED, "quantize", "export"), run, (EXPORT_DIR,), main_only=True,
              settings=distill_stage_settings)
