"""Runs over seeds and label fractions: the evidence one run cannot give.

``ecg-distill run RECIPE --seeds 0 1 2 [--label-fractions 0.05 0.1 0.25 1]`` (or the
recipe's ``sweep`` section) runs the whole pipeline once per (label fraction, seed) into
``RUN/labels-<f>/seed-<s>/``: every training job, the teacher's included, trains with that
seed (and the students see that share of the labels, the subset drawn with that seed).
Then :func:`summarize` writes, at the top of the run folder:

* ``sweep.json``: per label fraction, each model's macro AUC as the mean over seeds with
  an interval that covers both the seeds and the test records (a two-level bootstrap,
  :func:`distill.metrics.classification.over_seeds`), and the paired differences
  distilled − baseline and ablation − full recipe on the same draws;
* ``sweep.md``: those tables;
* ``figures/learning_curve.png`` (with more than one fraction): test macro AUC against the
  label fraction for every baseline and distilled student, the teacher as a line.

A point that is complete is skipped as in any run; an interrupted sweep continues where
it stopped. The points of one seed share its teacher: the first fraction's point trains it,
the others link to it (:func:`share_teacher`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from distill.core.errors import ECGDistillError, RecipeError
from distill.core.io import atomic_write_text
from distill.core.layout import TEACHER, ModelId, RunLayout
from distill.data.load import load_data
from distill.metrics.classification import bootstrap_samples, over_seeds
from distill.metrics.results import load_results
from distill.recipe import Recipe
from distill.engine.accel import process_state
from distill.run.pipeline import STAGES, run_pipeline, stage_status, write_run_recipe

SWEEP_FILE = "sweep.json"
SWEEP_REPORT = "sweep.md"
CURVE = "learning_curve.png"
TEACHER_STAGES = ("data", "teacher", "teacher_cache")  # what no label fraction changes


def point_recipe(recipe: Recipe, fraction: float, seed: int) -> Recipe:
    """The recipe of one point of the sweep: its seed, its label fraction, its folder."""
    folder = RunLayout(recipe.run_dir).sweep_point(fraction, seed)
    return dataclasses.replace(
        recipe, seed=seed, output_dir=str(folder),
        data=dataclasses.replace(recipe.data, label_fraction=fraction),
        sweep=dataclasses.replace(recipe.sweep, seeds=[], label_fractions=[]))


def sweep_grid(recipe: Recipe, seeds: Sequence[int] | None = None,
               fractions: Sequence[float] | None = None) -> tuple[list[float], list[int]]:
    """The fractions and seeds of a sweep: as given, else the recipe's ``sweep`` section,
    else the recipe's own label fraction and seed."""
    seeds = list(seeds or recipe.sweep.seeds or [recipe.seed])
    fractions = list(fractions or recipe.sweep.label_fractions or [recipe.data.label_fraction])
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise RecipeError(f"--label-fractions: {bad[0]} is not in (0, 1]")
    names = [f"{f:g}" for f in fractions]  # the points' folder names
    if len(set(seeds)) != len(seeds) or len(set(names)) != len(names):
        raise RecipeError("--seeds / --label-fractions: each value once (fractions are told "
                          "apart by 6 significant digits)")
    return sorted(fractions), seeds


def run_sweep(recipe: Recipe, seeds: Sequence[int] | None = None,
              fractions: Sequence[float] | None = None, *, dry_run: bool = False,
              progress: bool = True, force: Sequence[str] = ()) -> dict[str, Any] | None:
    """Run every point of the sweep (each resumable) and summarize; the summary."""
    fractions, seeds = sweep_grid(recipe, seeds, fractions)
    state = process_state()
    if not dry_run and state.is_main_process:
        write_run_recipe(recipe, recipe.run_dir)  # a different earlier one is kept
    for fraction in fractions:
        for seed in seeds:
            point = point_recipe(recipe, fraction, seed)
            print(f"== label fraction {fraction:g}, seed {seed}: {point.run_dir}")
            if not dry_run and state.is_main_process and fraction != fractions[0]:
                share_teacher(point_recipe(recipe, fractions[0], seed), point)
            state.wait_for_everyone()
            run_pipeline(point, dry_run=dry_run, progress=progress, resume=True, force=force)
    if dry_run:
        return None
    summary = summarize(recipe, fractions, seeds, progress=progress) \
        if state.is_main_process else None
    state.wait_for_everyone()
    return summary


