"""LeadFormer: a lead-token transformer with latent attention across leads.

Each lead is cut into non-overlapping patches of P samples and embedded by ONE Linear P->D
shared by every lead; a learned lead embedding (indexed by the standard lead index 0..11)
and a time position embedding are added. A pre-norm transformer then runs over time WITHIN
each lead (the B*L lead sequences form one batch; weights shared across leads). Leads meet
only in the last step, latent attention as in LAMAE (Foundation Model for Cardiac Time
Series via Masked Latent Attention, ICLR 2026 FM4Science workshop): K learned latent
queries cross-attend over every lead-time token, a few self-attention blocks mix the
latents, and their mean is the pooled embedding. Attention over a set is blind to the
order of its elements, so the pooled embedding and logits do not depend on the order of
the leads, and any subset of the 12 leads works with the same weights.

Every weight matrix is an ``nn.Linear`` (the attention too: no fused ``in_proj_weight``),
so bitsandbytes 8/4-bit conversion reaches almost all parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from distill.core.leads import NUM_LEADS
from distill.models.blocks import (Attention, Block, LatentAttentionPool, MLP,  # noqa: F401
                                   init_weights)
from distill.models.base import lead_token_mask
from students._common import ECGStudentConfig, ECGStudentModel
from students._registry import register_family, register_preset


class LeadFormerConfig(ECGStudentConfig):
    """Configuration of a LeadFormer (defaults: the ``small`` preset, 12 leads at 100 Hz).

    Args:
        patch_size: samples per patch (one token per lead per patch); the signal is
            zero-padded at the end to a whole number of patches.
        hidden_size: token width D.
        num_layers: transformer blocks over time within each lead.
        num_heads: attention heads (D must divide by it).
        mlp_ratio: hidden width of the MLPs as a multiple of D.
        num_latents: K learned latent queries of the cross-lead latent attention.
        latent_layers: self-attention blocks over the latents after the cross-attention.
        dropout: dropout in attention and MLPs.
        head_dropout: dropout before the classifier.
        initializer_range: std of the truncated-normal init of weights and embeddings.
        layer_norm_eps: LayerNorm epsilon.
    """

    model_type = "ecg_leadformer"

    patch_size: int = 25  # 0.25 s at 100 Hz
    hidden_size: int = 128  # D
    num_layers: int = 4  # within-lead blocks
    num_heads: int = 4  # head width 32
    mlp_ratio: float = 4.0
    num_latents: int = 8  # K
    latent_layers: int = 1
    dropout: float = 0.0
    head_dropout: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6

    def __post_init__(self, **kwargs: Any) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"leadformer hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.patch_size < 1 or self.num_latents < 1:
            raise ValueError(f"leadformer needs patch_size >= 1 and num_latents >= 1, got "
                             f"{self.patch_size} and {self.num_latents}")
        super().__post_init__(**kwargs)

    @property
    def num_patches(self) -> int:
        """Tokens per lead, N = ceil(input_samples / patch_size)."""
        return math.ceil(self.input_samples / self.patch_size)


class LeadFormerModel(ECGStudentModel):
    """The LeadFormer student (see the module docstring); built from its config only."""

    config_class = LeadFormerConfig
    config: LeadFormerConfig
    base_model_prefix = "leadformer"
    family = "leadformer"
    _no_split_modules = ("Block",)
    _trunc_normal = ("pos_embed",)  # initialised by init_weights

    def __init__(self, config: LeadFormerConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.patch_embed = nn.Linear(config.patch_size, d)  # shared by every lead
        self.lead_embed = nn.Embedding(NUM_LEADS, d)  # by standard lead index
        self.pos_embed = nn.Parameter(torch.zeros(config.num_patches, d))  # time position
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.latent_pool = LatentAttentionPool(config)
        self.classifier = nn.Sequential(nn.Dropout(config.head_dropout),
                                        nn.Linear(d, config.num_labels))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal (std ``initializer_range``) weights, embeddings, latents and
        position embedding; zero biases; unit LayerNorms."""
        init_weights(module, self.config.initializer_range)

    reads_lead_mask = True  # a missing lead's tokens are left out of the latent attention

    def token_mask(self, lead_mask: torch.Tensor) -> torch.Tensor:
        """bool [B, L] -> [B, L*N]: every patch token of a missing lead is masked."""
        return lead_token_mask(lead_mask, self.config.num_patches)

    def forward_features(self, signal: torch.Tensor, token_mask: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch, embed, and encode each lead over time (no mixing between leads).

        Args:
            signal: [B, L, T] float, rows in ``config.leads`` order.
            token_mask: unused here (leads are encoded independently; a missing lead's
                tokens are computed but never read across leads).

        Returns:
            tokens [B, L*N, D] in lead-major order (lead 0's N patches, then lead 1's ...)
            and token_leads [L*N] int64, the standard lead index of each token.
        """
        b, n_leads, t = signal.shape
        n, p, d = self.config.num_patches, self.config.patch_size, self.config.hidden_size
        lead_ids = torch.tensor(self.config.lead_ids, device=signal.device)  # (L,)
        x = F.pad(signal, (0, n * p - t)).view(b, n_leads * n, p)  # (B, L*N, P)
        # 3-D into the Linear: bitsandbytes' int8 matmul takes at most 3-D inputs
        x = self.patch_embed(x).view(b, n_leads, n, d)  # (B, L, N, D)
        x = x + self.lead_embed(lead_ids)[:, None, :] + self.pos_embed  # (B, L, N, D)
        x = x.reshape(b * n_leads, n, d)  # (B*L, N, D): leads are independent sequences
        for block in self.blocks:
            x = block(x)  # (B*L, N, D)
        tokens = self.norm(x).reshape(b, n_leads * n, d)  # (B, L*N, D)
        return tokens, lead_ids.repeat_interleave(n)  # (B, L*N, D), (L*N,)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False,
                     token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Latent attention across leads and pooling (pooled), then the classifier (logits).

        Args:
            tokens: [B, L*N, D] from ``forward_features``.
            pre_logits: return pooled [B, D] instead of logits [B, C].
            token_mask: optional bool [B, L*N]; the latents read only the tokens it marks
                (a record with missing leads reads as the model given only its present
                leads).
        """
        pooled = self.latent_pool(tokens, token_mask)  # (B, D)
        return pooled if pre_logits else self.classifier(pooled)


def _create_leadformer(*, width: int, depth: int, num_latents: int,
                       patch_seconds: float = 0.25, **kwargs: Any) -> LeadFormerModel:
    """Build a LeadFormer ``width`` wide and ``depth`` blocks deep (heads of width 32).

    Args:
        width: token width D.
        depth: within-lead transformer blocks.
        num_latents: K latent queries.
        patch_seconds: patch length in seconds (P = round(patch_seconds * sampling_rate)).
        **kwargs: any other LeadFormerConfig field (num_labels, leads, sampling_rate, ...).
    """
    rate = kwargs.get("sampling_rate", 100)
    fields = {"hidden_size": width, "num_layers": depth, "num_heads": max(1, width // 32),
              "num_latents": num_latents, "patch_size": max(1, round(patch_seconds * rate))}
    return LeadFormerModel(LeadFormerConfig(**{**fields, **kwargs}))


register_family("leadformer", LeadFormerConfig,
                dials=("width", "depth", "num_latents", "patch_seconds"),
                model_class=LeadFormerModel)


@register_preset("leadformer", "tiny")
def leadformer_tiny(**kwargs: Any) -> LeadFormerModel:
    """D=64, 2 within-lead blocks, 4 latents, 0.5 s patches. 64 is the narrowest width at
    which every block's Linear takes bitsandbytes' CPU 4-bit kernel (in_features a multiple
    of its 64-weight blocks), so the tiny preset quantizes to nf4 as fully as the larger
    ones; the longer patches halve its tokens (20 per lead at 10 s), which keeps the
    per-record token relations of distillation (quadratic in tokens) cheap."""
    return _create_leadformer(**{"width": 64, "depth": 2, "num_latents": 4,
                                 "patch_seconds": 0.5, **kwargs})


@register_preset("leadformer", "small")
def leadformer_small(**kwargs: Any) -> LeadFormerModel:
    """D=128, 4 within-lead blocks, 8 latents."""
    return _create_leadformer(**{"width": 128, "depth": 4, "num_latents": 8, **kwargs})


@register_preset("leadformer", "base")
def leadformer_base(**kwargs: Any) -> LeadFormerModel:
    """D=256, 6 within-lead blocks, 16 latents."""
    return _create_leadformer(**{"width": 256, "depth": 6, "num_latents": 16, **kwargs})
