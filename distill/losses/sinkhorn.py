"""Batched entropic optimal transport: log-domain Sinkhorn with POT's iterates.

The solver behind the ``ot`` loss (``distill/losses/transport.py``), kept apart from the
loss so that it can be tested and benchmarked on its own. Every function works on a batch
of records at once, as one (B, N_s, N_t) tensor program:

* ``squared_distances``: the cost matrices ||x_i − y_j||²;
* ``log_marginal``: a record's log token masses (uniform or given, zero on padding);
* ``zero_potentials``: POT's zero start, -inf on massless tokens;
* ``sinkhorn_log_batched``: a fixed number of (v, u) updates from zero potentials, the
  iterates of POT's ``ot.bregman.sinkhorn_log``; with a graph by ``sinkhorn_unrolled``
  (autograd through the iterations), without one by ``sinkhorn_scaling`` (stabilised
  scaling iterations, no exponential per iteration).

The derivation, the stabilisation, the gradients and the measured figures are in
``docs/ot-solver.md``. This module registers no loss.
"""

from __future__ import annotations

import math

import torch
from ot.backend import TorchBackend

_NX = TorchBackend()
CHECK_EVERY = 10  # a tolerance is checked after iterations 1, 11, 21, ... (as POT)


def zero_potentials(log_a: torch.Tensor) -> torch.Tensor:
    """The starting log-scaling u: zero as in POT, but -inf on massless (padded) tokens, so
    that the first v-update already ignores them (padding then equals dropping the tokens).

    Args:
        log_a: [B, N_s] log source masses (-inf = no mass).

    Returns:
        [B, N_s].
    """
    return torch.where(torch.isneginf(log_a), log_a, torch.zeros_like(log_a))


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
                         log_b: torch.Tensor, tol: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn (Cuturi 2013) on a batch of cost matrices, fixed iterations.

    Same updates, order and start as POT's ``sinkhorn_log`` (v first, from zero potentials;
    a massless token starts at -inf, so it never takes part). Differentiable by autograd
    through the iterations when ``cost`` requires grad (``sinkhorn_unrolled``); otherwise
    the same iterates are computed by ``sinkhorn_scaling``, stabilised scaling
    iterations without an exponential per iteration.

    Args:
        cost: [B, N_s, N_t] float32 or float64.
        reg: entropic regularisation ε.
        iters: number of (v, u) update pairs, >= 1.
        log_a: [B, N_s] log source masses (-inf = no mass); log_b: [B, N_t] target.
        tol: stop early on POT's rule (``stopThr``), checked every ``CHECK_EVERY``
            iterations on every record; 0: exactly ``iters`` iterations.

    Returns:
        (plan [B, N_s, N_t], u [B, N_s], v [B, N_t]): the plan exp(−C/ε + u + v) and the log
        scalings (dual potentials divided by ε).
    """
    k = -cost / reg  # (B, N_s, N_t) log-kernel
    u = zero_potentials(log_a)  # (B, N_s)
    if cost.requires_grad and torch.is_grad_enabled():
        return sinkhorn_unrolled(k, u, log_a, log_b, iters, tol)
    return sinkhorn_scaling(k, u, log_a, log_b, iters, tol=tol)


def sinkhorn_unrolled(k: torch.Tensor, u: torch.Tensor, log_a: torch.Tensor,
                      log_b: torch.Tensor, iters: int, tol: float = 0.0
                      ) -> tuple[torch.Tensor, ...]:
    """Plain log-domain iterations with ``TorchBackend.logsumexp``, recorded by autograd.

    Args:
        k: [B, N_s, N_t] log-kernel −C/ε.
        u: [B, N_s] starting log-scaling (``zero_potentials``).
        log_a: [B, N_s] log source masses; log_b: [B, N_t] log target masses.
        iters: number of (v, u) update pairs, >= 1.
        tol: POT's stopping threshold, as ``sinkhorn_scaling`` (0: none).

    Returns:
        (plan [B, N_s, N_t], u [B, N_s], v [B, N_t]) as ``sinkhorn_log_batched``.
    """
    k_t = k.transpose(1, 2).contiguous()  # (B, N_t, N_s): both reductions on the last axis
    b = log_b.exp()  # (B, N_t)
    for it in range(iters):
        v = log_b - _NX.logsumexp(k_t + u[:, None, :], axis=2)  # (B, N_t)
        row = k + v[:, None, :]  # (B, N_s, N_t)
        u = log_a - _NX.logsumexp(row, axis=2)  # (B, N_s)
        if tol > 0 and it % CHECK_EVERY == 0:
            with torch.no_grad():  # column sums of exp(k + u + v)
                cols = (row + u[:, :, None]).exp().sum(1)  # (B, N_t)
                if bool((torch.linalg.vector_norm(cols - b, dim=-1) < tol).all()):
                    break
    # P = a · softmax_j(−C/ε + v), i.e. exp(−C/ε + u + v) with the last u-update folded in:
    # rows sum to a exactly and P ≤ a, even where float32 cannot resolve C/ε (~1e10).
    return torch.softmax(row, dim=2) * log_a.exp()[:, :, None], u, v


def _accepted(mass: torch.Tensor, floor: float, big: float) -> tuple[torch.Tensor, ...]:
    """Bounds [lo, hi] within which a kernel sum s of a token of mass m is trusted and its
    scaling m / s kept: s ≥ ``floor`` (accurate, see ``sinkhorn_scaling``) and
    1/big ≤ m / s ≤ big. A massless token (padding) always passes (lo = -1, hi = inf)."""
    real = mass > 0
    lo = torch.where(real, (mass / big).clamp_min(floor), -1.0)
    hi = torch.where(real, mass * big, math.inf)
    return lo, hi


def _inside(sums: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """Whether every sum lies in [lo, hi] (False for a NaN)."""
    return torch.equal(sums.clamp(lo, hi), sums)


def _converged(kern: torch.Tensor, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor,
               tol: float) -> bool:
    """POT's stopping rule on every record: ‖Pᵀ1 − b‖₂ < tol for the plan
    P = diag(x) K diag(y) (x [B, 1, N_s], K [B, N_s, N_t], y and b [B, 1, N_t])."""
    cols = torch.bmm(x, kern).mul_(y)  # (B, 1, N_t) column sums of the plan
    return bool((torch.linalg.vector_norm(cols - b, dim=-1) < tol).all())


def sinkhorn_scaling(k: torch.Tensor, u: torch.Tensor, log_a: torch.Tensor,
                     log_b: torch.Tensor, iters: int, *, floor: float | None = None,
                     bound: float | None = None, tol: float = 0.0,
                     stats: dict[str, int] | None = None,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The iterates of ``sinkhorn_unrolled`` without a graph: stabilised scaling Sinkhorn
    (Schmitzer 2019). Writes no input; returns a new plan tensor (or ``out``).

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
    "exact_u"; the rest were scaling updates) and, with ``tol``, of iterations ("iters").

    ``tol`` > 0 stops early with POT's rule (``sinkhorn_log``'s ``stopThr``): after the
    iterations 1, 11, 21, ... (every ``CHECK_EVERY``), once the column marginals of the
    plan are within ``tol`` of b in L2 norm, here for every record of the batch at once (a
    record that met it earlier keeps iterating until the last one does). 0: exactly
    ``iters`` iterations (POT with ``stopThr=0``).

    Args:
        k: [B, N_s, N_t] log-kernel −C/ε (float32 or float64).
        u: [B, N_s] starting log-scaling (``zero_potentials``).
        log_a: [B, N_s] log source masses; log_b: [B, N_t] log target masses.
        iters: number of (v, u) update pairs, >= 1.
        floor: smallest trusted kernel sum per term (default tiny · big / eps).
        bound: log of the largest scaling kept (default log(max float) / 4).
        tol: stopping threshold on the column marginals' L2 error (0: none).
        stats: if given, receives "exact_v", "exact_u" (and with ``tol`` "iters").
        out: a contiguous tensor shaped like ``k`` to hold the plan (and serve as the
            kernel's storage), or None: a new one.

    Returns:
        (plan [B, N_s, N_t], u [B, N_s], v [B, N_t]) as ``sinkhorn_log_batched``.
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
    # (B, N_s, N_t) K = exp(k + α + β); at the end the plan
    kern = torch.empty_like(k) if out is None else out
    col, row = torch.empty_like(b), torch.empty_like(a)  # Kᵀx, K y
    alpha, beta = u, log_b  # (B, N_s), (B, N_t) absorbed potentials (beta: set at once)
    x, y = torch.ones_like(a), torch.ones_like(b)  # (B, 1, N_s), (B, 1, N_t) scalings
    ones_x = ones_y = True  # the scalings are all 1
    formed = False  # a kernel exists
    zero_start = not bool(u.any())  # u = 0: no padded student token
    exact_v = exact_u = done = 0
    for it in range(iters):
        done = it + 1
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
                if tol > 0 and it % CHECK_EVERY == 0 and _converged(kern, x, y, b, tol):
                    break
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
        if tol > 0 and it % CHECK_EVERY == 0 and _converged(kern, x, y, b, tol):
            break
    if stats is not None:
        stats.update(exact_v=exact_v, exact_u=exact_u)
        if tol > 0:
            stats["iters"] = done
    # P = diag(x) K diag(y); after a scaling u-update x = a / (K y): the rows sum to a
    if not ones_y:
        kern.mul_(y)
        beta = beta + y[:, 0].log()
    if not ones_x:
        kern.mul_(x.transpose(1, 2))
        alpha = alpha + x[:, 0].log()
    return kern, alpha, beta


__all__ = ["log_marginal", "sinkhorn_log_batched", "sinkhorn_scaling", "sinkhorn_unrolled",
           "squared_distances", "zero_potentials"]
