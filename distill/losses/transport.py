"""Optimal-transport lead matching (EVL-ECG): entropic OT between student and teacher tokens.

For every record the student's tokens x_i and the teacher's tokens y_j are projected to a
common width d, L2-normalised, and matched by entropic optimal transport (Cuturi 2013)::

    C_ij = ||x̂_i - ŷ_j||² + lead_prior · [lead_s(i) ≠ lead_t(j), both ≥ 0]     (B, N_s, N_t)
    P*   = argmin_{P 1 = a, Pᵀ1 = b, P ≥ 0}  <P, C> + ε Σ_ij P_ij log P_ij
    L    = mean over records of <P, C>

with uniform marginals over the real tokens (or given weights). The plan is returned for
plotting and the barycentric projection ``(P @ ŷ) / a`` is published for relation matching
(``context["ot.barycentric"]``). The solver, batched log-domain Sinkhorn with POT's
iterates, is ``distill/losses/sinkhorn.py``; the gradient is the envelope one by default
(the plan held fixed, ``grad="envelope"``), or autograd through the iterations
(``grad="unrolled"``). The derivation, the solver's stabilisation, why the envelope
gradient, the teacher-space (isometry) shortcut and the measured figures:
``docs/ot-solver.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distill.core.schema import spec
from distill.losses import LazyAux, LossOutput, check_fields, register_loss
from distill.losses.alignment import (FixedTeacherProjection, lead_means, subset_positions,
                                      teacher_layer_norm, teacher_subset)
from distill.losses.memo import memoised
from distill.losses.sinkhorn import (
    log_marginal,
    sinkhorn_log_batched,
    sinkhorn_scaling,
    squared_distances,
    zero_potentials,
)

_NORM_EPS = 1e-12  # F.normalize's default eps


@dataclass
class OTConfig:
    """Configuration of the OT lead-matching term (the recipe section ``distill.ot``)."""

    dim: int = spec(128, help="common width d of the projected tokens", ge=1)
    reg: float = spec(0.05, help="entropic regularisation ε", gt=0)
    iters: int = spec(50, help="Sinkhorn iterations (fixed; with tol, the most)", ge=1)
    lead_prior: float = spec(0.0, help="cost added where the two tokens' leads differ; a "
                             "lead -1 token pays none", ge=0)
    normalize: bool = spec(True, help="L2-normalise the projected tokens before the squared "
                           "distance")
    project: bool = spec(True, help="learnable nn.Linear projection of the student tokens to "
                         "dim (the teacher's is fixed); False = identity (needs equal widths)")
    grad: Literal["envelope", "unrolled"] = spec(
        "envelope", help="envelope: gradient P·∂C (plan held fixed); unrolled: autograd "
        "through the iterations")
    tol: float = spec(0.0, help="stop the Sinkhorn iterations early once every record's "
                      "column marginals are within tol of the teacher's masses (L2 norm, "
                      "checked after iterations 1, 11, 21, ... as POT's stopThr; on a CPU "
                      "per block of records solved together); 0 = always iters iterations; "
                      "changes the numbers", ge=0, since="0.6")
    teacher_tokens: int = spec(
        0, help="transport to a random subset of this many teacher token positions per "
        "step (drawn afresh each step, shared with mhca when it draws as many); 0 = all "
        "tokens; changes the numbers, evaluation mode always uses all", ge=0, since="0.6")
    teacher_pool: Literal["none", "lead"] = spec(
        "none", help="lead: match the student's tokens to one teacher token per lead (the "
        "mean of that lead's layer-normalised tokens; what distill.cached_tokens: lead_mean "
        "stores); changes the numbers", since="0.6")

    def __post_init__(self) -> None:
        check_fields(self)


SOLVE_BLOCK_BYTES = 4 * 2**20  # a CPU solve's block of records: kernels of at most this


def solve_block(record_bytes: int, batch: int, device: torch.device) -> int:
    """How many records the envelope solves at once: on a CPU as many as keep their
    kernels within ``SOLVE_BLOCK_BYTES`` (so that the Sinkhorn iterations read them from
    the processor's cache; measured 1.7x faster at 240 x 196 tokens, B = 64, see
    ``benchmarks/losses.py``), at least one; the whole batch on an accelerator."""
    if device.type != "cpu":
        return max(batch, 1)
    return max(1, min(batch, SOLVE_BLOCK_BYTES // max(record_bytes, 1)))


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


def _out_of_autocast(fn: Callable[..., torch.Tensor],
                     *args: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``fn(*args)`` for later, run with autocast off and autograd on (as in the forward)."""

    def run() -> torch.Tensor:
        with torch.autocast(device_type=args[0].device.type, enabled=False), torch.enable_grad():
            return fn(*args)

    return run


