"""Deterministic picks of store regions, and real LR/HR pairs (a low-magnification region and its base tiles
assembled at full resolution): used by sampling (conditioning regions, SR inputs) and by evaluation (real large
images for CLIP-FID)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zoomldm import mags
from zoomldm.diffusion.noise import item_seed


def pick_rows(n_rows: int, items: Sequence[int], seed: int, *tags: int | str) -> np.ndarray:
    """Store rows for items: item i -> perm[i mod n_rows], perm a permutation seeded by (seed, tags). Item i's
    row depends only on (seed, tags, i); every region is used once before any repeats."""
    if n_rows < 1:
        raise ValueError("pick_rows: the store table is empty")
    perm = np.random.default_rng(item_seed(seed, 0, "rows", *tags)).permutation(n_rows)
    return perm[np.asarray(items, dtype=np.int64) % n_rows]


def sr_pairs(store, lr_mag: str, n: int, seed: int):
    """n (LR uint8 (P, P, 3), HR uint8 (g·P, g·P, 3), source dict) test pairs from the store: regions of `lr_mag`,
    picked by `pick_rows` (tags ("sr", mag)), those whose every base tile is a base region with an image first;
    HR = those tiles assembled. A region with base tiles missing from the store (mask fraction below the
    threshold) gets black HR tiles there and `hr_complete: false` in its source; with fewer than n regions
    the list repeats."""
    table, base = store.table(lr_mag), store.table(mags.ladder(store.ladder)[0].name)
    if not (table.has("images") and base.has("images")):
        raise ValueError(f"{store.root}: SR inputs need region images (dataset.store_images: true)")
    g = table.magnification.tiles_per_side
    where = {(s, int(r), int(c)): i for i, (s, r, c) in
             enumerate(zip(base.manifest["slide"], base.manifest["row0"], base.manifest["col0"]))}

    def cells(row):
        rec = table.manifest.iloc[int(row)]
        return [where.get((rec["slide"], int(rec["row0"]) + a, int(rec["col0"]) + b))
                for a in range(g) for b in range(g)]
    picked = pick_rows(len(table), range(len(table)), seed, "sr", lr_mag)
    complete = [int(r) for r in picked if None not in cells(r)]
    order = complete + [int(r) for r in picked if int(r) not in set(complete)]
    for k in range(n):
        row = order[k % len(order)]
        rec, found = table.manifest.iloc[row], cells(row)
        lr = np.asarray(table.get("images", row))
        p = lr.shape[0]
        tiles = np.stack([np.asarray(base.get("images", c)) if c is not None else np.zeros_like(lr)
                          for c in found])                                           # (g², P, P, 3)
        hr = tiles.reshape(g, g, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * p, g * p, 3)
        yield lr, hr, {"slide": str(rec["slide"]), "row0": int(rec["row0"]), "col0": int(rec["col0"]),
                       "mag": lr_mag, "grid": g, "store_row": row, "hr_complete": None not in found,
                       "hr_missing_tiles": sum(c is None for c in found)}
