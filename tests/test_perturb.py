"""Tests of the printout perturbations: determinism, identities, the exact grid recolour,
geometry with paper-coloured margins, blur, JPEG, lighting, line width, the stress set,
the training augmentation, the figure and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distill.data.perturb as perturb_mod
from distill.core.errors import DataError
from distill.data.perturb import (
    GRID_PALETTES,
    PERTURBATIONS,
    STRESS_SET,
    ImageAugment,
    PerturbConfig,
    _warp,
    perturb,
    perturbation_figure,
    stress_images,
)
from distill.data.render import RenderConfig, render_batch

FS = 250.0
RENDER = RenderConfig()
# A blue palette whose minor colour keeps the renderer's paper-to-major proportion.
TARGET = ((240, 240, 235), (179, 191, 209), (90, 120, 170), (30, 20, 60))
SOURCE = np.array([RENDER.background, RENDER.minor_color, RENDER.major_color, RENDER.trace_color],
                  dtype=float)


def ecg(seed: int, n: int = 2500) -> np.ndarray:
    """A synthetic record [12, n]: Gaussian QRS-like spikes and T waves, scaled per lead."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / FS
    beat = np.zeros(n)
    for b in np.arange(rng.uniform(0, 0.8), n / FS, rng.uniform(0.6, 1.0)):
        beat += np.exp(-0.5 * ((t - b) / 0.012) ** 2)  # QRS
        beat += 0.3 * np.exp(-0.5 * ((t - b - 0.25) / 0.05) ** 2)  # T wave
    return (rng.uniform(-1.5, 1.5, size=(12, 1)) * beat[None]).astype(np.float32)


@pytest.fixture(scope="module")
def printouts() -> torch.Tensor:
    """Three 224x224 printouts drawn by the project's renderer, uint8 [3, 3, 224, 224]."""
    return torch.from_numpy(render_batch(np.stack([ecg(s) for s in range(3)]), FS, RENDER))


def diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(255.0**2 / (diff(a, b) ** 2).mean()))


def high_frequency(x: torch.Tensor) -> float:
    """Energy of horizontal and vertical pixel differences."""
    x = x.double()
    return float((x.diff(dim=-1) ** 2).mean() + (x.diff(dim=-2) ** 2).mean())


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_output_and_images_draw_apart(printouts: torch.Tensor) -> None:
    before = printouts.clone()
    a = perturb(printouts, PERTURBATIONS, seed=7)
    assert torch.equal(printouts, before), "the input was modified"
    b = perturb(printouts, PERTURBATIONS, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, perturb(printouts, PERTURBATIONS, seed=8))
    twins = printouts[:1].repeat(2, 1, 1, 1)
    out = perturb(twins, ("rotate",), seed=7)
    assert not torch.equal(out[0], out[1]), "images of one batch got the same draw"


def test_first_images_of_a_batch_as_alone(printouts: torch.Tensor) -> None:
    assert torch.equal(perturb(printouts, PERTURBATIONS, seed=3)[:2],
                       perturb(printouts[:2], PERTURBATIONS, seed=3))


def test_chunks_change_nothing(printouts: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = perturb(printouts, PERTURBATIONS, seed=3)
    monkeypatch.setattr(perturb_mod, "_CHUNK", 2)
    assert torch.equal(perturb(printouts, PERTURBATIONS, seed=3), whole)
    assert np.array_equal(perturb(printouts.numpy(), PERTURBATIONS, seed=3), whole.numpy())


def test_every_kind_on_a_wide_image() -> None:
    cfg = RenderConfig(height=96, width=160, layout="6x2")
    x = torch.from_numpy(render_batch(np.stack([ecg(5), ecg(6)]), FS, cfg))
    for kind in PERTURBATIONS:
        out = perturb(x, (kind,), seed=1, render=cfg)
        assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x), kind


def test_kinds_apply_in_canonical_order(printouts: torch.Tensor) -> None:
    assert torch.equal(perturb(printouts, ("blur", "grid"), seed=1),
                       perturb(printouts, ("grid", "blur"), seed=1))


def test_empty_kinds_is_identity(printouts: torch.Tensor) -> None:
    assert torch.equal(perturb(printouts, (), seed=0), printouts)
    arr = printouts.numpy()
    out = perturb(arr, [], seed=0)
    assert isinstance(out, np.ndarray) and np.array_equal(out, arr)


