"""xresnet1d: the 1-D residual CNN that leads the PTB-XL benchmark.

Strodthoff, Wagner, Schaeffter, Samek, "Deep Learning for ECG Analysis: Benchmarks and
Insights from PTB-XL" (IEEE JBHI 2021): fastai's xresnet ("Bag of Tricks", He et al. 2019)
in 1-D; xresnet1d101 reaches 0.928 macro AUROC on the superdiagnostic task. As there:

- a stem of three conv-BN-ReLU layers (kernel 5, the first with stride 2), then max-pool;
- four stages of residual blocks, basic (two k-convs) for depth 18/34, bottleneck
  (1 -> k -> 1, expansion 4) for 50/101/152; one width in every stage (64 in the benchmark);
- ResNet-D shortcuts: average-pool then 1x1 conv when the block downsamples;
- the last BN of each residual branch starts at zero, so every block starts as identity;
- a head of concat pooling (max ++ mean over time), BN-dropout-Linear(128)-ReLU, then
  BN-dropout-Linear to the labels (``lin_ftrs_head=[128]`` in the benchmark's fastai model).

Tokens are the time positions of the last stage (``[B, T', C]``, token_leads all -1: a
convolution mixes every lead); pooled is the 128-d pre-logits vector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import initialization as init

from students._common import ECGStudentConfig, ECGStudentModel
from students._registry import register_family, register_preset


class XResNet1dConfig(ECGStudentConfig):
    """Configuration of an xresnet1d (defaults: the benchmark's xresnet1d101, 12 leads, 100 Hz).

    Args:
        stem_widths: output channels of the three stem convolutions.
        stem_kernel_size: kernel of the stem convolutions.
        stage_widths: inner width of each stage (block output = width * expansion).
        stage_depths: residual blocks per stage.
        expansion: 1 = basic blocks, 4 = bottleneck blocks.
        kernel_size: kernel of the k-convolutions inside the blocks.
        head_hidden: width of the head's hidden layer (= pooled); 0 = no hidden layer
            (pooled is then the concat-pooled vector).
        head_dropout: dropout before the classifier (half of it before the hidden layer).
        residual_init_scale: initial scale of the last BN of each residual branch; 0 (the
            default, Goyal et al. 2017 / "Bag of Tricks") makes every block start as
            identity.
    """

    model_type = "ecg_xresnet1d"

    stem_widths: list[int] | tuple[int, ...] = (32, 32, 64)  # benchmark stem_szs
    stem_kernel_size: int = 5  # benchmark kernel_size_stem (fastai 2-D uses 3)
    stage_widths: list[int] | tuple[int, ...] = (64, 64, 64, 64)  # benchmark block_szs
    stage_depths: list[int] | tuple[int, ...] = (3, 4, 23, 3)  # xresnet1d101
    expansion: int = 4  # bottleneck
    kernel_size: int = 5  # benchmark kernel_size
    head_hidden: int = 128  # benchmark lin_ftrs_head=[128]
    head_dropout: float = 0.5  # benchmark ps_head
    residual_init_scale: float = 0.0  # 0: each block starts as identity ("Bag of Tricks")

    def __post_init__(self, **kwargs: Any) -> None:
        self.stem_widths = [int(w) for w in self.stem_widths]
        self.stage_widths = [int(w) for w in self.stage_widths]
        self.stage_depths = [int(d) for d in self.stage_depths]
        if len(self.stem_widths) != 3 or len(self.stage_widths) != len(self.stage_depths):
            raise ValueError(f"xresnet1d needs 3 stem widths and one width per stage, got "
                             f"{self.stem_widths} and {self.stage_widths}/{self.stage_depths}")
        if self.expansion not in (1, 4):
            raise ValueError(f"xresnet1d expansion must be 1 (basic) or 4 (bottleneck), "
                             f"got {self.expansion}")
        super().__post_init__(**kwargs)


class ConvBN(nn.Sequential):
    """Conv1d (no bias, 'same' padding) -> BatchNorm1d -> optional ReLU (fastai ConvLayer).

    ``residual`` marks the last BN of a residual branch (initialised to
    ``config.residual_init_scale``).
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1,
                 act: bool = True, residual: bool = False) -> None:
        bn = nn.BatchNorm1d(cout)
        bn.residual = residual
        layers: list[nn.Module] = [
            nn.Conv1d(cin, cout, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=False),
            bn,
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Residual block with a ResNet-D shortcut (avg-pool, then 1x1 conv where widths differ).

    Args:
        cin: input channels.
        width: inner width; the block outputs ``width * expansion`` channels.
        expansion: 1 = basic (k, k), 4 = bottleneck (1, k, 1).
        stride: 1 or 2 (applied in the k-conv and by the shortcut's average pool).
        kernel_size: kernel of the k-convs.
    """

    def __init__(self, cin: int, width: int, expansion: int, stride: int,
                 kernel_size: int) -> None:
        super().__init__()
        cout = width * expansion
        if expansion == 1:
            convs = [ConvBN(cin, width, kernel_size, stride),
                     ConvBN(width, cout, kernel_size, act=False, residual=True)]
        else:
            convs = [ConvBN(cin, width, 1),
                     ConvBN(width, width, kernel_size, stride),
                     ConvBN(width, cout, 1, act=False, residual=True)]
        self.convs = nn.Sequential(*convs)
        shortcut: list[nn.Module] = []
        if stride != 1:
            shortcut.append(nn.AvgPool1d(stride, ceil_mode=True))
        if cin != cout:
            shortcut.append(ConvBN(cin, cout, 1, act=False))
        self.shortcut = nn.Sequential(*shortcut)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, T) -> (B, cout, T/stride)
        return self.act(self.convs(x) + self.shortcut(x))


class ConcatPool(nn.Module):
    """Max ++ mean over the token axis (fastai AdaptiveConcatPool1d on [B, N, D] tokens)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, 2D)
        return torch.cat([tokens.amax(dim=1), tokens.mean(dim=1)], dim=-1)


class XResNet1dModel(ECGStudentModel):
    """The xresnet1d student (see the module docstring); built from its config only."""

    config_class = XResNet1dConfig
    config: XResNet1dConfig
    base_model_prefix = "xresnet1d"
    family = "xresnet1d"
    _no_split_modules = ("ResBlock",)

    def __init__(self, config: XResNet1dConfig) -> None:
        super().__init__(config)
        c = config
        s0, s1, s2 = c.stem_widths
        self.stem = nn.Sequential(
            ConvBN(len(c.leads), s0, c.stem_kernel_size, stride=2),
            ConvBN(s0, s1, c.stem_kernel_size),
            ConvBN(s1, s2, c.stem_kernel_size),
            nn.MaxPool1d(kernel_size=3, stride=2, padding=1),
        )
        stages, cin = [], s2
        for i, (width, depth) in enumerate(zip(c.stage_widths, c.stage_depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(ResBlock(cin, width, c.expansion, stride, c.kernel_size))
                cin = width * c.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = cin  # token width D
        pooled = 2 * cin
        head: list[nn.Module] = [ConcatPool()]
        if c.head_hidden:
            head += [nn.BatchNorm1d(pooled), nn.Dropout(c.head_dropout / 2),
                     nn.Linear(pooled, c.head_hidden), nn.ReLU(inplace=True)]
            pooled = c.head_hidden
        self.pre_logits = nn.Sequential(*head)
        self.classifier = nn.Sequential(nn.BatchNorm1d(pooled), nn.Dropout(c.head_dropout),
                                        nn.Linear(pooled, c.num_labels))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Kaiming-normal convs and Linears (fastai init_cnn); BN scale 1, or
        ``residual_init_scale`` at the end of a residual branch."""
        if isinstance(module, (nn.Conv1d, nn.Linear)):
            init.kaiming_normal_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            residual = getattr(module, "residual", False)
            init.constant_(module.weight, self.config.residual_init_scale if residual else 1.0)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    def forward_features(self, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem and stages.

        Args:
            signal: [B, L, T] float, already checked against the config.

        Returns:
            tokens [B, T', C] (the last stage's time positions, T' ~ T/32) and
            token_leads [T'] int64, all -1 (each position mixes every lead).
        """
        x = self.stages(self.stem(signal))  # (B, C, T')
        tokens = x.transpose(1, 2)  # (B, T', C)
        token_leads = torch.full((tokens.shape[1],), -1, dtype=torch.long,
                                 device=tokens.device)  # (T',)
        return tokens, token_leads

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Concat pooling and the hidden layer (pooled), then the classifier (logits).

        Args:
            tokens: [B, T', C] from ``forward_features``.
            pre_logits: return pooled [B, D'] instead of logits [B, C].
        """
        pooled = self.pre_logits(tokens)  # (B, D')
        return pooled if pre_logits else self.classifier(pooled)


_DEPTHS: dict[int, tuple[int, tuple[int, ...]]] = {  # depth -> (expansion, blocks per stage)
    18: (1, (2, 2, 2, 2)),
    34: (1, (3, 4, 6, 3)),
    50: (4, (3, 4, 6, 3)),
    101: (4, (3, 4, 23, 3)),
    152: (4, (3, 8, 36, 3)),
}


def _create_xresnet1d(*, depth: int, width: int, **kwargs: Any) -> XResNet1dModel:
    """Build an xresnet1d{depth} whose stages are ``width`` wide (the benchmark: 64).

    Args:
        depth: 18, 34 (basic blocks), 50, 101, 152 (bottleneck).
        width: stage width; the stem is (width/2, width/2, width).
        **kwargs: any other XResNet1dConfig field (num_labels, leads, sampling_rate, ...).
    """
    if depth not in _DEPTHS:
        raise ValueError(f"xresnet1d depth must be one of {sorted(_DEPTHS)}, got {depth}")
    expansion, blocks = _DEPTHS[depth]
    fields = {"stem_widths": (width // 2, width // 2, width), "stage_widths": (width,) * 4,
              "stage_depths": blocks, "expansion": expansion}
    return XResNet1dModel(XResNet1dConfig(**{**fields, **kwargs}))


register_family("xresnet1d", XResNet1dConfig, dials=("depth", "width"),
                model_class=XResNet1dModel)


@register_preset("xresnet1d", "tiny")
def xresnet1d_tiny(**kwargs: Any) -> XResNet1dModel:
    """xresnet1d18 at a quarter of the benchmark width (16)."""
    return _create_xresnet1d(**{"depth": 18, "width": 16, **kwargs})


@register_preset("xresnet1d", "small")
def xresnet1d_small(**kwargs: Any) -> XResNet1dModel:
    """xresnet1d50 at half the benchmark width (32)."""
    return _create_xresnet1d(**{"depth": 50, "width": 32, **kwargs})


@register_preset("xresnet1d", "base")
def xresnet1d_base(**kwargs: Any) -> XResNet1dModel:
    """The benchmark's xresnet1d101 (width 64), its best model on PTB-XL."""
    return _create_xresnet1d(**{"depth": 101, "width": 64, **kwargs})
