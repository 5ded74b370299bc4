"""Geometric relation matching: the student's token geometry versus the aligned teacher's.

EVL-ECG's "geometric intra-architecture relation matching" distils *relations* between the
tokens of one record rather than the tokens themselves: which parts of the ECG the teacher
sees as alike. Relations are width- and scale-free, so they compare across architectures.
Per record, with x the student's tokens [N_s, D_s] and y the teacher tokens aligned to them
[N_s, d] (the MHCA output ``context["mhca.attended"]``, or the OT barycentric projection
``context["ot.barycentric"]`` when MHCA is off):

    distance:  ψ_D(x)_ij = ‖x_i − x_j‖ / mean_{k≠l} ‖x_k − x_l‖
    angle:     ψ_A(x)_ij = cos(x_i, x_j)
    L_rel     = λ_D · ℓ(ψ_D(x), ψ_D(y)) + λ_A · ℓ(ψ_A(x), ψ_A(y))

over pairs i ≠ j of real tokens, averaged per record and then over records; ℓ is smooth-L1
(Huber, as in RKD) or MSE. Both relations are invariant to a global scale and an orthogonal
rotation of either side.

Which tokens: the student side is the student's *own* tokens (``student_out.tokens``), not
MHCA's projection of them: the term should shape the student's representation, and with the
projection in between a learnable linear map could absorb the mismatch instead. The teacher
side is detached: it is a target; the alignment that produced it is trained by its own term.

The batch-level form (``batch_rkd=True``) is relational KD (Park et al. 2019, "Relational
Knowledge Distillation") on the pooled embeddings of the batch: the distance loss on pairwise
distances over their mean (weight 25) and the angle loss on the angles of all triplets
(weight 50), as in the paper's code (full B×B and B×B×B tensors, Huber).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distill.core.errors import RecipeError
from distill.core.schema import spec
from distill.losses import LossOutput, check_fields, register_loss

ALIGNED_SOURCES = ("mhca.attended", "ot.barycentric")  # in order of preference


@dataclass
class RelationConfig:
    """Configuration of the relation-matching term (the recipe section
    ``distill.relation``)."""

    criterion: Literal["smooth_l1", "mse"] = spec(
        "smooth_l1", help="elementwise loss on the relation matrices (smooth_l1: Huber, as RKD)")
    distance_weight: float = spec(1.0, help="λ_D of the per-record token distance matrices",
                                  ge=0)
    angle_weight: float = spec(2.0, help="λ_A of the per-record token cosine matrices (RKD's "
                               "1:2 distance:angle ratio)", ge=0)
    token_relation: bool = spec(True, help="the per-record token form (reads the teacher "
                                "tokens that mhca or ot aligned to the student's)")
    batch_rkd: bool = spec(False, help="also match batch-level RKD distances/angles of the "
                           "pooled embeddings (Park et al. 2019)")
    rkd_distance_weight: float = spec(25.0, help="weight of the RKD distance loss (Park 2019)",
                                      ge=0)
    rkd_angle_weight: float = spec(50.0, help="weight of the RKD angle loss (Park 2019)", ge=0)

    def __post_init__(self) -> None:
        check_fields(self)

    def validate(self, path: str) -> None:
        """Cross-field rule: at least one of the two forms is on."""
        if not (self.token_relation or self.batch_rkd):
            raise RecipeError(f"{path}.token_relation: enable token_relation, batch_rkd or both")


def elementwise(criterion: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ℓ(a, b) entry by entry (no reduction): smooth-L1 (β = 1) or squared error."""
    if criterion == "smooth_l1":
        return F.smooth_l1_loss(a, b, reduction="none")
    return (a - b).pow(2)


