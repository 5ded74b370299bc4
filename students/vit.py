"""vit: a small Vision Transformer reading the rendered printout.

The transformers ``ViTModel`` (Dosovitskiy et al. 2021) over the 12-lead printout a
hospital prints or scans: non-overlapping ``patch_size`` patches, a CLS token, pre-norm
transformer blocks and a final layer norm. Tokens are the patch tokens (the CLS token
dropped), one per ``patch_size`` square of paper, each given its lead by the renderer's
patch-to-lead map; pooled is their mean (what the classifier reads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from students._image import ECGImageStudentConfig, ECGImageStudentModel
from students._registry import register_family, register_preset


class ViTStudentConfig(ECGImageStudentConfig):
    """Configuration of a ViT image student (defaults: the ``tiny`` preset).

    Args:
        patch_size: pixels per patch side (the token stride); must divide ``image_size``.
        hidden_size: token width D.
        num_layers: transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        mlp_ratio: MLP width over D.
        head_dropout: dropout before the classifier.
    """

    model_type = "ecg_vit"

    patch_size: int = 16
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 2
    mlp_ratio: float = 2.0
    head_dropout: float = 0.1

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.image_size % int(self.patch_size):
            raise ValueError(f"vit: patch_size {self.patch_size} does not divide image_size "
                             f"{self.image_size}")
        if int(self.hidden_size) % int(self.num_heads):
            raise ValueError(f"vit: num_heads {self.num_heads} does not divide hidden_size "
                             f"{self.hidden_size}")


class ViTStudentModel(ECGImageStudentModel):
    """A ViT over the printout; tokens [B, (S / patch)^2, D], pooled [B, D]."""

    config_class = ViTStudentConfig
    family = "vit"

    def __init__(self, config: ViTStudentConfig) -> None:
        super().__init__(config)
        self.token_stride = int(config.patch_size)
        d = int(config.hidden_size)
        self.encoder = ViTModel(ViTConfig(
            image_size=config.image_size, patch_size=self.token_stride, num_channels=3,
            hidden_size=d, num_hidden_layers=int(config.num_layers),
            num_attention_heads=int(config.num_heads),
            intermediate_size=int(round(config.mlp_ratio * d)), hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0), add_pooling_layer=False)
        self.classifier = nn.Sequential(nn.Dropout(config.head_dropout),
                                        nn.Linear(d, config.num_labels))
        self.post_init()

    def forward_features(self, pixels: torch.Tensor  # type: ignore[override]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels [B, 3, S, S] -> (patch tokens [B, N, D] (CLS dropped), their
        mean [B, D])."""
        hidden = self.encoder(pixel_values=pixels).last_hidden_state  # (B, 1 + N, D)
        tokens = hidden[:, 1:]  # (B, N, D)
        return tokens, tokens.mean(1)

def _create_vit(**kwargs: Any) -> ViTStudentModel:
    return ViTStudentModel(ViTStudentConfig(**kwargs))


register_family("vit", ViTStudentConfig, dials=(), model_class=ViTStudentModel)


@register_preset("vit", "tiny")
def vit_tiny(**kwargs: Any) -> ViTStudentModel:
    """D=64, 4 blocks of 2 heads, 16-px patches (196 tokens at 224 px): 0.2M parameters."""
    return _create_vit(**{"hidden_size": 64, "num_layers": 4, "num_heads": 2, **kwargs})


@register_preset("vit", "small")
def vit_small(**kwargs: Any) -> ViTStudentModel:
    """D=128, 6 blocks of 4 heads, 16-px patches."""
    return _create_vit(**{"hidden_size": 128, "num_layers": 6, "num_heads": 4, **kwargs})


@register_preset("vit", "base")
def vit_base(**kwargs: Any) -> ViTStudentModel:
    """D=192, 12 blocks of 3 heads, MLP 4x (ViT-Ti/16's shape)."""
    return _create_vit(**{"hidden_size": 192, "num_layers": 12, "num_heads": 3,
                          "mlp_ratio": 4.0, **kwargs})
