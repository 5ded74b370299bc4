"""Data preparation over worker processes gives the same bytes as one process."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from distill.data.cache import ArrayCache
from distill.data.dataset import load_ptbxl
from distill.data.parallel import ENV_WORKERS, MIN_PER_WORKER, chunk_ranges, data_workers
from distill.data.render import RenderConfig, cached_images
from distill.data.synth import generate_ptbxl
from distill.core.errors import DataError


def _tree_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_data_workers_choice(monkeypatch) -> None:
    monkeypatch.delenv(ENV_WORKERS, raising=False)
    assert data_workers(MIN_PER_WORKER - 1) == 1  # a small set stays in one process
    assert data_workers(10, requested=4) == 4
    assert data_workers(3, requested=8) == 3  # never more workers than items
    monkeypatch.setenv(ENV_WORKERS, "2")
    assert data_workers(10) == 2
    monkeypatch.setenv(ENV_WORKERS, "many")
    with pytest.raises(DataError, match=ENV_WORKERS):
        data_workers(10)
    with pytest.raises(DataError, match="at least 1"):
        data_workers(10, requested=0)
    assert chunk_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_synthesis_decoding_and_rendering_match_one_process(tmp_path, monkeypatch) -> None:
    """Two workers write byte-identical files, decode the same store and render the same
    images as one process (the records' seeds depend on their ids alone)."""
    out = {}
    for workers in (1, 2):
        monkeypatch.setenv(ENV_WORKERS, str(workers))
        folder = tmp_path / f"w{workers}"
        summary = generate_ptbxl(folder, 24, seed=3, sampling_rates=(100,), progress=False,
                                 first_patient_id=50)
        data = load_ptbxl(folder, sampling_rate=100, cache_dir=tmp_path / f"cache{workers}",
                          progress=False)
        images = cached_images(data.signals, 100, RenderConfig(height=64, width=64),
                               ArrayCache(tmp_path / f"cache{workers}"), f"k{workers}", progress=False)
        out[workers] = (_tree_digest(folder), summary["fold_sizes"], np.asarray(data.store),
                        np.asarray(images))
    files1, folds1, store1, images1 = out[1]
    files2, folds2, store2, images2 = out[2]
    assert files1 == files2 and len(files1) == 2 + 2 * 24  # csvs, then .hea/.dat per record
    assert folds1 == folds2
    np.testing.assert_array_equal(store1, store2)
    np.testing.assert_array_equal(images1, images2)
    assert images1.shape == (len(store1), 3, 64, 64) and images1.std() > 0


def test_bad_record_error_crosses_the_worker_boundary(tmp_path, monkeypatch) -> None:
    """A truncated record in a worker's chunk stops the load with the record's one-line error."""
    folder = tmp_path / "set"
    generate_ptbxl(folder, 8, seed=0, sampling_rates=(100,), progress=False, workers=1)
    dat = next(iter(sorted(folder.rglob("*.dat"))))
    dat.write_bytes(dat.read_bytes()[:100])
    monkeypatch.setenv(ENV_WORKERS, "2")
    with pytest.raises(DataError, match=dat.stem):
        load_ptbxl(folder, sampling_rate=100, cache_dir=tmp_path / "cache", progress=False)
