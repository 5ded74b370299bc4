"""Synthetic to real (issue 21): how much does the synthetic default teach about real ECGs?

For each student (default xresnet1d/tiny, xresnet1d/small, leadformer/tiny) and seed:

* **synthetic**: trained on the synthetic default's training folds exactly as the
  quickstart's label-only baseline (``recipes/quickstart.yaml``: 2,000 records, seed 0, the
  superdiagnostic classes CD/HYP/MI/NORM/STTC at 100 Hz, 10 s; 5 epochs, batch 64); when
  ``runs/quickstart`` holds that very job (same fingerprint: seed 0), it is read, not
  retrained;
* **synthetic -> real**: that model fine-tuned on the 352 real training records (folds 1-8
  of ``recipes/ptbxl-real-500.yaml``), all weights, with the real recipe's budget (20
  epochs, batch 32, its learning rates), the best epoch chosen on the real validation
  fold 9;
* **real only**: the same architecture from random weights with the same budget and the
  same model selection (the real recipe's label-only baseline);
* **zero-shot**: the synthetic model scored as is on the real test fold.

Each synthetic row is trained for every generator version asked for (``--generators``,
default 1 and 2: the default generator and version 2, calibrated against real feature
medians, see ``distill/data/synth_physiology.py`` and ``benchmarks/realism.py``); the table
adds the paired difference version 2 − version 1 of the fine-tuned and zero-shot models.

Every model is scored on the real test fold (fold 10, 64 records; never used for any
choice) on the same bootstrap resamples: macro AUC with 95% intervals and the paired
difference synthetic -> real minus real only. With several seeds the intervals are
two-level (test resamples and seeds, ``over_seeds``). The scaler: each data set is
standardised with the global mean/std of its own training folds (synthetic 0.025 / 0.194
mV, real -0.0004 / 0.225 mV); the fine-tuned and from-scratch models read the real data
scaled by the real training folds' statistics (their saved config says so). The zero-shot
model is scored both ways: with its own (synthetic) statistics and with the real ones.

    python benchmarks/synth_to_real.py [--seeds 0 1 2] [--students xresnet1d/tiny ...]
                                       [--generators 1 2]

Prints the markdown table and writes it to ``runs/synth-to-real/table.md`` (models and
test predictions under ``runs/synth-to-real/``). The realism score is
``benchmarks/realism.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from distill.core.hashing import sha256_file, stable_hash
from distill.core.io import atomic_write_text
from distill.data.load import load_data
from distill.engine.factory import student_inputs, student_key
from distill.engine.jobs import JobData, baseline_job, load_job_data
from distill.engine.train import fit
from distill.metrics.classification import (bootstrap_interval, bootstrap_samples, label_aucs,
                                            over_seeds, paired_difference)
from distill.metrics.scoring import predict
from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SYNTH_RECIPE = ROOT / "recipes" / "quickstart.yaml"
REAL_RECIPE = ROOT / "recipes" / "ptbxl-real-500.yaml"
ROWS = [("zero-shot, synthetic scaler", "zeroshot_own"),
        ("zero-shot, real scaler", "zeroshot_real"),
        ("real only (from scratch)", "scratch"),
        ("synthetic -> real (fine-tuned)", "finetuned")]
DIFFERENCES = [("finetuned", "scratch"), ("zeroshot_real", "scratch")]


def key_of(row: str, generator: int) -> str:
    """The result key of a row for a generator version (version 1: the row's own name,
    as runs before versions existed wrote it; "scratch" reads no synthetic data)."""
    return row if generator == 1 or row == "scratch" else f"{row}_v{generator}"


def synthetic_recipe(generator: int):
    """The quickstart recipe with the synthetic set of ``generator``."""
    overrides = [] if generator == 1 else [f"data.synthetic.generator={generator}"]
    return load_recipe(SYNTH_RECIPE, overrides)


def spec_of(recipe, name: str):
    """The recipe's student ``family/size`` (its per-student lr, epochs)."""
    for s in recipe.students:
        if f"{s.family}/{s.size}" == name:
            return s
    raise SystemExit(f"{name}: not a student of {recipe.name}")


