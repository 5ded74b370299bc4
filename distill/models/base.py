"""What every signal model of the suite shares (students, and the foundation models teachers
also load): the signal contract in its config, input checks, the output.

Each family's config inherits ``ECGStudentConfig`` (labels, leads, rate, input length) and
each model inherits ``ECGStudentModel``, whose ``forward`` is
``check -> forward_features -> forward_head -> classifier -> ECGModelOutput`` (timm's
features/head split), so a family only writes its features and its pooling.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from distill.core.leads import STANDARD_LEADS, canonical_lead_names, lead_indices
from distill.core.contract import ECGModelOutput


class ECGStudentConfig(PreTrainedConfig):
    """Fields every student config has (besides HF's ``num_labels``/``id2label``/``label2id``).

    Args:
        leads: the standard lead names the model reads, in the order of ``signal``'s rows.
        sampling_rate: Hz of the signal the model reads.
        input_samples: samples per lead (``sampling_rate * seconds``).
    """

    leads: list[str] | tuple[str, ...] = STANDARD_LEADS  # rows of `signal`, any subset/order
    sampling_rate: int = 100  # Hz
    input_samples: int = 1000  # samples per lead (10 s at 100 Hz)

    def __post_init__(self, **kwargs: Any) -> None:
        self.leads = list(canonical_lead_names(list(self.leads)))  # ValueError on bad names
        if int(self.sampling_rate) <= 0 or int(self.input_samples) <= 0:
            raise ValueError(f"sampling_rate and input_samples must be positive, got "
                             f"{self.sampling_rate} and {self.input_samples}")
        super().__post_init__(**kwargs)

    @property
    def lead_ids(self) -> tuple[int, ...]:
        """Standard index (0..11) of each input row."""
        return lead_indices(self.leads)


def describe_input(config: ECGStudentConfig) -> str:
    """Human form of the input a config expects: "leads I..V6 at 100 Hz, 10 s"."""
    if list(config.leads) == list(STANDARD_LEADS):
        leads = "leads I..V6"
    elif len(config.leads) == 1:
        leads = f"lead {config.leads[0]}"
    else:
        leads = "leads " + ", ".join(config.leads)
    seconds = config.input_samples / config.sampling_rate
    return f"{leads} at {config.sampling_rate:g} Hz, {seconds:g} s"


def check_lead_mask(lead_mask: Any, signal: torch.Tensor, family: str) -> torch.Tensor:
    """``lead_mask`` as bool [B, L] (True = the lead is present) for ``signal`` [B, L, T],
    else ValueError naming the shapes."""
    b, n_leads = signal.shape[:2]
    if not torch.is_tensor(lead_mask) or tuple(lead_mask.shape) != (b, n_leads):
        got = list(lead_mask.shape) if torch.is_tensor(lead_mask) else type(lead_mask).__name__
        raise ValueError(f"{family} expects lead_mask [B, L] = [{b}, {n_leads}] (True = the "
                         f"lead is present), got {got}")
    return lead_mask.to(device=signal.device, dtype=torch.bool)


def lead_token_mask(lead_mask: torch.Tensor, tokens_per_lead: int) -> torch.Tensor:
    """bool [B, L] lead mask -> bool [B, L*N] token mask of lead-major tokens (each
    lead's ``tokens_per_lead`` tokens in a row)."""
    return lead_mask.repeat_interleave(tokens_per_lead, dim=1)


def check_signal(signal: Any, config: ECGStudentConfig, family: str) -> torch.Tensor:
    """Return ``signal`` if it is float ``[B, len(leads), input_samples]``, else ValueError.

    The message names what was expected and what came, e.g. "xresnet1d expects signal
    [B, 12, 1000] (leads I..V6 at 100 Hz, 10 s), got [4, 1, 1000]".
    """
    expected = f"[B, {len(config.leads)}, {config.input_samples}] ({describe_input(config)})"
    if not torch.is_tensor(signal):
        raise ValueError(f"{family} expects signal {expected}, got {type(signal).__name__}")
    if not signal.is_floating_point():
        raise ValueError(f"{family} expects a floating-point signal {expected}, "
                         f"got {signal.dtype}")
    if signal.dim() != 3 or tuple(signal.shape[1:]) != (len(config.leads), config.input_samples):
        raise ValueError(f"{family} expects signal {expected}, got {list(signal.shape)}")
    return signal


class ECGStudentModel(PreTrainedModel):
    """Base of the students: the shared ``forward``; families add features, head, classifier.

    A family defines ``family`` (its registry name), ``forward_features(signal) -> (tokens
    [B, N, D], token_leads [N])``, ``forward_head(tokens, pre_logits) -> pooled or logits``
    and a ``classifier`` module (pooled -> logits).

    A family that reads a lead mask (records with missing leads, ``data.on_flat_lead:
    mask``) sets ``reads_lead_mask = True``, defines :meth:`token_mask` and takes
    ``token_mask`` in ``forward_features`` and ``forward_head``: the missing leads' tokens
    are left out of attention and pooling. Other families ignore a ``lead_mask`` (they read
    the zeros the data serves for a missing lead).
    """

    config: ECGStudentConfig
    family: str = "student"
    input_names: tuple[str, ...] = ("signal",)
    reads_lead_mask: ClassVar[bool] = False
    main_input_name = "signal"
    classifier: nn.Module

    def forward_features(self, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """signal [B, L, T] -> (tokens [B, N, D], token_leads [N] int64); per family."""
        raise NotImplementedError  # abstract: each family defines it

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens [B, N, D] -> pooled [B, D'] (``pre_logits``) or logits [B, C]; per family."""
        raise NotImplementedError  # abstract: each family defines it

    def token_mask(self, lead_mask: torch.Tensor) -> torch.Tensor:
        """bool [B, L] lead mask -> bool [B, N] token mask. Only a family with
        ``reads_lead_mask`` defines it (its own token layout); the others refuse."""
        raise TypeError(f"{self.family} does not read a lead mask (reads_lead_mask is "
                        f"False): it receives a missing lead as zeros")

    def forward(self, signal: torch.Tensor, labels: torch.Tensor | None = None,
                lead_mask: torch.Tensor | None = None, **kwargs: Any) -> ECGModelOutput:
        """Run the student on one batch.

        Args:
            signal: [B, len(config.leads), config.input_samples] float, mV, rows in
                ``config.leads`` order at ``config.sampling_rate``.
            labels: optional [B, C] 0/1 targets; when given, ``loss`` is BCE-with-logits.
            lead_mask: optional bool [B, L], True where a lead is present; a family with
                ``reads_lead_mask`` leaves the missing leads' tokens out of attention and
                pooling and returns ``token_mask``; others ignore it.
            **kwargs: other batch entries, ignored (so ``model(**batch)`` works).

        Returns:
            ECGModelOutput with logits [B, C], tokens [B, N, D], token_leads [N] (int64),
            pooled [B, D'], token_mask [B, N] (with a lead mask a family reads) and, with
            labels, the loss.

        Raises:
            ValueError: when ``signal`` is not of the shape and dtype above.
        """
        signal = check_signal(signal, self.config, self.family).to(self.dtype)  # (B, L, T)
        token_mask = None
        if lead_mask is not None and self.reads_lead_mask:
            token_mask = self.token_mask(check_lead_mask(lead_mask, signal, self.family))
            tokens, token_leads = self.forward_features(signal, token_mask=token_mask)
            pooled = self.forward_head(tokens, pre_logits=True, token_mask=token_mask)
        else:
            tokens, token_leads = self.forward_features(signal)  # (B, N, D), (N,)
            pooled = self.forward_head(tokens, pre_logits=True)  # (B, D')
        logits = self.classifier(pooled)  # (B, C)
        loss = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return ECGModelOutput(loss=loss, logits=logits, tokens=tokens, token_leads=token_leads,
                              pooled=pooled, token_mask=token_mask)
