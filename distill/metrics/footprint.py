"""Model size and cost: parameters, multiply-accumulates per record, weights and peak
memory (bitsandbytes' scales included), size on disk, CPU latency.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions
and attention; elementwise work is not counted, the usual convention), halved because one
multiply-accumulate is two floating-point operations.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import students
from distill.core.contract import model_inputs
from distill.core.errors import ECGDistillError
from teachers import weight_folders


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def linear_share(model: nn.Module) -> float:
    """Fraction of the parameters held by ``nn.Linear`` weights (what 8/4-bit shrinks)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return linear / max(1, count_parameters(model))


def count_macs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass on ``batch``, divided by its batch size.

    Runs with autograd on: FlopCounterMode's module tracker trips over tensors made from
    parameters under ``torch.no_grad`` (``Expected gradient function to be set``).
    """
    inputs = model_inputs(model, batch)
    batch_size = next(iter(inputs.values())).shape[0]
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    model.train(was_training)
    return counter.get_total_flops() // 2 // batch_size


@torch.no_grad()
def latency(model: nn.Module, make_batch: Callable[[int], dict[str, Any]], batch_size: int, *,
            repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0,
            statistic: Callable[[list[float]], float] = statistics.median) -> float:
    """Seconds per record of a forward pass at ``batch_size`` (eval mode, no grad):
    ``statistic`` (default the median; ``min`` for the least disturbed pass) of the timings."""
    model.eval()
    inputs = model_inputs(model, make_batch(batch_size))
    for _ in range(warmup):
        model(**inputs)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return statistic(times) / batch_size


def signal_batch(batch_size: int, *, leads: int = 12, sampling_rate: int = 100,
                 seconds: float = 10.0, num_labels: int = 5) -> dict[str, torch.Tensor]:
    """A random batch of ``seconds``-long records (for sizes and timings, not training)."""
    g = torch.Generator().manual_seed(0)
    n = int(round(seconds * sampling_rate))
    return {"signal": torch.randn(batch_size, leads, n, generator=g),
            "labels": (torch.rand(batch_size, num_labels, generator=g) > 0.7).float()}


def preset_rows(*, sampling_rate: int = 100, leads: list[str] | None = None,
                num_labels: int = 5) -> list[dict[str, Any]]:
    """Every student preset: parameters, MACs per 10-second record (an image student: per
    224-px printout of it), Linear share."""

    rows = []
    n_leads = len(leads) if leads else 12
    batch = signal_batch(1, leads=n_leads, sampling_rate=sampling_rate, num_labels=num_labels)
    batch["image"] = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0))
    for family, size in students.presets():
        model = students.create(family, size, num_labels=num_labels, leads=leads,
                                sampling_rate=sampling_rate)
        rows.append({"family": family, "size": size, "parameters": count_parameters(model),
                     "input": "printout" if students.reads_images(family) else "signal",
                     "macs": count_macs(model, batch), "linear_share": linear_share(model)})
    return rows


def format_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers in memory (shared tensors once), plus the
    scales and quant states bitsandbytes keeps beside quantized weights."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total + quantized_weights_extra_bytes(model)


@torch.no_grad()
def peak_activation_bytes(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """Peak bytes allocated on the CPU during one forward pass beyond the weights.

    Measured with the PyTorch profiler's memory events: the running sum of every
    operator's allocations and every release, in time order; its maximum is the peak.
    """
    model.eval()
    model(**inputs)  # warm-up: lazy buffers and caches do not count
    with _silent_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**inputs)
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += (event.cpu_memory_usage if event.name == "[memory]"
                    else event.self_cpu_memory_usage)
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _silent_stderr():
    """The profiler's C++ back end (kineto) writes start/stop lines straight to file
    descriptor 2, with no setting to turn them off; they are noise in a run's log."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def folder_bytes(folder: Path | None) -> int | None:
    """Bytes of the weight files (``*.safetensors``) a saved model needs: those in its
    folder, plus, for a teacher saved without its backbone (``head`` or ``lora`` mode),
    those of the backbone it loads from (a shipped teacher or a local folder)."""
    if folder is None or not folder.exists():
        return None

    def weights(root: Path) -> int:
        return sum(p.stat().st_size for p in (*root.rglob("*.safetensors"), *root.rglob("*.onnx"))
                   if p.name != "objective.safetensors")

    return sum(weights(root) for root in weight_folders(folder))


def footprint(model: nn.Module, make_inputs: Callable[[int], dict[str, torch.Tensor]],
              folder: Path | None = None, batch_sizes: tuple[int, ...] = (1, 64),
              repeats: int = 5) -> dict[str, Any]:
    """Size, memory and CPU latency of ``model``.

    Returns:
        {"parameters", "disk_mb", "weights_mb", "peak_memory_mb": {batch: MB},
        "latency_ms": {batch: ms per record}}; memory is weights + peak activations;
        latency is the fastest of ``repeats`` timed passes (the least disturbed by other
        work on the machine; a median moves with the load of a shared CPU).

        A model run outside PyTorch (an ONNX student: it has ``peak_memory_bytes``) reports
        its own parameter count, stored tensor bytes and peak memory, measured in a fresh
        process (``memory_method`` says so).
    """
    model = model.to("cpu").eval()
    external = hasattr(model, "peak_memory_bytes")
    weights = model.weights_nbytes() if external else weights_bytes(model)
    disk = folder_bytes(folder)
    out: dict[str, Any] = {"parameters": (model.num_parameters if external
                                          else count_parameters(model)),
                           "disk_mb": None if disk is None else disk / 1e6,
                           "weights_mb": weights / 1e6, "peak_memory_mb": {}, "latency_ms": {},
                           "memory_method": ("process peak RSS growth (onnxruntime)" if external
                                             else "weights + peak activations (torch profiler)")}
    for b in batch_sizes:
        inputs = make_inputs(b)
        if external:
            out["peak_memory_mb"][str(b)] = model.peak_memory_bytes(**inputs) / 1e6
        else:
            out["peak_memory_mb"][str(b)] = (weights + peak_activation_bytes(model, inputs)) / 1e6
        out["latency_ms"][str(b)] = latency(model, lambda _, x=inputs: x, b, repeats=repeats,
                                            warmup=0, statistic=min) * 1e3
    return out


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
                import bitsandbytes  # only to name its version

                raise ECGDistillError(f"{name}: stored as {p.dtype} codes but no scales or "
                                    f"quant state found beside it (bitsandbytes "
                                    f"{bitsandbytes.__version__}); its memory cannot be "
                                    f"counted")
            for t in found:
                if t.data_ptr() not in counted:
                    counted.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total
