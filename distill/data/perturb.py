"""Printout perturbations: what scanning or photographing a paper ECG does to a clean rendering.

Each kind is a real image operation on a batch of rendered printouts (uint8 [B, 3, H, W],
:mod:`distill.data.render`), pure torch apart from JPEG (Pillow):

* ``grid``: the paper, grid and ink recoloured by the affine RGB map that sends the
  renderer's four colours (background, minor, major, trace) to a drawn palette; an affine
  map keeps the anti-aliased blends between them blends of the new colours.
* ``line``: thicker traces by grey-level erosion (a min filter), thinner by a light dilation.
* ``scale``, ``rotate``: a zoom about the centre and a small rotation, one bilinear
  resampling; pixels from beyond the page are paper, not black.
* ``lighting``: a smooth shading field (a linear gradient and a broad blob, mean 1) and a
  mild global brightness and contrast change.
* ``blur``: a Gaussian blur (separable, reflect padding).
* ``jpeg``: JPEG compression at a drawn quality.

Kinds are applied in the canonical order of :data:`PERTURBATIONS` (the printing first, then
the camera's geometry, then its optics and its file format). Every image's parameters are
drawn from a fixed block of uniform numbers, one row per image, whatever kinds are asked for:
the same seed gives the same rotation to "rotate" and to "all", and the first k images of a
batch are perturbed as the k-image batch would be.

:data:`STRESS_SET` names the test-time variations (``distill.metrics.stress`` scores models
on them); :class:`ImageAugment` draws them at random as a training augmentation.
"""

from __future__ import annotations

import io
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from distill.core.errors import DataError
from distill.data.render_layout import RenderConfig

PERTURBATIONS = ("grid", "line", "scale", "rotate", "lighting", "blur", "jpeg")  # canonical order

STRESS_SET: OrderedDict[str, tuple[str, ...]] = OrderedDict([
    ("clean", ()),
    ("grid", ("grid",)),
    ("line", ("line",)),
    ("rotate", ("rotate",)),
    ("scale", ("scale",)),
    ("blur", ("blur",)),
    ("jpeg", ("jpeg",)),
    ("lighting", ("lighting",)),
    ("all", PERTURBATIONS),
])

RGB = tuple[int, int, int]
Palette = tuple[RGB, RGB, RGB, RGB]  # paper, minor line, major line, trace

# Papers and printers seen in scanned archives; each (paper, minor, major, trace). As in the
# renderer's palette, each minor colour is 0.588 paper + 0.422 major - 0.010 trace: the
# renderer's four colours barely differ in green minus blue (only its paper, by 4 levels),
# so a palette breaking that relation would make the exact affine map amplify the
# renderer's rounding along that direction (checked: see _MAX_GAIN).
GRID_PALETTES: dict[str, Palette] = {
    "grey": ((250, 250, 250), (210, 210, 210), (150, 150, 150), (20, 20, 20)),
    "blue_green": ((247, 252, 250), (185, 221, 213), (95, 172, 158), (10, 15, 35)),
    "faint": ((255, 251, 249), (252, 230, 229), (243, 196, 196), (45, 45, 45)),
    "dark_red": ((255, 240, 235), (232, 167, 164), (195, 60, 60), (0, 0, 0)),
    "yellowed": ((244, 236, 212), (233, 190, 170), (212, 122, 108), (28, 22, 16)),
    "grey_paper": ((226, 223, 220), (214, 176, 174), (192, 106, 106), (15, 15, 15)),
}
_RENDER = RenderConfig()  # the default printout (frozen: safe as an argument default)
_MAX_GAIN = 3.0  # largest singular value allowed for the linear part of a grid recolour

REFERENCE_SIZE = 224  # blur sigmas are given in pixels of a 224 px image
_CHUNK = 128  # images processed at once (bounds the float32 working memory)
_FIELD = 33  # side of the coarse grid the lighting field is computed on

