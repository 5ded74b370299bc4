"""Distillation-aware quantization (KD + QAT) for the ONNX static int8 target.

A trained fp32 student is fine-tuned while PyTorch's own fake quantization
(``torch.ao.quantization.FakeQuantize``) simulates what onnxruntime's static int8 (see
:mod:`distill.compress.onnx`) will do to it:

* every ``Conv1d`` / ``Linear`` weight passes through a per-channel symmetric int8 fake
  quantizer (a ``torch.nn.utils.parametrize`` parametrization). Per-channel symmetric
  rounding commutes with folding a batch norm into the convolution before it (each output
  channel is only rescaled), so it is the rounding the exported, folded graph sees;
* every ``Conv1d`` / ``Linear`` input passes through a per-tensor affine uint8 fake
  quantizer (a forward pre-hook), the activations onnxruntime quantizes in QDQ format.

The ranges are calibrated first (observers on, fake quantization off, one pass over the
training records), then frozen, so the fine-tuning is deterministic and resumable (the
ranges are buffers in every checkpoint). The loss distils a teacher's soft labels:
``alpha · KD + (1 - alpha) · BCE`` with the per-label binary KD of
:func:`distill.losses.kd.binary_kd_per_label`, the teacher being the student's own fp32
self (default) or the run's teacher (its cached logits). Training runs through the shared
loop (checkpoints, resume, best epoch by validation AUC under fake quantization). The
result is saved as a plain fp32 student (fake quantizers removed, the fine-tuned weights
kept), which the ONNX path then exports and quantizes with the calibration as usual.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                   MovingAveragePerChannelMinMaxObserver, disable_fake_quant,
                                   disable_observer, enable_fake_quant)
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from distill.compress.quantize import load_student
from distill.core.hashing import stable_hash, sha256_file
from distill.engine.factory import student_key
from distill.engine.jobs import JobData, student_sets, train_settings
from distill.recipe import AugmentConfig
from distill.engine.train import TrainJob
from distill.losses.kd import binary_kd_per_label

QUANTIZED_TYPES = (nn.Conv1d, nn.Linear)
ACT = "act_fake_quant"


class _WeightFakeQuant(nn.Module):
    """Parametrization: per-channel (output channel) symmetric int8 fake quantization."""

    def __init__(self) -> None:
        super().__init__()
        self.fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127,
                               quant_max=127, dtype=torch.qint8,
                               qscheme=torch.per_channel_symmetric, ch_axis=0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.fq(weight)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, ACT)(args[0]), *args[1:])


def attach_fake_quant(model: nn.Module) -> int:
    """Fake-quantize the weights and inputs of every Conv1d / Linear of ``model`` (in place);
    the number of layers wrapped."""
    n = 0
    for module in model.modules():
        if isinstance(module, QUANTIZED_TYPES) and not parametrize.is_parametrized(module):
            parametrize.register_parametrization(module, "weight", _WeightFakeQuant())
            module.add_module(ACT, FakeQuantize(
                observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                dtype=torch.quint8, qscheme=torch.per_tensor_affine))
            module._qat_hook = module.register_forward_pre_hook(_quantize_input)
            n += 1
    return n


def detach_fake_quant(model: nn.Module) -> nn.Module:
    """Remove what :func:`attach_fake_quant` added, keeping the fine-tuned fp32 weights."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        if hasattr(module, "_qat_hook"):
            module._qat_hook.remove()
            del module._qat_hook
        if hasattr(module, ACT):
            delattr(module, ACT)
    return model


@torch.no_grad()
def calibrate(model: nn.Module, loader: DataLoader, key: str) -> None:
    """Observe one pass of ``loader`` (fake quantization off), then freeze the ranges and
    turn fake quantization on."""
    model.apply(disable_fake_quant)
    model.eval()
    for batch in loader:
        model(signal=batch[key])
    model.apply(disable_observer)
    model.apply(enable_fake_quant)


@torch.no_grad()
def logits_on(model: nn.Module, dataset, key: str, n: int, batch_size: int = 64) -> np.ndarray:
    """float32 [n, C]: ``model``'s logits on every record of ``dataset`` (items carry
    ``index`` < n), rows by record position."""
    model.eval()
    out = None
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = model(signal=batch[key]).logits.float().numpy()
        if out is None:
            out = np.zeros((n, logits.shape[1]), dtype=np.float32)
        out[batch["index"].numpy()] = logits
    return out


