"""Benchmark: samples/s read from the region store through RegionDataset + DataLoader (latents + grids).

Builds a synthetic store at the paper's shapes (patch 256 -> 3x64x64 float16 latents, 1024-d UNI-sized grids,
all eight BRCA magnifications), then times one DataLoader pass with the uniform-magnification sampler on one
CPU thread, no worker processes (target from issue 2: >= 2,000 samples/s on one core).

    python bench/data_loader.py [--n-per-mag 2000] [--batch 64] [--samples 20000] [--workers 0]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from zoomldm import mags
from zoomldm.data import store as st
from zoomldm.data.dataset import RegionDataset, UniformMagnificationSampler


def synthetic_store(root: Path, n_per_mag: int, dim: int = 1024, patch: int = 256) -> Path:
    rng = np.random.default_rng(0)
    per_mag = {}
    for m in mags.ladder("brca"):
        g = m.grid_side
        per_mag[m.slug] = {
            "grids": rng.normal(size=(n_per_mag, dim, g, g)).astype(np.float16),
            "latents": rng.normal(size=(n_per_mag, 3, patch // 4, patch // 4)).astype(np.float16),
            "index": pd.DataFrame({"slide": "synthetic", "magnification": m.name, "mag_index": m.index,
                                   "x": 0, "y": 0, "row0": 0, "col0": np.arange(n_per_mag),
                                   "mask_fraction": np.float32(1)}),
        }
    meta = {"slide": "synthetic", "status": "ok", "counts": {}, "encoder": {"name": "none", "dim": dim}}
    st.write_part(root / "parts" / "synthetic", meta, per_mag)
    st.build_store([root / "parts" / "synthetic"], root / "store", "brca", patch, 4096,
                   {"name": "synthetic", "dim": dim, "is_standin": True})
    return root / "store"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-mag", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_store(Path(tmp), args.n_per_mag)
        ds = RegionDataset(root, latents=True)
        sampler = UniformMagnificationSampler(ds.sizes, args.samples, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, sampler=sampler,
                                             num_workers=args.workers, collate_fn=RegionDataset.collate)
        for i, _ in enumerate(loader):  # warm-up: page cache and memory maps
            if i == 5:
                break
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            n += len(batch["mag"])
        dt = time.perf_counter() - t0
    print(f"| data loader | batch {args.batch} | workers {args.workers} | 1 thread | "
          f"{n / dt:,.0f} samples/s | {n} samples in {dt:.2f} s |")


if __name__ == "__main__":
    main()
