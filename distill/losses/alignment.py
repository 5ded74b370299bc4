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
from distill.losses import LossOutput, check_fields, register_loss


@dataclass
class MHCAConfig:
    """Configuration of the cross-attention alignment term (the recipe section
    ``distill.mhca``)."""

    dim: int = spec(128, help="common width of projected student tokens, keys and values; "
                    "a multiple of heads", ge=1)
    heads: int = spec(4, help="attention heads", ge=1)
    dropout: float = spec(0.0, help="dropout on the attention weights (training only)",
                          ge=0, lt=1)

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
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.config = MHCAConfig(dim=dim, heads=heads, dropout=dropout)
        self.config.validate("mhca")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.student_proj = nn.Linear(student_dim, dim)  # W_s: student tokens → common width
        self.query = nn.Linear(dim, dim)  # W_q
        self.key = nn.Linear(teacher_dim, dim)  # W_k
        # R: fixed value projection (see the module docstring: a learnable one can collapse)
        self.register_buffer("value_proj", semi_orthogonal(dim, teacher_dim))  # (dim, D_t)
        self.attn_dropout = nn.Dropout(dropout)

    def attend(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
               teacher_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project the student tokens and attend over the teacher tokens.

        Args:
            student_tokens: [B, N_s, D_s].
            teacher_tokens: [B, N_t, D_t] (detached here: the teacher is frozen).
            teacher_mask: [B, N_t] bool, True for real tokens; padded ones get weight 0.

        Returns:
            (z [B, N_s, dim] projected student tokens, y [B, N_s, dim] attended teacher
            features, attention [B, heads, N_s, N_t]; rows of a record without any real
            teacher token are all zero).
        """
        b, n_s, _ = student_tokens.shape
        n_t, h = teacher_tokens.shape[1], self.config.heads
        d_h = self.config.dim // h
        dtype = self.student_proj.weight.dtype
        teacher = F.layer_norm(teacher_tokens.detach().to(dtype), (self.teacher_dim,))  # (B,N_t,D_t)
        z = self.student_proj(student_tokens.to(dtype))  # (B, N_s, dim)
        q = self.query(z).view(b, n_s, h, d_h).transpose(1, 2)  # (B, h, N_s, d_h)
        k = self.key(teacher).view(b, n_t, h, d_h).transpose(1, 2)  # (B, h, N_t, d_h)
        v = (teacher @ self.value_proj.T).view(b, n_t, h, d_h).transpose(1, 2)  # (B,h,N_t,d_h)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_h)  # (B, h, N_s, N_t)
        if teacher_mask is not None:
            keep = teacher_mask.bool()[:, None, None, :]  # (B, 1, 1, N_t)
            # the finite minimum (not -inf) keeps all-padding records free of NaN
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            attention = torch.softmax(scores, dim=-1)
            # a record whose teacher tokens are all padding attends to nothing
            attention = torch.where(keep.any(dim=-1, keepdim=True), attention,
                                    torch.zeros_like(attention))
        else:
            attention = torch.softmax(scores, dim=-1)  # (B, h, N_s, N_t)
        y = self.attn_dropout(attention) @ v  # (B, h, N_s, d_h)
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
            context: if given, receives ``mhca.attended`` and ``mhca.student``.

        Returns:
            LossOutput(value: scalar, the mean over all real student tokens of the batch;
            aux: {"attention": [B, heads, N_s, N_t], "per_record": [B] each record's mean}).
        """
        s_tokens, t_tokens = student_out.tokens, teacher_out.tokens
        if s_tokens.shape[-1] != self.student_dim or t_tokens.shape[-1] != self.teacher_dim:
            raise ValueError(f"mhca: built for widths student {self.student_dim} / teacher "
                             f"{self.teacher_dim}, got {s_tokens.shape[-1]} / "
                             f"{t_tokens.shape[-1]}")
        t_mask = getattr(teacher_out, "token_mask", None)
        z, y, attention = self.attend(s_tokens, t_tokens, t_mask)
        per_token = (z - y).pow(2).mean(dim=-1)  # (B, N_s)
        valid = torch.ones_like(per_token, dtype=torch.bool)
        s_mask = getattr(student_out, "token_mask", None)
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
        return LossOutput(value, {"attention": attention, "per_record": per_record.detach()})

    def extra_repr(self) -> str:
        c = self.config
        return (f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, dim={c.dim}, "
                f"heads={c.heads}, dropout={c.dropout}")


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
        x = F.layer_norm(x, (self.teacher_dim,))  # (..., D_t)
        return x @ self.weight.to(x.dtype).T  # (..., dim)


__all__ = ["FixedTeacherProjection", "MHCAAlignment", "MHCAConfig", "semi_orthogonal"]
