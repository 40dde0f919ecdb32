"""Masks: tissue detection on synthetic H&E, summed-area-table fractions vs. brute force, valid rasters."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import make_he
from skimage.color import rgb2hsv

from zoomldm.data.masks import Mask, build_mask, hsv_saturation, tissue_mask, valid_mask
from zoomldm.data.readers import SlideError, open_slide


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_tissue_mask_finds_the_blob():
    rgb, truth = make_he(300, 400, seed=3)
    rng = np.random.default_rng(0)  # a little scanner noise on glass and tissue
    noisy = np.clip(rgb.astype(np.int16) + rng.integers(-4, 5, rgb.shape), 0, 255).astype(np.uint8)
    mask = tissue_mask(noisy)
    assert mask.dtype == bool and mask.shape == truth.shape
    assert _iou(mask, truth) > 0.9


def test_tissue_mask_ignores_black_and_blank():
    rgb, truth = make_he(200, 200)
    rgb[:20, :] = 5  # black slide edge / pen: never tissue
    assert not tissue_mask(rgb)[:20].any()
    assert not tissue_mask(np.full((50, 60, 3), 245, np.uint8)).any()  # glass only


def test_saturation_matches_skimage():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3)).astype(np.uint8)
    rgb[0, 0] = 0
    np.testing.assert_allclose(hsv_saturation(rgb), rgb2hsv(rgb)[..., 1], atol=1e-6)


@pytest.mark.parametrize("ds", [1.0, 4.0])
def test_fraction_equals_brute_force(ds):
    rng = np.random.default_rng(1)
    arr = rng.random((37, 53)) < 0.4
    mask = Mask(arr, downsample=ds)
    k = int(ds)
    base = np.kron(arr, np.ones((k, k), dtype=bool))  # the mask at base resolution (nearest neighbour)
    H, W = base.shape
    padded = np.zeros((H + 400, W + 400), dtype=bool)  # 200 px of "outside" on each side
    padded[200:200 + H, 200:200 + W] = base
    xs = rng.integers(-60, W, 40)
    ys = rng.integers(-60, H, 40)
    sizes = rng.integers(1, 120, 40)
    for x, y, s in zip(xs, ys, sizes):
        ref = padded[200 + y:200 + y + s, 200 + x:200 + x + s].mean()
        assert mask.fraction(int(x), int(y), int(s)) == pytest.approx(ref, abs=1e-9)
    # Vectorised queries give the same numbers.
    vec = mask.fraction(xs, ys, sizes)
    assert vec.shape == (40,)
    np.testing.assert_allclose(vec, [mask.fraction(int(x), int(y), int(s)) for x, y, s in zip(xs, ys, sizes)])


def test_build_tissue_mask_on_a_slide(pyramid_tiff):
    truth = make_he(1000, 1234)[1]
    with open_slide(pyramid_tiff) as r:
        mask = build_mask(r, "tissue", max_side=300)
    assert mask.array.shape == (243, 300) and mask.downsample == pytest.approx(1234 / 300)
    assert mask.fraction(517, 400, 200) == pytest.approx(1.0)  # centre of the tissue ellipse
    assert mask.fraction(0, 0, 100) == 0.0      # glass in the corner
    # Tile fractions agree with the ground-truth ellipse.
    xs, ys = np.meshgrid(np.arange(0, 1234 - 64, 64), np.arange(0, 1000 - 64, 64))
    got = mask.fraction(xs.ravel(), ys.ravel(), 64)
    ref = np.array([truth[y:y + 64, x:x + 64].mean() for x, y in zip(xs.ravel(), ys.ravel())])
    assert np.abs(got - ref).mean() < 0.03


def test_valid_mask_and_nodata_raster(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[5:, 10:] = (10, 0, 0)
    np.testing.assert_array_equal(valid_mask(rgb), np.pad(np.ones((25, 30), bool), ((5, 0), (10, 0))))
    other = np.full((4, 5, 3), 10, np.uint8)
    other[1, 2, 2] = 11  # nodata only when every channel equals it
    np.testing.assert_array_equal(valid_mask(other, nodata_value=10), other[..., 2] == 11)

    raster = np.zeros((120, 160, 3), np.uint16)
    raster[:, 80:] = 3000
    tifffile.imwrite(tmp_path / "half.tif", raster, photometric="rgb")
    with open_slide(tmp_path / "half.tif") as r:
        mask = build_mask(r, "valid")
    assert mask.fraction(0, 0, 80) == 0.0 and mask.fraction(80, 0, 80) == pytest.approx(1.0)

    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((64, 64, 3), np.uint16), photometric="rgb")
    with open_slide(tmp_path / "empty.tif") as r, pytest.raises(SlideError) as err:
        build_mask(r, "valid")
    msg = str(err.value)
    assert "empty.tif" in msg and "no valid pixels" in msg and "\n" not in msg


def test_unknown_mask_kind(pyramid_tiff):
    with open_slide(pyramid_tiff) as r, pytest.raises(ValueError, match="unknown mask kind"):
        build_mask(r, "otsu")
