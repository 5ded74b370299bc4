"""Optimal-transport lead matching (EVL-ECG): entropic OT between student and teacher tokens.

For every record the student's tokens x_i (i < N_s) and the teacher's tokens y_j (j < N_t)
are projected to a common width d, L2-normalised, and matched by entropic optimal transport
(Cuturi 2013, "Sinkhorn Distances")::

    C_ij = ||x̂_i - ŷ_j||² + lead_prior · [lead_s(i) ≠ lead_t(j), both ≥ 0]     (B, N_s, N_t)
    P*   = argmin_{P 1 = a, Pᵀ1 = b, P ≥ 0}  <P, C> + ε Σ_ij P_ij log P_ij
    L    = mean over records of <P, C>

with uniform marginals a, b over the real tokens (zero mass on padding, ``token_mask``) or
given weights. The plan P is returned for plotting, and the barycentric projection of the
teacher's projected tokens onto each student token, ``(P @ ŷ) / a`` (= N_s · P @ ŷ for
uniform a), is published as the teacher tokens aligned to the student's for relation
matching (``context["ot.barycentric"]``).

Solver. Sinkhorn with a fixed number of iterations, batched over records as one
(B, N_s, N_t) tensor program, with the iterates of POT's ``ot.bregman.sinkhorn_log`` (the
same updates in the same order: v first, then u, from zero potentials)::

    v ← log b − LSE_i(−C_ij/ε + u_i)        u ← log a − LSE_j(−C_ij/ε + v_j)

With a graph (``grad="unrolled"``) they are computed literally, both log-sum-exp
reductions by POT's torch backend, ``ot.backend.TorchBackend().logsumexp`` (which calls
``torch.logsumexp``). Without one (the default envelope mode) the same iterates are
computed by stabilised scaling Sinkhorn (Schmitzer 2019, "Stabilized sparse scaling
algorithms for entropy regularized transport problems"; the idea of POT's
``sinkhorn_stabilized``): u = α + log x, v = β + log y, the potentials α, β are absorbed
in a kernel K_ij = exp(−C_ij/ε + α_i + β_j) formed by one exponential pass, and an
iteration is two batched matrix-vector products, y ← b / Kᵀx and x ← a / K y, with no
exponential. The kernel is formed by an exact log-domain update (a max-shifted
log-sum-exp written in place): the first v-update, and again only when a scaling would
leave [1/big, big] (big = max float^(1/4)) or a kernel sum is too small for its
rounding to be bounded (see ``_sinkhorn_no_graph``). So the iterates are POT's to
rounding, not those of a different absorption scheme; at B = 64, N_s = 96, N_t = 196,
ε = 0.05 one exponential pass carries all 50 iterations. The plan diag(x) K diag(y) ends
on a u-update, so its rows sum to a (to rounding); K ≤ 1 and scalings ≤ big keep it
finite even where float32 cannot resolve C/ε (~1e10 for unnormalised features of scale
1e3 at ε = 0.01), where exact updates take over. The log-marginals are
``TorchBackend.log``. The solver always runs in float32 (float64 when the inputs are
float64, for gradcheck), with autocast disabled, whatever the input dtype (bfloat16
included); outputs are float32 (float64 for float64 inputs).

Cost. ||x̂||² + ||ŷ||² − 2 x̂·ŷ by one batched product, clamped at 0. When the fixed
teacher projection (``FixedTeacherProjection``: layer norm, then a matrix Q) is an
isometry onto the common space, d = D_t with QᵀQ = s² I (as ``semi_orthogonal`` draws
it; ``OTLeadMatching.teacher_isometry`` checks it to float rounding, once per value of
the buffer), then ŷ = normalize(LN(y) Qᵀ) = ỹ Qᵀ / s with ỹ = normalize(LN(y)), and
x̂·ŷ = x̃·ỹ with x̃ = normalize(x (Qᵀ W_s)ᵀ) = x̂ Q / s. The cost is then computed in the
teacher's space, the student projection and Q folded into one D_t × D_s matrix, and the
teacher tokens need no matrix product. The outputs in the common space, the barycentric
projection (P ỹ) Qᵀ / (s a) and the student tokens x̃ Qᵀ / s, are computed on first
access of ``aux`` (a read-only mapping), as is "objective" in envelope mode (it needs
the plan's entropy); the training objective reads every aux entry, which costs about
what the teacher's product saved.

Gradients: the envelope theorem by default (``grad="envelope"``). Precisely, what is
differentiated is ``<sg(P), C(θ)>``: the solver runs without a graph and the plan P is a
constant of the backward pass, so ∂L/∂C = P / B and the gradient reaches the features and
projections only through the cost. It is built in the forward (``_envelope``):
∂<P, C>/∂x̂_i = 2 r_i x̂_i − 2 (P ŷ)_i with r = P 1, where P ŷ is the barycentric
product anyway, pulled back through the normalisation by hand and attached to the
projected student tokens by a custom autograd function, so that the backward pass is one
multiplication before the projection's own. By the envelope (Danskin) theorem P* is
exactly the gradient of the regularised objective OT_ε(C) = <P*, C> + ε Σ P* log P* at
its optimum; it is *not* the full derivative of the reported value <P*, C>, which adds
ε ∇_C Σ P* log P* (that term vanishes as ε → 0 where the unregularised plan is unique).
On random normalised tokens at ε = 0.05 the two gradients have cosine ≈ 0.99 (relative
difference ≈ 0.18). Why the envelope:

* memory: unrolling keeps both log-sum-exp operands of every iteration for the backward
  pass, 2 · iters plan-sized tensors; at B = 64, N_s = 96, N_t = 196, D = d = 256,
  50 iterations, autograd saves 522 MB for this one term (measured) against 12.5 MB with
  the envelope, and it grows with the teacher's token count;
* time: unrolled forward+backward at that size is ~7x slower on CPU (0.37 s against
  0.05 s, 2 threads);
* accuracy and safety: the envelope gradient is the exact gradient of a well-defined
  objective (OT_ε) up to the solver's convergence, and it is bounded by |∂C/∂θ|. The
  unrolled one is the exact derivative of 50 truncated iterations, whose extra terms
  carry factors 1/ε per iteration: at ε = 0.01 with unnormalised features of scale 1e3
  they reach 1e34 and overflow float32, while the envelope stays finite;
* tests: ``tests/test_loss_ot.py`` gradchecks ``aux["objective"]`` (OT_ε) in envelope
  mode at convergence (verifying the claim above), and gradchecks the value itself with
  ``grad="unrolled"``, kept as the exact derivative of the computed <P_K, C> after K
  iterations, for reference comparisons on small, well-scaled problems.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from ot.backend import TorchBackend
from torch import nn

from distill.losses import LossOutput, register_loss
from distill.losses.alignment import FixedTeacherProjection

_NX = TorchBackend()
_NORM_EPS = 1e-12  # F.normalize's default eps


@dataclass
class OTConfig:
    """Configuration of the OT lead-matching loss."""

    dim: int = field(default=256, metadata={"help": "common width d of the projected tokens"})
    reg: float = field(default=0.05, metadata={"help": "entropic regularisation ε (> 0)"})
    iters: int = field(default=50, metadata={"help": "Sinkhorn iterations (fixed, >= 1)"})
    lead_prior: float = field(default=0.0, metadata={
        "help": "cost added where the two tokens' leads differ; a lead -1 token pays none"})
    normalize: bool = field(default=True, metadata={
        "help": "L2-normalise the projected tokens before the squared distance"})
    project: bool = field(default=True, metadata={
        "help": "learnable nn.Linear projections to dim; False = identity (needs equal widths)"})
    grad: Literal["envelope", "unrolled"] = field(default="envelope", metadata={
        "help": "envelope: gradient P·∂C (plan held fixed); unrolled: autograd through iters"})

    def __post_init__(self) -> None:
        if self.reg <= 0:
            raise ValueError(f"ot: reg must be > 0, got {self.reg}")
        if self.iters < 1:
            raise ValueError(f"ot: iters must be >= 1, got {self.iters}")
        if self.lead_prior < 0:
            raise ValueError(f"ot: lead_prior must be >= 0, got {self.lead_prior}")
        if self.dim < 1:
            raise ValueError(f"ot: dim must be >= 1, got {self.dim}")
        if self.grad not in ("envelope", "unrolled"):
            raise ValueError(f"ot: grad must be 'envelope' or 'unrolled', got {self.grad!r}")


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances per record.

    Args:
        x: [B, N, d]; y: [B, M, d].

    Returns:
        [B, N, M], clamped at 0 against cancellation.
    """
    xx = x.pow(2).sum(-1)  # (B, N)
    yy = y.pow(2).sum(-1)  # (B, M)
    return (xx[:, :, None] + yy[:, None, :] - 2.0 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0)


