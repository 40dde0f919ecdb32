"""The sharded region store: array shards plus a parquet manifest per (dataset, magnification).

Layout (never one file per sample; the official layout has 16 M .npy files):
```
<root>/store.json                       # ladder, patch_px, encoder (name, dim, stand-in?), counts per magnification
<root>/<mag_slug>/manifest.parquet      # slide, magnification, mag_index, x, y, row0, col0, mask_fraction, shard, row
<root>/<mag_slug>/images-00000.npy      # uint8 (n, P, P, 3)       (optional: dataset.store_images)
<root>/<mag_slug>/grids-00000.npy       # float16 (n, C, g, g)     pooled SSL grid, not yet standardised
<root>/<mag_slug>/latents-00000.npy     # float16 (n, 3, P/4, P/4) VQ-f4 latents, added by `add_array`
```
Shards are filled in order, so sample i of a magnification lives in shard i // shard_size, row i % shard_size.
Extraction writes one *part* per slide (same arrays, one folder, written atomically); `build_store` packs the
parts into shards. A part that exists is never recomputed, so an interrupted extraction resumes per slide.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from zoomldm import mags

ARRAYS = ("images", "grids", "latents")
MANIFEST_COLUMNS = ["slide", "magnification", "mag_index", "x", "y", "row0", "col0", "mask_fraction",
                    "shard", "row"]


class StoreError(ValueError):
    """The store is missing, incomplete or lacks an array that was asked for."""


# ---------------------------------------------------------------------------------------------------------
# Parts (one per slide)

def part_done(part_dir: Path) -> bool:
    return (Path(part_dir) / "part.json").is_file()


def write_part(part_dir: Path, meta: dict, per_mag: dict[str, dict[str, np.ndarray | pd.DataFrame]],
               tiles: np.ndarray | None = None) -> None:
    """Write a slide's part atomically: into a temporary sibling folder, then rename."""
    part_dir = Path(part_dir)
    tmp = part_dir.with_name(part_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if tiles is not None:
        np.save(tmp / "tiles.npy", tiles)
    for slug, arrays in per_mag.items():
        (tmp / slug).mkdir()
        for name, value in arrays.items():
            if isinstance(value, pd.DataFrame):
                value.to_parquet(tmp / slug / f"{name}.parquet", index=False)
            else:
                np.save(tmp / slug / f"{name}.npy", value)
    (tmp / "part.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(part_dir, ignore_errors=True)
    os.replace(tmp, part_dir)


def read_part_meta(part_dir: Path) -> dict:
    return json.loads((Path(part_dir) / "part.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# Packing parts into shards

def build_store(parts: list[Path], root: Path, ladder: str, patch_px: int, shard_size: int,
                encoder: dict, progress: bool = False) -> dict[str, int]:
    """Pack slide parts into the sharded store at `root` (rebuilt from scratch). Returns counts per mag."""
    root = Path(root)
    parts = sorted((Path(p) for p in parts if part_done(p)), key=lambda p: p.name)
    tmp_root = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp_root, ignore_errors=True)
    tmp_root.mkdir(parents=True)
    counts, slides = {}, []
    for p in parts:
        meta = read_part_meta(p)
        if meta.get("status") == "ok":
            slides.append(meta["slide"])
    for m in mags.ladder(ladder):
        frames = []
        for p in parts:
            f = p / m.slug / "index.parquet"
            if f.is_file():
                df = pd.read_parquet(f)
                if len(df):
                    frames.append((p, df))
        n = sum(len(df) for _, df in frames)
        if n == 0:
            continue
        counts[m.name] = n
        out = tmp_root / m.slug
        out.mkdir()
        manifest = pd.concat([df for _, df in frames], ignore_index=True)
        manifest["shard"] = np.arange(n) // shard_size
        manifest["row"] = np.arange(n) % shard_size
        manifest[MANIFEST_COLUMNS].to_parquet(out / "manifest.parquet", index=False)
        for name in ARRAYS:
            sources = [p / m.slug / f"{name}.npy" for p, _ in frames]
            if all(s.is_file() for s in sources):
                _pack(sources, out, name, n, shard_size)
    info = {"ladder": ladder, "patch_px": patch_px, "shard_size": shard_size, "encoder": encoder,
            "counts": counts, "slides": slides}
    (tmp_root / "store.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp_root, root)
    return counts


def _pack(sources: list[Path], out: Path, name: str, n: int, shard_size: int) -> None:
    """Stream part arrays into shards without holding more than one part in memory."""
    first = np.load(sources[0], mmap_mode="r")
    shards = [np.lib.format.open_memmap(out / f"{name}-{s:05d}.npy", mode="w+", dtype=first.dtype,
                                        shape=(min(shard_size, n - s * shard_size), *first.shape[1:]))
              for s in range((n + shard_size - 1) // shard_size)]
    i = 0
    for src in sources:
        a = np.load(src, mmap_mode="r")
        j = 0
        while j < len(a):
            s, r = divmod(i, shard_size)
            k = min(len(a) - j, shard_size - r)
            shards[s][r:r + k] = a[j:j + k]
            i, j = i + k, j + k
    for sh in shards:
        sh.flush()


# ---------------------------------------------------------------------------------------------------------
# Reading

@dataclass
class MagTable:
    """One magnification of a store: its manifest and lazily memory-mapped shards."""
    root: Path
    magnification: mags.Magnification
    manifest: pd.DataFrame
    shard_size: int

    def __post_init__(self):
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.manifest)

    def has(self, name: str) -> bool:
        return (self.root / f"{name}-00000.npy").is_file()

    def shard(self, name: str, s: int) -> np.ndarray:
        key = (name, s)
        if key not in self._maps:
            path = self.root / f"{name}-{s:05d}.npy"
            if not path.is_file():
                raise StoreError(f"{path}: missing ({name} of {self.magnification.name} not in the store)")
            self._maps[key] = np.load(path, mmap_mode="r")
        return self._maps[key]

    def get(self, name: str, i: int) -> np.ndarray:
        s, r = divmod(i, self.shard_size)
        return self.shard(name, s)[r]

    def __getstate__(self):  # DataLoader workers re-open their own memory maps
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


class RegionStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        info_path = self.root / "store.json"
        if not info_path.is_file():
            raise StoreError(f"{self.root}: not a region store (no store.json); run `zoomldm data build-store`")
        self.info = json.loads(info_path.read_text())
        self.ladder = self.info["ladder"]
        self.patch_px = self.info["patch_px"]
        self.tables: dict[str, MagTable] = {}
        for name in self.info["counts"]:
            m = mags.find(self.ladder, name)
            manifest = pd.read_parquet(self.root / m.slug / "manifest.parquet")
            self.tables[m.name] = MagTable(self.root / m.slug, m, manifest, self.info["shard_size"])

    @property
    def magnifications(self) -> list[mags.Magnification]:
        return [t.magnification for t in self.tables.values()]

    def table(self, mag: str | int) -> MagTable:
        m = mags.find(self.ladder, mag)
        if m.name not in self.tables:
            raise StoreError(f"{self.root}: magnification {m.name} has no samples in this store "
                             f"(it has {', '.join(self.tables) or 'none'})")
        return self.tables[m.name]

    def add_array(self, name: str, fn: Callable[[np.ndarray], np.ndarray], source: str = "images",
                  batch: int = 64, progress: bool = False) -> None:
        """Add (or resume adding) an array computed batch-wise from another, e.g. VQ latents from images.

        Each shard is written to a temporary file and renamed when complete, so an interrupted run resumes
        at the first missing shard.
        """
        from tqdm.auto import tqdm
        for t in self.tables.values():
            n_shards = (len(t) + t.shard_size - 1) // t.shard_size
            for s in tqdm(range(n_shards), desc=f"{name} {t.magnification.name}", disable=not progress):
                path = t.root / f"{name}-{s:05d}.npy"
                if path.is_file():
                    continue
                src = t.shard(source, s)
                out = np.concatenate([fn(np.asarray(src[i:i + batch])) for i in range(0, len(src), batch)])
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, out)
                os.replace(tmp, path)

    def iter_slides(self) -> Iterator[str]:
        yield from self.info["slides"]
