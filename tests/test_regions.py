"""Region geometry and pooling against brute-force references."""
import numpy as np
import pytest

from zoomldm import mags
from zoomldm.data.regions import TileGrid, block_mean, pooled_grid, region_origins, standardize_tokens


@pytest.mark.parametrize("mag", mags.ladder("brca"))
def test_pooled_grid_is_the_avg_pool_of_its_tiles(mag):
    rng = np.random.default_rng(0)
    n = mag.tiles_per_side
    tiles = rng.normal(size=(n + 3, n + 2, 5)).astype(np.float32)
    r, c = 2, 1
    got = pooled_grid(tiles, r, c, mag)
    g = mag.grid_side
    k = n // g
    want = np.empty((5, g, g))
    for i in range(g):
        for j in range(g):
            want[:, i, j] = tiles[r + i * k:r + (i + 1) * k, c + j * k:c + (j + 1) * k].reshape(-1, 5).mean(0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (5, g, g)


def test_region_counts_follow_the_geometry():
    grid = TileGrid.for_slide(width=2220, height=2967, patch_px=64, factor=1.0)
    assert (grid.rows, grid.cols) == (46, 34)
    for m in mags.ladder("brca"):
        for stride in (1, 2, m.tiles_per_side):
            n = m.tiles_per_side
            want = max(0, (46 - n) // stride + 1) * max(0, (34 - n) // stride + 1) if n <= 34 else 0
            assert len(region_origins(grid, m, stride)) == want


def test_forty_x_slide_uses_twice_the_pixels():
    grid = TileGrid.for_slide(width=4096, height=2048, patch_px=256, factor=2.0)
    assert (grid.rows, grid.cols, grid.tile) == (4, 8, 512.0)
    assert grid.origin(1, 3) == (1536, 512)


def test_block_mean_matches_brute_force():
    a = np.random.default_rng(1).random((9, 7))
    r, c = np.array([0, 3, 5]), np.array([0, 2, 3])
    got = block_mean(a, r, c, 4)
    want = [a[i:i + 4, j:j + 4].mean() for i, j in zip(r, c)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_standardize_tokens_is_per_location_over_channels():
    g = np.random.default_rng(2).normal(3.0, 5.0, size=(16, 4, 4))
    z = standardize_tokens(g)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(z.std(axis=0, ddof=1), 1, atol=1e-6)
