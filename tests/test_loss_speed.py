"""The objective's fast paths (issue 23): each gives the values and gradients of its
reference, and the options that trade exactness for time stay off by default, out of the
recipe hashes, and within the tested agreement with POT. No timing is asserted here; the
speed is measured by ``benchmarks/losses.py`` and ``benchmarks/train.py``."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from distill.core.contract import ECGModelOutput
from distill.losses import LazyAux
from distill.losses.alignment import LAYER_NORM_KEY, MHCAAlignment, teacher_layer_norm
from distill.losses.objective import build_objective
from distill.losses.relation import RelationMatching
from distill.losses.sinkhorn import sinkhorn_log_batched, sinkhorn_scaling, zero_potentials
from distill.losses.transport import OTLeadMatching


def tokens(batch: int, n: int, dim: int, seed: int, dtype: torch.dtype = torch.float64,
           scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, dim, generator=g, dtype=dtype) * scale).requires_grad_()


def lengths_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def mhca_run(loss: MHCAAlignment, xs: torch.Tensor, xt: torch.Tensor,
             t_mask: torch.Tensor | None, s_mask: torch.Tensor | None, fused: bool
             ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(value, attention, gradients of the student tokens and every parameter) of one path."""
    loss.zero_grad(set_to_none=True)
    xs.grad = None
    z, y, attention = loss.attend(xs, xt, t_mask, fused=fused)
    per_token = (z - y).pow(2).mean(-1)  # (B, N_s)
    valid = torch.ones_like(per_token, dtype=torch.bool)
    if s_mask is not None:
        valid = valid & s_mask
    if t_mask is not None:
        valid = valid & t_mask.any(1, keepdim=True)
    value = (per_token * valid).sum() / valid.sum().clamp_min(1)
    value.backward()
    attention = attention() if callable(attention) else attention.detach()
    return value.detach(), attention, [xs.grad.clone()] + [p.grad.clone()
                                                           for p in loss.parameters()]


# ----------------------------------------------------------------------------- mhca


@pytest.mark.parametrize("student_dim", [5, 24])  # below dim: W_q W_s is fused; at/above: not
@pytest.mark.parametrize("masked", [False, True])
def test_mhca_fused_path_equals_the_explicit_formulas(student_dim: int, masked: bool) -> None:
    """Fused attention, the W_q W_s product and the lazily computed attention give the
    explicit path's value, attention and gradients (float64: to rounding)."""
    torch.manual_seed(0)
    loss = MHCAAlignment(student_dim, 20, dim=16, heads=4).double()
    xs, xt = tokens(4, 7, student_dim, seed=1), tokens(4, 9, 20, seed=2, scale=30.0)
    t_mask = s_mask = None
    if masked:  # padded teacher tokens, a record without any, padded student tokens
        t_mask = torch.stack([lengths_mask([9, 4, 0, 6], 9)[i] for i in range(4)])
        s_mask = lengths_mask([7, 3, 5, 1], 7)
    ref = mhca_run(loss, xs, xt, t_mask, s_mask, fused=False)
    fast = mhca_run(loss, xs, xt, t_mask, s_mask, fused=True)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-12, atol=1e-14)
    for g_fast, g_ref in zip(fast[2], ref[2]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


def test_mhca_fused_path_in_float32_matches_the_reference_at_the_quickstart_widths() -> None:
    torch.manual_seed(1)
    loss = MHCAAlignment(64, 256, dim=128, heads=4)
    xs = tokens(3, 40, 64, seed=3, dtype=torch.float32)
    xt = tokens(3, 49, 256, seed=4, dtype=torch.float32, scale=100.0).detach()
    ref = mhca_run(loss, xs, xt, None, None, fused=False)
    fast = mhca_run(loss, xs, xt, None, None, fused=True)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-4, atol=1e-6)
    for g_fast, g_ref in zip(fast[2], ref[2]):  # the key's bias: 0 but for rounding
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4,
                                   atol=max(1e-5 * g_ref.abs().max().item(), 1e-8))


