"""Training throughput at the quickstart's sizes: one epoch of each command, and what the
teacher output cache saves.

Measured side by side in one run (interleaved repeats, medians of the training loop's own
wall time, evaluation and checkpointing excluded):

  * distillation of one student with the teacher's outputs read from the cache;
  * the same with the recipe's teacher run live on every batch, reading the cached images;
  * the same with augmentation on: every record augmented and its image drawn live before
    the teacher runs (what ``train.augment`` costs);
  * a label-only epoch of the same student (the baseline);

then, once each, an epoch of the teacher's fine-tuning and of every student's baseline and
distillation, as ``ecg-distill teacher / baseline / distill`` run them.

Run: ``python benchmarks/train.py [--records 2000] [--student xresnet1d/small] [--repeats 2]``
(add ``--device-check`` on a GPU machine: one bf16 distillation epoch, records/s).
"""

from __future__ import annotations

import argparse
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


def one_epoch(job, recipe, root: Path, name: str) -> tuple[float, float]:
    """(training-loop seconds, records/s) of one epoch of ``job``."""
    result = fit(job, recipe.train, root / name, seed=recipe.seed, progress=False, epochs=1)
    row = result.metrics["history"][0]
    return row["train_seconds"], row["train_records_per_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--student", default="xresnet1d/small", help="family/size for the ratios")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-per-command", action="store_true",
                        help="only the cache / live / label-only ratios")
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
        mode, name = recipe.teacher.train_mode, recipe.teacher.name_or_path
        recipe.teacher.train_mode = "frozen"
        teacher = load_frozen_teacher(jd, root)
        start = time.perf_counter()
        cache = build_teacher_cache(jd, teacher, progress=False, rebuild=True)  # time it
        cache_s = time.perf_counter() - start
        print(f"teacher cache: {len(jd.data)} records in {cache_s:.1f} s "
              f"({len(jd.data) / cache_s:.0f} records/s), tokens {list(cache.tokens.shape)} "
              f"{cache.tokens.dtype}")

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
            print("\none epoch of each command's jobs (training loop only):")
            recipe.teacher.train_mode = mode
            sec, rate = one_epoch(teacher_job(jd), recipe, root, "teacher")
            print(f"  ecg-distill teacher  {f'{name} ({mode})':<20} {sec:8.2f} s {rate:8.0f} records/s")
            for s in recipe.students:
                label = f"{s.family}/{s.size}"
                sec, rate = one_epoch(baseline_job(jd, s), recipe, root, f"b-{s.size}")
                print(f"  ecg-distill baseline {label:<20} {sec:8.2f} s {rate:8.0f} records/s")
                sec, rate = one_epoch(distill_job(jd, s, teacher, cache), recipe, root,
                                      f"d-{s.size}")
                print(f"  ecg-distill distill  {label:<20} {sec:8.2f} s {rate:8.0f} records/s")

        if args.device_check:
            if not torch.cuda.is_available():
                print("\n--device-check: no GPU here")
                return
            recipe.train.mixed_precision = "bf16"
            sec, rate = one_epoch(distill_job(jd, spec, teacher, cache), recipe, root, "gpu")
            print(f"\nGPU bf16 distillation of {args.student}: {sec:.2f} s, {rate:.0f} records/s")


if __name__ == "__main__":
    main()
