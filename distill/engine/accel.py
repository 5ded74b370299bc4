"""Accelerate's process set-up: the process state every stage shares, a fresh Accelerator
per training job, and a description of the machine for metrics and model cards."""

from __future__ import annotations

import importlib.util
import inspect
import os
import platform
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration

from distill.core.errors import ECGDistillError
from distill.recipe import TrainConfig


def _has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _use_cpu_processes() -> bool:
    """Several processes without a GPU (torchrun / `accelerate launch` with the 2-process
    CPU config): Accelerate takes its data-parallel CPU path (gloo) only when told cpu=True."""
    return int(os.environ.get("LOCAL_RANK", "-1")) != -1 and not torch.cuda.is_available()


def process_state():
    """Accelerate's process state (rank, main process, barriers), initialised the way
    :func:`make_accelerator` initialises it."""
    return PartialState(cpu=_use_cpu_processes())


def reset_job_state() -> None:
    """Start Accelerate's per-job singletons afresh, keeping the process group.

    Each training job configures its own Accelerator (precision, accumulation), but
    ``AcceleratorState`` and ``GradientState`` are process-wide singletons that keep the
    first job's settings. Accelerate resets them only through private helpers
    (``_reset_state``, which clears ``_shared_state``); this calls whichever the installed
    release has and fails with one line when it has neither, rather than training the
    next job with the previous one's settings.
    """
    for cls, kwargs in ((AcceleratorState, {"reset_partial_state": False}), (GradientState, {})):
        reset = getattr(cls, "_reset_state", None)
        if callable(reset):
            params = inspect.signature(reset).parameters
            reset(**{k: v for k, v in kwargs.items() if k in params})
        elif isinstance(getattr(cls, "_shared_state", None), dict):
            cls._shared_state.clear()
        else:
            import accelerate

            raise ECGDistillError(f"accelerate {accelerate.__version__}: {cls.__name__} has no "
                                  f"way to reset its per-job state; install the locked version "
                                  f"(make setup)")


def make_accelerator(cfg: TrainConfig, out_dir: Path, seed: int, trackers: bool = True):
    """The Accelerator of a run: precision, accumulation, seedable sampler, TensorBoard."""
    reset_job_state()
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ECGDistillError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
    log_with = "tensorboard" if trackers and _has_tensorboard() else None
    return Accelerator(
        cpu=_use_cpu_processes(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
        # the scheduler counts optimiser steps; it is stepped only when they happen
        step_scheduler_with_optimizer=False,
        log_with=log_with, project_dir=str(out_dir))


def machine_description(processes: int = 1) -> str:
    """Where a job runs, for its metrics and a model card: the GPU model (times the
    processes), or the CPU's cores and torch threads."""
    if torch.cuda.is_available():
        return f"{processes} x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} torch threads"
