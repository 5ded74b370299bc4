"""convnext: a small ConvNeXt reading the rendered printout.

The transformers ``ConvNextModel`` (Liu et al. 2022): a ``stem_stride`` patchify stem,
stages of depthwise 7x7 blocks joined by 2x downsampling. Thin lines on paper suit a
convolutional stem: every output position sees its neighbourhood of the trace. Tokens are
the last stage's grid, one per ``stem_stride * 2^(stages-1)`` square of paper (16 px with
the presets' 4-px stem and 3 stages: 196 tokens at 224 px), each given its lead by the
renderer's patch-to-lead map; pooled is ConvNeXt's layer-normed global average.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import ConvNextConfig, ConvNextModel

from students._image import ECGImageStudentConfig, ECGImageStudentModel
from students._registry import register_family, register_preset


class ConvNeXtStudentConfig(ECGImageStudentConfig):
    """Configuration of a ConvNeXt image student (defaults: the ``tiny`` preset).

    Args:
        widths: channels of each stage.
        depths: blocks of each stage.
        stem_stride: pixels per side of the patchify stem.
        head_dropout: dropout before the classifier.
    """

    model_type = "ecg_convnext"

    widths: list[int] | tuple[int, ...] = (32, 64, 128)
    depths: list[int] | tuple[int, ...] = (1, 1, 3)
    stem_stride: int = 4
    head_dropout: float = 0.1

    def __post_init__(self, **kwargs: Any) -> None:
        self.widths = [int(w) for w in self.widths]
        self.depths = [int(d) for d in self.depths]
        super().__post_init__(**kwargs)
        if not self.widths or len(self.widths) != len(self.depths):
            raise ValueError(f"convnext needs one width per stage, got widths {self.widths} "
                             f"and depths {self.depths}")
        stride = self.token_stride
        if self.image_size % stride:
            raise ValueError(f"convnext: its {stride}-px token stride does not divide "
                             f"image_size {self.image_size}")

    @property
    def token_stride(self) -> int:
        """Pixels per token side: the stem's stride, doubled by each later stage."""
        return int(self.stem_stride) * 2 ** (len(self.depths) - 1)


class ConvNeXtStudentModel(ECGImageStudentModel):
    """A ConvNeXt over the printout; tokens [B, g * g, C_last], pooled [B, C_last]."""

    config_class = ConvNeXtStudentConfig
    family = "convnext"
    quant_kept_modules = {"encoder": "ConvNeXt's pointwise Linear layers read 4-D [B, H, W, C] "
                                     "inputs, which bitsandbytes' int8 matmul does not take"}

    def __init__(self, config: ConvNeXtStudentConfig) -> None:
        super().__init__(config)
        self.token_stride = config.token_stride
        self.encoder = ConvNextModel(ConvNextConfig(
            num_channels=3, patch_size=int(config.stem_stride), num_stages=len(config.depths),
            hidden_sizes=list(config.widths), depths=list(config.depths), drop_path_rate=0.0,
            image_size=config.image_size))
        self.classifier = nn.Sequential(nn.Dropout(config.head_dropout),
                                        nn.Linear(config.widths[-1], config.num_labels))
        self.post_init()

    def forward_features(self, pixels: torch.Tensor  # type: ignore[override]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels [B, 3, S, S] -> (the last stage's tokens [B, g * g, C], their
        layer-normed mean [B, C]: ConvNeXt's pooler)."""
        grid = self.encoder.encoder(self.encoder.embeddings(pixels)).last_hidden_state
        tokens = grid.flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g * g, C)
        return tokens, self.encoder.layernorm(tokens.mean(1))

def _create_convnext(**kwargs: Any) -> ConvNeXtStudentModel:
    return ConvNeXtStudentModel(ConvNeXtStudentConfig(**kwargs))


register_family("convnext", ConvNeXtStudentConfig, dials=(), model_class=ConvNeXtStudentModel)


@register_preset("convnext", "tiny")
def convnext_tiny(**kwargs: Any) -> ConvNeXtStudentModel:
    """Widths 32/64/128, depths 1/1/3, a 4-px stem: 196 tokens at 224 px."""
    return _create_convnext(**{"widths": [32, 64, 128], "depths": [1, 1, 3], **kwargs})


@register_preset("convnext", "small")
def convnext_small(**kwargs: Any) -> ConvNeXtStudentModel:
    """Widths 48/96/192, depths 2/2/6."""
    return _create_convnext(**{"widths": [48, 96, 192], "depths": [2, 2, 6], **kwargs})


@register_preset("convnext", "base")
def convnext_base(**kwargs: Any) -> ConvNeXtStudentModel:
    """Widths 64/128/256, depths 3/3/9."""
    return _create_convnext(**{"widths": [64, 128, 256], "depths": [3, 3, 9], **kwargs})
