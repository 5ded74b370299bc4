"""The information ceiling of a printout: what a 1-D CNN reaches on the signal reduced to
what a rendered 12-lead image of a given size can show.

A VLM teacher reads the record only through the renderer's printout (the "3x4+II" layout:
each lead's own 2.5 s window in a 3 x 4 grid, plus a 10 s lead II rhythm strip). At S x S
pixels the 250 mm paper gets S / 10 pixel columns per second and a 50 mm row S / 4 pixel
rows, so a 224-px printout samples each trace at 22.4 columns/s and 11.2 rows/mV. This
benchmark trains the same student (xresnet1d/small) on three inputs, side by side:

- ``signal``: the record as the students read it (100 Hz, every lead for the full 10 s);
- ``rate-S``: every lead for the full 10 s, but at S's pixel columns and rows: each column
  keeps the lowest and highest point of the trace in it, the ink a drawn line leaves
  there (what resolution alone costs);
- ``printout-S``: only what the printout shows: each lead's own window (lead II the whole
  rhythm strip), at S's pixel columns and rows, clipped to its panel, zero elsewhere (what
  the image can carry at most, to a model that reads it perfectly);
- ``blurred-S`` (``--mean-ink``): the printout with each column's mean instead of its
  extent, which loses the height of QRS spikes narrower than a column.

Each reduced signal is interpolated back to 100 Hz, so the one architecture reads every
input. Data: the quickstart's records (synthetic, 2,000, seed 0: train/val/test folds as
in every run); macro AUROC on the validation and test folds, mean over ``--seeds``.

    python benchmarks/ceiling.py                       # sizes 224 336 448, 10 epochs, 1 seed
    python benchmarks/ceiling.py --sizes 224 448 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import students  # noqa: E402
from benchmarks.synth_difficulty import train_and_score  # noqa: E402
from distill.data.dataset import load_ptbxl  # noqa: E402
from distill.data.render_layout import RenderConfig, panel_boxes  # noqa: E402
from distill.data.synth import generate_ptbxl  # noqa: E402


def _slices(t: int, fs: float, t0: float, t1: float, n_cols: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Sample ranges [a, b) of ``n_cols`` equal slices of [t0, t1) seconds (each slice at
    least one sample): the samples each pixel column covers."""
    edges = np.clip(np.round(np.linspace(t0 * fs, t1 * fs, n_cols + 1)).astype(int), 0, t)
    a = np.minimum(edges[:-1], t - 1)
    return a, np.maximum(edges[1:], a + 1)


