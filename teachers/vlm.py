"""The ``vlm`` teacher: a LLaVA-family image-text-to-text model reading the rendered ECG.

The rendered image (uint8 [B, 3, H, W] from ``distill.data.render``) and a fixed prompt go
in. The prompt is tokenised once, at construction, by the model's own processor (which
expands the ``<image>`` marker into one token per visual feature), so each forward
only repeats ``input_ids`` for the batch; the image is rescaled and normalised in torch
with the processor's own constants (no PIL round trip, no resize: the renderer must draw at
the vision tower's input size, and a wrong size is refused with the size to use).

Outputs (the contract of :mod:`distill.core.contract`):

- ``tokens="vision"``: the visual tokens after the multimodal projector [B, N, D_text]
  (what LLaVA scatters into the prompt's image positions).
- ``tokens="language"``: the language model's last hidden states at the image positions.
- ``token_leads``: the renderer's patch-to-lead map for the tower's patch size
  (:func:`distill.data.render.patch_lead_map`), with a leading -1 when the feature-select
  strategy is "full" (which keeps the CLS token; "default" drops it).
- ``pooled``: the final hidden state at the last prompt position (``pool="last"``) or the
  mean of the final hidden states at the image positions (``pool="image-mean"``);
  ``logits = head(pooled)``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import numpy as np
import torch

from distill.core.vlm import (DEFAULT_PROMPT, POOLS, TOKEN_SOURCES, token_grid,
                              unused_tower_parameters, visual_tokens)
from distill.data.render import RenderConfig, patch_lead_map
from teachers.base import TeacherAdapter, load_backbone, register_teacher
from teachers import zoo
from teachers.tiny import build_tiny_vlm, resolve_tiny

__all__ = ["DEFAULT_PROMPT", "VLMTeacher", "build_tiny_vlm", "token_grid", "visual_tokens"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _render_config(size: int, render: RenderConfig | dict | None) -> RenderConfig:
    """The render geometry at the tower's input size (other fields from ``render``)."""
    if isinstance(render, RenderConfig):
        fields = dataclasses.asdict(render)
    else:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in (render or {}).items()}
    fields.update(height=size, width=size)
    return RenderConfig(**fields)


