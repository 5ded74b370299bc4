"""The ``run`` command: a recipe's stages in order, each resumable.

Each stage writes under the run folder and, when it finishes, a marker
``stages/<name>.json`` holding its summary and a hash of the recipe sections it depends
on. On a rerun a stage whose marker exists with the same hash is skipped; a changed
section (or ``--force NAME``) runs it again. A stage killed half-way leaves no marker, so
the next run redoes it.

Stages so far:

- ``data``: generate the synthetic default if needed, decode and cache the signals, render
  and cache the teacher's images;
- ``teacher``: fine-tune / adapt the teacher (``teacher/``; nothing with ``frozen``);
- ``teacher_cache``: the frozen teacher's outputs on every record, computed once
  (:mod:`distill.engine.teacher_cache`; skipped when augmentation makes the teacher run live);
- ``baseline``: every student trained on the labels alone (``baseline/<family>-<size>/``);
- ``distill``: every student trained with the objective (``distill/<family>-<size>/``);
- ``ablation``: the recipe's ablations of one student (``ablation/<name>-<family>-<size>/``);
- ``evaluate``: every model on the test fold with bootstrap intervals, size, memory and
  latency (``results.json``, ``eval/``; :mod:`distill.run.compare`);
- ``quantize``: every trained student in every ``quantize.formats`` (bitsandbytes int8,
  nf4, fp4) under ``quantized/``, each scored and measured beside its fp32 model, and the
  teacher's memory at each precision (``quantized.json``; :mod:`distill.compress.quantize`);
- ``report``: ``report.md`` and ``figures/`` (:mod:`distill.run.report`);
- ``export``: hub-ready folders of every distilled student and quantized variant under
  ``export/``, each verified in a fresh process (:mod:`distill.hub.export`); publishing is
  the explicit ``ecg-distill publish``.

Training stages continue an interrupted job with ``resume=True`` (``--resume``); without
it a job folder holding checkpoints is refused, so nothing is overwritten by accident.
``--force STAGE`` deletes the stage's folders and redoes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.core.schema import closest, to_dict
from distill.data.cache import default_cache_dir
from distill.data.synth import GENERATOR_VERSION
from distill.data.tools import describe_data, write_synthetic
from distill.engine.factory import consumer_views, render_config, student_name
from distill.core.errors import DataError, RecipeError
from distill.core.io import atomic_write_text
from distill.recipe import Recipe, write_resolved

SYNTHETIC_VERSION = GENERATOR_VERSION  # in the cached set's folder name


# ---------------------------------------------------------------- data helpers


def synthetic_folder(recipe: Recipe) -> Path:
    """Where the recipe's synthetic set lives: shared by every run with the same settings."""
    cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else default_cache_dir()
    syn = recipe.data.synthetic
    name = f"ptbxl-n{syn.records}-seed{syn.seed}"
    if syn.first_patient_id != 1:
        name += f"-pid{syn.first_patient_id}"
    if sorted(syn.rates) != [100, 500]:
        name += "-" + "-".join(f"{r}hz" for r in sorted(set(syn.rates)))
    return cache / "synthetic" / f"{name}-v{SYNTHETIC_VERSION}"


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
        write_synthetic(folder, records=syn.records, seed=syn.seed, force=True, progress=progress,
                        sampling_rates=tuple(sorted(set(syn.rates))),
                        first_patient_id=syn.first_patient_id)
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
    resume: bool = False
    force: tuple[str, ...] = ()
    _job_data: Any = None

    def job_data(self):
        """The loaded data and images, shared by the stages of one process."""
        if self._job_data is None:
            from distill.engine.jobs import load_job_data

            self._job_data = load_job_data(self.recipe, progress=self.progress)
        return self._job_data


