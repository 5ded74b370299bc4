"""What the masked-modelling foundation models share (CSFM, LAMAE): the config, the
(lead, patch) tokenizer, the masks, the decoder and the pretraining wrapper.

A record [B, L, T] is cut into N patches of P samples per lead: one token per (lead, patch),
lead-major (lead 0's N patches, then lead 1's ...), so ``token_leads`` is exact. Pretraining
hides a share of the tokens (:func:`sample_mask`), encodes only the visible ones (MAE: the
encoder never sees a mask token, so the pretrained encoder reads whole records downstream
unchanged), and a light decoder reconstructs the hidden patches from the visible tokens,
mask tokens and, for LAMAE, the latents of its cross-lead attention. The loss is the mean
squared error over the hidden patches only (:func:`masked_mse`).

``<Family>ForMaskedModeling`` holds the encoder under the family's ``base_model_prefix`` and
the decoder beside it, so ``AutoModel.from_pretrained(folder)`` of a pretraining folder gives
the encoder alone: the decoder's weights are dropped, as a downstream model needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from distill.core.leads import NUM_LEADS
from distill.models.base import (ECGStudentConfig, ECGStudentModel, check_signal,
                                 lead_token_mask)
from distill.models.blocks import Block, BlockWidth, init_weights

MASK_STRATEGIES: tuple[str, ...] = ("patches", "time", "channels", "time_channel")


class MaskedSignalConfig(ECGStudentConfig):
    """Encoder, decoder and masking settings of a masked-modelling foundation model.

    Args:
        patch_size: samples per patch (one token per lead per patch); zero-padded at the end.
        hidden_size, num_layers, num_heads, mlp_ratio: the encoder's width, depth, heads
            and MLP ratio.
        dropout, head_dropout: in attention/MLPs; before the classifier.
        decoder_hidden_size, decoder_layers: the pretraining decoder (dropped downstream).
        mask_ratio: share of the (lead, patch) tokens hidden in pretraining.
        mask_strategy: ``patches`` (random tokens), ``time`` (blocks of patch columns, every
            lead), ``channels`` (whole leads) or ``time_channel`` (both: leads and columns
            of 1 - sqrt(1 - ratio) each, so that the union hides ``mask_ratio``).
        mask_block: patches per time block (``time``, ``time_channel``).
        initializer_range, layer_norm_eps: init std; LayerNorm epsilon.
    """

    patch_size: int = 50  # 0.5 s at 100 Hz
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    head_dropout: float = 0.1
    decoder_hidden_size: int = 64
    decoder_layers: int = 2
    mask_ratio: float = 0.75
    mask_strategy: str = "patches"
    mask_block: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6

    def __post_init__(self, **kwargs: Any) -> None:
        for width, heads in ((self.hidden_size, self.num_heads),
                             (self.decoder_hidden_size, self.decoder_heads)):
            if width % heads:
                raise ValueError(f"{self.model_type}: width {width} is not divisible by its "
                                 f"{heads} heads")
        if self.patch_size < 1:
            raise ValueError(f"{self.model_type}: patch_size must be >= 1, got {self.patch_size}")
        check_masking(self.mask_ratio, self.mask_strategy, self.mask_block)
        super().__post_init__(**kwargs)

    @property
    def num_patches(self) -> int:
        """Tokens per lead, N = ceil(input_samples / patch_size)."""
        return math.ceil(self.input_samples / self.patch_size)

    @property
    def decoder_heads(self) -> int:
        return max(1, self.decoder_hidden_size // 32)


def check_masking(ratio: float, strategy: str, block: int) -> None:
    """ValueError for a ratio outside [0, 1), an unknown strategy or a block < 1."""
    if not 0 <= ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"unknown mask_strategy {strategy!r}; known: {', '.join(MASK_STRATEGIES)}")
    if block < 1:
        raise ValueError(f"mask_block must be >= 1, got {block}")


# ---------------------------------------------------------------- masks


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool of ``scores``' shape, True at the ``k`` lowest entries of each row (last axis)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        out.scatter_(-1, scores.argsort(dim=-1)[..., :k], True)
    return out


def _columns(noise: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """[B, N] -> bool [B, N]: ``k`` columns hidden in whole blocks of ``block`` patches (the
    blocks in random order; the last block taken may be cut)."""
    n = noise.shape[-1]
    group = torch.arange(n, device=noise.device) // block  # (N,)
    rank = noise[:, :math.ceil(n / block)].argsort(dim=1).argsort(dim=1)  # (B, G): block order
    order = rank[:, group] * n + torch.arange(n, device=noise.device)  # within a block: columns
    return _lowest(order, k)


def sample_mask(batch: int, leads: int, patches: int, ratio: float, strategy: str, *,
                block: int = 2, generators: list[torch.Generator] | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Which (lead, patch) tokens pretraining hides: bool [B, L, N], True = hidden.

    Every record hides the same number of tokens (so the visible ones batch without
    padding), and at least one lead and one column stay visible:

    - ``patches``: round(ratio * L * N) tokens at random;
    - ``time``: round(ratio * N) patch columns (every lead), in blocks of ``block``;
    - ``channels``: round(ratio * L) whole leads;
    - ``time_channel``: a = 1 - sqrt(1 - ratio) of the leads and of the columns, whose
      union hides 1 - (1 - a)^2 = ratio of the tokens.

    Args:
        generators: one per record for draws that do not depend on the batch (validation,
            tests); None draws from the global RNG (training: restored on resume).
    """
    check_masking(ratio, strategy, block)

    def draw(*shape: int) -> torch.Tensor:
        if generators is None:
            return torch.rand(batch, *shape, device=device)
        if len(generators) != batch:
            raise ValueError(f"sample_mask: {len(generators)} generators for {batch} records")
        return torch.stack([torch.rand(*shape, generator=g) for g in generators]).to(device)

    if strategy == "patches":
        k = min(round(ratio * leads * patches), leads * patches - 1)
        return _lowest(draw(leads * patches), k).view(batch, leads, patches)
    share = ratio if strategy != "time_channel" else 1 - math.sqrt(1 - ratio)
    hidden = torch.zeros(batch, leads, patches, dtype=torch.bool, device=device)
    if strategy in ("channels", "time_channel"):
        rows = _lowest(draw(leads), min(round(share * leads), leads - 1))  # (B, L)
        hidden |= rows[:, :, None]
    if strategy in ("time", "time_channel"):
        cols = _columns(draw(patches), min(round(share * patches), patches - 1), block)
        hidden |= cols[:, None, :]
    return hidden