def with_seed(jd: JobData, seed: int) -> JobData:
    recipe = copy.deepcopy(jd.recipe)
    recipe.seed = seed
    return dataclasses.replace(jd, recipe=recipe)


def train(job, jd: JobData, spec, folder: Path, seed: int, reuse: Path | None = None) -> Path:
    """Fit ``job`` under ``folder`` (skipped when a complete run of it is there, or in
    ``reuse``); the best model's folder."""
    for place in ([reuse] if reuse else []) + [folder]:
        metrics = place / "metrics.json"
        if metrics.exists():
            done = json.loads(metrics.read_text())
            if done.get("complete") and done.get("fingerprint") == job.fingerprint:
                print(f"{job.name}: complete in {place}, reused")
                return place / "best"
    if folder.exists():
        shutil.rmtree(folder)  # another setting's leftovers
    return fit(job, jd.recipe.train, folder, seed=seed, progress=False, epochs=spec.epochs,
               lr=spec.lr).best_folder


def run_student(name: str, seed: int, syns: dict[int, JobData], real: JobData, out: Path,
                quickstart: Path) -> dict[str, np.ndarray]:
    """Test-fold probabilities [64, C] of every row for one student and seed (the synthetic
    rows once per generator version in ``syns``, keys :func:`key_of`)."""
    real = with_seed(real, seed)
    r_spec = spec_of(real.recipe, name)
    tag = name.replace("/", "-")
    folder = out / tag / f"seed{seed}"
    t0 = time.perf_counter()
    scratch_best = train(baseline_job(real, r_spec), real, r_spec, folder / "scratch", seed)
    timings = [f"real only {time.perf_counter() - t0:.0f}s"]

    from transformers import AutoModel
    key = student_key(r_spec)
    views = {key: real.views[key]}
    inputs = student_inputs(r_spec)
    test = real.data.split("test", views)
    jobs = [("scratch", scratch_best, test)]
    for g, syn in syns.items():
        syn = with_seed(syn, seed)
        s_spec = spec_of(syn.recipe, name)
        suffix = "" if g == 1 else f"-v{g}"
        t0 = time.perf_counter()
        syn_best = train(baseline_job(syn, s_spec), syn, s_spec, folder / f"synthetic{suffix}",
                         seed, reuse=quickstart / "baseline" / tag)
        t1 = time.perf_counter()
        ft = baseline_job(real, r_spec)  # initialised, then given the synthetic weights
        weights = load_file(str(syn_best / "model.safetensors"))
        ft.model.load_state_dict(weights)  # the config keeps the real scaler's statistics
        ft.name = f"fine-tune {name}"
        ft.fingerprint = stable_hash({"base": ft.fingerprint,
                                      "init": sha256_file(syn_best / "model.safetensors")})
        ft_best = train(ft, real, r_spec, folder / f"finetuned{suffix}", seed)
        timings.append(f"generator {g}: synthetic {t1 - t0:.0f}s, "
                       f"fine-tune {time.perf_counter() - t1:.0f}s")
        # the real test records standardised with the synthetic training folds' statistics
        own = dataclasses.replace(real.data, scaler=syn.data.scaler).split("test", views)
        jobs += [(key_of("zeroshot_own", g), syn_best, own),
                 (key_of("zeroshot_real", g), syn_best, test),
                 (key_of("finetuned", g), ft_best, test)]
    print(f"{name} seed {seed}: " + "; ".join(timings), flush=True)
    probs = {}
    for row, best, split in jobs:
        model = AutoModel.from_pretrained(best).eval()
        index, probs[row] = predict(model, split, inputs, batch_size=128)
    if not np.array_equal(index, np.sort(real.data.splits["test"])):
        raise SystemExit("predictions are not in the test fold's record order")
    np.savez(folder / "test_predictions.npz", index=index, **probs)
    return probs