# Uniform numbers drawn per image for each kind, in PERTURBATIONS order.
_SLOTS = {"grid": 1, "line": 1, "scale": 1, "rotate": 1, "lighting": 9, "blur": 1, "jpeg": 1}
_OFFSET = {k: sum(list(_SLOTS.values())[:i]) for i, k in enumerate(_SLOTS)}
_N_UNIFORM = sum(_SLOTS.values())


def _pair(value: object, name: str, lo: float, hi: float) -> tuple[float, float]:
    """``value`` as a (low, high) pair with lo <= low <= high <= hi, or a one-line ValueError."""
    try:
        a, b = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"perturb.{name} must be a (low, high) pair, got {value!r}") from None
    if not lo <= a <= b <= hi:
        raise ValueError(f"perturb.{name} must satisfy {lo} <= low <= high <= {hi}, got ({a}, {b})")
    return a, b


def _palette(value: object, i: int) -> Palette:
    try:
        colours = tuple(tuple(int(c) for c in rgb) for rgb in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        colours = ()
    if len(colours) != 4 or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
        raise ValueError(f"perturb.palettes[{i}] must be 4 RGB colours in 0..255 (paper, minor, "
                         f"major, trace), got {value!r}")
    return colours  # type: ignore[return-value]


@dataclass(frozen=True)
class PerturbConfig:
    """How strong each perturbation may be; every image draws uniformly within these ranges.

    The defaults are moderate: a decent phone photo or a 150 dpi scan.

    Args:
        palettes: the grid palettes drawn from, each (paper, minor, major, trace) RGB; a
            palette whose map from the render colours is ill-conditioned (a minor colour
            off the renderer's paper-to-major proportions, see :data:`GRID_PALETTES`) is
            refused when applied.
        line_width: (low, high) trace width factor within [0.5, 3]: 2 adds one pixel of
            ink (a 2x2 min filter), 3 two pixels (3x3); below 1 a 2x2 max filter is
            blended in by 1 - factor, lightening thin strokes.
        scale: (low, high) zoom about the centre within [0.5, 2]; above 1 zooms in.
        rotate_degrees: largest rotation either way, degrees, within [0, 45].
        lighting: largest deviation of the shading field from 1, within [0, 0.9].
        brightness: largest global brightness shift, as a fraction of 255, within [0, 0.5].
        contrast: largest relative global contrast change, within [0, 0.9].
        blur_sigma: (low, high) Gaussian sigma in pixels of a 224 px image (scaled with
            the image's shorter side), within [0, 10].
        jpeg_quality: (low, high) JPEG quality within [1, 95].
    """

    palettes: tuple[Palette, ...] = tuple(GRID_PALETTES.values())
    line_width: tuple[float, float] = (0.6, 2.0)
    scale: tuple[float, float] = (0.92, 1.08)
    rotate_degrees: float = 3.0
    lighting: float = 0.25
    brightness: float = 0.05
    contrast: float = 0.1
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    jpeg_quality: tuple[int, int] = (25, 70)

    def __post_init__(self) -> None:
        palettes = self.palettes
        if isinstance(palettes, (str, bytes)) or not hasattr(palettes, "__len__") or not palettes:
            raise ValueError(f"perturb.palettes must be a non-empty list, got {palettes!r}")
        object.__setattr__(self, "palettes", tuple(_palette(p, i) for i, p in enumerate(palettes)))
        for name, lo, hi in (("line_width", 0.5, 3.0), ("scale", 0.5, 2.0),
                             ("blur_sigma", 0.0, 10.0)):
            object.__setattr__(self, name, _pair(getattr(self, name), name, lo, hi))
        q = _pair(self.jpeg_quality, "jpeg_quality", 1, 95)
        if q != tuple(round(v) for v in q):
            raise ValueError(f"perturb.jpeg_quality must be whole numbers, got {q!r}")
        object.__setattr__(self, "jpeg_quality", (int(q[0]), int(q[1])))
        for name, hi in (("rotate_degrees", 45.0), ("lighting", 0.9), ("brightness", 0.5),
                         ("contrast", 0.9)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= hi):
                raise ValueError(f"perturb.{name} must lie in [0, {hi}], got {v!r}")


# ----------------------------------------------------------------------------- operations
# Each takes float32 images [n, 3, H, W] in 0..255 and per-image parameters.


def _span(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return bounds[0] + u * (bounds[1] - bounds[0])


def _recolour_maps(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The maps M [n, 4, 3] of :func:`_recolour` (float64), refusing ill-conditioned ones."""
    a = torch.cat([source, torch.ones(4, 1, dtype=source.dtype)], dim=1)  # (4, 4)
    if torch.linalg.matrix_rank(a) < 4:
        raise DataError("grid perturbation: the render config's background, minor, major and "
                        "trace colours must not lie in one plane of RGB space")
    m = torch.linalg.solve(a, target)  # (n, 4, 3)
    gain = torch.linalg.matrix_norm(m[:, :3], ord=2)
    if (gain > _MAX_GAIN).any():
        raise DataError(f"grid perturbation: a palette maps the render colours with gain "
                        f"{float(gain.max()):.1f} (> {_MAX_GAIN}), amplifying their rounding; "
                        f"keep its colours in the render palette's proportions (GRID_PALETTES)")
    return m


def _recolour(x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The affine RGB map sending the 4 ``source`` colours [4, 3] to each image's ``target``
    [n, 4, 3]: [s, 1] @ M = t for the 12 unknowns of M [4, 3], solved exactly."""
    m = _recolour_maps(source, target).to(x)  # (n, 4, 3)
    out = torch.einsum("nchw,ncd->ndhw", x, m[:, :3]) + m[:, 3, :, None, None]
    return out.clamp_(0.0, 255.0)


def _min_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """Grey-level erosion over a k x k window (k = 2 reaches right and down, k = 3 is
    centred; replicate padding), as separable minima of shifted views, which is faster
    than ``-max_pool2d(-x)`` on CPU."""
    lo, hi = (k - 1) // 2, k // 2
    p = F.pad(x, (lo, hi, lo, hi), mode="replicate")
    rows = p[..., :, 0:-k + 1]
    for i in range(1, k):
        rows = torch.minimum(rows, p[..., :, i:p.shape[-1] - k + 1 + i])
    out = rows[..., 0:-k + 1, :]
    for i in range(1, k):
        out = torch.minimum(out, rows[..., i:rows.shape[-2] - k + 1 + i, :])
    return out


def _line_width(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Thicken (factor > 1) or thin (factor < 1) the dark strokes; factor [n].

    Thickening blends in a 2x2 erosion (then, above 2, a 3x3 one); thinning blends in a
    2x2 dilation by 1 - factor. Each image computes only the filters its factor needs."""
    f = factor.to(x) - 1.0
    out = torch.empty_like(x)
    groups = ((f <= 0, lambda xs, fs: torch.lerp(xs, -_min_filter(-xs, 2), -fs)),
              ((f > 0) & (f <= 1), lambda xs, fs: torch.lerp(xs, _min_filter(xs, 2), fs)),
              (f > 1, lambda xs, fs: torch.lerp(_min_filter(xs, 2), _min_filter(xs, 3), fs - 1)))
    for mask, op in groups:
        if mask.all():
            return op(x, f[:, None, None, None])
        if mask.any():
            out[mask] = op(x[mask], f[mask][:, None, None, None])
    return out


def _warp(x: torch.Tensor, paper: torch.Tensor, zoom: torch.Tensor,
          degrees: torch.Tensor) -> torch.Tensor:
    """Zoom by ``zoom`` [n] and rotate by ``degrees`` [n] about the centre, bilinearly;
    what comes from beyond the page is the paper colour ``paper`` [n, 3]."""
    n, _, h, w = x.shape
    a = torch.deg2rad(degrees)
    c, s = torch.cos(a) / zoom, torch.sin(a) / zoom
    # Rotation in pixel space: normalised coordinates stretch x by w/2 and y by h/2.
    rows = [(c, -s * h / w), (s * w / h, c)]  # the 2x2 part of affine_grid's theta
    # affine_grid's sampling grid written directly (its batched matmul is slower on CPU):
    # output pixel centres in normalised coordinates (align_corners=False), mapped by theta.
    gx = ((torch.arange(w, dtype=torch.float64) * 2 + 1) / w - 1)[None, None, :]
    gy = ((torch.arange(h, dtype=torch.float64) * 2 + 1) / h - 1)[None, :, None]
    grid = torch.empty(n, h, w, 2, dtype=x.dtype, device=x.device)
    for i, (a_x, a_y) in enumerate(rows):
        grid[..., i] = (a_x[:, None, None] * gx + a_y[:, None, None] * gy).to(x)
    p = paper.to(x)[:, :, None, None]
    # Sampling x - paper with zero padding makes the page's surroundings (and the bilinear
    # blend at its edge) the paper colour.
    out = F.grid_sample(x.sub_(p), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.add_(p)


def _lighting(x: torch.Tensor, u: torch.Tensor, config: PerturbConfig) -> torch.Tensor:
    """Uneven lighting: x times a smooth field of mean 1, then brightness and contrast.

    u: [n, 9] = amplitude, gradient angle, gradient share, blob centre x and y, blob
    width, blob sign, brightness, contrast. The field is computed on a coarse grid and
    upsampled bilinearly (it is smooth; this keeps it cheap at any image size).
    """
    h, w = x.shape[-2:]
    size = _FIELD
    g = torch.linspace(-1, 1, size, dtype=torch.float64)
    gy, gx = g[None, :, None] * max(h / w, 1.0), g[None, None, :] * max(w / h, 1.0)

    def col(i: int) -> torch.Tensor:  # one uniform per image, broadcast over the field
        return u[:, i, None, None]

    angle = 2 * math.pi * col(1)
    gradient = torch.cos(angle) * gx + torch.sin(angle) * gy  # (n, size, size)
    width = 0.4 + 0.8 * col(5)
    dist2 = (gx - (2 * col(3) - 1)) ** 2 + (gy - (2 * col(4) - 1)) ** 2
    blob = torch.exp(-dist2 / (2 * width**2))
    blob = torch.where(col(6) < 0.5, -blob, blob)

    def unit(t: torch.Tensor) -> torch.Tensor:
        t = t - t.mean(dim=(1, 2), keepdim=True)
        return t / t.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-9)

    dev = unit(col(2) * unit(gradient) + (1 - col(2)) * unit(blob))  # mean 0, peak 1
    coarse = (1.0 + config.lighting * col(0) * dev).to(x)[:, None]  # (n, 1, size, size)
    shade = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    y = x.mul_(shade)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1.0 + config.contrast * (2 * u[:, 8] - 1)).to(x)[:, None, None, None]
    shift = (255.0 * config.brightness * (2 * u[:, 7] - 1)).to(x)[:, None, None, None]
    # (y - mean) * contrast + mean + shift, in place
    return y.sub_(mean).mul_(contrast).add_(mean + shift).clamp_(0.0, 255.0)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-image ``sigma`` [n] in pixels (separable, reflect padding)."""
    n, ch, h, w = x.shape
    sigma = sigma.clamp_min(1e-3)
    r = max(1, min(math.ceil(3 * float(sigma.max())), h - 1, w - 1))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(ch, dim=0).to(x)  # (n*ch, 2r+1)
    y = F.pad(x.reshape(1, n * ch, h, w), (r, r, r, r), mode="reflect")
    y = y.contiguous(memory_format=torch.channels_last)  # depthwise conv is faster so on CPU
    y = F.conv2d(y, k[:, None, None, :], groups=n * ch)  # (1, n*ch, h + 2r, w)
    y = F.conv2d(y, k[:, None, :, None], groups=n * ch)  # (1, n*ch, h, w)
    return y.contiguous().reshape(n, ch, h, w)


def _jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Each image through a JPEG encode and decode (Pillow, in memory) at ``quality`` [n]."""
    pixels = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(pixels)
    for i, q in enumerate(quality.tolist()):
        buf = io.BytesIO()
        Image.fromarray(pixels[i]).save(buf, format="JPEG", quality=int(q))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x)


# ----------------------------------------------------------------------------- pipeline


def _check_kinds(kinds: object) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)  # type: ignore[arg-type]
    unknown = [k for k in kinds if k not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"unknown perturbation {unknown[0]!r}; known: {', '.join(PERTURBATIONS)}")
    return kinds


def _check_images(images: object, where: str) -> None:
    shape = tuple(getattr(images, "shape", ()))
    dtype = getattr(images, "dtype", None)
    if not isinstance(images, (torch.Tensor, np.ndarray)) or len(shape) != 4 or shape[1] != 3:
        raise DataError(f"{where}: expected uint8 images [B, 3, H, W] (a tensor or numpy array), "
                        f"got {type(images).__name__} of shape {shape}")
    if dtype not in (torch.uint8, np.uint8):
        raise DataError(f"{where}: expected uint8 images, got dtype {dtype}")
    if shape[2] < 8 or shape[3] < 8:
        raise DataError(f"{where}: images of {shape[2]}x{shape[3]} are too small (at least 8x8)")


def _apply(images: torch.Tensor, u: torch.Tensor, masks: dict[str, torch.Tensor],
           config: PerturbConfig, render: RenderConfig) -> torch.Tensor:
    """Perturb uint8 images [n, 3, H, W]: kind k on the images of ``masks[k]`` (bool [n]),
    with parameters from the uniforms ``u`` [n, _N_UNIFORM] (float64)."""
    x = images.float()
    n, _, h, w = x.shape
    paper = torch.tensor(render.background, dtype=torch.float64).expand(n, 3).clone()
    at = {k: u[:, _OFFSET[k]:_OFFSET[k] + _SLOTS[k]] for k in _SLOTS}

    def on(mask: torch.Tensor, op, *args: torch.Tensor) -> None:
        idx = mask.nonzero().squeeze(1).to(x.device)
        if idx.numel() == n:
            out = op(x, *args)
            if out is not x:
                x.copy_(out)
        elif idx.numel():
            x[idx] = op(x[idx], *(a[mask] for a in args))

    none = torch.zeros(n, dtype=torch.bool)
    if "grid" in masks:
        source = torch.tensor((render.background, render.minor_color, render.major_color,
                               render.trace_color), dtype=torch.float64)
        options = torch.tensor(config.palettes, dtype=torch.float64)  # (P, 4, 3)
        pick = (at["grid"][:, 0] * len(options)).long().clamp(max=len(options) - 1)
        on(masks["grid"], lambda xs, t: _recolour(xs, source, t), options[pick])
        paper = torch.where(masks["grid"][:, None], options[pick][:, 0], paper)
    if "line" in masks:
        on(masks["line"], _line_width, _span(at["line"][:, 0], config.line_width))
    geometry = masks.get("scale", none) | masks.get("rotate", none)
    if geometry.any():
        zoom = torch.where(masks.get("scale", none), _span(at["scale"][:, 0], config.scale), 1.0)
        deg = torch.where(masks.get("rotate", none),
                          config.rotate_degrees * (2 * at["rotate"][:, 0] - 1), 0.0)
        on(geometry, _warp, paper, zoom, deg)
    if "lighting" in masks:
        on(masks["lighting"], lambda xs, us: _lighting(xs, us, config), at["lighting"])
    if "blur" in masks:
        px = min(h, w) / REFERENCE_SIZE
        on(masks["blur"], _blur, px * _span(at["blur"][:, 0], config.blur_sigma))
    if "jpeg" in masks:
        on(masks["jpeg"], _jpeg, _span(at["jpeg"][:, 0], config.jpeg_quality).round())
    return x.add_(0.5).clamp_(0, 255).to(torch.uint8)  # rounds (values are >= 0)


def _run(images: torch.Tensor | np.ndarray, u: torch.Tensor, masks: dict[str, torch.Tensor],
         config: PerturbConfig, render: RenderConfig) -> torch.Tensor | np.ndarray:
    """:func:`_apply` chunk by chunk (bounded memory); numpy (or a memmap) in, numpy out."""
    is_np = isinstance(images, np.ndarray)
    out = np.empty(images.shape, dtype=np.uint8) if is_np else torch.empty_like(images)
    for s in range(0, len(images), _CHUNK):
        part = slice(s, s + _CHUNK)
        chunk = torch.from_numpy(np.array(images[part], dtype=np.uint8)) if is_np else images[part]
        done = _apply(chunk, u[part], {k: m[part] for k, m in masks.items()}, config, render)
        out[part] = done.numpy() if is_np else done
    return out


def perturb(images: torch.Tensor | np.ndarray, kinds: tuple[str, ...] | list[str], *, seed: int,
            config: PerturbConfig = PerturbConfig(), render: RenderConfig = _RENDER
            ) -> torch.Tensor | np.ndarray:
    """Apply the named perturbations to every image of a batch.

    Args:
        images: uint8 [B, 3, H, W] printouts, a tensor or a numpy array (a memmap is read
            chunk by chunk).
        kinds: names from :data:`PERTURBATIONS`, applied in its canonical order whatever
            order they are given in; empty returns the input unchanged.
        seed: seeds the ``torch.Generator`` that draws each image's parameters (the same
            seed gives the same output; the images of a batch get different draws).
        config: the strength ranges.
        render: the configuration the images were rendered with (its colours are the
            source palette of ``grid`` and the paper that fills the margins of
            ``scale`` and ``rotate``); the images may be of any size.

    Returns:
        uint8 [B, 3, H, W], of the input's type (and device, for a tensor).

    Raises:
        ValueError: an unknown kind.
        DataError: images that are not uint8 [B, 3, H, W].
    """
    kinds = _check_kinds(kinds)
    _check_images(images, "perturb")
    if not kinds:
        return images
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(len(images), _N_UNIFORM, generator=gen, dtype=torch.float64)
    every = torch.ones(len(images), dtype=torch.bool)
    return _run(images, u, {k: every for k in kinds}, config, render)


def stress_images(images: torch.Tensor | np.ndarray, name: str, *, seed: int,
                  config: PerturbConfig = PerturbConfig(), render: RenderConfig = _RENDER
                  ) -> torch.Tensor | np.ndarray:
    """The printouts under one test-time variation of :data:`STRESS_SET`.

    Args:
        images: uint8 [B, 3, H, W], a tensor or a numpy array.
        name: a key of :data:`STRESS_SET`.
        seed: the variation's seed; give every model the same one (the stress
            evaluation derives one per name) so all are scored on the same images.
        config, render: as for :func:`perturb`.

    Returns:
        uint8 [B, 3, H, W] of the input's type.
    """
    if name not in STRESS_SET:
        raise ValueError(f"unknown stress variation {name!r}; known: {', '.join(STRESS_SET)}")
    return perturb(images, STRESS_SET[name], seed=seed, config=config, render=render)


@dataclass(frozen=True)
class ImageAugment:
    """Printout perturbations drawn at random per image, as a training augmentation.

    An image is perturbed with probability ``p``; a perturbed image gets each of ``kinds``
    with probability 1/2 (``jpeg``, the slow one, with probability ``jpeg``), and at least
    one of them (one drawn uniformly from the kinds other than jpeg when none came up), so
    each kind other than jpeg reaches a little over ``p / 2`` of the images.

    Args:
        p: the probability that an image is perturbed, in [0, 1].
        kinds: the perturbations drawn from (names of :data:`PERTURBATIONS`).
        jpeg: the probability that a perturbed image is JPEG-compressed, in [0, 1].
        config: the strength ranges.
        render: the configuration the images were rendered with.
    """

    p: float = 0.8
    kinds: tuple[str, ...] = PERTURBATIONS
    jpeg: float = 0.15
    config: PerturbConfig = field(default_factory=PerturbConfig)
    render: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self) -> None:
        for name in ("p", "jpeg"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"printout augment.{name} must lie in [0, 1], got {v!r}")
        kinds = _check_kinds(self.kinds)
        object.__setattr__(self, "kinds", tuple(k for k in PERTURBATIONS if k in kinds))

    @property
    def active(self) -> bool:
        return self.p > 0 and bool(self.kinds)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Perturb a batch.

        Args:
            images: uint8 [B, 3, H, W].
            generator: a CPU ``torch.Generator``, the source of every draw (which images,
                which kinds, their parameters).

        Returns:
            uint8 [B, 3, H, W], a new tensor (the input itself when inactive).
        """
        _check_images(images, "ImageAugment")
        if not self.active:
            return images
        n, k = len(images), len(self.kinds)
        r = torch.rand(n, k + 2, generator=generator, dtype=torch.float64)
        u = torch.rand(n, _N_UNIFORM, generator=generator, dtype=torch.float64)
        rate = torch.tensor([self.jpeg if kind == "jpeg" else 0.5 for kind in self.kinds],
                            dtype=torch.float64)
        chosen = r[:, 1:k + 1] < rate  # (n, k)
        fallback = [i for i, kind in enumerate(self.kinds) if kind != "jpeg"] or [0]
        which = (r[:, -1] * len(fallback)).long().clamp(max=len(fallback) - 1)
        pick = torch.tensor(fallback)[which]
        empty = ~chosen.any(dim=1)
        chosen[empty, pick[empty]] = True
        chosen &= (r[:, 0] < self.p)[:, None]
        rows = chosen.any(dim=1)
        out = images.clone()
        if rows.any():
            # only the perturbed images go through the float pipeline
            sub = chosen[rows]
            masks = {kind: sub[:, i] for i, kind in enumerate(self.kinds) if sub[:, i].any()}
            out[rows.to(images.device)] = _run(images[rows.to(images.device)], u[rows], masks,
                                               self.config, self.render)  # type: ignore[assignment]
        return out


# ----------------------------------------------------------------------------- figure


def perturbation_figure(image: torch.Tensor | np.ndarray, path: str | os.PathLike, *,
                        seed: int = 0, render: RenderConfig = _RENDER,
                        config: PerturbConfig = PerturbConfig()) -> Path:
    """A PNG grid of one printout under every variation of :data:`STRESS_SET`.

    Every variation uses ``seed``, so "all" shows the rotation, zoom, ... of the panels
    of its parts.

    Args:
        image: uint8 [3, H, W].
        path: the PNG to write (through a temporary file renamed into place).
        seed: the perturbations' seed.
        render, config: as for :func:`perturb`.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # heavy; only reports draw figures

    arr = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
    if arr.ndim != 3:
        raise DataError(f"perturbation_figure: expected one image [3, H, W], got shape {arr.shape}")
    batch = arr[None]
    names = list(STRESS_SET)
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows * arr.shape[1] / arr.shape[2] + 0.4 * rows))
    for i, name in enumerate(names):
        shown = stress_images(batch, name, seed=seed, config=config, render=render)[0]
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(shown.transpose(1, 2, 0), interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
