"""bitsandbytes 8/4-bit students: conversion, the Hugging Face folder, measurement.

A trained student folder (``config.json`` + ``model.safetensors``) is converted by
transformers' own bitsandbytes integration: ``AutoModel.from_pretrained(folder,
quantization_config=BitsAndBytesConfig(...))`` swaps each eligible ``nn.Linear`` for a
``bnb.nn.Linear8bitLt`` (LLM.int8: int8 weights with one fp32 scale per output row,
outlier input columns above 6.0 in fp16) or a ``bnb.nn.Linear4bit`` (nf4 or fp4 codes,
one absmax per 64 weights, optionally quantized again: double quantization). The
quantized model is written with ``save_pretrained``: ``config.json`` then carries the
``quantization_config``, so a plain ``AutoModel.from_pretrained(folder)`` on any machine
with bitsandbytes restores the quantized layers (the folder is what a device loads).

What is quantized, and what is not (reported in ``quantization.json`` and by
``ecg-distill quantize``):

* only ``nn.Linear`` layers: bitsandbytes has no convolution kernels, so the
  convolutions of a conv-heavy student (xresnet1d) stay in fp32, as do norms and
  embeddings;
* the output layer (``classifier``) stays in fp32, as LLM recipes keep ``lm_head``: it is
  a few thousand parameters and its error lands on the logits unfiltered;
* a family keeps what its class lists in ``quant_kept_modules`` (module-name prefix ->
  why): a VLM student's vision tower and projector (only its language model is
  quantized, as for the VLM teacher), a ConvNeXt's pointwise layers (they read 4-D
  inputs, which bitsandbytes' int8 matmul does not take);
* for 4-bit, a Linear whose ``in_features`` is not a multiple of 64 or whose
  ``out_features`` is not a multiple of 32 stays in fp32: on a CPU with AVX512-BF16,
  bitsandbytes repacks 4-bit weights at the first inference pass into tiles of 32 output
  rows with one scale per 64 inputs, and fails on other shapes; a published folder must
  run on any CPU.

Sizes: the *quantized part* is the weight matrices of the quantized layers; its fp32
bytes (4 per weight) are compared with what the folder stores for them (codes, scales,
quantization maps, the serialized quant state). Biases stay fp32 and are not counted in
it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformers import AutoConfig, AutoModel

import students  # noqa: F401  (registers the student classes with AutoModel)
from distill.core.bnb import BITS, FORMATS, bnb_config
from distill.core.errors import ECGDistillError
from distill.core.io import atomic_dir, atomic_write_text, require_safetensors
from distill.metrics.footprint import count_parameters

SUMMARY_FILE = "quantization.json"
KEPT_MODULES: tuple[str, ...] = ("classifier",)  # output layer: fp32 in every format
BLOCK_ROWS_4BIT = 32  # bitsandbytes' CPU 4-bit kernel: output rows per packed tile
BLOCK_4BIT = 64  # weights per 4-bit scale (bitsandbytes' default blocksize)


class QuantizeError(ECGDistillError, ValueError):
    """A folder that cannot be quantized (not a student, already quantized, pickle ...)."""


def format_for_bits(bits: int, quant_type: str = "nf4") -> str:
    """``--bits 8`` -> "int8"; ``--bits 4`` -> ``quant_type`` ("nf4" or "fp4")."""
    if bits == 8:
        return "int8"
    if bits == 4:
        if quant_type not in ("nf4", "fp4"):
            raise QuantizeError(f"--quant-type: {quant_type!r}; 4-bit formats are nf4 and fp4")
        return quant_type
    raise QuantizeError(f"--bits: {bits}; bitsandbytes quantizes to 8 or 4 bits")


# ---------------------------------------------------------------- the plan


@dataclass
class QuantPlan:
    """Which layers of an fp32 model a format quantizes, and what stays in full precision."""

    format: str
    parameters: int  # all parameters of the model
    quantized: dict[str, list[int]] = field(default_factory=dict)  # layer -> [out, in]
    kept: dict[str, str] = field(default_factory=dict)  # Linear layer -> why it stays fp32
    conv_parameters: int = 0
    other_parameters: int = 0  # norms, embeddings, biases, kept Linears ...

    @property
    def quantized_parameters(self) -> int:
        return sum(o * i for o, i in self.quantized.values())

    @property
    def fraction(self) -> float:
        """Share of the model's parameters that are quantized."""
        return self.quantized_parameters / max(1, self.parameters)

    @property
    def skip_modules(self) -> list[str]:
        """Module names given to ``llm_int8_skip_modules``: the kept output layer and every
        Linear the format cannot take."""
        return sorted({*KEPT_MODULES, *(n for n in self.kept if not n.startswith(KEPT_MODULES))})

    def notes(self) -> list[str]:
        """Plain statements for the user (conv layers, kept layers)."""
        out = []
        if self.conv_parameters:
            share = self.conv_parameters / max(1, self.parameters)
            out.append(f"{'<1%' if share < 0.005 else f'{share:.0%}'} of the parameters "
                       f"are convolution weights, which stay in fp32: bitsandbytes quantizes "
                       f"nn.Linear layers only, and no torch-native int8 convolution path is "
                       f"used")
        by_reason: dict[str, list[str]] = {}
        for name, why in self.kept.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            which = names[0] if len(names) == 1 else f"{len(names)} Linear layers ({names[0]} ...)"
            out.append(f"{which} stay{'s' if len(names) == 1 else ''} in fp32: {why}")
        if not self.quantized:
            out.append(f"no layer of this model can be quantized to {self.format}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "quantized_parameters": self.quantized_parameters,
                "fraction": self.fraction, "notes": self.notes()}


