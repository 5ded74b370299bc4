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


def _objectives(fmt_name: str, t_dim: int, pool: str = "none"):
    """The objective on full tokens and on ``fmt_name``'s, with the same parameters."""
    from distill.engine.jobs import TEACHER_FORM
    from distill.losses.objective import build_objective

    weights = {"kd": 1.0, "mhca": 0.0, "ot": 1.0, "relation": 1.0}
    ot = {"dim": 4, "teacher_pool": pool}
    torch.manual_seed(0)
    full = build_objective(0.5, weights, 6, 8, ot=ot)
    reduced = build_objective(0.5, weights, 6, t_dim, teacher_form=TEACHER_FORM[fmt_name],
                              ot=ot)
    reduced.losses["ot"].student_proj.load_state_dict(full.losses["ot"].student_proj.state_dict())
    return full, reduced


def _student(seed: int = 0):
    from distill.core.contract import ECGModelOutput

    g = torch.Generator().manual_seed(seed)
    return ECGModelOutput(tokens=torch.randn(N, 5, 6, generator=g),
                          token_leads=torch.tensor([0, 1, 2, -1, 1]),
                          pooled=torch.randn(N, 6, generator=g),
                          logits=torch.randn(N, 2, generator=g))


def _terms(objective, student, teacher):
    labels = torch.zeros(N, 2)
    return objective(student, teacher, {"labels": labels}).terms


def test_ot_and_relation_read_projected_tokens_as_the_full_ones(tmp_path) -> None:
    """cached_tokens: projected leaves ot (and relation on its barycentres, and kd) where
    the full tokens put them: the stored map is ot's fixed map."""
    fmt = TokenFormat("projected", dim=4, seed=5)
    full_entry = _entry(tmp_path, TokenFormat(), "fp16")
    proj_entry = _entry(tmp_path, fmt, "proj")
    full, reduced = _objectives("projected", 4)
    with torch.no_grad():
        full.losses["ot"].teacher_proj.weight.copy_(torch.from_numpy(proj_entry.projection))
    rows = slice(None)
    a = _terms(full, _student(), cached_teacher_output(_batch(full_entry, rows),
                                                       full_entry.token_leads))
    b = _terms(reduced, _student(), cached_teacher_output(_batch(proj_entry, rows),
                                                          proj_entry.token_leads))
    assert set(a) == set(b) == {"task", "kd", "ot", "relation"}
    for name in a:  # the two caches round to fp16 at different points: 1e-3
        torch.testing.assert_close(b[name], a[name], rtol=2e-3, atol=2e-4, msg=name)


def test_ot_lead_pooling_reads_lead_mean_tokens_as_it_pools_live(tmp_path) -> None:
    full_entry = _entry(tmp_path, TokenFormat(), "fp16")
    lead_entry = _entry(tmp_path, TokenFormat("lead_mean"), "leads")
    full, reduced = _objectives("lead_mean", 8, pool="lead")
    with torch.no_grad():
        reduced.losses["ot"].teacher_proj.weight.copy_(full.losses["ot"].teacher_proj.weight)
    a = _terms(full, _student(), cached_teacher_output(_batch(full_entry, slice(None)),
                                                       full_entry.token_leads))
    b = _terms(reduced, _student(), cached_teacher_output(_batch(lead_entry, slice(None)),
                                                          lead_entry.token_leads))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=2e-3, atol=2e-4, msg=name)
    # where a lead has several tokens, pooling changes the term (one teacher token a lead)
    from distill.core.contract import ECGModelOutput
    from distill.losses import build_loss

    g = torch.Generator().manual_seed(2)
    teacher = ECGModelOutput(tokens=torch.randn(N, 4, 8, generator=g),
                             token_leads=torch.tensor([0, 0, 1, 1]))
    torch.manual_seed(0)
    pooled = build_loss("ot", student_dim=6, teacher_dim=8, dim=4, teacher_pool="lead")
    torch.manual_seed(0)
    every = build_loss("ot", student_dim=6, teacher_dim=8, dim=4)
    assert not torch.isclose(pooled(_student(), teacher).value, every(_student(), teacher).value)


def test_reduced_forms_are_refused_where_they_cannot_be_read() -> None:
    from distill.losses import build_loss

    with pytest.raises(ValueError, match="set distill.ot.teacher_pool: lead"):
        build_loss("ot", student_dim=6, teacher_dim=8, teacher_form="normed")
    with pytest.raises(RecipeError, match="distill.cached_tokens: lead_mean .* "
                                          "distill.ot.teacher_pool: lead"):
        recipe_from_dict({"distill": {"cached_tokens": "lead_mean", "weights": {"mhca": 0}}})
    ok = recipe_from_dict({"distill": {"cached_tokens": "lead_mean", "weights": {"mhca": 0},
                                       "ot": {"teacher_pool": "lead"}}})
    assert ok.distill.cached_tokens == "lead_mean"