def plain_job_data(jd: JobData) -> JobData:
    """``jd`` with the recipe's augmentation off: KD-QAT fine-tunes and calibrates on the
    records as the deployed model reads them (as ``onnx-int8`` calibrates), and its soft
    labels are computed on those same records."""
    recipe = copy.deepcopy(jd.recipe)
    recipe.train.augment = AugmentConfig()
    return dataclasses.replace(jd, recipe=recipe)


def kd_qat_job(jd: JobData, spec, source: Path, *, alpha: float, temperature: float,
               epochs: int, lr: float, teacher_logits: np.ndarray | None = None,
               calibration_records: int = 256, seed: int = 0) -> TrainJob:
    """The fine-tuning of the fp32 student in ``source`` under fake int8 quantization.

    Args:
        jd: the run's data; the training records are the student's label-only training set
            (with ``data.label_fraction`` < 1, the labeled subset), never augmented.
        spec: the student.
        source: its trained fp32 folder.
        alpha: weight of the KD term (1 - alpha on the labels).
        temperature: KD temperature.
        epochs, lr: the fine-tuning's (part of the job's fingerprint, with the recipe's
            other training settings).
        teacher_logits: float32 [N, C] soft targets per record position (the run's
            teacher); None: the fp32 student's own logits.
        calibration_records: training records the activation ranges are observed on.
        seed: the run's seed (which records calibrate).
    """
    jd = plain_job_data(jd)
    key = student_key(spec)
    student = load_student(source).float()
    n = len(jd.data)
    if teacher_logits is None:  # the fp32 self, before any fake quantization
        view = {key: jd.views[key]}
        teacher_logits = logits_on(student, jd.data.split("all", view), key, n)
        soft_from = "self"
    else:
        soft_from = "teacher"
    sets = student_sets(jd, spec, extras={"kd.soft": teacher_logits})
    attach_fake_quant(student)
    rows = np.random.default_rng(seed).permutation(len(sets["train"]))[:calibration_records]
    calibrate(student, DataLoader(torch.utils.data.Subset(sets["train"], np.sort(rows)),
                                  batch_size=64), key)
    student.train()

    def loss_fn(model: nn.Module, batch: Mapping[str, Any]):
        logits = model(signal=batch[key]).logits
        kd = binary_kd_per_label(logits, batch["kd.soft"], temperature).mean()
        task = nn.functional.binary_cross_entropy_with_logits(logits.float(),
                                                              batch["labels"].float())
        return alpha * kd + (1 - alpha) * task, {"kd": kd.detach(), "task": task.detach()}

    def logits_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return model(signal=batch[key]).logits

    def save(model: nn.Module, folder: Path, state_dict: dict | None) -> None:
        inner = getattr(model, "module", model)
        if state_dict is not None:
            inner.load_state_dict(state_dict)
        clean = load_student(source).float()
        clean.load_state_dict(_plain_state(inner))
        clean.save_pretrained(folder)

    return TrainJob(
        name=f"kd-qat {spec.family}/{spec.size}", stage="quantize", model=student,
        train_set=sets["train"], val_set=sets["val"], loss_fn=loss_fn, logits_fn=logits_fn,
        save_model=save, class_names=jd.classes,
        fingerprint=stable_hash({"job": "kd-qat", "source": sha256_file(source /
                                                                       "model.safetensors"),
                                 "data": jd.data.fingerprint, "alpha": alpha,
                                 "temperature": temperature, "soft": soft_from,
                                 "teacher": (None if soft_from == "self" else hashlib.sha256(
                                     np.ascontiguousarray(teacher_logits).tobytes()).hexdigest()),
                                 "calibration_records": calibration_records, "seed": seed,
                                 "epochs": epochs, "lr": lr,
                                 "train": train_settings(jd.recipe)}))


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a plain student has: parametrized weights under their own name (the
    fine-tuned latent fp32 values), no fake-quantizer buffers."""
    out = {}
    for name, value in model.state_dict().items():
        if f".{ACT}." in name or ".parametrizations.weight.0." in name:
            continue
        out[name.replace(".parametrizations.weight.original", ".weight")] = value
    return out

