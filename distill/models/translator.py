"""A CLMT-style latent translator: 25 Hz RVQ tokens -> 100 Hz RVQ tokens -> a 100 Hz ECG.

After CLMT (compact latent manifold translation, ``../shared/seeds/``): signals are
tokenized by residual vector quantization (:mod:`distill.models.rvq`) and a
context-prompted transformer translates one token sequence into another. Here the two
sides are one lead at two sampling rates:

- **the tokenizer pair.** Two :class:`~distill.models.rvq.RVQTokenizer` of the same
  architecture (stem, widths, K codebooks of C codes) with patches of the same duration
  (0.4 s: 10 samples at 25 Hz, 40 at 100 Hz), each trained on its own rate. The patch
  duration is what is shared: one code stack per 0.4 s at either rate, so a 25 Hz and a
  100 Hz token sequence of a record align 1:1 in time (token n covers the same 0.4 s).
  The weights are not shared: a per-rate model is the simplest way to give each rate a
  stem of its own, and each tokenizer stays an ordinary ``rvq`` model (its codec report,
  its reuse by Hypnos).
- **the translator.** A bidirectional transformer reads a context prompt of three learned
  tokens (the lead, the source rate, the target rate) followed by the N source steps (each
  the sum of its K codes' learned embeddings, a projection of the source tokenizer's
  quantized latent, and a time position). Its state at step n predicts the *continuous*
  target latent of step n (the 100 Hz encoder's output before quantization); the target
  tokenizer's codebooks quantize it into K codes of 100 Hz (CLMT's "snapping" onto the
  target manifold), which its decoder turns into samples.
- **the prior** (``prior``, on by default): the source tokens decoded at 25 Hz, upsampled
  with the polyphase low-pass filter of ``scipy.signal.resample_poly`` (band-limited: no
  content above the source's Nyquist frequency) and read by the 100 Hz encoder give a
  first target latent per step, which the transformer also reads and whose correction it
  predicts. It is a function of the source tokens alone; the transformer only has to
  supply what the source band lacks (the QRS complex's high frequencies) instead of
  learning the whole target latent space from scratch.

Training (both tokenizers frozen, in eval mode): the normalised MSE between the predicted
and the true target latent (the 100 Hz encoder's latent of the reference) plus the MSE of
the decoded signal, the quantization passed straight through (the forward pass is the
inference path, the gradient reaches the prediction through the frozen decoder).

Every lead is a stream of its own (the tokenizers read leads independently; the prompt says
which lead). The saved folder holds both tokenizers' weights and configurations: one
folder upsamples on its own (``AutoModel.from_pretrained``).

The recipe section that trains it, ``translate`` (:class:`TranslateConfig`), is declared
here beside the model, as the loss families declare theirs; training, upsampling records
and the evaluation against cubic interpolation are :mod:`distill.run.upsample`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from distill.core.errors import DataError, ECGDistillError, RecipeError
from distill.core.io import require_safetensors
from distill.core.leads import NUM_LEADS, lead_indices
from distill.core.schema import spec
from distill.models.base import ECGStudentConfig, describe_input
from distill.models.blocks import Block, init_weights
from distill.models.rvq import RVQTokenizer, RVQTokenizerConfig

RATES: tuple[int, ...] = (25, 50, 100, 125, 250, 500)  # the prompt's rate vocabulary
PROMPT_TOKENS = 3  # lead, source rate, target rate


def tokenizer_fields(config: RVQTokenizerConfig) -> dict[str, Any]:
    """What a translator config keeps of one tokenizer's config (its architecture, rate and
    record length; not its leads: the translator sets those)."""
    return {k: v for k, v in config.to_diff_dict().items()
            if k in RVQTokenizerConfig.__dataclass_fields__ and k != "leads"}


class TranslatorConfig(ECGStudentConfig):
    """The translator's settings. ``sampling_rate`` and ``input_samples`` are the source's
    (what the model reads); the target's are in ``target``.

    Args:
        source, target: the two tokenizers' configurations (dicts, as saved; see
            :func:`tokenizer_fields`); their patches must last equally long and cover the
            record in as many steps.
        hidden_size, num_layers, num_heads, mlp_ratio: the transformer.
        dropout: in attention and MLPs.
        rates: the vocabulary of the rate prompt (Hz).
        signal_weight: weight of the decoded signal's MSE in the loss (the latent term has
            weight 1).
        prior: start from the band-limited reading of the source tokens (module docstring):
            the prediction is a correction to it (needs an integer rate ratio).
        initializer_range, layer_norm_eps: init std; LayerNorm epsilon.
    """

    model_type = "ecg_translator"

    source: dict[str, Any] | None = None
    target: dict[str, Any] | None = None
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    rates: list[int] | tuple[int, ...] = RATES
    signal_weight: float = 1.0
    prior: bool = True
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6

    def __post_init__(self, **kwargs: Any) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ecg_translator: hidden_size {self.hidden_size} is not divisible "
                             f"by num_heads {self.num_heads}")
        self.rates = [int(r) for r in self.rates]
        super().__post_init__(**kwargs)
        if self.source is not None and self.target is not None:
            src, tgt = self.source_config(), self.target_config()
            for cfg in (src, tgt):
                if int(cfg.sampling_rate) not in self.rates:
                    raise ValueError(f"ecg_translator: {cfg.sampling_rate} Hz is not in the "
                                     f"rate vocabulary {self.rates}")
            if src.patch_size * tgt.sampling_rate != tgt.patch_size * src.sampling_rate:
                raise ValueError(
                    f"ecg_translator: the tokenizers' patches must last equally long, got "
                    f"{src.patch_size} samples at {src.sampling_rate} Hz and {tgt.patch_size} "
                    f"at {tgt.sampling_rate} Hz")
            if self.prior and tgt.sampling_rate % src.sampling_rate:
                raise ValueError(f"ecg_translator: the prior needs an integer rate ratio, got "
                                 f"{src.sampling_rate} Hz -> {tgt.sampling_rate} Hz")
            if src.num_patches != tgt.num_patches:
                raise ValueError(f"ecg_translator: {src.num_patches} source steps and "
                                 f"{tgt.num_patches} target steps; records must last equally "
                                 f"long at both rates")

    def _tokenizer(self, fields: dict[str, Any] | None, which: str,
                   input_samples: int) -> RVQTokenizerConfig:
        if fields is None:
            raise ValueError(f"ecg_translator: no {which} tokenizer configuration (config."
                             f"{which}); build it with translator_config(source, target, ...)")
        keep = {k: v for k, v in fields.items() if k in RVQTokenizerConfig.__dataclass_fields__
                and k not in ("leads", "input_samples")}
        return RVQTokenizerConfig(**keep, leads=list(self.leads), input_samples=input_samples)

    def source_config(self) -> RVQTokenizerConfig:
        """The source tokenizer's config at this model's leads and record length."""
        return self._tokenizer(self.source, "source", int(self.input_samples))

    def target_config(self) -> RVQTokenizerConfig:
        """The target tokenizer's config at this model's leads; its record length is the
        source's duration at the target rate."""
        if self.source is None or self.target is None:
            return self._tokenizer(self.target, "target", 1)
        samples = round(int(self.input_samples) * int(self.target["sampling_rate"])
                        / int(self.source["sampling_rate"]))
        return self._tokenizer(self.target, "target", samples)

    @property
    def ratio(self) -> int:
        """Target samples per source sample (rounded down)."""
        return self.target_rate // int(self.sampling_rate)

    @property
    def target_rate(self) -> int:
        return int(self.target_config().sampling_rate)

    @property
    def target_samples(self) -> int:
        return int(self.target_config().input_samples)