def test_numpy_in_numpy_out(printouts: torch.Tensor) -> None:
    arr = printouts.numpy().copy()
    arr.setflags(write=False)  # as a read-only memmap of the image cache
    out = perturb(arr, ("grid", "blur"), seed=4)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == arr.shape
    assert np.array_equal(out, perturb(printouts, ("grid", "blur"), seed=4).numpy())


# ----------------------------------------------------------------------------- grid colour


def test_grid_recolour_maps_the_four_colours_and_their_blends() -> None:
    src = SOURCE
    dst = np.array(TARGET, float)
    # Pure colours in four quadrants, and 50/50 and 25/75 blends of paper with each colour.
    img = np.zeros((1, 3, 16, 20))
    for i, (y, x) in enumerate(((0, 0), (0, 8), (8, 0), (8, 8))):
        img[0, :, y:y + 8, x:x + 8] = src[i][:, None, None]
    for i in range(1, 4):
        img[0, :, 4 * i, 17] = 0.5 * src[0] + 0.5 * src[i]
        img[0, :, 4 * i, 18] = 0.25 * src[0] + 0.75 * src[i]
    img = np.rint(img).astype(np.uint8)
    out = perturb(torch.from_numpy(img), ("grid",), seed=0,
                  config=PerturbConfig(palettes=(TARGET,)))
    assert out.dtype == torch.uint8 and out.shape == img.shape
    for i, (y, x) in enumerate(((0, 0), (0, 8), (8, 0), (8, 8))):
        block = out[0, :, y:y + 8, x:x + 8].double()
        assert (block - torch.tensor(dst[i])[:, None, None]).abs().max() <= 1, f"colour {i}"
    for i in range(1, 4):
        for col, w in ((17, 0.5), (18, 0.75)):
            want = torch.tensor((1 - w) * dst[0] + w * dst[i])
            # (the input blend is rounded to uint8, so its image may be off by a little more)
            assert (out[0, :, 4 * i, col].double() - want).abs().max() <= 2, f"blend {i}, {w}"


def recoloured(images: torch.Tensor, palette) -> np.ndarray:
    """The images under the affine map sending the render colours to ``palette``, solved
    here independently (numpy), float [B, H, W, 3] clipped to 0..255."""
    m = np.linalg.solve(np.c_[SOURCE, np.ones(4)], np.array(palette, float))  # (4, 3)
    return np.clip(images.permute(0, 2, 3, 1).numpy().astype(float) @ m[:3] + m[3], 0, 255)


def test_grid_recolour_on_a_printout_is_the_affine_map(printouts: torch.Tensor) -> None:
    out = perturb(printouts, ("grid",), seed=2, config=PerturbConfig(palettes=(TARGET,)))
    assert out.shape == printouts.shape and out.dtype == torch.uint8
    # every pixel, the anti-aliased blends of the grid included
    assert np.abs(out.permute(0, 2, 3, 1).numpy() - recoloured(printouts, TARGET)).max() <= 1
    trace = (printouts == 0).all(dim=1)
    assert trace.sum() > 100 and (out.permute(0, 2, 3, 1)[trace] == torch.tensor(TARGET[3])).all()


def test_grid_draws_one_of_the_palettes(printouts: torch.Tensor) -> None:
    batch = printouts.repeat(4, 1, 1, 1)
    out = perturb(batch, ("grid",), seed=5).permute(0, 2, 3, 1).numpy()
    names = list(GRID_PALETTES)
    errors = np.stack([np.abs(out - recoloured(batch, GRID_PALETTES[n])).reshape(len(out), -1)
                       .max(axis=1) for n in names])  # (palettes, images)
    assert (errors.min(axis=0) <= 1).all(), "an image matches no palette's map"
    assert len(set(errors.argmin(axis=0))) > 2


def test_degenerate_palettes_are_refused(printouts: torch.Tensor) -> None:
    flat = RenderConfig(minor_color=(250, 200, 200), major_color=(250, 200, 200))
    with pytest.raises(DataError, match="one plane"):
        perturb(printouts, ("grid",), seed=0, render=flat)
    # A minor colour far off the paper-to-major line: the map would amplify rounding 10x.
    skewed = (TARGET[0], (150, 230, 120), TARGET[2], TARGET[3])
    with pytest.raises(DataError, match=r"gain \d+\.\d \(> 3\.0\)"):
        perturb(printouts, ("grid",), seed=0, config=PerturbConfig(palettes=(skewed,)))


# ----------------------------------------------------------------------------- geometry


def test_zero_rotation_and_unit_scale_are_identity(printouts: torch.Tensor) -> None:
    still = PerturbConfig(rotate_degrees=0.0, scale=(1.0, 1.0))
    out = perturb(printouts, ("rotate", "scale"), seed=0, config=still)
    assert diff(out, printouts).max() <= 1


