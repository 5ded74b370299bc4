"""Tests of the vectorised 12-lead renderer: shapes, paper, baselines, the patch-to-lead
map against where traces really land, determinism, caching and input validation."""

from __future__ import annotations

import numpy as np
import pytest

import distill.data.render as render_mod
from distill.data.cache import ArrayCache
from distill.data.render import (
    RenderConfig,
    background,
    cached_images,
    lead_pixel_map,
    panel_baselines,
    panel_boxes,
    patch_lead_map,
    render_12lead,
    render_batch,
)
from distill.core.errors import DataError

FS = 500.0
T = 5000


def ecg(seed: int = 0, fs: float = FS, n: int = T) -> np.ndarray:
    """A synthetic-ish record [12, n]: Gaussian P, Q, R, S, T waves per beat, scaled per lead."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    rr = 60.0 / rng.uniform(55, 100)
    beat = np.zeros(n)
    for b in np.arange(rng.uniform(0, rr), n / fs + rr, rr):
        for off, w, a in ((-0.2, 0.025, 0.15), (-0.03, 0.008, -0.1), (0.0, 0.01, 1.0),
                          (0.03, 0.01, -0.25), (0.25, 0.05, 0.3)):
            beat += a * np.exp(-0.5 * ((t - b - off) / w) ** 2)
    scale = rng.uniform(-1.5, 1.5, size=12)
    return (scale[:, None] * beat[None] + 0.02 * rng.standard_normal((12, n))).astype(np.float32)


def is_ink(img: np.ndarray, config: RenderConfig) -> np.ndarray:
    """bool [H, W]: pixels of the trace colour."""
    return (img == np.asarray(config.trace_color, dtype=np.uint8)[:, None, None]).all(axis=0)


def test_shape_and_dtype() -> None:
    for h, w in ((224, 224), (336, 448)):
        cfg = RenderConfig(height=h, width=w)
        img = render_12lead(ecg(), FS, cfg)
        assert img.shape == (3, h, w)
        assert img.dtype == np.uint8
        batch = render_batch(np.stack([ecg(1), ecg(2)]), FS, cfg)
        assert batch.shape == (2, 3, h, w)
        assert batch.dtype == np.uint8


def test_grid_present_on_zero_signal() -> None:
    cfg = RenderConfig()
    img = render_12lead(np.zeros((12, T), np.float32), FS, cfg)
    paper = ~is_ink(img, cfg)
    r, g, b = (img[c][paper].astype(int) for c in range(3))
    # Pink/red grid lines: red clearly above green/blue, several shades (minor, major, paper).
    reddish = (r - g > 40) & (r > 180)
    assert reddish.sum() > 0.05 * paper.sum()
    assert len(np.unique(img[:, paper].T, axis=0)) >= 4
    no_grid = RenderConfig(grid=False, labels=False)
    plain = render_12lead(np.zeros((12, T), np.float32), FS, no_grid)
    assert len(np.unique(plain[:, ~is_ink(plain, no_grid)].T, axis=0)) == 1


@pytest.mark.parametrize("size", [224, 672])
def test_flat_signal_draws_baselines(size: int) -> None:
    cfg = RenderConfig(height=size, width=size)
    img = render_12lead(np.zeros((12, T), np.float32), FS, cfg)
    ink = is_ink(img, cfg)
    for p, base in zip(panel_boxes(cfg), panel_baselines(cfg)):
        assert ink[base, p.x0:p.x1].all(), f"no baseline in panel of lead {p.lead}"
        far = [y for y in (base - 4, base + 4) if p.y0 <= y < p.y1]
        assert far and not ink[far, p.x0:p.x1].any()
    # Apart from labels (top of each panel), ink lies only on or just below baselines.
    rows = set()
    for base in panel_baselines(cfg):
        rows |= {base, base + 1}
    label_rows = {y for p in panel_boxes(cfg) for y in range(p.y0, p.y0 + size // 20)}
    inked_rows = set(np.flatnonzero(ink.any(axis=1)).tolist())
    assert inked_rows - label_rows <= rows


def test_patch_counts_at_224_16() -> None:
    pmap = patch_lead_map(RenderConfig(), 16)
    assert pmap.shape == (14 * 14,)
    assert pmap.dtype == np.int64
    counts = np.bincount(pmap + 1, minlength=13)
    # 3x3 patches per 2.5 s panel; lead II also owns 3x14 rhythm strip patches.
    assert counts[0] == 46
    assert counts[1:].tolist() == [9, 51, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]


def test_rhythm_strip_is_lead_ii() -> None:
    cfg = RenderConfig()
    p = 16
    strip = panel_boxes(cfg)[-1]
    assert strip.lead == 1 and (strip.x0, strip.x1) == (0, cfg.width) and (strip.t0, strip.t1) == (0.0, 10.0)
    pmap = patch_lead_map(cfg, p).reshape(cfg.height // p, cfg.width // p)
    inside = [i for i in range(cfg.height // p) if i * p >= strip.y0 and (i + 1) * p <= strip.y1]
    assert inside
    assert (pmap[inside] == 1).all()


def changed_patches_ok(cfg: RenderConfig, patch: int, seed: int = 0) -> None:
    """Perturb each lead alone; changed pixels must stay in that lead's panels and
    changed patches must map to the lead or be -1 patches overlapping its panels."""
    base = ecg(seed)
    t = np.arange(T) / FS
    img0 = render_12lead(base, FS, cfg)
    owner = lead_pixel_map(cfg)
    gh, gw = cfg.height // patch, cfg.width // patch
    pmap = patch_lead_map(cfg, patch)
    blocks = owner[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    for k in range(12):
        sig = base.copy()
        sig[k] += 2.5 * np.sin(2 * np.pi * 3.0 * t)  # large: also drives the trace out of its panel
        img = render_12lead(sig, FS, cfg)
        diff = (img != img0).any(axis=0)
        assert diff.any()
        assert (owner[diff] == k).all(), f"lead {k} changed pixels outside its panels"
        pdiff = diff[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).any(axis=(1, 3)).reshape(-1)
        for i in np.flatnonzero(pdiff):
            assert pmap[i] == k or (pmap[i] == -1 and (blocks[i] == k).any()), (k, i, pmap[i])
        assert (pdiff & (pmap == k)).any(), f"no patch mapped to lead {k} changed"


@pytest.mark.parametrize(
    "cfg,patch",
    [
        (RenderConfig(), 16),
        (RenderConfig(height=336, width=336), 14),
        (RenderConfig(height=250, width=300), 16),  # panels straddle patches
        (RenderConfig(height=448, width=448, line_width_mm=1.5), 14),  # thick, widened strokes
    ],
)
def test_patch_map_matches_drawing(cfg: RenderConfig, patch: int) -> None:
    changed_patches_ok(cfg, patch)


def test_every_lead_has_patches_at_common_vit_sizes() -> None:
    for size, patch in ((224, 16), (224, 14), (336, 14), (448, 14), (672, 14)):
        counts = np.bincount(patch_lead_map(RenderConfig(height=size, width=size), patch) + 1, minlength=13)
        assert (counts[1:] > 0).all(), (size, patch, counts)


def test_deterministic_and_batch_equals_loop() -> None:
    cfg = RenderConfig()
    sigs = np.stack([ecg(s) for s in range(5)])
    a = render_batch(sigs, FS, cfg)
    b = render_batch(sigs, FS, cfg)
    np.testing.assert_array_equal(a, b)
    loop = np.stack([render_12lead(s, FS, cfg) for s in sigs])
    np.testing.assert_array_equal(a, loop)
    assert not np.array_equal(a[0], a[1])


def test_continuous_trace_at_steep_steps_and_low_rate() -> None:
    cfg = RenderConfig(height=672, width=672)
    # A 2 mV step in lead I mid-panel: the column holding it is filled from one level to the other.
    sig = np.zeros((12, T), np.float32)
    sig[0, 600:] = 2.0
    ink = is_ink(render_12lead(sig, FS, cfg), cfg)
    col = int(1.2 * cfg.paper_speed * cfg.width / cfg.paper_width_mm)
    top = np.flatnonzero(ink[:, col + 10]).min()  # the 2 mV level, after the step
    base = panel_baselines(cfg)[0]
    assert np.flatnonzero(ink[:, col - 10]).min() == base  # the 0 mV level, before it
    assert base - top >= 66  # 2 mV = 20 mm = 67 px at 3.36 px/mm
    assert ink[top:base + 1, col - 1:col + 2].any(axis=1).all()
    # 50 Hz on 672 px: most columns hold no sample, yet no column of any panel is empty.
    t = np.arange(500) / 50.0
    sig = np.tile(1.5 * np.sin(2 * np.pi * 1.3 * t), (12, 1)).astype(np.float32)
    ink = is_ink(render_12lead(sig, 50.0, cfg), cfg)
    for p in panel_boxes(cfg):
        assert ink[p.y0:p.y1, p.x0:p.x1].any(axis=0).all()


def test_short_record_leaves_paper_blank_and_long_is_cropped() -> None:
    cfg = RenderConfig()
    full = ecg(3, n=6000)  # 12 s
    short = render_12lead(full[:, :2500], FS, cfg)  # 5 s
    strip = panel_boxes(cfg)[-1]
    half = cfg.width // 2 + 1
    bg = background(cfg)
    np.testing.assert_array_equal(short[:, strip.y0:strip.y1, half:], bg[:, strip.y0:strip.y1, half:])
    assert is_ink(short, cfg)[strip.y0:strip.y1, : half - 1].any(axis=0).all()
    # Past 10 s nothing is shown: only the last column may differ (it holds the 10.0 s sample).
    long_img = render_12lead(full, FS, cfg)
    exact = render_12lead(full[:, :5000], FS, cfg)
    np.testing.assert_array_equal(long_img[..., :-1], exact[..., :-1])


def test_cached_images_render_once(tmp_path, monkeypatch) -> None:
    cfg = RenderConfig()
    sigs = np.stack([ecg(s) for s in range(7)])
    calls = []
    real = render_mod.render_batch

    def counting(batch, fs, config):
        calls.append(len(batch))
        return real(batch, fs, config)

    monkeypatch.setattr(render_mod, "render_batch", counting)
    cache = ArrayCache(tmp_path)
    first = cached_images(sigs, FS, cfg, cache, "set-a", progress=False, batch_size=3)
    assert calls == [3, 3, 1]
    np.testing.assert_array_equal(first, real(sigs, FS, cfg))
    calls.clear()
    second = cached_images(sigs, FS, cfg, cache, "set-a", progress=False, batch_size=3)
    assert calls == []
    assert isinstance(second, np.memmap)
    np.testing.assert_array_equal(second, first)
    # The key covers the config and the rate: either change renders anew.
    cached_images(sigs, FS, RenderConfig(grid=False), cache, "set-a", progress=False)
    cached_images(sigs, 250.0, cfg, cache, "set-a", progress=False)
    assert calls == [7, 7]


@pytest.mark.parametrize(
    "signal,fs,message",
    [
        (np.zeros((11, T)), FS, r"render_12lead: expected a signal of shape \[12, T\], got shape \(11, 5000\)"),
        (np.zeros(T), FS, r"render_12lead: expected a signal of shape \[12, T\], got shape \(5000,\)"),
        (np.zeros((1, 12, T)), FS, r"expected a signal of shape \[12, T\], got shape \(1, 12, 5000\)"),
        (np.full((12, T), np.nan), FS, r"render_12lead: signal contains non-finite values \(NaN or inf\)"),
        (np.zeros((12, 1)), FS, r"render_12lead: a signal needs at least 2 samples, got 1"),
        (np.zeros((12, T)), 0.0, r"render_12lead: sampling rate must be a positive number, got 0.0"),
    ],
)
def test_bad_input_render_12lead(signal, fs, message) -> None:
    with pytest.raises(DataError, match=message):
        render_12lead(signal, fs)


def test_bad_input_batch_and_cache(tmp_path) -> None:
    with pytest.raises(DataError, match=r"render_batch: expected a signal of shape \[B, 12, T\], got shape \(12, 5000\)"):
        render_batch(np.zeros((12, T)), FS)
    bad = np.zeros((2, 12, T))
    bad[1, 3, 7] = np.inf
    with pytest.raises(DataError, match=r"render_batch: signal contains non-finite values"):
        render_batch(bad, FS)
    with pytest.raises(DataError, match=r"cached_images: expected signals of shape \[N, 12, T\], got shape \(2, 8, 5000\)"):
        cached_images(np.zeros((2, 8, T)), FS, RenderConfig(), ArrayCache(tmp_path), "k", progress=False)
    with pytest.raises(DataError, match=r"unknown render layout 'bogus'"):
        RenderConfig(layout="bogus")