def upsampling_filter(ratio: int) -> torch.Tensor:
    """The low-pass FIR ``scipy.signal.resample_poly`` uses to upsample by ``ratio`` (Kaiser
    window, beta 5, cutoff at the lower Nyquist frequency), scaled by ``ratio``."""
    from scipy.signal import firwin

    half = 10 * ratio
    taps = firwin(2 * half + 1, 1.0 / ratio, window=("kaiser", 5.0)) * ratio
    return torch.tensor(taps, dtype=torch.float32)


def upsample_bandlimited(signal: torch.Tensor, taps: torch.Tensor, ratio: int,
                         samples: int) -> torch.Tensor:
    """[B, L, T] -> [B, L, samples] at ``ratio`` times the rate: zeros stuffed between the
    samples, then the zero-phase filter ``taps`` (what ``resample_poly(x, ratio, 1)`` does;
    padded with zeros past the ends)."""
    b, l, t = signal.shape
    x = signal.reshape(b * l, 1, t).to(taps.dtype)
    y = F.conv_transpose1d(x, taps.flip(0)[None, None], stride=ratio)
    half = (taps.numel() - 1) // 2
    y = y[..., half:half + samples]
    if y.shape[-1] < samples:
        y = F.pad(y, (0, samples - y.shape[-1]))
    return y.reshape(b, l, samples).to(signal.dtype)


