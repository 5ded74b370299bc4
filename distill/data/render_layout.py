"""The ECG paper of the renderer: layouts, panel geometry, the patch-to-lead map, the grid.

Everything here depends only on the :class:`RenderConfig`, never on a signal, so it is
computed once per configuration and cached. ``distill.data.render`` draws the traces on
top (see its docstring for the drawing rules).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from distill.core.leads import STANDARD_LEADS, lead_index
from distill.core.errors import DataError

# Bumped whenever the drawing changes, so cached images drawn by older code are not reused.
RENDER_VERSION = 1

# Rows of lead names; every row spans the full paper width and its columns split the
# duration evenly, each column showing its own time window (as a clinical printout does).
LAYOUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "3x4+II": (
        ("I", "aVR", "V1", "V4"),
        ("II", "aVL", "V2", "V5"),
        ("III", "aVF", "V3", "V6"),
        ("II",),
    ),
    "3x4": (
        ("I", "aVR", "V1", "V4"),
        ("II", "aVL", "V2", "V5"),
        ("III", "aVF", "V3", "V6"),
    ),
    "6x2": (
        ("I", "V1"), ("II", "V2"), ("III", "V3"),
        ("aVR", "V4"), ("aVL", "V5"), ("aVF", "V6"),
    ),
    "12x1": tuple((name,) for name in STANDARD_LEADS),
}


@dataclass(frozen=True)
class RenderConfig:
    """How a record is printed.

    Args:
        height, width: image size in pixels.
        layout: a key of :data:`LAYOUTS`; "3x4+II" is the standard clinical printout
            (3 rows x 4 columns of 2.5 s plus a 10 s lead II rhythm strip).
        paper_speed: mm per second (25 is standard).
        gain: mm per mV (10 is standard).
        duration: seconds of signal printed across the paper width; longer records are
            cropped, shorter ones leave the paper blank after their end.
        row_height_mm: paper height of one row of panels.
        baseline_frac: where the 0 mV line sits in a row, as a fraction from its top
            (below the middle, since QRS complexes are mostly positive).
        grid: draw the ECG paper grid.
        line_width_mm: trace thickness on paper (at least one pixel is drawn).
        labels: draw lead names in the top-left corner of each panel.
        label_height_mm: label glyph height on paper (rounded to whole font pixels).
        background, minor_color, major_color, trace_color: RGB colours.
        minor_width_mm, major_width_mm: grid line widths on paper.
        minor_min_px, major_min_px: lower bounds on grid line width in pixels, so a
            squeezed 224 px image still shows its grid (as a faint wash of minor lines).
    """

    height: int = 224
    width: int = 224
    layout: str = "3x4+II"
    paper_speed: float = 25.0
    gain: float = 10.0
    duration: float = 10.0
    row_height_mm: float = 50.0
    baseline_frac: float = 0.6
    grid: bool = True
    line_width_mm: float = 0.5
    labels: bool = True
    label_height_mm: float = 4.0
    background: tuple[int, int, int] = (255, 246, 242)
    minor_color: tuple[int, int, int] = (245, 190, 190)
    major_color: tuple[int, int, int] = (225, 110, 110)
    trace_color: tuple[int, int, int] = (0, 0, 0)
    minor_width_mm: float = 0.1
    major_width_mm: float = 0.25
    minor_min_px: float = 0.35
    major_min_px: float = 0.8

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise DataError(f"unknown render layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}")
        if self.height < 8 or self.width < 8:
            raise DataError(f"render size {self.height}x{self.width} is too small (at least 8x8)")
        for name in ("paper_speed", "gain", "duration", "row_height_mm", "line_width_mm"):
            if not getattr(self, name) > 0:
                raise DataError(f"render config {name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.baseline_frac <= 1.0:
            raise DataError(f"render config baseline_frac must lie in [0, 1], got {self.baseline_frac}")

    @property
    def paper_width_mm(self) -> float:
        """Paper width: the printed duration at the paper speed (250 mm for 10 s)."""
        return self.duration * self.paper_speed

    @property
    def paper_height_mm(self) -> float:
        """Paper height: one ``row_height_mm`` per layout row."""
        return len(LAYOUTS[self.layout]) * self.row_height_mm


class Panel(NamedTuple):
    """One panel: lead ``lead`` drawn in pixel rows [y0, y1) and columns [x0, x1),
    showing the record's time window [t0, t1) in seconds."""

    lead: int
    y0: int
    y1: int
    x0: int
    x1: int
    t0: float
    t1: float