def table(results: dict[str, list[dict[str, np.ndarray]]], labels: np.ndarray,
          classes: list[str], seeds: list[int], bootstrap: int,
          generators: tuple[int, ...] = (1,)) -> str:
    samples = bootstrap_samples(labels, bootstrap, 0)
    several = len(seeds) > 1

    def diff(runs: list[dict[str, np.ndarray]], a: str, b: str) -> str:
        d = (over_seeds(labels, [r[a] for r in runs], [r[b] for r in runs], samples)
             if several else paired_difference(labels, runs[0][a], runs[0][b], samples))
        return f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"

    how = (f"mean over seeds {', '.join(map(str, seeds))}; intervals over test resamples and "
           f"seeds (two-level bootstrap)" if several else f"seed {seeds[0]}")
    lines = [f"Real test fold (PTB-XL fold 10): {len(labels)} records; {bootstrap} bootstrap "
             f"resamples, 95% intervals; {how}.", "",
             "| student | " + " | ".join(r for r, _ in ROWS) + " | fine-tuned − real only "
             "(paired) | zero-shot (real scaler) − real only (paired) |",
             "|---" * (len(ROWS) + 3) + "|"]
    for name, runs in results.items():
        for g in generators:
            cells = []
            for _, row in ROWS:
                key = key_of(row, g)
                cells.append(str(over_seeds(labels, [r[key] for r in runs], None, samples)
                                 if several
                                 else bootstrap_interval(labels, runs[0][key], samples)))
            cells += [diff(runs, key_of(a, g), key_of(b, g)) for a, b in DIFFERENCES]
            label = name if len(generators) == 1 else f"{name}, generator {g}"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for g in generators[1:]:
        base = generators[0]
        lines += ["", f"Generator {g} − generator {base}, paired on the same test records "
                  f"(and seeds):", "", "| student | fine-tuned | zero-shot (real scaler) |",
                  "|---|---|---|"]
        for name, runs in results.items():
            lines.append(f"| {name} | "
                         + " | ".join(diff(runs, key_of(row, g), key_of(row, base))
                                      for row in ("finetuned", "zeroshot_real")) + " |")
    if several:
        lines += ["", "Per seed, paired difference fine-tuned − real only (test resamples):", "",
                  "| student | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---" * (len(seeds) + 1) + "|"]
        for name, runs in results.items():
            for g in generators:
                cells = []
                for r in runs:
                    d = paired_difference(labels, r[key_of("finetuned", g)], r["scratch"],
                                          samples)
                    cells.append(f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
                label = name if len(generators) == 1 else f"{name}, generator {g}"
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Per-class test AUC (mean over seeds): real only → synthetic -> real", "",
              "| student | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, runs in results.items():
        a = np.mean([label_aucs(labels, r["scratch"]) for r in runs], axis=0)
        for g in generators:
            b = np.mean([label_aucs(labels, r[key_of("finetuned", g)]) for r in runs], axis=0)
            label = name if len(generators) == 1 else f"{name}, generator {g}"
            lines.append(f"| {label} | "
                         + " | ".join(f"{x:.3f} → {y:.3f}" for x, y in zip(a, b)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", nargs="+",
                        default=["xresnet1d/tiny", "xresnet1d/small", "leadformer/tiny"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--generators", nargs="+", type=int, default=[1, 2],
                        help="synthetic generator versions (default 1 2)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "synth-to-real")
    parser.add_argument("--quickstart", type=Path, default=ROOT / "runs" / "quickstart",
                        help="a finished quickstart run whose baselines are reused (seed 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    real_recipe = load_recipe(REAL_RECIPE)
    real = load_job_data(real_recipe, progress=False, data=load_data(real_recipe.data, False))
    syns = {}
    for g in args.generators:
        syn_recipe = synthetic_recipe(g)
        syns[g] = load_job_data(syn_recipe, progress=False,
                                data=load_data(syn_recipe.data, False))
        if list(syns[g].data.classes) != list(real.data.classes):
            raise SystemExit(f"classes differ: {syns[g].data.classes} vs {real.data.classes}")
    results: dict[str, list[dict[str, np.ndarray]]] = {}
    for name in args.students:
        results[name] = [run_student(name, s, syns, real, args.out, args.quickstart)
                         for s in args.seeds]
    labels = real.data.labels[np.sort(real.data.splits["test"])]
    text = table(results, labels, list(real.data.classes), args.seeds, args.bootstrap,
                 tuple(args.generators))
    text += f"\n\nWall time {time.perf_counter() - start:.0f} s."
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "table.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
