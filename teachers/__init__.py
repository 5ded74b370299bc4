"""Teacher adapters: large Hugging Face models behind the one ECG output contract.

``create("vlm", "tiny", num_labels=5)`` gives an image teacher, ``create("signal",
"tiny", num_labels=5)`` a signal teacher; a real one is named by hub id or folder (see
docs/architecture.md, "Teachers"). A saved teacher reloads with :func:`load`.
"""

from __future__ import annotations

import os
from typing import Any

from teachers.base import (
    LOAD_IN,
    TEACHERS,
    TRAIN_MODES,
    LoraSettings,
    TeacherAdapter,
    quantization_config,
    teacher_class,
    weight_folders,
)
from teachers import conv_tower  # registers the ecg_conv_tower vision tower with AutoModel
from teachers.foundation import FoundationTeacher
from teachers.signal import SignalTeacher
from teachers.tiny import build_tiny_hubert, build_tiny_vlm, tiny_folder
from teachers.vlm import DEFAULT_PROMPT, VLMTeacher

KINDS: tuple[str, ...] = tuple(sorted(TEACHERS))

__all__ = ["DEFAULT_PROMPT", "FoundationTeacher", "KINDS", "LOAD_IN", "TRAIN_MODES", "LoraSettings", "SignalTeacher",
           "TeacherAdapter", "VLMTeacher", "build_tiny_hubert", "build_tiny_vlm", "create",
           "load", "quantization_config", "teacher_class", "tiny_folder", "weight_folders"]

def create(kind: str, name_or_path: str | os.PathLike = "tiny", *, num_labels: int,
           id2label: dict[int, str] | None = None, train_mode: str = "full",
           load_in: str = "none", tokens: str | None = None, prompt: str | None = None,
           trust_remote_code: bool = False, image_size: int | None = None,
           **settings: Any) -> TeacherAdapter:
    """Build a teacher adapter.

    Args:
        kind: one of :data:`KINDS` ("foundation", "signal", "vlm").
        name_or_path: hub id, local folder, or "tiny" (the built-in random preset).
        num_labels: C.
        id2label: label names.
        train_mode: "full", "lora", "head" or "frozen".
        load_in: "none", "8bit" or "4bit" (nf4), through transformers' BitsAndBytesConfig.
        tokens: vlm only: "vision" (default) or "language".
        prompt: vlm only: the instruction (default :data:`DEFAULT_PROMPT`).
        trust_remote_code: forwarded to ``from_pretrained``; off unless a recipe asks.
        image_size: vlm only: the recipe's render size, checked against the vision tower.
        settings: further adapter arguments (``lora``, ``dtype``, ``render`` for vlm;
            ``sampling_rate``, ``seconds``, ``bandpass``, ``scale`` for signal).

    Returns:
        The adapter (an ``nn.Module`` returning ``ECGModelOutput``).
    """
    cls = teacher_class(kind)
    vlm_args = {"tokens": tokens, "prompt": prompt, "image_size": image_size}
    given = {k: v for k, v in vlm_args.items() if v is not None}
    if cls is VLMTeacher:
        settings.update(given)
    elif given:
        raise ValueError(f"{', '.join(sorted(given))} only apply to the vlm teacher, not {kind!r}")
    return cls(name_or_path, num_labels=num_labels, id2label=id2label, train_mode=train_mode,
               load_in=load_in, trust_remote_code=trust_remote_code, **settings)


def load(folder: str | os.PathLike, **overrides: Any) -> TeacherAdapter:
    """Reload a teacher written by ``save_pretrained`` (any kind), e.g. in a fresh process."""
    return TeacherAdapter.from_pretrained(folder, **overrides)
