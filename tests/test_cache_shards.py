"""Sharded teacher-cache filling (issue 22): each process computes its share of the
single-process fill's batches and the main process joins the shards into one entry that is
byte for byte the single-process one."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cache_fixtures import BATCH, KEY, N, Records, Teacher  # noqa: E402

from distill.core.errors import ECGDistillError  # noqa: E402
from distill.engine.teacher_cache import (PREFIX, dealt_batches, fill_shard,  # noqa: E402
                                          join_shards, shard_folder, teacher_outputs)

REPO = Path(__file__).resolve().parent.parent


def _inputs(batch):
    return {"signal": batch["x"]}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _single(tmp: Path, records: Records | None = None) -> Path:
    out = teacher_outputs(Teacher(), records or Records(), _inputs, key=KEY, cache_dir=tmp,
                          batch_size=BATCH, progress=False)
    return out.folder


def test_batches_are_dealt_out_in_turn() -> None:
    assert dealt_batches(10, 3, 0, 2) == [[0, 1, 2], [6, 7, 8]]
    assert dealt_batches(10, 3, 1, 2) == [[3, 4, 5], [9]]
    assert dealt_batches(4, 3, 3, 4) == []  # more processes than batches: nothing to do
    every = sorted(i for r in range(3) for b in dealt_batches(23, 4, r, 3) for i in b)
    assert every == list(range(23))


@pytest.mark.parametrize("world", [2, 3, 8])
def test_joined_shards_equal_the_single_process_entry(tmp_path: Path, world: int) -> None:
    single = _single(tmp_path / "one")
    entry = tmp_path / "many" / f"{PREFIX}-{KEY}"
    for rank in range(world):  # (8 processes: two of them get no batch)
        fill_shard(Teacher(), Records(), _inputs, entry, rank=rank, world=world,
                   batch_size=BATCH)
    join_shards(entry, world, KEY)
    assert _digest(entry) == _digest(single)
    assert not list(entry.parent.glob("*.shard-*"))  # the shards are gone


def test_values_beyond_fp16_make_the_joined_entry_float32_as_one_process_does(
        tmp_path: Path) -> None:
    big = Records(scale=1.0)
    big.x[N - 1] = 1e9  # in the last batch only: one shard alone sees it
    single = _single(tmp_path / "one", big)
    assert np.load(single / "tokens.npy").dtype == np.float32
    entry = tmp_path / "many" / f"{PREFIX}-{KEY}"
    for rank in range(2):
        fill_shard(Teacher(), big, _inputs, entry, rank=rank, world=2, batch_size=BATCH)
    join_shards(entry, 2, KEY)
    assert _digest(entry) == _digest(single)


def test_a_missing_shard_stops_the_join_with_one_line(tmp_path: Path) -> None:
    entry = tmp_path / f"{PREFIX}-{KEY}"
    fill_shard(Teacher(), Records(), _inputs, entry, rank=0, world=2, batch_size=BATCH)
    with pytest.raises(ECGDistillError, match=r"shard .*shard-1-of-2 unreadable"):
        join_shards(entry, 2, KEY)
    assert not entry.exists() and shard_folder(entry, 0, 2).exists()  # nothing lost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_fill_the_entry_one_process_would(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port",
           str(_free_port()), str(REPO / "tests" / "_cache_worker.py"),
           str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"{N} records") == 2  # both processes read the joined entry
    entry = tmp_path / "two" / f"{PREFIX}-{KEY}"
    assert _digest(entry) == _digest(_single(tmp_path / "one"))
    assert not list(entry.parent.glob("*.shard-*"))