def test_mhca_forward_uses_the_fused_path_and_attention_dropout_the_explicit_one() -> None:
    torch.manual_seed(2)
    s = ECGModelOutput(tokens=tokens(2, 5, 6, seed=5))
    t = ECGModelOutput(tokens=tokens(2, 8, 10, seed=6).detach())
    loss = MHCAAlignment(6, 10, dim=8, heads=2).double()
    out = loss(s, t, {})
    assert isinstance(out.aux, LazyAux)
    z, y, attention = loss.attend(s.tokens, t.tokens, fused=False)
    torch.testing.assert_close(out.aux["attention"], attention.detach(), rtol=1e-12, atol=1e-14)
    # with dropout in training the explicit path runs (nn.Dropout's draws), in eval the fused
    drop = MHCAAlignment(6, 10, dim=8, heads=2, dropout=0.5).double()
    drop.load_state_dict(loss.state_dict())
    torch.manual_seed(3)
    trained = drop(s, t, {}).value
    torch.manual_seed(3)
    z, y, _ = drop.attend(s.tokens, t.tokens, fused=False)
    torch.testing.assert_close(trained, (z - y).pow(2).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(drop.eval()(s, t, {}).value, out.value, rtol=1e-12, atol=0)


def test_teacher_layer_norm_is_memoised_per_tensor_and_dtype() -> None:
    xt = tokens(2, 5, 8, seed=7).detach()
    context: dict = {}
    first = teacher_layer_norm(xt, torch.float64, context)
    assert teacher_layer_norm(xt, torch.float64, context) is first
    assert context[LAYER_NORM_KEY][0] is xt
    other = xt.clone()
    assert teacher_layer_norm(other, torch.float64, context) is not first  # another batch
    assert teacher_layer_norm(other, torch.float32, context).dtype == torch.float32
    torch.testing.assert_close(first, torch.nn.functional.layer_norm(xt, (8,)))


@pytest.mark.parametrize("ot_dim", [12, 20])  # 20 = D_t: OT's teacher-space shortcut
def test_objective_with_a_shared_teacher_layer_norm_equals_the_terms_alone(ot_dim: int) -> None:
    """mhca and ot share the teacher's layer norm through the context: the objective's
    total, terms and gradients are those of each term computed on its own."""
    torch.manual_seed(4)
    objective = build_objective(0.7, {"kd": 1.0, "mhca": 1.0, "ot": 0.5, "relation": 1.0}, 6,
                                20, mhca={"dim": 8, "heads": 2}, ot={"dim": ot_dim}).double()
    xs = tokens(3, 5, 6, seed=8)
    student = ECGModelOutput(logits=tokens(3, 4, 1, seed=9)[..., 0], tokens=xs,
                             token_leads=torch.arange(5) % 12,
                             pooled=tokens(3, 6, 1, seed=10)[..., 0])
    teacher = ECGModelOutput(logits=tokens(3, 4, 1, seed=11)[..., 0].detach(),
                             tokens=tokens(3, 9, 20, seed=12, scale=50.0).detach(),
                             token_leads=torch.arange(9) % 12)
    batch = {"labels": (torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.5
                        ).double()}
    out = objective(student, teacher, batch)
    out.total.backward()
    grads = [xs.grad.clone()] + [p.grad.clone() for p in objective.parameters()]
    xs.grad = None
    objective.zero_grad(set_to_none=True)
    # each term with a context of its own (no memo), relation fed mhca's output by hand
    total = (1 - 0.7) * torch.nn.functional.binary_cross_entropy_with_logits(
        student.logits, batch["labels"])
    context: dict = {}
    for name in ["kd", "mhca", "ot", "relation"]:
        own = context if name == "relation" else {}
        value = objective.losses[name](student, teacher, batch, own).value
        if name == "mhca":
            context.update(own)
        torch.testing.assert_close(out.terms[name], value.detach(), rtol=1e-12, atol=1e-14)
        total = total + 0.7 * objective.weights[name] * value
    torch.testing.assert_close(out.total, total, rtol=1e-12, atol=1e-14)
    total.backward()
    for g, ref in zip(grads, [xs.grad] + [p.grad for p in objective.parameters()]):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-13)


