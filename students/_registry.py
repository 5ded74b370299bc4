"""The preset registry: ``(family, size) -> builder``, filled by each family's module.

Kept apart from ``students/__init__`` so family modules can register themselves on import
without a circular import (the peft/timm pattern: one decorator, duplicates refused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

SIZES: tuple[str, ...] = ("tiny", "small", "base", "large")

PresetFn = Callable[..., PreTrainedModel]
_PRESETS: dict[tuple[str, str], PresetFn] = {}
_OPTIONS: dict[str, frozenset[str]] = {}  # family -> the keywords its presets accept
_INPUTS: dict[str, tuple[str, ...]] = {}  # family -> what its models read ("signal", "image")
_LEAD_MASK: set[str] = set()  # families whose models read a lead mask (reads_lead_mask)


def register_family(family: str, config_class: type, dials: tuple[str, ...],
                    model_class: type | None = None) -> None:
    """Declare what a family's presets accept: its builder ``dials`` and its own config
    fields (those of the ECG configs, not transformers' generic ones); with
    ``model_class``, also register the pair with ``AutoConfig`` / ``AutoModel`` so a saved
    student reloads with ``AutoModel.from_pretrained``."""
    if model_class is not None:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
    if model_class is not None:
        _INPUTS[family] = tuple(getattr(model_class, "input_names", ("signal",)))
        if getattr(model_class, "reads_lead_mask", False):
            _LEAD_MASK.add(family)
    generic = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    fields = {f.name for f in dataclasses.fields(config_class)} - generic
    _OPTIONS[family] = frozenset(fields | set(dials))


def check_options(family: str, options: Iterable[str]) -> None:
    """ValueError naming the first option that is neither a dial nor a config field."""
    for name in options:
        if name not in _OPTIONS[family]:
            raise ValueError(f"unknown {family} option {name!r}; known: "
                             f"{', '.join(sorted(_OPTIONS[family]))}")


def register_preset(family: str, size: str) -> Callable[[PresetFn], PresetFn]:
    """Decorator: register ``fn(**config_fields) -> model`` as the ``family``/``size`` preset.

    Raises:
        ValueError: for a size outside ``SIZES`` or a preset registered twice.
    """

    def wrap(fn: PresetFn) -> PresetFn:
        if size not in SIZES:
            raise ValueError(f"preset {family}/{size}: size must be one of {', '.join(SIZES)}")
        if (family, size) in _PRESETS:
            raise ValueError(f"student preset {family}/{size} is registered twice")
        _PRESETS[(family, size)] = fn
        return fn

    return wrap


def families() -> tuple[str, ...]:
    """Registered family names, sorted."""
    return tuple(sorted({family for family, _ in _PRESETS}))


def get_preset(family: str, size: str) -> PresetFn:
    """The builder of one preset; ValueError naming the known families or sizes otherwise."""
    known = families()
    if family not in known:
        raise ValueError(f"unknown student family {family!r}; known: {', '.join(known)}")
    if size not in SIZES:
        raise ValueError(f"unknown student size {size!r}; known: {', '.join(SIZES)}")
    if (family, size) not in _PRESETS:
        have = [s for s in SIZES if (family, s) in _PRESETS]
        raise ValueError(f"{family} has no {size!r} preset; its sizes: {', '.join(have)}")
    return _PRESETS[(family, size)]


def preset_names() -> list[tuple[str, str]]:
    """Every registered ``(family, size)``, families sorted, sizes tiny -> base."""
    return [(f, s) for f in families() for s in SIZES if (f, s) in _PRESETS]


def input_names(family: str) -> tuple[str, ...]:
    """What a family's models read: ``("signal",)`` or ``("image",)`` (the rendered
    printout); a family registered without its model class reads the signal."""
    if family not in families():
        get_preset(family, SIZES[0])  # the ValueError naming the known families
    return _INPUTS.get(family, ("signal",))


def reads_lead_mask(family: str) -> bool:
    """Whether a family's students read a lead mask (records with missing leads,
    ``data.on_flat_lead: mask``): their model class sets ``reads_lead_mask``."""
    if family not in families():
        get_preset(family, SIZES[0])  # the ValueError naming the known families
    return family in _LEAD_MASK


def reads_images(family: str) -> bool:
    """Whether a family's students read the rendered printout (the data stage renders it)."""
    return "image" in input_names(family)
