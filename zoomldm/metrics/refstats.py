"""Real images for FID references, the reference-statistics cache, and seeded crops of large images.

DESIGN.md §7: reference statistics are computed once per (dataset, magnification, extractor) and cached.
A cached file is the ``FeatureStats`` npz (``FeatureStats.load`` reads it) plus one extra entry, ``key``, a
JSON object

    {"kind": "patch" | "large", "store": <sha256 of store.json + the manifests used>, "mag": "5x",
     "extractor": "effnet-lite0", "weights": <--weights or null>, "n": <images actually used>, "seed": 0, ...}

and a cached file is reused only when every entry of its key matches the one asked for (``cached_stats``);
anything else (another store build, magnification, extractor, weights file, n or seed) recomputes it. The key
also carries ``label`` / ``stand_in`` of the extractor, so a table can print them from the stats alone.

Real images (peers-and-metrics.md §6.1):
- patch FID: up to n region images of one magnification, a seeded subset (``sample_rows``) when the store
  holds more; the whole table otherwise.
- CLIP-FID: whole real large images = the region of the grid's magnification, assembled at base resolution
  from its g x g base tiles (``zoomldm.data.pairs.sr_pairs``, the SR pairs' HR). Regions whose every
  base tile is in the store come first; incomplete ones (black tiles) are used only when fewer than 2
  complete regions exist.
- Crop-FID: ``random_crops``: k patch_px crops of a generated image at full resolution, top-left corners drawn
  uniformly by a generator seeded from (seed, image index), against real base-magnification patches.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from zoomldm.diffusion.noise import item_seed
from zoomldm.metrics.fid import FeatureStats, StatsError, stats_from_features

log = logging.getLogger(__name__)

__all__ = ["store_identity", "sample_rows", "iter_region_batches", "iter_large_real", "random_crops",
           "batched", "features_from_batches", "save_ref", "load_ref", "cached_stats", "patch_ref_key",
           "patch_ref_stats", "large_ref_stats", "build_extractor", "extractor_info"]


# ---------------------------------------------------------------------------------------------------------
# Extractors

def build_extractor(name: str, device: str, weights: str | None = None):
    """``get_extractor`` with a one-line error for an unknown name; weights passed only when given."""
    from zoomldm.metrics.extractors import get_extractor
    try:
        return get_extractor(name, device, **({"weights_path": weights} if weights else {}))
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None


def extractor_info(name: str) -> dict:
    """{label, is_standin, dim} of a registered extractor (a name not registered: label = name, stand-in)."""
    from zoomldm.metrics.extractors import available_extractors
    return available_extractors().get(name, {"label": name, "is_standin": True, "dim": 0})


# ---------------------------------------------------------------------------------------------------------
# Real images from the store

def store_identity(store, mag_names: Iterable[str]) -> str:
    """sha256 of the store's store.json and the manifest.parquet of each magnification used: a rebuilt store
    with other regions (or another shard layout) gets another identity; moving the folder does not."""
    h = hashlib.sha256((Path(store.root) / "store.json").read_bytes())
    for name in sorted(set(mag_names)):
        t = store.table(name)
        h.update(name.encode())
        h.update((t.root / "manifest.parquet").read_bytes())
    return h.hexdigest()


def sample_rows(n_rows: int, n: int, seed: int, *tags: int | str) -> np.ndarray:
    """Sorted rows of a seeded subset of size min(n, n_rows) (all rows, in order, when n >= n_rows)."""
    if n >= n_rows:
        return np.arange(n_rows)
    rng = np.random.default_rng(item_seed(seed, 0, "ref-rows", *tags))
    return np.sort(rng.choice(n_rows, size=n, replace=False))  # sorted: shard-local memory-map reads


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_region_batches(table, rows: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """uint8 (B, P, P, 3) region images of a store table, rows in the given order."""
    for chunk in batched((int(r) for r in rows), batch):
        yield np.stack([np.asarray(table.get("images", r)) for r in chunk])  # (B, P, P, 3)


def iter_large_real(store, grid_mag: str, n: int, seed: int) -> Iterator[tuple[np.ndarray, dict]]:
    """Up to n whole real large images (g·P, g·P, 3) of `grid_mag`: complete regions first (``sr_pairs``
    order); incomplete regions only when fewer than 2 complete ones exist (logged; their source says so)."""
    from zoomldm.data.pairs import sr_pairs
    table = store.table(grid_mag)
    n = min(n, len(table))             # sr_pairs repeats regions beyond len(table); a reference must not
    complete = 0
    for k, (_, hr, source) in enumerate(sr_pairs(store, grid_mag, n, seed)):
        if not source["hr_complete"]:
            if complete >= 2:
                return
            if k == complete:
                log.warning("%s: %s has %d region(s) with every base tile in the store; using incomplete "
                            "regions (missing tiles black) for the real large images", store.root, grid_mag,
                            complete)
        else:
            complete += 1
        yield hr, source


def random_crops(image: np.ndarray, size: int, k: int, seed: int, index: int) -> np.ndarray:
    """k (size, size) crops of an (H, W, 3) image, corners uniform over all valid positions, seeded by
    (seed, index): the same image index gives the same crops whatever the order images are read in."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {index} is {h}x{w} px, smaller than the {size}-px crops")
    rng = np.random.default_rng(item_seed(seed, index, "crops"))
    ys = rng.integers(0, h - size + 1, size=k)
    xs = rng.integers(0, w - size + 1, size=k)
    return np.stack([image[y:y + size, x:x + size] for y, x in zip(ys, xs)])  # (k, size, size, 3)


