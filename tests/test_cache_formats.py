"""Smaller cached teacher tokens (issue 22): int8 with per-token scales, the tokens after
ot's fixed projection, per-lead means; their sizes, contents and keys."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cache_fixtures import BATCH, KEY, N, Records, Teacher  # noqa: E402

from distill.core.errors import ECGDistillError, RecipeError  # noqa: E402
from distill.engine.jobs import cached_teacher_output, token_format  # noqa: E402
from distill.engine.teacher_cache import (PREFIX, TokenFormat, fill_shard,  # noqa: E402
                                          join_shards, lead_means, teacher_outputs)
from distill.recipe import recipe_from_dict  # noqa: E402


def _inputs(batch):
    return {"signal": batch["x"]}


def _entry(tmp: Path, fmt: TokenFormat, name: str):
    return teacher_outputs(Teacher(), Records(), _inputs, key=f"{KEY}-{name}", cache_dir=tmp,
                           batch_size=BATCH, progress=False, fmt=fmt)


def _batch(entry, rows=slice(0, 5)):
    return {k: torch.from_numpy(np.array(v[rows])) for k, v in entry.extras().items()}


def _live():
    """The teacher's tokens as the fill computes them (batch by batch: the toy teacher's
    output depends on its batch)."""
    teacher, x = Teacher(), Records().x
    with torch.no_grad():
        return type("Out", (), {"tokens": torch.cat([teacher(x[i:i + BATCH]).tokens
                                                     for i in range(0, N, BATCH)])})


def test_int8_tokens_are_half_the_size_and_within_a_step_of_each_tokens_peak(tmp_path) -> None:
    full = _entry(tmp_path, TokenFormat(), "fp16")
    small = _entry(tmp_path, TokenFormat("int8"), "int8")
    assert small.tokens.dtype == np.int8 and small.token_scale.shape == (N, 3)
    assert small.tokens.nbytes * 2 == full.tokens.nbytes
    live = _live().tokens
    got = cached_teacher_output(_batch(small, slice(None)), small.token_leads).tokens
    peak = live.abs().amax(-1, keepdim=True)
    assert ((got - live).abs() <= peak / 254 + 1e-6).all()  # half a quantization step
    assert not torch.equal(got, live)  # (it is a quantization)


def test_projected_tokens_are_the_ot_terms_fixed_map_of_the_teacher_tokens(tmp_path) -> None:
    fmt = TokenFormat("projected", dim=4, seed=3)
    entry = _entry(tmp_path, fmt, "proj")
    assert entry.tokens.shape == (N, 3, 4) and entry.token_format == "projected"
    p = fmt.projection(8)
    np.testing.assert_array_equal(entry.projection, p.numpy())
    live = _live().tokens
    expected = F.layer_norm(live, (8,)) @ p.T
    torch.testing.assert_close(torch.from_numpy(np.array(entry.tokens)).float(), expected,
                               atol=2e-3, rtol=1e-3)  # fp16 storage
    # the map is the same wherever it is drawn, and the key names it
    torch.testing.assert_close(TokenFormat("projected", dim=4, seed=3).projection(8), p)
    assert fmt.key() == {"format": "projected", "dim": 4, "seed": 3}
    assert TokenFormat().key() is None  # fp16 entries keep the keys they had


def test_lead_means_pool_the_real_tokens_of_each_lead(tmp_path) -> None:
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3) ** 1.5
    mask = torch.tensor([[True, True, True, True], [True, False, False, True]])
    out, leads, kept = lead_means(tokens, [0, 0, 2, -1], mask)
    assert leads == [0, 2]
    ln = F.layer_norm(tokens, (3,))
    torch.testing.assert_close(out["tokens"][0, 0], ln[0, :2].mean(0))
    torch.testing.assert_close(out["tokens"][1, 0], ln[1, 0])  # the masked token left out
    torch.testing.assert_close(out["tokens"][0, 1], ln[0, 2])
    assert kept.tolist() == [[True, True], [True, False]]  # record 1 has no real lead-2 token
    assert (out["tokens"][1, 1] == 0).all()
    with pytest.raises(ECGDistillError, match="no token of this teacher names a lead"):
        lead_means(tokens, [-1, -1, -1, -1], None)
    entry = _entry(tmp_path, TokenFormat("lead_mean"), "leads")
    assert entry.tokens.shape == (N, 3, 8) and entry.token_leads.tolist() == [0, 1, 2]


def test_sharded_fills_store_the_formats_as_one_process_does(tmp_path) -> None:
    for fmt in (TokenFormat("int8"), TokenFormat("projected", dim=4, seed=1)):
        single = _entry(tmp_path / "one", fmt, fmt.name).folder
        entry = tmp_path / "two" / f"{PREFIX}-{KEY}-{fmt.name}"
        for rank in range(2):
            fill_shard(Teacher(), Records(), _inputs, entry, rank=rank, world=2,
                       batch_size=BATCH, fmt=fmt)
        join_shards(entry, 2, f"{KEY}-{fmt.name}", fmt)
        digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(entry.iterdir())}
        assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted(single.iterdir())}


def test_the_recipe_chooses_the_format_and_refuses_mhca_on_reduced_tokens() -> None:
    r = recipe_from_dict({"distill": {"cached_tokens": "projected", "weights": {"mhca": 0}}})
    fmt = token_format(r)
    assert (fmt.name, fmt.dim, fmt.seed) == ("projected", r.distill.losses["ot"].dim, r.seed)
    assert token_format(recipe_from_dict({})).key() is None
    with pytest.raises(RecipeError, match=r"distill.cached_tokens: projected .* set "
                                          r"distill.weights.mhca: 0"):
        recipe_from_dict({"distill": {"cached_tokens": "projected"}})
    with pytest.raises(RecipeError, match="distill.cached_tokens"):
        recipe_from_dict({"distill": {"cached_tokens": "bf16"}})


def test_the_plan_sizes_each_format_as_the_cache_writes_it(tmp_path) -> None:
    from distill.run.plan import TeacherShapes, cache_entry_bytes

    shapes = TeacherShapes(tokens=3, dim=8, pooled=8, classes=2, token_mask=True,
                           token_leads=(0, 1, 2))
    for fmt in (TokenFormat(), TokenFormat("int8"), TokenFormat("projected", dim=4, seed=0),
                TokenFormat("lead_mean")):
        entry = _entry(tmp_path, fmt, f"size-{fmt.name}")
        files = {p.name: p.stat().st_size for p in entry.folder.iterdir()}
        planned = cache_entry_bytes(shapes, N, fmt.name, d_proj=4)
        assert set(planned) == set(files), fmt.name
        for name, size in files.items():
            if name != "meta.json":  # (its key and lead list differ in length)
                assert planned[name] == size, (fmt.name, name, planned[name], size)
