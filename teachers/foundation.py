"""The ``foundation`` teacher: a pretrained signal foundation model (CSFM, LAMAE, Hypnos).

``name_or_path`` is a folder (or hub id) of a ``csfm``, ``lamae`` or ``hypnos`` model: the
``best/`` of ``ecg-distill pretrain`` (its decoder or depth transformer is dropped on
loading) or any saved encoder. A Hypnos model carries its RVQ tokenizer, which never
trains (its codes are the model's input). The
adapter reads the teacher's signal view, gives the encoder's tokens (one per lead and
patch, so ``token_leads`` is exact and OT lead matching has real leads on the teacher's
side) and its pooled embedding, which the adapter's head reads. The encoder is
channel-agnostic: ``teacher.view.leads`` may be any subset of the 12 leads, read with the
same weights. Train modes as for every teacher: full, lora, head, frozen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from distill.core.leads import canonical_lead_names
from distill.models import csfm, lamae  # noqa: F401  (register the models with AutoModel)
from distill.models.base import check_lead_mask, check_signal
from distill.models.hypnos import HypnosModel
from distill.models.masked import MaskedSignalModel
from teachers.base import TeacherAdapter, load_backbone, register_teacher

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_teacher("foundation")
class FoundationTeacher(TeacherAdapter):
    """A CSFM, LAMAE or Hypnos encoder with a head.

    Args:
        name_or_path: folder or hub id of a csfm/lamae/hypnos model (pretraining folder or
            encoder).
        num_labels, id2label, train_mode, load_in, lora: see :class:`TeacherAdapter`.
        leads: the leads it reads (the teacher view's; None = those it was saved with).
        trust_remote_code: forwarded to ``from_pretrained``.
        dtype: backbone dtype.
    """

    input_names = ("signal",)
    # the teacher view's lead mask (data.on_flat_lead: mask): CSFM and LAMAE leave missing
    # leads out of attention and pooling; Hypnos (codes of a fixed tokenizer) reads zeros
    optional_inputs = ("lead_mask",)
    # kept in full precision by bitsandbytes: the patch embedding (P = 50 inputs, not a whole
    # number of the CPU 4-bit kernel's 64-weight blocks; a few thousand weights) and the
    # encoder's own classifier (unused)
    quant_skip_modules = [r".*tokenizer\.proj", r".*classifier.*"]
    # the encoder's and latent attention's blocks, LAMAE's cross-lead reading included
    lora_targets = r".*(blocks\.\d+|latent_pool\.cross)\.(attn\.(q|kv|proj)|mlp\.(0|3))"

    def __init__(self, name_or_path: str | os.PathLike, *, num_labels: int,
                 id2label: dict[int, str] | None = None, train_mode: str = "full",
                 load_in: str = "none", leads: list[str] | None = None,
                 trust_remote_code: bool = False, lora: Any = None, dtype: str = "float32"):
        from transformers import AutoModel

        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
        local = Path(str(name_or_path)).expanduser()
        if (os.sep in str(name_or_path) or str(name_or_path).startswith((".", "~"))) \
                and not local.exists():
            raise ValueError(f"foundation teacher: {name_or_path} does not exist; make it with "
                             f"`ecg-distill pretrain` (its RUN/pretrain/best)")
        try:
            backbone = load_backbone(AutoModel, name_or_path, load_in=load_in,
                                     trust_remote_code=trust_remote_code,
                                     skip_modules=self.quant_skip_modules, dtype=_DTYPES[dtype])
        except (OSError, ValueError) as exc:  # not a model folder; a hub id not cached here
            raise ValueError(f"foundation teacher: cannot load {name_or_path}: "
                             f"{str(exc).splitlines()[0]}") from None
        if not isinstance(backbone, (MaskedSignalModel, HypnosModel)):
            raise ValueError(f"foundation teacher: {name_or_path} is a "
                             f"{backbone.config.model_type} model, not a csfm, lamae or hypnos "
                             f"encoder (pretrain one with `ecg-distill pretrain`)")
        if leads is not None:
            backbone.config.leads = list(canonical_lead_names(list(leads)))  # ValueError if bad
        super().__init__(backbone=backbone, hidden_size=backbone.pooled_size,
                         num_labels=num_labels, id2label=id2label, train_mode=train_mode,
                         load_in=load_in, source=str(name_or_path),
                         trust_remote_code=trust_remote_code, lora=lora,
                         settings={"leads": leads, "dtype": dtype})
        self._dtype = _DTYPES[dtype]

    @classmethod
    def recipe_settings(cls, teacher: Any, data: Any, view: Any, *,
                        saved: bool = False) -> dict[str, Any]:
        return {"leads": list(view.leads) if view.leads is not None else None}

    @classmethod
    def family_of(cls, name_or_path: str) -> str | None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(name_or_path))
        except (OSError, ValueError):
            return None
        name = {"ecg_csfm": "CSFM", "ecg_lamae": "LAMAE", "ecg_hypnos": "Hypnos"}.get(
            config.model_type, config.model_type)
        if config.model_type == "ecg_lamae" and not getattr(config, "cross_lead", True):
            name += " (independent leads)"
        return name

    def check_recipe(self, data: Any) -> None:
        """The data's rate must be the encoder's (its record length is checked on the first
        batch, with the shapes named)."""
        rate = int(self.hf_model.config.sampling_rate)
        if int(data.sampling_rate) != rate:
            raise ValueError(f"data.sampling_rate: {data.sampling_rate} Hz, but the foundation "
                             f"teacher {self.source} reads {rate} Hz")

    def example_inputs(self, batch_size: int, generator: torch.Generator
                       ) -> dict[str, torch.Tensor]:
        cfg = self.hf_model.config
        return {"signal": torch.randn(batch_size, len(cfg.leads), cfg.input_samples,
                                      generator=generator)}

    def unused_parameter_names(self) -> set[str]:
        """The encoder's own classifier (the adapter's head replaces it) and a Hypnos model's
        tokenizer (fixed: its codes are the input)."""
        fixed = tuple(f"{m}." for m in getattr(self.hf_model, "frozen_modules", ()))
        return {n for n, _ in self.hf_model.named_parameters()
                if n.startswith(("classifier.", *fixed))}

    def forward_features(self, signal: torch.Tensor, lead_mask: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, ...]:
        """(tokens, token_leads, pooled), and token_mask when a ``lead_mask`` (bool [B, L],
        True = present) comes and the encoder reads it (CSFM, LAMAE; Hypnos ignores it)."""
        model = self.hf_model
        where = f"foundation teacher ({model.family})"
        signal = check_signal(signal, model.config, where)
        if lead_mask is None or not getattr(model, "reads_lead_mask", False):
            tokens, token_leads = model.forward_features(signal.to(self._dtype))
            return tokens, token_leads, model.forward_head(tokens, pre_logits=True)
        token_mask = model.token_mask(check_lead_mask(lead_mask, signal, where))
        tokens, token_leads = model.forward_features(signal.to(self._dtype), token_mask=token_mask)
        pooled = model.forward_head(tokens, pre_logits=True, token_mask=token_mask)
        return tokens, token_leads, pooled, token_mask

    def gives_codes(self) -> bool:
        return isinstance(self.hf_model, HypnosModel)

    def forward_codes(self, levels: int, signal: torch.Tensor,
                      lead_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A Hypnos teacher's tokenizer's code distributions per token (the tokens' order:
        lead-major, one per lead and patch); CSFM and LAMAE have no codes."""
        model = self.hf_model
        if not isinstance(model, HypnosModel):
            return super().forward_codes(levels, signal=signal)
        signal = check_signal(signal, model.config, f"foundation teacher ({model.family})")
        return model.forward_codes(signal, levels)