def features_from_batches(extractor, batches: Iterable, total: int | None, desc: str,
                          progress: bool = True) -> np.ndarray:
    """Features (N, D) of image batches (arrays or lists of HxWx3 uint8), one progress tick per batch."""
    from tqdm.auto import tqdm
    feats = []
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress):
        feats.append(extractor(batch, batch_size=max(len(batch), 1), progress=False))
    dim = getattr(extractor, "dim", 0)
    return np.concatenate(feats) if feats else np.zeros((0, dim))


# ---------------------------------------------------------------------------------------------------------
# The cache

def save_ref(path: str | Path, stats: FeatureStats, key: dict) -> Path:
    """FeatureStats npz + its cache key, written atomically (parallel jobs may write the same file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n),
                     extractor=np.str_(stats.extractor), key=np.str_(json.dumps(key, sort_keys=True)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_ref(path: str | Path) -> tuple[FeatureStats, dict]:
    """(stats, key) of a reference file; key = {} for a plain FeatureStats npz without one."""
    stats = FeatureStats.load(path)
    with np.load(path, allow_pickle=False) as z:
        key = json.loads(str(z["key"])) if "key" in z.files else {}
    return stats, key


def cached_stats(path: str | Path, key: dict,
                 compute: Callable[[], FeatureStats]) -> tuple[FeatureStats, bool]:
    """(stats, reused): the file at `path` when its key equals `key`, else `compute()` saved there."""
    path = Path(path)
    if path.is_file():
        try:
            stats, old = load_ref(path)
        except (ValueError, OSError) as e:  # unreadable or corrupt: recompute
            log.warning("%s: unreadable reference statistics (%s); recomputing", path, e)
        else:
            if old == key:
                log.info("%s: cached reference statistics reused (n=%d, %s)", path, stats.n,
                         key.get("extractor"))
                return stats, True
            changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            log.info("%s: cache key differs in %s; recomputing", path, ", ".join(changed))
    stats = compute()
    save_ref(path, stats, key)
    return stats, False


def _stats(feats: np.ndarray, extractor: str, what: str) -> FeatureStats:
    """``stats_from_features`` with `what` (store, magnification) in front of any error."""
    try:
        stats = stats_from_features(feats, extractor)
    except StatsError as e:
        raise StatsError(f"{what}: {e}") from None
    if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
        raise StatsError(f"{what}: feature statistics contain NaN or inf")
    return stats


def patch_ref_key(store, mag: str, extractor: str, n: int, seed: int,
                  weights: str | None) -> tuple[dict, np.ndarray]:
    """(cache key, rows) of the patch reference of one magnification (n = min(n, regions in the store))."""
    table = store.table(mag)                           # one-line error for a magnification not in the store
    m = table.magnification
    if not table.has("images"):
        raise ValueError(f"{store.root}: magnification {m.name} has no region images (dataset.store_images: "
                         "true is needed for FID)")
    rows = sample_rows(len(table), n, seed, "patch", m.name)
    info = extractor_info(extractor)
    key = {"kind": "patch", "store": store_identity(store, [m.name]), "mag": m.name, "extractor": extractor,
           "weights": weights, "n": int(len(rows)), "seed": int(seed), "patch_px": int(store.patch_px),
           "label": info["label"], "stand_in": bool(info["is_standin"])}
    return key, rows


def patch_ref_stats(store, mag: str, extractor: str, n: int, seed: int, path: str | Path, *,
                    device: str = "cpu", weights: str | None = None, batch_size: int = 64,
                    progress: bool = True) -> tuple[FeatureStats, dict, bool]:
    """(stats, key, reused) of up to n real region images of `mag`, cached at `path`."""
    key, rows = patch_ref_key(store, mag, extractor, n, seed, weights)
    table = store.table(mag)
    what = f"{store.root} magnification {key['mag']}"
    if len(rows) < 2:
        raise StatsError(f"{what}: {len(rows)} region image(s); FID needs at least 2")

    def compute() -> FeatureStats:
        ex = build_extractor(extractor, device, weights)
        n_batches = -(-len(rows) // batch_size)
        feats = features_from_batches(ex, iter_region_batches(table, rows, batch_size), n_batches,
                                      f"ref {key['mag']} [{extractor}]", progress)
        return _stats(feats, extractor, what)

    stats, reused = cached_stats(path, key, compute)
    return stats, key, reused


def large_ref_stats(store, grid_mag: str, extractor: str, n: int, seed: int, path: str | Path, *,
                    device: str = "cpu", weights: str | None = None, batch_size: int = 4,
                    progress: bool = True) -> tuple[FeatureStats, dict, bool]:
    """(stats, key, reused) of up to n whole real large images of `grid_mag` (see ``iter_large_real``).

    The key's n is the number of regions asked of the store (min(n, regions)); the stats' n is how many images
    were used (fewer when incomplete regions are left out)."""
    from zoomldm import mags
    table = store.table(grid_mag)
    m, base = table.magnification, mags.ladder(store.ladder)[0]
    info = extractor_info(extractor)
    key = {"kind": "large", "store": store_identity(store, [m.name, base.name]), "mag": m.name,
           "grid": int(m.tiles_per_side), "extractor": extractor, "weights": weights,
           "n": int(min(n, len(table))), "seed": int(seed), "patch_px": int(store.patch_px),
           "label": info["label"],
           "stand_in": bool(info["is_standin"])}
    what = f"{store.root} real large images of {m.name} (grid {m.tiles_per_side})"

    def compute() -> FeatureStats:
        ex = build_extractor(extractor, device, weights)
        sources = []

        def images():
            for hr, src in iter_large_real(store, m.name, n, seed):
                sources.append(src)
                yield hr
        feats = features_from_batches(ex, batched(images(), batch_size), -(-key["n"] // batch_size),
                                      f"ref large {m.name} [{extractor}]", progress)
        if len(feats) < 2:
            raise StatsError(f"{what}: {len(feats)} image(s); FID needs at least 2")
        incomplete = sum(not s["hr_complete"] for s in sources)
        if incomplete:
            log.warning("%s: %d of %d real large images have missing base tiles", what, incomplete,
                        len(sources))
        return _stats(feats, extractor, what)

    stats, reused = cached_stats(path, key, compute)
    return stats, key, reused