@dataclass(frozen=True)
class Stage:
    """One step of a run: ``run(ctx)`` returns a JSON-able summary stored in its marker."""

    name: str
    description: str
    depends_on: tuple[str, ...]  # recipe sections whose change makes the stage stale
    run: Callable[[RunContext], dict[str, Any]]
    folders: tuple[str, ...] = ()  # run-folder entries ``--force`` deletes first
    collective: bool = False  # every process takes part (training); else main first
    main_only: bool = False  # only the main process runs it (the others wait)
    settings: Callable[[Recipe], dict[str, Any]] | None = None  # more hashed settings


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


def _fit(ctx: RunContext, job, folder: Path, **kwargs: Any) -> dict[str, Any]:
    """Train one job under ``folder``, or skip it when a complete run of it is there."""
    from distill.engine.train import fit

    metrics_path = folder / "metrics.json"
    if metrics_path.exists():
        try:
            done = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("complete") and done.get("fingerprint") == job.fingerprint:
            print(f"{job.name}: complete in {folder}, skipped")
            return _fit_summary(done, folder)
    cfg = kwargs.pop("cfg", ctx.recipe.train)
    result = fit(job, cfg, folder, seed=ctx.recipe.seed, resume=ctx.resume,
                 progress=ctx.progress, **kwargs)
    return _fit_summary(result.metrics, folder)


def _fit_summary(metrics: dict[str, Any], folder: Path) -> dict[str, Any]:
    return {"folder": str(folder), "best_epoch": metrics.get("best_epoch"),
            "best_val_macro_auc": metrics.get("best_val_macro_auc"),
            "epochs_run": metrics.get("epochs_run"), "stopped_early": metrics.get("stopped_early")}


def _stage_teacher(ctx: RunContext) -> dict[str, Any]:
    from distill.engine.jobs import TEACHER_DIR, teacher_job

    t = ctx.recipe.teacher
    if t.train_mode == "frozen":
        print(f"teacher.train_mode is frozen: {t.name_or_path} is used as it is")
        return {"frozen": True}
    import dataclasses

    job = teacher_job(ctx.job_data())
    cfg = ctx.recipe.train
    if t.batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=t.batch_size)
    return _fit(ctx, job, ctx.run_dir / TEACHER_DIR, epochs=t.epochs, lr=t.lr, cfg=cfg)


def _stage_teacher_cache(ctx: RunContext) -> dict[str, Any]:
    from distill.engine.jobs import augmentation, build_teacher_cache, load_frozen_teacher

    if augmentation(ctx.recipe).active:
        print("train.augment is on: the teacher's input changes every epoch, so distillation "
              "runs it live instead of reading a cache")
        return {"live": True}
    jd = ctx.job_data()
    from distill.engine.train import process_state

    # every process runs this stage, the main one first: only it recomputes on --force
    rebuild = "teacher_cache" in ctx.force and process_state().is_main_process
    cache = build_teacher_cache(jd, load_frozen_teacher(jd, ctx.run_dir), progress=ctx.progress,
                                rebuild=rebuild)
    print(f"teacher outputs: {cache.folder} (tokens {list(cache.tokens.shape)}, "
          f"{cache.tokens.dtype})")
    return {"folder": str(cache.folder), "key": cache.key, "tokens": list(cache.tokens.shape),
            "storage": str(cache.tokens.dtype)}


def _stage_baseline(ctx: RunContext) -> dict[str, Any]:
    from distill.engine.jobs import baseline_job, student_folder

    jd = ctx.job_data()
    return {student_name(s): _fit(ctx, baseline_job(jd, s),
                                  ctx.run_dir / "baseline" / student_folder(s),
                                  epochs=s.epochs, lr=s.lr)
            for s in ctx.recipe.students}


