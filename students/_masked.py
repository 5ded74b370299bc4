"""What ``ecg-distill pretrain`` can train, by family: the masked-modelling families' presets
(csfm, lamae: also student families) with their pretraining wrappers, and the tokenized
families (rvq: the RVQ tokenizer; hypnos: next-token prediction over its codes), which are
pretraining-only. The model code lives in :mod:`distill.models` (teachers load the same
models)."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import AutoModelForPreTraining, PreTrainedConfig

from distill.models.masked import ECGForMaskedModeling, MaskedSignalConfig, MaskedSignalModel
from students._registry import (SIZES, check_options, get_preset, preset_names, register_family,
                                register_preset)


_PRETRAINING: dict[str, type[ECGForMaskedModeling]] = {}  # family -> pretraining wrapper
_CONFIGS: dict[tuple[str, str], Any] = {}  # (family, size) -> config builder
_TOKENIZED: dict[str, tuple[type, type, dict[str, dict[str, Any]]]] = {}  # family -> config
# class, pretraining model class, {size: config fields}
# config fields a pretraining run sets itself (not recipe options): the data's rate and
# length, and hypnos' tokenizer (pretrain.tokenizer)
_SET_BY_RUN = ("sampling_rate", "input_samples", "rvq")
DIALS = ("width", "depth", "decoder_width", "decoder_depth", "patch_seconds")


def register_masked_family(family: str, config_class: type[MaskedSignalConfig],
                           model_class: type[MaskedSignalModel],
                           pretraining_class: type[ECGForMaskedModeling],
                           presets: dict[str, dict[str, Any]]) -> None:
    """Register a masked-modelling family: its presets (dials ``width``, ``depth``,
    ``decoder_width``, ``decoder_depth``, ``patch_seconds`` and any config field), the
    encoder with ``AutoModel`` and the wrapper with ``AutoModelForPreTraining``."""
    register_family(family, config_class, dials=DIALS, model_class=model_class)
    AutoModelForPreTraining.register(config_class, pretraining_class, exist_ok=True)
    _PRETRAINING[family] = pretraining_class
    for size, dials in presets.items():
        def config_of(_dials: dict[str, Any] = dials, **kwargs: Any) -> MaskedSignalConfig:
            return _config(config_class, **{**_dials, **kwargs})

        def build(_config_of=config_of, **kwargs: Any) -> MaskedSignalModel:
            return model_class(_config_of(**kwargs))

        _CONFIGS[(family, size)] = config_of
        register_preset(family, size)(build)


def _config(config_class: type[MaskedSignalConfig], *, width: int, depth: int,
            decoder_width: int, decoder_depth: int, patch_seconds: float = 0.5,
            **kwargs: Any) -> MaskedSignalConfig:
    """A config from the dials (heads of width 32; P = round(patch_seconds * rate))."""
    rate = kwargs.get("sampling_rate", 100)
    fields = {"hidden_size": width, "num_layers": depth, "num_heads": max(1, width // 32),
              "decoder_hidden_size": decoder_width, "decoder_layers": decoder_depth,
              "patch_size": max(1, round(patch_seconds * rate))}
    return config_class(**{**fields, **kwargs})


def register_tokenized_family(family: str, config_class: type, pretraining_class: type,
                              presets: dict[str, dict[str, Any]]) -> None:
    """Register a pretraining-only family: ``presets`` maps a size to config fields
    (``patch_seconds`` becomes ``patch_size`` at the data's rate)."""
    _TOKENIZED[family] = (config_class, pretraining_class, presets)


def masked_families() -> tuple[str, ...]:
    """The families that can be pretrained by masked modelling, sorted."""
    return tuple(sorted(_PRETRAINING))


def pretraining_families() -> tuple[str, ...]:
    """Every family ``ecg-distill pretrain`` trains, sorted."""
    return tuple(sorted({*_PRETRAINING, *_TOKENIZED}))


def pretraining_sizes(family: str) -> tuple[str, ...]:
    """The sizes of a pretraining family (ValueError for an unknown family)."""
    if family in _TOKENIZED:
        return tuple(s for s in SIZES if s in _TOKENIZED[family][2])
    if family in _PRETRAINING:
        return tuple(s for f, s in preset_names() if f == family)
    raise ValueError(f"{family!r} cannot be pretrained; these can: "
                     f"{', '.join(pretraining_families())}")


def check_pretraining_options(family: str, options: Any) -> None:
    """ValueError naming the first option the family's pretraining model does not take."""
    if family not in _TOKENIZED:
        check_options(family, options)
        return
    config_class, _, presets = _TOKENIZED[family]
    generic = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    known = {f.name for f in dataclasses.fields(config_class)} - generic - set(_SET_BY_RUN)
    if any("patch_seconds" in fields for fields in presets.values()):
        known.add("patch_seconds")
    else:  # the tokenizer's patches rule (hypnos)
        known -= {"patch_size", "patch_seconds"}
    for name in options:
        if name not in known:
            raise ValueError(f"unknown {family} option {name!r}; known: "
                             f"{', '.join(sorted(known))}")


def pretraining_model(family: str, size: str, **fields: Any) -> Any:
    """A family's pretraining model of one preset, random weights: a masked family's wrapper
    (encoder + decoder; ``fields`` as for ``students.create``, num_labels defaults to 1:
    unused in pretraining), or a tokenized family's model."""
    if family in _TOKENIZED:
        config_class, model_class, presets = _TOKENIZED[family]
        if size not in presets:
            raise ValueError(f"{family} has no {size!r} preset; its sizes: "
                             f"{', '.join(pretraining_sizes(family))}")
        check_pretraining_options(family, [k for k in fields if k not in (
            "input_seconds", "num_labels", *_SET_BY_RUN)])
        preset = dict(presets[size])
        if "patch_size" in fields:  # an explicit patch size wins over the preset's seconds
            preset.pop("patch_seconds", None)
        merged = {**preset, **fields}
        rate = merged.get("sampling_rate", 100)
        if "input_seconds" in merged:
            merged["input_samples"] = round(rate * merged.pop("input_seconds"))
        if "patch_seconds" in merged:
            merged["patch_size"] = max(1, round(merged.pop("patch_seconds") * rate))
        return model_class(config_class(**merged))
    if family not in _PRETRAINING:
        get_preset(family, size)  # unknown family: the ValueError naming the known ones
        raise ValueError(f"{family} cannot be pretrained by masked modelling; these can: "
                         f"{', '.join(masked_families())}")
    get_preset(family, size)
    if "input_seconds" in fields:
        seconds = fields.pop("input_seconds")
        fields["input_samples"] = round(fields.get("sampling_rate", 100) * seconds)
    check_options(family, [k for k in fields if k != "num_labels"])
    fields.setdefault("num_labels", 1)
    return _PRETRAINING[family](_CONFIGS[(family, size)](**fields))
