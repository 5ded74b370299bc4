"""The masked-modelling families' presets (csfm, lamae) and their pretraining wrappers:
the model code lives in :mod:`distill.models` (teachers load the same models)."""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForPreTraining

from distill.models.masked import ECGForMaskedModeling, MaskedSignalConfig, MaskedSignalModel
from students._registry import check_options, get_preset, register_family, register_preset


_PRETRAINING: dict[str, type[ECGForMaskedModeling]] = {}  # family -> pretraining wrapper
_CONFIGS: dict[tuple[str, str], Any] = {}  # (family, size) -> config builder
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


def masked_families() -> tuple[str, ...]:
    """The families that can be pretrained by masked modelling, sorted."""
    return tuple(sorted(_PRETRAINING))


def pretraining_model(family: str, size: str, **fields: Any) -> ECGForMaskedModeling:
    """A family's pretraining wrapper (encoder + decoder) of one preset, random weights;
    ``fields`` as for ``students.create`` (num_labels defaults to 1: unused in pretraining)."""
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
