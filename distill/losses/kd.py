"""Logit distillation: temperature-scaled, per-label binary KL for multi-label ECG tasks.

Hinton et al. 2015 ("Distilling the knowledge in a neural network") match the student's
softened softmax to the teacher's. ECG diagnosis is multi-label (a record can be both MI and
AF), so each label is its own Bernoulli: the teacher's softened probability
``p = sigmoid(t / T)`` is the target for ``q = sigmoid(s / T)`` and the loss is

    L_kd = T² · mean_{records, labels} [ p·(log p − log q) + (1 − p)·(log(1 − p) − log(1 − q)) ]

i.e. KL(Bernoulli(p) || Bernoulli(q)) per label, as in EVL-ECG's logit term. The T² factor
keeps the gradient magnitude independent of T (Hinton 2015, section 2). ``mode="softmax"``
is the classic single-label form, KL(softmax(t/T) || softmax(s/T))·T², averaged over
records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distill.core.schema import spec
from distill.losses import LossOutput, check_fields, register_loss


@dataclass
class KDConfig:
    """Configuration of the logit-distillation term (the recipe section ``distill.kd``)."""

    temperature: float = spec(2.0, help="softening T; the loss is scaled by T² (Hinton 2015)",
                              gt=0)
    mode: Literal["binary", "softmax"] = spec(
        "binary", help="binary: per-label Bernoulli KL (multi-label); softmax: classic KD")

    def __post_init__(self) -> None:
        check_fields(self)


def binary_kd_per_label(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """KL(Bernoulli(sigmoid(t/T)) || Bernoulli(sigmoid(s/T))) · T² for every record and label.

    Written with ``logsigmoid`` (log(1 − sigmoid(x)) = logsigmoid(−x)), so logits of any size
    give finite values and gradients.

    Args:
        student_logits: [B, C] float.
        teacher_logits: [B, C] float, the target (not differentiated here).
        temperature: T > 0.

    Returns:
        [B, C] float32, each entry ≥ 0 (up to rounding).
    """
    s = student_logits.float() / temperature  # (B, C)
    t = teacher_logits.detach().float() / temperature  # (B, C)
    p = torch.sigmoid(t)  # teacher's softened probability
    log_p, log_1mp = F.logsigmoid(t), F.logsigmoid(-t)
    log_q, log_1mq = F.logsigmoid(s), F.logsigmoid(-s)
    kl = p * (log_p - log_q) + (1.0 - p) * (log_1mp - log_1mq)  # (B, C)
    return kl * temperature**2


def softmax_kd_per_record(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """Classic Hinton KD: KL(softmax(t/T) || softmax(s/T)) · T² for every record.

    Args:
        student_logits: [B, C] float.
        teacher_logits: [B, C] float, the target (not differentiated here).
        temperature: T > 0.

    Returns:
        [B] float32.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (B, C)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2  # (B,)


@register_loss("kd", config=KDConfig, default_weight=1.0, order=10)
class MultiLabelKD(nn.Module):
    """Temperature-scaled logit distillation (Hinton 2015), per label for multi-label tasks.

    The teacher's logits are the target and are detached: the teacher is frozen (or read
    from the cache), and no gradient should ever reach it through this term.

    Args:
        temperature: softening T > 0 (the value is scaled by T²).
        mode: ``"binary"`` (per-label Bernoulli KL, for multi-label ECG tasks) or
            ``"softmax"`` (classic single-label KD).
    """

    def __init__(self, *, temperature: float = 2.0,
                 mode: Literal["binary", "softmax"] = "binary") -> None:
        super().__init__()
        self.config = KDConfig(temperature=temperature, mode=mode)

    def forward(self, student_out: Any, teacher_out: Any, batch: dict[str, Any] | None = None,
                context: dict[str, Any] | None = None) -> LossOutput:
        """Distillation loss on the logits.

        Args:
            student_out: ECGModelOutput with ``logits`` [B, C].
            teacher_out: ECGModelOutput with ``logits`` [B, C].
            batch: unused (the labels are the task term's business).
            context: unused; kd publishes nothing for later terms.

        Returns:
            LossOutput(value: scalar, aux: {"per_label": [C] binary mode / "per_record": [B]}).
        """
        s, t = student_out.logits, teacher_out.logits
        if s.shape != t.shape:
            raise ValueError(f"kd: student logits {tuple(s.shape)} and teacher logits "
                             f"{tuple(t.shape)} differ; both models must predict the same labels")
        temperature = self.config.temperature
        if self.config.mode == "binary":
            kl = binary_kd_per_label(s, t, temperature)  # (B, C)
            return LossOutput(kl.mean(), {"per_label": kl.detach().mean(dim=0)})
        kl = softmax_kd_per_record(s, t, temperature)  # (B,)
        return LossOutput(kl.mean(), {"per_record": kl.detach()})

    def extra_repr(self) -> str:
        return f"temperature={self.config.temperature}, mode={self.config.mode!r}"


__all__ = ["KDConfig", "MultiLabelKD", "binary_kd_per_label", "softmax_kd_per_record"]
