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
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.core.errors import ECGDistillError
from distill.core.io import atomic_write_text, replace_folder
from distill.hub.publish import require_safetensors

FORMATS: tuple[str, ...] = ("int8", "nf4", "fp4")
BITS: dict[str, int] = {"int8": 8, "nf4": 4, "fp4": 4}
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


def bnb_config(fmt: str, *, skip_modules: Sequence[str] = KEPT_MODULES,
               double_quant: bool = False):
    """The ``BitsAndBytesConfig`` of a format ("int8", "nf4", "fp4"); compute in fp32,
    which CPU bitsandbytes needs and which keeps logits comparable with the fp32 model."""
    from transformers import BitsAndBytesConfig

    if fmt not in FORMATS:
        raise QuantizeError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt,
                              bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=double_quant,
                              llm_int8_skip_modules=list(skip_modules))


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
            out.append(f"{self.conv_parameters / max(1, self.parameters):.0%} of the parameters "
                       f"are convolution weights, which stay in fp32: bitsandbytes quantizes "
                       f"nn.Linear layers only, and no torch-native int8 convolution path is "
                       f"used")
        for name, why in self.kept.items():
            out.append(f"{name} stays in fp32: {why}")
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
    from distill.metrics.footprint import count_parameters

    p = QuantPlan(format=fmt, parameters=count_parameters(model))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out_f, in_f = module.out_features, module.in_features
            if name.split(".")[0] in KEPT_MODULES:
                p.kept[name] = "the output layer is kept in full precision"
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
    from transformers import AutoModel

    import students  # noqa: F401  (registers the student classes with AutoModel)

    folder = Path(folder)
    check_student_folder(folder, allow_quantized=True)
    return AutoModel.from_pretrained(folder, use_safetensors=True).eval()


def _stored_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, by key (read from its header)."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
            if k != "__metadata__"}


def part_bytes(path: Path, layers: Sequence[str]) -> int:
    """Bytes a safetensors file spends on the weights of ``layers`` (weight, its quant
    state, and LLM.int8's row scales ``SCB``; not the biases)."""
    total = 0
    for key, n in _stored_bytes(path).items():
        for layer in layers:
            rest = key[len(layer) + 1:] if key.startswith(layer + ".") else None
            if rest is not None and (rest.startswith("weight") or rest == "SCB"):
                total += n
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
    from transformers import AutoModel

    import students  # noqa: F401

    source, out = Path(source), Path(out)
    check_student_folder(source)
    if out.resolve() == source.resolve():
        raise QuantizeError(f"{out}: the output folder is the source folder")
    if out.exists() and not force:
        raise QuantizeError(f"{out} exists; pass --force to replace it")
    from transformers import AutoConfig

    with torch.device("meta"):  # the plan needs layer shapes only, not the weights
        p = plan(AutoModel.from_config(AutoConfig.from_pretrained(source)), fmt)
    if not p.quantized:
        raise QuantizeError(f"{source}: " + "; ".join(p.notes()))
    model = AutoModel.from_pretrained(
        source, use_safetensors=True, dtype=torch.float32,
        quantization_config=bnb_config(fmt, skip_modules=p.skip_modules,
                                       double_quant=double_quant))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)  # safetensors: transformers 5's only format
        result = QuantizeResult(
            folder=out, plan=p, double_quant=double_quant,
            fp32_bytes=(source / "model.safetensors").stat().st_size,
            stored_bytes=(tmp / "model.safetensors").stat().st_size,
            part_fp32_bytes=4 * p.quantized_parameters,
            part_stored_bytes=part_bytes(tmp / "model.safetensors", list(p.quantized)))
        summary = {**result.to_dict(), "source": str(source)}
        atomic_write_text(tmp / SUMMARY_FILE, json.dumps(summary, indent=1))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def read_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """``quantization.json`` of a quantized folder."""
    return json.loads((Path(folder) / SUMMARY_FILE).read_text())