def translator_options() -> tuple[str, ...]:
    """The config fields a recipe may set (the rest come from the tokenizers and the data)."""
    skip = {"source", "target", "leads", "sampling_rate", "input_samples"}
    generic = set(PreTrainedConfig.__dataclass_fields__)
    return tuple(sorted(k for k in TranslatorConfig.__dataclass_fields__
                        if k not in generic and k not in skip))


def translator_config(source: RVQTokenizer, target: RVQTokenizer, **fields: Any
                      ) -> TranslatorConfig:
    """A translator config over two (trained) tokenizers: the source's rate and record
    length, and ``fields``."""
    src = source.config
    fields.setdefault("sampling_rate", src.sampling_rate)
    fields.setdefault("input_samples", src.input_samples)
    return TranslatorConfig(source=tokenizer_fields(src), target=tokenizer_fields(target.config),
                            **fields)


@dataclass
class TranslatorOutput(ModelOutput):
    """loss: latent NMSE + ``signal_weight`` * signal MSE (with a target); signal
    [B, L, T_target] (the translation at the target rate); codes [B, L, N, K] (the target
    tokenizer's codes of it); latents [B, L, N, d] (the predicted continuous target latent);
    latent_loss, signal_loss: the two terms."""

    loss: torch.Tensor | None = None
    signal: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    latent_loss: torch.Tensor | None = None
    signal_loss: torch.Tensor | None = None


