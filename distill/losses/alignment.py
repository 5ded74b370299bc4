"""Multi-head cross-attention alignment (MHCA) of student tokens to teacher tokens.

EVL-ECG's feature term for heterogeneous pairs: the two models have different token counts
(a CNN's time steps or a lead transformer's lead tokens versus a VLM's image patches) and
widths, so a token of one has no fixed partner in the other. Each student token therefore
*asks* the teacher tokens of its record which of them it should resemble:

    z   = W_s x_s                         projected student tokens     (B, N_s, dim)
    q   = W_q z,  k = W_k LN(x_t)         queries / keys, split in heads
    A   = softmax(q kᵀ / √d_h)            (B, heads, N_s, N_t), padded teacher tokens → 0
    v   = R LN(x_t)                       values: a *fixed* projection of the teacher
    y   = A v                             teacher features attended for each student token
    L   = mean over real student tokens of ‖z − y‖² / dim

Why the values are fixed (collapse): if the value map were learnable as well, ``W_s = 0`` and
``W_v = 0`` would reach L = 0 for every input, and any shared low-rank direction would come
close; the term would teach the student nothing. ``R`` is a random semi-orthogonal matrix
(drawn once, saved in the state dict) applied to layer-normalised teacher tokens, so the
target keeps the teacher's geometry (Johnson–Lindenstrauss), has unit scale whatever the
teacher's scale (VLM hidden states reach 1e3), and cannot shrink: y is a convex combination
of fixed, non-zero vectors. The learnable parts are ``W_s`` (how the student is read) and
``W_q``, ``W_k`` (where each student token looks).

What is detached: the teacher tokens (the teacher is frozen). The attended side y is *not*
detached: the gradient through ``A`` trains the queries and keys to find the teacher tokens
that each student token corresponds to (the soft matching is the point of the term); with y
detached ``W_q`` and ``W_k`` would never receive a gradient.

How it is computed (same values to float rounding as the formulas above): the teacher's
layer norm is taken once per batch and shared with the ``ot`` term (``teacher_layer_norm``,
memoised in the objective's context); the queries come from the student tokens through the
product W_q W_s when D_s < dim (one narrower matrix product instead of two); the attention
is the fused ``F.scaled_dot_product_attention`` (no N_s x N_t score, softmax or dropout
tensors are kept for the backward); the attention weights, which only plots read, are
computed on first access of ``aux["attention"]``. With attention dropout in training the
explicit form runs (its dropout draws are those of ``nn.Dropout``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.core.errors import RecipeError
from distill.core.schema import spec
from distill.losses import LazyAux, LossOutput, check_fields, register_loss
from distill.losses.memo import memoised

LAYER_NORM_KEY = "teacher.layer_norm"  # the context entry that memoises teacher_layer_norm
SUBSET_KEY = "teacher.subset"  # the context entry that memoises teacher_subset


def teacher_subset(teacher_out: Any, count: int, context: dict[str, Any] | None,
                   training: bool) -> tuple[torch.Tensor, torch.Tensor | None,
                                            torch.Tensor | None, torch.Tensor | None]:
    """A random subset of ``count`` teacher token positions for this step (the options
    ``mhca.teacher_tokens`` and ``ot.teacher_tokens``), the same for every record and, through
    the objective's ``context``, for every term that asks for as many in this batch (so the
    teacher's layer norm of the subset is taken once too).

    All tokens when ``count`` is 0 or at least N_t, outside training, or when the subset
    would leave a record with real tokens (``token_mask``) without any.

    Args:
        teacher_out: ECGModelOutput with ``tokens`` [B, N_t, D_t], optional ``token_mask``
            [B, N_t] and ``token_leads`` [N_t].
        count: K, the positions kept (0 = all).
        context: the objective's context, or None.
        training: whether the calling term is in training mode (positions are drawn from
            the global RNG only then).

    Returns:
        (tokens [B, K, D_t], token_mask [B, K] or None, token_leads [K] or None, the
        positions [K] or None when all are kept).
    """
    tokens = teacher_out.tokens
    mask = getattr(teacher_out, "token_mask", None)
    leads = getattr(teacher_out, "token_leads", None)
    n_t = tokens.shape[1]
    if not training or count <= 0 or count >= n_t:
        return tokens, mask, leads, None
    memo = None if context is None else context.get(SUBSET_KEY)
    if memo is not None and memo[0] is tokens and memo[1] == count:
        return memo[2]
    index = torch.randperm(n_t)[:count].sort().values.to(tokens.device)  # (K,)
    sub_mask = None if mask is None else mask.index_select(1, index)
    if sub_mask is not None and bool((mask.bool().any(1) & ~sub_mask.bool().any(1)).any()):
        result = (tokens, mask, leads, None)
    else:
        result = (tokens.index_select(1, index), sub_mask,
                  None if leads is None else leads.to(tokens.device)[index], index)
    if context is not None:
        context[SUBSET_KEY] = (tokens, count, result)
    return result


def teacher_layer_norm(tokens: torch.Tensor, dtype: torch.dtype,
                       context: dict[str, Any] | None = None) -> torch.Tensor:
    """``F.layer_norm`` (no affine) of the detached teacher tokens in ``dtype``, computed once
    per batch: memoised in ``context`` (the objective's, shared by every term) for this very
    tensor and dtype. (Not kept per record: what the terms derive from it is, see
    :mod:`distill.losses.memo`, and the layer norm itself, D_t wide, would take most of
    the memo's budget for the least time.)

    Args:
        tokens: [B, N_t, D_t] teacher tokens.
        dtype: the working dtype.
        context: the objective's context, or None (no memo).

    Returns:
        [B, N_t, D_t] without a graph; shared: callers must not write it in place.
    """
    if context is not None:
        memo = context.get(LAYER_NORM_KEY)
        if memo is not None and memo[0] is tokens and memo[1] == dtype:
            return memo[2]
    with torch.no_grad():
        out = F.layer_norm(tokens.detach().to(dtype), (tokens.shape[-1],))
    if context is not None:
        context[LAYER_NORM_KEY] = (tokens, dtype, out)
    return out


def subset_positions(context: dict[str, Any] | None, tokens: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tokens, positions [K]) when ``tokens`` is the ``teacher_subset`` this batch drew
    (memoised in ``context``), else None."""
    memo = None if context is None else context.get(SUBSET_KEY)
    if memo is None or memo[2][0] is not tokens or memo[2][3] is None:
        return None
    return tokens, memo[2][3]


def lead_means(tokens: torch.Tensor, leads: list[int] | torch.Tensor,
               mask: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], list[int],
                                                    torch.Tensor]:
    """Per record and lead, the mean of the layer-normalised tokens of that lead over its
    real tokens: ({"tokens": [B, L, D]}, the leads present (sorted), mask [B, L] False where
    a record has no real token of a lead). What ``ot`` with ``teacher_pool: lead`` matches
    and the teacher cache's ``lead_mean`` tokens store (the fixed projection after it is
    linear, so pooling before or after it is the same).

    Raises:
        ValueError: no token names a lead."""
    lead_list = [int(v) for v in (leads.tolist() if torch.is_tensor(leads) else leads)]
    lead_ids = sorted({v for v in lead_list if v >= 0})
    if not lead_ids:
        raise ValueError("lead pooling: no token of this teacher names a lead")
    x = F.layer_norm(tokens.float(), (tokens.shape[-1],))
    lead_of = torch.as_tensor(lead_list, device=x.device)
    member = (lead_of[None, :] == torch.as_tensor(lead_ids, device=x.device)[:, None]).float()
    weight = member[None].expand(x.shape[0], -1, -1)  # (B, L, N_t)
    if mask is not None:
        weight = weight * mask.to(x.device).float()[:, None, :]
    count = weight.sum(-1)  # (B, L)
    pooled = (weight @ x) / count.clamp_min(1.0)[..., None]  # (B, L, D)
    return {"tokens": pooled}, lead_ids, count > 0


def attention_weights(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None
                      ) -> torch.Tensor:
    """softmax(q kᵀ / √d_h) over the real teacher tokens; all-zero rows for a record
    without any.

    Args:
        q: [B, h, N_s, d_h]; k: [B, h, N_t, d_h].
        keep: [B, N_t] bool, True for real teacher tokens, or None (all real).

    Returns:
        [B, h, N_s, N_t].
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N_s, N_t)
    if keep is None:
        return torch.softmax(scores, dim=-1)
    keep = keep[:, None, None, :]  # (B, 1, 1, N_t)
    # the finite minimum (not -inf) keeps all-padding records free of NaN
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    attention = torch.softmax(scores, dim=-1)
    # a record whose teacher tokens are all padding attends to nothing
    return torch.where(keep.any(dim=-1, keepdim=True), attention, torch.zeros_like(attention))


@dataclass
class MHCAConfig:
    """Configuration of the cross-attention alignment term (the recipe section
    ``distill.mhca``)."""

    dim: int = spec(128, help="common width of projected student tokens, keys and values; "
                    "a multiple of heads", ge=1)
    heads: int = spec(4, help="attention heads", ge=1)
    dropout: float = spec(0.0, help="dropout on the attention weights (training only)",
                          ge=0, lt=1)
    student_tokens: int = spec(
        0, help="train on a random subset of this many student token positions per step "
        "(the same for every record of the batch, drawn afresh each step from the global "
        "RNG; an unbiased estimate of the loss and its gradient); 0 = all tokens; changes "
        "the numbers, evaluation mode always uses all", ge=0, since="0.6")
    teacher_tokens: int = spec(
        0, help="attend over a random subset of this many teacher token positions per step "
        "(drawn afresh each step, shared with ot when it draws as many); 0 = all tokens; "
        "changes the numbers, evaluation mode always uses all", ge=0, since="0.6")
    teacher_rank: int = spec(
        0, help="learn the keys from the teacher tokens' coordinates on their r leading "
        "principal directions (of the layer-normalised tokens of up to 256 training records, "
        "fixed before training and kept in the state dict) instead of all D_t features: "
        "about r / D_t of the keys' cost; 0 (or >= D_t) = all features; changes the numbers",
        ge=0, since="0.6")

    def __post_init__(self) -> None:
        check_fields(self)

    def validate(self, path: str) -> None:
        """Cross-field rule: ``dim`` splits evenly into ``heads``."""
        if self.dim % self.heads:
            raise RecipeError(f"{path}.dim: {self.dim} must be a multiple of heads "
                              f"({path}.heads={self.heads})")


def semi_orthogonal(rows: int, cols: int, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """A random [rows, cols] matrix with orthonormal rows (or columns), scaled so that a vector
    of unit per-feature variance keeps unit per-feature variance.

    Args:
        rows: output width.
        cols: input width.
        generator: optional torch RNG.

    Returns:
        [rows, cols] float32.
    """
    gauss = torch.randn(max(rows, cols), min(rows, cols), generator=generator)
    q, r = torch.linalg.qr(gauss)  # (max, min), orthonormal columns
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed
    if rows >= cols:
        return q * math.sqrt(rows / cols)  # (rows, cols): isometry, rescaled to unit variance
    return q.T.contiguous()  # (rows, cols): orthonormal rows, a projection keeps unit variance


@register_loss("mhca", config=MHCAConfig, default_weight=1.0, order=20)
class MHCAAlignment(nn.Module):
    """Multi-head cross-attention alignment of student tokens to teacher tokens (EVL-ECG).

    Args:
        student_dim: D_s, width of the student's tokens.
        teacher_dim: D_t, width of the teacher's tokens.
        dim: common width of the comparison (divisible by ``heads``).
        heads: attention heads.
        dropout: dropout on the attention weights.

    The forward publishes ``context["mhca.attended"]`` (y, [B, N_s, dim]) and
    ``context["mhca.student"]`` (z, [B, N_s, dim]) for later terms (relation matching).
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, dim: int = 128, heads: int = 4,
                 dropout: float = 0.0, student_tokens: int = 0,
                 teacher_tokens: int = 0, teacher_rank: int = 0) -> None:
        super().__init__()
        self.config = MHCAConfig(dim=dim, heads=heads, dropout=dropout,
                                 student_tokens=student_tokens, teacher_tokens=teacher_tokens,
                                 teacher_rank=teacher_rank)
        self.config.validate("mhca")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.student_proj = nn.Linear(student_dim, dim)  # W_s: student tokens → common width
        self.query = nn.Linear(dim, dim)  # W_q
        self.key = nn.Linear(teacher_dim, dim)  # W_k
        # R: fixed value projection (see the module docstring: a learnable one can collapse)
        self.register_buffer("value_proj", semi_orthogonal(dim, teacher_dim))  # (dim, D_t)
        self.attn_dropout = nn.Dropout(dropout)
        if 0 < teacher_rank < teacher_dim:
            # P: orthonormal rows spanning the teacher tokens' leading principal directions,
            # set by fit_key_basis (before training, or from the first batch it sees)
            self.register_buffer("key_basis", torch.zeros(teacher_rank, teacher_dim))
            self.register_buffer("key_basis_set", torch.zeros((), dtype=torch.bool))

    @property
    def low_rank_keys(self) -> bool:
        """Whether the keys read the teacher tokens' principal coordinates (teacher_rank)."""
        return hasattr(self, "key_basis")

    def fit_key_basis(self, teacher_tokens: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """Set P [r, D_t] to the r leading eigenvectors of the second moment of the
        layer-normalised teacher tokens (their best r-dimensional subspace in the least
        squares sense: what x Pᵀ P keeps of each token).

        Args:
            teacher_tokens: [R, N_t, D_t] the teacher tokens of some training records.
            mask: [R, N_t] True for real tokens, or None.

        Returns:
            the share of the tokens' energy the basis keeps (a float tensor).
        """
        if not self.low_rank_keys:
            raise ValueError("mhca: fit_key_basis needs teacher_rank between 1 and D_t - 1")
        with torch.no_grad():
            x = F.layer_norm(teacher_tokens.detach().double(), (self.teacher_dim,))
            x = x.reshape(-1, self.teacher_dim)
            if mask is not None:
                x = x[mask.reshape(-1).bool()]
            gram = x.T @ x  # (D_t, D_t)
            energy, vectors = torch.linalg.eigh(gram)  # ascending
            rank = self.key_basis.shape[0]
            top = vectors[:, -rank:].flip(1).T  # (r, D_t), leading first
            top = top * torch.where(top.sum(1, keepdim=True) < 0, -1.0, 1.0)  # fixed signs
            self.key_basis.copy_(top.to(self.key_basis))
            self.key_basis_set.fill_(True)
            return energy[-rank:].sum() / energy.sum().clamp_min(1e-300)

    def attend(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
               teacher_mask: torch.Tensor | None = None, *,
               context: dict[str, Any] | None = None, fused: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Project the student tokens and attend over the teacher tokens.

        Args:
            student_tokens: [B, N_s, D_s].
            teacher_tokens: [B, N_t, D_t] (detached here: the teacher is frozen).
            teacher_mask: [B, N_t] bool, True for real tokens; padded ones get weight 0.
            context: the objective's context (memoises the teacher's layer norm), or None.
            fused: the fused computation (see the module doc); False: the explicit formulas,
                the reference (as is every call with attention dropout in training).

        Returns:
            (z [B, N_s, dim] projected student tokens, y [B, N_s, dim] attended teacher
            features, attention [B, heads, N_s, N_t], or with ``fused`` a zero-argument
            function that computes it (detached); rows of a record without any real
            teacher token are all zero).
        """
        b, n_s, _ = student_tokens.shape
        n_t, h = teacher_tokens.shape[1], self.config.heads
        d_h = self.config.dim // h
        dtype = self.student_proj.weight.dtype
        x = student_tokens.to(dtype)
        z = self.student_proj(x)  # (B, N_s, dim)
        fused = fused and not (self.training and self.config.dropout > 0)
        if fused and self.student_dim < self.config.dim:  # q = W_q (W_s x + b_s) + b_q
            wq, ws = self.query.weight, self.student_proj.weight
            q = F.linear(x, wq @ ws, F.linear(self.student_proj.bias, wq, self.query.bias))
        else:
            q = self.query(z)
        q = q.view(b, n_s, h, d_h).transpose(1, 2)  # (B, h, N_s, d_h)
        if self.low_rank_keys:  # k = W_k (LN(x_t) Pᵀ P) + b_k = (LN(x_t) Pᵀ)(W_k Pᵀ)ᵀ + b_k
            if not bool(self.key_basis_set):  # no basis fitted before training: this batch's
                self.fit_key_basis(teacher_tokens, teacher_mask)
            basis = self.key_basis.to(dtype)

            def coords(t: torch.Tensor) -> torch.Tensor:  # (B, N_t, r)
                with torch.no_grad():
                    return F.linear(teacher_layer_norm(t, dtype, context), basis)

            c = memoised(context, teacher_tokens, f"mhca.coords.{dtype}", coords,
                         guard=self.key_basis, subset=subset_positions(context, teacher_tokens))
            k = F.linear(c, self.key.weight @ basis.T, self.key.bias)  # (B, N_t, dim)
        else:  # the layer norm is memoised per batch
            k = self.key(teacher_layer_norm(teacher_tokens, dtype, context))  # (B, N_t, dim)
        k = k.view(b, n_t, h, d_h).transpose(1, 2)  # (B, h, N_t, d_h)
        value_proj = self.value_proj

        def values(t: torch.Tensor) -> torch.Tensor:  # R LN(x_t), each token on its own
            with torch.no_grad():  # R and the teacher are fixed
                return F.linear(teacher_layer_norm(t, dtype, context), value_proj.to(dtype))

        # read per record from the objective's memo where it keeps one (the first epoch
        # computes on all the batch's tokens, also under teacher_tokens)
        v = memoised(context, teacher_tokens, f"mhca.values.{dtype}", values, guard=value_proj,
                     subset=subset_positions(context, teacher_tokens))  # (B, N_t, dim)
        v = v.view(b, n_t, h, d_h).transpose(1, 2)  # (B, h, N_t, d_h)
        keep = None if teacher_mask is None else teacher_mask.bool()  # (B, N_t)
        if not fused:
            attention = attention_weights(q, k, keep)  # (B, h, N_s, N_t)
            y = self.attn_dropout(attention) @ v  # (B, h, N_s, d_h)
        else:
            mask = any_real = None
            if keep is not None:
                any_real = keep.any(dim=1)  # (B,)
                # a record without real tokens attends to all, then gets y = 0 (as above)
                mask = (keep | ~any_real[:, None])[:, None, None, :]  # (B, 1, 1, N_t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N_s, d_h)
            if any_real is not None and not bool(any_real.all()):
                y = torch.where(any_real[:, None, None, None], y, torch.zeros_like(y))
            qd, kd = q.detach(), k.detach()

            def attention() -> torch.Tensor:
                with torch.no_grad():
                    return attention_weights(qd, kd, keep)

        y = y.transpose(1, 2).reshape(b, n_s, self.config.dim)  # (B, N_s, dim)
        return z, y, attention

    def forward(self, student_out: Any, teacher_out: Any, batch: dict[str, Any] | None = None,
                context: dict[str, Any] | None = None) -> LossOutput:
        """MSE between the projected student tokens and their attended teacher features.

        Args:
            student_out: ECGModelOutput with ``tokens`` [B, N_s, D_s] and optional
                ``token_mask`` [B, N_s] (padded student tokens are left out of the mean).
            teacher_out: ECGModelOutput with ``tokens`` [B, N_t, D_t] and optional
                ``token_mask`` [B, N_t].
            batch: unused.
            context: if given, receives ``mhca.attended`` and ``mhca.student`` (and
                memoises the teacher's layer norm for later terms); with
                ``student_tokens`` in training also ``mhca.student_index`` [K], the student
                token positions they cover.

        Returns:
            LossOutput(value: scalar, the mean over all real student tokens of the batch;
            aux, a read-only mapping: "attention" [B, heads, N_s, N_t] (computed on first
            access), "per_record" [B] each record's mean). With ``student_tokens`` = K <
            N_s in training, N_s is K: the positions of a random subset; likewise N_t with
            ``teacher_tokens`` (``teacher_subset``).
        """
        s_tokens, t_tokens = student_out.tokens, teacher_out.tokens
        if s_tokens.shape[-1] != self.student_dim or t_tokens.shape[-1] != self.teacher_dim:
            raise ValueError(f"mhca: built for widths student {self.student_dim} / teacher "
                             f"{self.teacher_dim}, got {s_tokens.shape[-1]} / "
                             f"{t_tokens.shape[-1]}")
        t_tokens, t_mask, _, _ = teacher_subset(teacher_out, self.config.teacher_tokens,
                                                context, self.training)
        s_mask = getattr(student_out, "token_mask", None)
        index = None
        n_s, keep_n = s_tokens.shape[1], self.config.student_tokens
        if self.training and 0 < keep_n < n_s:
            index = torch.randperm(n_s)[:keep_n].sort().values.to(s_tokens.device)  # (K,)
            s_tokens = s_tokens.index_select(1, index)  # (B, K, D_s)
            s_mask = None if s_mask is None else s_mask.index_select(1, index)
        z, y, attention = self.attend(s_tokens, t_tokens, t_mask, context=context)
        per_token = (z - y).pow(2).mean(dim=-1)  # (B, N_s)
        valid = torch.ones_like(per_token, dtype=torch.bool)
        if s_mask is not None:
            valid = valid & s_mask.bool()
        if t_mask is not None:  # no teacher token to align to: nothing to learn
            valid = valid & t_mask.bool().any(dim=1, keepdim=True)
        weight = valid.to(per_token.dtype)  # (B, N_s)
        total = (per_token * weight).sum()
        value = total / weight.sum().clamp_min(1.0)
        per_record = (per_token * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # (B,)
        if context is not None:
            context["mhca.attended"] = y
            context["mhca.student"] = z
            if index is not None:
                context["mhca.student_index"] = index
        return LossOutput(value, LazyAux({"attention": attention,
                                          "per_record": per_record.detach()}))

    def extra_repr(self) -> str:
        c = self.config
        return (f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, dim={c.dim}, "
                f"heads={c.heads}, dropout={c.dropout}"
                + (f", student_tokens={c.student_tokens}" if c.student_tokens else "")
                + (f", teacher_tokens={c.teacher_tokens}" if c.teacher_tokens else "")
                + (f", teacher_rank={c.teacher_rank}" if c.teacher_rank else ""))


class FixedTeacherProjection(nn.Module):
    """Teacher tokens [..., D_t] -> [..., dim]: layer-normalised (no affine), then a fixed
    random semi-orthogonal map kept as a buffer.

    The teacher side of an alignment loss must not be learnable: if both sides had trainable
    projections (with biases), both could map every token to one point and the loss would
    reach zero with nothing learnt. Normalising also makes the teacher's scale irrelevant.
    """

    def __init__(self, teacher_dim: int, dim: int) -> None:
        super().__init__()
        self.teacher_dim = teacher_dim
        self.register_buffer("weight", semi_orthogonal(dim, teacher_dim))  # (dim, D_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_normalized(F.layer_norm(x, (self.teacher_dim,)))

    def project_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed map alone, on tokens already layer-normalised (``teacher_layer_norm``):
        [..., D_t] -> [..., dim]."""
        return x @ self.weight.to(x.dtype).T  # (..., dim)


__all__ = ["FixedTeacherProjection", "MHCAAlignment", "MHCAConfig", "attention_weights",
           "lead_means", "semi_orthogonal", "subset_positions", "teacher_layer_norm",
           "teacher_subset"]