def share_teacher(source: Recipe, target: Recipe) -> bool:
    """Give ``target`` (a point of the same seed, another label fraction) the finished
    teacher of ``source``: the teacher never sees the label fraction, so the stages up to
    its outputs are the same (their hashes ignore ``data.label_fraction``). The teacher's
    folder is hard-linked (copied where links cannot be made) and the stage markers copied;
    the pipeline then checks the hashes and skips those stages. Nothing of ``target`` is
    replaced. Whether it shared."""
    src, dst = RunLayout(source.run_dir), RunLayout(target.run_dir)
    teacher = ModelId.teacher()
    stages = [s for s in STAGES if s.name in TEACHER_STAGES]
    if any(stage_status(s, source, src.root) != "done" for s in stages) \
            or any(dst.marker(s.name).exists() for s in stages) or dst.job_dir(teacher).exists():
        return False
    if src.job_dir(teacher).is_dir():
        def link(a: str, b: str) -> None:
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)

        shutil.copytree(src.job_dir(teacher), dst.job_dir(teacher), copy_function=link)
    for s in stages:
        dst.marker(s.name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.marker(s.name), dst.marker(s.name))
    print(f"teacher of {src.root} shared (the label fraction does not concern it)")
    return True


def _test_predictions(layout: RunLayout, name: str, test: np.ndarray) -> np.ndarray:
    path = layout.predictions(ModelId.parse(name))
    with np.load(path) as preds:
        if not np.array_equal(preds["test_index"], test):
            raise ECGDistillError(f"{path}: its test records are not the data's test fold")
        return preds["test"]


def summarize(recipe: Recipe, fractions: Sequence[float], seeds: Sequence[int],
              progress: bool = True) -> dict[str, Any]:
    """``sweep.json``, ``sweep.md`` and the learning curve from the points' predictions."""
    data = load_data(recipe.data, progress=progress)
    test = np.sort(data.splits["test"])
    labels = data.labels[test]
    ev = recipe.evaluate
    samples = bootstrap_samples(labels, ev.bootstrap, ev.seed)
    root = RunLayout(recipe.run_dir)
    out: dict[str, Any] = {"seeds": list(seeds), "label_fractions": list(fractions),
                           "test_records": int(len(test)),
                           "bootstrap": {"resamples": ev.bootstrap, "seed": ev.seed,
                                         "level": ev.level},
                           "points": {}}
    for fraction in fractions:
        layouts = [RunLayout(root.sweep_point(fraction, s)) for s in seeds]
        results = [load_results(lay.root)["models"] for lay in layouts]
        common = [n for n in results[0] if all(n in r for r in results)]
        probs = {n: [_test_predictions(lay, n, test) for lay in layouts] for n in common}
        per_seed = {n: [r[n]["macro_auc"]["value"] for r in results] for n in common}

        def interval(a: str, b: str | None = None) -> dict[str, float]:
            return over_seeds(labels, probs[a], None if b is None else probs[b], samples,
                              seed=ev.seed, level=ev.level).to_dict()

        models: dict[str, Any] = {}
        for name in common:
            mid = ModelId.parse(name)
            entry: dict[str, Any] = {"kind": mid.result_kind, "student": mid.student_name,
                                     "macro_auc": interval(name), "per_seed": per_seed[name]}
            base = mid.as_kind("baseline").name if mid.kind != TEACHER else None
            if mid.kind in ("distill", "ablation") and base in probs:
                entry["vs_baseline"] = interval(name, base)
            if mid.kind == "ablation" and mid.as_kind("distill").name in probs:
                entry["vs_full"] = interval(name, mid.as_kind("distill").name)
            models[name] = entry
        out["points"][f"{fraction:g}"] = {"label_fraction": fraction, "models": models}
    atomic_write_text(root.path(SWEEP_FILE), json.dumps(out, indent=1))
    atomic_write_text(root.path(SWEEP_REPORT), sweep_report(recipe, out))
    if len(fractions) > 1:
        root.figures_dir.mkdir(parents=True, exist_ok=True)
        plot_learning_curve(out, root.figures_dir / CURVE)
    return out


