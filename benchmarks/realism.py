"""Realism score (issue 21): can a small classifier tell real ECGs from the synthetic default?

Simple features of every record, on unscaled signals in mV at 100 Hz
(:mod:`distill.metrics.realism`: per lead the robust peak-to-peak, std, offset, median R, S
and net QRS amplitude, T-wave amplitude and the log power in five frequency bands; per
record the heart rate, RR variability, beats found and the frontal QRS axis). A
gradient-boosted classifier learns real (the 352 records of folds 1-8 of
``recipes/ptbxl-real-500.yaml``) against synthetic (the 1,601 of folds 1-8 of the
quickstart's synthetic set) and is scored on held-out records: the real validation fold
9 (72) against the synthetic fold 9 (200). The real test fold is never read. AUC 0.5: the
features cannot tell them apart; 1.0: always. Every synthetic column is measured once per
generator version (``--generators``, default 1 and 2: the default and version 2, whose
constants were set from the real training folds' medians shown here), side by side.

* overall: every feature;
* per lead: a classifier on that lead's features alone (no record-level feature);
* per class: the overall classifier's scores on the held-out real records of one
  superdiagnostic class against the held-out synthetic records of the same class;
* the features that differ most (single-feature AUC on the training folds), with real and
  synthetic medians: the guide to the generator.

    python benchmarks/realism.py [--bootstrap 1000] [--generators 1 2]

Prints the tables and writes them to ``runs/synth-to-real/realism.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from distill.core.io import atomic_write_text
from distill.data.load import load_data
from distill.metrics.realism import (LEADS, RECORD_FEATURES, auc_interval, ecg_features,
                                     feature_names, lead_columns, realism_auc,
                                     single_feature_auc)
from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SYNTH_RECIPE = ROOT / "recipes" / "quickstart.yaml"
REAL_RECIPE = ROOT / "recipes" / "ptbxl-real-500.yaml"
# the generator's cheap knobs, as features (shown whatever their rank)
GUIDE = ["II_p2p", "II_R", "II_S", "V2_S", "V5_R", "II_T", "V2_T", "II_band_0-0.7Hz",
         "II_band_30-50Hz", "V1_band_30-50Hz", "heart_rate", "rr_cv", "qrs_axis", "II_offset"]


def fmt(v: tuple[float, float, float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def split_features(data, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, F], labels [n, C]) of a split's records."""
    idx = np.sort(data.splits[name])
    x = ecg_features((data.signal(i) for i in idx), data.sampling_rate)
    return x, data.labels[idx]


def report(bootstrap: int, generators: tuple[int, ...] = (1, 2), what_ifs: bool = True
           ) -> str:
    real = load_data(load_recipe(REAL_RECIPE).data, progress=False)
    t0 = time.perf_counter()
    rx, ry = split_features(real, "train")
    rv, rvy = split_features(real, "val")
    syns, sx, sv, svy = {}, {}, {}, {}
    for g in generators:
        overrides = [] if g == 1 else [f"data.synthetic.generator={g}"]
        syns[g] = load_data(load_recipe(SYNTH_RECIPE, overrides).data, progress=False)
        sx[g], _ = split_features(syns[g], "train")
        sv[g], svy[g] = split_features(syns[g], "val")
    t1 = time.perf_counter()
    names = feature_names()
    heads = " | ".join(f"generator {g}" for g in generators)
    rule = "|---" * (len(generators) + 1) + "|"

    def cells(cols: list[int] | None = None) -> str:
        out = []
        for g in generators:
            c = slice(None) if cols is None else cols
            _, a, b = realism_auc(rx[:, c], sx[g][:, c], rv[:, c], sv[g][:, c])
            out.append(fmt(auc_interval(a, b, bootstrap)))
        return " | ".join(out)

    g0 = generators[0]
    lines = [f"Real: {len(rx)} training-fold / {len(rv)} validation-fold records "
             f"(ptbxl-real-500); synthetic: {len(sx[g0])} / {len(sv[g0])} per generator "
             f"version (the quickstart's set, 2,000 records, seed 0). {len(names)} features; "
             f"classifier trained on the training folds, scored on the validation folds; "
             f"{bootstrap} bootstrap resamples, 95% intervals. (features {t1 - t0:.0f} s)", "",
             f"| realism AUC (0.5 = indistinguishable), held-out | {heads} |", rule,
             f"| all features | {cells()} |"]
    for lead in LEADS:
        lines.append(f"| lead {lead} alone | {cells(lead_columns(lead))} |")
    cols = [names.index(f) for f in RECORD_FEATURES]
    lines.append(f"| rhythm and axis only ({', '.join(RECORD_FEATURES)}) | {cells(cols)} |")
    scores = {g: realism_auc(rx, sx[g], rv, sv[g])[1:] for g in generators}
    lines += ["", f"| class (held-out real / synthetic records) | {heads} |", rule]
    for k, c in enumerate(real.classes):
        row = []
        for g in generators:
            s_real, s_syn = scores[g]
            a, b = s_real[rvy[:, k] > 0], s_syn[svy[g][:, k] > 0]
            row.append(fmt(auc_interval(a, b, bootstrap)) if len(a) > 1 and len(b) > 1
                       else "–")
        counts = " / ".join(str(int((svy[g][:, k] > 0).sum())) for g in generators)
        lines.append(f"| {c} ({int((rvy[:, k] > 0).sum())} / {counts}) | {' | '.join(row)} |")

    single = {g: single_feature_auc(rx, sx[g]) for g in generators}
    worst = np.max([np.abs(np.nan_to_num(single[g], nan=0.5) - 0.5) for g in generators], 0)
    rank = np.argsort(-worst)

    def row(j: int) -> str:
        rq = np.nanpercentile(rx[:, j], [25, 50, 75])
        out = [f"| {names[j]} | {rq[1]:.3f} ({rq[0]:.3f}–{rq[2]:.3f})"]
        for g in generators:
            sq = np.nanpercentile(sx[g][:, j], [25, 50, 75])
            out.append(f"{sq[1]:.3f} ({sq[0]:.3f}–{sq[2]:.3f}), AUC {single[g][j]:.2f}")
        return " | ".join(out) + " |"

    head = ["| feature | real median (IQR) | "
            + " | ".join(f"generator {g} median (IQR), single-feature AUC" for g in generators)
            + " |", "|---|---" + "|---" * len(generators) + "|"]
    lines += ["", "The 20 features that differ most in any version (training folds; "
              "single-feature AUC > 0.5: real larger; amplitudes in mV, band powers log10 "
              "mV²/Hz summed over the band, heart rate bpm, axis degrees):",
              "", *head, *[row(j) for j in rank[:20]]]
    lines += ["", "The generator's cheap knobs (training folds):", "", *head,
              *[row(names.index(f)) for f in GUIDE]]
    for g in generators:
        lines += ["", f"Generator {g}: per lead, real / synthetic median of the robust "
                  f"peak-to-peak amplitude (training folds): " + ", ".join(
                      f"{lead} {np.nanmedian(rx[:, j]) / np.nanmedian(sx[g][:, j]):.2f}"
                      for lead in LEADS for j in [names.index(f"{lead}_p2p")])]
    if what_ifs and 1 in generators:
        lines += ["", *what_if(syns[1], real, rx, rv, names, bootstrap)]
    return "\n".join(lines)