def quantized_weights_extra_bytes(model: nn.Module) -> int:
    """Bytes bitsandbytes keeps beside the parameters: LLM.int8's row scales (``SCB``) and
    the 4-bit quant states (absmax, code, nested state); 0 for an fp32 model. Tensors that
    are the model's own parameters or buffers (counted by the caller) are not counted.

    Where bitsandbytes keeps them moves between releases and even within one model's life:
    LLM.int8's scales sit on the weight (``weight.SCB``) after loading and move to the
    layer's matmul state (``layer.state.SCB``) at the first forward pass. So every tensor
    reachable from a quantized parameter's attributes and from its layer's plain
    attributes is counted once, by storage, whatever the field is called.

    Raises:
        QuantizeError: a parameter stored as integer codes has nothing beside it in either
            place (its scales are then kept where this walk does not look: the count would
            be wrong).
    """
    counted = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    total = 0

    def tensors(t: Any, depth: int = 0) -> list[torch.Tensor]:
        if torch.is_tensor(t):
            return [t]
        if depth >= 6 or t is None or isinstance(t, (nn.Module, type, str, bytes)):
            return []
        if isinstance(t, dict):
            values = list(t.values())
        elif isinstance(t, (list, tuple)):
            values = list(t)
        else:
            values = [*getattr(t, "__dict__", {}).values(),
                      *(getattr(t, k, None) for k in getattr(type(t), "__slots__", ()))]
        return [x for v in values for x in tensors(v, depth + 1)]

    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dtype.is_floating_point or p.dtype.is_complex:
                continue  # not stored as codes: nothing beside it
            beside = [getattr(p, "SCB", None), getattr(p, "quant_state", None),
                      {k: v for k, v in vars(module).items() if not k.startswith("_")}]
            found = [t for t in tensors(beside) if t.data_ptr() != p.data_ptr()]
            if not found:
                import bitsandbytes

                raise QuantizeError(f"{name}: stored as {p.dtype} codes but no scales or "
                                    f"quant state found beside it (bitsandbytes "
                                    f"{bitsandbytes.__version__}); its memory cannot be "
                                    f"counted")
            for t in found:
                if t.data_ptr() not in counted:
                    counted.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- the run's stage

QUANTIZED_DIR = "quantized"
QUANTIZED_FILE = "quantized.json"
TEACHER_PRECISIONS: tuple[str, ...] = ("none", "8bit", "4bit")


def quantized_folder(kind: str, spec: Any, fmt: str) -> str:
    """Where the ``fmt`` variant of a trained student (``kind`` baseline or distill) lives,
    relative to the run folder."""
    from distill.engine.jobs import student_folder

    return f"{QUANTIZED_DIR}/{kind}-{student_folder(spec)}-{fmt}"


