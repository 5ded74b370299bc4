"""What the terms derive from fixed teacher outputs is kept per record (TeacherMemo), and the
envelope solves its records a block at a time: both give the values and gradients of the
plain computation (issue 23)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import distill.losses.transport as transport
from distill.core.contract import ECGModelOutput
from distill.engine.jobs import build_teacher_cache, distill_job, load_frozen_teacher, load_job_data
from distill.engine.train import fit
from distill.losses.alignment import MHCAAlignment
from distill.losses.memo import MEMO_KEY, TeacherMemo, memoised
from distill.losses.objective import build_objective
from distill.recipe import recipe_from_dict

B, N_T, D_T, RECORDS = 8, 20, 24, 30


def test_rows_are_computed_once_then_read() -> None:
    memo = TeacherMemo(RECORDS)
    table = torch.randn(RECORDS, 5, 3)
    calls = []

    def compute(index):
        def rows(positions):
            picked = index if positions is None else index[positions]
            calls.append(picked.tolist())
            return table[picked] * 2, table[picked].sum(-1)
        return rows

    first = torch.tensor([3, 7, 1])
    a, s = memo.rows("x", first, compute(first))
    again = memo.rows("x", torch.tensor([7, 3]), compute(torch.tensor([7, 3])))
    assert calls == [[3, 7, 1]] and (memo.hits, memo.misses) == (1, 1)
    torch.testing.assert_close(again[0], table[[7, 3]] * 2, rtol=0, atol=0)
    torch.testing.assert_close(again[1], table[[7, 3]].sum(-1), rtol=0, atol=0)
    torch.testing.assert_close(a, table[first] * 2, rtol=0, atol=0)
    # in a batch with records not yet stored, only those are computed (and stored)
    mixed = torch.tensor([7, 9, 1, 12])
    b, _ = memo.rows("x", mixed, compute(mixed))
    assert calls[-1] == [9, 12]
    torch.testing.assert_close(b, table[mixed] * 2, rtol=0, atol=0)
    memo.rows("x", torch.tensor([9, 12]), compute(torch.tensor([9, 12])))
    assert len(calls) == 2 and (memo.hits, memo.misses, memo.computed) == (2, 2, 5)
    assert memo.nbytes == RECORDS * (5 * 3 + 5) * 4


def test_a_changed_fixed_map_starts_the_store_again() -> None:
    memo, weight = TeacherMemo(RECORDS), torch.randn(3, 3)
    index = torch.tensor([0, 1])
    memo.rows("y", index, lambda rows: torch.ones(2, 3), guard=weight)
    out = memo.rows("y", index, lambda rows: torch.zeros(2, 3), guard=weight)
    assert out.sum() == 6  # read
    weight.mul_(2.0)  # written in place: the stored rows are stale
    assert memo.rows("y", index, lambda rows: torch.zeros(2, 3), guard=weight).sum() == 0
    assert memo.rows("y", index, lambda rows: torch.ones(2, 3),
                     guard=torch.randn(3, 3)).sum() == 6


def test_budget_copies_and_pickles() -> None:
    memo = TeacherMemo(RECORDS, budget=RECORDS * 4 * 4 - 1)  # one float short of a store
    index = torch.tensor([2])
    for expect in (1.0, 2.0):
        assert memo.rows("z", index, lambda rows: torch.full((1, 4), expect)).sum() == 4 * expect
    assert memo.nbytes == 0 and memo.misses == 2  # never stored, computed every time
    memo = TeacherMemo(RECORDS)
    memo.rows("z", index, lambda rows: torch.ones(1, 4))
    for other in (copy.deepcopy(memo), pickle.loads(pickle.dumps(memo))):
        assert other.nbytes == 0 and other.records == RECORDS and other.budget == memo.budget


def test_memoised_reads_subsets_and_leaves_other_tensors_alone() -> None:
    full = torch.randn(2, 6, 4)
    memo = TeacherMemo(RECORDS)
    context = {MEMO_KEY: (memo, torch.tensor([4, 5]), full)}
    double = lambda t: t * 2  # noqa: E731
    torch.testing.assert_close(memoised(context, full, "d", double), full * 2)
    positions = torch.tensor([1, 4])
    sub = full.index_select(1, positions)
    torch.testing.assert_close(memoised(context, sub, "d", double, subset=(sub, positions)),
                               sub * 2)
    other = torch.randn(2, 6, 4)  # not the batch's teacher tokens: computed, not stored
    torch.testing.assert_close(memoised(context, other, "d", double), other * 2)
    assert memo.hits == 1 and memo.misses == 1


def _outputs(generator, n_s, d_s, index, tokens, mask=None):
    student = ECGModelOutput(
        logits=torch.randn(B, 3, generator=generator),
        tokens=torch.randn(B, n_s, d_s, generator=generator).requires_grad_(),
        token_leads=torch.arange(n_s) % 12)
    teacher = ECGModelOutput(logits=torch.randn(B, 3, generator=generator), tokens=tokens[index],
                             token_leads=torch.arange(N_T) % 12,
                             token_mask=None if mask is None else mask[index])
    return student, teacher


@pytest.mark.parametrize("options", [
    {},  # projections to a narrower common width (the quickstart's case)
    {"ot": {"dim": D_T}, "mhca": {"dim": 8, "heads": 2}},  # ot's teacher-space shortcut
    {"mhca": {"teacher_tokens": 7, "student_tokens": 4}, "ot": {"teacher_tokens": 7}},
    {"mhca": {"dim": 8, "heads": 2, "teacher_rank": 5}},  # keys on principal coordinates
    {"relation": True},  # relation reads mhca's and ot's results
])
def test_the_objective_with_a_memo_gives_the_same_values_and_gradients(options) -> None:
    relation = options.pop("relation", False) if options else False
    configs = {"mhca": {"dim": 8, "heads": 2}, "ot": {"dim": 8, "iters": 20}, **options}
    weights = {"kd": 1.0, "mhca": 1.0, "ot": 1.0, "relation": 1.0 if relation else 0.0}
    torch.manual_seed(0)
    plain = build_objective(0.7, weights, 6, D_T, **configs)
    kept = copy.deepcopy(plain)
    memo = kept.keep_teacher_features(RECORDS)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(RECORDS, N_T, D_T, generator=g) * 5 + 2
    mask = torch.ones(RECORDS, N_T, dtype=torch.bool)
    mask[3, 12:] = False  # a record with padded teacher tokens
    for step, index in enumerate([torch.arange(B), torch.arange(B) + 3, torch.arange(B)]):
        results = []
        for objective, batch_index in ((plain, None), (kept, index)):
            s, t = _outputs(torch.Generator().manual_seed(step), 10, 6, index, tokens, mask)
            torch.manual_seed(100 + step)  # the same token subsets for both
            batch = {"labels": torch.ones(B, 3)}
            if batch_index is not None:
                batch["teacher_index"] = batch_index
            out = objective(s, t, batch)
            objective.zero_grad()
            out.total.backward()
            grads = [p.grad.clone() for p in objective.parameters() if p.grad is not None]
            results.append((out, s.tokens.grad, grads))
        (a, ga, pa), (b, gb, pb) = results
        for name in a.terms:
            torch.testing.assert_close(b.terms[name], a.terms[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
        assert len(pa) == len(pb)
        for x, y in zip(pa, pb):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)
    assert memo.misses > 0 and memo.hits > 0 and memo.nbytes > 0  # the third step read it


def test_without_record_indices_nothing_is_kept() -> None:
    objective = build_objective(0.5, {"mhca": 1.0, "ot": 1.0}, 6, D_T,
                                mhca={"dim": 8, "heads": 2}, ot={"dim": 8, "iters": 5})
    memo = objective.keep_teacher_features(RECORDS)
    tokens = torch.randn(RECORDS, N_T, D_T)
    s, t = _outputs(torch.Generator().manual_seed(0), 10, 6, torch.arange(B), tokens)
    objective(s, t, {"labels": torch.ones(B, 3)})
    assert memo.hits == memo.misses == 0 and memo.nbytes == 0


def test_blocks_of_records_solve_as_the_whole_batch(monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)  # (the envelope solves in blocks; unrolled does not)
    loss = transport.OTLeadMatching(6, 10, dim=8, iters=30, lead_prior=0.5)
    xs = torch.randn(B, 9, 6, generator=g, requires_grad=True)
    mask_s = torch.ones(B, 9, dtype=torch.bool)
    mask_s[2, 5:] = False
    mask_t = torch.ones(B, 11, dtype=torch.bool)
    mask_t[5, 4:] = False
    student = ECGModelOutput(tokens=xs, token_leads=torch.arange(9) % 12, token_mask=mask_s)
    teacher = ECGModelOutput(tokens=torch.randn(B, 11, 10, generator=g),
                             token_leads=torch.arange(11) % 12, token_mask=mask_t)
    runs = []
    for block in (1 << 40, 3 * 9 * 11 * 4, 1):  # the whole batch, 3 records, one record
        monkeypatch.setattr(transport, "SOLVE_BLOCK_BYTES", block)
        xs.grad = None
        out = loss(student, teacher, {}, {})
        out.value.backward()
        runs.append((out.aux["per_record"], out.aux["plan"], out.aux["barycentric"].detach(),
                     xs.grad.clone()))
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)


def test_solve_block_sizes() -> None:
    cpu = torch.device("cpu")
    assert transport.solve_block(240 * 196 * 4, 64, cpu) == \
        transport.SOLVE_BLOCK_BYTES // (240 * 196 * 4)
    assert transport.solve_block(32 * 49 * 4, 64, cpu) == 64  # small kernels: the whole batch
    assert transport.solve_block(10**9, 64, cpu) == 1
    assert transport.solve_block(240 * 196 * 4, 64, torch.device("meta")) == 64


def _tiny_run(tmp_path, records: int, epochs: int, **distill):
    """(recipe, job data, frozen tiny VLM teacher, its cached outputs) of a small run."""
    recipe = recipe_from_dict({
        "name": "memo", "output_dir": str(tmp_path / "runs" / "{name}"), "seed": 1,
        "data": {"synthetic": {"records": records, "seed": 0},
                 "cache_dir": str(tmp_path / "cache")},
        "teacher": {"kind": "vlm", "name_or_path": "tiny", "train_mode": "frozen"},
        "students": [{"family": "xresnet1d", "size": "tiny"}],
        "distill": {"alpha": 0.5, **distill},
        "train": {"epochs": epochs, "batch_size": 16},
    })
    jd = load_job_data(recipe, progress=False)
    teacher = load_frozen_teacher(jd, recipe.run_dir)
    return recipe, jd, teacher, build_teacher_cache(jd, teacher, progress=False)


def test_distillation_keeps_a_single_draw_cache_s_features_and_trains_the_same(tmp_path) -> None:
    recipe, jd, teacher, cache = _tiny_run(tmp_path, records=80, epochs=2,
                                           mhca={"dim": 16, "heads": 2},
                                           ot={"dim": 16, "iters": 10})
    spec = recipe.students[0]
    histories = []
    for keep in (True, False):
        job = distill_job(jd, spec, teacher, cache)
        memo = job.model.objective.teacher_memo
        assert isinstance(memo, TeacherMemo) and memo.records == len(jd.data)
        if not keep:
            job.model.objective.teacher_memo = None
        result = fit(job, recipe.train, tmp_path / f"fit-{keep}", seed=recipe.seed,
                     progress=False)
        if keep:  # 2 epochs of 3 batches of 16 (the last partial batch dropped): the
            # second epoch computed only records the first did not see (2 stores)
            assert sorted(memo._stores) == ["mhca.values.torch.float32",
                                            "ot.target.torch.float32.True"]
            assert memo.nbytes > 0 and memo.computed < 2 * 2 * 3 * 16
            assert memo.computed == 2 * int(memo._stores["ot.target.torch.float32.True"]
                                            .filled.sum())
        histories.append(result.metrics["history"])
    kept, plain = histories
    for a, b in zip(kept, plain):
        for key in ("train_loss", "train_mhca", "train_ot", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert distill_job(jd, spec, teacher, None).model.objective.teacher_memo is None  # live


# ------------------------------------------------------------------- mhca.teacher_rank


def test_key_basis_spans_the_leading_principal_directions() -> None:
    loss = MHCAAlignment(6, D_T, dim=8, heads=2, teacher_rank=5)
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(40, N_T, D_T, generator=g) * torch.linspace(3, 0.1, D_T)
    mask = torch.rand(40, N_T, generator=g) > 0.2
    kept = loss.fit_key_basis(xt, mask)
    x = torch.nn.functional.layer_norm(xt.double(), (D_T,))[mask]  # real tokens only
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    basis = loss.key_basis.double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(5, dtype=torch.float64), atol=1e-6,
                               rtol=0)  # orthonormal rows
    # the same subspace as the top right singular vectors (the projectors agree)
    torch.testing.assert_close(basis.T @ basis, vh[:5].T @ vh[:5], atol=1e-5, rtol=0)
    torch.testing.assert_close(kept, (sv[:5] ** 2).sum() / (sv ** 2).sum())
    assert bool(loss.key_basis_set)
    with pytest.raises(ValueError, match="teacher_rank between 1 and D_t - 1"):
        MHCAAlignment(6, D_T, dim=8, heads=2, teacher_rank=D_T).fit_key_basis(xt)


def test_low_rank_keys_equal_the_full_keys_on_tokens_of_that_rank() -> None:
    g = torch.Generator().manual_seed(1)
    span = torch.randn(4, D_T, generator=g, dtype=torch.float64)
    span = span - span.mean(1, keepdim=True)  # zero-mean directions: LN keeps the span
    xt = torch.randn(B, N_T, 4, generator=g, dtype=torch.float64) @ span  # rank 4
    xs = torch.randn(B, 10, 6, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    full = MHCAAlignment(6, D_T, dim=8, heads=2).double()
    torch.manual_seed(0)
    low = MHCAAlignment(6, D_T, dim=8, heads=2, teacher_rank=4).double()
    assert not MHCAAlignment(6, D_T, dim=8, heads=2, teacher_rank=D_T).low_rank_keys
    low.fit_key_basis(xt)
    state = {k: v for k, v in low.state_dict().items() if not k.startswith("key_basis")}
    assert state.keys() == full.state_dict().keys()
    for (_, a), (_, b) in zip(sorted(state.items()), sorted(full.state_dict().items())):
        torch.testing.assert_close(a, b)  # the same parameters, drawn in the same order
    (za, ya, _), (zb, yb, _) = full.attend(xs, xt), low.attend(xs, xt)
    torch.testing.assert_close(yb, ya, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(zb, za)
    ((zb - yb) ** 2).mean().backward()
    assert low.key.weight.grad is not None and low.key_basis.grad is None
    # the basis is saved with the loss and read back
    copy_ = MHCAAlignment(6, D_T, dim=8, heads=2, teacher_rank=4).double()
    copy_.load_state_dict(low.state_dict())
    assert bool(copy_.key_basis_set)
    torch.testing.assert_close(copy_.attend(xs, xt)[1], yb)


def test_a_low_rank_run_fits_its_basis_to_the_cached_training_records(tmp_path) -> None:
    recipe, jd, teacher, cache = _tiny_run(tmp_path, records=60, epochs=1,
                                           mhca={"dim": 16, "heads": 2, "teacher_rank": 6},
                                           ot={"dim": 16, "iters": 5})
    mhca = distill_job(jd, recipe.students[0], teacher, cache).model.objective.losses["mhca"]
    assert bool(mhca.key_basis_set)
    reference = MHCAAlignment(mhca.student_dim, mhca.teacher_dim, dim=16, heads=2,
                              teacher_rank=6)
    rows = sorted(jd.data.splits["train"])[:256]
    reference.fit_key_basis(torch.from_numpy(cache.tokens[rows].astype("float32")))
    torch.testing.assert_close(mhca.key_basis, reference.key_basis)
