"""Region geometry: base tiles, multi-scale regions on the tile grid, and their pooled conditioning grids.

All regions are aligned to the base-tile grid, so a scale-s region is exactly the 2^s x 2^s block of base tiles
it covers (official README: "a 2048 x 2048 image -> 64 patches of 256 x 256 -> 64 x 1024 UNI embedding").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoomldm import mags


@dataclass(frozen=True)
class TileGrid:
    """The base-tile grid of one slide, in slide level-0 pixels."""
    rows: int
    cols: int
    tile: float   # side of one base tile in slide level-0 pixels (= patch_px * slide_mag / ladder_base_mag)

    @classmethod
    def for_slide(cls, width: int, height: int, patch_px: int, factor: float) -> TileGrid:
        tile = patch_px * factor
        return cls(rows=int(height // tile), cols=int(width // tile), tile=tile)

    def origin(self, r: int, c: int) -> tuple[int, int]:
        """Top-left (x, y) of tile (r, c) in slide pixels."""
        return round(c * self.tile), round(r * self.tile)


def region_origins(grid: TileGrid, m: mags.Magnification, stride_tiles: int) -> np.ndarray:
    """Top-left tiles (r, c) of every scale-m region that fits in the grid, row-major. Shape (n, 2)."""
    n = m.tiles_per_side
    rs = np.arange(0, grid.rows - n + 1, stride_tiles)
    cs = np.arange(0, grid.cols - n + 1, stride_tiles)
    if len(rs) == 0 or len(cs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    rr, cc = np.meshgrid(rs, cs, indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int64)


def block_mean(a: np.ndarray, r: np.ndarray, c: np.ndarray, n: int) -> np.ndarray:
    """Mean of a[r:r+n, c:c+n] for many (r, c) at once, through a summed-area table. a: (rows, cols)."""
    sat = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(a, axis=0), axis=1)
    total = sat[r + n, c + n] - sat[r, c + n] - sat[r + n, c] + sat[r, c]
    return total / (n * n)


def pooled_grid(tiles: np.ndarray, r: int, c: int, m: mags.Magnification) -> np.ndarray:
    """Conditioning grid of one region: the avg-pool of its tile embeddings to at most MAX_GRID per side.

    tiles: (rows, cols, C) embeddings of every base tile. Returns (C, g, g) with g = m.grid_side.
    """
    n, g = m.tiles_per_side, m.grid_side
    block = tiles[r:r + n, c:c + n].astype(np.float32)                 # (n, n, C)
    k = n // g
    pooled = block.reshape(g, k, g, k, -1).mean(axis=(1, 3))           # (g, g, C)
    return np.ascontiguousarray(pooled.transpose(2, 0, 1))             # (C, g, g)


TOKEN_EPS = 1e-8


def standardize_tokens(grid: np.ndarray, eps: float = TOKEN_EPS, axis: int = 0) -> np.ndarray:
    """Per-token standardisation across channels (official `normalize_ssl`): channels on `axis`.

    Subtract each location's channel mean and divide by its unbiased channel std + eps (a LayerNorm without
    affine parameters; official ldm/data/brca.py).
    """
    mean = grid.mean(axis=axis, keepdims=True)
    std = grid.std(axis=axis, ddof=1, keepdims=True)
    return (grid - mean) / (std + eps)