def quantize_run(jd: Any, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """The ``quantize`` stage: every trained student (label-only baseline and distilled) in
    every ``quantize.formats``.

    Each variant is written to ``quantized/<kind>-<family>-<size>-<format>/`` and reloaded from
    there (the folder a device would load); then each fp32 student and its variants are
    scored on the same bootstrap resamples of the test fold (macro AUC [CI], the paired
    difference to fp32) and measured side by side in this one process (size on disk,
    memory, CPU latency at batch 1 and 64). The teacher's memory at each precision
    (fp32, 8-bit, 4-bit) is measured too. Everything goes to ``quantized.json``.
    """
    from distill.run.compare import _random_inputs, evaluate_candidates
    from distill.engine.factory import student_name
    from distill.engine.jobs import student_folder, student_key

    recipe = jd.recipe
    q = recipe.quantize
    candidates: list = []
    summaries: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for kind, spec in ((k, s) for s in recipe.students for k in ("baseline", "distill")):
        sname = student_name(spec)
        source = run_dir / kind / student_folder(spec) / "best"
        fp32_name = f"{kind} {sname}"
        key = student_key(spec)
        variants = []
        for fmt in q.formats:
            out = run_dir / quantized_folder(kind, spec, fmt)
            try:
                result = quantize_folder(source, fmt, out, double_quant=q.double_quant,
                                         force=True)
            except QuantizeError as exc:
                skipped[f"{fp32_name} {fmt}"] = str(exc)
                print(f"{fp32_name} {fmt}: not quantized ({exc})")
                continue
            name = f"{fp32_name} {fmt}"
            print(f"{name}: {result.plan.fraction:.0%} of the parameters quantized, "
                  f"{result.file_ratio:.2f}x smaller on disk (quantized part "
                  f"{result.part_ratio:.2f}x)")
            summaries[name] = result.to_dict()
            variants.append(_candidate(name, "quantized", out, key, sname, fp32=fp32_name,
                                       format=fmt))
        if variants:
            candidates.append(_candidate(fp32_name, kind, source, key, sname))
            candidates += variants
    results: dict[str, Any] = {"formats": list(q.formats), "double_quant": q.double_quant,
                               "models": {}, "reference": {}, "skipped": skipped}
    if candidates:
        views = {c.view: jd.views[c.view] for c in candidates}
        import numpy as np

        splits = {s: jd.data.split(s, views) for s in ("val", "test")}
        labels = {s: jd.data.labels[np.sort(jd.data.splits[s])] for s in ("val", "test")}
        ev = recipe.evaluate
        scored = evaluate_candidates(
            candidates, splits, labels, list(jd.classes), bootstrap=ev.bootstrap, seed=ev.seed,
            level=ev.level, repeats=ev.latency_repeats,
            make_inputs=lambda c, b: _random_inputs(jd, c, b),
            out_dir=run_dir / QUANTIZED_DIR / "eval", progress=progress,
            batch_size=recipe.train.batch_size)
        for name, entry in scored["models"].items():
            if entry["kind"] == "quantized":
                entry["quantization"] = summaries[name]
                results["models"][name] = entry
            else:
                results["reference"][name] = entry
        results["bootstrap"] = scored["bootstrap"]
    results["teacher_memory"] = teacher_memory(jd, run_dir)
    atomic_write_text(run_dir / QUANTIZED_FILE, json.dumps(results, indent=1))
    return results


def _candidate(name: str, kind: str, folder: Path, key: str, student: str, **extra: Any):
    """A student folder as the evaluation sees it: loaded from disk, reading view ``key``."""
    from distill.run.compare import Candidate

    return Candidate(name, kind, folder, lambda: load_student(folder),
                     lambda batch: {"signal": batch[key]}, key, student, extra=extra)


def teacher_memory(jd: Any, run_dir: Path,
                   precisions: Sequence[str] = TEACHER_PRECISIONS) -> dict[str, Any]:
    """The run's teacher loaded at each precision: weights MB (with bitsandbytes' scales)
    and weights + peak activations at batch 1, on the CPU. A precision that cannot load
    here records its error instead."""
    import dataclasses

    import teachers
    from distill.run.compare import Candidate, _random_inputs, peak_activation_bytes, weights_bytes
    from distill.engine.factory import build_teacher
    from distill.engine.jobs import TEACHER_DIR, teacher_inputs

    recipe = jd.recipe
    best = run_dir / TEACHER_DIR / "best"
    cand = Candidate("teacher", "teacher", None, lambda: None,
                     teacher_inputs(recipe.teacher.kind), "teacher")
    out: dict[str, Any] = {}
    for precision in precisions:
        try:
            if recipe.teacher.train_mode != "frozen" and (best / "teacher.json").exists():
                teacher = teachers.load(best, load_in=precision, train_mode="frozen")
            else:
                t = dataclasses.replace(recipe.teacher, load_in=precision, train_mode="frozen")
                teacher = build_teacher(dataclasses.replace(recipe, teacher=t), jd.classes)
        except (ValueError, RuntimeError, ImportError, OSError) as exc:
            out[precision] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            continue
        teacher = teacher.eval()
        weights = weights_bytes(teacher)
        peak = peak_activation_bytes(teacher, _random_inputs(jd, cand, 1))
        out[precision] = {"weights_mb": weights / 1e6, "peak_memory_mb": (weights + peak) / 1e6,
                          "parameters_quantized": teacher.quantized}
        del teacher
    return out