def plan(model: nn.Module, fmt: str) -> QuantPlan:
    """What ``fmt`` quantizes in ``model`` (an fp32 student), following the module docstring."""
    if fmt not in FORMATS:
        raise QuantizeError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    p = QuantPlan(format=fmt, parameters=count_parameters(model))
    family_kept = dict(getattr(model, "quant_kept_modules", {}))  # prefix -> why
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out_f, in_f = module.out_features, module.in_features
            kept_by = next((why for prefix, why in family_kept.items()
                            if name == prefix or name.startswith(prefix + ".")), None)
            if name.split(".")[0] in KEPT_MODULES:
                p.kept[name] = "the output layer is kept in full precision"
            elif kept_by is not None:
                p.kept[name] = kept_by
            elif BITS[fmt] == 4 and (in_f % BLOCK_4BIT or out_f % BLOCK_ROWS_4BIT):
                p.kept[name] = (f"shape {out_f}x{in_f}: bitsandbytes' CPU 4-bit kernel needs "
                                f"in_features a multiple of {BLOCK_4BIT} and out_features a "
                                f"multiple of {BLOCK_ROWS_4BIT}")
            else:
                p.quantized[name] = [out_f, in_f]
        elif isinstance(module, nn.modules.conv._ConvNd):
            p.conv_parameters += module.weight.numel()
    p.other_parameters = p.parameters - p.quantized_parameters - p.conv_parameters
    return p


# ---------------------------------------------------------------- folders


def check_student_folder(folder: Path, *, allow_quantized: bool = False) -> dict[str, Any]:
    """The config of a saved student folder, or QuantizeError naming what is wrong."""
    if not folder.is_dir():
        raise QuantizeError(f"{folder}: no such folder")
    if (folder / "teacher.json").exists():
        raise QuantizeError(f"{folder}: a teacher folder; teachers are quantized when loaded "
                            f"(recipe key teacher.load_in: 8bit | 4bit)")
    if not (folder / "config.json").exists():
        raise QuantizeError(f"{folder}: no config.json; not a saved student folder")
    require_safetensors(folder)  # a pickle checkpoint is refused, never unpickled
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantizeError(f"{folder / 'config.json'}: unreadable ({exc})") from None
    if config.get("quantization_config") and not allow_quantized:
        q = config["quantization_config"]
        bits = "8-bit" if q.get("load_in_8bit") else "4-bit"
        raise QuantizeError(f"{folder}: already quantized ({bits}, "
                            f"{q.get('quant_method', '?')}); quantize the fp32 folder instead")
    return config


def load_student(folder: str | os.PathLike) -> nn.Module:
    """A saved student, fp32 or quantized (its config's ``quantization_config`` decides),
    in eval mode. Safetensors only."""
    folder = Path(folder)
    check_student_folder(folder, allow_quantized=True)
    return AutoModel.from_pretrained(folder, use_safetensors=True).eval()


