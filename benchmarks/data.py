"""Data-layer figures, measured side by side in one run (these machines are noisy).

Prints:
- generator records/s at 100 Hz (and at 100 + 500 Hz), one core, files written;
- first (WFDB decode) versus cached (memmap) load of the same folder, and the ratio;
- renderer images/s at 224x224 on one core, against matplotlib drawing the same layout;
- generation, decoding and rendering of ``--parallel-records`` records in one process
  against ``--workers`` processes (``distill.data.parallel``), and the ratios.

Run: ``python benchmarks/data.py [--records 1000] [--parallel-records 4000] [--workers N]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core for every figure below
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)

from benchmarks.render_mpl import MplRenderer  # noqa: E402
from distill.data.dataset import load_ptbxl  # noqa: E402
from distill.data.render import RenderConfig, render_batch  # noqa: E402
from distill.data.synth import generate_ptbxl  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="data-layer benchmark")
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--parallel-records", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    n = args.records
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, t100 = _timed(lambda: generate_ptbxl(tmp / "s100", n, seed=1, sampling_rates=(100,),
                                                progress=False, workers=1))
        _, tboth = _timed(lambda: generate_ptbxl(tmp / "both", n, seed=1,
                                                 sampling_rates=(100, 500), progress=False,
                                                 workers=1))
        print(f"generator, {n} records, 1 core, WFDB + csv written:")
        print(f"  100 Hz only      : {n / t100:8.0f} records/s")
        print(f"  100 Hz and 500 Hz: {n / tboth:8.0f} records/s")

        cache = tmp / "cache"
        first, t_first = _timed(lambda: load_ptbxl(tmp / "both", task="superdiagnostic",
                                                   cache_dir=cache, progress=False))
        _, t_cached = _timed(lambda: load_ptbxl(tmp / "both", task="superdiagnostic",
                                                cache_dir=cache, progress=False))
        print(f"loader, {len(first)} records at 100 Hz, superdiagnostic:")
        print(f"  first load (WFDB decode): {t_first:7.2f} s")
        print(f"  cached load (memmap)    : {t_cached:7.2f} s")
        print(f"  ratio first/cached      : {t_first / t_cached:7.1f}x")

        signals = first.signals[: args.images]
        fs = first.sampling_rate
        config = RenderConfig(height=224, width=224)
        render_batch(signals[:2], fs, config)  # geometry and paper built once, as in use
        _, t_fast = _timed(lambda: [render_batch(signals[s:s + 64], fs, config)
                                    for s in range(0, len(signals), 64)])
        mpl = MplRenderer(config, fs, signals.shape[-1])
        n_mpl = max(20, len(signals) // 10)
        _, t_slow = _timed(lambda: [mpl.render(signals[i]) for i in range(n_mpl)])
        mpl.close()
        fast, slow = len(signals) / t_fast, n_mpl / t_slow
        print(f"renderer, 224x224, {fs} Hz records, 1 core:")
        print(f"  vectorised      : {fast:8.0f} images/s")
        print(f"  matplotlib (Agg): {slow:8.1f} images/s")
        print(f"  ratio           : {fast / slow:8.1f}x")
        _parallel(tmp, args.parallel_records, args.workers)


def _parallel(tmp: Path, n: int, workers: int) -> None:
    """The data stage's three loops in one process and in ``workers`` processes."""
    from distill.data.cache import ArrayCache
    from distill.data.parallel import ENV_WORKERS
    from distill.data.render import cached_images

    config = RenderConfig(height=224, width=224)
    times = {}
    for w in (1, workers):
        os.environ[ENV_WORKERS] = str(w)
        _, t_gen = _timed(lambda: generate_ptbxl(tmp / f"p{w}", n, seed=2, sampling_rates=(100,),
                                                 progress=False))
        data, t_dec = _timed(lambda: load_ptbxl(tmp / f"p{w}", cache_dir=tmp / f"pc{w}",
                                                progress=False))
        _, t_ren = _timed(lambda: cached_images(data.signals, data.sampling_rate, config,
                                                ArrayCache(tmp / f"pc{w}"), "bench", progress=False))
        times[w] = (t_gen, t_dec, t_ren)
    os.environ.pop(ENV_WORKERS, None)
    print(f"data stage, {n} records at 100 Hz, 1 process against {workers} "
          f"({os.cpu_count()} cores; OMP_NUM_THREADS=1):")
    for k, what in enumerate(("generate (WFDB written)", "decode", "render 224x224")):
        one, many = times[1][k], times[workers][k]
        print(f"  {what:24s}: {n / one:7.0f} vs {n / many:7.0f} records/s, ratio {one / many:4.2f}x")


if __name__ == "__main__":
    main()
