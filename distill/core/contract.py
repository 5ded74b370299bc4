"""The one output contract every teacher and student returns, and its checks.

Losses and the trainer only ever see ``ECGModelOutput``, so any teacher/student pair works
together (docs/architecture.md, "The output contract")::

    logits       [B, C]     one logit per label (multi-label: sigmoid, never softmax)
    tokens       [B, N, D]  token features for feature-level distillation
    token_leads  [N]        lead index 0..11 of each token (standard order), -1 where a
                            token spans several leads
    pooled       [B, D']    one embedding per record
    token_mask   [B, N]     optional; True where a token is real (False = padding)
    code_logits  [B, N, K, C] optional; a tokenized model's distribution over its C codes
                            at each of K residual levels, per token (log-probabilities up
                            to a constant; the ``codes`` loss distils them)

A model declares which batch entries it reads in ``input_names`` (``("signal",)`` for a
signal model, ``("image",)`` for an image teacher) and is called as
``model(**{k: batch[k] for k in model.input_names})``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from distill.core.leads import NUM_LEADS


@dataclass
class ECGModelOutput(ModelOutput):
    """What every ECG model returns (a transformers ModelOutput: attribute, key and index access).

    Args:
        logits: [B, C] float, one logit per label.
        tokens: [B, N, D] float, token features.
        token_leads: [N] int64, each token's lead (0..11) or -1.
        pooled: [B, D'] float, one embedding per record.
        token_mask: [B, N] bool or None; True marks real tokens.
        code_logits: [B, N, K, C] float or None; per token, a distribution over C codes at
            each of K residual levels (a tokenized teacher's, for the ``codes`` loss).
        loss: scalar when the model was given labels.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    token_leads: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    code_logits: torch.Tensor | None = None


def check_output(out: ECGModelOutput, *, batch_size: int, num_labels: int,
                 where: str = "model") -> None:
    """Raise ValueError (one line naming ``where``) if ``out`` breaks the contract."""

    def fail(msg: str) -> None:
        raise ValueError(f"{where}: {msg}")

    for name in ("logits", "tokens", "token_leads", "pooled"):
        if getattr(out, name) is None:
            fail(f"output has no {name}")
    if tuple(out.logits.shape) != (batch_size, num_labels):
        fail(f"logits shape {tuple(out.logits.shape)}, expected ({batch_size}, {num_labels})")
    if out.tokens.dim() != 3 or out.tokens.shape[0] != batch_size:
        fail(f"tokens shape {tuple(out.tokens.shape)}, expected ({batch_size}, N, D)")
    n_tokens = out.tokens.shape[1]
    if out.token_leads.dtype != torch.long or tuple(out.token_leads.shape) != (n_tokens,):
        fail(f"token_leads must be int64 [{n_tokens}], got {out.token_leads.dtype} "
             f"{tuple(out.token_leads.shape)}")
    if ((out.token_leads < -1) | (out.token_leads >= NUM_LEADS)).any():
        fail("token_leads values must lie in -1..11")
    if out.pooled.dim() != 2 or out.pooled.shape[0] != batch_size:
        fail(f"pooled shape {tuple(out.pooled.shape)}, expected ({batch_size}, D)")
    if out.token_mask is not None and tuple(out.token_mask.shape) != (batch_size, n_tokens):
        fail(f"token_mask shape {tuple(out.token_mask.shape)}, expected ({batch_size}, {n_tokens})")
    codes = out.code_logits
    if codes is not None and (codes.dim() != 4 or tuple(codes.shape[:2]) != (batch_size, n_tokens)):
        fail(f"code_logits shape {tuple(codes.shape)}, expected ({batch_size}, {n_tokens}, K, C)")
    for name in ("logits", "tokens", "pooled", "code_logits"):
        value = getattr(out, name)
        if value is None:
            continue
        if not value.is_floating_point():
            fail(f"{name} must be floating point, got {value.dtype}")
        if not torch.isfinite(value).all():
            fail(f"{name} has NaN or inf")


def model_inputs(model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` that ``model`` reads (its ``input_names``)."""
    names = getattr(model, "input_names", ("signal",))
    missing = [n for n in names if n not in batch]
    if missing:
        raise KeyError(f"{type(model).__name__} needs batch entries {missing}; "
                       f"the batch has {sorted(batch)}")
    return {n: batch[n] for n in names}
