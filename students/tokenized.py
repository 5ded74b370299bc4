"""The tokenized foundation-model families ``ecg-distill pretrain`` trains (pretraining only,
not student presets): ``rvq``, the RVQ tokenizer (:mod:`distill.models.rvq`), and
``hypnos``, next-token prediction over a trained tokenizer's codes
(:mod:`distill.models.hypnos`; the recipe's ``pretrain.tokenizer`` names the tokenizer).

Sizes: ``rvq`` tiny / base (8 codebooks of 256 codes on 0.4 s patches: 160 bits per second
per lead at most, trained with quantizer dropout) and small (tiny's widths on 0.2 s patches,
8 codebooks of 256: 320 bits per second per lead; no quantizer dropout, for the best
full-depth fidelity: chosen on the validation fold, recipes/pretrain-rvq.yaml); ``hypnos`` tiny / base (temporal transformer D=64 x 2 / D=128 x 4).
"""

from __future__ import annotations

import distill.models.translator  # noqa: F401  (registers the translator with AutoModel)
from distill.models.hypnos import HypnosConfig, HypnosForNextToken
from distill.models.rvq import RVQTokenizer, RVQTokenizerConfig
from students._masked import register_tokenized_family

register_tokenized_family("rvq", RVQTokenizerConfig, RVQTokenizer, {
    "tiny": {"patch_seconds": 0.4, "stem_channels": 16, "hidden_size": 64, "codebook_dim": 32,
             "num_quantizers": 8, "codebook_size": 256},
    "base": {"patch_seconds": 0.4, "stem_channels": 32, "hidden_size": 128,
             "codebook_dim": 64, "num_quantizers": 8, "codebook_size": 256},
    "small": {"patch_seconds": 0.2, "stem_channels": 16, "hidden_size": 64, "codebook_dim": 32,
              "num_quantizers": 8, "codebook_size": 256, "quantize_dropout": False},
})

register_tokenized_family("hypnos", HypnosConfig, HypnosForNextToken, {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "depth_hidden_size": 64,
             "depth_layers": 1},
    "base": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "depth_hidden_size": 64,
             "depth_layers": 2},
})