class TranslatorModel(PreTrainedModel):
    """The translator (module docstring): ``forward(signal, target=None)``; :meth:`translate`
    for inference."""

    config_class = TranslatorConfig
    config: TranslatorConfig
    base_model_prefix = "translator"
    main_input_name = "signal"
    input_names = ("signal",)
    family = "translator"
    _no_split_modules = ("Block",)
    _trunc_normal = ("pos_embed", "prompt_pos")

    def __init__(self, config: TranslatorConfig) -> None:
        super().__init__(config)
        src, tgt = config.source_config(), config.target_config()
        d = config.hidden_size
        self.source_tokenizer = RVQTokenizer(src)
        self.target_tokenizer = RVQTokenizer(tgt)
        for tok in (self.source_tokenizer, self.target_tokenizer):
            tok.requires_grad_(False)
        k, c = src.num_quantizers, src.codebook_size
        self.code_embed = nn.Embedding(k * c, d)  # source codebook j's code i at j * C + i
        self.latent_in = nn.Linear(src.codebook_dim, d)  # the quantized source latent
        self.pos_embed = nn.Parameter(torch.zeros(src.num_patches, d))
        self.lead_embed = nn.Embedding(NUM_LEADS, d)
        self.source_rate_embed = nn.Embedding(len(config.rates), d)
        self.target_rate_embed = nn.Embedding(len(config.rates), d)
        self.prompt_pos = nn.Parameter(torch.zeros(PROMPT_TOKENS, d))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.head = nn.Linear(d, tgt.codebook_dim)  # the continuous target latent
        if config.prior:
            self.prior_in = nn.Linear(tgt.codebook_dim, d)
        # not a buffer: computed from the config (a non-persistent buffer is left empty when
        # transformers builds the model on the meta device to load it)
        self._taps: torch.Tensor | None = None
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if not any(module is m for tok in (self.source_tokenizer, self.target_tokenizer)
                   for m in tok.modules()):
            init_weights(module, self.config.initializer_range)

    def train(self, mode: bool = True) -> "TranslatorModel":
        """The tokenizers stay in eval mode (their codebooks never move)."""
        super().train(mode)
        self.source_tokenizer.eval()
        self.target_tokenizer.eval()
        return self

    # ------------------------------------------------------------ pieces

    def _rate_id(self, rate: int) -> int:
        try:
            return self.config.rates.index(int(rate))
        except ValueError:
            raise ValueError(f"translator: {rate} Hz is not in its rate vocabulary "
                             f"{self.config.rates}") from None

    def _check(self, x: torch.Tensor, samples: int, what: str, leads: int | None) -> torch.Tensor:
        expect = f"[B, {leads if leads is not None else 'L'}, {samples}]"
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 3 \
                or x.shape[-1] != samples or (leads is not None and x.shape[1] != leads):
            got = list(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"translator expects {what} {expect} float "
                             f"({describe_input(self.config)} for the source), got {got}")
        return x

    def _lead_ids(self, lead_ids: torch.Tensor | None, b: int, l: int,
                  device: torch.device) -> torch.Tensor:
        """[B, L] standard lead indices: ``lead_ids`` if given (one per row or per stream),
        else the config's leads."""
        if lead_ids is None:
            if l != len(self.config.leads):
                raise ValueError(f"translator: {l} leads given without lead_ids; the config "
                                 f"names {len(self.config.leads)} ({', '.join(self.config.leads)})")
            return torch.tensor(self.config.lead_ids, device=device).expand(b, l)
        lead_ids = torch.as_tensor(lead_ids, device=device).long()
        if lead_ids.dim() == 1:
            lead_ids = lead_ids[:, None] if lead_ids.numel() == b and l == 1 else lead_ids[None]
        return lead_ids.expand(b, l)

    def source_codes(self, signal: torch.Tensor) -> torch.Tensor:
        """Source signal [B, L, T_source] -> its codes [B, L, N, K] (deterministic)."""
        b, l, _ = signal.shape
        _, codes, _ = self.source_tokenizer.quantizer(
            self.source_tokenizer._latents(signal.float()))
        return codes.reshape(b, l, codes.shape[1], codes.shape[2])

    def predict_latents(self, codes: torch.Tensor, lead_ids: torch.Tensor,
                        source_rate: int | None = None, target_rate: int | None = None,
                        prior: torch.Tensor | None = None) -> torch.Tensor:
        """Source codes [B, L, N, K] and lead indices [B, L] -> predicted continuous target
        latents [B*L, N, d]: one sequence per stream, the prompt first. ``prior``: the
        prior latents [B*L, N, d] of these codes when already computed
        (:meth:`prior_latents`)."""
        b, l, n, k = codes.shape
        c = self.source_tokenizer.config.codebook_size
        device = codes.device
        offsets = torch.arange(k, device=device) * c
        flat = codes.reshape(b * l, n, k)
        quantized = self.source_tokenizer.code_vectors(codes).sum(dim=0)  # (B*L, N, d_s)
        x = self.code_embed(flat + offsets).sum(dim=2) + self.latent_in(quantized.to(self.dtype))
        x = x + self.pos_embed[:n]
        if self.config.prior:
            if prior is None:
                prior = self.prior_latents(quantized, b)  # (B*L, N, d_t)
            prior = prior.reshape(b * l, n, -1).to(self.dtype)
            x = x + self.prior_in(prior)
        else:
            prior = None
        src = self._rate_id(source_rate or self.source_tokenizer.config.sampling_rate)
        tgt = self._rate_id(target_rate or self.target_tokenizer.config.sampling_rate)
        rates = torch.tensor([src, tgt], device=device)
        prompt = torch.cat([
            self.lead_embed(lead_ids.reshape(-1))[:, None],  # (B*L, 1, D)
            self.source_rate_embed(rates[:1]).expand(b * l, 1, -1),
            self.target_rate_embed(rates[1:]).expand(b * l, 1, -1)], dim=1) + self.prompt_pos
        x = torch.cat([prompt, x], dim=1)  # (B*L, 3 + N, D)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm(x[:, PROMPT_TOKENS:]))  # (B*L, N, d_t)
        return out if prior is None else prior + out

    @torch.no_grad()
    def stream_inputs(self, signal: torch.Tensor, target: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
        """What :meth:`forward` can be given precomputed, of ``signal`` [B, L, T_source]
        (and ``target`` [B, L, T_target]): ``codes`` [B, L, N, K], ``prior`` and
        ``target_latents`` [B, L, N, d] (the frozen tokenizers' part of the work)."""
        b, l, _ = signal.shape
        codes = self.source_codes(signal)
        out = {"codes": codes}
        if self.config.prior:
            quantized = self.source_tokenizer.code_vectors(codes).sum(dim=0)
            out["prior"] = self.prior_latents(quantized, b).reshape(b, l, codes.shape[2], -1)
        if target is not None:
            true = self.target_tokenizer._latents(target.to(self.dtype))
            out["target_latents"] = true.reshape(b, l, codes.shape[2], -1)
        return out

    @torch.no_grad()
    def prior_latents(self, quantized: torch.Tensor, batch: int) -> torch.Tensor:
        """The source's quantized latents [B*L, N, d_s] -> the target encoder's latents
        [B*L, N, d_t] of their decoding, upsampled band-limited to the target rate."""
        src = self.source_tokenizer._samples(quantized.to(self.dtype), batch)  # (B, L, T_s)
        if self._taps is None or self._taps.device != src.device:
            self._taps = upsampling_filter(self.config.ratio).to(src.device)
        up = upsample_bandlimited(src, self._taps, self.config.ratio,
                                  self.config.target_samples)
        return self.target_tokenizer._latents(up)

    def snap(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous target latents [M, N, d] -> (quantized [M, N, d], codes [M, N, K]) by
        the target tokenizer's codebooks; the gradient passes straight through."""
        quantized, codes, _ = self.target_tokenizer.quantizer(latents.detach().float())
        return latents + (quantized.to(latents.dtype) - latents).detach(), codes

    # ------------------------------------------------------------ forward

    def forward(self, signal: torch.Tensor | None = None, target: torch.Tensor | None = None,
                codes: torch.Tensor | None = None, lead_ids: torch.Tensor | None = None,
                prior: torch.Tensor | None = None, target_latents: torch.Tensor | None = None,
                **kwargs: Any) -> TranslatorOutput:
        """Translate one batch.

        Args:
            signal: [B, L, T_source] float at the source rate, scaled as the tokenizers were
                trained; or ``codes`` [B, L, N, K], the source tokenizer's codes, instead.
            target: optional [B, L, T_target], the reference at the target rate; when given,
                the loss is computed.
            lead_ids: optional standard lead indices (0..11), [B, L] or one per stream ([B]
                with L = 1); default: the config's leads (then L must be their number).
            prior, target_latents: optional, [B, L, N, d] each: the prior latents of the
                source codes (:meth:`prior_latents`) and the target encoder's latents of
                ``target``, when computed beforehand (the tokenizers are frozen: training
                computes them once per stream).
            **kwargs: other batch entries, ignored (so ``model(**batch)`` works).

        Returns:
            TranslatorOutput (the translation, its codes and latents; with ``target``, the
            loss and its terms).
        """
        if codes is None:
            if signal is None:
                raise ValueError("translator: give signal or codes")
            self._check(signal, int(self.config.input_samples), "signal", None)
            codes = self.source_codes(signal)
        b, l, n, _ = codes.shape
        ids = self._lead_ids(lead_ids, b, l, codes.device)
        latents = self.predict_latents(codes, ids, prior=prior)  # (B*L, N, d)
        snapped, out_codes = self.snap(latents)
        decoded = self.target_tokenizer._samples(snapped.to(self.dtype), b)  # (B, L, T_t)
        latent_loss = signal_loss = loss = None
        if target is not None:
            self._check(target, self.config.target_samples, "target", l)
            if target_latents is None:
                with torch.no_grad():
                    true = self.target_tokenizer._latents(target.to(self.dtype))  # (B*L, N, d)
            else:
                true = target_latents.reshape(b * l, n, -1)
            scale = true.float().var().clamp_min(1e-8)
            latent_loss = F.mse_loss(latents.float(), true.float()) / scale
            signal_loss = F.mse_loss(decoded.float(), target.float())
            loss = latent_loss + self.config.signal_weight * signal_loss
        return TranslatorOutput(loss=loss, signal=decoded, codes=out_codes.view(b, l, n, -1),
                                latents=latents.view(b, l, n, -1), latent_loss=latent_loss,
                                signal_loss=signal_loss)

    @torch.no_grad()
    def translate(self, signal: torch.Tensor, lead_ids: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """signal [B, L, T_source] -> the translation [B, L, T_target] (eval mode, no
        gradient)."""
        was = self.training
        self.eval()
        try:
            return self(signal=signal, lead_ids=lead_ids).signal
        finally:
            self.train(was)

    @classmethod
    def from_tokenizers(cls, source: RVQTokenizer, target: RVQTokenizer,
                        **fields: Any) -> "TranslatorModel":
        """A new translator over two trained tokenizers (their weights copied in, frozen)."""
        model = cls(translator_config(source, target, **fields))
        model.source_tokenizer.load_state_dict(source.state_dict())
        model.target_tokenizer.load_state_dict(target.state_dict())
        return model


# ---------------------------------------------------------------- the recipe section

TOLERANCE_MS = 50.0  # an R-peak detection matches a reference peak this close


@dataclass
class TokenizerStage:
    """The two RVQ tokenizers (the same preset and options at both rates)."""

    size: str = spec("tiny", help="rvq size preset (tiny, base)")
    options: dict[str, Any] = spec(default_factory=dict,
                                   help="rvq config fields, e.g. {num_quantizers: 8}")
    epochs: int = spec(8, ge=1)
    source_epochs: int | None = spec(None, help="epochs of the source-rate tokenizer (fewer "
                                                "samples per patch: it converges sooner); "
                                                "null = epochs", ge=1)
    lr: float = spec(0.002, gt=0, lt=1)
    batch_size: int = spec(16, help="records per batch (each lead a stream)", ge=1)
    grad_clip: float | None = spec(None, help="gradient-norm clipping; null = none", gt=0)


@dataclass
class TranslatorStage:
    """The translator over the frozen tokenizers."""

    options: dict[str, Any] = spec(default_factory=dict,
                                   help="translator config fields, e.g. {hidden_size: 128, "
                                        "num_layers: 4}")
    epochs: int = spec(8, ge=1)
    lr: float = spec(0.001, gt=0, lt=1)
    batch_size: int = spec(128, help="streams (one lead of one record) per batch", ge=1)
    grad_clip: float | None = spec(1.0, help="gradient-norm clipping; null = none", gt=0)


@dataclass
class TranslateEvalConfig:
    """The evaluation on the test fold."""

    leads: list[str] | None = spec(None, help="leads evaluated, each on its own; null = all 12")
    tolerance_ms: float = spec(TOLERANCE_MS, help="R-peak match tolerance (ms)", gt=0, le=500)
    bootstrap: int = spec(1000, help="bootstrap resamples of the records", ge=10)


@dataclass
class TranslateConfig:
    """The ``translate`` section: the tokenizer pair, the translator and its evaluation."""

    source_rate: int = spec(25, help="Hz the translator reads", ge=1)
    target_rate: int = spec(100, help="Hz it writes (the data's rate)", ge=1)
    patch_seconds: float = spec(0.4, help="one code stack per this long, at both rates", gt=0)
    leads: list[str] | None = spec(None, help="the leads whose streams train; null = all 12")
    tokenizer: TokenizerStage = spec(default_factory=TokenizerStage)
    translator: TranslatorStage = spec(default_factory=TranslatorStage)
    evaluate: TranslateEvalConfig = spec(default_factory=TranslateEvalConfig)

    def validate(self, path: str = "translate") -> None:
        if self.source_rate >= self.target_rate:
            raise RecipeError(f"{path}.source_rate: {self.source_rate} Hz is not below "
                              f"target_rate {self.target_rate} Hz")
        for rate in (self.source_rate, self.target_rate):
            samples = self.patch_seconds * rate
            if abs(samples - round(samples)) > 1e-6:
                raise RecipeError(f"{path}.patch_seconds: {self.patch_seconds} s is not a whole "
                                  f"number of samples at {rate} Hz")
        for key, leads in (("leads", self.leads), ("evaluate.leads", self.evaluate.leads)):
            try:
                lead_indices(leads)
            except DataError as exc:
                raise RecipeError(f"{path}.{key}: {exc}") from None
        fixed = {"sampling_rate": "source_rate and target_rate set it",
                 "input_samples": "the data's record length sets it",
                 "patch_size": f"{path}.patch_seconds sets it",
                 "patch_seconds": f"set {path}.patch_seconds",
                 "leads": "the tokenizers read every lead on its own"}
        generic = set(PreTrainedConfig.__dataclass_fields__)
        known = sorted(set(RVQTokenizerConfig.__dataclass_fields__) - generic - set(fixed))
        for key in self.tokenizer.options:
            if key in fixed:
                raise RecipeError(f"{path}.tokenizer.options.{key}: not an option; {fixed[key]}")
            if key not in known:
                raise RecipeError(f"{path}.tokenizer.options: unknown rvq option {key!r}; known: "
                                  f"{', '.join(known)}")
        known = translator_options()
        for key in self.translator.options:
            if key not in known:
                raise RecipeError(f"{path}.translator.options: unknown translator option "
                                  f"{key!r}; known: {', '.join(known)}")


def load_translator(checkpoint: str | Path) -> TranslatorModel:
    """A saved translator, in eval mode; a one-line error naming the folder otherwise."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").exists():
        raise ECGDistillError(f"{checkpoint}: no config.json; not a saved translator folder")
    require_safetensors(checkpoint)
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (ValueError, OSError) as exc:
        raise ECGDistillError(f"{checkpoint}: unreadable config.json ({exc})") from None
    if not isinstance(config, TranslatorConfig):
        raise ECGDistillError(f"{checkpoint}: a {config.model_type} model, not a translator "
                              f"({TranslatorConfig.model_type})")
    return TranslatorModel.from_pretrained(checkpoint).eval()


class Upsampler:
    """A saved translator as a data view's ``upsample`` step
    (:class:`distill.data.dataset.SignalView`): one record's leads [L, T_source] (scaled as
    the translator's tokenizers were trained) -> [L, T_target], in float32 on the CPU.

    The model is loaded on first use (so the object pickles cheaply into data-loader
    workers) and runs without gradient, one record at a time. Translations are remembered
    by their input's bytes (up to ``memo_bytes`` of output, oldest dropped first), so a
    record read unchanged in every epoch is translated once per process.
    """

    def __init__(self, checkpoint: str | Path, memo_bytes: int = 256 * 2**20) -> None:
        self.checkpoint = Path(checkpoint)
        self.config: TranslatorConfig = AutoConfig.from_pretrained(self.checkpoint)
        self.memo_bytes = int(memo_bytes)
        self._model: TranslatorModel | None = None
        self._memo: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._held = 0

    @property
    def source_rate(self) -> int:
        return int(self.config.sampling_rate)

    @property
    def target_rate(self) -> int:
        return int(self.config.target_rate)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_memo": OrderedDict(), "_held": 0}

    def __call__(self, signal: np.ndarray, lead_ids: tuple[int, ...]) -> np.ndarray:
        x = np.ascontiguousarray(signal, dtype=np.float32)
        key = hashlib.blake2b(x.tobytes() + np.asarray(lead_ids, np.int64).tobytes()
                              + str(x.shape).encode(), digest_size=16).digest()
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key].copy()
        if self._model is None:
            self._model = load_translator(self.checkpoint)
        ids = torch.tensor([list(lead_ids)], dtype=torch.long)
        out = self._model.translate(torch.from_numpy(x)[None], ids)[0].float().numpy()
        self._memo[key] = out
        self._held += out.nbytes
        while self._held > self.memo_bytes and self._memo:
            self._held -= self._memo.popitem(last=False)[1].nbytes
        return out.copy()


AutoConfig.register(TranslatorConfig.model_type, TranslatorConfig, exist_ok=True)
AutoModel.register(TranslatorConfig, TranslatorModel, exist_ok=True)
