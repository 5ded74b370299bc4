"""Every student preset and tiny teacher: parameters, MACs and CPU forward latency.

Latency is the median seconds per record of a forward pass (eval mode, no grad) at batch 1
and batch 64, all models timed in the same run on the same threads, so their ratios are
comparable even on a noisy machine.

Run: ``python benchmarks/models.py [--threads 2] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import students  # noqa: E402
import teachers  # noqa: E402
from distill.data.render import RenderConfig, render_batch  # noqa: E402
from distill.metrics.footprint import count_macs, count_parameters, format_count, latency, signal_batch  # noqa: E402


def image_batch(batch_size: int, size: int = 224) -> dict[str, torch.Tensor]:
    signals = signal_batch(batch_size)["signal"].numpy() * 0.5
    images = render_batch(signals, 100, RenderConfig(height=size, width=size))
    return {"image": torch.from_numpy(images), "labels": torch.zeros(batch_size, 5)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [(f"student {f}/{s}", students.create(f, s, num_labels=5), signal_batch)
              for f, s in students.presets()]
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ.setdefault("ECG_DISTILL_CACHE", tmp)
        models.append(("teacher vlm/tiny", teachers.create("vlm", "tiny", num_labels=5), image_batch))
        models.append(("teacher signal/tiny", teachers.create("signal", "tiny", num_labels=5),
                       signal_batch))
        print(f"CPU, {args.threads} threads, 10-second records at 100 Hz (images 224x224)")
        print(f"{'model':<24}{'params':>10}{'MACs/rec':>11}{'ms/rec @1':>11}{'ms/rec @64':>12}")
        for name, model, make in models:
            p = count_parameters(model)
            macs = count_macs(model, make(1))
            t1 = latency(model, make, 1, repeats=args.repeats * 4)
            t64 = latency(model, make, 64, repeats=args.repeats)
            print(f"{name:<24}{format_count(p):>10}{format_count(macs):>11}"
                  f"{t1 * 1e3:>11.2f}{t64 * 1e3:>12.3f}")


if __name__ == "__main__":
    main()
