"""Model size and cost: parameters, multiply-accumulates per record, CPU latency.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions
and attention; elementwise work is not counted, the usual convention), halved because one
multiply-accumulate is two floating-point operations.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distill.core.contract import model_inputs


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
    """Every student preset: parameters, MACs per 10-second record, Linear share."""
    import students

    rows = []
    n_leads = len(leads) if leads else 12
    batch = signal_batch(1, leads=n_leads, sampling_rate=sampling_rate, num_labels=num_labels)
    for family, size in students.presets():
        model = students.create(family, size, num_labels=num_labels, leads=leads,
                                sampling_rate=sampling_rate)
        rows.append({"family": family, "size": size, "parameters": count_parameters(model),
                     "macs": count_macs(model, batch), "linear_share": linear_share(model)})
    return rows


def format_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
