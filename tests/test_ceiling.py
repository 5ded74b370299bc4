"""benchmarks/ceiling.py's reduction of a record to what a printout resolves."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.ceiling import reduce_to_printout
from distill.data.render_layout import RenderConfig

FS = 100.0


@pytest.mark.parametrize("size", [224, 448])
def test_each_lead_shows_only_its_panel_window_on_pixel_rows(size: int) -> None:
    config = RenderConfig(height=size, width=size)
    rows_per_mv = size / 20  # 200 mm of paper, 10 mm/mV
    x = np.full((2, 12, 1000), 0.5, np.float32)
    out = reduce_to_printout(x, FS, config)
    t = np.arange(1000) / FS
    visible = out != 0
    # 3x4+II: lead I (0) in column 0 (0-2.5 s), aVR (3) column 1, V1 (6) column 2, V4 (9)
    # column 3, and lead II (1) on the 10 s rhythm strip
    for lead, (t0, t1) in {0: (0, 2.5), 3: (2.5, 5), 6: (5, 7.5), 9: (7.5, 10)}.items():
        assert np.array_equal(visible[:, lead], np.broadcast_to((t >= t0) & (t < t1), (2, 1000)))
    assert visible[:, 1].all()
    assert np.allclose(out[visible], round(0.5 * rows_per_mv) / rows_per_mv)


def test_resolution_only_keeps_every_lead_and_costs_at_most_a_pixel() -> None:
    config = RenderConfig(height=448, width=448)
    t = np.arange(1000) / FS
    x = np.broadcast_to(np.sin(2 * np.pi * 1.0 * t) * np.linspace(0.2, 1.5, 12)[:, None],
                        (1, 12, 1000)).astype(np.float32)
    out = reduce_to_printout(x, FS, config, windows=False)
    # a 1 Hz wave over 44.8 columns/s: the column means and half a pixel row (22.4 rows/mV)
    # are all it loses (the ends lie beyond the first and last column centres)
    inner = slice(5, 995)
    assert np.abs(out[..., inner] - x[..., inner]).max() < 0.5 / 22.4 + 0.01


def test_traces_are_clipped_to_their_panel_rows() -> None:
    config = RenderConfig(height=224, width=224)  # 50 mm rows, baseline at 0.6: +3 / -2 mV
    x = np.zeros((1, 12, 1000), np.float32)
    x[0, 0, :250] = 10.0
    x[0, 3, 250:500] = -10.0
    out = reduce_to_printout(x, FS, config)
    assert 2.8 < out[0, 0, 50:200].max() <= 3.0
    assert -2.0 <= out[0, 3, 300:450].min() < -1.8


def test_a_spike_narrower_than_a_column_keeps_its_height_as_ink() -> None:
    """A drawn trace leaves ink from its lowest to its highest point in each pixel column:
    a 10 ms QRS-like spike keeps its height at 22.4 columns/s, where a column mean would
    blur it to a fraction."""
    x = np.zeros((1, 12, 1000), np.float32)
    x[0, :, ::80] = 1.5
    rows_per_mv = 224 / 20
    ink = reduce_to_printout(x, FS, RenderConfig(), windows=False)
    blurred = reduce_to_printout(x, FS, RenderConfig(), windows=False, ink="mean")
    assert abs(ink.max() - round(1.5 * rows_per_mv) / rows_per_mv) < 1e-6
    assert blurred.max() < 0.5
    with pytest.raises(ValueError, match="ink: 'max'"):
        reduce_to_printout(x, FS, RenderConfig(), ink="max")
