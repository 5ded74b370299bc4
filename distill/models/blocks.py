"""Transformer pieces shared by the lead-token models (LeadFormer, CSFM, LAMAE).

Every weight matrix is an ``nn.Linear`` (the attention too: no fused ``in_proj_weight``), so
bitsandbytes 8/4-bit conversion reaches almost all parameters. A ``config`` here is any
object with ``hidden_size``, ``num_heads``, ``mlp_ratio``, ``dropout``, ``layer_norm_eps``
(and, for :class:`LatentAttentionPool`, ``num_latents`` and ``latent_layers``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init


class Attention(nn.Module):
    """Multi-head attention from Linear projections and ``scaled_dot_product_attention``.

    Self-attention when ``context`` is None, cross-attention (queries from ``x``, keys and
    values from ``context``) otherwise.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: optional bool [B, N, M], True where query n may read key m; a query
        that may read no key gets a zero attention output (not NaN)."""
        context = x if context is None else context
        (b, n, d), m, h = x.shape, context.shape[1], self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, Dh)
        k, v = self.kv(context).view(b, m, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B, H, M, Dh)
        empty = None
        if mask is not None:
            empty = ~mask.any(dim=-1, keepdim=True)  # (B, N, 1)
            mask = (mask | empty)[:, None]  # (B, 1, N, M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        if empty is not None:
            out = out.masked_fill(empty[:, None], 0.0)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class MLP(nn.Sequential):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class BlockWidth:
    """The fields a :class:`Block` reads, at another width than the config's: a second,
    narrower transformer of the same model (a masked model's decoder, Hypnos' depth
    transformer) shares the config's MLP ratio, dropout and LayerNorm epsilon."""

    def __init__(self, config: Any, hidden_size: int, num_heads: int) -> None:
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = config.mlp_ratio
        self.dropout = config.dropout
        self.layer_norm_eps = config.layer_norm_eps


class Block(nn.Module):
    """Pre-norm transformer block; with ``cross=True`` the attention reads a context.

    Self: x + attn(norm(x)); cross: x + attn(norm(x), norm_ctx(context)); then x + mlp(norm(x)).
    """

    def __init__(self, config: Any, cross: bool = False) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.norm_context = nn.LayerNorm(d, eps=eps) if cross else None
        self.attn = Attention(d, config.num_heads, config.dropout)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, int(d * config.mlp_ratio), config.dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_context is not None:
            context = self.norm_context(context)  # (B, M, D)
        x = x + self.attn(self.norm1(x), context, mask)  # (B, N, D)
        return x + self.mlp(self.norm2(x))  # (B, N, D)


class LatentAttentionPool(nn.Module):
    """LAMAE's latent attention: K learned queries read the lead tokens, then are averaged.

    Permutation-invariant over tokens (hence over leads): no position enters here, and
    attention sums over its keys.
    """

    _trunc_normal = ("latents",)  # initialised by init_weights

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(config.num_latents, config.hidden_size))
        self.cross = Block(config, cross=True)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.latent_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def read(self, tokens: torch.Tensor, groups: torch.Tensor | None = None,
             num_groups: int | None = None, token_mask: torch.Tensor | None = None
             ) -> torch.Tensor:
        """The latents after reading ``tokens`` [B, M, D]: [B, K, D]; or, with ``groups``
        (int [B, M], each token's group 0..G-1, e.g. its time step) one set of K latents
        per group that reads only its group's tokens: [B, G*K, D] (group-major; a group
        without tokens reads nothing). ``token_mask`` (bool [B, M], False = a missing
        lead's token) leaves tokens out of the reading."""
        b, k = tokens.shape[0], self.latents.shape[0]
        if groups is None:
            latents = self.latents.expand(b, -1, -1)  # (B, K, D)
            mask = None if token_mask is None else token_mask[:, None, :].expand(-1, k, -1)
            latents = self.cross(latents, tokens, mask)  # (B, K, D)
            for block in self.blocks:
                latents = block(latents)  # (B, K, D)
            return self.norm(latents)
        g = int(groups.max()) + 1 if num_groups is None else num_groups
        own = torch.arange(g, device=tokens.device).repeat_interleave(k)  # (G*K,)
        latents = self.latents.repeat(g, 1).expand(b, -1, -1)  # (B, G*K, D)
        mask = own[None, :, None] == groups[:, None, :]  # (B, G*K, M)
        if token_mask is not None:
            mask = mask & token_mask[:, None, :]
        latents = self.cross(latents, tokens, mask)
        latents = latents.reshape(b * g, k, -1)  # each group's K latents attend among themselves
        for block in self.blocks:
            latents = block(latents)
        return self.norm(latents).reshape(b, g * k, -1)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> torch.Tensor:  # (B, L*N, D) -> (B, D)
        return self.read(tokens, token_mask=token_mask).mean(dim=1)  # (B, D)


def masked_mean(tokens: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of [B, N, D], over the tokens ``token_mask`` (bool [B, N]) marks
    (all when None; zeros for a record without any)."""
    if token_mask is None:
        return tokens.mean(dim=1)
    w = token_mask.to(tokens.dtype)[..., None]  # (B, N, 1)
    return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def init_weights(module: nn.Module, std: float) -> None:
    """Truncated-normal (``std``) Linear weights, embeddings and the ``_trunc_normal``
    parameters a module lists; zero biases; unit LayerNorms."""
    if isinstance(module, nn.Linear):
        init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.trunc_normal_(module.weight, std=std)
    for name in getattr(module, "_trunc_normal", ()):
        init.trunc_normal_(getattr(module, name), std=std)
