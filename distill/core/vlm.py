"""What LLaVA-family models share, teachers and students alike: the small ECG tokenizer of
the tiny presets, the printouts' pixel statistics, the visual-token grid of a prompt and
the visual tokens of a forward output (in every form transformers 5.x gives them).

Kept at the bottom layer so that the VLM teacher (``teachers.vlm``) and the VLM student
(``students.llava``) read a model the same way without importing each other.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
# Enough words for the default prompts; anything else maps to <unk>.
ECG_WORDS = ["user", "assistant", "system", "what", "which", "are", "is", "the", "a", "an", "of", "this", "these", "in", "on", "and", "or", "with", "diagnoses", "diagnosis", "findings", "rhythm", "ecg", "electrocardiogram", "12", "lead", "leads", "image", "describe", "list", "normal", "abnormal", "sinus", "atrial", "fibrillation", "flutter", "infarction", "myocardial", "ischemia", "hypertrophy", "bundle", "branch", "block", "left", "right", "st", "t", "wave", "elevation", "depression", "qrs", "pr", "qt", "interval", "axis", "rate", "bradycardia", "tachycardia", "conduction", "answer", "please", "shown"]
PUNCTUATION = (":", "?", ".", ",", "-", "(", ")", "/", "'")


def build_tiny_tokenizer():
    """A small word-level ``PreTrainedTokenizerFast`` over an ECG vocabulary.

    Lower-cases, splits on whitespace and punctuation, prepends ``<s>``; ``<image>`` is a
    special token so the processor's expanded image markers stay one id each.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(ECG_WORDS) + PUNCTUATION)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=1024)


DEFAULT_PROMPT = "USER: <image>\nWhat are the diagnoses of this 12-lead ECG? ASSISTANT:"
TOKEN_SOURCES = ("vision", "language")  # projected visual tokens, or the LM's states there
POOLS = ("last", "image-mean")  # the LM's state at the last prompt position, or the image mean
# What a vision tower applies after its encoder, which LLaVA's hidden-state features never
# pass through: the final norm (CLIP/SigLIP ``post_layernorm``; Swin, ViT and DINOv2 a
# ``layernorm`` directly under the tower), a pooling head or pooler.
TOWER_TAIL = re.compile(r"vision_tower\.(?:vision_model\.)?(?:post_layernorm|layernorm|head|pooler)\.")


def unused_tower_parameters(hf_config: Any, names: Any) -> set[str]:
    """Of the parameter ``names`` of a LLaVA-family model, those of the vision tower its
    forward never reaches: the layers after the selected feature layer and the tower's
    tail (:data:`TOWER_TAIL`)."""
    vision = hf_config.vision_config
    # transformer towers count layers; hierarchical ones (Swin, FocalNet) count stages
    n_layers = getattr(vision, "num_hidden_layers", None)
    n_layers = int(len(vision.depths) if n_layers is None else n_layers)
    chosen = hf_config.vision_feature_layer
    chosen = chosen if isinstance(chosen, (list, tuple)) else [chosen]
    last_used = max(k if k >= 0 else n_layers + 1 + k for k in chosen)  # hidden_states index
    out = set()
    for name in names:
        if "vision_tower" not in name:
            continue
        m = re.search(r"vision_tower\S*?\.layers\.(\d+)\.", name)
        if (m and int(m.group(1)) >= last_used) or TOWER_TAIL.search(name):
            out.add(name)
    return out


# Pixel statistics of the renderer's printouts (RGB, after rescaling to [0, 1]), measured
# on 200 synthetic 224 x 224 records: mostly white-pink paper, ~5 % ink. Normalising with
# them puts the paper near 0 and the ink ~3-4 standard deviations below it, so a tower
# with the default initialisation sees the traces (CLIP's photo statistics, mean 0.48 and
# std 0.27, leave the paper at +1.9 and shrink what differs between printouts).
PRINTOUT_MEAN = (0.90, 0.69, 0.68)
PRINTOUT_STD = (0.21, 0.20, 0.20)


def token_grid(n_tokens: int, image_size: int) -> tuple[int | None, bool]:
    """The side of the square token grid behind ``n_tokens`` visual tokens of an
    ``image_size`` image, and whether one CLS token leads them: a CLIP tower under the
    "full" strategy gives g * g + 1, a CLS-less tower (Swin, SigLIP) or the "default"
    strategy g * g. (None, False) when neither is a square grid dividing the image."""
    for cls in (False, True):
        g = math.isqrt(max(n_tokens - cls, 0))
        if g > 0 and g * g == n_tokens - cls and image_size % g == 0:
            return g, cls
    return None, False


def visual_tokens(out: Any, batch: int, n_tokens: int, width: int) -> torch.Tensor:
    """The projected visual tokens [B, N, D] of a LLaVA-family forward output, in every
    form transformers 5.x gives them.

    - ``out.image_outputs.pooler_output`` (5.2x and later; ``image_hidden_states`` is then a
      deprecated alias announced to mean "hidden states of every layer" from 5.30, so it
      is read only when ``image_outputs`` is absent);
    - ``out.image_hidden_states`` (earlier 5.x): a tensor [B, N, D] or [B * N, D];
    - either of them as a list or tuple of per-image tensors [N, D] (or [1, N, D]).

    Raises:
        ValueError: no visual tokens in the output, or not B x N tokens of width D (the
            message names the installed transformers version).
    """
    image_outputs = getattr(out, "image_outputs", None)
    if image_outputs is not None:
        found = getattr(image_outputs, "pooler_output", None)
    else:
        found = getattr(out, "image_hidden_states", None)
    if isinstance(found, (list, tuple)):
        parts = [t for t in found if isinstance(t, torch.Tensor)]
        found = torch.cat([t.reshape(-1, t.shape[-1]) for t in parts]) if parts else None
    if not isinstance(found, torch.Tensor) or found.numel() != batch * n_tokens * width:
        import transformers

        shape = None if found is None else tuple(getattr(found, "shape", ()))
        raise ValueError(f"VLM: expected {batch} x {n_tokens} visual tokens of width "
                         f"{width} in the model's output, found {shape} (transformers "
                         f"{transformers.__version__}); use tokens='language' or the locked "
                         f"transformers version")
    return found.reshape(batch, n_tokens, width)  # (B, N, D)