def what_if(syn, real, rx: np.ndarray, rv: np.ndarray, names: list[str], bootstrap: int
            ) -> list[str]:
    """The realism AUC after cheap corrections applied to the synthetic signals after the
    fact (cumulative; every constant measured on the training folds only): each record's
    per-lead mean removed (real PTB-XL records are zero-mean); per-lead gains (real /
    synthetic median robust peak-to-peak); white noise per lead matching the real median
    30-50 Hz band power. The generator itself is not changed."""
    tr, va = np.sort(syn.splits["train"]), np.sort(syn.splits["val"])
    x_tr = np.asarray(syn.signals[tr], dtype=np.float64)
    x_va = np.asarray(syn.signals[va], dtype=np.float64)
    rate = syn.sampling_rate
    rng = np.random.default_rng(0)
    p2p = [names.index(f"{lead}_p2p") for lead in LEADS]
    hf = [names.index(f"{lead}_band_30-50Hz") for lead in LEADS]
    lines = ["What if (the synthetic signals corrected after the fact, cumulative; constants "
             "from the training folds; the held-out AUC as above):", "",
             "| correction | all features | limb leads I, II, aVF | precordial V2, V4, V6 | "
             "constants |", "|---|---|---|---|---|"]
    steps = ["none", "per-lead mean removed", "+ per-lead gain", "+ white noise"]
    for step in steps:
        note = ""
        if step == "per-lead mean removed":
            x_tr = x_tr - x_tr.mean(-1, keepdims=True)
            x_va = x_va - x_va.mean(-1, keepdims=True)
        elif step == "+ per-lead gain":
            gain = np.nanmedian(rx[:, p2p], 0) / np.nanmedian(ecg_features(x_tr, rate)[:, p2p], 0)
            x_tr, x_va = x_tr * gain[:, None], x_va * gain[:, None]
            note = "gains " + ", ".join(f"{lead} {g:.2f}" for lead, g in zip(LEADS, gain))
        elif step == "+ white noise":
            have = np.nanmedian(ecg_features(x_tr, rate)[:, hf], 0)
            want = np.nanmedian(rx[:, hf], 0)
            # Welch density summed over the 30-50 Hz bins is about sigma^2 for white noise
            sigma = np.sqrt(np.maximum(10.0 ** want - 10.0 ** have, 0.0))
            x_tr = x_tr + rng.normal(0, 1, x_tr.shape) * sigma[:, None]
            x_va = x_va + rng.normal(0, 1, x_va.shape) * sigma[:, None]
            note = "noise std (mV) " + ", ".join(f"{lead} {s:.3f}"
                                                  for lead, s in zip(LEADS, sigma))
        sx, sv = ecg_features(x_tr, rate), ecg_features(x_va, rate)
        cells = []
        for group in (None, ("I", "II", "aVF"), ("V2", "V4", "V6")):
            cols = (list(range(len(names))) if group is None
                    else [j for lead in group for j in lead_columns(lead)])
            _, a, b = realism_auc(rx[:, cols], sx[:, cols], rv[:, cols], sv[:, cols])
            cells.append(fmt(auc_interval(a, b, bootstrap)))
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {note} |")
    single = single_feature_auc(rx, sx)
    rank = np.argsort(-np.abs(np.nan_to_num(single, nan=0.5) - 0.5))[:12]
    lines += ["", "What still differs most after the corrections (single-feature AUC; real / "
              "synthetic median): " + "; ".join(
                  f"{names[j]} {single[j]:.2f} ({np.nanmedian(rx[:, j]):.3f} / "
                  f"{np.nanmedian(sx[:, j]):.3f})" for j in rank)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--generators", nargs="+", type=int, default=[1, 2],
                        help="synthetic generator versions, side by side (default 1 2)")
    parser.add_argument("--no-what-if", action="store_true",
                        help="skip the after-the-fact corrections of generator 1")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "synth-to-real")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    text = report(args.bootstrap, tuple(args.generators), not args.no_what_if)
    text += f"\n\nWall time {time.perf_counter() - start:.0f} s."
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "realism.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
