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

from zoomldm.data.regions import TOKEN_EPS
from zoomldm.data.store import RegionStore, StoreError
from zoomldm.mags import MAX_GRID


class Batch(dict):
    """A collated batch. Indexing it with an int means a DataLoader's default collate got it: say what to do."""

    def __getitem__(self, key):
        if isinstance(key, int):
            raise TypeError("RegionDataset returns whole batches: build the DataLoader with "
                            "collate_fn=RegionDataset.collate (or use RegionDataset.loader)")
        return super().__getitem__(key)


class RegionDataset(Dataset):
    """Items: dict of tensors.

    Read batches through a DataLoader with `collate_fn=RegionDataset.collate` (batched reads, issue-2 speed).

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
        return {k: v[0] for k, v in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch at once (DataLoader calls this when present): one vectorised read per shard.

        Returns the collated batch; pass `collate_fn=RegionDataset.collate` to the DataLoader.
        """
        indices = np.asarray(indices, dtype=np.int64)
        k = np.searchsorted(np.asarray(self.offsets), indices, side="right") - 1
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} samples")
        rows = indices - np.asarray(self.offsets)[k]
        n = len(indices)
        C = self.tables[0].shard("grids", 0).shape[1]
        grid = torch.empty((n, C, MAX_GRID, MAX_GRID), dtype=torch.float32)   # every row is written below
        side = np.empty(n, dtype=np.int64)
        mag = np.empty(n, dtype=np.int64)
        latent = image = None
        for tk in np.unique(k):
            t = self.tables[tk]
            sel = np.flatnonzero(k == tk)
            idx = torch.from_numpy(sel)
            g = t.magnification.grid_side
            side[sel], mag[sel] = g, t.magnification.index
            grids = torch.from_numpy(self._gather(t, "grids", rows[sel])).float()   # (m, C, g, g)
            if self.standardize:  # = regions.standardize_tokens, in place, two-pass (4x faster than std_mean)
                grids.sub_(grids.mean(dim=1, keepdim=True))
                std = grids.square().sum(dim=1, keepdim=True).div_(grids.shape[1] - 1).sqrt_()
                grids.div_(std.add_(TOKEN_EPS))
            if g < MAX_GRID:
                padded = torch.zeros((len(sel), C, MAX_GRID, MAX_GRID), dtype=torch.float32)
                padded[:, :, :g, :g] = grids
                grids = padded
            grid.index_copy_(0, idx, grids)   # rows keep the sampler's order (per-sample seeds follow it)
            if self.latents:
                lat = torch.from_numpy(self._gather(t, "latents", rows[sel])).float()
                latent = torch.empty((n, *lat.shape[1:])) if latent is None else latent
                latent.index_copy_(0, idx, lat)
            if self.images:
                img = torch.from_numpy(self._gather(t, "images", rows[sel])).permute(0, 3, 1, 2)  # (m, 3, P, P)
                image = torch.empty((n, *img.shape[1:])) if image is None else image
                image.index_copy_(0, idx, img.float().div_(127.5).sub_(1.0))
        out = Batch({"grid": grid, "grid_side": torch.from_numpy(side), "mag": torch.from_numpy(mag)})
        if latent is not None:
            out["latent"] = latent
        if image is not None:
            out["image"] = image
        return out

    @staticmethod
    def _gather(t, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of one magnification, read shard by shard with one fancy-index each (memory-mapped)."""
        shard, row = np.divmod(rows, t.shard_size)
        first = t.shard(name, int(shard[0]))
        out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            out[sel] = t.shard(name, int(s))[row[sel]]
        return out

    def loader(self, batch_size: int, sampler=None, num_workers: int = 0, **kwargs):
        return torch.utils.data.DataLoader(self, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                           collate_fn=RegionDataset.collate, **kwargs)

    @staticmethod
    def collate(batch):
        """`__getitems__` already returns a collated batch; fall back to default collation for item lists."""
        return batch if isinstance(batch, dict) else torch.utils.data.default_collate(batch)


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
