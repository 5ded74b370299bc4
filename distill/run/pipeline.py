"""The ``run`` command: a recipe's stages in order, each resumable.

Each stage writes under the run folder and, when it finishes, a marker
``stages/<name>.json`` holding its summary and a hash of the recipe sections it depends
on. On a rerun a stage whose marker exists with the same hash is skipped; a changed
section (or ``--force NAME``) runs it again. A stage killed half-way leaves no marker, so
the next run redoes it.

The stages (one module each under :mod:`distill.run.stages`):

- ``data``: generate the synthetic default if needed, decode and cache the signals, render
  and cache the teacher's images;
- ``teacher``: fine-tune / adapt the teacher (``teacher/``; nothing with ``frozen``);
- ``teacher_cache``: the frozen teacher's outputs on every record, computed once
  (:mod:`distill.engine.teacher_cache`; skipped when augmentation makes the teacher run
  live);
- ``baseline``: every student trained on the labels alone (``baseline/<family>-<size>/``);
- ``distill``: every student trained with the objective (``distill/<family>-<size>/``);
- ``ablation``: the recipe's ablations of one student (``ablation/<name>-<family>-<size>/``);
- ``evaluate``: every model on the test fold with bootstrap intervals, size, memory and
  latency (``results.json``, ``eval/``);
- ``quantize``: every trained student in every ``quantize.formats`` (bitsandbytes int8,
  nf4, fp4) under ``quantized/``, each scored and measured beside its fp32 model, and the
  teacher's memory at each precision (``quantized.json``);
- ``report``: ``report.md`` and ``figures/``;
- ``export``: hub-ready folders of every distilled student and quantized variant under
  ``export/``, each verified in a fresh process (:mod:`distill.hub.export`); publishing is
  the explicit ``ecg-distill publish``.

Before a stage starts (and before ``--force`` deletes anything of it), its disk estimate
(:func:`distill.run.plan.stage_disk_need`) is compared with the free space where it
writes; a stage that would not fit is refused with one line saying how much it needs and
how to reduce it.

Training stages continue an interrupted job with ``resume=True`` (``--resume``); without
it a job folder holding checkpoints is refused, so nothing is overwritten by accident.
``--force STAGE`` deletes the stage's folders and redoes it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.core.errors import ECGDistillError, RecipeError
from distill.core.hashing import stable_hash
from distill.core.io import atomic_write_text
from distill.core.layout import RunLayout
from distill.core.schema import closest
from distill.engine.accel import process_state
from distill.recipe import Recipe, read_yaml, recipe_from_dict, write_resolved
from distill.run.plan import check_disk
from distill.run.stage import RunContext, Stage
from distill.run.stages import STAGE_NAMES, STAGES

__all__ = ["STAGES", "STAGE_NAMES", "RunContext", "Stage", "run_pipeline", "stage_hash",
           "stage_status", "write_run_recipe"]


def _section(recipe_dict: dict[str, Any], dotted: str) -> Any:
    node: Any = recipe_dict
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_hash(stage: Stage, recipe: Recipe) -> str:
    """The hash of what a stage depends on: its recipe sections (as
    :meth:`Recipe.hash_dict` writes them) and its settings."""
    d = recipe.hash_dict()
    for dotted in stage.ignores:
        *path, last = dotted.split(".")
        node = _section(d, ".".join(path)) if path else d
        if isinstance(node, dict):
            node.pop(last, None)
    parts = {k: _section(d, k) for k in stage.depends_on}
    if stage.settings is not None:
        parts["settings"] = stage.settings(recipe)
    return stable_hash(parts)


def _marker(run_dir: Path, stage: Stage) -> Path:
    return RunLayout(run_dir).marker(stage.name)


def stage_status(stage: Stage, recipe: Recipe, run_dir: Path) -> str:
    """'done', 'stale' (its recipe sections changed) or 'todo'."""
    marker = _marker(run_dir, stage)
    if not marker.exists():
        return "todo"
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return "todo"
    return "done" if saved.get("recipe_hash") == stage_hash(stage, recipe) else "stale"


def _check_force(force: Sequence[str]) -> None:
    names = [s.name for s in STAGES]
    for name in force:
        if name not in names:
            hint = closest(name, names)
            extra = f"; did you mean '{hint}'?" if hint else ""
            raise RecipeError(f"--force: unknown stage '{name}'{extra} (stages: {', '.join(names)})")


def run_pipeline(recipe: Recipe, *, force: Sequence[str] = (), dry_run: bool = False,
                 progress: bool = True, resume: bool = False,
                 stages: Sequence[str] | None = None) -> dict[str, str]:
    """Run the stages in order (``stages``: a subset, default all), skipping complete ones;
    returns each stage's outcome ("run" or "skip").

    Under ``accelerate launch`` every process runs this: training stages run on all of
    them together; the others (data, teacher cache) run on the main process first, and
    the rest then read what it cached. Only the main process prints, writes the recipe and
    the stage markers, and deletes what ``--force`` redoes.
    """
    _check_force(force)
    run_dir = recipe.run_dir
    selected = [s for s in STAGES if stages is None or s.name in stages]
    outside = [f for f in force if f not in {s.name for s in selected}]
    if outside:
        raise RecipeError(f"--force {outside[0]}: this command runs the stages "
                          f"{', '.join(s.name for s in selected)} only")
    plan = {}
    upstream_runs = False  # a stage that runs rewrites what every later stage reads
    for stage in selected:
        status = stage_status(stage, recipe, run_dir)
        runs = upstream_runs or stage.name in force or status != "done"
        plan[stage.name] = "run" if runs else "skip"
        upstream_runs |= runs
    if dry_run:
        print(f"run folder: {run_dir}")
        for stage in selected:
            status = stage_status(stage, recipe, run_dir)
            print(f"  {stage.name:<13} {plan[stage.name]:<5} ({status}) {stage.description}")
        return plan
    state = process_state()
    quiet = contextlib.nullcontext() if state.is_main_process else \
        contextlib.redirect_stdout(io.StringIO())
    with quiet:
        state.wait_for_everyone()  # every process has read the markers before any changes
        if state.is_main_process:
            write_run_recipe(recipe, run_dir)
        ctx = RunContext(recipe=recipe, run_dir=run_dir, progress=progress, resume=resume,
                         force=tuple(force))
        for stage in selected:
            if plan[stage.name] == "skip":
                print(f"[{stage.name}] complete, skipped (--force {stage.name} redoes it)")
                continue
            # before anything of it is deleted: refused when its disk estimate exceeds the
            # free space (every process checks, so all stop together)
            check_disk(stage.name, ctx)
            if stage.name in force and state.is_main_process:
                _clear(stage, run_dir)
            state.wait_for_everyone()
            print(f"[{stage.name}] {stage.description}")
            start = time.perf_counter()
            if stage.collective:
                summary = stage.run(ctx)
            elif stage.main_only:
                summary = stage.run(ctx) if state.is_main_process else {}
            else:
                with state.main_process_first():
                    summary = stage.run(ctx)
            seconds = time.perf_counter() - start
            state.wait_for_everyone()
            if state.is_main_process:
                atomic_write_text(_marker(run_dir, stage), json.dumps(
                    {"stage": stage.name, "recipe_hash": stage_hash(stage, recipe),
                     "seconds": round(seconds, 2), "summary": summary}, indent=1))
            print(f"[{stage.name}] done in {seconds:.1f} s")
    return plan


def _clear(stage: Stage, run_dir: Path) -> None:
    """Delete what ``--force`` redoes: the stage's marker and its folders."""
    _marker(run_dir, stage).unlink(missing_ok=True)
    for name in stage.folders:
        path = RunLayout(run_dir).path(name)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _same_recipe(path: Path, recipe: Recipe) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return recipe_from_dict(read_yaml(path)) == recipe
    except ECGDistillError:
        return False


def write_run_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Write recipe.yaml; a different earlier one is kept as recipe.N.yaml, never lost (one
    that says the same in an older layout, such as 0.1's flat ``distill`` keys, is
    rewritten in the current one)."""
    current = RunLayout(run_dir).recipe_file
    if current.exists() and current.read_text() != recipe.to_yaml() \
            and not _same_recipe(current, recipe):
        n = 1
        while (run_dir / f"recipe.{n}.yaml").exists():
            n += 1
        os.replace(current, run_dir / f"recipe.{n}.yaml")
    write_resolved(recipe, run_dir)
