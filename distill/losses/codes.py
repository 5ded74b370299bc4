"""Code-distribution distillation: a tokenized teacher's per-token code distributions as
the target (Hypnos / CLMT teachers, issue 20).

A tokenized teacher reads every lead as a stream of residual-VQ codes. Besides its
features, it knows for each token (lead, patch) how likely every code of its codebooks
is: a soft assignment whose second and third choices say which morphologies the patch
resembles (:func:`distill.models.hypnos.code_logits`). This term teaches the student to
predict those distributions, as token-level KD does for language models, so the student
learns the teacher's discrete vocabulary of beats and waves even where the labels say
nothing.

The student's tokens are not the teacher's: a CNN gives time steps across all leads, a
lead transformer one token per lead. So each teacher token *asks* the student's tokens
with a query made only of where the teacher token sits, its lead and its time within the
record (the relative position among the tokens of its lead), and the student's tokens
answer with keys that carry their own lead and relative time:

    q_i = P_t(time_i) + E_t(lead_i)                         (B, N_t, dim), no teacher features
    k_j = v_j = W_s LN(x_s_j) + P_s(time_j) + E_s(lead_j)   (B, N_s, dim)
    y_i = MHA(q_i, k, v) + q_i
    s_i = W_o GELU(W_h LN(y_i))                             (B, N_t, levels, C) code logits
    L   = T^2 * mean over records, teacher tokens and levels of
          KL( softmax(t_i / T) || softmax(s_i / T) )

The queries never see the teacher's features (which would give the answer away); the
teacher's distributions are the target and are detached. A student whose tokens carry no
time (one token per lead) can only learn each lead's average distribution. The learnable
parts train with the student and are dropped at export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distill.core.leads import NUM_LEADS
from distill.core.schema import spec
from distill.losses import LossOutput, check_fields, register_loss
from distill.losses.alignment import MHCAConfig

TIME_FREQUENCIES = 8  # sin/cos pairs encoding a token's relative time


@dataclass
class CodesConfig:
    """Configuration of the code-distribution term (the recipe section ``distill.codes``)."""

    levels: int = spec(1, help="residual code levels distilled: the teacher's first "
                       "codebooks (1 = the coarsest)", ge=1, le=64)
    temperature: float = spec(1.0, help="softening T of both distributions; the loss is "
                              "scaled by T^2", gt=0)
    dim: int = spec(64, help="width of the cross-attention that reads the student tokens; a "
                    "multiple of heads", ge=1)
    heads: int = spec(2, help="attention heads", ge=1)
    leads: Literal["all", "student"] = spec(
        "all", help="the teacher tokens whose codes are distilled: all, or only those of the "
                    "leads the student reads (a lead-I student cannot see the other leads' "
                    "codes)")

    def __post_init__(self) -> None:
        check_fields(self)

    validate = MHCAConfig.validate  # the same cross-field rule: dim splits into heads


def relative_time(token_leads: torch.Tensor) -> torch.Tensor:
    """Each token's time within its lead: (rank among the tokens of the same lead + 0.5) /
    that lead's token count, in (0, 1); tokens of lead -1 (all leads) form one group.

    Args:
        token_leads: [N] int64, -1..11, tokens of a lead in time order.

    Returns:
        [N] float32.
    """
    groups = F.one_hot(token_leads.long() + 1, NUM_LEADS + 1).float()  # (N, 13)
    rank = (groups.cumsum(0) * groups).sum(1) - 1  # (N,)
    count = (groups.sum(0, keepdim=True) * groups).sum(1)  # (N,)
    return (rank + 0.5) / count


def time_features(t: torch.Tensor) -> torch.Tensor:
    """[N] relative times -> [N, 2F] sin/cos of pi * k * t, k = 1..F."""
    k = torch.arange(1, TIME_FREQUENCIES + 1, device=t.device, dtype=torch.float32)
    angle = math.pi * t.float()[:, None] * k  # (N, F)
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class _Position(nn.Module):
    """Where a token sits: a learned map of its relative time plus its lead's embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.time = nn.Linear(2 * TIME_FREQUENCIES, dim)
        self.lead = nn.Embedding(NUM_LEADS + 1, dim)  # lead -1 (all leads) at index 0

    def forward(self, token_leads: torch.Tensor) -> torch.Tensor:
        """[N] -> [N, dim]."""
        return self.time(time_features(relative_time(token_leads))) + self.lead(token_leads + 1)


