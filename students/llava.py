"""llava: a small vision-language student, EVL-ECG's own setting.

EVL-ECG distils a large ECG vision-language model into a smaller one of another
architecture. This family is that student: any Hugging Face image-text-to-text model's
body (the ``AutoModel`` of its config: for LLaVA, ``LlavaModel``, the vision tower, the
projector and the language model without the vocabulary head) reading the printout and a
fixed prompt, with a linear head on its final hidden states, as the VLM teacher reads them
(``teachers/vlm.py``, same token and pooling choices, through :mod:`distill.core.vlm`).

- The prompt is tokenised once, when the student is built (the image marker expanded to
  one token per visual feature), and its ids are stored in the config: a saved student
  needs no processor, only ``AutoModel.from_pretrained``.
- Presets are random tiny LLaVAs whose towers differ from the embedded teacher's (a Swin
  with 4-px patches and 49 tokens at a 32-px stride for ``tiny``, against the teacher's
  196 tokens of a convolutional tower, and narrower widths), so distillation must align
  token counts and widths (cross-attention, optimal transport).
- ``backbone=<folder or hub id>`` starts from a real image-text-to-text checkpoint
  instead (its processor tokenises the prompt and gives the pixel statistics).
- ``lora={"r": 8, "alpha": 16}`` trains LoRA adapters on the language model's
  projections, with the multimodal projector and the head in full; the vision tower stays
  frozen. ``save_pretrained`` merges the adapters into the weights, so a saved student is
  a plain model.

Tokens: ``tokens="vision"``, the projected visual tokens [B, N, D_text];
``"language"``, the language model's last hidden states at the image positions. Pooled:
``pool="image-mean"`` (default), the mean of the final hidden states at the image
positions; ``"last"``, the final hidden state at the last prompt position.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from distill.core.vlm import (DEFAULT_PROMPT, IMAGE_TOKEN, POOLS, PRINTOUT_MEAN, PRINTOUT_STD,
                              TOKEN_SOURCES, build_tiny_tokenizer, token_grid,
                              unused_tower_parameters, visual_tokens)
from students._image import ECGImageStudentConfig, ECGImageStudentModel
from students._registry import register_family, register_preset

# what LoRA wraps: the language model's attention and MLP projections
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class LlavaStudentConfig(ECGImageStudentConfig):
    """Configuration of a VLM student.

    Args:
        backbone: the image-text-to-text model's configuration (``config.to_dict()``,
            with its ``model_type``).
        input_ids: the prompt's token ids, the image marker expanded to one id per
            visual token.
        image_token_id: the id of those image tokens.
        prompt: the prompt the ids came from (kept for the record).
        tokens: "vision" or "language" (see the module docstring).
        pool: "image-mean" or "last".
        lora: LoRA settings while training with adapters (``r``, ``alpha``, ``dropout``,
            ``init_lora_weights``: peft's, True = B starts at zero so training starts from
            the backbone exactly); None for full training and for a saved (merged) student.
        lora_merged: the LoRA settings merged into the saved weights, for the record.
        head_dropout: dropout before the classifier.
    """

    model_type = "ecg_llava"

    backbone: dict | None = None
    input_ids: list[int] | None = None
    image_token_id: int = 0
    prompt: str = DEFAULT_PROMPT
    tokens: str = "vision"
    pool: str = "image-mean"
    lora: dict | None = None
    lora_merged: dict | None = None
    head_dropout: float = 0.1

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.tokens not in TOKEN_SOURCES:
            raise ValueError(f"llava: unknown token source {self.tokens!r}; expected one of "
                             f"{', '.join(TOKEN_SOURCES)}")
        if self.pool not in POOLS:
            raise ValueError(f"llava: unknown pool {self.pool!r}; expected one of "
                             f"{', '.join(POOLS)}")
        if self.lora is not None:
            known = {"r", "alpha", "dropout", "init_lora_weights"}
            if set(self.lora) - known or int(self.lora.get("r", 8)) < 1:
                raise ValueError(f"llava: lora takes r >= 1, alpha, dropout and "
                                 f"init_lora_weights, got {self.lora}")


class LlavaStudentModel(ECGImageStudentModel):
    """A small VLM over the printout and a fixed prompt, with a multi-label head."""

    config_class = LlavaStudentConfig
    family = "llava"
    # bitsandbytes quantizes the language model only (as for the VLM teacher): the tower's
    # Swin layers read 4-D windows, which its int8 matmul does not take, and the tower and
    # projector are a small share of a real VLM
    quant_kept_modules = {
        "vlm.vision_tower": "the vision tower stays in full precision (only the language "
                            "model is quantized)",
        "vlm.multi_modal_projector": "the projector stays in full precision (only the "
                                     "language model is quantized)"}

    def __init__(self, config: LlavaStudentConfig) -> None:
        super().__init__(config)
        if not config.backbone or not config.input_ids:
            raise ValueError("llava: the config needs the backbone's configuration and the "
                             "prompt's ids; build one with students.create('llava', ...)")
        fields = dict(config.backbone)
        self.vlm = AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
        ids = list(config.input_ids)
        n_image = sum(i == config.image_token_id for i in ids)
        grid, cls = token_grid(n_image, config.image_size)
        if grid is None:
            raise ValueError(f"llava: the prompt holds {n_image} image tokens, not a square "
                             f"grid of tokens dividing the {config.image_size}-px image")
        self.token_stride = config.image_size // grid
        self.cls_tokens = int(cls)
        text = self.vlm.config.text_config
        self.classifier = nn.Sequential(nn.Dropout(config.head_dropout),
                                        nn.Linear(int(text.hidden_size), config.num_labels))
        self.post_init()
        if config.lora is not None:
            self._add_lora(config.lora)
        self._freeze_unused()

    # ------------------------------------------------------------------ training modes
    def unused_parameter_names(self) -> set[str]:
        """Parameters of the body the forward never reaches: the vision tower's final
        norm or pooling head and its layers after the selected feature layer."""
        names = unused_tower_parameters(self.vlm.config, [n for n, _ in self.vlm.named_parameters()])
        return {f"vlm.{n}" for n in names}

    def _freeze_unused(self) -> None:
        unused = self.unused_parameter_names()
        for name, p in self.named_parameters():
            if name in unused:
                p.requires_grad_(False)

    def _add_lora(self, settings: dict) -> None:
        """LoRA adapters on the language model (peft, injected in place); the adapters,
        the projector and the head train, everything else is frozen."""
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=int(settings.get("r", 8)), lora_alpha=int(settings.get("alpha", 16)),
                            lora_dropout=float(settings.get("dropout", 0.05)),
                            target_modules=LORA_TARGETS, bias="none",
                            init_lora_weights=settings.get("init_lora_weights", True))
        inject_adapter_in_model(config, self.vlm)
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name or "multi_modal_projector" in name
                             or name.startswith("classifier."))

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any):
        """Save the student; with LoRA adapters, merged into the weights first (a copy is
        merged: this model keeps training with its adapters)."""
        if self.config.lora is None:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict,
                                           **kwargs)
        from peft.tuners.lora.layer import LoraLayer

        # a CPU copy built from the config (LoRA injected again), given the weights: not a
        # deepcopy, which would duplicate the model on its device and copy sharded
        # parameters as they are under FSDP or DeepSpeed
        merged = type(self)(copy.deepcopy(self.config))
        weights = state_dict if state_dict is not None else self.state_dict()
        merged.load_state_dict({k: v.detach().cpu() for k, v in weights.items()})
        for name, module in list(merged.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(merged.get_submodule(parent), child, module.get_base_layer())
        merged.config.lora_merged, merged.config.lora = merged.config.lora, None
        return super(LlavaStudentModel, merged).save_pretrained(save_directory, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward_features(self, pixels: torch.Tensor  # type: ignore[override]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels [B, 3, S, S] -> (tokens [B, N, D], pooled [B, D]): the pooled
        embedding comes from the language model's final states, not from the tokens."""
        batch = pixels.shape[0]
        ids = torch.tensor(self.config.input_ids, device=pixels.device)
        positions = torch.nonzero(ids == self.config.image_token_id).flatten()  # (N,)
        out = self.vlm(input_ids=ids.unsqueeze(0).expand(batch, -1), pixel_values=pixels,
                       return_dict=True)
        hidden = out.last_hidden_state  # (B, L, D)
        if self.config.tokens == "vision":
            tokens = visual_tokens(out, batch, len(positions), hidden.shape[-1])
        else:
            tokens = hidden[:, positions]  # (B, N, D)
        if self.config.pool == "last":
            pooled = hidden[:, -1]  # (B, D)
        else:
            pooled = hidden[:, positions].mean(1)  # (B, D)
        return tokens, pooled


