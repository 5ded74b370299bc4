"""The ``run`` command: a recipe's stages in order, each resumable.

Each stage writes under the run folder and, when it finishes, a marker
``stages/<name>.json`` holding its summary and a hash of the recipe sections it depends
on. On a rerun a stage whose marker exists with the same hash is skipped; a changed
section (or ``--force NAME``) runs it again. A stage killed half-way leaves no marker, so
the next run redoes it.

Stages so far: ``data`` (generate the synthetic default if needed, decode and cache the
signals, render and cache the teacher's images). The model, training, evaluation,
quantization and export stages join this list as they are built.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config_schema import closest, to_dict
from distill.data.cache import default_cache_dir
from distill.data.tools import describe_data, write_synthetic
from distill.factory import consumer_views, render_config
from distill.errors import DataError, RecipeError
from distill.io import atomic_write_text
from distill.recipe import Recipe, write_resolved

# Bump when the generator's output changes, so a cached synthetic set is regenerated.
SYNTHETIC_VERSION = 1


# ---------------------------------------------------------------- data helpers


def synthetic_folder(recipe: Recipe) -> Path:
    """Where the recipe's synthetic set lives: shared by every run with the same settings."""
    cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else default_cache_dir()
    syn = recipe.data.synthetic
    return cache / "synthetic" / f"ptbxl-n{syn.records}-seed{syn.seed}-v{SYNTHETIC_VERSION}"


def data_folder(recipe: Recipe, progress: bool = True) -> Path:
    """The recipe's data folder; the synthetic default is generated on first use."""
    if recipe.data.path is not None:
        folder = Path(recipe.data.path).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.path: folder {folder} does not exist")
        return folder
    folder = synthetic_folder(recipe)
    if not (folder / "ptbxl_database.csv").exists():
        syn = recipe.data.synthetic
        write_synthetic(folder, records=syn.records, seed=syn.seed, force=True, progress=progress)
    return folder


def load_data(recipe: Recipe, progress: bool = True, folder: Path | None = None):
    """Load (decoding and caching on first use) the recipe's data set as ``ECGData``.

    ``data.format: cinc`` labels records by their SNOMED codes (``data.task`` applies to
    the PTB-XL layout only).
    """
    from distill.data.dataset import load_cinc, load_ptbxl

    d = recipe.data
    folder = folder if folder is not None else data_folder(recipe, progress=progress)
    folds = {"train": tuple(d.folds.train), "val": tuple(d.folds.val), "test": tuple(d.folds.test)}
    common = dict(sampling_rate=d.sampling_rate, scaler=d.scaler, on_bad_record=d.on_bad_record,
                  cache_dir=d.cache_dir, progress=progress, min_samples=d.min_samples,
                  folds=folds)
    if d.format == "cinc":
        return load_cinc(folder, **common)
    return load_ptbxl(folder, task=d.task, **common)


# ---------------------------------------------------------------- stages


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    progress: bool = True


@dataclass(frozen=True)
class Stage:
    """One step of a run: ``run(ctx)`` returns a JSON-able summary stored in its marker."""

    name: str
    description: str
    depends_on: tuple[str, ...]  # recipe sections whose change makes the stage stale
    run: Callable[[RunContext], dict[str, Any]]


def _stage_data(ctx: RunContext) -> dict[str, Any]:
    from distill.data.render import cached_images

    from distill.data.cache import ArrayCache

    recipe = ctx.recipe
    folder = data_folder(recipe, progress=ctx.progress)
    data = load_data(recipe, progress=ctx.progress, folder=folder)
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
    if recipe.teacher.kind == "vlm":
        cache = ArrayCache(recipe.data.cache_dir or default_cache_dir())
        images = cached_images(data.signals, data.sampling_rate, render_config(recipe), cache,
                               data.fingerprint, progress=ctx.progress)
        summary["images"] = {"shape": list(images.shape),
                             "patch_size": recipe.data.image.patch_size}
    return summary


STAGES: tuple[Stage, ...] = (
    Stage("data", "decode and cache the signals (generating the synthetic default if needed) "
                  "and render the teacher's images", ("data", "teacher.kind"), _stage_data),
)


def _section(recipe_dict: dict[str, Any], dotted: str) -> Any:
    node: Any = recipe_dict
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_hash(stage: Stage, recipe: Recipe) -> str:
    d = to_dict(recipe)
    payload = json.dumps({k: _section(d, k) for k in stage.depends_on}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _marker(run_dir: Path, stage: Stage) -> Path:
    return run_dir / "stages" / f"{stage.name}.json"


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
                 progress: bool = True) -> dict[str, str]:
    """Run every stage in order, skipping complete ones; returns each stage's outcome."""
    _check_force(force)
    run_dir = recipe.run_dir
    plan = {}
    for stage in STAGES:
        status = stage_status(stage, recipe, run_dir)
        plan[stage.name] = "run" if stage.name in force or status != "done" else "skip"
    if dry_run:
        print(f"run folder: {run_dir}")
        for stage in STAGES:
            status = stage_status(stage, recipe, run_dir)
            print(f"  {stage.name:<8} {plan[stage.name]:<5} ({status}) {stage.description}")
        return plan
    _write_recipe(recipe, run_dir)
    ctx = RunContext(recipe=recipe, run_dir=run_dir, progress=progress)
    for stage in STAGES:
        if plan[stage.name] == "skip":
            print(f"[{stage.name}] complete, skipped (--force {stage.name} redoes it)")
            continue
        print(f"[{stage.name}] {stage.description}")
        start = time.perf_counter()
        summary = stage.run(ctx)
        seconds = time.perf_counter() - start
        atomic_write_text(_marker(run_dir, stage), json.dumps(
            {"stage": stage.name, "recipe_hash": stage_hash(stage, recipe),
             "seconds": round(seconds, 2), "summary": summary}, indent=1))
        print(f"[{stage.name}] done in {seconds:.1f} s")
    return plan


def _write_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Write recipe.yaml; a different earlier one is kept as recipe.N.yaml, never lost."""
    current = run_dir / "recipe.yaml"
    if current.exists() and current.read_text() != recipe.to_yaml():
        n = 1
        while (run_dir / f"recipe.{n}.yaml").exists():
            n += 1
        os.replace(current, run_dir / f"recipe.{n}.yaml")
    write_resolved(recipe, run_dir)
