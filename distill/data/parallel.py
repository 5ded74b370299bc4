"""Data preparation over several processes: synthesis, decoding and rendering.

Each of those is a loop over records whose result depends on the record alone (a
synthetic record is seeded by its ``ecg_id``, a decoded or rendered one by its file or
signal), so the loop is split into contiguous chunks that worker processes compute and the
parent writes back in order: the bytes are the same for any number of workers.

How many: :func:`data_workers` reads ``ECG_DISTILL_DATA_WORKERS`` (a number; 1 turns it
off), else uses every core for large sets (at least :data:`MIN_PER_WORKER` items a
worker) and one process for small ones, where starting workers costs more than it saves.
Workers are started with ``spawn``: a parent that already holds CUDA or a thread pool
cannot hand a broken copy of it to a forked child.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from distill.core.errors import DataError

__all__ = ["ENV_WORKERS", "MIN_PER_WORKER", "data_workers", "chunk_size", "chunk_ranges", "map_chunks"]

ENV_WORKERS = "ECG_DISTILL_DATA_WORKERS"
MIN_PER_WORKER = 2000  # items; below this a worker's start (imports) outweighs its share

R = TypeVar("R")


def data_workers(n_items: int, requested: int | None = None,
                 min_per_worker: int = MIN_PER_WORKER) -> int:
    """Processes to use for ``n_items`` items: ``requested`` when given, else the
    environment's ``ECG_DISTILL_DATA_WORKERS``, else one per core while each gets at
    least ``min_per_worker`` items (always at least 1)."""
    if requested is None:
        env = os.environ.get(ENV_WORKERS, "").strip()
        if env:
            try:
                requested = int(env)
            except ValueError:
                raise DataError(f"{ENV_WORKERS}={env!r}: expected a whole number of processes") from None
    if requested is not None:
        if requested < 1:
            raise DataError(f"data workers must be at least 1, got {requested}")
        return max(1, min(requested, n_items))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, n_items // min_per_worker))


def chunk_size(n_items: int, workers: int, most: int) -> int:
    """Items per task: about four tasks a worker (so a slow chunk does not hold the rest
    back), at most ``most`` (what one task holds in memory), at least 1."""
    return max(1, min(most, -(-n_items // (4 * max(workers, 1)))))


def chunk_ranges(n_items: int, chunk: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` ranges of at most ``chunk`` items covering ``range(n_items)``."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    return [(s, min(s + chunk, n_items)) for s in range(0, n_items, chunk)]


def map_chunks(fn: Callable[..., R], tasks: Sequence[tuple[Any, ...]], workers: int) -> Iterator[R]:
    """``fn(*task)`` for each task, in the tasks' order, over ``workers`` processes
    (in this process when ``workers`` is 1). ``fn`` must be a module-level function and
    the tasks picklable; an exception in a worker is raised here."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield fn(*task)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(_call, [(fn, task) for task in tasks])


def _call(job: tuple[Callable[..., R], tuple[Any, ...]]) -> R:
    fn, task = job
    return fn(*task)
