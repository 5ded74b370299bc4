"""Matplotlib reference renderer of the 12-lead printout, and a speed comparison.

``MplRenderer`` draws the same paper, layout, clipping and labels as
``distill.data.render`` with matplotlib (Agg, a figure of exactly H x W pixels). It is the
fair, reasonably optimised way to use matplotlib: the figure, the grid and the labels are
built once and only the 13 trace lines get new data per image. ``main()`` times it against
the vectorised renderer on one core and prints images/s of both and the ratio.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.render_mpl [--size 224] [--n 200]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before numpy spins up threads

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from distill.core.leads import STANDARD_LEADS  # noqa: E402
from distill.data.render import LAYOUTS, RenderConfig, render_batch  # noqa: E402


class MplRenderer:
    """Render [12, T] records with matplotlib in the layout of ``config``.

    Args:
        config: the render configuration (size, layout, paper scale, colours).
        fs: sampling rate in Hz.
        n_samples: samples per record (T).
    """

    def __init__(self, config: RenderConfig, fs: float, n_samples: int):
        self.config = config
        self.fs = fs
        dpi = self.dpi = 100
        self.fig = plt.figure(figsize=(config.width / dpi, config.height / dpi), dpi=dpi)
        ax = self.fig.add_axes((0, 0, 1, 1))
        pw, ph = config.paper_width_mm, config.paper_height_mm
        ax.set_xlim(0, pw)
        ax.set_ylim(ph, 0)  # paper coordinates in mm, y grows downwards like pixel rows
        ax.axis("off")
        self.fig.patch.set_facecolor(np.asarray(config.background) / 255)
        if config.grid:
            self._grid(ax, pw, ph)
        self.lines = []
        self.slices = []
        t = np.arange(n_samples) / fs
        trace_px = max(1.0, config.line_width_mm * config.height / ph)
        rows = LAYOUTS[config.layout]
        for r, names in enumerate(rows):
            col_mm = pw / len(names)
            y0 = r * config.row_height_mm
            base = y0 + config.baseline_frac * config.row_height_mm
            for c, name in enumerate(names):
                t0, t1 = c * col_mm / config.paper_speed, (c + 1) * col_mm / config.paper_speed
                sl = np.flatnonzero((t >= t0) & (t <= t1))
                x = t[sl] * config.paper_speed
                (line,) = ax.plot(x, np.full_like(x, base), color=np.asarray(config.trace_color) / 255,
                                  linewidth=trace_px * 72 / dpi,
                                  antialiased=False)
                # Clip each trace to its own panel, as the vectorised renderer does.
                line.set_clip_path(Rectangle((c * col_mm, y0), col_mm, config.row_height_mm, transform=ax.transData))
                self.lines.append((line, STANDARD_LEADS.index(name), base))
                self.slices.append(sl)
                if config.labels:
                    ax.text(c * col_mm + 1.5, y0 + 1.5, name, fontsize=max(4, config.height / 60),
                            va="top", ha="left", family="monospace")

    def _grid(self, ax, pw: float, ph: float) -> None:
        """Minor (1 mm) and major (5 mm) grid lines as two line collections."""
        cfg = self.config
        for step, color, width_mm in ((1.0, cfg.minor_color, cfg.minor_width_mm),
                                      (5.0, cfg.major_color, cfg.major_width_mm)):
            xs = np.arange(0, pw + 1e-9, step)
            ys = np.arange(0, ph + 1e-9, step)
            segs = [((x, 0), (x, ph)) for x in xs] + [((0, y), (pw, y)) for y in ys]
            px = max(width_mm * cfg.width / pw, 0.5)
            ax.add_collection(LineCollection(segs, colors=[np.asarray(color) / 255], linewidths=px * 72 / self.dpi))

    def render(self, signal: np.ndarray) -> np.ndarray:
        """Draw one record [12, T] and return uint8 [3, H, W]."""
        for (line, lead, base), sl in zip(self.lines, self.slices):
            line.set_ydata(base - signal[lead, sl] * self.config.gain)
        self.fig.canvas.draw()
        rgba = np.asarray(self.fig.canvas.buffer_rgba())
        return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))

    def close(self) -> None:
        plt.close(self.fig)


def synthetic_batch(n: int, fs: float = 500.0, seconds: float = 10.0, seed: int = 0) -> np.ndarray:
    """Float32 [n, 12, T] records: Gaussian P-QRS-T waves per beat, per-lead scale, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(fs * seconds)) / fs
    waves = ((-0.2, 0.025, 0.15), (-0.03, 0.008, -0.1), (0.0, 0.01, 1.0), (0.03, 0.01, -0.25), (0.25, 0.05, 0.3))
    out = np.empty((n, 12, t.size), dtype=np.float32)
    for i in range(n):
        rr = 60.0 / rng.uniform(50, 110)
        beat = np.zeros_like(t)
        for b in np.arange(rng.uniform(0, rr), seconds + rr, rr):
            for off, w, a in waves:
                beat += a * np.exp(-0.5 * ((t - b - off) / w) ** 2)
        scale = rng.uniform(-1.5, 1.5, size=12)
        out[i] = scale[:, None] * beat[None] + 0.03 * rng.standard_normal((12, t.size))
    return out


def _rate(fn, n: int) -> float:
    """Images per second of ``fn()`` that renders ``n`` images (best of 3 runs)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main(argv: list[str] | None = None) -> None:
    """Time both renderers on one core and print images/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=200, help="images per timed run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--fs", type=float, default=500.0)
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    config = RenderConfig(height=args.size, width=args.size)
    signals = synthetic_batch(args.n, fs=args.fs)
    render_batch(signals[:2], args.fs, config)  # build the cached geometry and background

    def vectorised() -> None:
        for s in range(0, args.n, args.batch):
            render_batch(signals[s:s + args.batch], args.fs, config)

    mpl = MplRenderer(config, args.fs, signals.shape[-1])
    n_mpl = max(10, args.n // 10)  # matplotlib is slow; time fewer images

    def reference() -> None:
        for i in range(n_mpl):
            mpl.render(signals[i])

    fast = _rate(vectorised, args.n)
    slow = _rate(reference, n_mpl)
    mpl.close()
    print(f"size {args.size}x{args.size}, fs {args.fs:g} Hz, 10 s records, 1 thread")
    print(f"vectorised numpy: {fast:9.1f} images/s (batch {args.batch})")
    print(f"matplotlib Agg  : {slow:9.1f} images/s (figure reused, 13 lines updated)")
    print(f"ratio           : {fast / slow:9.1f}x")


if __name__ == "__main__":
    main()
