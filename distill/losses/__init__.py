"""Distillation losses: one file per family, each registered by name with its configuration.

Every loss is an ``nn.Module`` called as ``loss(student_out, teacher_out, batch, context)``
on two ``ECGModelOutput``s and returns a ``LossOutput``: the scalar and named auxiliary
tensors worth keeping (attention weights, transport plans, aligned teacher tokens). The
objective passes one ``context`` dict through the terms in order, so a later term can
reuse an earlier one's result (relation matching reads the MHCA-aligned teacher tokens, or
the OT barycentric projection) instead of computing it again.

A family is registered with ``@register_loss(name, config=..., ...)``: its config
dataclass is the recipe section ``distill.<name>`` (each field declared with
``distill.core.schema.spec``), and its ``order`` fixes where the term is built and run.
``discover()`` imports every module of this package, so a new file
``distill/losses/<x>.py`` that registers a loss is found with no edit elsewhere. How the
losses fit the rest of the suite: ``docs/architecture.md``.

Losses with learnable parts (projections, the cross-attention) train with the student and
are dropped at export.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import operator
import pkgutil
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from distill.core.registry import Registry
from distill.core.schema import unknown_key

# given by the objective, not config: the token widths, (levels, C) of a tokenized
# teacher's code distributions (None when it gives none), and the standard indices of the
# leads the student reads (None for a printout student)
DIM_ARGS = ("student_dim", "teacher_dim", "teacher_codes", "student_leads", "teacher_form")


class LossOutput(NamedTuple):
    """A loss value and what it computed on the way (for logs, plots and later terms)."""

    value: torch.Tensor  # scalar
    aux: Mapping[str, torch.Tensor]  # a dict, or a LazyAux


class LazyAux(Mapping[str, torch.Tensor]):
    """Named outputs as a read-only mapping in which an entry given as a zero-argument
    function is computed on first access, then kept: what only a plot or a log reads (an
    attention map, an entropy) costs nothing in a training step that never reads it."""

    def __init__(self, entries: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._entries[key]
        if not isinstance(value, torch.Tensor):
            value = self._entries[key] = value()
        return value

    def __iter__(self) -> typing.Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._entries)})"


@dataclass(frozen=True)
class LossFamily:
    """A registered loss: its class, its configuration and its place in the objective.

    Attributes:
        name: the registry name, also the recipe key (``distill.weights.<name>``,
            ``distill.<name>.<field>``) and the objective's term name.
        cls: the ``nn.Module``; its constructor takes exactly the config's fields as
            keyword arguments, plus any of :data:`DIM_ARGS` it needs (the token widths, the
            teacher's code shape, the student's leads).
        config: the configuration dataclass (each field a recipe key).
        default_weight: the recipe's default weight λ of the term.
        order: terms are built and run in ascending ``order``, ties by name.
        requires_any: the term needs one of these terms weighted > 0 (it reads their
            results from the context).
    """

    name: str
    cls: type[nn.Module]
    config: type
    default_weight: float
    order: int
    requires_any: tuple[str, ...]

    @property
    def dims(self) -> tuple[str, ...]:
        """Which of :data:`DIM_ARGS` the constructor takes."""
        params = inspect.signature(self.cls.__init__).parameters
        return tuple(name for name in DIM_ARGS if name in params)

    def make_config(self, config: Mapping[str, Any] | Any | None = None) -> Any:
        """The config dataclass from a mapping of its fields (or the instance itself; None:
        the defaults).

        Raises:
            RecipeError (a ValueError): an unknown key, with the closest field
            (``unknown key 'ot.regg'; did you mean 'ot.reg'?``); ValueError: a bad value.
            TypeError: neither a mapping nor this family's config.
        """
        if config is None:
            return self.config()
        if isinstance(config, self.config):
            return config
        if dataclasses.is_dataclass(config) or not isinstance(config, Mapping):
            raise TypeError(f"{self.name}: expected a {self.config.__name__} or a mapping, "
                            f"got {type(config).__name__}")
        valid = [f.name for f in dataclasses.fields(self.config)]
        for key in config:
            if key not in valid:
                raise unknown_key(self.name, str(key), valid)
        return self.config(**config)

    def build(self, config: Mapping[str, Any] | Any | None = None, *,
              student_dim: int | None = None, teacher_dim: int | None = None,
              teacher_codes: tuple[int, int] | None = None,
              student_leads: tuple[int, ...] | None = None,
              teacher_form: str | None = None) -> nn.Module:
        """Instantiate the loss: ``cls(**dims, **asdict(config))``, passing the token widths
        (and the form the teacher tokens arrive in, from a reduced cache) only to a
        constructor that takes them."""
        widths = {"student_dim": student_dim, "teacher_dim": teacher_dim,
                  "teacher_codes": teacher_codes, "student_leads": student_leads,
                  "teacher_form": teacher_form}
        kwargs = {name: widths[name] for name in self.dims if widths[name] is not None}
        return self.cls(**kwargs, **dataclasses.asdict(self.make_config(config)))


LOSSES: Registry[LossFamily] = Registry("loss")


def register_loss(name: str, *, config: type, default_weight: float = 0.0, order: int = 50,
                  requires_any: tuple[str, ...] = ()
                  ) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register a loss family under a lower-case ``name``.

    Args:
        name: the term's name (duplicates refused).
        config: its configuration dataclass; the class's constructor must take exactly its
            fields as keyword arguments (with the same defaults), plus ``student_dim`` /
            ``teacher_dim`` where it needs the token widths.
        default_weight: the recipe's default λ.
        order: where the term is built and run (kd 10, mhca 20, ot 30, relation 90).
        requires_any: names of which at least one must be weighted > 0 for this term.

    Raises:
        ValueError: a duplicate name; TypeError: a constructor that does not match the
        config's fields.
    """

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is already registered by {LOSSES[name].cls.__name__}")
        if not (dataclasses.is_dataclass(config) and isinstance(config, type)):
            raise TypeError(f"loss '{name}': config must be a dataclass, got {config!r}")
        _check_signature(name, cls, config)
        LOSSES.register(name, LossFamily(name, cls, config, float(default_weight), int(order),
                                         tuple(requires_any)))
        cls.loss_name = name
        return cls

    return wrap