def test_rotation_and_zoom_change_the_image(printouts: torch.Tensor) -> None:
    for kind in ("rotate", "scale"):
        assert psnr(perturb(printouts, (kind,), seed=0), printouts) < 30, kind


def test_margins_are_paper_not_black(printouts: torch.Tensor) -> None:
    zoom_out = PerturbConfig(scale=(0.8, 0.8), palettes=(TARGET,))
    out = perturb(printouts, ("scale",), seed=0, config=zoom_out)
    margin = out[:, :, :15, :].reshape(len(out), 3, -1).double()  # 10% of the height is margin
    assert (margin - torch.tensor(RENDER.background, dtype=torch.float64)[:, None]).abs().max() <= 1
    recoloured = perturb(printouts, ("grid", "scale"), seed=0, config=zoom_out)[:, :, :15, :]
    want = torch.tensor(TARGET[0], dtype=torch.float64)[:, None]
    assert (recoloured.reshape(len(out), 3, -1).double() - want).abs().max() <= 1


def test_rotation_is_in_pixel_space_on_a_wide_image() -> None:
    # A dot 30 px right of the centre of a 64x128 image, rotated by 90 degrees, lands 30 px
    # above or below the centre: the rotation is not squashed by the aspect ratio.
    x = torch.zeros(1, 3, 64, 128)
    x[0, :, 31:33, 93:95] = 255.0  # centre (31.5, 63.5) + 30 px in x
    out = _warp(x.clone(), torch.zeros(1, 3), torch.ones(1, dtype=torch.float64),
                torch.full((1,), 90.0, dtype=torch.float64))
    ys, xs = torch.nonzero(out[0, 0] > 128, as_tuple=True)
    assert len(ys) == 4
    assert abs(xs.double().mean().item() - 63.5) < 0.6
    assert abs(abs(ys.double().mean().item() - 31.5) - 30) < 0.6


# ----------------------------------------------------------------------------- photometric


def test_blur_reduces_high_frequency_energy(printouts: torch.Tensor) -> None:
    out = perturb(printouts, ("blur",), seed=0, config=PerturbConfig(blur_sigma=(0.8, 1.2)))
    for before, after in zip(printouts, out):
        assert high_frequency(after) < 0.5 * high_frequency(before)
    assert abs(out.double().mean() - printouts.double().mean()) < 1.0  # a blur moves no ink
    light = perturb(printouts, ("blur",), seed=0)  # the default range starts near no blur
    assert all(high_frequency(a) <= high_frequency(b) for a, b in zip(light, printouts))


def test_jpeg_differs_but_stays_close(printouts: torch.Tensor) -> None:
    out = perturb(printouts, ("jpeg",), seed=0)
    for before, after in zip(printouts, out):
        assert not torch.equal(before, after)
        assert psnr(after, before) > 20
    best = perturb(printouts, ("jpeg",), seed=0, config=PerturbConfig(jpeg_quality=(95, 95)))
    assert psnr(best, printouts) > psnr(out, printouts)


def test_lighting_keeps_the_mean(printouts: torch.Tensor) -> None:
    out = perturb(printouts, ("lighting",), seed=0)
    for before, after in zip(printouts, out):
        assert not torch.equal(before, after)
        assert abs(after.double().mean() - before.double().mean()) < 20
    flat = PerturbConfig(lighting=0.0, brightness=0.0, contrast=0.0)
    assert diff(perturb(printouts, ("lighting",), seed=0, config=flat), printouts).max() <= 1


@pytest.mark.parametrize("factor,darker", [(2.0, True), (3.0, True), (0.5, False)])
def test_line_width(printouts: torch.Tensor, factor: float, darker: bool) -> None:
    out = perturb(printouts, ("line",), seed=0, config=PerturbConfig(line_width=(factor, factor)))
    ink_before = (printouts.double().mean(dim=1) < 100).sum()
    ink_after = (out.double().mean(dim=1) < 100).sum()
    if darker:
        assert ink_after > 1.5 * ink_before
    else:
        assert out.double().mean() > printouts.double().mean() and ink_after < ink_before
    same = perturb(printouts, ("line",), seed=0, config=PerturbConfig(line_width=(1.0, 1.0)))
    assert diff(same, printouts).max() <= 1


# ----------------------------------------------------------------------------- stress set, figure