def _columns(traces: np.ndarray, fs: float, t0: float, t1: float, n_cols: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """[N, T] -> ([N, n_cols], [n_cols]): the mean of each trace over each pixel column's
    samples, and the mean time of those samples (where that value belongs)."""
    a, b = _slices(traces.shape[1], fs, t0, t1, n_cols)
    cs = np.concatenate([np.zeros((traces.shape[0], 1)), np.cumsum(traces, axis=1)], axis=1)
    return (cs[:, b] - cs[:, a]) / (b - a), (a + b - 1) / 2 / fs


def _extents(traces: np.ndarray, fs: float, t0: float, t1: float, n_cols: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """[N, T] -> (values [N, 2 n_cols], times [N, 2 n_cols]): each pixel column's lowest
    and highest sample, in time order, at the times they occur: the vertical extent of
    ink a drawn trace leaves in that column."""
    a, b = _slices(traces.shape[1], fs, t0, t1, n_cols)
    n = traces.shape[0]
    values = np.empty((n, 2 * n_cols))
    times = np.empty((n, 2 * n_cols))
    rows = np.arange(n)
    for k, (lo, hi) in enumerate(zip(a, b)):
        seg = traces[:, lo:hi]
        i_min, i_max = seg.argmin(axis=1), seg.argmax(axis=1)
        first, second = np.minimum(i_min, i_max), np.maximum(i_min, i_max)
        values[:, 2 * k], values[:, 2 * k + 1] = seg[rows, first], seg[rows, second]
        times[:, 2 * k], times[:, 2 * k + 1] = (lo + first) / fs, (lo + second) / fs
    return values, times


def reduce_to_printout(signals: np.ndarray, fs: float, config: RenderConfig,
                       windows: bool = True, ink: str = "extent") -> np.ndarray:
    """[N, 12, T] mV -> [N, 12, T] mV holding only what a ``config`` printout resolves.

    Args:
        signals: the records in mV.
        fs: their sampling rate.
        config: the render geometry (size, layout, paper speed, gain, row height).
        windows: True: each lead only in its panels' time windows, clipped to the panel's
            rows, zero elsewhere; False: every lead over the whole duration, at the pixel
            resolution of a full-width panel.
        ink: "extent": each pixel column keeps its trace's lowest and highest point (the
            ink a drawn line leaves there, so a QRS spike narrower than a column keeps its
            height); "mean": the column's mean (a blurred trace).

    Returns:
        The reduced records, interpolated back to ``fs``.
    """
    n, leads, t = signals.shape
    px_per_mm_x = config.width / config.paper_width_mm
    px_per_mv = config.height / config.paper_height_mm * config.gain
    time = np.arange(t) / fs
    out = np.zeros_like(signals)
    if windows:
        panels = [(p.lead, p.t0, min(p.t1, t / fs), p.x1 - p.x0,
                   (p.y1 - p.y0) * config.baseline_frac / px_per_mv,
                   -(p.y1 - p.y0) * (1 - config.baseline_frac) / px_per_mv)
                  for p in panel_boxes(config)]
    else:
        cols = int(round(min(config.duration, t / fs) * config.paper_speed * px_per_mm_x))
        panels = [(lead, 0.0, min(config.duration, t / fs), cols, np.inf, -np.inf)
                  for lead in range(leads)]
    for lead, t0, t1, n_cols, top, bottom in panels:
        if t1 <= t0 or n_cols < 1:
            continue
        inside = (time >= t0) & (time < t1)
        traces = signals[:, lead].astype(np.float64)
        if ink == "extent":
            v, at = _extents(traces, fs, t0, t1, n_cols)
        elif ink == "mean":
            v, centres = _columns(traces, fs, t0, t1, n_cols)
            at = np.broadcast_to(centres, v.shape)
        else:
            raise ValueError(f"ink: {ink!r}; expected 'extent' or 'mean'")
        v = np.clip(np.round(v * px_per_mv) / px_per_mv, bottom, top)  # pixel rows
        for i in range(n):
            out[i, lead, inside] = np.interp(time[inside], at[i], v[i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 336, 448])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--student", default="xresnet1d/small")
    ap.add_argument("--mean-ink", action="store_true",
                    help="also the printout with each column's mean (a blurred trace)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    family, size = args.student.split("/")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "synthetic"
        generate_ptbxl(folder, args.records, seed=args.data_seed, sampling_rates=(100,),
                       progress=False)
        data = load_ptbxl(folder, task="superdiagnostic", sampling_rate=100,
                          cache_dir=Path(tmp) / "cache", progress=False)
    signals = np.asarray(data.signals, dtype=np.float32)
    fs = 100.0
    inputs: dict[str, np.ndarray] = {"signal": signals}
    for s in args.sizes:
        config = RenderConfig(height=s, width=s)
        inputs[f"rate-{s}"] = reduce_to_printout(signals, fs, config, windows=False)
        inputs[f"printout-{s}"] = reduce_to_printout(signals, fs, config, windows=True)
        if args.mean_ink:
            inputs[f"blurred-{s}"] = reduce_to_printout(signals, fs, config, ink="mean")
    print(f"{args.student}, {args.epochs} epochs, seeds {args.seeds}; records train "
          f"{len(data.splits['train'])} / val {len(data.splits['val'])} / test "
          f"{len(data.splits['test'])}; CPU, torch {torch.__version__}")
    print(f"{'input':<14} {'columns/s':>9} {'rows/mV':>8} {'val AUC':>8} {'test AUC':>9} "
          f"{'seconds':>8}")
    for name, x in inputs.items():
        t0 = time.perf_counter()
        runs = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = students.create(family, size, num_labels=len(data.classes))
            runs.append(train_and_score(data, args.epochs, seed, model=model, signals=x))
        s = None if name == "signal" else int(name.rsplit("-", 1)[1])
        cols = f"{s / 10:.1f}" if s else f"{fs:.0f}"
        rows = f"{s / 4 / 5:.1f}" if s else "-"
        val = np.mean([r["val_macro_auc"] for r in runs])
        test = np.mean([r["macro_auc"] for r in runs])
        print(f"{name:<14} {cols:>9} {rows:>8} {val:>8.3f} {test:>9.3f} "
              f"{time.perf_counter() - t0:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
