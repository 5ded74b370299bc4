"""What every teacher adapter shares: backbone + head, training modes, quantized loading, saving.

A teacher adapter wraps a Hugging Face backbone loaded with ``from_pretrained`` and adds a
classification head ``nn.Linear(hidden, num_labels)`` (fp32, also when the backbone is
quantized). Subclasses say how inputs become backbone inputs and which backbone outputs
are the tokens and the pooled embedding (``forward_features``); the head, the loss, the
training modes and the folder format live here, once.

Training modes (one method, :meth:`TeacherAdapter.apply_train_mode`):

- ``full``: every backbone parameter the adapter's forward uses trains, plus the head.
- ``lora``: the backbone is wrapped with peft LoRA on subclass-chosen modules; only the
  adapters and the head train.
- ``head``: only the head trains.
- ``frozen``: nothing trains (a teacher whose outputs are cached).

Folder format written by :meth:`TeacherAdapter.save_pretrained`::

    teacher.json        kind, num_labels, id2label, train_mode, load_in, settings, source
    head.safetensors    head weights
    backbone/           full mode: the whole backbone (save_pretrained, + processor)
                        lora mode: the LoRA adapters only (peft save_pretrained)
                        head / frozen: absent; the unchanged backbone is reloaded from
                        ``source`` (its hub id or folder)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from distill.core.bnb import bnb_config
from distill.core.contract import ECGModelOutput
from distill.core.weights import mark_loaded
from distill.core.registry import Registry
from teachers import zoo

TRAIN_MODES = ("full", "lora", "head", "frozen")
LOAD_IN = ("none", "8bit", "4bit")
META_FILE = "teacher.json"
HEAD_FILE = "head.safetensors"
BACKBONE_DIR = "backbone"

TEACHERS: Registry[type[TeacherAdapter]] = Registry("teacher kind")
# the batch entry each adapter input is read from: a signal teacher reads its own view of
# the record (the batch's "teacher" entry); an image teacher the rendered "image"
# the batch entry each adapter input is read from: a signal teacher reads its own view of
# the record (the batch's "teacher" entry); an image teacher the rendered "image"; an
# adapter listing ``lead_mask`` in ``optional_inputs`` gets the teacher view's lead mask
# when the batch has one (``data.on_flat_lead: mask``, distill.data.dataset.lead_mask_key)
BATCH_ENTRIES = {"signal": "teacher", "image": "image", "lead_mask": "lead_mask:teacher"}


def register_teacher(kind: str):
    """Class decorator: make a teacher adapter known under ``kind`` (duplicates refused)."""

    def wrap(cls: type[TeacherAdapter]) -> type[TeacherAdapter]:
        cls.kind = kind
        return TEACHERS.register(kind, cls)

    return wrap


def teacher_class(kind: str) -> type[TeacherAdapter]:
    """The adapter class registered under ``kind``; ValueError naming the known kinds."""
    return TEACHERS.get(kind)


def weight_folders(folder: str | os.PathLike) -> list[Path]:
    """The folders whose ``*.safetensors`` a saved teacher loads: its own and, for a teacher
    saved without its backbone (``head``, ``frozen`` or ``lora`` mode), the backbone's
    source (a shipped teacher's ``backbone/`` or a local folder) when it is on this machine."""
    folder = Path(folder)
    out = [folder]
    meta_file = folder / META_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        source = str(meta.get("source", ""))
        if meta.get("saved_backbone") != "full" and source:
            backbone = zoo.backbone_folder(source) or Path(source).expanduser()
            if backbone.is_dir():
                out.append(backbone)
    return out


@dataclass
class LoraSettings:
    """peft LoRA settings.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: a regex (full match on module names) or list of module-name
            suffixes; None = the adapter class's default (its attention/MLP projections).
        init_lora_weights: peft's init; True makes B = 0 so training starts from the
            backbone exactly; False (random A and B) is for tests that need gradients on A.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] | None = None
    init_lora_weights: bool | str = True


def quantization_config(load_in: str, *, skip_modules: list[str] | None = None):
    """The ``BitsAndBytesConfig`` for ``load_in`` ("8bit", "4bit" = nf4), or None for "none".

    Compute dtype is float32, which CPU bitsandbytes (>= 0.49) needs; on a GPU it is also
    the safe choice for a teacher whose outputs are compared against fp32 students.

    Args:
        load_in: one of :data:`LOAD_IN`.
        skip_modules: module-name patterns kept in full precision (transformers 5 matches
            them as a prefix, regex or suffix of the full module name).
    """
    if load_in not in LOAD_IN:
        raise ValueError(f"unknown load_in {load_in!r}; expected one of {', '.join(LOAD_IN)}")
    if load_in == "none":
        return None
    return bnb_config("int8" if load_in == "8bit" else "nf4", skip_modules=skip_modules)


def load_backbone(auto_class: Any, source: str | os.PathLike, *, load_in: str,
                  trust_remote_code: bool, skip_modules: list[str] | None = None,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """``auto_class.from_pretrained(source, ...)`` with the quantization and remote-code settings."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    qconfig = quantization_config(load_in, skip_modules=skip_modules)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    model = auto_class.from_pretrained(str(source), **kwargs)
    return mark_loaded(model, weights_folder(source))


def weights_folder(source: str | os.PathLike) -> Path | None:
    """The folder ``from_pretrained(source)`` read: ``source`` itself, or a hub id's snapshot
    in the local hub cache (None when it cannot be found without a download)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(source), "config.json")
    except Exception:  # not a hub id; the cache key then hashes the tensors themselves
        return None
    return Path(found).parent if isinstance(found, str) else None


class TeacherAdapter(nn.Module):
    """Base of every teacher adapter: an HF backbone, a linear head, one output contract.

    Subclasses set ``input_names``, ``lora_targets`` (regex of the modules LoRA wraps by
    default), ``quant_skip_modules``, and implement ``forward_features`` and the
    constructor (which loads the backbone and calls ``super().__init__``).

    Args:
        backbone: the loaded Hugging Face model.
        hidden_size: width of the pooled embedding the head reads.
        num_labels: C.
        id2label: label names (default ``{i: "LABEL_i"}``).
        train_mode: one of :data:`TRAIN_MODES`.
        load_in: how the backbone was loaded ("none", "8bit", "4bit").
        source: the hub id or folder the backbone came from (saved for reloading).
        trust_remote_code: whether remote code was allowed (saved, so a reload asks the same).
        lora: LoRA settings (dict or :class:`LoraSettings`) for ``train_mode="lora"``.
        settings: the subclass's own constructor arguments, saved to ``teacher.json``.
    """

    kind: ClassVar[str] = ""
    input_names: ClassVar[tuple[str, ...]] = ()
    # inputs passed only when the batch carries them (e.g. ``lead_mask``)
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[str] = ""
    quant_skip_modules: ClassVar[list[str] | None] = None

    def __init__(self, *, backbone: nn.Module, hidden_size: int, num_labels: int,
                 id2label: dict[int, str] | None, train_mode: str, load_in: str,
                 source: str, trust_remote_code: bool, lora: LoraSettings | dict | None,
                 settings: dict[str, Any]):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        self.backbone = backbone
        self.num_labels = num_labels
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()} or {
            i: f"LABEL_{i}" for i in range(num_labels)}
        if len(self.id2label) != num_labels:
            raise ValueError(f"id2label has {len(self.id2label)} entries, num_labels is {num_labels}")
        self.load_in = load_in
        self.source = str(source)
        self.trust_remote_code = trust_remote_code
        self.lora = lora if isinstance(lora, LoraSettings) else LoraSettings(**(lora or {}))
        self.settings = settings
        self.head = nn.Linear(hidden_size, num_labels)  # fp32 whatever the backbone's dtype
        # residual code levels whose distributions ``forward`` also returns (``code_logits``,
        # for the ``codes`` loss; set by the distillation job); 0: none
        self.code_levels = 0
        self.train_mode = ""
        self.apply_train_mode(train_mode)

    # ------------------------------------------------------------------ model access
    @property
    def quantized(self) -> bool:
        return self.load_in != "none"

    @property
    def is_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.backbone, PeftModel)

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model itself (under the peft wrapper when LoRA is on); LoRA
        layers are injected in place, so calling its submodules runs the adapters too."""
        return self.backbone.get_base_model() if self.is_lora else self.backbone

    # ------------------------------------------------------------------ inputs
    @classmethod
    def reads_images(cls) -> bool:
        """Whether the adapter reads the rendered image (the data stage renders it then)."""
        return "image" in cls.input_names

    @classmethod
    def batch_inputs(cls, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """A batch -> the adapter's keyword inputs (:data:`BATCH_ENTRIES`): every one of
        ``input_names``, and those of ``optional_inputs`` the batch has."""
        inputs = {name: batch[BATCH_ENTRIES.get(name, name)] for name in cls.input_names}
        for name in cls.optional_inputs:
            entry = BATCH_ENTRIES.get(name, name)
            if entry in batch:
                inputs[name] = batch[entry]
        return inputs

    @classmethod
    def recipe_settings(cls, teacher: Any, data: Any, view: Any, *,
                        saved: bool = False) -> dict[str, Any]:
        """The adapter's own constructor arguments from a recipe's ``teacher`` and ``data``
        sections and the teacher's resolved signal view; with ``saved``, only those a saved
        teacher takes when reloaded. ValueError for settings the adapter cannot take."""
        return {}

    @classmethod
    def family_of(cls, name_or_path: str) -> str | None:
        """The model family behind ``name_or_path`` as a report names it (e.g. "LAMAE"),
        or None when the kind says it all."""
        return None

    def check_recipe(self, data: Any) -> None:
        """ValueError (naming the recipe key) when the built adapter disagrees with the
        recipe's ``data`` section."""

    def example_inputs(self, batch_size: int, generator: torch.Generator
                       ) -> dict[str, torch.Tensor]:
        """Random inputs of a batch (sizes, memory and latency; not training)."""
        raise NotImplementedError  # abstract: each adapter knows its input's shape

    def unused_parameter_names(self) -> set[str]:
        """Backbone parameters (names within ``hf_model``) the adapter's forward never uses
        (e.g. a language-model vocabulary head); kept frozen in every mode."""
        return set()

    # ------------------------------------------------------------------ training modes
    def apply_train_mode(self, mode: str) -> None:
        """Set which parameters train: ``full``, ``lora``, ``head`` or ``frozen``.

        ``lora`` wraps the backbone with peft (once); a LoRA-wrapped teacher can then be
        switched to ``head`` or ``frozen`` but not back to ``full``. A quantized backbone
        cannot train in ``full`` mode (its weights are integer codes).
        """
        if mode not in TRAIN_MODES:
            raise ValueError(f"unknown train_mode {mode!r}; expected one of {', '.join(TRAIN_MODES)}")
        if mode == "full" and self.quantized:
            raise ValueError(f"train_mode 'full' needs a full-precision backbone, but it was loaded "
                             f"in {self.load_in}; use 'lora' or 'head'")
        if mode == "full" and self.is_lora:
            raise ValueError("this teacher carries LoRA adapters; train it with 'lora' or 'head'")
        if mode == "lora" and not self.is_lora:
            self._wrap_lora()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        if mode == "full":
            unused = self.unused_parameter_names()
            for name, p in self.hf_model.named_parameters():
                p.requires_grad_(name not in unused)
        elif mode == "lora":
            for name, p in self.backbone.named_parameters():
                p.requires_grad_("lora_" in name)
        for p in self.head.parameters():
            p.requires_grad_(mode != "frozen")
        self.train_mode = mode

    def _wrap_lora(self) -> None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        s = self.lora
        targets = s.target_modules if s.target_modules is not None else self.lora_targets
        config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                            target_modules=targets, init_lora_weights=s.init_lora_weights,
                            bias="none")
        if self.quantized:
            self.backbone = prepare_model_for_kbit_training(self.backbone,
                                                            use_gradient_checkpointing=False)
        self.backbone = get_peft_model(self.backbone, config)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ forward
    def forward_features(self, **inputs: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs -> (tokens [B, N, D], token_leads [N] int64, pooled [B, D]), or with a
        fourth entry, token_mask bool [B, N] (True = a real token). Subclasses."""
        raise NotImplementedError  # abstract

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, D] -> logits [B, C] (fp32)."""
        return self.head(pooled.float())

    def gives_codes(self) -> bool:
        """Whether :meth:`forward_codes` gives code distributions (a tokenized teacher)."""
        return False

    def forward_codes(self, levels: int, **inputs: torch.Tensor) -> torch.Tensor:
        """Inputs -> per-token code distributions [B, N, levels, C] (log-probabilities, the
        tokens in ``forward_features``' order): a tokenized teacher's; others refuse."""
        raise ValueError(f"{type(self).__name__} gives no code distributions: the codes loss "
                         f"(distill.weights.codes) needs a tokenized teacher (teacher.kind: "
                         f"foundation on a hypnos model)")

    def forward(self, labels: torch.Tensor | None = None, **inputs: torch.Tensor) -> ECGModelOutput:
        tokens, token_leads, pooled, *rest = self.forward_features(**inputs)
        token_mask = rest[0] if rest else None
        pooled = pooled.float()
        logits = self.forward_head(pooled)  # (B, C)
        loss = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        codes = self.forward_codes(self.code_levels, **inputs) if self.code_levels else None
        return ECGModelOutput(loss=loss, logits=logits, tokens=tokens.float(),
                              token_leads=token_leads, pooled=pooled, code_logits=codes,
                              token_mask=token_mask)

    # ------------------------------------------------------------------ save / load
    def _save_backbone_extras(self, folder: Path) -> None:
        """Subclass hook: what else a saved full backbone needs (e.g. the processor)."""

    def save_pretrained(self, folder: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the teacher to ``folder`` (see the module docstring for the layout).

        Args:
            folder: the output folder.
            state_dict: the adapter's full state dict to write instead of the live
                parameters' (a trainer gathers it when the parameters are sharded).
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        backbone_dir = folder / BACKBONE_DIR
        saved_backbone = None
        backbone_sd = head_sd = None
        if state_dict is not None:
            backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items()
                           if k.startswith("backbone.")}
            head_sd = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
        if self.is_lora:
            self.backbone.save_pretrained(backbone_dir, state_dict=backbone_sd)
            saved_backbone = "lora"
        elif self.train_mode == "full":
            self.backbone.save_pretrained(backbone_dir, state_dict=backbone_sd)
            self._save_backbone_extras(backbone_dir)
            saved_backbone = "full"
        head_sd = head_sd if head_sd is not None else self.head.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in head_sd.items()},
                  str(folder / HEAD_FILE))
        meta = {
            "kind": self.kind,
            "num_labels": self.num_labels,
            "id2label": {str(k): v for k, v in self.id2label.items()},
            "train_mode": self.train_mode,
            "load_in": self.load_in,
            "source": self.source,
            "saved_backbone": saved_backbone,
            "trust_remote_code": self.trust_remote_code,
            "lora": asdict(self.lora),
            "settings": self.settings,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return folder

    @staticmethod
    def from_pretrained(folder: str | os.PathLike, **overrides: Any) -> TeacherAdapter:
        """Rebuild a teacher written by :meth:`save_pretrained` (any registered kind).

        Args:
            folder: the saved folder.
            overrides: constructor arguments to change (e.g. ``load_in="4bit"``,
                ``train_mode="frozen"``).
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        cls = teacher_class(meta["kind"])
        saved = meta.get("saved_backbone")
        source = folder / BACKBONE_DIR if saved == "full" else meta["source"]
        train_mode = overrides.pop("train_mode", meta["train_mode"])
        kwargs = dict(meta["settings"])
        kwargs.update(num_labels=meta["num_labels"],
                      id2label={int(k): v for k, v in meta["id2label"].items()},
                      load_in=meta["load_in"], trust_remote_code=meta["trust_remote_code"],
                      lora=meta["lora"])
        kwargs.update(overrides)
        first_mode = "frozen" if saved == "lora" else train_mode
        teacher = cls(str(source), train_mode=first_mode, **kwargs)
        if saved == "lora":
            from peft import PeftModel

            teacher.backbone = PeftModel.from_pretrained(teacher.backbone, folder / BACKBONE_DIR,
                                                         is_trainable=train_mode == "lora")
        teacher.source = meta["source"]
        teacher.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        teacher.apply_train_mode(train_mode)
        return teacher