def test_every_stress_entry_is_uint8_of_the_same_shape(printouts: torch.Tensor) -> None:
    assert list(STRESS_SET) == ["clean", "grid", "line", "rotate", "scale", "blur", "jpeg",
                                "lighting", "all"]
    arr = printouts[:2].numpy()
    for name in STRESS_SET:
        out = stress_images(arr, name, seed=11)
        assert isinstance(out, np.ndarray), name
        assert out.dtype == np.uint8 and out.shape == arr.shape, name
        assert np.array_equal(out, arr) == (name == "clean"), name
    # the same seed, the same perturbed set for every model
    assert np.array_equal(stress_images(arr, "all", seed=11), stress_images(arr, "all", seed=11))
    with pytest.raises(ValueError, match="unknown stress variation 'blurry'; known: clean, grid"):
        stress_images(arr, "blurry", seed=0)


def test_figure_is_a_png(printouts: torch.Tensor, tmp_path) -> None:
    path = perturbation_figure(printouts[0], tmp_path / "figs" / "perturbations.png", seed=1)
    assert path == tmp_path / "figs" / "perturbations.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["perturbations.png"]  # no temporary left


# ----------------------------------------------------------------------------- augmentation


def test_image_augment_p0_is_identity(printouts: torch.Tensor) -> None:
    aug = ImageAugment(p=0.0)
    assert not aug.active
    assert torch.equal(aug(printouts, torch.Generator().manual_seed(0)), printouts)
    assert not ImageAugment(kinds=()).active


def test_image_augment_draws_from_the_generator(printouts: torch.Tensor) -> None:
    aug = ImageAugment(p=1.0)
    assert aug.active
    a = aug(printouts, torch.Generator().manual_seed(5))
    b = aug(printouts, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == printouts.shape
    for before, after in zip(printouts, a):
        assert not torch.equal(before, after), "p=1 left an image unperturbed"
    only_jpeg = ImageAugment(p=1.0, kinds=("jpeg",))(printouts, torch.Generator().manual_seed(0))
    assert all(not torch.equal(x, y) for x, y in zip(printouts, only_jpeg))


def test_image_augment_rates() -> None:
    # Which images get which kinds: tiny images, many of them, only the draws matter.
    x = torch.full((400, 3, 8, 8), 200, dtype=torch.uint8)
    aug = ImageAugment(p=0.5, kinds=("lighting",), config=PerturbConfig(brightness=0.3))
    out = aug(x, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(dim=1).double().mean()
    assert 0.4 < changed < 0.6  # p, as the one kind is always chosen for a perturbed image


# ----------------------------------------------------------------------------- validation


def test_unknown_kind_lists_the_known_ones(printouts: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="unknown perturbation 'rotation'; known: grid, line, "
                                         "scale, rotate, lighting, blur, jpeg"):
        perturb(printouts, ("rotation",), seed=0)
    with pytest.raises(ValueError, match="unknown perturbation 'noise'"):
        ImageAugment(kinds=("noise",))


@pytest.mark.parametrize("kwargs,match", [
    ({"scale": (1.1, 0.9)},
     r"perturb\.scale must satisfy 0\.5 <= low <= high <= 2\.0, got \(1\.1, 0\.9\)"),
    ({"rotate_degrees": -1}, r"perturb\.rotate_degrees must lie in \[0, 45\.0\], got -1"),
    ({"blur_sigma": 3}, r"perturb\.blur_sigma must be a \(low, high\) pair, got 3"),
    ({"jpeg_quality": (10.5, 50)}, r"perturb\.jpeg_quality must be whole numbers"),
    ({"palettes": ((1, 2, 3),)}, r"perturb\.palettes\[0\] must be 4 RGB colours"),
    ({"palettes": ()}, r"perturb\.palettes must be a non-empty"),
    ({"lighting": 1.5}, r"perturb\.lighting must lie in \[0, 0\.9\]"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PerturbConfig(**kwargs)


def test_config_accepts_lists_as_from_yaml() -> None:
    cfg = PerturbConfig(scale=[0.9, 1.1], palettes=[[list(c) for c in TARGET]])
    assert cfg.scale == (0.9, 1.1) and cfg.palettes == (TARGET,)
    hash(cfg)


def test_bad_images_are_refused(printouts: torch.Tensor) -> None:
    with pytest.raises(DataError, match="expected uint8 images, got dtype torch.float32"):
        perturb(printouts.float(), ("blur",), seed=0)
    with pytest.raises(DataError, match=r"images \[B, 3, H, W\].*shape \(3, 224, 224\)"):
        perturb(printouts[0], ("blur",), seed=0)
    with pytest.raises(ValueError, match="augment.p must lie in"):
        ImageAugment(p=1.5)
