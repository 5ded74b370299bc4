"""Compact ECG students: size presets of two families behind one registry.

``create("xresnet1d", "small", num_labels=5)`` builds a model; after ``import students``,
``transformers.AutoModel.from_pretrained(folder)`` reloads any saved student.

Families reading the signal (``input_names = ("signal",)``):
    xresnet1d   the 1-D residual CNN that leads the PTB-XL benchmark (students/xresnet1d.py)
    leadformer  a lead-token transformer with LAMAE latent attention across leads
                (students/leadformer.py), Linear-heavy for 8/4-bit quantization
    csfm        CSFM, a channel-agnostic transformer over (lead, patch) tokens, and
    lamae       LAMAE, lead encoders meeting in latent attention: the seed papers' masked-
                pretrained foundation models (distill/models/; ``ecg-distill pretrain``)

Families reading the rendered printout (``input_names = ("image",)``, students/_image.py):
    vit         a small transformers ViT (students/vit.py)
    convnext    a small transformers ConvNeXt (students/convnext.py)
    llava       a small vision-language model, EVL-ECG's own student (students/llava.py):
                any image-text-to-text model's body, full or LoRA training

Every student is a ``PreTrainedModel`` whose forward returns
``distill.core.contract.ECGModelOutput``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import importlib
import pkgutil

from transformers import PreTrainedModel

from students._common import ECGStudentConfig, ECGStudentModel, check_signal, describe_input
from students._image import ECGImageStudentConfig, ECGImageStudentModel
from students._registry import (SIZES, check_options, families, get_preset, input_names,
                                preset_names, reads_images, reads_lead_mask)
from students.leadformer import LeadFormerConfig, LeadFormerModel
from students.xresnet1d import XResNet1dConfig, XResNet1dModel


def discover() -> None:
    """Import every public module of this package, so that each family's registration runs
    (a new family is one module: its presets, its dials and its AutoModel pair)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


discover()
FAMILIES: tuple[str, ...] = families()


def presets() -> list[tuple[str, str]]:
    """Every ``(family, size)`` preset, e.g. ``("leadformer", "tiny")``."""
    return preset_names()


def create(family: str, size: str = "tiny", *, num_labels: int,
           id2label: Mapping[int, str] | None = None, leads: Sequence[str] | None = None,
           sampling_rate: int = 100, input_seconds: float = 10.0,
           **overrides: Any) -> PreTrainedModel:
    """Build a student preset with random weights.

    Args:
        family: one of ``FAMILIES``.
        size: one of ``SIZES`` (tiny, small, base, large) that the family has.
        num_labels: C, the number of logits.
        id2label: optional names of the labels (index -> name); label2id follows.
        leads: the lead names the model reads, in the order of the signal's rows
            (default: the 12 standard leads); any subset and order.
        sampling_rate: Hz of the input signal.
        input_seconds: seconds per record; ``input_samples = round(rate * seconds)``.
        **overrides: preset dials (``width``, ``depth`` ...) or any config field.

    Returns:
        The model (``PreTrainedModel``), in training mode.

    Raises:
        ValueError: an unknown family, size or override (naming the known ones), or a
            bad value.
    """
    build = get_preset(family, size)
    check_options(family, overrides)
    fields: dict[str, Any] = {"num_labels": num_labels, "sampling_rate": int(sampling_rate),
                              "input_samples": round(sampling_rate * input_seconds)}
    if id2label is not None:
        id2label = {int(i): str(name) for i, name in id2label.items()}
        if len(id2label) != num_labels:
            raise ValueError(f"id2label names {len(id2label)} labels but num_labels is "
                             f"{num_labels}")
        fields.update(id2label=id2label, label2id={n: i for i, n in id2label.items()})
    if leads is not None:
        fields["leads"] = list(leads)
    return build(**{**fields, **overrides})


__all__ = [
    "FAMILIES", "SIZES", "ECGImageStudentConfig", "ECGImageStudentModel", "ECGStudentConfig",
    "ECGStudentModel", "LeadFormerConfig", "LeadFormerModel", "XResNet1dConfig",
    "XResNet1dModel", "check_signal", "create", "describe_input", "discover", "families",
    "input_names", "presets", "reads_images", "reads_lead_mask",
]