@register_teacher("vlm")
class VLMTeacher(TeacherAdapter):
    """A LLaVA-family VLM over the rendered 12-lead image, with a multi-label head.

    Args:
        name_or_path: hub id or folder holding the model and its processor; "tiny" = the
            built-in tiny preset (:func:`teachers.tiny.build_tiny_vlm`, cached).
        num_labels, id2label, train_mode, load_in, lora: see :class:`TeacherAdapter`.
        tokens: "vision" (projected visual tokens) or "language" (LM hidden states at the
            image positions).
        prompt: the instruction; ``<image>`` marks where the image goes (prepended with a
            newline when absent).
        image_size: the render size the recipe uses; refused at construction when it is
            not the vision tower's input size.
        render: the render layout (RenderConfig or its fields) used for ``token_leads``;
            height and width are always the tower's input size.
        trust_remote_code: forwarded to ``from_pretrained`` (off unless a recipe asks).
        dtype: backbone dtype ("float32" on CPU; "bfloat16" for a real model on a GPU).
        pool: what the head reads: "last", the language model's hidden state at the last
            prompt position (what a generating VLM answers from), or "image-mean", the mean
            of its hidden states at the image positions (every visual token's evidence,
            after the language model has mixed in the prompt).
    """

    input_names = ("image",)
    # LoRA on the language model's attention and MLP projections (not the vision tower).
    lora_targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # 8/4-bit shrinks the language model (the bulk of a 7B VLM); the vision tower, the
    # projector and the unused vocabulary head stay in full precision.
    quant_skip_modules: ClassVar[list[str] | None] = [r".*vision_tower", r".*multi_modal_projector",
                                                      "lm_head"]

    def __init__(self, name_or_path: str | os.PathLike = "tiny", *, num_labels: int,
                 id2label: dict[int, str] | None = None, train_mode: str = "full",
                 load_in: str = "none", tokens: str = "vision", prompt: str = DEFAULT_PROMPT,
                 image_size: int | None = None, render: RenderConfig | dict | None = None,
                 trust_remote_code: bool = False, lora: Any = None, dtype: str = "float32",
                 pool: str = "last"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if tokens not in TOKEN_SOURCES:
            raise ValueError(f"unknown VLM token source {tokens!r}; expected one of "
                             f"{', '.join(TOKEN_SOURCES)}")
        if pool not in POOLS:
            raise ValueError(f"unknown VLM pool {pool!r}; expected one of {', '.join(POOLS)}")
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
        source = zoo.backbone_folder(name_or_path) or resolve_tiny("vlm", name_or_path)
        processor = AutoProcessor.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        backbone = load_backbone(AutoModelForImageTextToText, source, load_in=load_in,
                                 trust_remote_code=trust_remote_code,
                                 skip_modules=self.quant_skip_modules, dtype=_DTYPES[dtype])
        config = backbone.config
        vision = config.vision_config
        self.tower_size = int(vision.image_size)
        if image_size is not None and int(image_size) != self.tower_size:
            raise ValueError(self._size_message(f"the recipe renders {image_size}x{image_size}",
                                                name_or_path))
        render_config = _render_config(self.tower_size, render)
        settings = {"tokens": tokens, "prompt": prompt, "image_size": image_size,
                    "render": {k: v for k, v in dataclasses.asdict(render_config).items()
                               if k not in ("height", "width")},
                    "dtype": dtype, "pool": pool}
        super().__init__(backbone=backbone, hidden_size=int(config.text_config.hidden_size),
                         num_labels=num_labels, id2label=id2label, train_mode=train_mode,
                         load_in=load_in, source=str(name_or_path),
                         trust_remote_code=trust_remote_code, lora=lora, settings=settings)
        self.processor = processor
        self.tokens_from = tokens
        self.pool = pool
        self.name_or_path = str(name_or_path)
        self._dtype = _DTYPES[dtype]

        # The prompt, tokenised once by the processor (which expands the image marker).
        image_token = getattr(processor, "image_token", "<image>")
        text = prompt if image_token in prompt else f"{image_token}\n{prompt}"
        blank = np.zeros((self.tower_size, self.tower_size, 3), dtype=np.uint8)
        encoded = processor(text=text, images=blank, return_tensors="pt")
        input_ids = encoded["input_ids"][0]  # (L,)
        positions = torch.nonzero(input_ids == config.image_token_id).flatten()  # (N,)
        grid, cls = token_grid(len(positions), self.tower_size)
        if grid is None:
            raise ValueError(f"{name_or_path}: the prompt holds {len(positions)} image tokens, "
                             f"not a square grid of tokens (with or without one CLS token) "
                             f"that divides the {self.tower_size}-px image; only single-tile "
                             f"LLaVA-style models are supported")
        # pixels per visual token: 16 for CLIP/16; for a Swin tower its 4-px patches times 2
        # per merging stage (its config's patch_size is not the token stride)
        self.patch_size = self.tower_size // grid
        leads = torch.from_numpy(patch_lead_map(render_config, self.patch_size))  # (g * g,)
        if cls:
            leads = torch.cat([torch.tensor([-1]), leads])  # the CLS token shows no one lead
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("image_positions", positions, persistent=False)
        self.register_buffer("token_leads", leads.long(), persistent=False)

        # Pixel normalisation: the image processor's own constants, applied in torch.
        ip = processor.image_processor
        scale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
        mean = torch.tensor(ip.image_mean if getattr(ip, "do_normalize", True) else [0.0] * 3)
        std = torch.tensor(ip.image_std if getattr(ip, "do_normalize", True) else [1.0] * 3)
        self.pixel_scale = scale
        self.register_buffer("pixel_mean", mean.float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.float().view(1, 3, 1, 1), persistent=False)

    @classmethod
    def recipe_settings(cls, teacher: Any, data: Any, view: Any, *,
                        saved: bool = False) -> dict[str, Any]:
        img = data.image
        if img.height != img.width:
            raise ValueError(f"data.image: the vlm teacher reads square images, got "
                             f"{img.height}x{img.width}")
        render = RenderConfig(height=img.height, width=img.width, grid=img.grid)
        out: dict[str, Any] = {"image_size": img.height, "render": {
            k: v for k, v in dataclasses.asdict(render).items() if k not in ("height", "width")}}
        if not saved:
            out.update(tokens=teacher.tokens, prompt=teacher.prompt, pool=teacher.pool)
        return out

    def check_recipe(self, data: Any) -> None:
        if self.patch_size != data.image.patch_size:
            raise ValueError(f"data.image.patch_size: {data.image.patch_size}, but the "
                             f"teacher's vision tower uses {self.patch_size}-pixel patches")

    def example_inputs(self, batch_size: int, generator: torch.Generator
                       ) -> dict[str, torch.Tensor]:
        size = self.tower_size
        return {"image": torch.randint(0, 256, (batch_size, 3, size, size), generator=generator,
                                       dtype=torch.uint8)}

    def _size_message(self, what: str, name: Any) -> str:
        t = self.tower_size
        return (f"VLM teacher {name}: {what}, but its vision tower takes {t}x{t} images; "
                f"render at height={t}, width={t} "
                f"(set the recipe's render size to {t})")

    def _save_backbone_extras(self, folder) -> None:
        self.processor.save_pretrained(folder)  # the same AutoProcessor path reloads it

    # ------------------------------------------------------------------ training modes
    def unused_parameter_names(self) -> set[str]:
        """The vocabulary head (unless tied to the input embeddings), the vision tower's
        post-layernorm/pooling head and its layers after the selected feature layer."""
        hf = self.hf_model
        names = set()
        out_emb, in_emb = hf.get_output_embeddings(), hf.get_input_embeddings()
        if out_emb is not None and out_emb.weight is not in_emb.weight:
            ids = {id(p) for p in out_emb.parameters()}
            names |= {n for n, p in hf.named_parameters() if id(p) in ids}
        names |= unused_tower_parameters(hf.config, [n for n, _ in hf.named_parameters()])
        return names

    # ------------------------------------------------------------------ forward
    def pixel_values(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised float [B, 3, H, W], as the image processor does."""
        x = image.to(self.pixel_mean.device, torch.float32) * self.pixel_scale
        return ((x - self.pixel_mean) / self.pixel_std).to(self._dtype)

    def forward_features(self, image: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"VLM teacher: image must be [B, 3, H, W], got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if (h, w) != (self.tower_size, self.tower_size):
            raise ValueError(self._size_message(f"got {h}x{w} images", self.name_or_path))
        batch = image.shape[0]
        input_ids = self.input_ids.unsqueeze(0).expand(batch, -1)  # (B, L)
        inner = self.hf_model.base_model  # LlavaModel: the body, without the vocabulary head
        out = inner(input_ids=input_ids, pixel_values=self.pixel_values(image), return_dict=True)
        hidden = out.last_hidden_state  # (B, L, D)
        if self.tokens_from == "vision":
            tokens = visual_tokens(out, batch, len(self.token_leads), hidden.shape[-1])
        else:
            tokens = hidden[:, self.image_positions]  # (B, N, D)
        if self.pool == "last":
            pooled = hidden[:, -1]  # (B, D): the last prompt position
        else:
            pooled = hidden[:, self.image_positions].mean(1)  # (B, D): over the image positions
        return tokens, self.token_leads, pooled
