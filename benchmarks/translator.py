"""The CLMT-style 25 Hz -> 100 Hz translator against cubic interpolation on the synthetic
default's test fold: Pearson r and R-peak F1 (XQRS), with bootstrap intervals over records
and the paired difference.

Trains what is missing under ``runs/translator/`` (the 25 Hz and 100 Hz RVQ tokenizers, then
the translator; every setting in ``recipes/translator.yaml``, chosen on the validation
fold), or loads what a previous run finished, then evaluates and prints the table::

    python benchmarks/translator.py                 # train (or load) and evaluate
    python benchmarks/translator.py --resume        # continue an interrupted training
    python benchmarks/translator.py --force         # start over
    python benchmarks/translator.py translate.evaluate.leads=[I]   # overrides, as for a recipe

The summary (fingerprints, parameters, training times, the evaluation) is
``runs/translator/translate.json``; the table is also written as ``translate.md`` there.
"""

from __future__ import annotations

import os

# Many small tensor operations (the residual quantizer's) on a machine whose cores are
# shared: OpenMP threads that spin while waiting make them ten times slower. Set before
# torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from distill.core.errors import ECGDistillError  # noqa: E402
from distill.core.io import atomic_write_text  # noqa: E402
from distill.run.upsample import (format_evaluation, load_translate_recipe,  # noqa: E402
                                  run_translate)

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "translator.yaml"


def format_training(summary: dict) -> str:
    """One line per trained model: parameters, best epoch, validation loss, seconds."""
    lines = []
    for key, name in ((f"tokenizer_{summary['source_rate']}hz", "25 Hz tokenizer"),
                      (f"tokenizer_{summary['target_rate']}hz", "100 Hz tokenizer"),
                      ("translator", "translator")):
        s = summary.get(key)
        if not s:
            continue
        seconds = s.get("seconds")
        lines.append(f"  {name}: {s['trainable_parameters']:,} trained parameters, "
                     f"best epoch {s['best_epoch']}, validation loss {s['best_val_loss']:.4f}, "
                     f"{'' if seconds is None else f'{seconds:.0f} s'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--resume", action="store_true", help="continue interrupted training")
    parser.add_argument("--force", action="store_true", help="retrain everything")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        tr = load_translate_recipe(args.recipe, args.overrides)
        summary = run_translate(tr, resume=args.resume, force=args.force,
                                progress=not args.quiet)
    except ECGDistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = format_evaluation(summary["evaluation"])
    text = (f"{table}\n\ntraining (wall seconds on the CPU it ran on, as recorded when "
            f"trained):\n{format_training(summary)}")
    print(text)
    atomic_write_text(tr.run_dir / "translate.md", text + "\n")
    print(f"\nwritten: {tr.run_dir / 'translate.json'}, {tr.run_dir / 'translate.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
