"""The ``lamae`` student family: presets of :mod:`distill.models.lamae` (the model and its
masked-pretraining wrapper, shared with the ``foundation`` teacher). See that module for
the architecture."""

from __future__ import annotations

from distill.models.lamae import LAMAEConfig, LAMAEModel, LAMAEForMaskedModeling
from students._masked import register_masked_family

__all__ = ["LAMAEConfig", "LAMAEModel", "LAMAEForMaskedModeling"]

register_masked_family("lamae", LAMAEConfig, LAMAEModel, LAMAEForMaskedModeling, {
    "tiny": {"width": 64, "depth": 2, "num_latents": 4, "decoder_width": 64,
             "decoder_depth": 1},
    "base": {"width": 128, "depth": 4, "num_latents": 8, "decoder_width": 64,
             "decoder_depth": 2},
    "large": {"width": 256, "depth": 4, "num_latents": 8, "decoder_width": 128,
              "decoder_depth": 2},
})
