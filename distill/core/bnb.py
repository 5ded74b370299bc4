"""The one ``BitsAndBytesConfig`` builder: students' quantized folders
(:mod:`distill.compress.quantize`) and teachers' quantized loading (``teacher.load_in``)
both take their settings from :func:`bnb_config`.

Compute runs in fp32, which CPU bitsandbytes (>= 0.49) needs and which keeps logits
comparable with the fp32 model on a GPU too.
"""

from __future__ import annotations

from collections.abc import Sequence

FORMATS: tuple[str, ...] = ("int8", "nf4", "fp4")
BITS: dict[str, int] = {"int8": 8, "nf4": 4, "fp4": 4}


def bnb_config(fmt: str, *, skip_modules: Sequence[str] | None = None,
               double_quant: bool = False):
    """The ``BitsAndBytesConfig`` of a format.

    Args:
        fmt: "int8" (LLM.int8), "nf4" or "fp4" (4-bit codes, one absmax per 64 weights).
        skip_modules: module-name patterns kept in full precision (transformers 5 matches
            them as a prefix, regex or suffix of the full module name); None = none.
        double_quant: 4-bit only: quantize the absmax scales again.

    Raises:
        ValueError: an unknown format.
    """
    import torch
    from transformers import BitsAndBytesConfig

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    skip = None if skip_modules is None else list(skip_modules)
    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt,
                              bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=double_quant,
                              llm_int8_skip_modules=skip)