def record_generators(index: torch.Tensor, seed: int) -> list[torch.Generator]:
    """One generator per record, seeded by (seed, record index): the same mask for a record
    in every epoch and run (validation and test reconstruction errors)."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in index.tolist()]


def visible_index(hidden: torch.Tensor) -> torch.Tensor:
    """bool [B, L, N] -> int64 [B, V]: the flat (lead-major) positions of the visible tokens,
    ascending; V is the same for every record (ValueError otherwise)."""
    visible = ~hidden.flatten(1)  # (B, L*N)
    counts = visible.sum(dim=1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError("every record of a batch must hide the same number of tokens")
    v = int(counts[0]) if counts.numel() else 0
    order = torch.arange(visible.shape[1], device=hidden.device).expand_as(visible)
    key = torch.where(visible, order, order + visible.shape[1])  # visible first, in order
    return key.argsort(dim=1)[:, :v]


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor
               ) -> torch.Tensor:
    """Mean squared error over the hidden patches only: [B, L, N, P] twice, bool [B, L, N]."""
    per_patch = (prediction - target).pow(2).mean(dim=-1)  # (B, L, N)
    weight = hidden.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


# ---------------------------------------------------------------- tokens


class PatchTokens(nn.Module):
    """[B, L, T] -> tokens [B, L*N, D]: one Linear P -> D shared by every lead, plus a
    learned lead embedding (by standard lead index 0..11: the channel encoding) and a time
    position embedding."""

    _trunc_normal = ("pos_embed",)

    def __init__(self, patch_size: int, num_patches: int, dim: int) -> None:
        super().__init__()
        self.patch_size, self.num_patches = patch_size, num_patches
        self.proj = nn.Linear(patch_size, dim)
        self.lead_embed = nn.Embedding(NUM_LEADS, dim)
        self.pos_embed = nn.Parameter(torch.zeros(num_patches, dim))

    def patches(self, signal: torch.Tensor) -> torch.Tensor:
        """[B, L, T] -> [B, L, N, P] (zero-padded at the end)."""
        b, l, t = signal.shape
        n, p = self.num_patches, self.patch_size
        return F.pad(signal, (0, n * p - t)).view(b, l, n, p)

    def forward(self, signal: torch.Tensor, lead_ids: torch.Tensor) -> torch.Tensor:
        b, l, _ = signal.shape
        n, p = self.num_patches, self.patch_size
        x = self.proj(self.patches(signal).view(b, l * n, p))  # 3-D for bitsandbytes' int8
        x = x.view(b, l, n, -1) + self.lead_embed(lead_ids)[:, None, :] + self.pos_embed
        return x.reshape(b, l * n, -1)  # (B, L*N, D)


def lead_of(config: MaskedSignalConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lead_ids [L] standard indices, token_leads [L*N]) of a config's input rows."""
    lead_ids = torch.tensor(config.lead_ids, device=device)
    return lead_ids, lead_ids.repeat_interleave(config.num_patches)


