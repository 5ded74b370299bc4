"""The EVL-ECG objective: the task loss plus the weighted distillation terms.

    L = (1 − α)·L_task + α·Σ_i λ_i·L_i,    L_task = BCE-with-logits(student logits, labels)

The terms are built and run in the registry's order (``LossFamily.order``: kd, mhca, ot,
any other registered loss, relation last), passing one ``context`` dict along, so relation
matching reads the teacher tokens that mhca (or ot) aligned to the student's instead of
computing them again. The build order matters beyond that: the losses' learnable parts draw
their initial values from the global RNG in that order. A term whose weight λ_i is 0, or
every term when α = 0, is not called at all: no time, no memory, and its learnable parts
are not even built by ``build_objective``. See ``docs/architecture.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import LOSSES, LazyAux, discover, loss_family
from distill.losses.memo import MEMO_KEY, TeacherMemo

UNREGISTERED_ORDER = 50  # where a loss module not in the registry runs (register_loss's default)


class ObjectiveOutput(NamedTuple):
    """The objective's result.

    total: scalar, the value to back-propagate.
    terms: every term, ``"task"`` included, unweighted and detached (for logging).
    aux: each term's auxiliary tensors, detached, keyed ``"<term>.<name>"`` (attention
        weights, transport plans, per-label KD ...): a read-only mapping that reads (and
        computes, where a term computes an entry on demand) an entry only when it is
        accessed, so a training step that logs the terms alone pays for none of them.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    aux: Mapping[str, torch.Tensor]


def term_order(names: list[str]) -> list[str]:
    """Names in building/running order: by the registry's ``order`` (kd 10, mhca 20, ot 30,
    relation 90), ties by name; a name not in the registry ranks at ``UNREGISTERED_ORDER``."""
    discover()

    def rank(name: str) -> tuple[int, str]:
        return (LOSSES[name].order if name in LOSSES else UNREGISTERED_ORDER), name

    return sorted(names, key=rank)


def _as_dict(weights: Mapping[str, float] | Any) -> dict[str, float]:
    """Accept a mapping or a dataclass whose fields are the loss names."""
    if dataclasses.is_dataclass(weights) and not isinstance(weights, type):
        return {k: float(v) for k, v in dataclasses.asdict(weights).items()}
    return {k: float(v) for k, v in dict(weights).items()}


