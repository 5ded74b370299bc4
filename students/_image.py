"""What every image student shares: the printout it reads, its pixels, its tokens' leads.

An image student reads the rendered 12-lead printout (uint8 ``[B, 3, S, S]``, the
renderer's output, :mod:`distill.data.render`) instead of the signal, the way a hospital
with paper or scanned ECGs has to. Its config says which printout (the render layout, so
that the patch-to-lead map of its tokens is exact) and how pixels are normalised; each
family (``students/vit.py``, ``students/convnext.py``, ``students/llava.py``) writes its
features from normalised pixels and says how many pixels each token spans.

The token leads are the renderer's patch-to-lead map
(:func:`distill.data.render.patch_lead_map`) at the family's token stride, so OT lead
matching has leads on the student's side as on an image teacher's. They and the pixel
constants are computed from the config on the fly (not buffers), so a model made on the
meta device by ``from_pretrained`` carries them too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import initialization as init

from distill.core.contract import ECGModelOutput
from distill.core.vlm import PRINTOUT_MEAN, PRINTOUT_STD
from distill.data.render_layout import RenderConfig, patch_lead_map
from students._common import ECGStudentConfig, ECGStudentModel

# RenderConfig fields an image student's config may carry (its height and width are the
# config's image_size)
RENDER_FIELDS = tuple(f.name for f in dataclasses.fields(RenderConfig)
                      if f.name not in ("height", "width"))


class ECGImageStudentConfig(ECGStudentConfig):
    """Fields every image student has, besides the signal fields of ``ECGStudentConfig``
    (which here say what was printed: the leads, the rate and length of the record).

    Args:
        image_size: side of the square printout in pixels.
        render: the renderer's settings besides the size (``RenderConfig`` fields: layout,
            grid, colours ...); unset fields take the renderer's defaults.
        pixel_mean, pixel_std: per-channel normalisation of pixels rescaled to [0, 1]
            (default: the printouts' own statistics, :data:`distill.core.vlm.PRINTOUT_MEAN`).
    """

    image_size: int = 224
    render: dict | None = None
    pixel_mean: list[float] | tuple[float, ...] = PRINTOUT_MEAN
    pixel_std: list[float] | tuple[float, ...] = PRINTOUT_STD

    def __post_init__(self, **kwargs: Any) -> None:
        self.image_size = int(self.image_size)
        self.render = {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dict(self.render or {}).items()}
        unknown = sorted(set(self.render) - set(RENDER_FIELDS))
        if unknown:
            raise ValueError(f"unknown render setting {unknown[0]!r} in an image student's "
                             f"config; known: {', '.join(RENDER_FIELDS)}")
        self.pixel_mean = [float(v) for v in self.pixel_mean]
        self.pixel_std = [float(v) for v in self.pixel_std]
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError(f"pixel_mean and pixel_std need 3 values (std positive), got "
                             f"{self.pixel_mean} and {self.pixel_std}")
        super().__post_init__(**kwargs)

    def render_config(self) -> RenderConfig:
        """The printout this student reads (``RenderConfig`` at ``image_size``)."""
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.render.items()}
        return RenderConfig(height=self.image_size, width=self.image_size, **fields)


@functools.lru_cache(maxsize=32)
def _lead_map(config: RenderConfig, stride: int, cls_tokens: int) -> np.ndarray:
    leads = patch_lead_map(config, stride).astype(np.int64)  # (g * g,)
    return np.concatenate([np.full(cls_tokens, -1, dtype=np.int64), leads])


def check_image(image: Any, config: ECGImageStudentConfig, family: str) -> torch.Tensor:
    """Return ``image`` if it is a ``[B, 3, S, S]`` printout (uint8, or float on the same
    0..255 scale), else ValueError naming what was expected and what came."""
    s = config.image_size
    expected = f"image [B, 3, {s}, {s}] (uint8 0..255, a rendered printout)"
    if not torch.is_tensor(image):
        raise ValueError(f"{family} expects {expected}, got {type(image).__name__}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ValueError(f"{family} expects {expected}, got {image.dtype}")
    if image.dim() != 4 or tuple(image.shape[1:]) != (3, s, s):
        raise ValueError(f"{family} expects {expected}, got {list(image.shape)}")
    return image


class ECGImageStudentModel(ECGStudentModel):
    """Base of the image students: printout in, the contract out.

    A family sets ``token_stride`` (pixels per token side) and ``cls_tokens`` (tokens
    before the grid that show no one lead) and defines ``forward_features(pixels) ->
    (tokens [B, N, D], pooled [B, D'])``: a VLM pools its language model's states, not its
    visual tokens, so each family pools in its features; the head (``forward_head``:
    pooled -> logits) is this class's.
    """

    config: ECGImageStudentConfig
    input_names: tuple[str, ...] = ("image",)
    main_input_name = "image"
    token_stride: int = 16
    cls_tokens: int = 0

    def token_leads(self, device: torch.device | None = None) -> torch.Tensor:
        """[N] int64: the lead of each token (-1 for a CLS token or one spanning leads)."""
        leads = _lead_map(self.config.render_config(), int(self.token_stride), self.cls_tokens)
        return torch.as_tensor(leads, device=device)

    def pixel_values(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> normalised float [B, 3, S, S] in the model's dtype."""
        mean = torch.tensor(self.config.pixel_mean, device=image.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.pixel_std, device=image.device).view(1, 3, 1, 1)
        return ((image.float() / 255.0 - mean) / std).to(self.dtype)

    def forward(self, image: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs: Any) -> ECGModelOutput:
        """Run the student on one batch of printouts.

        Args:
            image: [B, 3, S, S] uint8 printouts (``S = config.image_size``), as the
                renderer draws them.
            labels: optional [B, C] 0/1 targets; when given, ``loss`` is BCE-with-logits.
            **kwargs: other batch entries, ignored.

        Returns:
            ECGModelOutput with logits [B, C], tokens [B, N, D], token_leads [N] (the
            patch-to-lead map), pooled [B, D'] and, with labels, the loss.
        """
        image = check_image(image, self.config, self.family)
        tokens, pooled = self.forward_features(self.pixel_values(image))  # (B, N, D), (B, D')
        logits = self.forward_head(pooled)  # (B, C)
        loss = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        leads = self.token_leads(tokens.device)
        if leads.numel() != tokens.shape[1]:
            raise ValueError(f"{self.family}: {tokens.shape[1]} tokens, but a "
                             f"{self.config.image_size}-px printout at a {self.token_stride}-px "
                             f"stride has {leads.numel()} patches")
        return ECGModelOutput(loss=loss, logits=logits.float(), tokens=tokens.float(),
                              token_leads=leads, pooled=pooled.float())

    def forward_features(self, pixels: torch.Tensor  # type: ignore[override]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels [B, 3, S, S] -> (tokens [B, N, D], pooled [B, D']); per family."""
        raise NotImplementedError  # abstract: each family defines it

    def forward_head(self, pooled: torch.Tensor, pre_logits: bool = False  # type: ignore[override]
                     ) -> torch.Tensor:
        """pooled [B, D'] -> logits [B, C] (``pre_logits``: pooled itself)."""
        return pooled if pre_logits else self.classifier(pooled)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The student's own layers (the classifier and family extras): truncated-normal
        weights (std 0.02), zero biases; a transformers encoder inside initialises itself."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
