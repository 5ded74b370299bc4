"""A Hypnos-style tokenized foundation model: next-token prediction over the leads' RVQ code
streams (an RQ-Transformer).

After Hypnos (``../shared/seeds/``): every signal stream is tokenized by residual vector
quantization (:mod:`distill.models.rvq`, frozen here), and a transformer predicts the next
step's codes of every stream in parallel. Two transformers share the work:

- the **temporal transformer** reads one token per (lead, time step): the sum of the step's
  K code embeddings, a lead embedding and a time position. Its attention is causal in time:
  a token reads every lead's tokens at its own and earlier steps, never a later one, so the
  state at step n summarises the codes of steps 0..n of every lead (the codes themselves
  are computed from the signal by convolutions that reach about two patches either side:
  causality holds over tokens, not over samples);
- the **depth transformer** predicts the K codes of step n + 1 of a lead one after another:
  its first input is the temporal state at step n, the next ones the codes already
  predicted (teacher forcing), with causal attention over the K positions.

The loss is the cross-entropy of every code of steps 1..N-1. Downstream, the temporal
transformer's tokens are the features (one per lead and step: ``token_leads`` is exact), and
their mean the pooled embedding (linear and MLP probes, ``ecg-distill probe``; the
``foundation`` teacher). The tokenizer travels inside the model (its weights in the same
folder), so a saved model reads raw signals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, PreTrainedModel
from transformers.utils import ModelOutput

from distill.core.leads import NUM_LEADS
from distill.models.base import ECGStudentConfig, ECGStudentModel, check_signal
from distill.models.blocks import Block, BlockWidth, init_weights
from distill.models.rvq import RVQTokenizer, RVQTokenizerConfig


class HypnosConfig(ECGStudentConfig):
    """The next-token model's settings.

    Args:
        rvq: the tokenizer's configuration (a dict, as saved); its rate and record length are
            this config's.
        hidden_size, num_layers, num_heads, mlp_ratio: the temporal transformer.
        depth_hidden_size, depth_layers: the depth transformer (pretraining only).
        dropout, head_dropout: in attention/MLPs; before the classifier.
        initializer_range, layer_norm_eps: init std; LayerNorm epsilon.
    """

    model_type = "ecg_hypnos"

    rvq: dict[str, Any] | None = None
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    depth_hidden_size: int = 64
    depth_layers: int = 2
    dropout: float = 0.0
    head_dropout: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6

    def __post_init__(self, **kwargs: Any) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ecg_hypnos: hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.depth_hidden_size % self.depth_heads:
            raise ValueError(f"ecg_hypnos: depth_hidden_size {self.depth_hidden_size} is not "
                             f"a multiple of 32 (heads of width 32)")
        super().__post_init__(**kwargs)

    def tokenizer_config(self) -> RVQTokenizerConfig:
        """The tokenizer's config at this model's leads, rate and record length."""
        if self.rvq is None:
            raise ValueError("ecg_hypnos: no tokenizer configuration (config.rvq); build it "
                             "with hypnos_config(tokenizer, ...)")
        fields = {k: v for k, v in self.rvq.items() if k in RVQTokenizerConfig.__dataclass_fields__
                  and k not in ("leads", "sampling_rate", "input_samples")}
        return RVQTokenizerConfig(**fields, leads=list(self.leads),
                                  sampling_rate=self.sampling_rate,
                                  input_samples=self.input_samples)

    @property
    def depth_heads(self) -> int:
        return max(1, self.depth_hidden_size // 32)


def tokenizer_fields(tokenizer: RVQTokenizerConfig) -> dict[str, Any]:
    """What a Hypnos config keeps of its tokenizer's config (``rvq``)."""
    return {k: v for k, v in tokenizer.to_diff_dict().items()
            if k in RVQTokenizerConfig.__dataclass_fields__}


def code_logits(tokenizer: RVQTokenizer, signal: torch.Tensor, levels: int) -> torch.Tensor:
    """The tokenizer's soft code assignment: per lead and patch, a distribution over the C
    codes of each of the first ``levels`` residual codebooks (the ``codes`` KD target).

    Level j reads the residual the earlier levels leave, ``r_j = z - sum_{i<j} c_i`` (the
    chosen codes, as in :meth:`RVQTokenizer.encode`), and gives code c the logit
    ``-|r_j - c|^2 / (2 sigma_j^2)``: the posterior of a mixture of isotropic Gaussians,
    one per code with equal priors, whose per-dimension variance ``sigma_j^2 = s_j / d`` is
    the record's own quantization error at that level (``s_j``, the mean squared distance
    from a residual to its chosen code; d the latent width). So the distributions do not
    depend on the latent space's scale, and the most likely code of every level is the one
    ``encode`` chooses. (On the project's trained tokenizer: the first level's most likely
    code holds 0.86 of the mass on average, entropy 0.37 nats; the 16 most likely codes
    hold 0.9997 at level 1 and 0.993 at level 2.)

    Args:
        tokenizer: a trained :class:`RVQTokenizer`.
        signal: [B, L, T] float.
        levels: how many codebooks, 1..K.

    Returns:
        [B, L, N, levels, C] float32 log-probabilities.
    """
    k = tokenizer.config.num_quantizers
    if not 1 <= levels <= k:
        raise ValueError(f"rvq code distributions: levels must be in 1..{k}, got {levels}")
    codes = tokenizer.encode(signal)  # (B, L, N, K): checks the signal and the codebooks
    b, l, n, _ = codes.shape
    with torch.no_grad(), torch.autocast(signal.device.type, enabled=False):
        residual = tokenizer._latents(signal.float()).float()  # (B*L, N, d)
        chosen = tokenizer.code_vectors(codes[..., :levels])  # (levels, B*L, N, d)
        books = tokenizer.quantizer.codebooks[:levels].float()  # (levels, C, d)
        dim = books.shape[-1]
        out = []
        for j in range(levels):
            d2 = torch.cdist(residual, books[j][None]).square()  # (B*L, N, C)
            nearest = (residual - chosen[j]).square().sum(-1)  # (B*L, N)
            scale = nearest.view(b, l * n).mean(1).clamp_min(1e-12)  # (B,) per record
            logits = -d2 * dim / (2 * scale.repeat_interleave(l)[:, None, None])
            out.append(logits.log_softmax(-1))
            residual = residual - chosen[j]
    return torch.stack(out, dim=2).view(b, l, n, levels, -1)


