"""Distillation losses: one file per family, each registered by name (peft-style registry).

Every loss is an ``nn.Module`` called as ``loss(student_out, teacher_out, batch, context)``
on two ``ECGModelOutput``s and returns a ``LossOutput``: the scalar and named auxiliary
tensors worth keeping (attention weights, transport plans, aligned teacher tokens). The
objective passes one ``context`` dict through the terms in order, so a later term can
reuse an earlier one's result (relation matching reads the MHCA-aligned teacher tokens, or
the OT barycentric projection) instead of computing it again.

Losses with learnable parts (projections, the cross-attention) train with the student and
are dropped at export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn


class LossOutput(NamedTuple):
    """A loss value and what it computed on the way (for logs, plots and later terms)."""

    value: torch.Tensor  # scalar
    aux: dict[str, torch.Tensor]


LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a loss under a lower-case ``name`` (duplicates refused)."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is already registered by {LOSSES[name].__name__}")
        LOSSES[name] = cls
        cls.loss_name = name
        return cls

    return wrap


def loss_class(name: str) -> type[nn.Module]:
    _import_families()
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def build_loss(name: str, **config: Any) -> nn.Module:
    """Instantiate registered loss ``name`` with its keyword configuration."""
    return loss_class(name)(**config)


def _import_families() -> None:
    """Import every loss family so its registration runs (idempotent)."""
    import importlib

    for module in ("kd", "alignment", "transport", "relation"):
        importlib.import_module(f"distill.losses.{module}")


__all__ = ["LOSSES", "LossOutput", "build_loss", "loss_class", "register_loss"]
