"""``ecg_conv_tower``: a convolutional vision tower for LLaVA, registered with the Auto classes.

LLaVA builds its tower with ``AutoModel.from_config(config.vision_config)`` and reads
``hidden_states[vision_feature_layer]`` as [B, N, C] tokens, so any registered model that
returns its grid as tokens plugs in, saved and loaded through the same
``from_pretrained`` path as a hub VLM (``import teachers`` registers it, as ``import
students`` registers the students).

Why a convolutional stem: attention towers trained from scratch on a few tens of
thousands of printouts learn slowly (measured with ``recipes/teacher-zoo/ecg-vlm-small.yaml``
and a 2-stage Swin, 8-px patches: 0.63-0.64 validation macro AUC after 250-500 steps of
32 images), while 3x3 convolutions with batch norm see the thin traces from the start.

Layout: stages of (3x3 stride-2 conv, ``depths[i]`` 3x3 convs), each with batch norm and ReLU, down to a
``image_size / 2**len(widths)`` grid (224 px, 4 stages: 14 x 14, a 16-px stride), a 1x1
projection to ``hidden_size``, learned position embeddings, then ``num_hidden_layers``
pre-norm transformer layers over the grid's tokens. ``hidden_states`` holds the tokens
after the convolutions and after each transformer layer; there is no CLS token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling


class EcgConvTowerConfig(PreTrainedConfig):
    """Configuration of :class:`EcgConvTowerModel`.

    Args:
        image_size: input side in pixels (square images).
        num_channels: input channels.
        widths: output channels of each convolutional stage (each halves the grid).
        depths: 3x3 stride-1 convolutions after each stage's stride-2 one (default 1 each).
        hidden_size: token width after the 1x1 projection (what LLaVA's projector reads).
        num_hidden_layers: transformer layers over the tokens.
        num_attention_heads: heads of each transformer layer.
        intermediate_size: MLP width of each transformer layer.
    """

    model_type = "ecg_conv_tower"

    image_size: int = 224
    num_channels: int = 3
    widths: list[int] | tuple[int, ...] = (32, 64, 128, 192)
    depths: list[int] | tuple[int, ...] | None = None
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512

    def __post_init__(self, **kwargs: Any) -> None:
        self.widths = [int(w) for w in self.widths]
        self.depths = [1] * len(self.widths) if self.depths is None else [int(d) for d in self.depths]
        if len(self.depths) != len(self.widths) or min(self.depths, default=0) < 0:
            raise ValueError(f"ecg_conv_tower: depths {self.depths} must give a count >= 0 "
                             f"for each of the {len(self.widths)} stages of widths {self.widths}")
        if self.image_size % 2 ** len(self.widths):
            raise ValueError(f"ecg_conv_tower: image_size {self.image_size} is not divisible "
                             f"by 2**{len(self.widths)} (one halving per stage)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ecg_conv_tower: hidden_size {self.hidden_size} is not a multiple "
                             f"of num_attention_heads {self.num_attention_heads}")
        super().__post_init__(**kwargs)

    @property
    def grid(self) -> int:
        """Tokens along each side."""
        return self.image_size // 2 ** len(self.widths)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EcgConvTowerModel(PreTrainedModel):
    """Convolutional stages, then transformer layers over the grid's tokens (see module)."""

    config_class = EcgConvTowerConfig
    config: EcgConvTowerConfig
    base_model_prefix = "ecg_conv_tower"
    main_input_name = "pixel_values"
    _no_split_modules = ("TransformerEncoderLayer",)

    def __init__(self, config: EcgConvTowerConfig) -> None:
        super().__init__(config)
        stages, cin = [], config.num_channels
        for width, depth in zip(config.widths, config.depths):
            stages.append(nn.Sequential(_conv_bn(cin, width, 2),
                                        *(_conv_bn(width, width, 1) for _ in range(depth))))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Conv2d(cin, config.hidden_size, 1)
        self.position = nn.Parameter(torch.zeros(1, config.grid ** 2, config.hidden_size))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(config.hidden_size, config.num_attention_heads,
                                       config.intermediate_size, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.num_hidden_layers))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Kaiming-normal convolutions, unit batch norm, N(0, 0.02) Linears and positions."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, std=0.02)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, EcgConvTowerModel):
            init.normal_(module.position, std=0.02)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> BaseModelOutputWithPooling:
        """pixel_values [B, C, H, W] -> tokens [B, grid * grid, hidden_size].

        ``hidden_states`` (always returned: LLaVA selects a layer from it) holds the tokens
        after the convolutions and after each transformer layer; ``pooler_output`` is
        their mean over the grid.
        """
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"ecg_conv_tower expects pixel_values [B, "
                             f"{self.config.num_channels}, {size}, {size}], got "
                             f"{list(pixel_values.shape)}")
        x = self.proj(self.stages(pixel_values.to(self.proj.weight.dtype)))  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2) + self.position  # (B, g * g, D)
        hidden = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden.append(x)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x.mean(1),
                                          hidden_states=tuple(hidden))


AutoConfig.register(EcgConvTowerConfig.model_type, EcgConvTowerConfig, exist_ok=True)
AutoModel.register(EcgConvTowerConfig, EcgConvTowerModel, exist_ok=True)
