"""An ECG tokenizer by residual vector quantization (RVQ): the discrete front end of the
tokenized foundation models (Hypnos, CLMT: ``hypnos.py`` and the translator).

Each lead is tokenized on its own with the same weights: a small 1-D convolutional encoder
turns every patch of ``patch_size`` samples into one latent vector (its receptive field
reaches into the neighbouring patches, so patch edges reconstruct smoothly), and
``vector_quantize_pytorch.ResidualVQ`` quantizes it with K codebooks of C codes, each
quantizing what the previous ones left over. A mirrored decoder maps the summed codes back
to samples. A record [B, L, T] becomes codes [B, L, N, K] (N = ceil(T / patch_size)): at
``K * log2(C)`` bits per patch, ``bits_per_second`` per lead.

The codebooks are learned by exponential moving averages (the library's default), seeded by
k-means on the first batch, and a code no vector chose for a while is replaced by a vector
of the batch (``dead_code_threshold``). Trained with quantizer dropout (a random depth per
batch), so the first k < K codes alone decode to a coarser signal: one model gives the whole
rate-distortion curve (:func:`distill.metrics.signal.prd` against bits per second); without
it (``quantize_dropout=False``) the full depth is the more faithful, the prefixes coarser.
Optional fields deepen the convolutions or replace the one stride-P convolution by a
hierarchy of strided ones (:class:`RVQTokenizerConfig`); their defaults keep the original
architecture.
Trained with ``ecg-distill pretrain`` (recipe ``pretrain.family: rvq``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from distill.models.base import ECGStudentConfig


class RVQTokenizerConfig(ECGStudentConfig):
    """Settings of the RVQ tokenizer.

    Args:
        patch_size: samples per token step (one code stack per lead per patch).
        stem_channels: channels of the convolutions at the sample rate.
        hidden_size: channels at the patch rate.
        codebook_dim: the quantized latent's width.
        num_quantizers: K, the residual codebooks (the depth).
        codebook_size: C, codes per codebook (a power of two: log2(C) bits per code).
        commitment_weight: the encoder's commitment loss weight.
        codebook_decay: EMA decay of the codebooks.
        dead_code_threshold: a code chosen fewer times than this (EMA count) is replaced.
        quantize_dropout: train with a random depth per batch (needed to decode k < K codes).
        patch_strides: optional; the downsampling from samples to patches as a hierarchy of
            strided convolutions (kernel about twice the stride, each followed by a residual
            block; the decoder mirrors it with transposed convolutions), whose product must be
            ``patch_size``, e.g. ``[2, 2, 5]`` for 20 samples. Channels double from
            ``stem_channels`` at each stage up to ``hidden_size`` (the last stage). None (the
            default): one convolution of kernel and stride ``patch_size``.
        patch_blocks: residual blocks (kernel 3) at the patch rate, in the encoder and in
            the decoder each (default 2).
        sample_blocks: residual blocks (kernel 5) at the sample rate, in the encoder and in
            the decoder each (default 1).

    The defaults of the last three give the original architecture exactly (the same
    parameter names and shapes: tokenizers trained before they existed load unchanged).
    """

    model_type = "ecg_rvq"

    patch_size: int = 40  # 0.4 s at 100 Hz
    stem_channels: int = 32
    hidden_size: int = 128
    codebook_dim: int = 64
    num_quantizers: int = 8
    codebook_size: int = 256
    commitment_weight: float = 0.25
    codebook_decay: float = 0.9
    dead_code_threshold: float = 2.0
    quantize_dropout: bool = True
    patch_strides: list[int] | None = None
    patch_blocks: int = 2
    sample_blocks: int = 1

    def __post_init__(self, **kwargs: Any) -> None:
        if self.patch_size < 1 or self.num_quantizers < 1:
            raise ValueError(f"ecg_rvq: patch_size and num_quantizers must be >= 1, got "
                             f"{self.patch_size} and {self.num_quantizers}")
        if self.patch_strides is not None:
            self.patch_strides = [int(v) for v in self.patch_strides]
            if not self.patch_strides or min(self.patch_strides) < 1 \
                    or math.prod(self.patch_strides) != self.patch_size:
                raise ValueError(f"ecg_rvq: patch_strides must be positive integers whose "
                                 f"product is patch_size {self.patch_size}, got "
                                 f"{self.patch_strides}")
        if self.patch_blocks < 0 or self.sample_blocks < 0:
            raise ValueError(f"ecg_rvq: patch_blocks and sample_blocks must be >= 0, got "
                             f"{self.patch_blocks} and {self.sample_blocks}")
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"ecg_rvq: codebook_size must be a power of two >= 2, got "
                             f"{self.codebook_size}")
        super().__post_init__(**kwargs)

    @property
    def num_patches(self) -> int:
        """Token steps per lead, N = ceil(input_samples / patch_size)."""
        return math.ceil(self.input_samples / self.patch_size)

    @property
    def bits_per_code(self) -> float:
        return math.log2(self.codebook_size)

    def bits_per_second(self, depth: int | None = None) -> float:
        """Bits per second of one lead with the first ``depth`` codebooks (default: all)."""
        k = self.num_quantizers if depth is None else depth
        return k * self.bits_per_code * self.sampling_rate / self.patch_size


@dataclass
class RVQOutput(ModelOutput):
    """loss: reconstruction MSE + commitment; reconstruction [B, L, T]; codes [B, L, N, K]
    (int64); commit_loss: the commitment part; mse: the reconstruction part."""

    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    commit_loss: torch.Tensor | None = None
    mse: torch.Tensor | None = None


def _conv(cin: int, cout: int, kernel: int) -> nn.Conv1d:
    return nn.Conv1d(cin, cout, kernel, padding=kernel // 2)


class _Residual(nn.Module):
    """x + conv(GELU(conv(x))): a residual block at one rate."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.GELU(), _conv(channels, channels, kernel), nn.GELU(),
                                  _conv(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _stage_channels(config: RVQTokenizerConfig) -> list[int]:
    """Channels after each downsampling stage: doubling from ``stem_channels``, the last
    ``hidden_size``."""
    n = len(config.patch_strides)
    return [min(config.stem_channels * 2 ** (i + 1), config.hidden_size) for i in range(n - 1)] \
        + [config.hidden_size]


def _stride_kernel(stride: int) -> tuple[int, int]:
    """(kernel, padding) of a convolution that maps length m * stride to m exactly (and of
    its transposed convolution, m to m * stride): kernel about twice the stride."""
    kernel = 2 * stride - stride % 2
    return kernel, (kernel - stride) // 2


def _downsampling(config: RVQTokenizerConfig) -> list[nn.Module]:
    """Samples [s channels] -> patches [h channels]."""
    s, h, p = config.stem_channels, config.hidden_size, config.patch_size
    if config.patch_strides is None:
        return [nn.Conv1d(s, h, p, stride=p)]
    layers: list[nn.Module] = []
    cin = s
    for stride, cout in zip(config.patch_strides, _stage_channels(config)):
        kernel, pad = _stride_kernel(stride)
        layers += [nn.GELU(), nn.Conv1d(cin, cout, kernel, stride=stride, padding=pad),
                   _Residual(cout, 3)]
        cin = cout
    return layers


def _upsampling(config: RVQTokenizerConfig) -> list[nn.Module]:
    """Patches [h channels] -> samples [s channels], mirroring :func:`_downsampling`."""
    s, h, p = config.stem_channels, config.hidden_size, config.patch_size
    if config.patch_strides is None:
        return [nn.ConvTranspose1d(h, s, p, stride=p)]
    chans = _stage_channels(config)
    ins = chans[::-1]
    outs = chans[::-1][1:] + [s]
    layers: list[nn.Module] = []
    for stride, cin, cout in zip(config.patch_strides[::-1], ins, outs):
        kernel, pad = _stride_kernel(stride)
        layers += [nn.ConvTranspose1d(cin, cout, kernel, stride=stride, padding=pad),
                   _Residual(cout, 3), nn.GELU()]
    return layers[:-1]  # the sample-rate blocks follow


class RVQTokenizer(PreTrainedModel):
    """The tokenizer (module docstring). ``forward`` trains it; :meth:`encode` and
    :meth:`decode` are the codec."""

    config_class = RVQTokenizerConfig
    config: RVQTokenizerConfig
    base_model_prefix = "rvq"
    main_input_name = "signal"
    input_names = ("signal",)
    family = "rvq"

    def __init__(self, config: RVQTokenizerConfig) -> None:
        from vector_quantize_pytorch import ResidualVQ

        super().__init__(config)
        s, h, d = config.stem_channels, config.hidden_size, config.codebook_dim
        sample = [_Residual(s, 5) for _ in range(config.sample_blocks)]
        patch = [_Residual(h, 3) for _ in range(config.patch_blocks)]
        self.encoder = nn.Sequential(
            _conv(1, s, 7), *sample, *_downsampling(config),  # one vector per patch
            *patch, nn.GELU(), _conv(h, d, 1))
        self.quantizer = ResidualVQ(
            dim=d, num_quantizers=config.num_quantizers, codebook_size=config.codebook_size,
            decay=config.codebook_decay, commitment_weight=config.commitment_weight,
            kmeans_init=True, kmeans_iters=10,
            threshold_ema_dead_code=config.dead_code_threshold,
            quantize_dropout=config.quantize_dropout and config.num_quantizers > 1)
        self.decoder = nn.Sequential(
            _conv(d, h, 3), *[_Residual(h, 3) for _ in range(config.patch_blocks)], nn.GELU(),
            *_upsampling(config),  # back to samples
            *[_Residual(s, 5) for _ in range(config.sample_blocks)], nn.GELU(), _conv(s, 1, 7))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own initialisation of the convolutions, k-means of the codebooks (on
        the first training batch); here only the library's unsaved constant buffers, which
        a model materialised by ``from_pretrained`` would otherwise hold uninitialised."""
        from vector_quantize_pytorch import ResidualVQ, VectorQuantize

        if isinstance(module, VectorQuantize):
            init.zeros_(module.zero)
        elif isinstance(module, ResidualVQ):
            init.ones_(module.beam_score_weights)

    def _check(self, signal: torch.Tensor) -> torch.Tensor:
        """A float [B, L, input_samples] signal, any number of leads (each is tokenized on
        its own); ValueError naming what came otherwise."""
        t = self.config.input_samples
        if not torch.is_tensor(signal) or not signal.is_floating_point() or signal.dim() != 3 \
                or signal.shape[-1] != t:
            got = list(signal.shape) if torch.is_tensor(signal) else type(signal).__name__
            raise ValueError(f"rvq expects a float signal [B, leads, {t}] ({t} samples at "
                             f"{self.config.sampling_rate} Hz), got {got}")
        return signal.float()

    @property
    def initialised(self) -> bool:
        """Whether every codebook was initialised (k-means on a training batch)."""
        return all(bool(layer._codebook.initted) for layer in self.quantizer.layers)

    def _latents(self, signal: torch.Tensor) -> torch.Tensor:
        """[B, L, T] -> [B*L, N, d]: every lead on its own, zero-padded to N patches."""
        b, l, t = signal.shape
        pad = self.config.num_patches * self.config.patch_size - t
        x = F.pad(signal.reshape(b * l, 1, t), (0, pad))
        return self.encoder(x).transpose(1, 2)  # (B*L, N, d)

    def _samples(self, latents: torch.Tensor, batch: int) -> torch.Tensor:
        """[B*L, N, d] -> [B, L, T]."""
        x = self.decoder(latents.transpose(1, 2))  # (B*L, 1, N*P)
        return x[..., :self.config.input_samples].reshape(batch, -1, self.config.input_samples)

    def forward(self, signal: torch.Tensor, **kwargs: Any) -> RVQOutput:
        """Encode, quantize and decode ``signal`` [B, L, T]; the loss is the reconstruction
        MSE plus the commitment loss (the library gives the commitment loss in training mode
        only; the codebooks learn by EMA in training mode only). With quantizer dropout, the
        codes of a training batch hold -1 at the depths dropped. Other batch entries
        (``**kwargs``) are ignored."""
        signal = self._check(signal)
        b, l, _ = signal.shape
        quantized, codes, commit = self.quantizer(self._latents(signal).float())
        reconstruction = self._samples(quantized.to(self.dtype), b)
        mse = F.mse_loss(reconstruction, signal)
        commit = commit.sum()
        n, k = codes.shape[1], codes.shape[2]
        return RVQOutput(loss=mse + commit, reconstruction=reconstruction,
                         codes=codes.view(b, l, n, k), commit_loss=commit, mse=mse)

    @torch.no_grad()
    def encode(self, signal: torch.Tensor) -> torch.Tensor:
        """signal [B, L, T] -> codes [B, L, N, K] (int64), deterministic: eval mode, fp32
        even under autocast, no EMA update. A tokenizer whose codebooks were never
        initialised (never trained) is refused rather than initialised from this batch."""
        signal = self._check(signal)
        if not self.initialised:
            raise ValueError("rvq: the codebooks were never initialised; train the tokenizer "
                             "(ecg-distill pretrain, family rvq) or load trained weights")
        was = self.training
        self.eval()
        try:
            b, l, _ = signal.shape
            with torch.autocast(signal.device.type, enabled=False):
                _, codes, _ = self.quantizer(self._latents(signal).float())
        finally:
            self.train(was)
        return codes.reshape(b, l, codes.shape[1], codes.shape[2])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """codes [B, L, N, K'] (K' <= K) -> signal [B, L, T] from the first ``depth`` codebooks
        (default: every one given)."""
        b, l, n, k = codes.shape
        if n != self.config.num_patches or not 1 <= k <= self.config.num_quantizers:
            raise ValueError(f"rvq decodes codes [B, L, {self.config.num_patches}, <="
                             f"{self.config.num_quantizers}], got {list(codes.shape)}")
        depth = k if depth is None else depth
        if not 1 <= depth <= k:
            raise ValueError(f"rvq: depth must be in 1..{k}, got {depth}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(f"rvq: codes must lie in 0..{self.config.codebook_size - 1}, got "
                             f"{int(codes.min())}..{int(codes.max())}")
        latents = self.code_vectors(codes[..., :depth]).sum(dim=0)  # (B*L, N, d)
        return self._samples(latents.to(self.dtype), b)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, L, N, k] -> each codebook's vectors [k, B*L, N, d] (their sum is the
        quantized latent; the quantizer works at its input's width, no projection)."""
        b, l, n, k = codes.shape
        books = self.quantizer.codebooks[:k]  # (k, C, d)
        flat = codes.reshape(b * l, n, k).permute(2, 0, 1)  # (k, B*L, N)
        return torch.stack([book[idx] for book, idx in zip(books, flat)])

AutoConfig.register(RVQTokenizerConfig.model_type, RVQTokenizerConfig, exist_ok=True)
AutoModel.register(RVQTokenizerConfig, RVQTokenizer, exist_ok=True)
