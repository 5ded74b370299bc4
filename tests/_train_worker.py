"""Runs one distillation job in its own process, for the resume test (killed with SIGKILL).

    python tests/_train_worker.py RECIPE OUT_DIR [--kill-at STEP] [--resume]
"""

from __future__ import annotations

import argparse
import os
import signal

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same thread count in every run: identical arithmetic

    from distill.engine.jobs import build_teacher_cache, distill_job, load_frozen_teacher, load_job_data
    from distill.recipe import load_recipe
    from distill.engine.train import fit

    recipe = load_recipe(args.recipe)
    jd = load_job_data(recipe, progress=False)
    teacher = load_frozen_teacher(jd, recipe.run_dir)
    cache = build_teacher_cache(jd, teacher, progress=False)
    transfer = (build_teacher_cache(jd, teacher, progress=False, transfer=True)
                if jd.transfer is not None else None)
    job = distill_job(jd, recipe.students[0], teacher, cache, transfer_cache=transfer)

    def on_step(step: int) -> None:
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    fit(job, recipe.train, args.out, seed=recipe.seed, resume=args.resume, progress=False,
        on_step=on_step)


if __name__ == "__main__":
    main()