# ---------------------------------------------------------------- decoder


class MaskedDecoder(nn.Module):
    """Reconstructs every patch from the visible tokens.

    The encoder's visible tokens (projected to the decoder width) go back to their places
    among mask tokens; lead and position embeddings are added; each layer is a self-attention
    block (over the whole record, or within each lead with ``within_lead``) followed, when
    the encoder gives a context (LAMAE's latents), by a cross-attention block reading it.
    A Linear maps every token to its P samples.
    """

    _trunc_normal = ("mask_token", "pos_embed")

    def __init__(self, config: MaskedSignalConfig, *, within_lead: bool, context: bool) -> None:
        super().__init__()
        dd, n = config.decoder_hidden_size, config.num_patches
        self.within_lead = within_lead
        self.embed = nn.Linear(config.hidden_size, dd)
        self.mask_token = nn.Parameter(torch.zeros(dd))
        self.lead_embed = nn.Embedding(NUM_LEADS, dd)
        self.pos_embed = nn.Parameter(torch.zeros(n, dd))
        sub = BlockWidth(config, config.decoder_hidden_size, config.decoder_heads)
        self.blocks = nn.ModuleList(Block(sub) for _ in range(config.decoder_layers))
        self.context_embed = nn.Linear(config.hidden_size, dd) if context else None
        self.cross = nn.ModuleList(Block(sub, cross=True) for _ in range(config.decoder_layers)
                                   ) if context else None
        self.norm = nn.LayerNorm(dd, eps=config.layer_norm_eps)
        self.out = nn.Linear(dd, config.patch_size)

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor, lead_ids: torch.Tensor,
                num_patches: int, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, V, D] at flat positions ``visible`` [B, V] -> patches [B, L, N, P].

        ``context`` [B, K, D] (and ``context_mask`` bool [B, L*N, K], which latents each
        token may read) feeds the cross-attention blocks."""
        b, n, l = tokens.shape[0], num_patches, len(lead_ids)
        x = self.mask_token.expand(b, l * n, -1).clone()  # (B, L*N, Dd)
        x.scatter_(1, visible[..., None].expand(-1, -1, x.shape[-1]), self.embed(tokens).to(x.dtype))
        x = (x.view(b, l, n, -1) + self.lead_embed(lead_ids)[:, None, :] + self.pos_embed)
        x = x.reshape(b, l * n, -1)
        ctx = self.context_embed(context) if self.context_embed is not None else None
        for i, block in enumerate(self.blocks):
            if self.within_lead:
                x = block(x.reshape(b * l, n, -1)).reshape(b, l * n, -1)
            else:
                x = block(x)
            if ctx is not None:
                x = self.cross[i](x, ctx, context_mask)
        return self.out(self.norm(x)).view(b, l, n, -1)  # (B, L, N, P)


# ---------------------------------------------------------------- pretraining wrapper


@dataclass
class MaskedModelingOutput(ModelOutput):
    """loss: MSE over the hidden patches; reconstruction and target [B, L, N, P]; hidden
    bool [B, L, N]."""

    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    target: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class ECGForMaskedModeling(PreTrainedModel):
    """Base of the pretraining wrappers: the family's encoder under ``base_model_prefix``
    plus a :class:`MaskedDecoder`. A family sets ``encoder_class``, ``base_model_prefix``
    and the decoder's layout (``within_lead``, ``context``); its encoder implements
    ``encode_visible(signal, visible) -> (tokens [B, V, D], context or None, context_mask
    or None)``."""

    config: MaskedSignalConfig
    encoder_class: ClassVar[type]
    decoder_within_lead: ClassVar[bool] = False
    decoder_context: ClassVar[bool] = False
    main_input_name = "signal"
    input_names = ("signal",)

    def __init__(self, config: MaskedSignalConfig) -> None:
        super().__init__(config)
        setattr(self, self.base_model_prefix, self.encoder_class(config))
        self.decoder = MaskedDecoder(config, within_lead=self.decoder_within_lead,
                                     context=self.decoder_context)
        self.post_init()
        # pretraining never reads the encoder's classifier: frozen, so that no parameter
        # goes without a gradient (DDP) and no optimiser state is kept for it
        self.encoder.classifier.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config.initializer_range)

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def forward(self, signal: torch.Tensor, hidden: torch.Tensor | None = None, *,
                generators: list[torch.Generator] | None = None, mask_ratio: float | None = None,
                mask_strategy: str | None = None, **kwargs: Any) -> MaskedModelingOutput:
        """Hide tokens, encode the visible ones, reconstruct, score the hidden patches.

        Args:
            signal: [B, L, T] as the encoder reads it.
            hidden: bool [B, L, N] to use instead of a drawn mask.
            generators: per-record generators for the mask draw (see :func:`sample_mask`).
            mask_ratio, mask_strategy: override the config's (e.g. to score each strategy).
            **kwargs: other batch entries, ignored.
        """
        cfg, enc = self.config, self.encoder
        signal = check_signal(signal, cfg, enc.family).to(self.dtype)
        target = enc.tokenizer.patches(signal)  # (B, L, N, P)
        b, l, n, _ = target.shape
        if hidden is None:
            hidden = sample_mask(b, l, n, cfg.mask_ratio if mask_ratio is None else mask_ratio,
                                 mask_strategy or cfg.mask_strategy, block=cfg.mask_block,
                                 generators=generators, device=signal.device)
        visible = visible_index(hidden)  # (B, V)
        tokens, context, context_mask = enc.encode_visible(signal, visible)
        lead_ids, _ = lead_of(cfg, signal.device)
        reconstruction = self.decoder(tokens, visible, lead_ids, n, context, context_mask)
        return MaskedModelingOutput(loss=masked_mse(reconstruction, target, hidden),
                                    reconstruction=reconstruction, target=target, hidden=hidden)


# ---------------------------------------------------------------- encoder base


class MaskedSignalModel(ECGStudentModel):
    """Base of the masked-modelling encoders: (lead, patch) tokens, transformer blocks whose
    attention pattern the family chooses (:meth:`encode`), a pooled embedding
    (:meth:`forward_head`) and a classifier. Reads any subset of the 12 leads with the same
    weights: the lead embedding is indexed by the standard lead, and ``config.leads`` (set
    at load time, e.g. ``from_pretrained(folder, leads=["I"])``) says which rows come. A
    lead mask (a record with missing leads) leaves the missing leads' tokens out of the
    attention and pooling, so such a record reads as it would with its present leads only."""

    reads_lead_mask = True
    config_class = MaskedSignalConfig
    config: MaskedSignalConfig
    _no_split_modules = ("Block",)
    # loaded from a pretraining folder, the decoder is dropped without a report
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: MaskedSignalConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.tokenizer = PatchTokens(config.patch_size, config.num_patches, d)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.classifier = nn.Sequential(nn.Dropout(config.head_dropout),
                                        nn.Linear(self.pooled_size, config.num_labels))

    @property
    def pooled_size(self) -> int:
        return self.config.hidden_size

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config.initializer_range)

    def token_mask(self, lead_mask: torch.Tensor) -> torch.Tensor:
        """bool [B, L] -> [B, L*N]: every patch token of a missing lead is masked."""
        return lead_token_mask(lead_mask, self.config.num_patches)

    def encode(self, x: torch.Tensor, positions: torch.Tensor,
               token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer blocks over tokens [B, M, D] at flat positions [B, M] (row * N +
        patch: lead row and time step of each); ``token_mask`` (bool [B, M], False = a
        missing lead's token: no token reads it); per family."""
        raise NotImplementedError  # abstract: the family's attention pattern

    def context(self, tokens: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the pretraining decoder reads besides the tokens at flat ``positions``
        [B, V]: (context [B, K, D], bool [B, L*N, K]: which of it each decoder token may
        read, or None: all); none by default."""
        return None, None

    def _positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """[B, L*N]: the flat position of every token (row * N + patch)."""
        total = len(self.config.leads) * self.config.num_patches
        return torch.arange(total, device=device).expand(batch, -1)

    def forward_features(self, signal: torch.Tensor, token_mask: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """signal [B, L, T] -> tokens [B, L*N, D] (lead-major) and token_leads [L*N] (the
        standard lead index of each token); ``token_mask`` bool [B, L*N] or None."""
        lead_ids, token_leads = lead_of(self.config, signal.device)
        x = self.tokenizer(signal, lead_ids)  # (B, L*N, D)
        positions = self._positions(x.shape[0], signal.device)
        if token_mask is None:
            return self.encode(x, positions), token_leads
        return self.encode(x, positions, token_mask), token_leads

    def encode_visible(self, signal: torch.Tensor, visible: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encode the tokens at ``visible`` [B, V] only; (tokens, context, context mask)."""
        lead_ids, _ = lead_of(self.config, signal.device)
        x = self.tokenizer(signal, lead_ids)  # (B, L*N, D)
        x = x.gather(1, visible[..., None].expand(-1, -1, x.shape[-1]))  # (B, V, D)
        tokens = self.encode(x, visible)
        return (tokens, *self.context(tokens, visible))