def part_bytes(state: dict[str, torch.Tensor], layers: Sequence[str]) -> int:
    """Bytes the saved state of a quantized model spends on the weights of ``layers``
    (weight, its quant state, and LLM.int8's row scales ``SCB``; not the biases). Read
    from the model's own ``state_dict`` (what ``save_pretrained`` serializes), by module
    name: a file may store some models under older key names (transformers 5 writes a
    LLaVA's ``language_model.layers`` as ``language_model.model.layers``)."""
    total = 0
    for key, tensor in state.items():
        for layer in layers:
            rest = key[len(layer) + 1:] if key.startswith(layer + ".") else None
            if rest is not None and (rest.startswith("weight") or rest == "SCB"):
                total += tensor.numel() * tensor.element_size()
                break
    return total


@dataclass
class QuantizeResult:
    folder: Path
    plan: QuantPlan
    double_quant: bool
    fp32_bytes: int  # the source's model.safetensors
    stored_bytes: int  # the quantized model.safetensors
    part_fp32_bytes: int  # quantized layers' weights at 4 bytes each
    part_stored_bytes: int  # what the quantized file spends on them

    @property
    def part_ratio(self) -> float:
        return self.part_fp32_bytes / max(1, self.part_stored_bytes)

    @property
    def file_ratio(self) -> float:
        return self.fp32_bytes / max(1, self.stored_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.plan.format, "bits": BITS[self.plan.format],
                "double_quant": self.double_quant, **self.plan.to_dict(),
                "bytes": {"fp32_file": self.fp32_bytes, "quantized_file": self.stored_bytes,
                          "fp32_part": self.part_fp32_bytes,
                          "quantized_part": self.part_stored_bytes},
                "ratio_file": self.file_ratio, "ratio_part": self.part_ratio}

    def describe(self) -> str:
        """The lines ``ecg-distill quantize`` prints."""
        p = self.plan
        lines = [(f"{p.format}: {len(p.quantized)} Linear layers quantized, "
                  f"{p.quantized_parameters:,} of {p.parameters:,} parameters "
                  f"({p.fraction:.1%})"),
                 (f"size on disk: {self.fp32_bytes / 1e6:.3f} MB fp32 -> "
                  f"{self.stored_bytes / 1e6:.3f} MB ({self.file_ratio:.2f}x smaller); "
                  f"quantized part {self.part_fp32_bytes / 1e6:.3f} -> "
                  f"{self.part_stored_bytes / 1e6:.3f} MB ({self.part_ratio:.2f}x)")]
        lines += [f"note: {n}" for n in p.notes()]
        lines.append(f"written: {self.folder}")
        return "\n".join(lines)


def quantize_folder(source: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
                    double_quant: bool = False, force: bool = False) -> QuantizeResult:
    """Quantize the fp32 student in ``source`` to ``fmt`` and save it to ``out``.

    ``out`` receives ``config.json`` (with ``quantization_config``), ``model.safetensors``
    and ``quantization.json`` (the plan, sizes and notes). It is written into a temporary
    folder renamed into place: a half-written folder is never left, and an existing ``out``
    is replaced only with ``force``.

    Raises:
        QuantizeError: ``source`` is not an fp32 student folder (teacher, pickle, already
            quantized), ``out`` exists without ``force``, or no layer can be quantized.
    """
    source, out = Path(source), Path(out)
    check_student_folder(source)
    if out.resolve() == source.resolve():
        raise QuantizeError(f"{out}: the output folder is the source folder")
    if out.exists() and not force:
        raise QuantizeError(f"{out} exists; pass --force to replace it")
    if fmt not in FORMATS:
        raise QuantizeError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    with torch.device("meta"):  # the plan needs layer shapes only, not the weights
        p = plan(AutoModel.from_config(AutoConfig.from_pretrained(source)), fmt)
    if not p.quantized:
        raise QuantizeError(f"{source}: " + "; ".join(p.notes()))
    model = AutoModel.from_pretrained(
        source, use_safetensors=True, dtype=torch.float32,
        quantization_config=bnb_config(fmt, skip_modules=p.skip_modules,
                                       double_quant=double_quant))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # safetensors: transformers 5's only format
        result = QuantizeResult(
            folder=out, plan=p, double_quant=double_quant,
            fp32_bytes=(source / "model.safetensors").stat().st_size,
            stored_bytes=(tmp / "model.safetensors").stat().st_size,
            part_fp32_bytes=4 * p.quantized_parameters,
            part_stored_bytes=part_bytes(model.state_dict(), list(p.quantized)))
        summary = {**result.to_dict(), "source": str(source)}
        atomic_write_text(tmp / SUMMARY_FILE, json.dumps(summary, indent=1))
    return result


def read_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """``quantization.json`` of a quantized folder."""
    return json.loads((Path(folder) / SUMMARY_FILE).read_text())
