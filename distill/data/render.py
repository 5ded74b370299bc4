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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distill.data.cache import ArrayCache, fingerprint
from distill.core.leads import NUM_LEADS
from distill.data.parallel import chunk_ranges, chunk_size, data_workers, map_chunks
from distill.data.render_layout import (  # noqa: F401  (re-exported: the renderer's public API)
    LAYOUTS,
    RENDER_VERSION,
    Panel,
    RenderConfig,
    background,
    lead_pixel_map,
    panel_baselines,
    panel_boxes,
    patch_lead_map,
    row_bounds,
)
from distill.core.errors import DataError
from distill.core.progress import progress_bar


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
    rows = row_bounds(config)
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


RENDER_PER_WORKER = 10000  # records a render worker must get before workers are used


def _render_range(store: tuple[str, str, tuple[int, ...], int], rows: np.ndarray,
                  target: tuple[str, str, tuple[int, ...], int], start: int, fs: float,
                  config: RenderConfig, batch_size: int) -> int:
    """Render rows ``rows`` of a memory-mapped signal store into rows ``start:`` of a
    memory-mapped image array, each given as (file, dtype, shape, offset); run in a worker
    process, so only these arguments travel, never the images. Returns the count."""
    def open_map(where: tuple[str, str, tuple[int, ...], int], mode: str) -> np.memmap:
        file, dtype, shape, offset = where
        return np.memmap(file, dtype=np.dtype(dtype), mode=mode, shape=shape, offset=offset)

    signals, images = open_map(store, "r"), open_map(target, "r+")
    for s in range(0, len(rows), batch_size):
        e = min(s + batch_size, len(rows))
        images[start + s:start + e] = render_batch(np.asarray(signals[rows[s:e]]), fs, config)
    images.flush()
    return len(rows)


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
        # Workers read their records from the signal store and write their images into
        # ``out`` by file name (both memmaps), so no image travels between processes; an
        # in-memory array or a test's renderer stays in this process.
        # (``ECGData.signals`` is the store itself or a lazy view of some of its rows.)
        memmap, rows = getattr(arr, "store", arr), getattr(arr, "rows", None)
        rows = np.arange(n) if rows is None else np.asarray(rows)
        mapped = all(isinstance(m, np.memmap) and m.filename is not None for m in (memmap, out))
        # (rendering runs at about 1,000 records/s a core: a worker's start, about a second
        # of imports, pays off only on large sets; benchmarks/data.py measures both)
        workers = data_workers(n, min_per_worker=RENDER_PER_WORKER) if mapped and renderer is None else 1
        with progress_bar(total=n, desc=f"rendering {config.height}x{config.width}", unit="ecg", enabled=progress) as bar:
            if workers > 1:
                out.flush()
                ranges = chunk_ranges(n, chunk_size(n, workers, 1000))
                where = [(str(m.filename), m.dtype.str, tuple(m.shape), m.offset) for m in (memmap, out)]
                tasks = [(where[0], rows[s:e], where[1], s, fs, config, batch_size) for s, e in ranges]
                for count in map_chunks(_render_range, tasks, workers):
                    bar.update(count)
                return
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
