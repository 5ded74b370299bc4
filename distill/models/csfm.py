"""CSFM: a channel-agnostic transformer over (channel, time-patch) tokens.

After "Sensing Cardiac Health Across Scenarios and Devices: A Multi-Modal Foundation Model
Pretrained on Heterogeneous Data from 1.7 Million Individuals" (CSFM, arXiv 2507.01045):
every lead is cut into patches, each patch becomes one token through a Linear shared by all
leads, a channel encoding (a learned embedding of the standard lead) and a time position are
added, and one transformer attends over all tokens of all leads together. Nothing in the
weights depends on how many leads come, so the same model reads 12, 6, 2 or 1 lead: load it
with ``from_pretrained(folder, leads=[...])``. Pretrained by masked generative reconstruction
across time and channels (``mask_strategy``: patches, time, channels, time_channel; see
``distill/models/masked.py``). The pooled embedding is the mean of the tokens.

Sizes (the paper's Tiny/Base/Large, scaled to a CPU): ``tiny`` D=64 x 2 blocks, ``base``
D=128 x 4, ``large`` D=256 x 4 (a teacher: more than 10x the quickstart's largest student).
"""

from __future__ import annotations

from typing import Any

import torch

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from distill.models.blocks import masked_mean
from distill.models.masked import ECGForMaskedModeling, MaskedSignalConfig, MaskedSignalModel


class CSFMConfig(MaskedSignalConfig):
    """CSFM's configuration: :class:`~distill.models.masked.MaskedSignalConfig` (the default
    pretraining mask hides patches across time and channels together)."""

    model_type = "ecg_csfm"

    mask_strategy: str = "time_channel"


class CSFMModel(MaskedSignalModel):
    """The CSFM encoder (module docstring): full attention over every (lead, patch) token."""

    config_class = CSFMConfig
    config: CSFMConfig
    base_model_prefix = "csfm"
    family = "csfm"

    def __init__(self, config: CSFMConfig) -> None:
        super().__init__(config)
        self.post_init()

    def encode(self, x: torch.Tensor, positions: torch.Tensor,
               token_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if token_mask is None else token_mask[:, None, :].expand(-1, x.shape[1], -1)
        for block in self.blocks:
            x = block(x, mask=mask)  # (B, M, D): every token reads every (present) token
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False,
                     token_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = masked_mean(tokens, token_mask)  # (B, D): over the present tokens
        return pooled if pre_logits else self.classifier(pooled)


class CSFMForMaskedModeling(ECGForMaskedModeling):
    """CSFM with its pretraining decoder (full attention over the record's tokens)."""

    config_class = CSFMConfig
    base_model_prefix = "csfm"
    encoder_class = CSFMModel
    _no_split_modules = ("Block",)



AutoConfig.register(CSFMConfig.model_type, CSFMConfig, exist_ok=True)
AutoModel.register(CSFMConfig, CSFMModel, exist_ok=True)
AutoModelForPreTraining.register(CSFMConfig, CSFMForMaskedModeling, exist_ok=True)