def test_objective_aux_is_read_on_access_and_detached() -> None:
    torch.manual_seed(5)
    objective = build_objective(0.5, {"mhca": 1.0, "ot": 1.0}, 6, 10,
                                mhca={"dim": 8, "heads": 2}, ot={"dim": 8})
    student = ECGModelOutput(logits=torch.randn(2, 3, requires_grad=True),
                             tokens=torch.randn(2, 4, 6, requires_grad=True),
                             token_leads=torch.arange(4))
    teacher = ECGModelOutput(tokens=torch.randn(2, 7, 10), token_leads=torch.arange(7))
    out = objective(student, teacher, {"labels": torch.ones(2, 3)})
    assert isinstance(out.aux, LazyAux)
    assert set(out.aux) == {"mhca.attention", "mhca.per_record", "ot.plan", "ot.barycentric",
                            "ot.student_tokens", "ot.cost", "ot.per_record", "ot.objective"}
    assert all(not v.requires_grad for v in out.aux.values())
    torch.testing.assert_close(out.aux["mhca.attention"].sum(-1), torch.ones(2, 2, 4))
    torch.testing.assert_close(out.aux["ot.plan"].sum((1, 2)), torch.ones(2))


# ----------------------------------------------------------------------------- student_tokens


def test_mhca_student_tokens_is_the_loss_of_a_random_subset_in_training_only() -> None:
    torch.manual_seed(6)
    s = ECGModelOutput(tokens=tokens(3, 12, 6, seed=13),
                       token_mask=lengths_mask([12, 9, 5], 12))
    t = ECGModelOutput(tokens=tokens(3, 8, 10, seed=14).detach())
    full = MHCAAlignment(6, 10, dim=8, heads=2).double()
    sub = MHCAAlignment(6, 10, dim=8, heads=2, student_tokens=4).double()
    sub.load_state_dict(full.state_dict())
    context: dict = {}
    out = sub(s, t, {}, context)
    index = context["mhca.student_index"]
    assert index.shape == (4,) and bool((index.diff() > 0).all())
    assert context["mhca.attended"].shape == (3, 4, 8)
    picked = ECGModelOutput(tokens=s.tokens[:, index], token_mask=s.token_mask[:, index])
    torch.testing.assert_close(out.value, full(picked, t, {}).value, rtol=1e-12, atol=0)
    # evaluation reads every token; K >= N_s is the full loss
    torch.testing.assert_close(sub.eval()(s, t, {}).value, full(s, t, {}).value)
    every = MHCAAlignment(6, 10, dim=8, heads=2, student_tokens=12).double()
    every.load_state_dict(full.state_dict())
    torch.testing.assert_close(every(s, t, {}).value, full(s, t, {}).value)


def test_mhca_student_tokens_is_unbiased_over_draws() -> None:
    """Without padding every position is drawn alike: the mean over draws of the subset
    loss approaches the full loss."""
    torch.manual_seed(7)
    s, t = ECGModelOutput(tokens=tokens(2, 10, 6, seed=15)), \
        ECGModelOutput(tokens=tokens(2, 8, 10, seed=16).detach())
    full = MHCAAlignment(6, 10, dim=8, heads=2).double()
    sub = MHCAAlignment(6, 10, dim=8, heads=2, student_tokens=3).double()
    sub.load_state_dict(full.state_dict())
    with torch.no_grad():
        draws = torch.stack([sub(s, t, {}).value for _ in range(3000)])
        target = full(s, t, {}).value
    assert abs(draws.mean() - target) < 4 * draws.std() / np.sqrt(len(draws))


