"""The EVL-ECG objective: the task loss plus the weighted distillation terms.

    L = (1 − α)·L_task + α·Σ_i λ_i·L_i,    L_task = BCE-with-logits(student logits, labels)

The terms run in the order kd, mhca, ot, relation (any other registered loss before
relation), passing one ``context`` dict along, so relation matching reads the teacher tokens
that mhca (or ot) aligned to the student's instead of computing them again. A term whose
weight λ_i is 0, or every term when α = 0, is not called at all: no time, no memory, and its
learnable parts are not even built by ``build_objective``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import loss_class

TERM_ORDER = ("kd", "mhca", "ot", "relation")  # relation last: it reads the others' context


class ObjectiveOutput(NamedTuple):
    """The objective's result.

    total: scalar, the value to back-propagate.
    terms: every term, ``"task"`` included, unweighted and detached (for logging).
    aux: each term's auxiliary tensors, detached, keyed ``"<term>.<name>"`` (attention
        weights, transport plans, per-label KD ...).
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor]


def term_order(names: list[str]) -> list[str]:
    """Names in running order: kd, mhca, ot, then unknown ones (as given), relation last."""

    def rank(item: tuple[int, str]) -> tuple[float, int]:
        position, name = item
        if name in TERM_ORDER:
            return TERM_ORDER.index(name), position
        return TERM_ORDER.index("relation") - 0.5, position

    return [name for _, name in sorted(enumerate(names), key=rank)]


def _as_dict(weights: Mapping[str, float] | Any) -> dict[str, float]:
    """Accept a mapping or a dataclass (the recipe's ``LossWeights``)."""
    if dataclasses.is_dataclass(weights) and not isinstance(weights, type):
        return {k: float(v) for k, v in dataclasses.asdict(weights).items()}
    return {k: float(v) for k, v in dict(weights).items()}


class DistillationObjective(nn.Module):
    """L = (1 − α)·L_task + α·Σ_i λ_i·L_i (EVL-ECG).

    Args:
        alpha: share of the distillation terms, in [0, 1].
        weights: λ_i by loss name (a mapping or the recipe's ``LossWeights``), each ≥ 0.
        losses: the loss modules by name; every name with λ > 0 must have one (modules for
            zero-weight names may be present and are never called).

    Its parameters are those of the loss modules (projections, cross-attention); the
    trainer optimises them together with the student and drops them at export.
    """

    def __init__(self, alpha: float, weights: Mapping[str, float] | Any,
                 losses: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"objective: alpha must lie in [0, 1], got {alpha}")
        weights = _as_dict(weights)
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(f"objective: loss weights must be >= 0, got {negative}")
        missing = sorted(k for k, v in weights.items()
                         if v > 0 and alpha > 0 and k not in losses)
        if missing:
            raise ValueError(f"objective: no loss module for weighted term(s) {missing}; "
                             f"modules given: {sorted(losses)}")
        self.alpha = float(alpha)
        self.weights = weights
        self.losses = nn.ModuleDict(dict(losses))

    @property
    def active_terms(self) -> list[str]:
        """The distillation terms that run, in running order (λ > 0 and α > 0)."""
        if self.alpha == 0.0:
            return []
        return term_order([k for k, v in self.weights.items() if v > 0])

    def forward(self, student_out: Any, teacher_out: Any,
                batch: Mapping[str, Any]) -> ObjectiveOutput:
        """Evaluate the objective on one batch.

        Args:
            student_out: the student's ECGModelOutput (``logits`` [B, C], ``tokens``, ...).
            teacher_out: the teacher's ECGModelOutput (or its cached equivalent); may be
                None when α = 0.
            batch: holds ``labels`` [B, C] (0/1).

        Returns:
            ObjectiveOutput(total, terms, aux).
        """
        logits = student_out.logits  # (B, C)
        labels = batch["labels"].to(device=logits.device, dtype=logits.dtype)  # (B, C)
        # the task term is always computed: it is cheap and the first thing anyone logs
        task = F.binary_cross_entropy_with_logits(logits, labels)
        terms = {"task": task.detach()}
        aux: dict[str, torch.Tensor] = {}
        total = (1.0 - self.alpha) * task if self.alpha < 1.0 else task.new_zeros(())
        context: dict[str, Any] = {}
        for name in self.active_terms:
            out = self.losses[name](student_out, teacher_out, batch, context)
            terms[name] = out.value.detach()
            aux.update({f"{name}.{k}": v.detach() for k, v in out.aux.items()})
            total = total + self.alpha * self.weights[name] * out.value
        return ObjectiveOutput(total, terms, aux)

    @classmethod
    def build(cls, alpha: float, weights: Mapping[str, float] | Any, student_dim: int,
              teacher_dim: int, **loss_configs: Mapping[str, Any]) -> DistillationObjective:
        """Same as :func:`build_objective`."""
        return build_objective(alpha, weights, student_dim, teacher_dim, **loss_configs)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, weights={self.weights}"


def build_objective(alpha: float, weights: Mapping[str, float] | Any, student_dim: int,
                    teacher_dim: int, **loss_configs: Mapping[str, Any]) -> DistillationObjective:
    """Build the objective and the registered losses it needs.

    Only terms with λ > 0 (and α > 0) are built. A loss whose constructor takes
    ``student_dim`` / ``teacher_dim`` (mhca, ot's projections) receives the token widths.

    Args:
        alpha: share of the distillation terms.
        weights: λ by loss name, e.g. ``{"kd": 1, "mhca": 1, "ot": 0, "relation": 1}``.
        student_dim: D_s, width of the student's tokens.
        teacher_dim: D_t, width of the teacher's tokens.
        **loss_configs: keyword configuration per loss name, e.g.
            ``kd={"temperature": 4.0}, mhca={"dim": 64, "heads": 2}``.

    Returns:
        DistillationObjective; its ``.parameters()`` are the losses' learnable parts.

    Raises:
        ValueError: for an unknown loss name (``unknown loss 'otl'; known: ...``).
    """
    weights = _as_dict(weights)
    for name in [*weights, *loss_configs]:
        loss_class(name)  # an unknown name fails here, whether weighted or configured
    active = [k for k, v in weights.items() if v > 0] if alpha > 0 else []
    losses: dict[str, nn.Module] = {}
    for name in term_order(active):
        cls = loss_class(name)
        config = dict(loss_configs.get(name, {}))
        params = inspect.signature(cls.__init__).parameters
        if "student_dim" in params:
            config.setdefault("student_dim", student_dim)
        if "teacher_dim" in params:
            config.setdefault("teacher_dim", teacher_dim)
        losses[name] = cls(**config)
    return DistillationObjective(alpha, weights, losses)


__all__ = [
    "TERM_ORDER",
    "DistillationObjective",
    "ObjectiveOutput",
    "build_objective",
    "term_order",
]