def _fmt(iv: dict[str, float] | None, signed: bool = False) -> str:
    if not iv:
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(iv['value'])} [{f.format(iv['low'])}, {f.format(iv['high'])}]"


def sweep_report(recipe: Recipe, summary: dict[str, Any]) -> str:
    """The tables of ``sweep.md``."""
    b = summary["bootstrap"]
    seeds = summary["seeds"]
    lines = [f"# {recipe.name}: {len(seeds)} seed(s) per label fraction", "",
             f"Seeds {', '.join(map(str, seeds))}; test fold of {summary['test_records']} "
             f"records. Values: the mean over seeds of the test macro AUC. Intervals: "
             f"{b['level']:.0%} percentile intervals of a two-level bootstrap ({b['resamples']} "
             f"draws, each a resample of the test records and of the seeds), so they cover "
             f"training randomness and test sampling together; differences are paired on the "
             f"same draws.", ""]
    for key, point in summary["points"].items():
        lines += [f"## Label fraction {key}", "",
                  "| model | macro AUC [CI] | Δ baseline [CI] | Δ full recipe [CI] | per seed |",
                  "|---|---|---|---|---|"]
        for name, m in point["models"].items():
            lines.append(f"| {name} | {_fmt(m['macro_auc'])} | "
                         f"{_fmt(m.get('vs_baseline'), True)} | {_fmt(m.get('vs_full'), True)} "
                         f"| {', '.join(f'{v:.3f}' for v in m['per_seed'])} |")
        lines.append("")
    if len(summary["points"]) > 1:
        lines += [f"![learning curve](figures/{CURVE})", ""]
    return "\n".join(lines)


def plot_learning_curve(summary: dict[str, Any], path: Path) -> Path:
    """Test macro AUC against the label fraction: every baseline (dashed) and distilled
    student (solid) with its interval, the teacher as a line with its band."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted(float(k) for k in summary["points"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[str, list[tuple[float, dict[str, float]]]] = {}
    teacher: list[dict[str, float]] = []
    for f in fractions:
        for name, m in summary["points"][f"{f:g}"]["models"].items():
            if m["kind"] == TEACHER:
                teacher.append(m["macro_auc"])
            elif m["kind"] in ("baseline", "distill"):
                series.setdefault(name, []).append((f, m["macro_auc"]))
    if teacher:
        value = float(np.mean([t["value"] for t in teacher]))
        ax.axhline(value, color="black", lw=1.2, label="teacher (all labels)")
        ax.axhspan(min(t["low"] for t in teacher), max(t["high"] for t in teacher),
                   color="black", alpha=0.08)
    for name, points in sorted(series.items(), key=lambda kv: kv[0].split()[1]):
        xs = [p for p, _ in points]
        ys = np.array([a["value"] for _, a in points])
        err = np.array([[a["value"] - a["low"] for _, a in points],
                        [a["high"] - a["value"] for _, a in points]])
        kind = name.split()[0]
        ax.errorbar(xs, ys, yerr=err, marker="o" if kind == "baseline" else "s",
                    ls="--" if kind == "baseline" else "-", capsize=3, label=name,
                    color=f"C{sorted({n.split()[1] for n in series}).index(name.split()[1])}")
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.set_xlabel("share of the training labels the students see")
    ax.set_ylabel("test macro AUC (mean over seeds, CI)")
    ax.set_title("Learning curve: label-only baseline (dashed) and distilled (solid)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