def test_relation_reads_the_subset_that_mhca_aligned() -> None:
    torch.manual_seed(8)
    s = ECGModelOutput(tokens=tokens(2, 9, 6, seed=17), token_leads=torch.arange(9))
    t = ECGModelOutput(tokens=tokens(2, 8, 10, seed=18).detach())
    mhca = MHCAAlignment(6, 10, dim=8, heads=2, student_tokens=5).double()
    context: dict = {}
    mhca(s, t, {}, context)
    index = context["mhca.student_index"]
    value = RelationMatching()(s, t, {}, context).value
    picked = ECGModelOutput(tokens=s.tokens[:, index])
    ref = RelationMatching()(picked, t, {}, {"mhca.attended": context["mhca.attended"]}).value
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=0)


def test_teacher_tokens_is_one_subset_per_batch_shared_by_mhca_and_ot() -> None:
    """mhca and ot asking for as many teacher tokens attend / transport to the same random
    positions (drawn once per batch through the context), and equal the terms on those
    tokens alone; evaluation reads every token."""
    torch.manual_seed(10)
    s = ECGModelOutput(tokens=tokens(3, 6, 5, seed=26), token_leads=torch.arange(6) % 12,
                       logits=torch.zeros(3, 1, dtype=torch.float64))
    t = ECGModelOutput(tokens=tokens(3, 12, 9, seed=27).detach(),
                       token_leads=torch.arange(12) % 12)
    objective = build_objective(1.0, {"mhca": 1.0, "ot": 1.0}, 5, 9,
                                mhca={"dim": 8, "heads": 2, "teacher_tokens": 5},
                                ot={"dim": 8, "teacher_tokens": 5}).double()
    mhca, transport = objective.losses["mhca"], objective.losses["ot"]
    context: dict = {}
    m_value = mhca(s, t, {}, context).value
    index = context["teacher.subset"][2][3]
    assert index.shape == (5,) and bool((index.diff() > 0).all())
    o_value = transport(s, t, {}, context).value
    assert context["ot.plan"].shape == (3, 6, 5)
    picked = ECGModelOutput(tokens=t.tokens[:, index], token_leads=t.token_leads[index])
    mhca.eval(), transport.eval()
    torch.testing.assert_close(m_value, mhca(s, picked, {}).value, rtol=1e-12, atol=0)
    torch.testing.assert_close(o_value, transport(s, picked, {}).value, rtol=1e-12, atol=0)
    full = objective.eval()(s, t, {"labels": torch.zeros(3, 1, dtype=torch.float64)})
    torch.testing.assert_close(full.terms["mhca"], mhca(s, t, {}).value.detach())


def test_teacher_tokens_keeps_every_token_when_a_record_would_lose_all_its_real_ones() -> None:
    from distill.losses.alignment import teacher_subset
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0] = True
    mask[1, 3] = True  # record 1 has one real token: most subsets of 4 miss it
    t = ECGModelOutput(tokens=torch.randn(2, 10, 4), token_mask=mask,
                       token_leads=torch.arange(10))
    kept = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out_tokens, out_mask, leads, index = teacher_subset(t, 4, None, training=True)
        if index is None:
            assert out_tokens is t.tokens and out_mask is mask
        else:
            kept += 1
            assert bool(out_mask.any(1).all()) and torch.equal(leads, index)
    assert 0 < kept < 20
    assert teacher_subset(t, 4, None, training=False)[3] is None
    assert teacher_subset(t, 10, None, training=True)[3] is None


# ----------------------------------------------------------------------------- ot.tol