def _stage_distill(ctx: RunContext) -> dict[str, Any]:
    from distill.engine.jobs import (augmentation, build_teacher_cache, distill_job,
                              load_frozen_teacher, student_folder)

    from distill.engine.train import process_state

    jd = ctx.job_data()
    teacher = load_frozen_teacher(jd, ctx.run_dir)
    cache = None
    if not augmentation(ctx.recipe).active:
        with process_state().main_process_first():
            cache = build_teacher_cache(jd, teacher, progress=ctx.progress)
    return {student_name(s): _fit(ctx, distill_job(jd, s, teacher, cache),
                                  ctx.run_dir / "distill" / student_folder(s),
                                  epochs=s.epochs, lr=s.lr)
            for s in ctx.recipe.students}


def _stage_ablation(ctx: RunContext) -> dict[str, Any]:
    import dataclasses

    from distill.engine.jobs import (ablation_folder, ablation_recipe, augmentation,
                              build_teacher_cache, distill_job, load_frozen_teacher)
    from distill.engine.train import process_state

    recipe = ctx.recipe
    if not recipe.ablations.runs:
        print("no ablations in the recipe (ablations.runs)")
        return {}
    jd = ctx.job_data()
    spec = recipe.students[recipe.ablations.student]
    teacher = load_frozen_teacher(jd, ctx.run_dir)
    cache = None
    if not augmentation(recipe).active:
        with process_state().main_process_first():
            cache = build_teacher_cache(jd, teacher, progress=ctx.progress)
    out = {}
    for name in recipe.ablations.runs:
        job = distill_job(dataclasses.replace(jd, recipe=ablation_recipe(recipe, name)), spec,
                          teacher, cache)
        job.name = f"ablation {name} {student_name(spec)}"
        out[name] = _fit(ctx, job, ctx.run_dir / ablation_folder(name, spec),
                         epochs=spec.epochs, lr=spec.lr)
    return out


def _stage_evaluate(ctx: RunContext) -> dict[str, Any]:
    from distill.run.compare import evaluate_run

    results = evaluate_run(ctx.job_data(), ctx.run_dir, progress=ctx.progress)
    for name, m in results["models"].items():
        auc = m["macro_auc"]
        print(f"{name:<28} macro AUC {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]")
    return {"results": str(ctx.run_dir / "results.json"),
            "macro_auc": {n: m["macro_auc"]["value"] for n, m in results["models"].items()}}