def _first_pixel(edge_mm: float, size_px: int, paper_mm: float) -> int:
    """First pixel whose centre lies at or beyond ``edge_mm`` (pixel-centre ownership)."""
    v = edge_mm * size_px / paper_mm - 0.5
    return int(min(max(math.ceil(round(v, 9)), 0), size_px))


@functools.lru_cache(maxsize=64)
def panel_boxes(config: RenderConfig) -> tuple[Panel, ...]:
    """The panels of a layout, row by row, left to right.

    Args:
        config: the render configuration.

    Returns:
        A tuple of :class:`Panel` (lead, y0, y1, x0, x1, t0, t1); pixel boxes are
        half-open, disjoint, and tile the whole image for the built-in layouts.
    """
    rows = LAYOUTS[config.layout]
    panels = []
    for r, names in enumerate(rows):
        y0 = _first_pixel(r * config.row_height_mm, config.height, config.paper_height_mm)
        y1 = _first_pixel((r + 1) * config.row_height_mm, config.height, config.paper_height_mm)
        col_mm = config.paper_width_mm / len(names)
        for c, name in enumerate(names):
            x0 = _first_pixel(c * col_mm, config.width, config.paper_width_mm)
            x1 = _first_pixel((c + 1) * col_mm, config.width, config.paper_width_mm)
            t0 = c * col_mm / config.paper_speed
            t1 = (c + 1) * col_mm / config.paper_speed
            panels.append(Panel(lead_index(name), y0, y1, x0, x1, t0, t1))
    return tuple(panels)


def row_bounds(config: RenderConfig) -> list[tuple[int, int]]:
    """Pixel rows [y0, y1) of each layout row."""
    seen: dict[tuple[int, int], None] = {}
    for p in panel_boxes(config):
        seen[(p.y0, p.y1)] = None
    return list(seen)


def panel_baselines(config: RenderConfig) -> list[int]:
    """The pixel row of the 0 mV line of each panel, in :func:`panel_boxes` order.

    Args:
        config: the render configuration.

    Returns:
        One int per panel; a flat 0 mV trace covers this row (and, for traces thicker
        than one pixel, the rows just below it).
    """
    rows = row_bounds(config)
    py_per_mm = config.height / config.paper_height_mm
    out = []
    for p in panel_boxes(config):
        r = rows.index((p.y0, p.y1))
        base_mm = (r + config.baseline_frac) * config.row_height_mm
        out.append(int(min(max(math.floor(base_mm * py_per_mm), p.y0), p.y1 - 1)))
    return out


def lead_pixel_map(config: RenderConfig) -> np.ndarray:
    """The lead whose panel owns each pixel.

    Args:
        config: the render configuration.

    Returns:
        int64 [H, W]: the lead index (0..11) of the panel containing each pixel, -1 for
        pixels outside every panel.
    """
    owner = np.full((config.height, config.width), -1, dtype=np.int64)
    for p in panel_boxes(config):
        owner[p.y0:p.y1, p.x0:p.x1] = p.lead
    return owner


def patch_lead_map(config: RenderConfig, patch_size: int) -> np.ndarray:
    """The lead shown in each image patch, in a ViT's row-major patch order.

    A patch gets lead k iff every one of its pixels lies inside panels of lead k (a trace
    of lead k is only ever drawn inside lead k's panels, so changing lead k's signal can
    change only such patches, or -1 patches overlapping a lead k panel); -1 otherwise.
    The rhythm strip is lead II (1). Pixels beyond the last whole patch are ignored, as a
    ViT's patch embedding ignores them.

    Args:
        config: the render configuration.
        patch_size: patch side in pixels.

    Returns:
        int64 [(H // patch_size) * (W // patch_size)].
    """
    if patch_size < 1 or patch_size > min(config.height, config.width):
        raise DataError(f"patch size {patch_size} does not fit a {config.height}x{config.width} image")
    gh, gw = config.height // patch_size, config.width // patch_size
    owner = lead_pixel_map(config)[: gh * patch_size, : gw * patch_size]
    blocks = owner.reshape(gh, patch_size, gw, patch_size).transpose(0, 2, 1, 3).reshape(gh, gw, -1)
    first = blocks[..., 0]
    uniform = (blocks == first[..., None]).all(axis=-1)
    return np.where(uniform, first, -1).reshape(-1)


# ----------------------------------------------------------------------------- background