def lead_prior_cost(student_leads: torch.Tensor, teacher_leads: torch.Tensor,
                    prior: float) -> torch.Tensor:
    """The lead prior: ``prior`` where both tokens have a lead (>= 0) and the leads differ.

    Args:
        student_leads: [N_s] int, lead 0..11 or -1; teacher_leads: [N_t] likewise.
        prior: the added cost.

    Returns:
        [N_s, N_t] float cost (0 for any pair with a -1 token).
    """
    s, t = student_leads[:, None], teacher_leads[None, :]
    differ = (s != t) & (s >= 0) & (t >= 0)  # (N_s, N_t)
    return differ.to(torch.get_default_dtype()) * prior


def log_marginal(mask: torch.Tensor | None, weights: torch.Tensor | None, batch: int,
                 n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Log of a record's token masses: uniform (or ``weights``) over real tokens, -inf on padding.

    Args:
        mask: [B, n] bool, True = real token, or None (all real).
        weights: [B, n] non-negative, or None (uniform); renormalised to sum 1 per record.
        batch, n, dtype, device: shape and placement of the result.

    Returns:
        [B, n] log-masses, each record summing to 1 in mass.

    Raises:
        ValueError: if a record has no mass (every token padded, or zero weights).
    """
    w = torch.ones(batch, n, dtype=dtype, device=device)
    if weights is not None:
        w = w * weights.detach().to(device=device, dtype=dtype)
    if mask is not None:
        w = w * mask.to(device=device, dtype=dtype)
    total = w.sum(-1, keepdim=True)  # (B, 1)
    if not bool((total > 0).all()):
        raise ValueError("ot: a record has no token with positive mass (all padded?)")
    return _NX.log(w / total)


def sinkhorn_log_batched(cost: torch.Tensor, reg: float, iters: int, log_a: torch.Tensor,
                         log_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn (Cuturi 2013) on a batch of cost matrices, fixed iterations.

    Same updates, order and start as POT's ``sinkhorn_log`` (v first, from zero potentials;
    a massless token starts at -inf, so it never takes part). Differentiable by autograd
    through the iterations when ``cost`` requires grad (``_sinkhorn_unrolled``); otherwise
    the same iterates are computed by ``_sinkhorn_no_graph``, stabilised scaling
    iterations without an exponential per iteration.

    Args:
        cost: [B, N_s, N_t] float32 or float64.
        reg: entropic regularisation ε.
        iters: number of (v, u) update pairs, >= 1.
        log_a: [B, N_s] log source masses (-inf = no mass); log_b: [B, N_t] target.

    Returns:
        (plan [B, N_s, N_t], u [B, N_s], v [B, N_t]): the plan exp(−C/ε + u + v) and the log
        scalings (dual potentials divided by ε).
    """
    k = -cost / reg  # (B, N_s, N_t) log-kernel
    # zero potentials as in POT, but -inf on massless (padded) tokens from the start, so that
    # the first v-update already ignores them: padding then equals dropping the tokens
    u = torch.where(torch.isneginf(log_a), log_a, torch.zeros_like(log_a))  # (B, N_s)
    if cost.requires_grad and torch.is_grad_enabled():
        return _sinkhorn_unrolled(k, u, log_a, log_b, iters)
    return _sinkhorn_no_graph(k, u, log_a, log_b, iters)


def _sinkhorn_unrolled(k: torch.Tensor, u: torch.Tensor, log_a: torch.Tensor,
                       log_b: torch.Tensor, iters: int) -> tuple[torch.Tensor, ...]:
    """Plain log-domain iterations with ``TorchBackend.logsumexp``, recorded by autograd."""
    k_t = k.transpose(1, 2).contiguous()  # (B, N_t, N_s): both reductions on the last axis
    for _ in range(iters):
        v = log_b - _NX.logsumexp(k_t + u[:, None, :], axis=2)  # (B, N_t)
        row = k + v[:, None, :]  # (B, N_s, N_t)
        u = log_a - _NX.logsumexp(row, axis=2)  # (B, N_s)
    # P = a · softmax_j(−C/ε + v), i.e. exp(−C/ε + u + v) with the last u-update folded in:
    # rows sum to a exactly and P ≤ a, even where float32 cannot resolve C/ε (~1e10).
    return torch.softmax(row, dim=2) * log_a.exp()[:, :, None], u, v


def _accepted(mass: torch.Tensor, floor: float, big: float) -> tuple[torch.Tensor, ...]:
    """Bounds [lo, hi] within which a kernel sum s of a token of mass m is trusted and its
    scaling m / s kept: s ≥ ``floor`` (accurate, see ``_sinkhorn_no_graph``) and
    1/big ≤ m / s ≤ big. A massless token (padding) always passes (lo = -1, hi = inf)."""
    real = mass > 0
    lo = torch.where(real, (mass / big).clamp_min(floor), -1.0)
    hi = torch.where(real, mass * big, math.inf)
    return lo, hi


def _inside(sums: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Whether every sum lies in [lo, hi] (False for a NaN)."""
    return torch.equal(sums.clamp(lo, hi), sums)


def _sinkhorn_no_graph(k: torch.Tensor, u: torch.Tensor, log_a: torch.Tensor,
                       log_b: torch.Tensor, iters: int, floor: float | None = None,
                       bound: float | None = None,
                       stats: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
    """The same iterates without a graph: stabilised scaling Sinkhorn (Schmitzer 2019).

    The log-scalings are split as u = α + log x, v = β + log y: the potentials α, β are
    absorbed in a kernel K_ij = exp(k_ij + α_i + β_j), formed with one exponential pass,
    and an iteration updates only the scalings, by two batched matrix-vector products:

        y ← b / (Kᵀ x)        x ← a / (K y)

    (v_j = log b_j − LSE_i(k_ij + u_i) = β_j + log (b_j / Σ_i K_ij x_i), and likewise for u).
    The kernel is formed (absorption) by an exact update instead of a scaling one:

    * an exact v-update, as the first one (no kernel yet) and whenever a column sum Kᵀx
      is below n_s · floor: the max-shifted log-sum-exp over i of k_ij + u_i written in
      place, E_ij = exp(k_ij + u_i − m_j), s_j = Σ_i E_ij, v_j = log b_j − m_j − log s_j;
      then K = E (α = u, β = −m, x = 1, y = b/s), so K_ij ≤ 1;
    * an exact u-update whenever a scaling of the iteration would leave [1/big, big]
      (big = e^bound, bound = log(max float)/4 by default: nothing overflows) or a row sum
      K y is below n_t · floor: the same over j of k_ij + v_j, E_ij = exp(k_ij + v_j − m_i),
      s_i = Σ_j E_ij, u_i = log a_i − m_i − log s_i; then K = E · a/s, the plan
      exp(k + u + v) itself (α = u, β = v, x = y = 1), so K_ij ≤ a_i ≤ 1.

    Why the floor: K's entries are exact to a relative eps down to the smallest normal
    number (tiny) and off by at most tiny below it, so a sum Σ K_ij x_i over n terms with
    x ≤ big is off by at most n · tiny · big + eps · sum: the default floor tiny · big / eps
    keeps every accepted sum exact to about 2 eps. ``floor=inf`` takes the exact
    (log-domain) updates every iteration, ``bound=0`` absorbs at every u-update.
    ``stats``, if given, receives the number of exact v- and u-updates ("exact_v",
    "exact_u"; the rest were scaling updates).
    """
    info = torch.finfo(k.dtype)
    big = math.exp(math.log(info.max) / 4 if bound is None else bound)
    if floor is None:
        floor = info.tiny * big / info.eps
    n_s, n_t = k.shape[1], k.shape[2]
    a, b = log_a.exp()[:, None, :], log_b.exp()[:, None, :]  # (B, 1, N_s), (B, 1, N_t)
    lo_b, hi_b = _accepted(b, n_s * floor, big)  # (B, 1, N_t)
    lo_a, hi_a = _accepted(a, n_t * floor, big)  # (B, 1, N_s)
    floor_b = torch.where(b > 0, n_s * floor, -1.0)  # (B, 1, N_t)
    # a massless token's sum may be 0: divide by at least tiny (0 / tiny = 0)
    pad_a, pad_b = not bool((a > 0).all()), not bool((b > 0).all())
    kern = torch.empty_like(k)  # (B, N_s, N_t) K = exp(k + α + β); at the end the plan
    col, row = torch.empty_like(b), torch.empty_like(a)  # Kᵀx, K y
    alpha, beta = u, log_b  # (B, N_s), (B, N_t) absorbed potentials (beta: set at once)
    x, y = torch.ones_like(a), torch.ones_like(b)  # (B, 1, N_s), (B, 1, N_t) scalings
    ones_x = ones_y = True  # the scalings are all 1
    formed = False  # a kernel exists
    zero_start = not bool(u.any())  # u = 0: no padded student token
    exact_v = exact_u = 0
    for _ in range(iters):
        v = None  # set when the u-update is to be exact
        exact = not formed
        if formed:
            torch.bmm(x, kern, out=col)  # (B, 1, N_t) Σ_i K_ij x_i
            if _inside(col, lo_b, hi_b):
                y = torch.div(b, col.clamp_min(info.tiny) if pad_b else col)
                ones_y = False
            elif bool((col >= floor_b).all()):  # exact, but a scaling leaves [1/big, big]
                v = beta + torch.log(b / col.clamp_min(info.tiny))[:, 0]
            else:
                exact = True
        if exact:  # exact v-update, forming the kernel
            exact_v += 1
            arg = k  # from zero potentials, k + u = k
            if formed or not zero_start:
                alpha = alpha if ones_x else alpha + x[:, 0].log()  # u
                arg = torch.add(k, alpha[:, :, None], out=kern)
            shift = arg.amax(1, keepdim=True)  # (B, 1, N_t)
            shift.masked_fill_(torch.isinf(shift), 0.0)  # as torch.logsumexp
            s = torch.sub(arg, shift, out=kern).exp_().sum(1, keepdim=True)  # (B, 1, N_t) >= 1
            beta, x, y = -shift[:, 0], torch.ones_like(a), b / s
            ones_x, ones_y, formed = True, False, True
        if v is None:
            torch.bmm(y, kern.transpose(1, 2), out=row)  # (B, 1, N_s) Σ_j K_ij y_j
            if _inside(row, lo_a, hi_a):
                x = torch.div(a, row.clamp_min(info.tiny) if pad_a else row)
                ones_x = False
                continue
            v = beta + y[:, 0].log()  # (B, N_t)
        # exact u-update, forming the kernel: it becomes the current plan
        exact_u += 1
        torch.add(k, v[:, None, :], out=kern)
        shift = kern.amax(2, keepdim=True)  # (B, N_s, 1)
        s = kern.sub_(shift).exp_().sum(2)  # (B, N_s), >= 1
        alpha, beta = log_a - (s.log() + shift[..., 0]), v
        kern.mul_((a[:, 0] / s)[:, :, None])
        x, y = torch.ones_like(a), torch.ones_like(b)
        ones_x = ones_y = True
    if stats is not None:
        stats.update(exact_v=exact_v, exact_u=exact_u)
    # P = diag(x) K diag(y); after a scaling u-update x = a / (K y): the rows sum to a
    if not ones_y:
        kern.mul_(y)
        beta = beta + y[:, 0].log()
    if not ones_x:
        kern.mul_(x.transpose(1, 2))
        alpha = alpha + x[:, 0].log()
    return kern, alpha, beta


class _EnvelopeValue(torch.autograd.Function):
    """Identity on a per-record value [B] whose gradient with respect to ``x`` [B, N, d] is
    given: d value_b / d x_b = ``grad``_b."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: torch.Tensor,
                grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None, None], None, None


def _neg_entropy(plan: torch.Tensor) -> torch.Tensor:
    """Σ_ij P_ij log P_ij per record [B] of a plan without a graph (0 log 0 = 0: a zero
    entry times a finite log)."""
    tiny = torch.finfo(plan.dtype).tiny
    return plan.clamp_min(tiny).log_().mul_(plan).sum((1, 2))


def _normalized(x: torch.Tensor, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.normalize(x, dim=-1)`` (in place if asked; no graph) and its squared norms,
    |x|² / max(|x|, eps)²: 1 to rounding, or below 1 for a vector shorter than eps."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
    safe = norm.clamp_min(_NORM_EPS)
    x = x.div_(safe) if inplace else x / safe
    return x, (norm / safe).square_()[..., 0]


def _project(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Apply an ``nn.Linear`` (or identity) in ``dtype`` whatever the parameters' dtype."""
    x = x.to(dtype)
    if isinstance(layer, nn.Linear):
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return F.linear(x, layer.weight.to(dtype), bias)
    return layer(x)


class _Aux(Mapping[str, torch.Tensor]):
    """The loss's named outputs: a read-only mapping in which an entry given as a
    zero-argument function is computed on first access, then kept."""

    def __init__(self, entries: dict[str, torch.Tensor | Callable[[], torch.Tensor]]) -> None:
        self._entries = entries

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._entries[key]
        if not isinstance(value, torch.Tensor):
            value = self._entries[key] = value()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._entries)})"


def _out_of_autocast(fn: Callable[..., torch.Tensor],
                     *args: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``fn(*args)`` for later, run with autocast off and autograd on (as in the forward)."""

    def run() -> torch.Tensor:
        with torch.autocast(device_type=args[0].device.type, enabled=False), torch.enable_grad():
            return fn(*args)

    return run


@register_loss("ot")
class OTLeadMatching(nn.Module):
    """Optimal-transport lead matching between student and teacher tokens (EVL-ECG).

    Args:
        student_dim: D_s, width of the student's tokens.
        teacher_dim: D_t, width of the teacher's tokens.
        **config: fields of ``OTConfig`` (dim, reg, iters, lead_prior, normalize, project,
            grad).

    Raises:
        ValueError: a bad config value, or ``project=False`` with D_s != D_t.
    """

    def __init__(self, student_dim: int, teacher_dim: int, **config: Any) -> None:
        super().__init__()
        self.config = OTConfig(**config)
        c = self.config
        if c.project:
            # Learnable on the student side only (and without a bias): a learnable teacher
            # side, or biases, let both sides collapse onto one point, cost -> 0.
            self.student_proj: nn.Module = nn.Linear(student_dim, c.dim, bias=False)
            self.teacher_proj: nn.Module = FixedTeacherProjection(teacher_dim, c.dim)
        else:
            if student_dim != teacher_dim:
                raise ValueError(f"ot: project=False needs equal token widths, got "
                                 f"student {student_dim} and teacher {teacher_dim}")
            self.student_proj = nn.Identity()
            self.teacher_proj = nn.Identity()
        self._isometry_cache: tuple[tuple[Any, ...], Any] | None = None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())

    def _work_dtype(self, *tensors: torch.Tensor) -> torch.dtype:
        dtype = torch.float32
        for t in (*tensors, *self.parameters()):
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype

    def teacher_isometry(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fixed teacher matrix Q when the cost may be computed in the teacher's space.

        That is when the teacher projection is ``FixedTeacherProjection`` (layer norm, then
        Q) with a square Q whose columns are orthogonal with a common norm s (QᵀQ = s² I, as
        ``semi_orthogonal`` draws it for d = D_t) to within 4 √D_t rounding units of
        ``dtype`` (relative), and the student projection is an ``nn.Linear`` without bias.
        Checked once per value of the buffer (the check is a D_t³ product).

        Returns:
            (Q [d, D_t], Q / s) in ``dtype``, or None.
        """
        student, teacher = self.student_proj, self.teacher_proj
        if not (type(teacher) is FixedTeacherProjection and isinstance(student, nn.Linear)
                and student.bias is None):
            return None
        q = teacher.weight  # (d, D_t)
        if q.ndim != 2 or q.shape[0] != q.shape[1]:
            return None
        cache = self._isometry_cache  # (buffer, its version, dtype), result
        if cache is None or cache[0][0] is not q or cache[0][1:] != (q._version, dtype):
            with torch.no_grad():
                q64 = q.detach().double()
                gram = q64.T @ q64  # (D_t, D_t) = s² I
                s2 = gram.diagonal().mean()
                eye = torch.eye(q.shape[1], dtype=gram.dtype, device=gram.device)
                err = float((gram / s2 - eye).abs().max()) if float(s2) > 0 else math.inf
                ok = err <= 4 * math.sqrt(q.shape[1]) * torch.finfo(dtype).eps
                value = (q.to(dtype), (q64 / s2.sqrt()).to(dtype)) if ok else None
            self._isometry_cache = ((q, q._version, dtype), value)
        return self._isometry_cache[1]

    def transport(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, *,
                  student_leads: torch.Tensor | None = None,
                  teacher_leads: torch.Tensor | None = None,
                  student_mask: torch.Tensor | None = None,
                  teacher_mask: torch.Tensor | None = None,
                  student_weights: torch.Tensor | None = None,
                  teacher_weights: torch.Tensor | None = None) -> LossOutput:
        """Entropic OT between the two token sets of every record.

        Args:
            student_tokens: [B, N_s, D_s]; teacher_tokens: [B, N_t, D_t] (any float dtype).
            student_leads: [N_s] int (0..11 or -1) or None (all -1); teacher_leads: [N_t].
            student_mask: [B, N_s] bool (True = real) or None; teacher_mask: [B, N_t].
            student_weights: [B, N_s] token masses or None (uniform); teacher_weights: [B, N_t].

        Returns:
            LossOutput(value: scalar mean over records of <P, C>; aux, a read-only mapping:
            "plan" [B, N_s, N_t] (detached), "barycentric" [B, N_s, d] ((P @ ŷ) / a; zero
            rows on padded student tokens), "student_tokens" [B, N_s, d] (projected,
            normalised if configured), "cost" [B, N_s, N_t] (detached), "per_record" [B]
            (detached <P, C>), "objective" [B] (OT_ε = <P, C> + ε Σ P log P, carrying the
            loss's gradient)). When the cost is computed in the teacher's space (see the
            module doc) "barycentric" and "student_tokens" are computed on first access.
        """
        c = self.config
        dtype = self._work_dtype(student_tokens, teacher_tokens)
        device = student_tokens.device
        bsz, n_s, n_t = student_tokens.shape[0], student_tokens.shape[1], teacher_tokens.shape[1]
        with torch.autocast(device_type=device.type, enabled=False):
            prior = None
            if c.lead_prior > 0 and student_leads is not None and teacher_leads is not None:
                prior = lead_prior_cost(student_leads.to(device), teacher_leads.to(device),
                                        c.lead_prior).to(dtype)  # (N_s, N_t)
            log_a = log_marginal(student_mask, student_weights, bsz, n_s, dtype, device)
            log_b = log_marginal(teacher_mask, teacher_weights, bsz, n_t, dtype, device)
            a = log_a.exp()  # (B, N_s)
            tiny = torch.finfo(dtype).tiny
            inv_a = torch.where(a > 0, 1.0 / a.clamp_min(tiny), 0.0)  # (B, N_s)
            iso = None
            if c.grad == "envelope" and c.normalize and c.project:
                iso = self.teacher_isometry(dtype)
            if iso is not None:
                # teacher space: x̃ = normalize(x (Qᵀ W_s)ᵀ) = x̂ Q / s, ỹ = normalize(LN(y)),
                # ŷ = ỹ Qᵀ / s, so x̂·ŷ = x̃·ỹ and the teacher needs no matrix product
                q, q_out = iso
                weight = q.T @ self.student_proj.weight.to(dtype)  # (D_t, D_s)
                zs = F.linear(student_tokens.to(dtype), weight)  # (B, N_s, D_t)
                with torch.no_grad():
                    xt = F.layer_norm(teacher_tokens.detach().to(dtype), (q.shape[1],))
                    xt, yy = _normalized(xt, inplace=True)  # (B, N_t, D_t), (B, N_t)
            else:
                zs = _project(self.student_proj, student_tokens, dtype)  # (B, N_s, d)
                with torch.no_grad():  # the teacher is a fixed target, as in every other term
                    xt = _project(self.teacher_proj, teacher_tokens.detach(), dtype)
                    if c.normalize:  # in place unless xt is the caller's tensor (identity)
                        shared = xt.untyped_storage().data_ptr() == \
                            teacher_tokens.untyped_storage().data_ptr()
                        xt, yy = _normalized(xt, inplace=not shared)  # (B, N_t, d), (B, N_t)
                    else:
                        yy = torch.linalg.vector_norm(xt, dim=-1).square_()  # (B, N_t)
            # the student tokens with a graph, for the aux output (later, in teacher space)
            xs = zs if not c.normalize else None if iso is not None else F.normalize(zs, dim=-1)
            if c.grad == "envelope":
                per_record, plan, cost, transported = self._envelope(zs, xs, xt, yy, prior,
                                                                     log_a, log_b)
                objective: Any = _out_of_autocast(
                    lambda p, v: v + c.reg * _neg_entropy(p), plan, per_record)
            else:
                cost = squared_distances(xs, xt)  # (B, N_s, N_t)
                if prior is not None:
                    cost = cost + prior[None]
                plan, _, _ = sinkhorn_log_batched(cost, c.reg, c.iters, log_a, log_b)
                per_record = (plan * cost).sum((1, 2))  # (B,)
                transported = torch.bmm(plan, xt)  # (B, N_s, d)
                neg_entropy = torch.where(plan > 0, plan * plan.clamp_min(tiny).log(),
                                          0.0).sum((1, 2))  # (B,)
                objective = per_record + c.reg * neg_entropy
        if iso is None:
            barycentric: Any = transported * inv_a[:, :, None]  # (B, N_s, d)
            student: Any = xs
        else:  # back to the common space d: x̂ = x̃ Qᵀ / s, P ŷ = (P ỹ) Qᵀ / s
            barycentric = _out_of_autocast(
                lambda t, w, s: F.linear(t, w) * s[:, :, None], transported, q_out, inv_a)
            student = _out_of_autocast(
                lambda z, w: F.linear(F.normalize(z, dim=-1), w), zs, q_out)
        aux = _Aux({"plan": plan.detach(), "barycentric": barycentric, "student_tokens": student,
                    "cost": cost.detach(), "per_record": per_record.detach(),
                    "objective": objective})
        return LossOutput(per_record.mean(), aux)

    def _envelope(self, zs: torch.Tensor, xs: torch.Tensor | None, xt: torch.Tensor,
                  yy: torch.Tensor, prior: torch.Tensor | None, log_a: torch.Tensor,
                  log_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """<sg(P), C> per record, with its gradient, for the envelope mode.

        The plan P is solved without a graph on the detached cost. The value is the plain
        Σ_ij P_ij C_ij. Its gradient is that of C_ij = |x_i|² + |y_j|² − 2 x_i·y_j (+ the
        constant prior) at fixed P and at the detached teacher tokens y: with r = P 1,
        ∂/∂x_i = 2 r_i x_i − 2 (P y)_i, where the product P y is computed once, in the
        forward, and is also the barycentric projection (times a). It is pulled back by
        hand through the L2 normalisation x = z / max(|z|, 1e-12) (as ``F.normalize``'s
        autograd would) and attached to ``zs`` by ``_EnvelopeValue``. This is the gradient
        of the unclamped squared distance: the clamp at 0 only guards against rounding.

        Args:
            zs: [B, N_s, w] projected student tokens (with a graph).
            xs: ``zs`` normalised (``F.normalize``), or ``zs`` itself when not normalising,
                or None: normalised here, without a graph.
            xt: [B, N_t, w] teacher tokens (no graph); yy: [B, N_t] their squared norms.
            prior: [N_s, N_t] lead prior or None; log_a, log_b: log-masses.

        Returns:
            (per_record [B] carrying that gradient, plan [B, N_s, N_t], cost [B, N_s, N_t],
            P @ xt [B, N_s, w]), all but the first without a graph.
        """
        c = self.config
        with torch.no_grad():
            z = zs.detach()
            norm = torch.linalg.vector_norm(z, dim=-1)  # (B, N_s)
            if c.normalize:
                safe = norm.clamp_min(_NORM_EPS)
                x = z / safe[:, :, None] if xs is None else xs.detach()  # (B, N_s, w)
                xx = (norm / safe).square_()  # (B, N_s) |x|²
            else:
                x, xx = z, norm.square()
            cost = torch.add(xx[:, :, None], yy[:, None, :])  # (B, N_s, N_t)
            cost.baddbmm_(x, xt.transpose(1, 2), alpha=-2.0).clamp_min_(0)
            if prior is not None:
                cost.add_(prior[None])
            k = torch.div(cost, -c.reg)  # (B, N_s, N_t) = −C/ε
            u = torch.where(torch.isneginf(log_a), log_a, torch.zeros_like(log_a))
            plan, _, _ = _sinkhorn_no_graph(k, u, log_a, log_b, c.iters)
            value = torch.mul(plan, cost, out=k).sum((1, 2))  # (B,) <P, C>; k is scratch
            transported = torch.bmm(plan, xt)  # (B, N_s, w) = P y
            rows = plan.sum(2)  # (B, N_s) r = P 1
            if not c.normalize:  # g = 2 (r x − P y)
                grad = torch.addcmul(transported, x, rows[:, :, None], value=-1.0).mul_(-2.0)
            else:
                # through x = z / max(|z|, eps): g − x (x·g) = 2 (x m − P y) with
                # m = x·(P y) + r (1 − |x|²); below eps x = z / eps and it is g itself (m = r)
                m = torch.linalg.vecdot(x, transported).add_(rows * (1.0 - xx))  # (B, N_s)
                m = torch.where(norm > _NORM_EPS, m, rows)
                grad = torch.addcmul(transported, x, m[:, :, None], value=-1.0)  # (B, N_s, w)
                grad.mul_((-2.0 / safe)[:, :, None])
        return _EnvelopeValue.apply(zs, value, grad), plan, cost, transported

    def forward(self, student_out: Any, teacher_out: Any, batch: dict[str, Any] | None = None,
                context: dict[str, Any] | None = None) -> LossOutput:
        """OT lead-matching loss of a batch.

        Args:
            student_out: ECGModelOutput: ``tokens`` [B, N_s, D_s], ``token_leads`` [N_s],
                optional ``token_mask`` [B, N_s].
            teacher_out: ECGModelOutput: ``tokens`` [B, N_t, D_t], ``token_leads`` [N_t],
                optional ``token_mask`` [B, N_t].
            batch: may carry token masses ``ot_student_weights`` [B, N_s] and
                ``ot_teacher_weights`` [B, N_t] (default uniform over real tokens).
            context: if given, receives ``ot.plan`` [B, N_s, N_t] and ``ot.barycentric``
                [B, N_s, d] for later terms.

        Returns:
            LossOutput as from ``transport``.
        """
        batch = batch or {}
        out = self.transport(
            student_out.tokens, teacher_out.tokens,
            student_leads=student_out.token_leads, teacher_leads=teacher_out.token_leads,
            student_mask=student_out.token_mask, teacher_mask=teacher_out.token_mask,
            student_weights=batch.get("ot_student_weights"),
            teacher_weights=batch.get("ot_teacher_weights"))
        if context is not None:
            context["ot.plan"] = out.aux["plan"]
            context["ot.barycentric"] = out.aux["barycentric"]
        return out


__all__ = ["OTConfig", "OTLeadMatching", "lead_prior_cost", "log_marginal",
           "sinkhorn_log_batched", "squared_distances"]
