"""A vectorised 12-lead ECG renderer: signal [12, T] in mV -> image uint8 [3, H, W].

The image is a printout on ECG paper: a fixed paper area (``duration * paper_speed`` mm wide,
``rows * row_height_mm`` mm high; 250 mm x 200 mm for the default 10 s "3x4+II" layout)
scaled into ``height x width`` pixels, so 224x224 is a squeezed but faithful layout and
larger sizes only add detail. The grid (1 mm minor, 5 mm major lines, drawn with analytic
anti-aliasing) and the lead labels (a built-in 3x5 bitmap font) are the same for every
record, so they are drawn once per configuration and cached.

Pixels are partitioned into panels: a pixel belongs to the panel whose paper rectangle
contains the pixel's centre. A panel's trace is drawn only inside its own pixels (a tall
QRS is clipped at the panel edge rather than bleeding into a neighbour), which is what
makes :func:`patch_lead_map` exact: a patch is given lead k only when all its pixels belong
to panels of lead k.

Traces are continuous: every pixel column covers a time interval [ta, tb); the column is
filled between the minimum and maximum of the trace over that interval, taken over the
samples inside it and the linearly interpolated values at its two edges. Adjacent columns
share edge values, so a steep QRS slope leaves no gap, and columns holding no sample at
all (a low sampling rate on a wide image) still get a segment.

The hot path is numpy only: one gather, two ``reduceat`` reductions and one comparison
against a per-row index map, using geometry precomputed per (config, fs, T).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from distill.progress import progress_bar

from distill.data.cache import ArrayCache, fingerprint
from distill.data.leads import NUM_LEADS, STANDARD_LEADS, lead_index
from distill.errors import DataError

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


def _row_bounds(config: RenderConfig) -> list[tuple[int, int]]:
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
    rows = _row_bounds(config)
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


@dataclass(frozen=True)
class _Geometry:
    """Everything about drawing that depends only on (config, fs, T).

    K = rows * W trace columns (every layout row spans the full width).

    Attributes:
        edge_lo, edge_w: [2K] flat sample index (lead * T + i) and weight of the linear
            interpolation at each column's left and right time edge (left edges first).
        gather: [M] indices into concat(signal [12*T], edge values [2K]) listing, per
            column, its left edge value, the samples strictly inside it, its right edge.
        starts: [K] offset of each column's run in ``gather`` (for ``reduceat``).
        base_px: [K] float pixel row of 0 mV; px_per_mv: pixels per mV (rows grow down).
        row_lo, row_hi: [K] first and last pixel row of the column's panel.
        blank: [K] columns after the end of the record (nothing drawn).
        panel_id: [K] the panel of each column (a thick trace widens only within its
            own panel).
        band_of_row: [H] which layout row each pixel row belongs to (0 for stray rows,
            whose spans never reach them).
        pad_up, pad_down, half_w: trace thickening in pixels.
    """

    edge_lo: np.ndarray
    edge_w: np.ndarray
    gather: np.ndarray
    starts: np.ndarray
    base_px: np.ndarray
    px_per_mv: float
    row_lo: np.ndarray
    row_hi: np.ndarray
    blank: np.ndarray
    panel_id: np.ndarray
    band_of_row: np.ndarray
    pad_up: int
    pad_down: int
    half_w: int


@functools.lru_cache(maxsize=32)
def _geometry(config: RenderConfig, fs: float, n_samples: int) -> _Geometry:
    """Precompute the column -> sample maps and clipping boxes for (config, fs, T)."""
    W, T = config.width, n_samples
    rows = _row_bounds(config)
    sec_per_px = config.paper_width_mm / config.paper_speed / W
    lead = np.empty((len(rows), W), dtype=np.int64)
    t_a = np.empty((len(rows), W))
    t_b = np.empty((len(rows), W))
    row_lo = np.empty((len(rows), W), dtype=np.int64)
    row_hi = np.empty((len(rows), W), dtype=np.int64)
    panel_id = np.full((len(rows), W), -1, dtype=np.int64)
    base_px = np.empty((len(rows), W))
    py_per_mm = config.height / config.paper_height_mm
    x = np.arange(W)
    for k, p in enumerate(panel_boxes(config)):
        r = rows.index((p.y0, p.y1))
        cols = slice(p.x0, p.x1)
        lead[r, cols] = p.lead
        # A column's time span is its paper position, kept inside the panel's window.
        t_a[r, cols] = np.clip(x[cols] * sec_per_px, p.t0, p.t1)
        t_b[r, cols] = np.clip((x[cols] + 1) * sec_per_px, p.t0, p.t1)
        row_lo[r, cols], row_hi[r, cols] = p.y0, p.y1 - 1
        panel_id[r, cols] = k
        base_px[r, cols] = (r + config.baseline_frac) * config.row_height_mm * py_per_mm
    lead, t_a, t_b = lead.ravel(), t_a.ravel(), t_b.ravel()
    last = (T - 1) / fs
    blank = t_a >= T / fs

    # Edge values by linear interpolation; times past the last sample hold its value.
    edges_t = np.minimum(np.concatenate([t_a, t_b]), last) * fs
    i0 = np.clip(np.floor(edges_t).astype(np.int64), 0, T - 2)
    edge_w = np.clip(edges_t - i0, 0.0, 1.0).astype(np.float32)
    edge_lead = np.concatenate([lead, lead])
    edge_lo = edge_lead * T + i0

    # Samples strictly inside each column: i with t_a*fs < i < t_b*fs (and i < T).
    first = np.floor(np.minimum(t_a, last) * fs).astype(np.int64) + 1
    stop = np.minimum(np.ceil(np.minimum(t_b, last) * fs).astype(np.int64), T)
    inner = np.maximum(stop - first, 0)
    K = lead.size
    sizes = inner + 2
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    gather = np.empty(int(sizes.sum()), dtype=np.int64)
    gather[starts] = NUM_LEADS * T + np.arange(K)
    gather[starts + sizes - 1] = NUM_LEADS * T + K + np.arange(K)
    # Inner positions: run offsets within each column, turned into flat sample indices.
    col_of = np.repeat(np.arange(K), inner)
    offset = np.arange(col_of.size) - np.repeat(np.cumsum(inner) - inner, inner)
    gather[np.repeat(starts + 1, inner) + offset] = lead[col_of] * T + first[col_of] + offset

    band_of_row = np.zeros(config.height, dtype=np.int64)
    for r, (y0, y1) in enumerate(rows):
        band_of_row[y0:y1] = r
    thick_y = max(1, round(config.line_width_mm * py_per_mm))
    thick_x = max(1, round(config.line_width_mm * W / config.paper_width_mm))
    geo = _Geometry(
        edge_lo=edge_lo, edge_w=edge_w, gather=gather, starts=starts,
        base_px=base_px.ravel().astype(np.float32), px_per_mv=config.gain * py_per_mm,
        row_lo=row_lo.ravel(), row_hi=row_hi.ravel(), blank=blank,
        panel_id=panel_id.ravel(), band_of_row=band_of_row,
        pad_up=(thick_y - 1) // 2, pad_down=thick_y - 1 - (thick_y - 1) // 2, half_w=(thick_x - 1) // 2,
    )
    for arr in dataclasses.astuple(geo):
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    return geo


# ----------------------------------------------------------------------------- drawing


def _check(signals: np.ndarray, fs: float, ndim: int, where: str) -> np.ndarray:
    """Validate a signal array and return it as float32; raise DataError otherwise."""
    arr = np.asarray(signals)
    want = "[12, T]" if ndim == 2 else "[B, 12, T]"
    if arr.ndim != ndim or arr.shape[-2] != NUM_LEADS:
        raise DataError(f"{where}: expected a signal of shape {want}, got shape {tuple(arr.shape)}")
    if arr.shape[-1] < 2:
        raise DataError(f"{where}: a signal needs at least 2 samples, got {arr.shape[-1]}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise DataError(f"{where}: expected a real numeric signal, got dtype {arr.dtype}")
    if not (isinstance(fs, (int, float, np.integer, np.floating)) and math.isfinite(fs) and fs > 0):
        raise DataError(f"{where}: sampling rate must be a positive number, got {fs!r}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: signal contains non-finite values (NaN or inf)")
    return arr


def _spans(signals: np.ndarray, geo: _Geometry) -> tuple[np.ndarray, np.ndarray]:
    """First and last pixel row drawn in each trace column.

    Args:
        signals: float32 [B, 12, T].
        geo: the geometry for this (config, fs, T).

    Returns:
        (lo, hi), int32 [B, K] each; lo > hi where nothing is drawn.
    """
    B = signals.shape[0]
    flat = signals.reshape(B, -1)
    a, b = flat[:, geo.edge_lo], flat[:, geo.edge_lo + 1]
    edges = a + geo.edge_w * (b - a)
    vals = np.concatenate([flat, edges], axis=1)[:, geo.gather]
    vmax = np.maximum.reduceat(vals, geo.starts, axis=1)
    vmin = np.minimum.reduceat(vals, geo.starts, axis=1)
    # Higher voltage is higher on paper, i.e. a smaller pixel row.
    lo = np.floor(geo.base_px - vmax * geo.px_per_mv)
    hi = np.floor(geo.base_px - vmin * geo.px_per_mv)
    # Clip in float first: a huge voltage must not overflow the integer cast.
    lo = np.clip(lo, -1, 1 << 20).astype(np.int32)
    hi = np.clip(hi, -1, 1 << 20).astype(np.int32)
    if geo.half_w:
        lo, hi = _widen(lo, hi, geo)
    lo = np.maximum(lo - geo.pad_up, geo.row_lo)
    hi = np.minimum(hi + geo.pad_down, geo.row_hi)
    hi[:, geo.blank] = -1
    return lo, hi


def _widen(lo: np.ndarray, hi: np.ndarray, geo: _Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Thicken steep strokes horizontally by ``half_w`` columns, never across a panel edge."""
    out_lo, out_hi = lo.copy(), hi.copy()
    pid = geo.panel_id
    for s in range(1, geo.half_w + 1):
        # Columns c and c+s exchange spans only when both lie in the same panel (panels are
        # contiguous runs of columns, so equal ids mean nothing in between is foreign).
        same = pid[s:] == pid[:-s]
        out_lo[:, s:] = np.where(same, np.minimum(out_lo[:, s:], lo[:, :-s]), out_lo[:, s:])
        out_hi[:, s:] = np.where(same, np.maximum(out_hi[:, s:], hi[:, :-s]), out_hi[:, s:])
        out_lo[:, :-s] = np.where(same, np.minimum(out_lo[:, :-s], lo[:, s:]), out_lo[:, :-s])
        out_hi[:, :-s] = np.where(same, np.maximum(out_hi[:, :-s], hi[:, s:]), out_hi[:, :-s])
    return out_lo, out_hi


