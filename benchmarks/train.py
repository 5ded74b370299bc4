"""Training throughput at the quickstart's sizes: what the distillation objective costs per
student, what the teacher output cache saves, one epoch of each command.

Measured side by side in one run (interleaved repeats, medians of the training loop's own
wall time, evaluation and checkpointing excluded):

1. the objective's cost, for every student of the quickstart's ``students`` list, the
   teacher's outputs read from the cache: a label-only epoch (the baseline), a KD-only
   epoch (the recipe with every other distillation term weighted 0) and an epoch of the
   recipe's full objective, with the ratios to label-only; each the mean epoch of a run of
   the recipe's ``train.epochs`` (``--epochs``: the objective computes what it derives
   from the fixed teacher outputs in the first epoch and reads it in the later ones, so
   one epoch alone shows the cost of the first); each ``--fast KEY=VALUE ...`` adds
   an epoch of the full objective with those recipe overrides (e.g. the options that trade
   exactness for speed, ``distill.mhca.teacher_rank=32 distill.ot.tol=1e-4``), a column
   per ``--fast``;
2. for one student (``--student``): distillation with the teacher's outputs read from the
   cache; with the recipe's teacher run live on every batch, reading the cached images;
   the same with augmentation on (every record augmented and its image drawn live before
   the teacher runs: what ``train.augment`` costs); label-only;

then, once, an epoch of the teacher's fine-tuning, as ``ecg-distill teacher`` runs it.

Run: ``python benchmarks/train.py [--records 2000] [--repeats 3] [--objective-only]
[--epochs 5] [--fast distill.mhca.teacher_rank=32 ...] [--fast ...]`` (add ``--device-check`` on a GPU machine: one bf16
distillation epoch, records/s).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from distill.engine.jobs import (baseline_job, build_teacher_cache, distill_job, load_frozen_teacher,
                          load_job_data, teacher_job)
from distill.recipe import StudentConfig, load_recipe
from distill.engine.train import fit

REPO = Path(__file__).resolve().parents[1]


def one_epoch(job, recipe, root: Path, name: str, epochs: int = 1) -> tuple[float, float]:
    """(training-loop seconds, records/s) of an epoch of ``job``: the mean over a run of
    ``epochs`` epochs (what the objective keeps per record from the first epoch is read by
    the later ones)."""
    result = fit(job, recipe.train, root / name, seed=recipe.seed, progress=False,
                 epochs=epochs)
    rows = result.metrics["history"]
    seconds = statistics.fmean(r["train_seconds"] for r in rows)
    return seconds, statistics.fmean(r["train_records_per_s"] for r in rows)


def kd_only(recipe):
    """The recipe with every distillation term but KD weighted 0 (same alpha)."""
    out = copy.deepcopy(recipe)
    out.distill.weights = {k: (v if k == "kd" else 0.0) for k, v in recipe.distill.weights.items()}
    return out


def objective_costs(jd, recipe, teacher, cache, root: Path, repeats: int,
                    fast: list[list[str]], records: int, epochs: int) -> None:
    """Label-only, KD-only and full-objective epochs of every quickstart student, side by
    side (interleaved repeats, medians; each the mean epoch of a run of ``epochs``), and the
    full objective with ``fast`` overrides."""
    variants = {"label-only": None, "KD-only": dataclasses.replace(jd, recipe=kd_only(recipe)),
                "full": jd}
    for i, overrides in enumerate(fast, 1):
        fast_recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
            f"data.synthetic.records={records}", f"output_dir={root}/run", *overrides])
        fast_recipe.teacher.train_mode = recipe.teacher.train_mode  # frozen, as loaded
        variants[f"fast {i}"] = dataclasses.replace(jd, recipe=fast_recipe)
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(repeats):
        for spec in recipe.students:
            label = f"{spec.family}/{spec.size}"
            for name, data in variants.items():
                job = baseline_job(jd, spec) if data is None else \
                    distill_job(data, spec, teacher, cache)
                sec, _ = one_epoch(job, recipe, root, f"o-{spec.size}-{spec.family}-"
                                   f"{name.replace(' ', '').replace(',', '')}-{rep}", epochs)
                times.setdefault((label, name), []).append(sec)
    d = recipe.distill
    print(f"\nthe objective's cost: a training epoch per student (the mean of a run of "
          f"{epochs}), teacher outputs cached, median of {repeats} (interleaved)")
    print(f"  full = alpha {d.alpha}, weights "
          + ", ".join(f"{k} {v:g}" for k, v in d.weights.items() if v > 0)
          + "".join(f"\n  fast {i} = full with {' '.join(o)}" for i, o in enumerate(fast, 1)))
    head = "".join(f"{n + ' s':>14}" for n in variants)
    ratios = "".join(f"{n + ' / label':>20}" for n in variants if n != "label-only")
    print(f"  {'student':<20}{head}{ratios}")
    for spec in recipe.students:
        label = f"{spec.family}/{spec.size}"
        med = {n: statistics.median(times[(label, n)]) for n in variants}
        cells = "".join(f"{med[n]:14.2f}" for n in variants)
        rel = "".join(f"{med[n] / med['label-only']:19.2f}x" for n in variants
                      if n != "label-only")
        print(f"  {label:<20}{cells}{rel}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--student", default="xresnet1d/small", help="family/size for the ratios")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per run of the objective's cost, whose mean epoch is "
                             "reported (default the recipe's train.epochs)")
    parser.add_argument("--skip-per-command", action="store_true",
                        help="no teacher fine-tuning epoch")
    parser.add_argument("--objective-only", action="store_true",
                        help="only the objective's cost per student (the teacher cache is "
                             "reused if present, not rebuilt)")
    parser.add_argument("--fast", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe overrides of an extra full-objective column (repeat "
                             "for more columns)")
    parser.add_argument("--device-check", action="store_true",
                        help="also one bf16 distillation epoch on the GPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
            f"data.synthetic.records={args.records}", f"output_dir={root}/run"])
        augmented = load_recipe(REPO / "recipes" / "quickstart.yaml", [
            f"data.synthetic.records={args.records}", f"output_dir={root}/run",
            "train.augment.noise=0.02", "train.augment.shift=0.5"])
        family, size = args.student.split("/")
        spec = StudentConfig(family=family, size=size)
        print(f"CPU, {torch.get_num_threads()} threads; quickstart recipe, {args.records} "
              f"records, batch {recipe.train.batch_size}")
        jd = load_job_data(recipe, progress=False)
        n_train = len(jd.data.splits["train"])
        # the teacher as distillation reads it: the recipe's teacher, frozen, as loaded
        mode, teacher_name = recipe.teacher.train_mode, recipe.teacher.name_or_path
        recipe.teacher.train_mode = "frozen"
        teacher = load_frozen_teacher(jd, root)
        start = time.perf_counter()
        cache = build_teacher_cache(jd, teacher, progress=False,
                                    rebuild=not args.objective_only)  # time it
        cache_s = time.perf_counter() - start
        print(f"teacher cache: {len(jd.data)} records in {cache_s:.1f} s "
              f"({len(jd.data) / cache_s:.0f} records/s), tokens {list(cache.tokens.shape)} "
              f"{cache.tokens.dtype}")
        objective_costs(jd, recipe, teacher, cache, root, args.repeats, args.fast,
                        args.records, args.epochs or recipe.train.epochs)
        if args.objective_only:
            return

        jd_aug = dataclasses.replace(jd, recipe=augmented)
        cases = {
            "distill, cached teacher": lambda i: distill_job(jd, spec, teacher, cache),
            "distill, live teacher": lambda i: distill_job(jd, spec, teacher, None),
            "distill, live + augment": lambda i: distill_job(jd_aug, spec, teacher, None),
            "label-only (baseline)": lambda i: baseline_job(jd, spec),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for rep in range(args.repeats):
            for name, make in cases.items():
                seconds, _ = one_epoch(make(rep), recipe, root, f"{name}-{rep}".replace(" ", "_"))
                times[name].append(seconds)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\none training epoch of {args.student} ({n_train} records), median of "
              f"{args.repeats}:")
        for name, sec in med.items():
            print(f"  {name:<26}{sec:8.2f} s  {n_train / sec:8.0f} records/s")
        cached, live, aug, labels = (med[k] for k in cases)
        print(f"  live / cached teacher          {live / cached:6.2f}x")
        print(f"  live + augment / cached        {aug / cached:6.2f}x")
        print(f"  cached distill / label-only    {cached / labels:6.2f}x")
        print(f"  live distill / label-only      {live / labels:6.2f}x")

        if not args.skip_per_command:
            recipe.teacher.train_mode = mode
            sec, rate = one_epoch(teacher_job(jd), recipe, root, "teacher")
            print(f"\nan epoch of ecg-distill teacher {teacher_name} ({mode}): {sec:.2f} s, "
                  f"{rate:.0f} records/s (training loop only)")

        if args.device_check:
            if not torch.cuda.is_available():
                print("\n--device-check: no GPU here")
                return
            recipe.train.mixed_precision = "bf16"
            sec, rate = one_epoch(distill_job(jd, spec, teacher, cache), recipe, root, "gpu")
            print(f"\nGPU bf16 distillation of {args.student}: {sec:.2f} s, {rate:.0f} records/s")


if __name__ == "__main__":
    main()