def _check_signature(name: str, cls: type, config: type) -> None:
    """The constructor's keyword parameters (widths aside) are the config's fields, with the
    same defaults."""
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
              if k != "self" and k not in DIM_ARGS
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    fields = {f.name: f for f in dataclasses.fields(config)}
    if set(params) != set(fields):
        raise TypeError(f"loss '{name}': {cls.__name__}.__init__ takes {sorted(params)}, "
                        f"its config {config.__name__} has fields {sorted(fields)}")
    for key, p in params.items():
        default = fields[key].default
        if default is not dataclasses.MISSING and p.default != default:
            raise TypeError(f"loss '{name}': {cls.__name__}.__init__ default {key}="
                            f"{p.default!r}, config {config.__name__} says {default!r}")


def discover() -> None:
    """Import every module of this package, so that each registration runs (idempotent)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def loss_family(name: str) -> LossFamily:
    """The registered family ``name``; ValueError naming the closest known name otherwise."""
    discover()
    return LOSSES.get(name)


def loss_families() -> list[LossFamily]:
    """Every registered family, in building/running order (``order``, then name)."""
    discover()
    return sorted((family for _, family in LOSSES.items()), key=lambda f: (f.order, f.name))


def loss_class(name: str) -> type[nn.Module]:
    """The ``nn.Module`` class of loss ``name``."""
    return loss_family(name).cls


def build_loss(name: str, **config: Any) -> nn.Module:
    """Instantiate registered loss ``name`` with keyword configuration (its config's fields,
    and ``student_dim`` / ``teacher_dim`` where it takes them)."""
    return loss_class(name)(**config)


_COMPARE = {"ge": operator.ge, "le": operator.le, "gt": operator.gt, "lt": operator.lt}


@functools.cache
def _field_types(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def check_fields(config: Any) -> None:
    """Check a config dataclass against its own declaration: each field's range
    (``spec(ge=, gt=, le=, lt=)``) and each ``Literal`` field's choices. For
    ``__post_init__``; cross-field rules belong in the config's ``validate(path)``.

    Raises:
        ValueError: ``"<field>: must be > 0, got 0.0"`` (as the recipe's schema words it).
    """
    hints = _field_types(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        tp = hints.get(f.name)
        if typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise ValueError(f"{f.name}: must be one of "
                                 f"{', '.join(repr(c) for c in choices)}, got {value!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        for key, sign in (("ge", ">="), ("le", "<="), ("gt", ">"), ("lt", "<")):
            bound = f.metadata.get(key)
            if bound is not None and not _COMPARE[key](value, bound):
                raise ValueError(f"{f.name}: must be {sign} {bound}, got {value}")


__all__ = [
    "LOSSES",
    "LazyAux",
    "LossFamily",
    "LossOutput",
    "build_loss",
    "check_fields",
    "discover",
    "loss_class",
    "loss_families",
    "loss_family",
    "register_loss",
]