def time_causal_mask(leads: int, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [L*N, L*N] over lead-major tokens: True where token (l, n) may read (l', n'),
    i.e. n' <= n."""
    step = torch.arange(steps, device=device).repeat(leads)  # (L*N,)
    return step[None, :] <= step[:, None]


class HypnosModel(ECGStudentModel):
    """The temporal transformer over a frozen tokenizer's codes (module docstring); the
    student contract's ``forward`` (tokens per lead and step, pooled mean, classifier)."""

    config_class = HypnosConfig
    config: HypnosConfig
    base_model_prefix = "hypnos"
    family = "hypnos"
    _no_split_modules = ("Block",)
    # loaded from a pretraining folder, the depth transformer is dropped without a report
    _keys_to_ignore_on_load_unexpected = [r"^depth\."]
    # what a model "from scratch" keeps of a pretrained one (the input representation)
    pretrained_inputs = ("tokenizer",)
    # submodules that never train (a teacher's full mode leaves them frozen)
    frozen_modules = ("tokenizer",)
    # the codes must not depend on the dtype a teacher is loaded in
    _keep_in_fp32_modules = ["tokenizer"]

    def __init__(self, config: HypnosConfig) -> None:
        super().__init__(config)
        tok = config.tokenizer_config()
        d, k, c = config.hidden_size, tok.num_quantizers, tok.codebook_size
        self.tokenizer = RVQTokenizer(tok)
        self.tokenizer.requires_grad_(False)
        self.code_embed = nn.Embedding(k * c, d)  # codebook j's code i at j * C + i
        self.lead_embed = nn.Embedding(NUM_LEADS, d)
        self.pos_embed = nn.Parameter(torch.zeros(tok.num_patches, d))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.classifier = nn.Sequential(nn.Dropout(config.head_dropout),
                                        nn.Linear(d, config.num_labels))
        self.post_init()

    _trunc_normal = ("pos_embed",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if any(module is m for m in self.tokenizer.modules()):
            self.tokenizer._init_weights(module)  # the tokenizer's own rules
        else:
            init_weights(module, self.config.initializer_range)

    def train(self, mode: bool = True) -> "HypnosModel":
        """The tokenizer stays in eval mode (its codebooks never move)."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    @property
    def pooled_size(self) -> int:
        return self.config.hidden_size

    def encode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, L, N, K] -> temporal states [B, L, N, D] (causal in time)."""
        b, l, n, k = codes.shape
        c = self.tokenizer.config.codebook_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= c):
            raise ValueError(f"hypnos: codes must lie in 0..{c - 1}, got "
                             f"{int(codes.min())}..{int(codes.max())}")
        offsets = torch.arange(k, device=codes.device) * c
        x = self.code_embed(codes + offsets).sum(dim=3)  # (B, L, N, D)
        lead_ids = torch.tensor(self.config.lead_ids, device=codes.device)
        x = x + self.lead_embed(lead_ids)[:, None, :] + self.pos_embed[:n]
        x = x.reshape(b, l * n, -1)
        mask = time_causal_mask(l, n, codes.device).expand(b, -1, -1)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x).view(b, l, n, -1)

    def forward_features(self, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """signal [B, L, T] -> tokens [B, L*N, D] (lead-major) and token_leads [L*N]."""
        codes = self.tokenizer.encode(signal.float())
        states = self.encode_codes(codes)
        b, l, n, d = states.shape
        token_leads = torch.tensor(self.config.lead_ids, device=signal.device)
        return states.reshape(b, l * n, d), token_leads.repeat_interleave(n)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = tokens.mean(dim=1)  # (B, D)
        return pooled if pre_logits else self.classifier(pooled)

    def forward_codes(self, signal: torch.Tensor, levels: int) -> torch.Tensor:
        """signal [B, L, T] -> the tokenizer's code distributions per token, [B, L*N,
        levels, C] log-probabilities, tokens in :meth:`forward_features`' order."""
        out = code_logits(self.tokenizer, signal, levels)  # (B, L, N, levels, C)
        b, l, n = out.shape[:3]
        return out.reshape(b, l * n, *out.shape[3:])


@dataclass
class NextTokenOutput(ModelOutput):
    """loss: mean cross-entropy (nats) of the codes of steps 1..N-1; logits
    [B, L, N-1, K, C] (the prediction of step n + 1 at index n); codes [B, L, N, K]."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    codes: torch.Tensor | None = None


class DepthTransformer(nn.Module):
    """Predicts one step's K codes in order from the temporal state of the step before."""

    _trunc_normal = ("pos_embed", "heads")

    def __init__(self, config: HypnosConfig, num_quantizers: int, codebook_size: int) -> None:
        super().__init__()
        dd = config.depth_hidden_size
        self.k, self.c = num_quantizers, codebook_size
        self.context = nn.Linear(config.hidden_size, dd)
        self.code_embed = nn.Embedding(num_quantizers * codebook_size, dd)
        self.pos_embed = nn.Parameter(torch.zeros(num_quantizers, dd))
        width = BlockWidth(config, dd, config.depth_heads)
        self.blocks = nn.ModuleList(Block(width) for _ in range(config.depth_layers))
        self.norm = nn.LayerNorm(dd, eps=config.layer_norm_eps)
        self.heads = nn.Parameter(torch.zeros(num_quantizers, dd, codebook_size))
        self.bias = nn.Parameter(torch.zeros(num_quantizers, codebook_size))

    def forward(self, state: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """state [M, D], the step's true codes [M, K] -> logits [M, K, C]: position j reads
        the state and codes 0..j-1."""
        m = state.shape[0]
        offsets = torch.arange(self.k - 1, device=codes.device) * self.c
        previous = self.code_embed(codes[:, :-1] + offsets)  # (M, K-1, Dd)
        x = torch.cat([self.context(state)[:, None], previous], dim=1) + self.pos_embed
        causal = torch.ones(self.k, self.k, dtype=torch.bool, device=state.device).tril()
        mask = causal.expand(m, -1, -1)
        for block in self.blocks:
            x = block(x, mask=mask)
        return torch.einsum("mkd,kdc->mkc", self.norm(x), self.heads) + self.bias


class HypnosForNextToken(PreTrainedModel):
    """Pretraining: the temporal transformer (under ``hypnos``) and the depth transformer.
    ``AutoModel.from_pretrained`` of its folder gives :class:`HypnosModel` (the depth
    transformer dropped)."""

    config_class = HypnosConfig
    config: HypnosConfig
    base_model_prefix = "hypnos"
    main_input_name = "signal"
    input_names = ("signal",)
    _no_split_modules = ("Block",)

    def __init__(self, config: HypnosConfig) -> None:
        super().__init__(config)
        self.hypnos = HypnosModel(config)
        tok = self.hypnos.tokenizer.config
        self.depth = DepthTransformer(config, tok.num_quantizers, tok.codebook_size)
        self.post_init()
        self.hypnos.classifier.requires_grad_(False)  # pretraining never reads it

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if any(module is m for m in self.hypnos.tokenizer.modules()):
            self.hypnos.tokenizer._init_weights(module)  # the tokenizer's own rules
        else:
            init_weights(module, self.config.initializer_range)

    @property
    def encoder(self) -> HypnosModel:
        return self.hypnos

    def forward(self, signal: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                **kwargs: Any) -> NextTokenOutput:
        """Next-token cross-entropy of ``signal`` [B, L, T]'s codes (or of ``codes``
        [B, L, N, K] given directly). Other batch entries are ignored."""
        if codes is None:
            if signal is None:
                raise ValueError("hypnos: give signal or codes")
            signal = check_signal(signal, self.config, "hypnos")
            codes = self.hypnos.tokenizer.encode(signal.float())
        states = self.hypnos.encode_codes(codes)  # (B, L, N, D)
        b, l, n, k = codes.shape
        context = states[:, :, :-1].reshape(-1, states.shape[-1])  # step n predicts n + 1
        target = codes[:, :, 1:].reshape(-1, k)
        logits = self.depth(context, target)  # (M, K, C)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
        return NextTokenOutput(loss=loss, logits=logits.view(b, l, n - 1, k, -1), codes=codes)


def hypnos_config(tokenizer: RVQTokenizer, **fields: Any) -> HypnosConfig:
    """A Hypnos config over a (trained) tokenizer: its rate and record length, and ``fields``."""
    tok = tokenizer.config
    fields.setdefault("sampling_rate", tok.sampling_rate)
    fields.setdefault("input_samples", tok.input_samples)
    return HypnosConfig(rvq=tokenizer_fields(tok), **fields)


AutoConfig.register(HypnosConfig.model_type, HypnosConfig, exist_ok=True)
AutoModel.register(HypnosConfig, HypnosModel, exist_ok=True)
AutoModelForPreTraining.register(HypnosConfig, HypnosForNextToken, exist_ok=True)
