"""Torch Dataset over the region store, and the paper's uniform-magnification sampler.

The official loader ignores the index it is given and draws a magnification uniformly, then a sample within it
(official-implementation.md §2.1, "scale-balanced sampling"), so every magnification gets ~1/L of each batch.
Here that draw lives in a seeded, resumable `UniformMagnificationSampler`, and the Dataset is a plain map over a
flat index (magnification blocks laid end to end).
"""
from __future__ import annotations

import bisect
import zlib

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from zoomldm.data.regions import standardize_tokens
from zoomldm.data.store import RegionStore, StoreError
from zoomldm.mags import MAX_GRID


class RegionDataset(Dataset):
    """Items: dict of tensors.

    - `grid` (C, 8, 8) float32: the per-token standardised SSL grid, placed in the top-left g x g corner,
      zeros elsewhere; `grid_side` (int) = g. (Fixed shape so items of different magnifications collate.)
    - `mag` (int): the magnification index.
    - `latent` (3, P/4, P/4) float32, when `latents=True` (VQ-f4 latents must be in the store).
    - `image` (3, P, P) float32 in [-1, 1], when `images=True`.
    """

    def __init__(self, store: RegionStore | str, magnifications: list[str] | None = None,
                 latents: bool = False, images: bool = False, standardize: bool = True):
        self.store = store if isinstance(store, RegionStore) else RegionStore(store)
        names = magnifications or [m.name for m in self.store.magnifications]
        self.tables = [self.store.table(n) for n in names]
        for t in self.tables:
            if latents and not t.has("latents"):
                raise StoreError(f"{self.store.root}: no VQ latents for {t.magnification.name}; run "
                                 f"`zoomldm data encode-latents` first")
            if images and not t.has("images"):
                raise StoreError(f"{self.store.root}: no images for {t.magnification.name} "
                                 f"(built with dataset.store_images: false)")
        self.latents, self.images, self.standardize = latents, images, standardize
        self.offsets = np.cumsum([0] + [len(t) for t in self.tables]).tolist()

    @property
    def sizes(self) -> list[int]:
        return [len(t) for t in self.tables]

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Flat index -> (table position, row within that magnification)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self.offsets, index) - 1
        return k, index - self.offsets[k]

    def __getitem__(self, index: int) -> dict:
        k, i = self.locate(index)
        t = self.tables[k]
        g = t.magnification.grid_side
        grid = np.asarray(t.get("grids", i), dtype=np.float32)              # (C, g, g)
        if self.standardize:
            grid = standardize_tokens(grid)
        padded = np.zeros((grid.shape[0], MAX_GRID, MAX_GRID), dtype=np.float32)
        padded[:, :g, :g] = grid
        item = {"grid": torch.from_numpy(padded), "grid_side": g, "mag": t.magnification.index}
        if self.latents:
            item["latent"] = torch.from_numpy(np.asarray(t.get("latents", i), dtype=np.float32))
        if self.images:
            img = torch.from_numpy(np.array(t.get("images", i)))            # (P, P, 3) uint8
            item["image"] = img.permute(2, 0, 1).float() / 127.5 - 1.0       # (3, P, P)
        return item


class UniformMagnificationSampler(Sampler[int]):
    """Draws a magnification uniformly, then a sample uniformly within it (with replacement).

    Deterministic in (seed, epoch); `rank`/`world_size` give each DDP process a disjoint slice of the same
    stream, so the global batch is the same whatever the number of processes.
    """

    def __init__(self, sizes: list[int], num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"every magnification needs at least one sample, got sizes {sizes}")
        self.sizes, self.num_samples, self.seed = list(sizes), num_samples, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.offsets = np.cumsum([0] + self.sizes)[:-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self, n: int, epoch: int | None = None) -> np.ndarray:
        """The first n flat indices of the global stream of an epoch."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch,
                                     zlib.crc32(b"uniform-mag")])
        k = rng.integers(0, len(self.sizes), size=n)
        within = np.floor(rng.random(n) * np.asarray(self.sizes)[k]).astype(np.int64)
        return self.offsets[k] + within

    def __iter__(self):
        stream = self.draw(self.num_samples * self.world_size)
        return iter(stream[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples
