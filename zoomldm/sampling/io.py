"""Sample outputs: patch sets as array shards with a parquet manifest, large images as PNG + JSON per image.

Patch sets (`zoomldm sample patches`), never one file per sample:
```
<out>/images-00000.npy        uint8 (n, P, P, 3), items [0, shard_size) of the set
<out>/manifest-00000.parquet  one row per item: index, seed, shard, row, mag, mag_index, cond, slide, x, y, ...
<out>/manifest.parquet        every shard's rows, written once all shards exist
<out>/.partial/00000/*.npz    finished batches of a shard not yet complete (resume point; removed when done)
```
A batch is written atomically as soon as it is sampled and a shard is assembled from its batches, so an
interrupted run loses at most the batch in flight; rerunning skips everything already written.

Large images (`zoomldm sample large`, `graikos-large`, `sr`): `<out>/<i>.png` then `<out>/<i>.json`; the JSON is
written last, so its presence marks a finished item.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

MANIFEST = "manifest.parquet"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), the inverse of the store's x / 127.5 - 1."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    a = np.array(images, dtype=np.uint8)                  # a writable copy (inputs may be read-only maps)
    if a.ndim == 3:
        a = a[None]
    return torch.from_numpy(a).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_png(path: Path, image: np.ndarray) -> None:
    _atomic(path, lambda p: Image.fromarray(image).save(p, format="PNG"))


def write_json(path: Path, data: dict) -> None:
    _atomic(path, lambda p: Path(p).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n"))


def read_png(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_lr_images(paths, patch_px: int | None, grid: int, *, mag: str | None = None,
                   split: bool = False) -> dict[str, np.ndarray]:
    """The LR inputs of `sample sr` / `sample sr-baseline` as {path: uint8 (H, W, 3)}, all checked before
    the first (slow) sample, each failure one line naming the --lr file: it exists; it is patch_px x
    patch_px when patch_px is known (one region spanning grid x grid base patches, at `mag` if given);
    with `split` (the baselines cut it into grid x grid LR tiles), it is square with a side divisible by
    grid."""
    images = {}
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"--lr {p}: no such file")
        img = read_png(p)
        h, w = img.shape[:2]
        if patch_px is not None and (h, w) != (patch_px, patch_px):
            at = f"at {mag}" if mag else "at the magnification"
            raise ValueError(f"--lr {p}: image is {w}x{h} px; the LR input must be {patch_px}x{patch_px} "
                             f"(one region {at} spanning {grid}x{grid} base patches)")
        if split and (h != w or h % grid):
            raise ValueError(f"--lr {p}: image is {w}x{h} px; it must be square with a side divisible by "
                             f"--grid {grid}")
        images[p] = img
    return images


def item_done(out: Path, name: str | int) -> bool:
    """Whether `<out>/<name>.json` (written after the image) exists."""
    return (Path(out) / f"{name}.json").is_file()


def pending_inputs(paths, out: Path) -> list[tuple[str, str]]:
    """(path, name) of the input images (e.g. --lr) whose output `<out>/<name>.*` is not written yet; the name
    is the file name without extension, so names must be unique."""
    names = [Path(p).stem for p in paths]
    if len(set(names)) != len(names):
        raise ValueError("input file names (without extension) must be unique: they name the outputs")
    return [(p, nm) for p, nm in zip(paths, names) if not item_done(out, nm)]


class PatchShards:
    """The shard layout of one patch set of n items; see the module docstring."""

    def __init__(self, out: str | Path, n: int, shard_size: int):
        if n < 1 or shard_size < 1:
            raise ValueError(f"a sample set needs n ≥ 1 and shard_size ≥ 1, got n={n}, shard_size={shard_size}")
        self.out, self.n, self.shard_size = Path(out), n, shard_size

    @property
    def num_shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    def items(self, shard: int) -> range:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"--shard {shard} is out of range: {self.n} items in shards of {self.shard_size} "
                             f"make {self.num_shards} shard(s)")
        return range(shard * self.shard_size, min(self.n, (shard + 1) * self.shard_size))

    def images_path(self, shard: int) -> Path:
        return self.out / f"images-{shard:05d}.npy"

    def manifest_path(self, shard: int) -> Path:
        return self.out / f"manifest-{shard:05d}.parquet"

    def _partial(self, shard: int) -> Path:
        return self.out / ".partial" / f"{shard:05d}"

    def shard_done(self, shard: int) -> bool:
        return self.images_path(shard).is_file() and self.manifest_path(shard).is_file()

    def pending(self, shard: int) -> list[int]:
        """Items of a shard not yet written (in a finished shard or a saved batch)."""
        if self.shard_done(shard):
            return []
        have: set[int] = set()
        for f in self._partial(shard).glob("*.npz"):
            with np.load(f) as z:
                have.update(int(i) for i in z["index"])
        return [i for i in self.items(shard) if i not in have]

    def write_batch(self, shard: int, indices: list[int], images: np.ndarray, rows: list[dict]) -> None:
        """Save one finished batch of a shard (atomic)."""
        if len(indices) != len(images) or len(indices) != len(rows):
            raise ValueError("write_batch: indices, images and rows differ in length")
        def write(p):
            with open(p, "wb") as f:
                np.savez(f, index=np.asarray(indices, dtype=np.int64), images=images,
                         rows=np.asarray(json.dumps(rows)))
        _atomic(self._partial(shard) / f"{indices[0]:09d}.npz", write)

    def finish_shard(self, shard: int) -> None:
        """Assemble a shard from its saved batches (all must be present) and drop them."""
        part = self._partial(shard)
        index, images, rows = [], [], []
        for f in sorted(part.glob("*.npz")):
            with np.load(f) as z:
                index.extend(int(i) for i in z["index"])
                images.append(z["images"])
                rows.extend(json.loads(str(z["rows"])))
        expected = list(self.items(shard))
        order = np.argsort(index, kind="stable")
        if [index[k] for k in order] != expected:
            raise ValueError(f"{part}: saved batches do not cover items {expected[0]}..{expected[-1]}")
        images = np.concatenate(images)[order]
        manifest = pd.DataFrame([rows[k] for k in order])
        manifest["shard"], manifest["row"] = shard, np.arange(len(manifest))
        _atomic(self.manifest_path(shard), lambda p: manifest.to_parquet(p, index=False))
        def write(p):
            with open(p, "wb") as f:
                np.save(f, images)
        _atomic(self.images_path(shard), write)
        for f in part.glob("*.npz"):
            f.unlink()
        part.rmdir()

    def all_done(self) -> bool:
        return all(self.shard_done(s) for s in range(self.num_shards))

    def merge_manifest(self) -> Path:
        """Write `manifest.parquet` from every shard's manifest (all shards must be done)."""
        missing = [s for s in range(self.num_shards) if not self.shard_done(s)]
        if missing:
            raise ValueError(f"{self.out}: shard(s) {missing} not written yet; run them first (--shard K)")
        df = pd.concat([pd.read_parquet(self.manifest_path(s)) for s in range(self.num_shards)],
                       ignore_index=True)
        path = self.out / MANIFEST
        _atomic(path, lambda p: df.to_parquet(p, index=False))
        partial = self.out / ".partial"
        if partial.is_dir() and not any(partial.iterdir()):
            partial.rmdir()
        return path


def read_patch_set(out: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """All images (n, P, P, 3) uint8 and the manifest of a finished patch set."""
    out = Path(out)
    manifest = pd.read_parquet(out / MANIFEST)
    images = np.concatenate([np.load(out / f"images-{s:05d}.npy") for s in sorted(manifest["shard"].unique())])
    return images, manifest
