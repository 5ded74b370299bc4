"""OT lead matching: against POT (sinkhorn, sinkhorn2, emd2), marginals, gradients, lead
prior, padding, batch-versus-loop, and numerical safety at small reg and large scale."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import ot
import pytest
import torch
from torch.func import functional_call

from distill.core.contract import ECGModelOutput
from distill.losses import build_loss, loss_family, sinkhorn
from distill.losses.sinkhorn import (
    log_marginal,
    sinkhorn_log_batched,
    sinkhorn_scaling,
    squared_distances,
    zero_potentials,
)
from distill.losses.transport import OTConfig, OTLeadMatching, lead_prior_cost


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # the projections' initialisation


def tokens(batch: int, n: int, dim: int, *, seed: int, dtype: torch.dtype = torch.float64,
           scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, dim, generator=g, dtype=torch.float64).mul(scale).to(dtype)


def identity_ot(dim: int, **config) -> OTLeadMatching:
    """Identity projections, so the solver sees exactly the features' cost matrix."""
    return OTLeadMatching(dim, dim, project=False, **config).double()


def lengths_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, N)


def pot_sinkhorn(cost: np.ndarray, reg: float, iters: int, a: np.ndarray | None = None,
                 b: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """POT's log-domain Sinkhorn with exactly ``iters`` iterations: (plan, <P, C>)."""
    a = np.full(cost.shape[0], 1 / cost.shape[0]) if a is None else a
    b = np.full(cost.shape[1], 1 / cost.shape[1]) if b is None else b
    kw = {"method": "sinkhorn_log", "numItermax": iters, "stopThr": 0.0, "warn": False}
    plan = ot.sinkhorn(a, b, cost, reg, **kw)
    value = float(ot.sinkhorn2(a, b, cost, reg, **kw))
    np.testing.assert_allclose(value, (plan * cost).sum(), rtol=1e-12)
    return plan, value


# ----------------------------------------------------------------------------- against POT


@pytest.mark.parametrize("reg,iters", [(0.05, 1), (0.05, 50), (0.1, 7), (0.02, 200)])
def test_value_and_plan_equal_pot_sinkhorn_log(reg: float, iters: int) -> None:
    xs, xt = tokens(4, 6, 5, seed=0), tokens(4, 9, 5, seed=1)
    out = identity_ot(5, reg=reg, iters=iters).transport(xs, xt)
    values = []
    for r in range(4):
        plan, value = pot_sinkhorn(out.aux["cost"][r].numpy(), reg, iters)
        np.testing.assert_allclose(out.aux["plan"][r].numpy(), plan, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(out.aux["per_record"][r].item(), value, rtol=1e-5)
        values.append(value)
    np.testing.assert_allclose(out.value.item(), np.mean(values), rtol=1e-5)


def test_float32_solver_equals_pot_in_float64() -> None:
    xs, xt = tokens(3, 8, 6, seed=2), tokens(3, 12, 6, seed=3)
    cost = identity_ot(6).transport(xs, xt).aux["cost"]
    out = OTLeadMatching(6, 6, project=False).transport(xs.float(), xt.float())
    assert out.value.dtype == torch.float32 and out.aux["plan"].dtype == torch.float32
    for r in range(3):
        plan, value = pot_sinkhorn(cost[r].numpy(), 0.05, 50)
        np.testing.assert_allclose(out.aux["per_record"][r].item(), value, rtol=1e-5)
        np.testing.assert_allclose(out.aux["plan"][r].double().numpy(), plan, rtol=0,
                                   atol=1e-5 * plan.max())


def test_value_approaches_emd2_as_reg_shrinks() -> None:
    xs, xt = tokens(2, 7, 3, seed=4), tokens(2, 10, 3, seed=5)
    regs = [0.2, 0.1, 0.05, 0.02, 0.01, 0.005]
    values = np.array([identity_ot(3, reg=reg, iters=4000).transport(xs, xt).aux["per_record"]
                       .numpy() for reg in regs])  # (regs, B)
    cost = identity_ot(3).transport(xs, xt).aux["cost"].numpy()
    exact = np.array([ot.emd2(np.full(7, 1 / 7), np.full(10, 0.1), cost[r]) for r in range(2)])
    gaps = values - exact[None]  # (regs, B)
    assert (gaps > -1e-9).all(), "an entropic plan cannot beat the exact optimum"
    assert (np.diff(gaps, axis=0) <= 1e-9).all(), f"gap not shrinking with reg: {gaps}"
    np.testing.assert_allclose(values[-1], exact, rtol=0.03)
    assert (gaps[-1] < 0.25 * gaps[0]).all()


def test_plan_marginals_match_given_weights_and_masks() -> None:
    b_sz, n_s, n_t = 3, 6, 9
    xs, xt = tokens(b_sz, n_s, 4, seed=6), tokens(b_sz, n_t, 4, seed=7)
    g = torch.Generator().manual_seed(8)
    w_s = torch.rand(b_sz, n_s, generator=g, dtype=torch.float64) + 0.1
    w_t = torch.rand(b_sz, n_t, generator=g, dtype=torch.float64) + 0.1
    m_t = lengths_mask([9, 6, 4], n_t)
    out = identity_ot(4, reg=0.1, iters=500).transport(
        xs, xt, student_weights=w_s, teacher_weights=w_t, teacher_mask=m_t)
    a = w_s / w_s.sum(1, keepdim=True)
    b = w_t * m_t / (w_t * m_t).sum(1, keepdim=True)
    plan = out.aux["plan"]
    torch.testing.assert_close(plan.sum(2), a, rtol=0, atol=1e-10)
    torch.testing.assert_close(plan.sum(1), b, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------- batch vs loop


def test_batched_equals_per_record_loop_and_padding_equals_dropping() -> None:
    """Padded tokens get zero mass; each record equals the solver (and POT) on its real tokens."""
    n_s, n_t, lens_s, lens_t = 7, 10, [7, 5, 3, 6], [10, 4, 8, 6]
    xs, xt = tokens(4, n_s, 4, seed=9), tokens(4, n_t, 4, seed=10)
    leads_s, leads_t = torch.arange(n_s) % 3, torch.arange(n_t) % 4 - 1
    loss = identity_ot(4, reg=0.05, iters=30, lead_prior=0.5)
    out = loss.transport(xs, xt, student_leads=leads_s, teacher_leads=leads_t,
                         student_mask=lengths_mask(lens_s, n_s),
                         teacher_mask=lengths_mask(lens_t, n_t))
    for r, (ls, lt) in enumerate(zip(lens_s, lens_t)):
        plan = out.aux["plan"][r]
        assert plan[ls:].abs().sum() == 0 and plan[:, lt:].abs().sum() == 0
        alone = loss.transport(xs[r:r + 1, :ls], xt[r:r + 1, :lt], student_leads=leads_s[:ls],
                               teacher_leads=leads_t[:lt])
        torch.testing.assert_close(plan[:ls, :lt], alone.aux["plan"][0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(out.aux["per_record"][r], alone.value, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.aux["barycentric"][r, :ls],
                                   alone.aux["barycentric"][0], rtol=1e-12, atol=1e-14)
        pot_plan, pot_value = pot_sinkhorn(alone.aux["cost"][0].numpy(), 0.05, 30)
        np.testing.assert_allclose(plan[:ls, :lt].numpy(), pot_plan, rtol=1e-5, atol=1e-14)
        np.testing.assert_allclose(out.aux["per_record"][r].item(), pot_value, rtol=1e-5)


def test_fast_path_has_the_iterates_of_the_unrolled_and_the_exact_paths() -> None:
    """No-graph path (scaling iterations) = autograd path = exact lse every iteration."""
    xs, xt = tokens(3, 7, 4, seed=21), tokens(3, 11, 4, seed=22)
    m_s, m_t = lengths_mask([7, 4, 6], 7), lengths_mask([11, 9, 3], 11)
    loss = identity_ot(4, reg=0.02, iters=40, lead_prior=0.3)
    kw = {"student_leads": torch.arange(7) % 5 - 1, "teacher_leads": torch.arange(11) % 6 - 1,
          "student_mask": m_s, "teacher_mask": m_t}
    fast = loss.transport(xs, xt, **kw)
    loss.config.grad = "unrolled"
    unrolled = loss.transport(xs.clone().requires_grad_(), xt, **kw)
    torch.testing.assert_close(fast.aux["plan"], unrolled.aux["plan"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fast.value, unrolled.value.detach(), rtol=1e-12, atol=0)
    cost = fast.aux["cost"]
    log_a, log_b = (log_marginal(m, None, 3, m.shape[1], torch.float64, cost.device)
                    for m in (m_s, m_t))
    exact, _, _ = sinkhorn_scaling(-cost / 0.02, zero_potentials(log_a), log_a, log_b, 40,
                                   floor=float("inf"))
    torch.testing.assert_close(exact, fast.aux["plan"], rtol=1e-10, atol=1e-14)


def solve(cost: torch.Tensor, reg: float, iters: int, mask_s: torch.Tensor | None = None,
          mask_t: torch.Tensor | None = None, **kw) -> tuple[torch.Tensor, dict]:
    """``sinkhorn_scaling`` from zero potentials on [B, N, M] costs: (plan, stats)."""
    b_sz, n, m = cost.shape
    log_a = log_marginal(mask_s, None, b_sz, n, cost.dtype, cost.device)
    log_b = log_marginal(mask_t, None, b_sz, m, cost.dtype, cost.device)
    stats: dict = {}
    plan, _, _ = sinkhorn_scaling(-cost / reg, zero_potentials(log_a), log_a, log_b, iters,
                                  stats=stats, **kw)
    return plan, stats


def normalized_cost(batch: int, n: int, m: int, dim: int, seed: int) -> torch.Tensor:
    xs = torch.nn.functional.normalize(tokens(batch, n, dim, seed=seed), dim=-1)
    xt = torch.nn.functional.normalize(tokens(batch, m, dim, seed=seed + 1), dim=-1)
    return squared_distances(xs, xt)  # (B, n, m) in [0, 4], float64


@pytest.mark.parametrize("case", ["scaling", "absorbing", "fallback", "huge"])
def test_stabilised_solver_equals_pot_sinkhorn_log_on_every_path(case: str) -> None:
    """The scaling iterations, frequent absorptions (small bound), exact log-domain
    v-updates in between scaling ones (a high floor) and costs far beyond exp's range
    (C/ε ~ 4e7) all keep POT's log-domain iterates."""
    cost, reg = normalized_cost(3, 8, 13, 5, seed=32), 0.02
    kw = {"absorbing": {"bound": 2.0}, "fallback": {"floor": 3e-3}}.get(case, {})
    if case == "huge":  # unnormalised features of scale 1e3 at reg 0.01
        cost = squared_distances(tokens(3, 8, 4, seed=30, scale=1e3),
                                 tokens(3, 13, 4, seed=31, scale=1e3))
        reg = 0.01
    plan, stats = solve(cost, reg, 60, **kw)
    exact, _ = solve(cost, reg, 60, floor=float("inf"))  # the log-domain updates throughout
    if case == "scaling":
        assert stats == {"exact_v": 1, "exact_u": 0}  # one kernel, then scalings only
    elif case == "huge":
        assert stats == {"exact_v": 1, "exact_u": 1}
    elif case == "absorbing":
        assert 5 < stats["exact_u"] < 60 and stats["exact_v"] == 1
    else:
        assert 5 < stats["exact_v"] < stats["exact_u"] < 50
    # at C/ε ~ 4e7 float64 resolves the exponents to ~1e-8 only, on either path
    torch.testing.assert_close(plan, exact, rtol=1e-6 if case == "huge" else 1e-9, atol=1e-14)
    for r in range(3):
        pot_plan, pot_value = pot_sinkhorn(cost[r].numpy(), reg, 60)
        np.testing.assert_allclose(plan[r].numpy(), pot_plan, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose((plan[r] * cost[r]).sum().item(), pot_value, rtol=1e-5)


@pytest.mark.parametrize("reg", [0.05, 0.01])
def test_stabilised_solver_in_float32_equals_pot_in_float64(reg: float) -> None:
    cost = normalized_cost(4, 20, 30, 8, seed=33)
    plan, stats = solve(cost.float(), reg, 50)
    assert stats["exact_v"] == 1  # the fast path carried the iterations
    for r in range(4):
        pot_plan, pot_value = pot_sinkhorn(cost[r].numpy(), reg, 50)
        np.testing.assert_allclose((plan[r].double() * cost[r]).sum().item(), pot_value,
                                   rtol=1e-5)
        np.testing.assert_allclose(plan[r].double().numpy(), pot_plan, rtol=0,
                                   atol=1e-5 * pot_plan.max())


def test_stabilised_solver_with_padding_and_absorptions_equals_dropping_the_tokens() -> None:
    cost = normalized_cost(3, 7, 10, 4, seed=34)
    m_s, m_t = lengths_mask([7, 4, 6], 7), lengths_mask([10, 9, 3], 10)
    plan, stats = solve(cost, 0.02, 40, m_s, m_t, bound=2.0)
    assert stats["exact_u"] > 2
    exact, _ = solve(cost, 0.02, 40, m_s, m_t, floor=float("inf"))
    torch.testing.assert_close(plan, exact, rtol=1e-9, atol=1e-14)
    for r, (ls, lt) in enumerate([(7, 10), (4, 9), (6, 3)]):
        assert plan[r, ls:].abs().sum() == 0 and plan[r, :, lt:].abs().sum() == 0
        pot_plan, _ = pot_sinkhorn(cost[r, :ls, :lt].numpy(), 0.02, 40)
        np.testing.assert_allclose(plan[r, :ls, :lt].numpy(), pot_plan, rtol=1e-5, atol=1e-14)


# ----------------------------------------------------------------------------- teacher space


def orthogonal_teacher(loss: OTLeadMatching, scale: float, seed: int) -> None:
    """Give the (square) fixed teacher matrix columns orthogonal to float64 rounding."""
    g = torch.Generator().manual_seed(seed)
    n = loss.teacher_proj.weight.shape[0]
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    with torch.no_grad():
        loss.teacher_proj.weight.copy_(scale * q)
    loss.check_teacher_isometry()  # the buffer was written in place


def plain(loss: OTLeadMatching) -> OTLeadMatching:
    """A copy of ``loss`` that projects the teacher tokens to d (no teacher-space cost)."""
    direct = copy.deepcopy(loss)
    direct.teacher_isometry = lambda dtype: None
    return direct


def transport_with_grads(loss: OTLeadMatching, xs: torch.Tensor, xt: torch.Tensor, **kw):
    xs = xs.clone().requires_grad_()
    loss.zero_grad(set_to_none=True)
    out = loss.transport(xs, xt, **kw)
    out.value.backward()
    return out, xs.grad, loss.student_proj.weight.grad


def square_case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    n_s, n_t = 9, 14
    g = torch.Generator().manual_seed(40)
    kw = {"student_leads": torch.arange(n_s) % 5 - 1, "teacher_leads": torch.arange(n_t) % 6 - 1,
          "student_mask": lengths_mask([9, 6, 7], n_s),
          "teacher_mask": lengths_mask([14, 11, 5], n_t),
          "teacher_weights": torch.rand(3, n_t, generator=g, dtype=dtype) + 0.5}
    return (tokens(3, n_s, 6, seed=41, dtype=dtype), tokens(3, n_t, 16, seed=42, dtype=dtype),
            kw)


def test_teacher_space_cost_equals_the_direct_computation_in_float64() -> None:
    """d = D_t and QᵀQ = s² I: the cost computed from x̂ Q and normalize(LN(y)) equals the
    one from x̂ and normalize(LN(y) Qᵀ), and so do plan, value, barycentric, student tokens
    and the gradients."""
    loss = OTLeadMatching(6, 16, dim=16, reg=0.05, iters=60, lead_prior=0.4).double()
    orthogonal_teacher(loss, scale=1.7, seed=43)
    assert loss.teacher_isometry(torch.float64) is not None
    xs, xt, kw = square_case(torch.float64)
    out, g_x, g_w = transport_with_grads(loss, xs, xt, **kw)
    ref, r_x, r_w = transport_with_grads(plain(loss), xs, xt, **kw)
    for key in ("cost", "plan", "per_record", "barycentric", "student_tokens", "objective"):
        torch.testing.assert_close(out.aux[key], ref.aux[key], rtol=1e-10, atol=1e-12,
                                   msg=key)
    torch.testing.assert_close(g_x, r_x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_w, r_w, rtol=1e-9, atol=1e-12)
    # and the direct one is the plain formula
    teacher = torch.nn.functional.normalize(loss.teacher_proj(xt), dim=-1)
    student = torch.nn.functional.normalize(loss.student_proj(xs), dim=-1)
    torch.testing.assert_close(ref.aux["student_tokens"], student)
    prior = lead_prior_cost(kw["student_leads"], kw["teacher_leads"], 0.4).double()
    torch.testing.assert_close(ref.aux["cost"], squared_distances(student, teacher) + prior)


@pytest.mark.parametrize("dim,d_s", [(16, 6), (64, 48)])
def test_teacher_space_cost_equals_the_direct_computation_in_float32(dim: int, d_s: int) -> None:
    """With the float32 matrix ``semi_orthogonal`` draws (orthogonal to float32 rounding)."""
    loss = OTLeadMatching(d_s, dim, dim=dim, reg=0.05, iters=50, lead_prior=0.4)
    assert loss.teacher_isometry(torch.float32) is not None
    _, _, kw = square_case(torch.float32)
    xs = tokens(3, 9, d_s, seed=44, dtype=torch.float32)
    xt = tokens(3, 14, dim, seed=45, dtype=torch.float32)
    out, g_x, g_w = transport_with_grads(loss, xs, xt, **kw)
    ref, r_x, r_w = transport_with_grads(plain(loss), xs, xt, **kw)
    torch.testing.assert_close(out.aux["cost"], ref.aux["cost"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.aux["per_record"], ref.aux["per_record"], rtol=1e-5, atol=0)
    plan, ref_plan = out.aux["plan"], ref.aux["plan"]
    torch.testing.assert_close(plan, ref_plan, rtol=0, atol=1e-5 * ref_plan.max().item())
    for key in ("barycentric", "student_tokens"):
        torch.testing.assert_close(out.aux[key], ref.aux[key], rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(g_x, r_x, rtol=0, atol=1e-4 * r_x.abs().max().item())
    torch.testing.assert_close(g_w, r_w, rtol=0, atol=1e-4 * r_w.abs().max().item())


def test_teacher_space_is_used_only_for_a_square_isometry() -> None:
    assert OTLeadMatching(6, 10, dim=4).teacher_isometry(torch.float32) is None  # d < D_t
    assert OTLeadMatching(6, 4, dim=10).teacher_isometry(torch.float32) is None  # d > D_t
    # float32's QR is orthogonal to float32 rounding, not float64's
    assert OTLeadMatching(6, 8, dim=8).double().teacher_isometry(torch.float64) is None
    loss = OTLeadMatching(6, 8, dim=8)
    assert loss.teacher_isometry(torch.float32) is not None
    original = copy.deepcopy(loss.state_dict())
    with torch.no_grad():  # a changed buffer is checked again
        loss.teacher_proj.weight[0, 0] += 1e-3
    assert loss.teacher_isometry(torch.float32) is not None  # in place: not seen until ...
    loss.check_teacher_isometry()  # ... checked on request (the buffer is not trained)
    assert loss.teacher_isometry(torch.float32) is None
    perturbed = copy.deepcopy(loss.state_dict())
    loss.load_state_dict(original)  # load_state_dict checks again by itself
    assert loss.teacher_isometry(torch.float32) is not None
    loss.load_state_dict(perturbed)
    assert loss.teacher_isometry(torch.float32) is None
    xs, xt = tokens(2, 5, 6, seed=46, dtype=torch.float32), tokens(2, 7, 8, seed=47,
                                                                    dtype=torch.float32)
    out = loss.transport(xs, xt)  # the plain computation, with the perturbed matrix
    teacher = torch.nn.functional.normalize(loss.teacher_proj(xt), dim=-1)
    student = torch.nn.functional.normalize(loss.student_proj(xs), dim=-1)
    torch.testing.assert_close(out.aux["cost"], squared_distances(student, teacher))
    unrolled = OTLeadMatching(6, 8, dim=8, grad="unrolled")
    assert unrolled.teacher_isometry(torch.float32) is not None  # but only envelope uses it


def test_teacher_space_outputs_in_the_context_and_mapping() -> None:
    loss = build_loss("ot", student_dim=6, teacher_dim=8, dim=8)
    student = ECGModelOutput(tokens=tokens(3, 5, 6, seed=48, dtype=torch.float32),
                             token_leads=torch.arange(5))
    teacher = ECGModelOutput(tokens=tokens(3, 8, 8, seed=49, dtype=torch.float32),
                             token_leads=torch.arange(8) % 4)
    context: dict = {}
    out = loss(student, teacher, {}, context)
    assert context["ot.barycentric"] is out.aux["barycentric"]
    assert context["ot.plan"] is out.aux["plan"]
    as_dict = dict(out.aux)
    assert list(as_dict) == ["plan", "barycentric", "student_tokens", "cost", "per_record",
                             "objective"]
    assert all(isinstance(v, torch.Tensor) for v in as_dict.values())
    assert as_dict["student_tokens"].requires_grad and not as_dict["barycentric"].requires_grad
    teacher_proj = torch.nn.functional.normalize(loss.teacher_proj(teacher.tokens), dim=-1)
    torch.testing.assert_close(out.aux["barycentric"], 5 * out.aux["plan"] @ teacher_proj)


# ----------------------------------------------------------------------------- gradients


def gradcheck_through_projections(grad: str, output: str, iters: int, reg: float,
                                  isometry: bool = False) -> None:
    """gradcheck in float64 through the student tokens and the student projection (the
    teacher tokens are a detached target); ``isometry``: with an orthogonal teacher matrix,
    so that the cost is computed in the teacher's space."""
    loss = OTLeadMatching(2, 3, dim=3, reg=reg, iters=iters, grad=grad, lead_prior=0.3).double()
    if isometry:
        orthogonal_teacher(loss, scale=0.8, seed=50)
    assert (loss.teacher_isometry(torch.float64) is not None) == isometry
    names = [name for name, _ in loss.named_parameters()]
    leads_s, leads_t = torch.tensor([0, 1, -1]), torch.tensor([0, 1, 1, -1])

    xt = tokens(2, 4, 3, seed=12)

    def f(xs: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        student = ECGModelOutput(tokens=xs, token_leads=leads_s)
        teacher = ECGModelOutput(tokens=xt, token_leads=leads_t)
        out = functional_call(loss, dict(zip(names, params)), (student, teacher, {}))
        return out.value if output == "value" else out.aux["objective"].sum()

    inputs = (tokens(2, 3, 2, seed=11).requires_grad_(),
              *(p.detach().clone().requires_grad_() for p in loss.parameters()))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_unrolled_value() -> None:
    """``grad="unrolled"``: the exact derivative of the computed <P_K, C> after K iterations."""
    gradcheck_through_projections("unrolled", "value", iters=10, reg=0.1)


@pytest.mark.parametrize("isometry", [False, True])
def test_gradcheck_envelope_is_the_gradient_of_the_regularised_objective(isometry: bool) -> None:
    """``grad="envelope"`` (default): ∂/∂C = P*, the gradient of OT_ε at its optimum."""
    gradcheck_through_projections("envelope", "objective", iters=400, reg=0.5,
                                  isometry=isometry)


@pytest.mark.parametrize("normalize", [True, False])
def test_envelope_gradient_equals_autograd_through_the_plain_cost(normalize: bool) -> None:
    """The gradient built in the forward (P y, pulled back through the normalisation by
    hand) equals autograd of <sg(P), C> with C computed the plain way."""
    loss = OTLeadMatching(5, 7, dim=4, reg=0.05, lead_prior=0.3, normalize=normalize).double()
    xs, xt = tokens(3, 6, 5, seed=51), tokens(3, 9, 7, seed=52)
    xs[1, 2] = 0.0  # a token projected to 0: F.normalize divides by eps there
    xs.requires_grad_()
    kw = {"student_leads": torch.arange(6) % 4, "teacher_leads": torch.arange(9) % 5 - 1,
          "student_mask": lengths_mask([6, 4, 5], 6)}
    out = loss.transport(xs, xt, **kw)
    out.value.backward()
    grads = [xs.grad, loss.student_proj.weight.grad]
    xs.grad, loss.student_proj.weight.grad = None, None
    student, teacher = loss.student_proj(xs), loss.teacher_proj(xt)
    if normalize:
        student = torch.nn.functional.normalize(student, dim=-1)
        teacher = torch.nn.functional.normalize(teacher, dim=-1)
    prior = lead_prior_cost(kw["student_leads"], kw["teacher_leads"], 0.3).double()
    cost = squared_distances(student, teacher) + prior
    torch.testing.assert_close(out.aux["cost"], cost.detach())
    (out.aux["plan"] * cost).sum((1, 2)).mean().backward()
    torch.testing.assert_close(grads[0], xs.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grads[1], loss.student_proj.weight.grad, rtol=1e-10, atol=1e-13)


def test_envelope_value_gradient_is_the_plan() -> None:
    xs = tokens(2, 5, 4, seed=13).requires_grad_()
    xt = tokens(2, 6, 4, seed=14)
    out = identity_ot(4, reg=0.05).transport(xs, xt)
    out.value.backward()
    # L = mean_r <sg(P), C>, C = 2 - 2 x̂ŷᵀ; the gradient w.r.t. the normalised student is
    # -2 P ŷ / B, pulled back through the normalisation.
    xs_hat = torch.nn.functional.normalize(xs.detach(), dim=-1).requires_grad_()
    xt_hat = torch.nn.functional.normalize(xt, dim=-1)
    surrogate = (out.aux["plan"] * (2 - 2 * xs_hat @ xt_hat.transpose(1, 2))).sum((1, 2)).mean()
    (g_hat,) = torch.autograd.grad(surrogate, xs_hat)
    xs2 = xs.detach().clone().requires_grad_()
    (torch.nn.functional.normalize(xs2, dim=-1) * g_hat).sum().backward()
    torch.testing.assert_close(xs.grad, xs2.grad, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- lead prior


def test_strong_lead_prior_makes_the_plan_block_diagonal_by_lead() -> None:
    """12 leads x 2 student tokens + one -1 token; 12 x 3 teacher tokens + one -1 token."""
    leads_s = torch.cat([torch.arange(12).repeat_interleave(2), torch.tensor([-1])])  # (25,)
    leads_t = torch.cat([torch.arange(12).repeat_interleave(3), torch.tensor([-1])])  # (37,)
    xs, xt = tokens(2, 25, 8, seed=15), tokens(2, 37, 8, seed=16)
    plain = identity_ot(8, reg=0.05, iters=300).transport(xs, xt)
    strong = identity_ot(8, reg=0.05, iters=3000, lead_prior=20.0).transport(
        xs, xt, student_leads=leads_s, teacher_leads=leads_t)
    differ = (leads_s[:, None] != leads_t[None, :]) & (leads_s[:, None] >= 0) \
        & (leads_t[None, :] >= 0)  # (25, 37)
    # the prior is added on different-lead pairs only; a -1 token pays none
    torch.testing.assert_close(strong.aux["cost"] - plain.aux["cost"],
                               20.0 * differ.double()[None].expand(2, -1, -1))
    assert lead_prior_cost(leads_s, leads_t, 1.0)[-1].abs().sum() == 0
    assert lead_prior_cost(leads_s, leads_t, 1.0)[:, -1].abs().sum() == 0
    plan = strong.aux["plan"]
    total = plan.sum((1, 2))
    assert ((plan * differ).sum((1, 2)) < 1e-3 * total).all()
    assert ((plain.aux["plan"] * differ).sum((1, 2)) > 0.5 * total).all()
    torch.testing.assert_close(plan[:, :, -1].sum(1), torch.full((2,), 1 / 37, dtype=plan.dtype),
                               rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- safety


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_small_reg_large_scale_low_precision_is_finite(dtype: torch.dtype, grad: str) -> None:
    """reg 0.01, unnormalised features of scale 1e3: finite values; finite gradients in the
    default envelope mode (the unrolled backward at C/ε ~ 1e10 is not: see the module doc)."""
    xs = tokens(4, 12, 32, seed=17, dtype=dtype, scale=1e3).requires_grad_()
    xt = tokens(4, 30, 48, seed=18, dtype=dtype, scale=1e3).requires_grad_()
    loss = OTLeadMatching(32, 48, dim=16, reg=0.01, normalize=False, grad=grad, lead_prior=1.0)
    student = ECGModelOutput(tokens=xs, token_leads=torch.arange(12) % 13 - 1)
    teacher = ECGModelOutput(tokens=xt, token_leads=torch.arange(30) % 13 - 1,
                             token_mask=lengths_mask([30, 25, 12, 1], 30))
    out = loss(student, teacher, {})
    assert out.value.dtype == torch.float32 and torch.isfinite(out.value)
    for key in ("plan", "barycentric", "cost", "objective"):
        assert torch.isfinite(out.aux[key]).all(), key
    torch.testing.assert_close(out.aux["plan"].sum((1, 2)), torch.ones(4), rtol=0, atol=1e-5)
    if grad == "envelope":
        (out.value + out.aux["barycentric"].sum() + out.aux["objective"].sum()).backward()
        for t in (xs.grad, *(p.grad for p in loss.parameters())):
            assert t is not None and torch.isfinite(t).all()
        assert xt.grad is None  # the teacher is a detached target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_space_at_small_reg_large_scale_low_precision_is_finite(
        dtype: torch.dtype) -> None:
    """The same with d = D_t (the cost in the teacher's space) and normalised tokens."""
    xs = tokens(4, 12, 32, seed=17, dtype=dtype, scale=1e3).requires_grad_()
    xt = tokens(4, 30, 16, seed=18, dtype=dtype, scale=1e3)
    loss = OTLeadMatching(32, 16, dim=16, reg=0.01, lead_prior=1.0)
    assert loss.teacher_isometry(torch.float32) is not None
    student = ECGModelOutput(tokens=xs, token_leads=torch.arange(12) % 13 - 1)
    teacher = ECGModelOutput(tokens=xt, token_leads=torch.arange(30) % 13 - 1,
                             token_mask=lengths_mask([30, 25, 12, 1], 30))
    out = loss(student, teacher, {})
    assert out.value.dtype == torch.float32 and torch.isfinite(out.value)
    for key in ("plan", "barycentric", "student_tokens", "cost", "objective"):
        assert torch.isfinite(out.aux[key]).all(), key
    torch.testing.assert_close(out.aux["plan"].sum((1, 2)), torch.ones(4), rtol=0, atol=1e-5)
    (out.value + out.aux["barycentric"].sum() + out.aux["objective"].sum()).backward()
    assert torch.isfinite(xs.grad).all() and torch.isfinite(loss.student_proj.weight.grad).all()


# ----------------------------------------------------------------------------- contract


def test_forward_publishes_plan_and_barycentric_in_the_context() -> None:
    loss = build_loss("ot", student_dim=6, teacher_dim=10, dim=4)
    student = ECGModelOutput(tokens=tokens(3, 5, 6, seed=19, dtype=torch.float32),
                             token_leads=torch.arange(5))
    teacher = ECGModelOutput(tokens=tokens(3, 8, 10, seed=20, dtype=torch.float32),
                             token_leads=torch.arange(8) % 4)
    context: dict = {}
    out = loss(student, teacher, {}, context)
    plan, bary = out.aux["plan"], out.aux["barycentric"]
    assert plan.shape == (3, 5, 8) and bary.shape == (3, 5, 4) and out.value.shape == ()
    assert context["ot.plan"] is plan and context["ot.barycentric"] is bary
    teacher_proj = torch.nn.functional.normalize(loss.teacher_proj(teacher.tokens), dim=-1)
    torch.testing.assert_close(bary, 5 * plan @ teacher_proj)
    out.value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


@pytest.mark.parametrize("project", [False, True])
def test_the_inputs_are_left_unchanged(project: bool) -> None:
    xs = tokens(2, 5, 8, seed=53, dtype=torch.float32, scale=3.0)
    xt = tokens(2, 7, 8, seed=54, dtype=torch.float32, scale=3.0)
    before = (xs.clone(), xt.clone())
    OTLeadMatching(8, 8, dim=8, project=project).transport(xs.requires_grad_(), xt).value.backward()
    assert torch.equal(xs.detach(), before[0]) and torch.equal(xt, before[1])


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="reg"):
        OTLeadMatching(4, 4, reg=0)
    with pytest.raises(ValueError, match="iters"):
        OTLeadMatching(4, 4, iters=0)
    with pytest.raises(ValueError, match="grad"):
        OTLeadMatching(4, 4, grad="implicit")
    with pytest.raises(ValueError, match="equal token widths"):
        OTLeadMatching(4, 6, project=False)
    with pytest.raises(ValueError, match="no token"):
        OTLeadMatching(4, 4).transport(tokens(2, 3, 4, seed=0), tokens(2, 3, 4, seed=1),
                                       teacher_mask=lengths_mask([3, 0], 3))


def test_projections_cannot_collapse_the_loss_to_zero() -> None:
    """Trained on fresh, unrelated tokens every step, the OT term must stay near its floor:
    with learnable projections (and biases) on both sides it fell from 1.9 to 0.0 by mapping
    every token onto one point; the teacher side is now a fixed target."""
    torch.manual_seed(0)
    loss = OTLeadMatching(16, 24, dim=8, reg=0.05, iters=30)
    opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
    mean_t = torch.randn(24) * 3  # real teacher features share a large mean
    values = []
    for _ in range(300):
        student = ECGModelOutput(tokens=torch.randn(8, 10, 16), token_leads=torch.full((10,), -1))
        teacher = ECGModelOutput(tokens=torch.randn(8, 20, 24) + mean_t,
                                 token_leads=torch.full((20,), -1))
        out = loss(student, teacher, {})
        opt.zero_grad()
        out.value.backward()
        opt.step()
        values.append(out.value.item())
    first, last = sum(values[:20]) / 20, sum(values[-20:]) / 20
    assert last > 0.8 * first and last > 1.0, (first, last)
    assert not any(p.requires_grad for n, p in loss.named_parameters() if "teacher" in n)


# ----------------------------------------------------------------------------- solver module


def test_public_solver_entry_equals_pot_with_and_without_a_graph() -> None:
    """``sinkhorn_log_batched`` runs ``sinkhorn_unrolled`` on a cost that requires grad and
    ``sinkhorn_scaling`` otherwise: the same plans and potentials, POT's plans."""
    cost = normalized_cost(3, 6, 9, 4, seed=60)
    m_s = lengths_mask([6, 4, 5], 6)
    log_a = log_marginal(m_s, None, 3, 6, cost.dtype, cost.device)
    log_b = log_marginal(None, None, 3, 9, cost.dtype, cost.device)
    plan, u, v = sinkhorn_log_batched(cost, 0.05, 30, log_a, log_b)
    leaf = cost.clone().requires_grad_()
    g_plan, g_u, g_v = sinkhorn_log_batched(leaf, 0.05, 30, log_a, log_b)
    assert g_plan.requires_grad and not plan.requires_grad
    torch.testing.assert_close(plan, g_plan.detach(), rtol=1e-10, atol=1e-14)
    # the plan is exp(-C/ε + u + v) in both (a padded token has u = -inf and no mass)
    for p, uu, vv in ((plan, u, v), (g_plan.detach(), g_u.detach(), g_v.detach())):
        torch.testing.assert_close(p, (-cost / 0.05 + uu[:, :, None] + vv[:, None, :]).exp(),
                                   rtol=1e-9, atol=1e-14)
    for r, ls in enumerate([6, 4, 5]):
        pot_plan, _ = pot_sinkhorn(cost[r, :ls].numpy(), 0.05, 30)
        np.testing.assert_allclose(plan[r, :ls].numpy(), pot_plan, rtol=1e-5, atol=1e-14)
    assert torch.equal(zero_potentials(log_a).isneginf(), ~m_s)
    assert (zero_potentials(log_a)[m_s] == 0).all()


def test_solver_module_registers_no_loss() -> None:
    assert "register_loss" not in vars(sinkhorn)
    assert all(loss_family(name).cls.__module__ != sinkhorn.__name__
               for name in ("kd", "mhca", "ot", "relation"))


def test_ot_config_is_the_recipe_section_and_the_constructor_takes_its_fields() -> None:
    assert OTConfig() == OTConfig(dim=128, reg=0.05, iters=50, lead_prior=0.0, normalize=True,
                                  project=True, grad="envelope")
    family = loss_family("ot")
    assert family.config is OTConfig and family.cls is OTLeadMatching
    config = OTConfig(dim=16, reg=0.1, iters=20, lead_prior=0.2)
    torch.manual_seed(3)
    direct = OTLeadMatching(student_dim=6, teacher_dim=16, **dataclasses.asdict(config))
    torch.manual_seed(3)
    built = family.build(config, student_dim=6, teacher_dim=16)
    assert built.config == direct.config == config
    for (k, a), (_, b) in zip(direct.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"^reg: must be > 0, got 0"):
        OTConfig(reg=0)
    with pytest.raises(ValueError, match=r"^grad: must be one of 'envelope', 'unrolled'"):
        OTConfig(grad="implicit")


def test_teacher_isometry_follows_dtype_and_device_conversions() -> None:
    """The buffer replaced by ``.double()`` / ``.float()`` is checked again at first use."""
    loss = OTLeadMatching(6, 8, dim=8)
    q32, _ = loss.teacher_isometry(torch.float32)
    loss.double()  # float32 QR values, now judged in float64 rounding units
    assert loss.teacher_isometry(torch.float64) is None
    orthogonal_teacher(loss, scale=1.3, seed=61)
    q64, q_over_s = loss.teacher_isometry(torch.float64)
    assert q64 is loss.teacher_proj.weight and q64.dtype == torch.float64
    torch.testing.assert_close(q_over_s, loss.teacher_proj.weight / 1.3, rtol=1e-12, atol=0)
    loss.float()
    q, _ = loss.teacher_isometry(torch.float32)
    assert q is loss.teacher_proj.weight and q.dtype == torch.float32
    assert not torch.equal(q, q32)