class DistillationObjective(nn.Module):
    """L = (1 − α)·L_task + α·Σ_i λ_i·L_i (EVL-ECG).

    Args:
        alpha: share of the distillation terms, in [0, 1].
        weights: λ_i by loss name (a mapping, or a dataclass whose fields are the names),
            each ≥ 0.
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
        check_requirements(alpha, weights)
        self.alpha = float(alpha)
        self.weights = weights
        self.losses = nn.ModuleDict(dict(losses))
        self._order = (tuple(weights), term_order(list(weights)))  # (names, running order)
        self.teacher_memo: TeacherMemo | None = None  # see keep_teacher_features

    def keep_teacher_features(self, records: int, budget: int | None = None) -> TeacherMemo:
        """Keep what the terms derive from the teacher tokens with fixed maps (their layer
        norm, mhca's values, ot's targets) per record across steps: a
        :class:`~distill.losses.memo.TeacherMemo` for ``records`` records, read for the
        batches whose ``batch["teacher_index"]`` names their records. Only for teacher
        outputs that never change for a record (read from a single-draw cache). Same values
        to float rounding; returns the memo."""
        self.teacher_memo = TeacherMemo(records, budget)
        return self.teacher_memo

    @property
    def active_terms(self) -> list[str]:
        """The distillation terms that run, in running order (λ > 0 and α > 0)."""
        if self.alpha == 0.0:
            return []
        if self._order[0] != tuple(self.weights):  # weights given new names since
            self._order = (tuple(self.weights), term_order(list(self.weights)))
        return [k for k in self._order[1] if self.weights[k] > 0]

    def forward(self, student_out: Any, teacher_out: Any,
                batch: Mapping[str, Any]) -> ObjectiveOutput:
        """Evaluate the objective on one batch.

        Args:
            student_out: the student's ECGModelOutput (``logits`` [B, C], ``tokens``, ...).
            teacher_out: the teacher's ECGModelOutput (or its cached equivalent); may be
                None when α = 0.
            batch: holds ``labels`` [B, C] (0/1) and, when the batch mixes in transfer
                records, ``labeled`` [B] (1 for a labeled record, 0 for a transfer record):
                the task term is then the mean over the labeled records only (0 when none);
                the distillation terms always read every record. ``teacher_index`` [B]
                (the records' indices) lets the terms read their fixed teacher features
                from the memo (``keep_teacher_features``).

        Returns:
            ObjectiveOutput(total, terms, aux).
        """
        logits = student_out.logits  # (B, C)
        labels = batch["labels"].to(device=logits.device, dtype=logits.dtype)  # (B, C)
        # the task term is always computed: it is cheap and the first thing anyone logs
        labeled = batch.get("labeled")
        if labeled is None:
            task = F.binary_cross_entropy_with_logits(logits, labels)
        else:  # transfer records (labeled = 0) never reach the label term
            mask = labeled.to(device=logits.device, dtype=logits.dtype)  # (B,)
            per_record = F.binary_cross_entropy_with_logits(logits, labels,
                                                            reduction="none").mean(dim=1)
            task = (per_record * mask).sum() / mask.sum().clamp(min=1.0)
        terms = {"task": task.detach()}
        aux: dict[str, Any] = {}
        total = (1.0 - self.alpha) * task if self.alpha < 1.0 else task.new_zeros(())
        context: dict[str, Any] = {}
        index = batch.get("teacher_index")
        if self.teacher_memo is not None and index is not None and teacher_out is not None \
                and teacher_out.tokens is not None and teacher_out.tokens.device.type == "cpu":
            context[MEMO_KEY] = (self.teacher_memo, index, teacher_out.tokens)
        for name in self.active_terms:
            out = self.losses[name](student_out, teacher_out, batch, context)
            terms[name] = out.value.detach()
            aux.update({f"{name}.{k}": functools.partial(_detached, out.aux, k) for k in out.aux})
            total = total + self.alpha * self.weights[name] * out.value
        return ObjectiveOutput(total, terms, LazyAux(aux))

    @classmethod
    def build(cls, alpha: float, weights: Mapping[str, float] | Any, student_dim: int,
              teacher_dim: int, teacher_codes: tuple[int, int] | None = None,
              student_leads: tuple[int, ...] | None = None,
              **loss_configs: Mapping[str, Any] | Any) -> DistillationObjective:
        """Same as :func:`build_objective`."""
        return build_objective(alpha, weights, student_dim, teacher_dim,
                               teacher_codes=teacher_codes, student_leads=student_leads,
                               **loss_configs)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, weights={self.weights}"


def _detached(aux: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """A term's aux entry ``key``, detached (computed now if the term left it for later)."""
    return aux[key].detach()


def check_requirements(alpha: float, weights: Mapping[str, float]) -> None:
    """Every active registered term (λ > 0, α > 0) has one of its ``requires_any`` active.

    Raises:
        ValueError: ``objective: 'relation' needs one of mhca, ot weighted > 0 ...``.
    """
    if alpha <= 0:
        return
    discover()
    for name, weight in weights.items():
        if weight <= 0 or name not in LOSSES:
            continue
        needs = LOSSES[name].requires_any
        if needs and not any(weights.get(other, 0.0) > 0 for other in needs):
            raise ValueError(f"objective: '{name}' needs one of {', '.join(needs)} weighted "
                             f"> 0 (it reads their results), but all are 0 or absent; give one "
                             f"of them a weight > 0, or set {name}'s weight to 0")


def build_objective(alpha: float, weights: Mapping[str, float] | Any, student_dim: int,
                    teacher_dim: int, teacher_codes: tuple[int, int] | None = None,
                    student_leads: tuple[int, ...] | None = None,
                    teacher_form: str | None = None,
                    **loss_configs: Mapping[str, Any] | Any) -> DistillationObjective:
    """Build the objective and the registered losses it needs.

    Only terms with λ > 0 (and α > 0) are built, in the registry's order (which fixes the
    order in which their parameters draw from the global RNG). A loss whose constructor
    takes ``student_dim`` / ``teacher_dim`` (mhca, ot's projections) receives the widths.

    Args:
        alpha: share of the distillation terms.
        weights: λ by loss name, e.g. ``{"kd": 1, "mhca": 1, "ot": 0, "relation": 1}`` (a
            mapping, or a dataclass whose fields are the names).
        student_dim: D_s, width of the student's tokens.
        teacher_dim: D_t, width of the teacher's tokens.
        teacher_codes: (levels, C) of a tokenized teacher's code distributions (the
            ``codes`` term's output size); None when the teacher gives none.
        student_leads: standard indices (0..11) of the leads the student reads (the
            ``codes`` term's ``leads: student``); None for a printout student.
        teacher_form: how the teacher tokens arrive from a reduced cache (``ot``'s
            ``teacher_form``: "normed" per-lead means, "projected" after its fixed map);
            None: as the teacher gives them.
        **loss_configs: each loss's configuration, a mapping of its config's fields or the
            config dataclass itself, e.g. ``kd={"temperature": 4.0}``,
            ``mhca=MHCAConfig(dim=64, heads=2)``. Configurations of unweighted terms are
            checked (keys, ranges) but nothing is built.

    Returns:
        DistillationObjective; its ``.parameters()`` are the losses' learnable parts.

    Raises:
        ValueError: an unknown loss name, weighted or configured (``unknown loss 'otl';
            did you mean 'ot'? (known: ...)``); a term whose ``requires_any`` are all
            unweighted; an unknown config key or a bad value.
    """
    weights = _as_dict(weights)
    families = {name: loss_family(name) for name in [*weights, *loss_configs]}
    check_requirements(alpha, weights)
    configs = {name: families[name].make_config(config) for name, config in loss_configs.items()}
    active = [k for k, v in weights.items() if v > 0] if alpha > 0 else []
    losses: dict[str, nn.Module] = {}
    for name in term_order(active):
        losses[name] = families[name].build(configs.get(name), student_dim=student_dim,
                                            teacher_dim=teacher_dim, teacher_codes=teacher_codes,
                                            student_leads=student_leads,
                                            teacher_form=teacher_form)
    return DistillationObjective(alpha, weights, losses)


__all__ = [
    "DistillationObjective",
    "ObjectiveOutput",
    "build_objective",
    "check_requirements",
    "term_order",
]
