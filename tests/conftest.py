"""Shared test fixtures: small synthetic images and slide files written on the fly (nothing is downloaded)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage


def make_he(h: int = 600, w: int = 700, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth H&E-like RGB uint8 image: a pink (eosin) ellipse with purple (haematoxylin) patches on white
    glass. Returns (rgb (h, w, 3) uint8, tissue (h, w) bool: the ellipse). Fresh copies of a cached result."""
    rgb, tissue = _make_he(h, w, seed)
    return rgb.copy(), tissue.copy()


@functools.lru_cache(maxsize=8)
def _make_he(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = ((yy - h / 2) / (0.38 * h)) ** 2 + ((xx - w / 2) / (0.36 * w)) ** 2 <= 1.0
    # Smooth random field in [0, 1] decides eosin vs haematoxylin.
    field = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=12)
    field = (field - field.min()) / (np.ptp(field) + 1e-12)
    pink, purple, glass = np.array([235, 150, 190]), np.array([120, 60, 150]), np.array([246, 244, 247])
    stain = pink + (purple - pink) * np.clip(1.6 * field - 0.3, 0, 1)[..., None]
    rgb = np.where(tissue[..., None], stain, glass)
    rgb = ndimage.gaussian_filter(rgb, sigma=(1.5, 1.5, 0))  # soft tissue edge
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), tissue


def block_mean_pyramid(base: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Levels made by exact 2x2 means (sizes rounded down), as scanners and `vips tiffsave --pyramid` do."""
    levels = [base]
    for _ in range(n_levels - 1):
        a = levels[-1].astype(np.float64)
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))  # (h/2, w/2, C)
        levels.append(np.round(a).astype(base.dtype))
    return levels


def write_pyramid(path: str | Path, base: np.ndarray, n_levels: int = 3, compression: str = "zlib",
                  mpp: float | None = 0.5, tile: int = 256) -> Path:
    """A tiled pyramidal RGB TIFF (environment-probe.md §3 recipe); OpenSlide reads it as generic-tiff."""
    import tifffile

    path = Path(path)
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(block_mean_pyramid(base, n_levels)):
            kw = {}
            if mpp is not None:  # pixels per centimetre
                kw = dict(resolution=(1e4 / (mpp * 2 ** i),) * 2, resolutionunit="CENTIMETER")
            tw.write(level, tile=(tile, tile), compression=compression, photometric="rgb",
                     subfiletype=0 if i == 0 else 1, **kw)
    return path


@pytest.fixture
def he_rgb() -> np.ndarray:
    """600 x 700 synthetic H&E-like RGB uint8 image (tissue ellipse on white)."""
    return make_he()[0]


@pytest.fixture
def pyramid_tiff(tmp_path) -> Path:
    """3-level (1.0, 2.0, 4.0) zlib pyramid TIFF of a 1000 x 1234 synthetic H&E image, mpp 0.5 (20x).
    The base array is `make_he(1000, 1234)[0]`."""
    return write_pyramid(tmp_path / "pyramid.tif", make_he(1000, 1234)[0])


def fake_part(root, slide, counts, seed, P=16, C=6, latents=False):
    """A store part with random images/grids (and latents) for the given {magnification: count}."""
    import pandas as pd
    from zoomldm import mags
    from zoomldm.data import store as st
    rng = np.random.default_rng(seed)
    per_mag = {}
    for name, n in counts.items():
        m = mags.find("brca", name)
        g = m.grid_side
        per_mag[m.slug] = {
            "images": rng.integers(0, 256, size=(n, P, P, 3), dtype=np.uint8),
            "grids": rng.normal(size=(n, C, g, g)).astype(np.float16),
            **({"latents": rng.normal(size=(n, 3, P // 4, P // 4)).astype(np.float16)} if latents else {}),
            "index": pd.DataFrame({"slide": slide, "magnification": m.name, "mag_index": m.index,
                                   "x": np.arange(n) * 10, "y": np.arange(n), "row0": 0, "col0": np.arange(n),
                                   "mask_fraction": np.float32(1.0)}),
        }
    meta = {"slide": slide, "status": "ok", "counts": counts,
            "encoder": {"name": "fake", "dim": C, "is_standin": True}}
    st.write_part(root / slide, meta, per_mag)
    return per_mag


def toy_regions(slide: str, mag: str, step: int, P: int, rows: int, cols: int, missing=()):
    """The regions of one magnification on a rows x cols base-tile slide, for hand-made store parts:
    (the Magnification, origins, index). origins: the top-left base tile (row, col) of every
    tiles_per_side-square region, every `step` tiles, row-major, except those in `missing`; index: the part's
    index DataFrame (x, y = origin * P). Draws no random numbers."""
    import pandas as pd
    from zoomldm import mags
    m = mags.find("brca", mag)
    n = m.tiles_per_side
    origins = [(r, c) for r in range(0, rows - n + 1, step) for c in range(0, cols - n + 1, step)
               if (r, c) not in missing]
    index = pd.DataFrame({"slide": slide, "magnification": m.name, "mag_index": m.index,
                          "x": [c * P for _, c in origins], "y": [r * P for r, _ in origins],
                          "row0": [r for r, _ in origins], "col0": [c for _, c in origins],
                          "mask_fraction": np.float32(1.0)})
    return m, origins, index


def perturb(*modules, scale: float = 0.05, seed: int | None = None) -> None:
    """Random weights everywhere (the presets zero-init output layers, which would make every output 0): adds
    scale * N(0, 1) to every parameter, drawn from torch's global generator, or from a fresh one seeded with
    `seed` when given."""
    import torch

    g = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in modules:
            for p in mod.parameters():
                noise = torch.randn_like(p) if g is None else torch.randn(p.shape, generator=g)
                p.add_(noise, alpha=scale)


# ---------------------------------------------------------------------------------------------------------
# Shared by the model and converter tests.

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny CPU models: a second intra-op thread only adds OpenMP contention on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the relative error the parity acceptance (<= 1e-5) is stated in."""
    return ((a - b).abs().max() / b.abs().max()).item()


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1
