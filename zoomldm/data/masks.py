"""Tissue (H&E) and valid-pixel (raster) masks on a slide thumbnail, with O(1) region-fraction queries.

The mask decides which regions are extracted (DESIGN.md §3; the official pipeline uses DS-MIL's tiler with a
tissue threshold, official-implementation.md §2.1). It is computed once per slide on a thumbnail of at most
`max_side` pixels; `Mask.fraction` then answers "what fraction of this base-pixel square is tissue" for
thousands of regions through a summed-area table.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from zoomldm.data.readers import SlideError, SlideReader

log = logging.getLogger(__name__)

WHITE_LEVEL = 220      # all channels >= this: glass / background, never tissue
BLACK_LEVEL = 30       # all channels <= this: pen, slide edge or padding, never tissue
MIN_SATURATION = 0.05  # floor on the Otsu threshold, so a tissue-free slide does not split its noise in two


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """bool (H, W): H&E tissue on an RGB uint8 thumbnail.

    Otsu threshold on the HSV saturation of the whole image (stained tissue is saturated, glass is not), minus
    near-white and near-black pixels, then a 3x3 closing and opening, and objects and holes smaller than
    max(16, 1e-4 * H * W) pixels removed / filled.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"tissue_mask expects an (H, W, 3) RGB image, got shape {rgb.shape}")
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = hsv_saturation(rgb, hi, lo)
    usable = (lo < WHITE_LEVEL) & (hi > BLACK_LEVEL)
    if np.ptp(sat) < 1e-6 or not usable.any():
        return np.zeros(rgb.shape[:2], dtype=bool)
    mask = (sat > max(threshold_otsu(sat), MIN_SATURATION)) & usable
    st = np.ones((3, 3), dtype=bool)
    padded = np.pad(mask, 1, mode="edge")  # no erosion artefacts at the image border
    mask = ndimage.binary_opening(ndimage.binary_closing(padded, st), st)[1:-1, 1:-1]
    min_px = max(16, int(1e-4 * mask.size))
    mask = _drop_small(mask, min_px)
    return ~_drop_small(~mask, min_px)  # fill small holes (nuclei-free lumen, fat) inside tissue


def hsv_saturation(rgb: np.ndarray, hi: np.ndarray | None = None, lo: np.ndarray | None = None) -> np.ndarray:
    """HSV saturation (max - min) / max in [0, 1], 0 for black: skimage's rgb2hsv(rgb)[..., 1], faster."""
    hi = rgb.max(axis=-1) if hi is None else hi
    lo = rgb.min(axis=-1) if lo is None else lo
    hi = hi.astype(np.float32)
    return np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def valid_mask(rgb: np.ndarray, nodata_value: int = 0) -> np.ndarray:
    """bool (H, W): pixels that are not `nodata_value` in every channel (rasters: outside the footprint)."""
    return np.any(np.asarray(rgb) != nodata_value, axis=-1)


@dataclass
class Mask:
    """A boolean mask on a thumbnail of a slide.

    Mask pixel (i, j) covers the base pixels [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds), ds = `downsample`."""

    array: np.ndarray   # bool (h, w)
    downsample: float   # base pixels per mask pixel
    _sat: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.array = np.asarray(self.array, dtype=bool)
        sat = np.zeros((self.array.shape[0] + 1, self.array.shape[1] + 1), dtype=np.float64)
        sat[1:, 1:] = self.array.cumsum(axis=0).cumsum(axis=1)  # sat[i, j] = array[:i, :j].sum()
        self._sat = sat

    def _integral(self, v: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Area of the mask in [0, v) x [0, u) for real (v, u) in mask pixels. The integral of a piecewise-
        constant image is bilinear inside each pixel, so bilinear interpolation of the summed-area table is
        exact."""
        h, w = self.array.shape
        v, u = np.clip(v, 0, h), np.clip(u, 0, w)
        i = np.clip(np.floor(v).astype(np.int64), 0, h - 1)
        j = np.clip(np.floor(u).astype(np.int64), 0, w - 1)
        tv, tu, s = v - i, u - j, self._sat
        return ((1 - tv) * ((1 - tu) * s[i, j] + tu * s[i, j + 1])
                + tv * ((1 - tu) * s[i + 1, j] + tu * s[i + 1, j + 1]))

    def fraction(self, x, y, size):
        """Fraction of the base-pixel square [x, x+size) x [y, y+size) that is masked (area-weighted; parts
        outside the image count as unmasked). Scalars give a float; arrays broadcast and give an array."""
        ds = self.downsample
        u0, v0 = np.asarray(x, dtype=np.float64) / ds, np.asarray(y, dtype=np.float64) / ds
        side = np.asarray(size, dtype=np.float64) / ds
        u1, v1 = u0 + side, v0 + side
        area = (self._integral(v1, u1) - self._integral(v0, u1) - self._integral(v1, u0)
                + self._integral(v0, u0))
        frac = np.clip(area / (side * side), 0.0, 1.0)
        return float(frac) if frac.ndim == 0 else frac


def build_mask(reader: SlideReader, kind: str = "tissue", max_side: int = 2048) -> Mask:
    """Tissue ("tissue": H&E slides) or valid-pixel ("valid": rasters, not 0 in every channel) mask of a
    slide, computed on its thumbnail of at most `max_side` pixels."""
    if kind not in ("tissue", "valid"):
        raise ValueError(f"unknown mask kind {kind!r}; choose 'tissue' or 'valid'")
    thumb, ds = reader.thumbnail(max_side)
    if kind == "tissue":
        array = tissue_mask(thumb)
        if not array.any():
            log.warning("%s: no tissue found", reader.path)
    else:
        array = valid_mask(thumb, nodata_value=0)
        if not array.any():
            raise SlideError(f"{reader.path}: no valid pixels (every pixel equals the nodata value 0)")
    return Mask(array, ds)