def _line_coverage(size_px: int, paper_mm: float, step_mm: float, width_px: float, skip_every: int) -> np.ndarray:
    """Fraction of each pixel covered by grid lines every ``step_mm`` of ``width_px``.

    Lines whose index is a multiple of ``skip_every`` are left out (0 = none left out),
    so minor lines do not double-paint major ones.
    """
    n = int(round(paper_mm / step_mm))
    idx = np.arange(n + 1)
    if skip_every:
        idx = idx[idx % skip_every != 0]
    centres = idx * step_mm * size_px / paper_mm
    lo = np.arange(size_px, dtype=np.float64)[:, None]
    overlap = np.minimum(lo + 1, centres[None] + width_px / 2) - np.maximum(lo, centres[None] - width_px / 2)
    return np.clip(overlap, 0.0, 1.0).sum(axis=1).clip(0.0, 1.0)


def _grid(config: RenderConfig) -> np.ndarray:
    """The ECG paper alone, float [3, H, W] in 0..255."""
    bg = np.asarray(config.background, dtype=np.float64)[:, None, None]
    img = np.broadcast_to(bg, (3, config.height, config.width)).copy()
    if not config.grid:
        return img
    px_x = config.width / config.paper_width_mm
    px_y = config.height / config.paper_height_mm
    for step, skip, width_mm, min_px, color in (
        (1.0, 5, config.minor_width_mm, config.minor_min_px, config.minor_color),
        (5.0, 0, config.major_width_mm, config.major_min_px, config.major_color),
    ):
        cx = _line_coverage(config.width, config.paper_width_mm, step, max(width_mm * px_x, min_px), skip)
        cy = _line_coverage(config.height, config.paper_height_mm, step, max(width_mm * px_y, min_px), skip)
        # A pixel is covered by a vertical or a horizontal line: union of the two coverages.
        alpha = 1.0 - (1.0 - cy[:, None]) * (1.0 - cx[None, :])
        col = np.asarray(color, dtype=np.float64)[:, None, None]
        img = img * (1.0 - alpha) + col * alpha
    return img


# A 3x5 bitmap font for the characters of lead names; one string per glyph row.
_FONT: dict[str, tuple[str, ...]] = {
    "I": ("###", ".#.", ".#.", ".#.", "###"),
    "V": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "a": ("...", "##.", "..#", "###", "###"),
    "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "L": ("#..", "#..", "#..", "#..", "###"),
    "F": ("###", "#..", "##.", "#..", "#.."),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("##.", "..#", ".#.", "#..", "###"),
    "3": ("##.", "..#", ".#.", "..#", "##."),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "##.", "..#", "##."),
    "6": (".##", "#..", "###", "#.#", "###"),
}


def _text_mask(text: str, scale: int) -> np.ndarray:
    """A boolean bitmap of ``text`` in the 3x5 font, each font pixel ``scale`` px square."""
    glyphs = [np.array([[ch == "#" for ch in row] for row in _FONT[c]]) for c in text]
    spacer = np.zeros((5, 1), dtype=bool)
    parts: list[np.ndarray] = []
    for i, g in enumerate(glyphs):
        parts += [spacer, g] if i else [g]
    bitmap = np.concatenate(parts, axis=1)
    return np.kron(bitmap, np.ones((scale, scale), dtype=bool)).astype(bool)


def _draw_labels(img: np.ndarray, config: RenderConfig) -> None:
    """Write each panel's lead name into its top-left corner, clipped to the panel."""
    scale = max(1, round(config.label_height_mm * config.height / config.paper_height_mm / 5))
    ink = np.asarray(config.trace_color, dtype=np.float64)
    margin = scale
    for p in panel_boxes(config):
        mask = _text_mask(STANDARD_LEADS[p.lead], scale)
        y, x = p.y0 + margin, p.x0 + margin
        h = max(0, min(mask.shape[0], p.y1 - y))
        w = max(0, min(mask.shape[1], p.x1 - x))
        region = img[:, y:y + h, x:x + w]
        region[:, mask[:h, :w]] = ink[:, None]


@functools.lru_cache(maxsize=16)
def background(config: RenderConfig) -> np.ndarray:
    """The blank printout (paper grid and lead labels), uint8 [3, H, W], read-only."""
    img = _grid(config)
    if config.labels:
        _draw_labels(img, config)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    out.setflags(write=False)
    return out


# ----------------------------------------------------------------------------- geometry