def prompt_ids(tokenizer: Any, prompt: str, n_image_tokens: int) -> list[int]:
    """The prompt's ids with the image marker expanded to ``n_image_tokens`` ids (a newline
    and the marker prepended when the prompt has none)."""
    text = prompt if IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}\n{prompt}"
    return list(tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens))["input_ids"])


def _swin_llava(*, embed: int, depths: list[int], text_width: int, image_size: int):
    """A LLaVA config over a Swin tower (4-px patches, window 7) and a small Llama."""
    from transformers import LlamaConfig, LlavaConfig, SwinConfig

    tokenizer = build_tiny_tokenizer()
    vision = SwinConfig(image_size=image_size, patch_size=4, embed_dim=embed, depths=depths,
                        num_heads=[max(1, embed * 2 ** i // 32) for i in range(len(depths))],
                        window_size=7, mlp_ratio=2.0, drop_path_rate=0.0)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_width,
                       intermediate_size=2 * text_width, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    grid = image_size // (4 * 2 ** (len(depths) - 1))
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=grid * grid, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    return config, tokenizer, grid * grid


def _create_llava(*, embed: int = 32, depths: tuple[int, ...] = (2, 2, 2, 2),
                  text_width: int = 128, backbone: str | os.PathLike | None = None,
                  **kwargs: Any) -> LlavaStudentModel:
    """A VLM student: a random Swin-tower LLaVA of these widths, or ``backbone`` (a folder
    or hub id of an image-text-to-text model) with its weights."""
    size = int(kwargs.get("image_size", 224))
    prompt = kwargs.get("prompt", DEFAULT_PROMPT)
    if backbone is None:
        config, tokenizer, n_image = _swin_llava(embed=embed, depths=list(depths),
                                                 text_width=text_width, image_size=size)
        body, stats = None, {"pixel_mean": PRINTOUT_MEAN, "pixel_std": PRINTOUT_STD}
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(str(backbone))
        full = AutoModelForImageTextToText.from_pretrained(str(backbone), dtype=torch.float32)
        body, config, tokenizer = full.base_model, full.config, processor.tokenizer
        n_image = int(getattr(config, "image_seq_length", 0) or 0)
        ip = processor.image_processor
        stats = {"pixel_mean": list(ip.image_mean), "pixel_std": list(ip.image_std)}
        if int(config.vision_config.image_size) != size:
            raise ValueError(f"llava backbone {backbone}: its vision tower takes "
                             f"{config.vision_config.image_size}-px images, the student "
                             f"{size}-px; set image_size to {config.vision_config.image_size}")
    fields = {"backbone": config.to_dict(), "image_token_id": int(config.image_token_id),
              "input_ids": prompt_ids(tokenizer, prompt, n_image), **stats, **kwargs}
    model = LlavaStudentModel(LlavaStudentConfig(**fields))
    if body is not None:
        missing, unexpected = model.vlm.load_state_dict(body.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"llava backbone {backbone}: weights do not match its config "
                             f"({len(missing)} missing, {len(unexpected)} unexpected)")
    return model


register_family("llava", LlavaStudentConfig, dials=("embed", "depths", "text_width", "backbone"),
                model_class=LlavaStudentModel)


@register_preset("llava", "tiny")
def llava_tiny(**kwargs: Any) -> LlavaStudentModel:
    """Swin tower 32/64/128/256 wide, 4 stages of 2 blocks: 49 visual tokens at a 32-px
    stride; Llama 128 wide, 2 layers."""
    return _create_llava(**{"embed": 32, "depths": (2, 2, 2, 2), "text_width": 128, **kwargs})


@register_preset("llava", "small")
def llava_small(**kwargs: Any) -> LlavaStudentModel:
    """Swin tower 48/96/192 wide, 3 stages of 2/2/4 blocks: 196 visual tokens at a 16-px
    stride; Llama 192 wide, 2 layers."""
    return _create_llava(**{"embed": 48, "depths": (2, 2, 4), "text_width": 192, **kwargs})
