"""The ``csfm`` student family: presets of :mod:`distill.models.csfm` (the model and its
masked-pretraining wrapper, shared with the ``foundation`` teacher). See that module for
the architecture."""

from __future__ import annotations

from distill.models.csfm import CSFMConfig, CSFMModel, CSFMForMaskedModeling
from students._masked import register_masked_family

__all__ = ["CSFMConfig", "CSFMModel", "CSFMForMaskedModeling"]

register_masked_family("csfm", CSFMConfig, CSFMModel, CSFMForMaskedModeling, {
    "tiny": {"width": 64, "depth": 2, "decoder_width": 64, "decoder_depth": 1},
    "base": {"width": 128, "depth": 4, "decoder_width": 64, "decoder_depth": 2},
    "large": {"width": 256, "depth": 4, "decoder_width": 128, "decoder_depth": 2},
})