def _stage_quantize(ctx: RunContext) -> dict[str, Any]:
    from distill.compress.quantize import QUANTIZED_FILE, quantize_run

    if not ctx.recipe.quantize.formats:
        print("no quantized variants in the recipe (quantize.formats is empty)")
        return {}
    results = quantize_run(ctx.job_data(), ctx.run_dir, progress=ctx.progress)
    for name, m in results["models"].items():
        auc, d = m["macro_auc"], m["vs_fp32"]
        print(f"{name:<28} macro AUC {auc['value']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]"
              f", vs fp32 {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
    for precision, m in results["teacher_memory"].items():
        if "error" in m:
            print(f"teacher {precision}: {m['error']}")
        else:
            print(f"teacher {precision}: weights {m['weights_mb']:.1f} MB")
    return {"results": str(ctx.run_dir / QUANTIZED_FILE),
            "macro_auc": {n: m["macro_auc"]["value"] for n, m in results["models"].items()}}


def _stage_report(ctx: RunContext) -> dict[str, Any]:
    from distill.run.report import write_report

    path = write_report(ctx.job_data(), ctx.run_dir)
    print(f"report: {path}")
    return {"report": str(path)}


def _stage_export(ctx: RunContext) -> dict[str, Any]:
    from distill.hub.export import export_run

    if not ctx.recipe.export.enabled:
        print("export.enabled is false: no hub-ready folders written")
        return {}
    folders = export_run(ctx.run_dir, force=True, progress=ctx.progress)
    for folder in folders:
        print(f"exported {folder} (verified in a fresh process)")
    return {"folders": [str(f) for f in folders]}


def _teacher_settings(recipe: Recipe) -> dict[str, Any]:
    from distill.engine.jobs import teacher_settings

    return teacher_settings(recipe)


def _student_settings(recipe: Recipe) -> dict[str, Any]:
    from distill.engine.jobs import student_settings

    return student_settings(recipe)


def _distill_settings(recipe: Recipe) -> dict[str, Any]:
    return {**_teacher_settings(recipe), "students": _student_settings(recipe)}


_EVERYTHING = ("data", "teacher", "students", "distill", "ablations", "evaluate")


STAGES: tuple[Stage, ...] = (
    Stage("data", "decode and cache the signals (generating the synthetic default if needed) "
                  "and render the teacher's images", ("data", "teacher.kind"), _stage_data),
    Stage("teacher", "fine-tune the teacher on the labels (full, lora or head)",
          ("data",), _stage_teacher, ("teacher",), collective=True,
          settings=_teacher_settings),
    Stage("teacher_cache", "compute the frozen teacher's outputs on every record once",
          ("data",), _stage_teacher_cache, settings=_teacher_settings),
    Stage("baseline", "train every student on the labels alone", ("data", "students"),
          _stage_baseline, ("baseline",), collective=True, settings=_student_settings),
    Stage("distill", "train every student with the distillation objective",
          ("data", "students", "distill"), _stage_distill, ("distill",), collective=True,
          settings=_distill_settings),
    Stage("ablation", "train the recipe's ablations (distillation with terms removed)",
          ("data", "students", "distill", "ablations"), _stage_ablation, ("ablation",),
          collective=True, settings=_distill_settings),
    Stage("evaluate", "evaluate every model on the test fold (bootstrap intervals, size, "
                      "memory, latency)", _EVERYTHING, _stage_evaluate, ("eval", "results.json"),
          main_only=True, settings=_distill_settings),
    Stage("quantize", "quantize every trained student (quantize.formats) and measure each "
                      "variant beside its fp32 model; the teacher's memory per precision",
          (*_EVERYTHING, "quantize"), _stage_quantize, ("quantized", "quantized.json"),
          main_only=True, settings=_distill_settings),
    Stage("report", "write report.md and the figures", (*_EVERYTHING, "quantize"), _stage_report,
          ("report.md", "figures"), main_only=True, settings=_distill_settings),
    Stage("export", "write every distilled student and quantized variant as a hub-ready "
                    "folder, each verified in a fresh process (export/)",
          (*_EVERYTHING, "quantize", "export"), _stage_export, ("export",), main_only=True,
          settings=_distill_settings),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def _section(recipe_dict: dict[str, Any], dotted: str) -> Any:
    node: Any = recipe_dict
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_hash(stage: Stage, recipe: Recipe) -> str:
    d = to_dict(recipe)
    parts = {k: _section(d, k) for k in stage.depends_on}
    if stage.settings is not None:
        parts["settings"] = stage.settings(recipe)
    payload = json.dumps(parts, sort_keys=True, default=str)
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
    from distill.engine.train import process_state

    state = process_state()
    quiet = contextlib.nullcontext() if state.is_main_process else \
        contextlib.redirect_stdout(io.StringIO())
    with quiet:
        state.wait_for_everyone()  # every process has read the markers before any changes
        if state.is_main_process:
            _write_recipe(recipe, run_dir)
        ctx = RunContext(recipe=recipe, run_dir=run_dir, progress=progress, resume=resume,
                         force=tuple(force))
        for stage in selected:
            if plan[stage.name] == "skip":
                print(f"[{stage.name}] complete, skipped (--force {stage.name} redoes it)")
                continue
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
    import shutil

    _marker(run_dir, stage).unlink(missing_ok=True)
    for name in stage.folders:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Write recipe.yaml; a different earlier one is kept as recipe.N.yaml, never lost."""
    current = run_dir / "recipe.yaml"
    if current.exists() and current.read_text() != recipe.to_yaml():
        n = 1
        while (run_dir / f"recipe.{n}.yaml").exists():
            n += 1
        os.replace(current, run_dir / f"recipe.{n}.yaml")
    write_resolved(recipe, run_dir)
