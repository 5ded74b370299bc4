"""The ``signal`` teacher: a speech-style encoder over the ECG signal (HuBERT-ECG).

HuBERT-ECG (Coppola et al. 2024; github.com/Edoar-do/HuBERT-ECG) is a ``HubertModel`` fed
one 1-D sequence per record: each lead resampled to 500 Hz, band-passed 0.05-47 Hz,
min-max scaled to [-1, 1] per lead (``utils.ecg_preprocessing``), the first 5 s kept,
the 12 leads concatenated lead after lead (``ecg.reshape(-1)`` of [12, 2500]) and the
whole sequence decimated by 5 to 100 Hz (``dataset.py``): 12 x 500 = 6000 samples, lead
I first. :func:`hubert_ecg_input` does the same in torch (FFT resampling and an FFT
band-pass, zero-phase; the original uses a causal 150-tap FIR at 500 Hz, a 0.15 s delay).

Outputs: tokens = the encoder frames [B, F, D]; ``token_leads`` = the lead whose segment
of the concatenated sequence a frame's receptive field lies in (-1 when it straddles two
leads); pooled = the mean of the frames; logits = head(pooled).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from distill.core.leads import NUM_LEADS
from teachers.base import TeacherAdapter, load_backbone, register_teacher
from teachers import zoo
from teachers.tiny import build_tiny_hubert, resolve_tiny

__all__ = ["SignalTeacher", "build_tiny_hubert", "frame_leads", "hubert_ecg_input"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resample(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """FFT resampling along the last axis to ``n_out`` samples (as scipy.signal.resample)."""
    n_in = x.shape[-1]
    if n_out == n_in:
        return x
    spec = torch.fft.rfft(x.double(), dim=-1)
    keep = min(spec.shape[-1], n_out // 2 + 1)
    out = torch.zeros(*spec.shape[:-1], n_out // 2 + 1, dtype=spec.dtype, device=x.device)
    out[..., :keep] = spec[..., :keep]
    if n_out < n_in and n_out % 2 == 0:
        out[..., n_out // 2] *= 2  # fold the Nyquist bin (real signal, even length)
    return (torch.fft.irfft(out, n=n_out, dim=-1) * (n_out / n_in)).to(x.dtype)


def _bandpass(x: torch.Tensor, fs: float, low: float, high: float) -> torch.Tensor:
    """Zero-phase FFT band-pass along the last axis (bins outside [low, high] Hz zeroed)."""
    n = x.shape[-1]
    freqs = torch.fft.rfftfreq(n, d=1.0 / fs, device=x.device)
    spec = torch.fft.rfft(x.double(), dim=-1)
    spec = spec * ((freqs >= low) & (freqs <= high)).to(spec.dtype)
    return torch.fft.irfft(spec, n=n, dim=-1).to(x.dtype)


def hubert_ecg_input(signal: torch.Tensor, fs: float, *, model_rate: float = 100.0,
                     seconds: float = 5.0, bandpass: tuple[float, float] | None = (0.05, 47.0),
                     scale: bool = True) -> torch.Tensor:
    """[B, 12, T] mV at ``fs`` -> [B, 12 * seconds * model_rate], HuBERT-ECG's input.

    Args:
        signal: float [B, 12, T] in the standard lead order.
        fs: its sampling rate.
        model_rate: the encoder's rate (HuBERT-ECG: 100 Hz).
        seconds: the window fed to the encoder, from the record's start (HuBERT-ECG: 5 s).
        bandpass: (low, high) Hz, or None to skip filtering.
        scale: min-max scale each lead of the whole record to [-1, 1].

    Returns:
        float32 [B, 12 * round(seconds * model_rate)], leads concatenated in time.
    """
    if signal.dim() != 3 or signal.shape[1] != NUM_LEADS:
        raise ValueError(f"signal teacher: signal must be [B, 12, T], got {tuple(signal.shape)}")
    need = math.ceil(seconds * fs)
    if signal.shape[-1] < need:
        raise ValueError(f"signal teacher: records need at least {seconds:g} s "
                         f"({need} samples at {fs:g} Hz), got {signal.shape[-1]}")
    x = signal.float()
    x = _resample(x, round(x.shape[-1] * model_rate / fs))  # (B, 12, T')
    if bandpass is not None:
        x = _bandpass(x, model_rate, *bandpass)
    if scale:
        lo = x.amin(dim=-1, keepdim=True)
        hi = x.amax(dim=-1, keepdim=True)
        x = 2 * (x - lo) / (hi - lo + 1e-8) - 1
    window = round(seconds * model_rate)
    return x[..., :window].reshape(x.shape[0], -1)  # (B, 12 * window)


def frame_leads(n_samples: int, segment: int, kernels: list[int], strides: list[int]) -> torch.Tensor:
    """The lead of each conv-feature-extractor frame over leads concatenated in time.

    A frame's receptive field covers input samples [f * S, f * S + R), S the product of
    the strides and R the receptive field of the conv stack; it gets lead k when that
    interval lies inside the k-th segment of ``segment`` samples, else -1.

    Returns:
        int64 [F], F the number of frames the conv stack makes from ``n_samples``.
    """
    receptive, jump = 1, 1
    length = n_samples
    for k, s in zip(kernels, strides):
        receptive += (k - 1) * jump
        jump *= s
        length = (length - k) // s + 1
    start = torch.arange(length) * jump
    first, last = start // segment, (start + receptive - 1) // segment
    return torch.where(first == last, first, torch.full_like(first, -1)).long()


@register_teacher("signal")
class SignalTeacher(TeacherAdapter):
    """A HuBERT-style encoder over the 12 leads concatenated in time, with a head.

    Args:
        name_or_path: hub id or folder of a ``HubertModel`` (e.g. Edoardo-BS/hubert-ecg-base,
            which needs ``trust_remote_code=True``: its config is the custom "hubert_ecg"
            type); "tiny" = the built-in tiny preset (cached).
        num_labels, id2label, train_mode, load_in, lora: see :class:`TeacherAdapter`.
        sampling_rate: the rate of the batch's ``signal`` (the recipe's rate).
        model_rate, seconds, bandpass, scale: see :func:`hubert_ecg_input`.
        trust_remote_code: forwarded to ``from_pretrained``.
        dtype: backbone dtype.
    """

    input_names = ("signal",)
    lora_targets = (r".*encoder\.layers\.\d+\.(attention\.(q_proj|k_proj|v_proj|out_proj)"
                    r"|feed_forward\.(intermediate_dense|output_dense))")

    def __init__(self, name_or_path: str | os.PathLike = "tiny", *, num_labels: int,
                 id2label: dict[int, str] | None = None, train_mode: str = "full",
                 load_in: str = "none", sampling_rate: float = 100.0, model_rate: float = 100.0,
                 seconds: float = 5.0, bandpass: tuple[float, float] | None = (0.05, 47.0),
                 scale: bool = True, trust_remote_code: bool = False, lora: Any = None,
                 dtype: str = "float32"):
        from transformers import AutoModel

        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
        source = zoo.backbone_folder(name_or_path) or resolve_tiny("signal", name_or_path)
        backbone = load_backbone(AutoModel, source, load_in=load_in,
                                 trust_remote_code=trust_remote_code,
                                 skip_modules=self.quant_skip_modules, dtype=_DTYPES[dtype])
        config = backbone.config
        settings = {"sampling_rate": sampling_rate, "model_rate": model_rate,
                    "seconds": seconds, "bandpass": list(bandpass) if bandpass else None,
                    "scale": scale, "dtype": dtype}
        super().__init__(backbone=backbone, hidden_size=int(config.hidden_size),
                         num_labels=num_labels, id2label=id2label, train_mode=train_mode,
                         load_in=load_in, source=str(name_or_path),
                         trust_remote_code=trust_remote_code, lora=lora, settings=settings)
        self.sampling_rate = float(sampling_rate)
        self.model_rate = float(model_rate)
        self.seconds = float(seconds)
        self.bandpass = tuple(bandpass) if bandpass else None
        self.scale = scale
        self._dtype = _DTYPES[dtype]
        segment = round(self.seconds * self.model_rate)
        leads = frame_leads(NUM_LEADS * segment, segment, list(config.conv_kernel),
                            list(config.conv_stride))
        self.register_buffer("token_leads", leads, persistent=False)

    @classmethod
    def recipe_settings(cls, teacher: Any, data: Any, view: Any, *,
                        saved: bool = False) -> dict[str, Any]:
        return {} if saved else {"sampling_rate": view.sampling_rate, "seconds": teacher.seconds}

    def example_inputs(self, batch_size: int, generator: torch.Generator
                       ) -> dict[str, torch.Tensor]:
        samples = int(round(self.sampling_rate * self.seconds))
        return {"signal": torch.randn(batch_size, NUM_LEADS, samples, generator=generator)}

    def unused_parameter_names(self) -> set[str]:
        """SpecAugment's mask embedding (only used when masking fires in training) and any
        pre-training projection heads a HuBERT-ECG checkpoint carries."""
        return {n for n, _ in self.hf_model.named_parameters()
                if n == "masked_spec_embed" or n.startswith(("final_proj.", "label_embedding."))}

    def encoder_input(self, signal: torch.Tensor) -> torch.Tensor:
        """[B, 12, T] -> the encoder's [B, 12 * seconds * model_rate] input."""
        return hubert_ecg_input(signal, self.sampling_rate, model_rate=self.model_rate,
                                seconds=self.seconds, bandpass=self.bandpass, scale=self.scale)

    def forward_features(self, signal: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.encoder_input(signal).to(self._dtype)  # (B, 12 * S)
        out = self.hf_model(input_values=x, return_dict=True)
        frames = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, F, D)
        if frames.shape[1] != len(self.token_leads):
            raise ValueError(f"signal teacher: the encoder gave {frames.shape[1]} frames, the "
                             f"conv geometry predicts {len(self.token_leads)}")
        return frames, self.token_leads, frames.mean(dim=1)
