"""Deployment targets side by side: each quickstart student in PyTorch fp32, bitsandbytes
int8 / nf4, and ONNX (onnxruntime) fp32 / static int8 / 4-bit weight-only: file size and
CPU latency at batch 1 and 64, every ratio against PyTorch fp32.

All variants of all students are timed in one run, interleaved (each repeat times every
variant once, in a freshly shuffled order; onnxruntime's threads do not spin between
calls, see ``distill.compress.onnx.session``), on the same threads, so their ratios hold
on a noisy machine; each figure is the median over the repeats. Latency does not depend on what the weights
learnt, so the students are freshly initialised (weights scaled as a trained model's) and
int8 is calibrated on random records; scores of trained students are the quantize
stage's (``quantized.json``, the report).

File sizes here are of these freshly initialised students; a trained student's ONNX files
can be larger (the xresnets' int8 graphs by about 20% on the quickstart: a fresh network's
batch norms fold into zero convolution biases, which the export leaves out, a trained
one's into real ones), so the sizes to quote are the quantize stage's.

Run: ``python benchmarks/deploy.py [--threads 2] [--repeats 15]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import students  # noqa: E402
from distill.compress.onnx import OnnxStudent, export_onnx, quantize_onnx  # noqa: E402
from distill.compress.quantize import QuantizeError, load_student, quantize_folder  # noqa: E402
from distill.metrics.footprint import folder_bytes  # noqa: E402

STUDENTS = (("xresnet1d", "tiny"), ("xresnet1d", "small"), ("leadformer", "tiny"))
FORMATS = ("fp32", "int8", "nf4", "onnx", "onnx-int8", "onnx-int4")
CLASSES = ["CD", "HYP", "MI", "NORM", "STTC"]


def build(root: Path, family: str, size: str, records: np.ndarray) -> dict[str, Path]:
    """Every variant folder of one student that can be made (fp32 first)."""
    torch.manual_seed(0)
    model = students.create(family, size, num_labels=5, id2label=dict(enumerate(CLASSES)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 1.0 / np.sqrt(p[0].numel()))
    base = root / f"{family}-{size}"
    model.save_pretrained(base / "fp32")
    out = {"fp32": base / "fp32"}
    for fmt in ("int8", "nf4"):
        try:
            quantize_folder(base / "fp32", fmt, base / fmt)
            out[fmt] = base / fmt
        except QuantizeError as exc:
            print(f"{family}/{size} {fmt}: not made ({exc})")
    export_onnx(base / "fp32", base / "onnx", records[:8])
    out["onnx"] = base / "onnx"
    for fmt in ("onnx-int8", "onnx-int4"):
        try:
            quantize_onnx(base / "onnx", fmt, base / fmt, records if fmt == "onnx-int8" else None)
            out[fmt] = base / fmt
        except QuantizeError as exc:
            print(f"{family}/{size} {fmt}: not made ({str(exc).split(';')[0]})")
    return out


def load(folder: Path, fmt: str, threads: int) -> torch.nn.Module:
    return OnnxStudent(folder, threads=threads) if fmt.startswith("onnx") else load_student(folder)


@torch.no_grad()
def once(model: torch.nn.Module, x: torch.Tensor, passes: int) -> float:
    """Seconds per record of ``passes`` forward passes on ``x``."""
    start = time.perf_counter()
    for _ in range(passes):
        model(signal=x)
    return (time.perf_counter() - start) / passes / len(x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per variant otherwise
    g = torch.Generator().manual_seed(0)
    records = torch.randn(64, 12, 1000, generator=g).numpy()
    x = {1: torch.from_numpy(records[:1]), 64: torch.from_numpy(records)}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {(f, s): build(Path(tmp), f, s, records) for f, s in STUDENTS}
        models = {(key, fmt): load(folder, fmt, args.threads)
                  for key, variants in folders.items() for fmt, folder in variants.items()}
        times: dict[tuple, dict[int, list[float]]] = {k: {1: [], 64: []} for k in models}
        for k, m in models.items():  # warm-up: lazy initialisation, kernel selection
            once(m, x[1], 2)
            once(m, x[64], 1)
        order = list(models)
        shuffle = np.random.default_rng(0)
        for _ in range(args.repeats):
            shuffle.shuffle(order)  # no variant always runs after the same other one
            for k in order:
                times[k][1].append(once(models[k], x[1], 10))
                times[k][64].append(once(models[k], x[64], 1))
        print(f"CPU, {args.threads} threads, 10-second 12-lead records at 100 Hz; medians of "
              f"{args.repeats} interleaved repeats; ratios against PyTorch fp32")
        print(f"{'student':<18}{'format':<11}{'file MB':>9}{'smaller':>9}"
              f"{'ms/rec b1':>11}{'vs fp32':>9}{'ms/rec b64':>12}{'vs fp32':>9}")
        for key, variants in folders.items():
            ref = {b: statistics.median(times[(key, "fp32")][b]) for b in (1, 64)}
            ref_mb = folder_bytes(variants["fp32"]) / 1e6
            for fmt in FORMATS:
                if fmt not in variants:
                    print(f"{'/'.join(key):<18}{fmt:<11}{'(not made: see above)':>40}")
                    continue
                mb = folder_bytes(variants[fmt]) / 1e6
                t = {b: statistics.median(times[(key, fmt)][b]) for b in (1, 64)}
                print(f"{'/'.join(key):<18}{fmt:<11}{mb:>9.3f}{ref_mb / mb:>8.2f}x"
                      f"{t[1] * 1e3:>11.3f}{t[1] / ref[1]:>8.2f}x"
                      f"{t[64] * 1e3:>12.3f}{t[64] / ref[64]:>8.2f}x")


if __name__ == "__main__":
    main()
