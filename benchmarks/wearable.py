"""The wearable scenario's table (issue 20): a lead-I student at 25 Hz trained on the labels,
distilled from the 12-lead 100 Hz Hypnos teacher (with and without the code-distribution
term), and the same architecture reading the 25 -> 100 Hz translator's output, on labels and
distilled; for reference, the same student reading lead I recorded at 100 Hz. Macro AUC and AFIB AUC on the test fold with bootstrap intervals, and paired
differences (every model scored on the same resamples of the same test records).

Reads the evaluations of the three runs of ``recipes/wearable-25hz.yaml`` (its header gives
the commands); trains nothing::

    python benchmarks/wearable.py [--runs runs] [--bootstrap 1000]

Writes the table to ``runs/wearable-25hz/wearable.md`` as well.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from distill.core.errors import ECGDistillError
from distill.core.io import atomic_write_text
from distill.data.load import load_data
from distill.metrics.classification import (bootstrap_interval, bootstrap_samples, label_aucs,
                                            paired_difference)
from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "wearable-25hz.yaml"
STUDENT = "xresnet1d-small"
# (row, run, eval folder)
MODELS = [
    ("teacher: Hypnos, 12 leads at 100 Hz", "wearable-25hz", "teacher"),
    ("lead I at 25 Hz, labels only", "wearable-25hz", f"baseline_{STUDENT}"),
    ("lead I at 25 Hz, distilled", "wearable-25hz", f"distill_{STUDENT}"),
    ("lead I at 25 Hz, distilled without the codes term", "wearable-25hz",
     f"ablation_no_codes_{STUDENT}"),
    ("translated to 100 Hz, labels only", "wearable-25hz-translated", f"baseline_{STUDENT}"),
    ("translated to 100 Hz, distilled", "wearable-25hz-translated", f"distill_{STUDENT}"),
    ("reference: lead I recorded at 100 Hz, labels only", "wearable-100hz-reference",
     f"baseline_{STUDENT}"),
    ("reference: lead I recorded at 100 Hz, distilled", "wearable-100hz-reference",
     f"distill_{STUDENT}"),
]
# (a, b): a - b, paired
DIFFERENCES = [
    ("lead I at 25 Hz, distilled", "lead I at 25 Hz, labels only"),
    ("lead I at 25 Hz, distilled", "lead I at 25 Hz, distilled without the codes term"),
    ("translated to 100 Hz, labels only", "lead I at 25 Hz, labels only"),
    ("translated to 100 Hz, distilled", "lead I at 25 Hz, distilled"),
    ("translated to 100 Hz, distilled", "lead I at 25 Hz, labels only"),
    ("translated to 100 Hz, labels only", "reference: lead I recorded at 100 Hz, labels only"),
]


def load_predictions(runs: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each row's test-fold probabilities [N, C] (the records in one order) and the test
    indices; a one-line error naming what is missing."""
    out: dict[str, np.ndarray] = {}
    index = None
    for row, run, folder in MODELS:
        path = runs / run / "eval" / folder / "predictions.npz"
        if not path.exists():
            raise ECGDistillError(f"{path}: missing; run both commands of {RECIPE.name}'s "
                                  f"header first")
        saved = np.load(path)
        order = np.argsort(saved["test_index"])
        if index is None:
            index = saved["test_index"][order]
        elif not np.array_equal(saved["test_index"][order], index):
            raise ECGDistillError(f"{path}: scored other test records than the first model")
        out[row] = saved["test"][order]
    return out, index


def table(runs: Path, bootstrap: int, seed: int = 0) -> str:
    """The markdown table of every row and paired difference."""
    recipe = load_recipe(RECIPE)
    data = load_data(recipe.data, progress=False)
    probs, index = load_predictions(runs)
    labels = data.labels[index]
    afib = data.classes.index("AFIB")

    def afib_auc(y: np.ndarray, s: np.ndarray) -> float:
        return float(label_aucs(y[:, [afib]], s[:, [afib]])[0])

    samples = bootstrap_samples(labels, bootstrap, seed)
    lines = [f"Test fold: {len(index)} records, {int(labels[:, afib].sum())} with AFIB; "
             f"{bootstrap} bootstrap resamples, 95% intervals.", "",
             "| model | macro AUC | AFIB AUC |", "|---|---|---|"]
    for row, _, _ in MODELS:
        lines.append(f"| {row} | {bootstrap_interval(labels, probs[row], samples)} | "
                     f"{bootstrap_interval(labels, probs[row], samples, afib_auc)} |")
    lines += ["", "| paired difference | macro AUC | AFIB AUC |", "|---|---|---|"]
    for a, b in DIFFERENCES:
        lines.append(f"| {a} − {b} | {paired_difference(labels, probs[a], probs[b], samples)} "
                     f"| {paired_difference(labels, probs[a], probs[b], samples, afib_auc)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="the runs folder")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    try:
        text = table(args.runs, args.bootstrap)
    except ECGDistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    atomic_write_text(args.runs / "wearable-25hz" / "wearable.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