def pairwise_distances(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distances between the rows of each set, from a Gram matrix of centred rows.

    Centring first (distances do not depend on it) avoids the cancellation of
    ‖a‖² + ‖b‖² − 2ab for features far from the origin.

    Args:
        x: [B, N, D].
        mask: [B, N] bool, True for real rows (the centre is taken over those).

    Returns:
        [B, N, N], zero on the diagonal; finite gradients everywhere.
    """
    if mask is None:
        centre = x.mean(dim=1, keepdim=True)  # (B, 1, D)
    else:
        w = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
        centre = (x * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
    x = x - centre
    sq = x.pow(2).sum(dim=-1)  # (B, N)
    # |a|² + |b|² − 2 a·b, the product and the subtraction in one baddbmm pass
    d2 = torch.baddbmm(sq.unsqueeze(2) + sq.unsqueeze(1), x, x.transpose(1, 2), alpha=-2.0)
    d = d2.clamp_min(1e-12).sqrt()  # (B, N, N)
    eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    return d.masked_fill(eye, 0.0)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows: [B, N, D] -> [B, N, N]."""
    u = F.normalize(x, dim=-1, eps=1e-12)
    return u @ u.transpose(1, 2)


def token_relation_per_record(student: torch.Tensor, teacher: torch.Tensor,
                              mask: torch.Tensor | None, *, criterion: str = "smooth_l1"
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distance and angle relation losses of each record.

    Args:
        student: [B, N, D_s] student tokens.
        teacher: [B, N, D_t] teacher tokens aligned to them (one per student token).
        mask: [B, N] bool, True for real tokens, or None.
        criterion: ``"smooth_l1"`` or ``"mse"``.

    Returns:
        (distance [B], angle [B], has_pairs [B] bool); records with fewer than two real
        tokens have no pair: their losses are 0 and ``has_pairs`` False.
    """
    b, n, _ = student.shape
    eye = torch.eye(n, dtype=torch.bool, device=student.device)
    if mask is None:
        # every off-diagonal pair counts: the distance matrices are 0 on the diagonal on both
        # sides (ℓ(0, 0) = 0) and the cosines' diagonal terms are subtracted, so no (B, N, N)
        # weight is multiplied in (the same values, to rounding, as with one)
        real, pairs = None, None
        count = torch.full((b,), float(n * (n - 1)), dtype=student.dtype,
                           device=student.device)
    else:
        real = mask.bool()
        pairs = (real.unsqueeze(2) & real.unsqueeze(1) & ~eye).to(student.dtype)  # (B, N, N)
        count = pairs.sum(dim=(1, 2))  # (B,)
    denom = count.clamp_min(1.0)

    def weighted(x: torch.Tensor) -> torch.Tensor:
        return x if pairs is None else x * pairs

    def normalised(x: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(x, real)  # (B, N, N)
        mean = weighted(d).sum(dim=(1, 2)) / denom  # (B,)
        return d / mean.clamp_min(1e-12)[:, None, None]

    dist = weighted(elementwise(criterion, normalised(student), normalised(teacher)))
    cos_s, cos_t = cosine_matrix(student), cosine_matrix(teacher)  # (B, N, N)
    angle = weighted(elementwise(criterion, cos_s, cos_t)).sum(dim=(1, 2))  # (B,)
    if pairs is None:  # less the diagonal's terms (i = j is no pair)
        angle = angle - elementwise(criterion, cos_s.diagonal(dim1=1, dim2=2),
                                    cos_t.diagonal(dim1=1, dim2=2)).sum(-1)
    return dist.sum(dim=(1, 2)) / denom, angle / denom, count > 0


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor, *,
                 criterion: str = "smooth_l1") -> torch.Tensor:
    """RKD distance loss (Park et al. 2019) on one batch of embeddings.

    Args:
        student: [B, D_s]; teacher: [B, D_t] (B ≥ 2).
        criterion: elementwise ℓ, averaged over all B×B entries as in the paper's code.

    Returns:
        scalar.
    """

    def normalised(x: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(x.unsqueeze(0))[0]  # (B, B)
        b = x.shape[0]
        return d / (d.sum() / (b * (b - 1))).clamp_min(1e-12)

    return elementwise(criterion, normalised(student), normalised(teacher)).mean()


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor, *,
              criterion: str = "smooth_l1") -> torch.Tensor:
    """RKD angle loss (Park et al. 2019): cosines of the angle at every vertex of every triplet.

    Args:
        student: [B, D_s]; teacher: [B, D_t].
        criterion: elementwise ℓ, averaged over all B×B×B entries as in the paper's code.

    Returns:
        scalar.
    """

    def angles(x: torch.Tensor) -> torch.Tensor:
        e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2, eps=1e-12)  # (B, B, D): e[a, b]
        return e @ e.transpose(1, 2)  # (B, B, B): cos of the angle b-a-c

    return elementwise(criterion, angles(student), angles(teacher)).mean()


@register_loss("relation", config=RelationConfig, default_weight=1.0, order=90,
               requires_any=("mhca", "ot"))
class RelationMatching(nn.Module):
    """Geometric relation matching (EVL-ECG) with an optional batch-level RKD (Park 2019).

    Args:
        criterion: ``"smooth_l1"`` or ``"mse"``.
        distance_weight, angle_weight: λ of the per-record token distance / cosine matrices.
        token_relation: compute the per-record token form (needs ``mhca`` or ``ot`` to have
            run before, to find the aligned teacher tokens in the context).
        batch_rkd: add RKD on the pooled embeddings of the batch.
        rkd_distance_weight, rkd_angle_weight: its weights (25 and 50 in RKD).
    """

    def __init__(self, *, criterion: Literal["smooth_l1", "mse"] = "smooth_l1",
                 distance_weight: float = 1.0, angle_weight: float = 2.0,
                 token_relation: bool = True, batch_rkd: bool = False,
                 rkd_distance_weight: float = 25.0, rkd_angle_weight: float = 50.0) -> None:
        super().__init__()
        self.config = RelationConfig(
            criterion=criterion, distance_weight=distance_weight, angle_weight=angle_weight,
            token_relation=token_relation, batch_rkd=batch_rkd,
            rkd_distance_weight=rkd_distance_weight, rkd_angle_weight=rkd_angle_weight)
        self.config.validate("relation")

    @staticmethod
    def aligned_teacher(context: dict[str, Any] | None) -> tuple[str, torch.Tensor]:
        """The teacher tokens aligned to the student's: MHCA's output, else OT's barycentres."""
        for key in ALIGNED_SOURCES:
            if context is not None and context.get(key) is not None:
                return key, context[key]
        raise ValueError(
            "relation: the token relation needs the teacher tokens aligned to the student's "
            "tokens, found neither context['mhca.attended'] nor context['ot.barycentric']; "
            "enable mhca or ot (weight > 0, run before relation), or set token_relation=False "
            "and batch_rkd=True")

    def forward(self, student_out: Any, teacher_out: Any, batch: dict[str, Any] | None = None,
                context: dict[str, Any] | None = None) -> LossOutput:
        """Relation loss of the batch.

        Args:
            student_out: ECGModelOutput: ``tokens`` [B, N_s, D_s], optional ``token_mask``
                [B, N_s]; ``pooled`` [B, D_s'] for the RKD form.
            teacher_out: ECGModelOutput: ``pooled`` [B, D_t'] for the RKD form.
            batch: unused.
            context: holds ``mhca.attended`` or ``ot.barycentric`` [B, N_s, d] (and
                ``mhca.student_index`` [K] when mhca aligned a subset of the student's
                tokens: the relations are then those of that subset).

        Returns:
            LossOutput(value: scalar; aux: the unweighted parts "token_distance",
            "token_angle" (scalars), "per_record" [B] (weighted token loss of each record),
            "rkd_distance", "rkd_angle" when computed).
        """
        c = self.config
        parts: list[torch.Tensor] = []
        aux: dict[str, torch.Tensor] = {}
        if c.token_relation:
            source, aligned = self.aligned_teacher(context)
            student = student_out.tokens.float()  # (B, N_s, D_s)
            mask = getattr(student_out, "token_mask", None)
            # the aligner may have aligned a subset of the student tokens (mhca's
            # student_tokens): the relations are those of that subset
            index = context.get(f"{source.split('.')[0]}.student_index")
            if index is not None:
                student = student.index_select(1, index)  # (B, K, D_s)
                mask = None if mask is None else mask.index_select(1, index)
            aligned = aligned.detach().float()  # (B, N_s, d)
            if aligned.shape[:2] != student.shape[:2]:
                raise ValueError(f"relation: aligned teacher tokens {tuple(aligned.shape)} do "
                                 f"not match the student's tokens {tuple(student.shape)}")
            dist, angle, has_pairs = token_relation_per_record(
                student, aligned, mask, criterion=c.criterion)  # (B,) each
            per_record = c.distance_weight * dist + c.angle_weight * angle  # (B,)
            n = has_pairs.sum().clamp_min(1)
            parts.append(per_record.sum() / n)
            aux.update(token_distance=dist.detach().sum() / n,
                       token_angle=angle.detach().sum() / n, per_record=per_record.detach())
        if c.batch_rkd and student_out.pooled.shape[0] >= 2:  # no relation in a batch of one
            s_pooled = student_out.pooled.float()  # (B, D_s')
            t_pooled = teacher_out.pooled.detach().float()  # (B, D_t')
            d = rkd_distance(s_pooled, t_pooled, criterion=c.criterion)
            a = rkd_angle(s_pooled, t_pooled, criterion=c.criterion)
            parts.append(c.rkd_distance_weight * d + c.rkd_angle_weight * a)
            aux.update(rkd_distance=d.detach(), rkd_angle=a.detach())
        if not parts:  # batch_rkd alone on a batch of one record
            return LossOutput(student_out.pooled.new_zeros((), dtype=torch.float32), aux)
        return LossOutput(torch.stack(parts).sum(), aux)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.config).items())


__all__ = ["RelationConfig", "RelationMatching", "cosine_matrix", "pairwise_distances",
           "rkd_angle", "rkd_distance", "token_relation_per_record"]