@dataclass
class _IsometryCheck:
    """The result of checking a fixed teacher matrix Q (see ``teacher_isometry``)."""

    matrix: torch.Tensor  # the buffer that was checked
    error: float  # max |QᵀQ / s² − I| (relative), inf for Q = 0
    scale: torch.Tensor  # s, 0-dim float64
    values: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]  # (Q, Q / s) per dtype


def _recheck_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post hook: the teacher matrix may have been replaced in place."""
    module.check_teacher_isometry()


@register_loss("ot", config=OTConfig, default_weight=1.0, order=30)
class OTLeadMatching(nn.Module):
    """Optimal-transport lead matching between student and teacher tokens (EVL-ECG).

    Args:
        student_dim: D_s, width of the student's tokens.
        teacher_dim: D_t, width of the teacher's tokens.
        dim, reg, iters, lead_prior, normalize, project, grad, tol, teacher_tokens: the
            fields of ``OTConfig``.

    Raises:
        ValueError: a bad config value, or ``project=False`` with D_s != D_t.
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, dim: int = 128,
                 reg: float = 0.05, iters: int = 50, lead_prior: float = 0.0,
                 normalize: bool = True, project: bool = True,
                 grad: Literal["envelope", "unrolled"] = "envelope", tol: float = 0.0,
                 teacher_tokens: int = 0, teacher_pool: Literal["none", "lead"] = "none",
                 teacher_form: Literal["tokens", "normed", "projected"] | None = None) -> None:
        super().__init__()
        self.config = OTConfig(dim=dim, reg=reg, iters=iters, lead_prior=lead_prior,
                               normalize=normalize, project=project, grad=grad, tol=tol,
                               teacher_tokens=teacher_tokens, teacher_pool=teacher_pool)
        c = self.config
        # how the teacher tokens arrive (a reduced teacher cache, distill.cached_tokens):
        # as the teacher gives them, as per-lead means of their layer norm ("normed": the
        # lead_mean cache), or after the fixed map ("projected": the projected cache, whose
        # stored map is this term's; the tokens are then [.., dim] and teacher_dim is dim)
        self.teacher_form = teacher_form or "tokens"
        if self.teacher_form not in ("tokens", "normed", "projected"):
            raise ValueError(f"ot: teacher_form {teacher_form!r} is not tokens, normed or "
                             f"projected")
        if self.teacher_form == "normed" and c.teacher_pool != "lead":
            raise ValueError("ot: the teacher cache holds per-lead means (cached_tokens: "
                             "lead_mean); set distill.ot.teacher_pool: lead")
        if self.teacher_form == "projected" and not c.project:
            raise ValueError("ot: projected teacher tokens (cached_tokens: projected) need "
                             "project: true")
        if self.teacher_form != "tokens" and c.teacher_tokens:
            raise ValueError("ot: teacher_tokens subsets the teacher's own tokens; it does not "
                             "apply to a reduced teacher cache (set it to 0)")
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
        self._isometry: _IsometryCheck | None = None
        self.check_teacher_isometry()
        self.register_load_state_dict_post_hook(_recheck_after_load)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())

    def _work_dtype(self, *tensors: torch.Tensor) -> torch.dtype:
        dtype = torch.float32
        for t in (*tensors, *self.parameters()):
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype

    def _teacher_matrix(self) -> torch.Tensor | None:
        """Q [d, D_t] when the projections have the shortcut's form: a square fixed teacher
        matrix and a student ``nn.Linear`` without bias; None otherwise."""
        student, teacher = self.student_proj, self.teacher_proj
        if not (type(teacher) is FixedTeacherProjection and isinstance(student, nn.Linear)
                and student.bias is None):
            return None
        q = teacher.weight  # (d, D_t)
        if q.ndim != 2 or q.shape[0] != q.shape[1]:
            return None
        return q

    def check_teacher_isometry(self) -> None:
        """Check (again) whether the fixed teacher matrix Q is an isometry (QᵀQ = s² I).

        Runs when the loss is built, after ``load_state_dict`` (a post hook), and when
        ``teacher_isometry`` finds the buffer replaced (``.to()``, ``.double()``). Q is not
        trained; code that writes it in place calls this afterwards. The check is a D_t³
        product in float64.
        """
        self._isometry = None
        q = self._teacher_matrix()
        if q is None:
            return
        with torch.no_grad():
            q64 = q.detach().double()
            gram = q64.T @ q64  # (D_t, D_t) = s² I
            s2 = gram.diagonal().mean()
            eye = torch.eye(q.shape[1], dtype=gram.dtype, device=gram.device)
            err = float((gram / s2 - eye).abs().max()) if float(s2) > 0 else math.inf
        self._isometry = _IsometryCheck(q, err, s2.sqrt(), {})

    def teacher_isometry(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fixed teacher matrix Q when the cost may be computed in the teacher's space.

        That is when the teacher projection is ``FixedTeacherProjection`` (layer norm, then
        Q) with a square Q whose columns are orthogonal with a common norm s (QᵀQ = s² I, as
        ``semi_orthogonal`` draws it for d = D_t) to within 4 √D_t rounding units of
        ``dtype`` (relative), and the student projection is an ``nn.Linear`` without bias.
        The check is made by ``check_teacher_isometry``, not on every call.

        Returns:
            (Q [d, D_t], Q / s) in ``dtype``, or None.
        """
        q = self._teacher_matrix()
        if q is None:
            return None
        check = self._isometry
        if check is None or check.matrix is not q:  # the buffer was replaced (.to(), ...)
            self.check_teacher_isometry()
            check = self._isometry
        if not check.error <= 4 * math.sqrt(q.shape[1]) * torch.finfo(dtype).eps:
            return None
        value = check.values.get(dtype)
        if value is None:
            with torch.no_grad():
                value = (q.to(dtype), (q.detach().double() / check.scale).to(dtype))
            check.values[dtype] = value
        return value

    def transport(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, *,
                  student_leads: torch.Tensor | None = None,
                  teacher_leads: torch.Tensor | None = None,
                  student_mask: torch.Tensor | None = None,
                  teacher_mask: torch.Tensor | None = None,
                  student_weights: torch.Tensor | None = None,
                  teacher_weights: torch.Tensor | None = None,
                  context: dict[str, Any] | None = None, pooled: bool = False) -> LossOutput:
        """Entropic OT between the two token sets of every record.

        Args:
            student_tokens: [B, N_s, D_s]; teacher_tokens: [B, N_t, D_t] (any float dtype).
            student_leads: [N_s] int (0..11 or -1) or None (all -1); teacher_leads: [N_t].
            student_mask: [B, N_s] bool (True = real) or None; teacher_mask: [B, N_t].
            student_weights: [B, N_s] token masses or None (uniform); teacher_weights: [B, N_t].
            context: the objective's context, or None: the teacher's layer norm is read from
                (or memoised in) it, shared with ``mhca`` (``teacher_layer_norm``).
            pooled: the teacher tokens are already layer-normalised per-lead means.

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
            if c.grad == "envelope" and c.normalize and c.project and \
                    self.teacher_form == "tokens" and c.teacher_pool == "none":
                iso = self.teacher_isometry(dtype)
            if iso is not None:
                # teacher space: x̃ = normalize(x (Qᵀ W_s)ᵀ) = x̂ Q / s, ỹ = normalize(LN(y)),
                # ŷ = ỹ Qᵀ / s, so x̂·ŷ = x̃·ỹ and the teacher needs no matrix product
                q, q_out = iso
                weight = q.T @ self.student_proj.weight.to(dtype)  # (D_t, D_s)
                zs = F.linear(student_tokens.to(dtype), weight)  # (B, N_s, D_t)
                def unit(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    with torch.no_grad():  # the layer norm may be shared: not in place then
                        normed = teacher_layer_norm(t, dtype, context)
                        return _normalized(normed, inplace=context is None)

                xt, yy = memoised(context, teacher_tokens, f"ot.unit.{dtype}", unit,
                                  subset=subset_positions(context, teacher_tokens))
                # (B, N_t, D_t), (B, N_t)
            else:
                zs = _project(self.student_proj, student_tokens, dtype)  # (B, N_s, d)
                fixed = type(self.teacher_proj) is FixedTeacherProjection

                def target(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    # the teacher is a fixed target, as in every other term: each token on
                    # its own, (B, N_t, d) and its squared norms (B, N_t)
                    with torch.no_grad():
                        if self.teacher_form == "projected":  # the fixed map already applied
                            xt = t.detach().to(dtype)
                        elif fixed:
                            normed = (t.detach().to(dtype) if pooled  # lead means
                                      else teacher_layer_norm(t, dtype, context))
                            xt = self.teacher_proj.project_normalized(normed)
                        else:
                            xt = _project(self.teacher_proj, t.detach(), dtype)
                        if not c.normalize:
                            return xt, torch.linalg.vector_norm(xt, dim=-1).square_()
                        # in place unless xt is the caller's tensor (identity)
                        shared = xt.untyped_storage().data_ptr() == \
                            t.untyped_storage().data_ptr()
                        return _normalized(xt, inplace=not shared)

                if fixed and self.teacher_form == "tokens" and not pooled:  # kept per record
                    xt, yy = memoised(context, teacher_tokens,
                                      f"ot.target.{dtype}.{c.normalize}", target,
                                      guard=self.teacher_proj.weight,
                                      subset=subset_positions(context, teacher_tokens))
                else:
                    xt, yy = target(teacher_tokens)
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
                plan, _, _ = sinkhorn_log_batched(cost, c.reg, c.iters, log_a, log_b, c.tol)
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
        aux = LazyAux({"plan": plan.detach(), "barycentric": barycentric, "student_tokens": student,
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
            bsz = x.shape[0]
            cost = torch.empty(bsz, x.shape[1], xt.shape[1], dtype=x.dtype, device=x.device)
            plan, value = torch.empty_like(cost), x.new_empty(bsz)  # (B, N_s, N_t), (B,)
            transported = torch.empty(bsz, x.shape[1], xt.shape[2], dtype=x.dtype,
                                      device=x.device)  # (B, N_s, w) = P y
            # records are solved a block at a time, so that a block's kernel stays in the
            # processor's cache over the iterations (each record's solve is its own)
            step = solve_block(cost[0].numel() * cost.element_size(), bsz, x.device)
            for lo in range(0, bsz, step):
                hi = min(lo + step, bsz)
                blk = cost[lo:hi]  # (b, N_s, N_t)
                torch.add(xx[lo:hi, :, None], yy[lo:hi, None, :], out=blk)
                blk.baddbmm_(x[lo:hi], xt[lo:hi].transpose(1, 2), alpha=-2.0).clamp_min_(0)
                if prior is not None:
                    blk.add_(prior[None])
                k = torch.div(blk, -c.reg)  # (b, N_s, N_t) = −C/ε
                sinkhorn_scaling(k, zero_potentials(log_a[lo:hi]), log_a[lo:hi],
                                 log_b[lo:hi], c.iters, tol=c.tol, out=plan[lo:hi])
                torch.sum(torch.mul(plan[lo:hi], blk, out=k), (1, 2), out=value[lo:hi])  # <P,C>
                torch.bmm(plan[lo:hi], xt[lo:hi], out=transported[lo:hi])
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
                [B, N_s, d] for later terms. With ``teacher_tokens`` = K < N_t in training,
                N_t is K: a random subset of the teacher's tokens (``teacher_subset``).

        Returns:
            LossOutput as from ``transport``.
        """
        batch = batch or {}
        t_tokens, t_mask, t_leads, index = teacher_subset(
            teacher_out, self.config.teacher_tokens, context, self.training)
        t_weights = batch.get("ot_teacher_weights")
        if index is not None and t_weights is not None:
            t_weights = t_weights.index_select(1, index.to(t_weights.device))
        pooled = self.teacher_form == "normed"
        if self.config.teacher_pool == "lead" and not pooled:  # pooled live, as the cache does
            if t_weights is not None:
                raise ValueError("ot: teacher_pool: lead replaces the teacher's tokens by one a "
                                 "lead; ot_teacher_weights of the tokens do not apply")
            with torch.no_grad():
                out_, leads_, t_mask = lead_means(t_tokens.detach(), t_leads, t_mask)
            t_tokens = out_["tokens"]
            t_leads = torch.as_tensor(leads_, device=t_tokens.device)
            pooled = True
        out = self.transport(
            student_out.tokens, t_tokens,
            student_leads=student_out.token_leads, teacher_leads=t_leads,
            student_mask=student_out.token_mask, teacher_mask=t_mask,
            student_weights=batch.get("ot_student_weights"), teacher_weights=t_weights,
            context=context, pooled=pooled)
        if context is not None:
            context["ot.plan"] = out.aux["plan"]
            context["ot.barycentric"] = out.aux["barycentric"]
        return out


__all__ = ["OTConfig", "OTLeadMatching", "lead_prior_cost"]