@register_loss("codes", config=CodesConfig, default_weight=0.0, order=40)
class CodeDistillation(nn.Module):
    """The student predicts the teacher's code distribution of every teacher token (module
    docstring).

    Args:
        student_dim: D_s, the student's token width.
        teacher_codes: (levels, C) of the teacher's ``code_logits``, given by the objective
            (None: the teacher gives none, which is refused).
        student_leads: standard indices of the leads the student reads, given by the
            objective (for ``leads: student``).
        levels, temperature, dim, heads, leads: :class:`CodesConfig`.
    """

    def __init__(self, student_dim: int, teacher_codes: tuple[int, int] | None = None,
                 student_leads: tuple[int, ...] | None = None, *, levels: int = 1,
                 temperature: float = 1.0, dim: int = 64, heads: int = 2,
                 leads: Literal["all", "student"] = "all") -> None:
        super().__init__()
        self.config = CodesConfig(levels=levels, temperature=temperature, dim=dim, heads=heads,
                                  leads=leads)
        self.config.validate("codes")
        if leads == "student" and not student_leads:
            raise ValueError("codes: leads is 'student', but the student reads no signal "
                             "leads (a printout student); use leads: all")
        # the standard indices of the student's leads (empty: every teacher token)
        self.register_buffer("student_leads", torch.tensor(
            list(student_leads) if leads == "student" else [], dtype=torch.long),
            persistent=False)
        if teacher_codes is None:
            raise ValueError("codes: the teacher gives no code distributions; the codes loss "
                             "needs a tokenized teacher (teacher.kind: foundation on a hypnos "
                             "model)")
        have, self.codebook_size = int(teacher_codes[0]), int(teacher_codes[1])
        if levels > have:
            raise ValueError(f"codes: levels is {levels}, but the teacher gives code "
                             f"distributions for {have} level(s)")
        self.student_norm = nn.LayerNorm(student_dim)
        self.student_proj = nn.Linear(student_dim, dim)
        self.student_pos = _Position(dim)
        self.query_pos = _Position(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                  nn.Linear(dim, levels * self.codebook_size))

    def predict(self, tokens: torch.Tensor, token_leads: torch.Tensor,
                teacher_leads: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Student tokens [B, N_s, D_s] -> code logits [B, N_t, levels, C] for teacher tokens
        of leads ``teacher_leads`` [N_t] (in time order within each lead)."""
        b = tokens.shape[0]
        kv = self.student_proj(self.student_norm(tokens.float())) \
            + self.student_pos(token_leads.to(tokens.device))  # (B, N_s, dim)
        q = self.query_pos(teacher_leads.to(tokens.device)).expand(b, -1, -1)  # (B, N_t, dim)
        pad = None if token_mask is None else ~token_mask.bool()
        y, _ = self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)
        logits = self.head(y + q)  # (B, N_t, levels * C)
        return logits.view(b, q.shape[1], self.config.levels, self.codebook_size)

    def forward(self, student_out: Any, teacher_out: Any, batch: dict[str, Any] | None = None,
                context: dict[str, Any] | None = None) -> LossOutput:
        """KL of the student's code distributions from the teacher's.

        Args:
            student_out: ECGModelOutput with ``tokens`` [B, N_s, D_s] and ``token_leads``
                (``token_mask`` optional).
            teacher_out: ECGModelOutput with ``code_logits`` [B, N_t, K, C] (K >= levels)
                and ``token_leads`` [N_t]; an optional ``token_mask`` [B, N_t] (False: a
                lead the record lacks, ``data.on_flat_lead: mask``) leaves those tokens out.

        Returns:
            LossOutput(value, aux: {"per_level": [levels] KL, "agreement": [levels] share of
            teacher tokens whose most likely code the student ranks first}).
        """
        target = getattr(teacher_out, "code_logits", None)
        if target is None:
            raise ValueError("codes: the teacher's output has no code_logits (a tokenized "
                             "teacher gives them when its code_levels is set)")
        levels, c = self.config.levels, self.codebook_size
        if target.dim() != 4 or target.shape[2] < levels or target.shape[3] != c:
            raise ValueError(f"codes: teacher code_logits {tuple(target.shape)}, expected "
                             f"[B, N_t, >={levels}, {c}]")
        t_leads = teacher_out.token_leads
        t_mask = getattr(teacher_out, "token_mask", None)
        if t_leads.shape[0] != target.shape[1]:
            raise ValueError(f"codes: {target.shape[1]} teacher code distributions for "
                             f"{t_leads.shape[0]} teacher tokens")
        if len(self.student_leads):  # leads: student, the teacher tokens of those leads only
            keep = torch.isin(t_leads.to(self.student_leads.device), self.student_leads)
            if not keep.any():
                raise ValueError(f"codes: leads is 'student', but the teacher has no token of "
                                 f"the student's leads {self.student_leads.tolist()}")
            idx = keep.nonzero().squeeze(1)
            target, t_leads = target[:, idx.to(target.device)], t_leads[idx.to(t_leads.device)]
            if t_mask is not None:
                t_mask = t_mask[:, idx.to(t_mask.device)]
        student = self.predict(student_out.tokens, student_out.token_leads, t_leads,
                               getattr(student_out, "token_mask", None))
        temperature = self.config.temperature
        log_p = F.log_softmax(target[:, :, :levels].detach().float() / temperature, dim=-1)
        log_q = F.log_softmax(student.float() / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2  # (B, N_t, levels)
        agree = (student.argmax(-1) == target[:, :, :levels].argmax(-1)).float()
        if t_mask is None:
            return LossOutput(kl.mean(), {"per_level": kl.detach().mean(dim=(0, 1)),
                                          "agreement": agree.mean(dim=(0, 1))})
        w = t_mask.to(device=kl.device, dtype=kl.dtype)[..., None]  # (B, N_t, 1)
        count = w.sum().clamp(min=1.0)
        return LossOutput((kl * w).sum() / (count * levels),
                          {"per_level": (kl.detach() * w).sum(dim=(0, 1)) / count,
                           "agreement": (agree * w).sum(dim=(0, 1)) / count})

    def extra_repr(self) -> str:
        c = self.config
        return (f"levels={c.levels}, codebook_size={self.codebook_size}, T={c.temperature}, "
                f"leads={c.leads}")


__all__ = ["CodeDistillation", "CodesConfig", "relative_time", "time_features"]