def cost_batch(seed: int, batch: int = 3, n_s: int = 12, n_t: int = 15,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    xs = torch.nn.functional.normalize(tokens(batch, n_s, 8, seed, dtype).detach(), dim=-1)
    xt = torch.nn.functional.normalize(tokens(batch, n_t, 8, seed + 1, dtype).detach(), dim=-1)
    return torch.cdist(xs, xt).square()


def uniform(batch: int, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.full((batch, n), 1.0 / n, dtype=dtype).log()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_tol_stops_early_within_the_pot_agreement(dtype: torch.dtype) -> None:
    """With tol the solver stops before ``iters`` (after an iteration 10 k + 1) and its
    values stay within the tests' agreement with POT (rtol 1e-5): with POT's own stopThr
    run, and with POT's fixed ``iters`` iterations, converged here; tol = 0 is exactly the
    fixed-iteration solver."""
    cost, reg, iters = cost_batch(20, dtype=dtype), 0.05, 400
    log_a, log_b = uniform(3, 12, dtype), uniform(3, 15, dtype)
    k = -cost / reg
    stats: dict = {}
    plan, _, _ = sinkhorn_scaling(k, zero_potentials(log_a), log_a, log_b, iters, tol=1e-6,
                                  stats=stats)
    assert stats["iters"] < iters and (stats["iters"] - 1) % 10 == 0
    fixed, _, _ = sinkhorn_scaling(k, zero_potentials(log_a), log_a, log_b, iters)
    none, _, _ = sinkhorn_scaling(k, zero_potentials(log_a), log_a, log_b, iters, tol=0.0)
    assert torch.equal(none, fixed)
    cols = plan.sum(1).double()  # (B, N_t)
    assert bool((torch.linalg.vector_norm(cols - 1 / 15, dim=-1) < 2e-6).all())  # tol + rounding
    a, b = np.full(12, 1 / 12), np.full(15, 1 / 15)
    for r in range(3):
        c = cost[r].double().numpy()
        pot_fixed = ot.sinkhorn(a, b, c, reg, method="sinkhorn_log", numItermax=iters,
                                stopThr=0.0, warn=False)
        pot_tol = ot.sinkhorn(a, b, c, reg, method="sinkhorn_log", numItermax=iters,
                              stopThr=1e-6, warn=False)
        value = (plan[r] * cost[r]).sum().item()
        np.testing.assert_allclose(value, (pot_tol * c).sum(), rtol=1e-5)
        np.testing.assert_allclose(value, (pot_fixed * c).sum(), rtol=1e-5)
        np.testing.assert_allclose(plan[r].double().numpy(), pot_fixed, rtol=0,
                                   atol=1e-4 * pot_fixed.max())


def test_sinkhorn_tol_stops_at_the_same_iteration_on_both_paths() -> None:
    cost = cost_batch(22)
    log_a, log_b = uniform(3, 12), uniform(3, 15)
    with torch.no_grad():
        fast, _, _ = sinkhorn_log_batched(cost, 0.05, 300, log_a, log_b, tol=1e-6)
    leaf = cost.clone().requires_grad_()
    unrolled, _, _ = sinkhorn_log_batched(leaf, 0.05, 300, log_a, log_b, tol=1e-6)
    torch.testing.assert_close(fast, unrolled.detach(), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_ot_tol_is_off_by_default_and_stays_within_pot_agreement(grad: str) -> None:
    torch.manual_seed(9)
    xs, xt = tokens(3, 10, 6, seed=24), tokens(3, 14, 9, seed=25).detach()
    s = ECGModelOutput(tokens=xs, token_leads=torch.arange(10) % 12)
    t = ECGModelOutput(tokens=xt, token_leads=torch.arange(14) % 12)
    exact = OTLeadMatching(6, 9, dim=8, iters=300, grad=grad).double()
    assert exact.config.tol == 0.0
    early = OTLeadMatching(6, 9, dim=8, iters=300, grad=grad, tol=1e-7).double()
    early.load_state_dict(exact.state_dict())
    ref, out = exact(s, t, {}), early(s, t, {})
    a, b = np.full(10, 0.1), np.full(14, 1 / 14)
    for r in range(3):
        c = ref.aux["cost"][r].numpy()
        pot = ot.sinkhorn2(a, b, c, 0.05, method="sinkhorn_log", numItermax=300, stopThr=0.0,
                           warn=False)
        np.testing.assert_allclose(out.aux["per_record"][r].item(), pot, rtol=1e-5)
    torch.testing.assert_close(out.value, ref.value, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- recipe


def test_new_options_stay_out_of_the_hashes_at_their_defaults() -> None:
    from pathlib import Path

    from distill.recipe import load_recipe
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    plain = load_recipe(quickstart, ["distill.mhca.teacher_rank=0"])  # the quickstart sets 32
    explicit = load_recipe(quickstart, ["distill.mhca.student_tokens=0", "distill.ot.tol=0",
                                        "distill.mhca.teacher_tokens=0",
                                        "distill.ot.teacher_tokens=0",
                                        "distill.mhca.teacher_rank=0"])
    assert plain.distill.hash_dict() == explicit.distill.hash_dict()
    assert plain.hash_dict() == explicit.hash_dict()
    flat = str(plain.distill.hash_dict())
    assert "student_tokens" not in flat and "teacher_tokens" not in flat and "tol" not in flat
    assert "teacher_rank" not in flat
    for option in ["distill.mhca.student_tokens=64", "distill.ot.tol=1e-4",
                   "distill.mhca.teacher_tokens=49", "distill.ot.teacher_tokens=49",
                   "distill.mhca.teacher_rank=32"]:
        assert load_recipe(quickstart, ["distill.mhca.teacher_rank=0", option]
                           ).distill.hash_dict() != plain.distill.hash_dict()


# ----------------------------------------------------------------------------- relation


def relation_reference(student: torch.Tensor, teacher: torch.Tensor,
                       mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-record relation losses written out: plain distances and cosines, every
    (B, N, N) matrix weighted by the off-diagonal pairs of real tokens (smooth-L1)."""
    b, n, _ = student.shape
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    pairs = (real[:, :, None] & real[:, None, :] & ~torch.eye(n, dtype=torch.bool)).double()
    count = pairs.sum((1, 2)).clamp_min(1)

    def dist(x: torch.Tensor) -> torch.Tensor:
        d = (x[:, :, None] - x[:, None, :]).pow(2).sum(-1).clamp_min(1e-12).sqrt() * pairs
        return d / (d.sum((1, 2)) / count).clamp_min(1e-12)[:, None, None]

    def cos(x: torch.Tensor) -> torch.Tensor:
        u = torch.nn.functional.normalize(x, dim=-1)
        return u @ u.transpose(1, 2)

    loss = torch.nn.functional.smooth_l1_loss
    d = (loss(dist(student), dist(teacher), reduction="none") * pairs).sum((1, 2)) / count
    a = (loss(cos(student), cos(teacher), reduction="none") * pairs).sum((1, 2)) / count
    return d, a


@pytest.mark.parametrize("masked", [False, True])
def test_relation_without_pair_weights_equals_the_written_out_losses(masked: bool) -> None:
    from distill.losses.relation import token_relation_per_record
    xs, xt = tokens(3, 9, 5, seed=30, scale=2.0), tokens(3, 9, 7, seed=31).detach()
    mask = lengths_mask([9, 6, 1], 9) if masked else None
    d, a, has_pairs = token_relation_per_record(xs, xt, mask)
    (d + 2 * a).sum().backward()
    grad = xs.grad.clone()
    xs.grad = None
    ref_d, ref_a = relation_reference(xs, xt, mask)
    (ref_d + 2 * ref_a).sum().backward()
    torch.testing.assert_close(d, ref_d, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(a, ref_a, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, xs.grad, rtol=1e-8, atol=1e-11)
    assert has_pairs.tolist() == ([True, True, False] if masked else [True] * 3)
