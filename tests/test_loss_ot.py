"""OT lead matching: against POT (sinkhorn, sinkhorn2, emd2), marginals, gradients, lead
prior, padding, batch-versus-loop, and numerical safety at small reg and large scale."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from torch.func import functional_call

from distill.losses import build_loss
from distill.losses.transport import (
    OTLeadMatching,
    _sinkhorn_no_graph,
    lead_prior_cost,
    log_marginal,
)
from distill.modeling import ECGModelOutput


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
    """No-graph path (one exp per iteration) = autograd path = exact lse every iteration."""
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
    u0 = torch.where(torch.isneginf(log_a), log_a, torch.zeros_like(log_a))
    exact, _, _ = _sinkhorn_no_graph(-cost / 0.02, u0, log_a, log_b, 40, floor=float("inf"))
    torch.testing.assert_close(exact, fast.aux["plan"], rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- gradients


def gradcheck_through_projections(grad: str, output: str, iters: int, reg: float) -> None:
    """gradcheck in float64 through the student tokens and the student projection (the
    teacher tokens are a detached target)."""
    loss = OTLeadMatching(2, 3, dim=3, reg=reg, iters=iters, grad=grad, lead_prior=0.3).double()
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


def test_gradcheck_envelope_is_the_gradient_of_the_regularised_objective() -> None:
    """``grad="envelope"`` (default): ∂/∂C = P*, the gradient of OT_ε at its optimum."""
    gradcheck_through_projections("envelope", "objective", iters=400, reg=0.5)


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