def _draw(signals: np.ndarray, fs: float, config: RenderConfig) -> np.ndarray:
    """Render validated float32 [B, 12, T] signals into uint8 [B, 3, H, W]."""
    B, _, T = signals.shape
    geo = _geometry(config, float(fs), T)
    lo, hi = _spans(signals, geo)
    H, W = config.height, config.width
    n_rows = lo.shape[1] // W
    lo = lo.reshape(B, n_rows, W)[:, geo.band_of_row]  # [B, H, W]: each pixel row's band
    hi = hi.reshape(B, n_rows, W)[:, geo.band_of_row]
    y = np.arange(H, dtype=np.int32)[None, :, None]
    ink = (y >= lo) & (y <= hi)
    color = np.asarray(config.trace_color, dtype=np.uint8)[None, :, None, None]
    return np.where(ink[:, None], color, background(config)[None])


def render_batch(signals: np.ndarray, fs: float, config: RenderConfig = RenderConfig()) -> np.ndarray:
    """Render a batch of 12-lead records.

    Args:
        signals: float [B, 12, T] in mV, standard lead order (I II III aVR aVL aVF V1..V6).
        fs: sampling rate in Hz.
        config: the render configuration.

    Returns:
        uint8 [B, 3, H, W] RGB images.

    Raises:
        DataError: wrong shape, fewer than 2 samples, a bad rate or non-finite values.
    """
    return _draw(_check(signals, fs, 3, "render_batch"), fs, config)


