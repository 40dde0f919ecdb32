"""Per-slide extraction: mask -> kept regions at every magnification -> tile embeddings -> a store part.

Each base tile is embedded once; a region's conditioning is the avg-pool of the tiles it covers
(DESIGN.md §3). Only tiles inside at least one kept region are embedded (the others are never read).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from zoomldm import mags
from zoomldm.config import DatasetConfig
from zoomldm.data import store
from zoomldm.data.regions import TileGrid, block_mean, pooled_grid, region_origins

log = logging.getLogger(__name__)


def slide_id(path: str | Path) -> str:
    """The slide's name in manifests: its file name without the extension(s)."""
    name = Path(path).name
    return name.split(".")[0] if not name.startswith(".") else name


def slide_factor(reader, cfg: DatasetConfig) -> float:
    """Slide level-0 pixels per base pixel of the ladder (2 for a 40x slide on the 20x BRCA ladder)."""
    base = mags.BASE_MAGNIFICATION[cfg.ladder]
    if base is None:  # ladders defined at the raster's native resolution (NAIP)
        return 1.0
    slide_mag = cfg.base_mag or reader.base_mag or cfg.fallback_base_mag
    if slide_mag is None:
        from zoomldm.data.readers import SlideError
        raise SlideError(f"{reader.path}: base magnification unknown (no objective power or mpp in the "
                         f"metadata); set dataset.base_mag or dataset.fallback_base_mag")
    return float(slide_mag) / base


def plan_regions(grid: TileGrid, tile_fraction: np.ndarray, cfg: DatasetConfig,
                 rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Kept region origins (r, c) and their mask fractions per magnification name."""
    plan = {}
    for m in cfg.magnification_list():
        origins = region_origins(grid, m, cfg.stride_for(m))
        frac = block_mean(tile_fraction, origins[:, 0], origins[:, 1], m.tiles_per_side) if len(origins) \
            else np.zeros(0)
        keep = frac >= cfg.min_fraction_for(m) - 1e-9
        origins, frac = origins[keep], frac[keep]
        if cfg.max_regions_per_slide is not None and len(origins) > cfg.max_regions_per_slide:
            pick = np.sort(rng.choice(len(origins), cfg.max_regions_per_slide, replace=False))
            origins, frac = origins[pick], frac[pick]
        plan[m.name] = (origins, frac)
    return plan


def extract_slide(path: str | Path, part_dir: str | Path, cfg: DatasetConfig, encoder,
                  batch_size: int = 64, progress: bool = True) -> dict:
    """Extract one slide into `part_dir`. Returns the part's metadata. Raises SlideError on a bad slide."""
    from zoomldm.data.masks import build_mask
    from zoomldm.data.readers import open_slide

    path, part_dir = Path(path), Path(part_dir)
    name = slide_id(path)
    with open_slide(path) as reader:
        factor = slide_factor(reader, cfg)
        grid = TileGrid.for_slide(reader.width, reader.height, cfg.patch_px, factor)
        if cfg.mask == "none":
            tile_fraction = np.ones((grid.rows, grid.cols))
        else:
            mask = build_mask(reader, cfg.mask)
            tile_fraction = np.array([[mask.fraction(*grid.origin(r, c), round(grid.tile))
                                       for c in range(grid.cols)] for r in range(grid.rows)]).reshape(
                grid.rows, grid.cols)
        rng = np.random.default_rng([cfg.seed, _stable_hash(name)])
        plan = plan_regions(grid, tile_fraction, cfg, rng)

        # Embed every base tile that some kept region covers, once.
        needed = np.zeros((grid.rows, grid.cols), dtype=bool)
        for mname, (origins, _) in plan.items():
            n = mags.find(cfg.ladder, mname).tiles_per_side
            for r, c in origins:
                needed[r:r + n, c:c + n] = True
        tiles = np.zeros((grid.rows, grid.cols, encoder.dim), dtype=np.float16)
        rc = np.argwhere(needed)
        for i in tqdm(range(0, len(rc), batch_size), desc=f"embed {name}", disable=not progress,
                      unit_scale=batch_size, unit="tile"):
            chunk = rc[i:i + batch_size]
            imgs = np.stack([reader.read_region(*grid.origin(r, c), round(grid.tile), cfg.patch_px)
                             for r, c in chunk])
            tiles[chunk[:, 0], chunk[:, 1]] = encoder.embed(imgs, batch_size=batch_size).astype(np.float16)

        per_mag, counts = {}, {}
        for mname, (origins, frac) in plan.items():
            m = mags.find(cfg.ladder, mname)
            counts[mname] = len(origins)
            if not len(origins):
                continue
            side = round(grid.tile * m.tiles_per_side)
            xy = np.array([grid.origin(r, c) for r, c in origins]).reshape(-1, 2)
            arrays = {
                "grids": np.stack([pooled_grid(tiles, r, c, m) for r, c in origins]).astype(np.float16),
                "index": pd.DataFrame({"slide": name, "magnification": m.name, "mag_index": m.index,
                                       "x": xy[:, 0], "y": xy[:, 1], "row0": origins[:, 0],
                                       "col0": origins[:, 1], "mask_fraction": frac.astype(np.float32)}),
            }
            if cfg.store_images:
                arrays["images"] = np.stack([
                    reader.read_region(x, y, side, cfg.patch_px)
                    for x, y in tqdm(xy, desc=f"regions {name} {m.name}", disable=not progress, leave=False)])
            per_mag[m.slug] = arrays
    meta = {"slide": name, "path": str(path), "status": "ok", "factor": factor, "rows": grid.rows,
            "cols": grid.cols, "tiles_embedded": int(needed.sum()), "counts": counts,
            "encoder": {"name": encoder.name, "dim": encoder.dim, "is_standin": encoder.is_standin}}
    store.write_part(part_dir, meta, per_mag, tiles=tiles)
    return meta


def write_failed_part(part_dir: str | Path, path: str | Path, reason: str) -> dict:
    """Record a slide that could not be read, so the store build and the tables report it."""
    meta = {"slide": slide_id(path), "path": str(path), "status": "failed", "reason": reason, "counts": {}}
    store.write_part(Path(part_dir), meta, {})
    return meta


def _stable_hash(s: str) -> int:
    import zlib
    return zlib.crc32(s.encode())
