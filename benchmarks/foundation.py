"""The masked foundation models side by side: label efficiency, the seed paper's
LAMAE-against-independent-leads test, and one-lead reading, from ``ecg-distill probe``
results.

Every model is probed on the same test fold with the same label subsets, so each
comparison is paired on the same bootstrap resamples of the test records. Made by::

    ecg-distill pretrain recipes/pretrain-lamae.yaml
    ecg-distill pretrain recipes/pretrain-lamae.yaml name=pretrain-lamae-independent \
        'pretrain.options={cross_lead: false}'
    ecg-distill pretrain recipes/pretrain-csfm.yaml
    ecg-distill probe runs/<each>/pretrain/best --data recipes/quickstart.yaml
    python benchmarks/foundation.py runs/pretrain-lamae runs/pretrain-lamae-independent \
        runs/pretrain-csfm --figure benchmarks/figures/foundation-label-efficiency.png

Prints a markdown table (linear probe at each label fraction, fine-tuned and from scratch
at 10%, lead I and limb leads with the same weights, reconstruction error per mask) and
the paired differences: each model's 10% linear probe minus its own from-scratch model,
and the first run minus the second (LAMAE minus the independent-lead baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from distill.metrics.classification import bootstrap_samples, paired_difference


def load(run: Path) -> tuple[dict, dict]:
    folder = run / "pretrain" / "probe"
    result = json.loads((folder / "probe.json").read_text())
    preds = dict(np.load(folder / "predictions.npz"))
    return result, preds


def iv(d: dict) -> str:
    return f"{d['value']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def diff(d) -> str:
    return f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pretraining run folders (probed)")
    parser.add_argument("--figure", type=Path, default=None, help="write the label-efficiency plot")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    loaded = [(run.name, *load(run)) for run in args.runs]
    labels, index = loaded[0][2]["labels"], loaded[0][2]["index"]
    for name, _, preds in loaded:
        if not np.array_equal(preds["index"], index):
            raise SystemExit(f"{name}: probed on other test records; pair like with like")
    tuned = list(loaded[0][1]["finetune"])
    if not tuned:
        raise SystemExit("the probes fine-tuned at no fraction (--finetune-fractions)")
    ft = tuned[0]
    samples = bootstrap_samples(labels, args.bootstrap, args.seed)
    fractions = list(loaded[0][1]["linear"])
    print("| model | parameters | " + " | ".join(f"linear {float(f):.0%}" for f in fractions)
          + " | fine-tuned | from scratch | lead I | limb leads | NMSE patches / time / "
            "channels / time+channel |")
    print("|---" * (len(fractions) + 7) + "|")
    for name, r, _ in loaded:
        rec = r["reconstruction"]
        nmse = " / ".join(f"{rec[s]['nmse']:.2f}" for s in ("patches", "time", "channels",
                                                          "time_channel")) if rec else "–"
        print(f"| {name} ({r['family']}) | {r['encoder_parameters']:,} | "
              + " | ".join(iv(r["linear"][f]) for f in fractions)
              + f" | {iv(r['finetune'][ft])} | {iv(r['scratch'][ft])} | "
                f"{iv(r['leads']['lead I'])} | {iv(r['leads']['limb leads'])} | {nmse} |")
    print()
    for name, r, p in loaded:
        d = paired_difference(labels, p[f"linear_{ft}"], p[f"scratch_{ft}"], samples)
        print(f"{name}: linear probe at {float(ft):.0%} labels - same architecture from "
              f"scratch on them: {diff(d)}")
    if len(loaded) >= 2:
        (a, _, pa), (b, _, pb) = loaded[0], loaded[1]
        for key in [f"linear_{f}" for f in fractions] + [f"finetune_{ft}", "leads_lead_I"]:
            d = paired_difference(labels, pa[key], pb[key], samples)
            print(f"{a} - {b}, {key}: {diff(d)}")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [float(f) for f in fractions]
        for i, (name, r, _) in enumerate(loaded):
            vals = [r["linear"][f] for f in fractions]
            ax.errorbar(xs, [v["value"] for v in vals],
                        yerr=[[v["value"] - v["low"] for v in vals],
                              [v["high"] - v["value"] for v in vals]],
                        marker="o", capsize=3, label=f"{name}: linear probe", color=f"C{i}")
            s = r["scratch"][ft]
            ax.errorbar([float(ft) * (1.06 + 0.04 * i)], [s["value"]],
                        yerr=[[s["value"] - s["low"]], [s["high"] - s["value"]]], marker="x",
                        capsize=3, linestyle="none", color=f"C{i}",
                        label=f"{name}: same architecture from scratch")
        ax.set_xscale("log")
        ax.set_xlabel("share of the training labels")
        ax.set_ylabel("test macro AUC (95% CI)")
        ax.set_title("Masked pretraining: label efficiency (synthetic superdiagnostic)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=110)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