def render_12lead(signal: np.ndarray, fs: float, config: RenderConfig = RenderConfig()) -> np.ndarray:
    """Render one 12-lead record as an ECG printout.

    Args:
        signal: float [12, T] in mV, standard lead order; ``config.duration`` seconds are
            printed (longer records are cropped, shorter ones leave blank paper at the end).
        fs: sampling rate in Hz.
        config: the render configuration.

    Returns:
        uint8 [3, H, W] RGB image.

    Raises:
        DataError: wrong shape, fewer than 2 samples, a bad rate or non-finite values.
    """
    return _draw(_check(signal, fs, 2, "render_12lead")[None], fs, config)[0]


def image_cache_key(key: str, fs: float, config: RenderConfig, n_records: int, n_samples: int) -> str:
    """The cache key of a rendered array: the data key, the rate, every config field,
    the array size and the renderer version."""
    return fingerprint(params={
        "key": key, "fs": float(fs), "config": dataclasses.asdict(config),
        "n": n_records, "t": n_samples, "version": RENDER_VERSION,
    })


def cached_images(
    signals: np.ndarray,
    fs: float,
    config: RenderConfig,
    cache: ArrayCache,
    key: str,
    progress: bool = True,
    batch_size: int = 64,
    renderer: Callable[[np.ndarray, float, RenderConfig], np.ndarray] | None = None,
) -> np.ndarray:
    """Render every record once into a memory-mapped cache entry, or read it back.

    Args:
        signals: float [N, 12, T] in mV: an array, a memmap or any object with ``shape``
            and slicing (``ECGData.signals``); read batch by batch, never copied whole.
        fs: sampling rate in Hz.
        config: the render configuration.
        cache: where the images live.
        key: identifies the signals (e.g. a ``fingerprint`` of their source files and
            preprocessing); combined with ``fs``, the config and the renderer version.
        progress: show a tqdm bar while rendering.
        batch_size: records rendered per call.
        renderer: the batch renderer (default :func:`render_batch`); a seam for tests.

    Returns:
        uint8 [N, 3, H, W], a read-only memmap.

    Raises:
        DataError: as :func:`render_batch`, or when ``signals`` is not [N, 12, T].
    """
    arr = signals if hasattr(signals, "shape") and hasattr(signals, "__getitem__") \
        else np.asarray(signals)
    if len(arr.shape) != 3 or arr.shape[1] != NUM_LEADS:
        raise DataError(f"cached_images: expected signals of shape [N, 12, T], got shape {tuple(arr.shape)}")
    draw = renderer or render_batch
    n, _, t = arr.shape
    shape = (n, 3, config.height, config.width)

    def fill(out: np.ndarray) -> None:
        with progress_bar(total=n, desc=f"rendering {config.height}x{config.width}", unit="ecg", enabled=progress) as bar:
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                out[s:e] = draw(np.asarray(arr[s:e]), fs, config)
                bar.update(e - s)

    return cache.get_or_build(
        f"images-{config.layout}-{config.height}x{config.width}",
        image_cache_key(key, fs, config, n, t),
        shape,
        np.uint8,
        fill,
        meta={"key": key, "fs": float(fs), "config": dataclasses.asdict(config), "version": RENDER_VERSION},
    )
