"""LAMAE: a masked autoencoder whose latent attention aggregates the leads.

After "Foundation Model for Cardiac Time Series via Masked Latent Attention" (LAMAE): each
lead is encoded on its own (a transformer over that lead's patches, weights shared by every
lead); leads meet in latent attention: at every time step, K learned latent queries read
the lead tokens of that step (an adaptive weighting of lead-specific representations,
blind to the order and number of the leads), a self-attention block refines them, and the
mean of all latents is the pooled embedding. In pretraining (75% of the patches hidden) the
decoder rebuilds each lead from its own visible tokens and, through cross-attention, the
latents of each step, so the latents must carry what the other leads know about that
moment: the cross-lead structure is the supervision.

``cross_lead: false`` is the seed paper's comparison, an independent-lead masked autoencoder
with exactly the same parameters and about the same compute: each lead gets K latents that
read only that lead (over time), and the decoder of a lead reads only its own lead's
latents, so nothing passes between leads.

Sizes: ``tiny`` D=64 x 2 blocks, 4 latents; ``base`` D=128 x 4, 8 latents; ``large`` D=256
x 4, 8 latents (a teacher: more than 10x the quickstart's largest student).
"""

from __future__ import annotations

import torch

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from distill.models.masked import ECGForMaskedModeling, MaskedSignalConfig, MaskedSignalModel
from distill.models.blocks import LatentAttentionPool, masked_mean


class LAMAEConfig(MaskedSignalConfig):
    """LAMAE's configuration: :class:`~distill.models.masked.MaskedSignalConfig` plus

    Args:
        num_latents: K learned latent queries.
        latent_layers: self-attention blocks over the latents.
        cross_lead: latents read every lead (LAMAE) or each lead alone (the
            independent-lead baseline, same parameters).
    """

    model_type = "ecg_lamae"

    num_latents: int = 8
    latent_layers: int = 1
    cross_lead: bool = True


class LAMAEModel(MaskedSignalModel):
    """The LAMAE encoder (module docstring)."""

    config_class = LAMAEConfig
    config: LAMAEConfig
    base_model_prefix = "lamae"
    family = "lamae"

    def __init__(self, config: LAMAEConfig) -> None:
        super().__init__(config)
        self.latent_pool = LatentAttentionPool(config)
        self.post_init()

    def encode(self, x: torch.Tensor, positions: torch.Tensor,
               token_mask: torch.Tensor | None = None) -> torch.Tensor:
        # each lead is encoded on its own: a missing lead's tokens reach no other lead, so
        # ``token_mask`` matters only where the leads meet (the latents, ``forward_head``)
        b, m, d = x.shape
        n_leads, n = len(self.config.leads), self.config.num_patches
        if m == n_leads * n:  # every token: each lead is one sequence
            x = x.reshape(b * n_leads, n, d)
            for block in self.blocks:
                x = block(x)
            return self.norm(x).reshape(b, m, d)
        rows = positions // n
        same = rows[:, :, None] == rows[:, None, :]  # (B, M, M): within a lead only
        for block in self.blocks:
            x = block(x, mask=same)
        return self.norm(x)

    def groups(self, positions: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Which latents each token at flat ``positions`` feeds, and how many groups: its
        time step (cross-lead: the leads meet at every step), or its lead (independent
        leads: each lead's latents read that lead over time)."""
        n, n_leads = self.config.num_patches, len(self.config.leads)
        if self.config.cross_lead:
            return positions % n, n
        return positions // n, n_leads

    def latents(self, tokens: torch.Tensor, positions: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, G*K, D]: K latents per group (:meth:`groups`) after reading its tokens (those
        ``token_mask`` marks, when given)."""
        groups, count = self.groups(positions)
        return self.latent_pool.read(tokens, groups=groups, num_groups=count,
                                     token_mask=token_mask)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False,
                     token_mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = self._positions(tokens.shape[0], tokens.device)
        latents = self.latents(tokens, positions, token_mask)  # (B, G*K, D)
        if token_mask is None:
            pooled = latents.mean(dim=1)  # (B, D)
        else:  # the mean over the groups that read a present token (independent leads:
            # a missing lead's latents are left out)
            groups, count = self.groups(positions)
            seen = torch.zeros(tokens.shape[0], count, dtype=torch.long, device=tokens.device)
            seen.scatter_reduce_(1, groups, token_mask.long(), reduce="amax")  # (B, G)
            pooled = masked_mean(latents, (seen > 0).repeat_interleave(self.config.num_latents, 1))
        return pooled if pre_logits else self.classifier(pooled)

    def context(self, tokens: torch.Tensor, positions: torch.Tensor):
        """The latents; each decoder token reads its own group's."""
        latents = self.latents(tokens, positions)
        every = self._positions(tokens.shape[0], tokens.device)  # (B, L*N)
        groups, count = self.groups(every)
        latent_group = torch.arange(count, device=tokens.device).repeat_interleave(
            self.config.num_latents)
        return latents, groups[:, :, None] == latent_group[None, None, :]


class LAMAEForMaskedModeling(ECGForMaskedModeling):
    """LAMAE with its pretraining decoder (within-lead attention + cross-attention to the
    latents)."""

    config_class = LAMAEConfig
    base_model_prefix = "lamae"
    encoder_class = LAMAEModel
    decoder_within_lead = True
    decoder_context = True
    _no_split_modules = ("Block",)



AutoConfig.register(LAMAEConfig.model_type, LAMAEConfig, exist_ok=True)
AutoModel.register(LAMAEConfig, LAMAEModel, exist_ok=True)
AutoModelForPreTraining.register(LAMAEConfig, LAMAEForMaskedModeling, exist_ok=True)
