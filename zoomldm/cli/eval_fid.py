"""`zoomldm eval fid-ref | fid | large`: patch FID per magnification and CLIP-/Crop-FID of large images.

    zoomldm eval fid-ref --config C --mag 5x --out REF.npz [--extractor E --weights W --n-ref N --store DIR]
    zoomldm eval fid --config C --samples DIR --ref REF.npz --out FID.json [--method M --cond C --mag 5x]
    zoomldm eval large --config C --images DIR --grid 4 --out LARGE.json [--method M --ref-cache DIR]

Definitions: peers-and-metrics.md §6.1 (patch FID; Crop-FID = random full-resolution patch_px crops of the
generated large images vs real base-magnification patches; CLIP-FID = whole generated vs whole real
large images). Reference statistics are cached with their key (``zoomldm.metrics.refstats``); scores are
pure functions of statistics (``zoomldm.metrics.fid``). Every JSON names the extractor, its label and
whether it is the offline stand-in, and the sample counts; a score that is not finite is an error, never a
JSON value.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import click
import numpy as np

from zoomldm.cli.data import resolve_device, store_dir
from zoomldm.config import Config, load_config

log = logging.getLogger("zoomldm.eval")

LARGE_BATCH = 4          # whole large images per extractor batch (4096² px each in the paper configs)


class EvalInputError(ValueError):
    """Bad or missing evaluation input; the message names the file and the magnification."""


def _config(config_path: str | None) -> Config:
    return load_config(config_path) if config_path else Config()


def _pick(value, default):
    return default if value is None else value


def _store(cfg: Config, store_path: str | None):
    from zoomldm.data.store import RegionStore
    return RegionStore(store_path or store_dir(cfg))


def _write_json(path: str | Path, record: dict) -> None:
    """Atomic JSON; refuses non-finite floats (the record must be usable by the report as it stands)."""
    from zoomldm.sampling.io import write_json
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        values = ", ".join(str(record[k]) for k in bad)
        raise EvalInputError(f"{path}: {', '.join(bad)} is not finite ({values}); no JSON written")
    write_json(Path(path), record)


def _fid(a, b, what: str) -> float:
    from zoomldm.metrics.fid import fid_from_stats
    try:
        value = fid_from_stats(a, b)
    except ValueError as e:
        raise EvalInputError(f"{what}: {e}") from None
    if not math.isfinite(value):
        raise EvalInputError(f"{what}: FID is {value}")
    return value


def _common(f):
    f = click.option("--progress/--no-progress", default=True, show_default=True)(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1 or auto [eval.device].")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="Config YAML: eval: defaults and the region store.")(f)
    return f


# ---------------------------------------------------------------------------------------------------------
# fid-ref

@click.command("fid-ref")
@click.option("--mag", required=True, help="Magnification of the real regions (e.g. 20x, 5x).")
@click.option("--extractor", default=None, help="Feature extractor [eval.fid.extractor].")
@click.option("--weights", default=None, help="Local weights file of the extractor [eval.fid.weights].")
@click.option("--n-ref", type=click.IntRange(min=2), default=None,
              help="Real images (a seeded subset when the store holds more) [eval.fid.n_ref].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[eval.fid.batch_size]")
@click.option("--seed", type=int, default=None, help="Subset seed [eval.seed].")
@click.option("--store", "store_path", type=click.Path(file_okay=False), default=None,
              help="Region store folder (default: dataset.store_root/dataset.name of --config).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Statistics .npz (cached).")
@_common
def fid_ref(mag, extractor, weights, n_ref, batch_size, seed, store_path, out, config_path, device,
            progress) -> None:
    """Reference statistics of real region images of one magnification (reused when OUT matches)."""
    from zoomldm.metrics.refstats import patch_ref_stats
    cfg = _config(config_path)
    fc = cfg.eval.fid
    store = _store(cfg, store_path)
    stats, key, reused = patch_ref_stats(
        store, mag, _pick(extractor, fc.extractor), _pick(n_ref, fc.n_ref), _pick(seed, cfg.eval.seed), out,
        device=resolve_device(_pick(device, cfg.eval.device)), weights=_pick(weights, fc.weights),
        batch_size=_pick(batch_size, fc.batch_size), progress=progress)
    click.echo(f"{out}: {key['mag']} n={stats.n} [{key['extractor']}]" + (" (cached)" if reused else ""))


# ---------------------------------------------------------------------------------------------------------
# fid

def _patch_set(samples: Path) -> tuple[list[Path], "object"]:
    """(image shard files, manifest) of a finished patch set; one-line errors for missing/empty sets."""
    import pandas as pd
    from zoomldm.sampling.io import MANIFEST
    if not samples.is_dir():
        raise FileNotFoundError(f"sample set {samples}: no such directory")
    if not (samples / MANIFEST).is_file():
        raise FileNotFoundError(f"sample set {samples}: no {MANIFEST} "
                                "(not a finished `zoomldm sample patches` set)")
    manifest = pd.read_parquet(samples / MANIFEST)
    ids = sorted(manifest["shard"].unique()) if len(manifest) else []
    shards = [samples / f"images-{int(s):05d}.npy" for s in ids]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample set {samples}: missing {', '.join(missing)}")
    return shards, manifest


def _mag_name(cfg: Config, mag):
    """The ladder's name of a magnification given by name, slug or index (unchanged if not in the ladder)."""
    from zoomldm import mags
    if mag is None:
        return None
    try:
        return mags.find(cfg.dataset.ladder, mag).name
    except ValueError:
        return str(mag)


def _unique(manifest, column: str):
    if column in manifest.columns and len(manifest):
        values = manifest[column].astype(str).unique()
        if len(values) == 1:
            return values[0]
    return None


@click.command("fid")
@click.option("--samples", required=True, type=click.Path(),
              help="Patch sample set (images-*.npy + manifest).")
@click.option("--ref", "ref_path", required=True, type=click.Path(dir_okay=False),
              help="`eval fid-ref` .npz.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON to write.")
@click.option("--method", default=None, help="Method name for the table [the samples folder name].")
@click.option("--cond", default=None, help="Conditioning label for the table [the manifest's cond].")
@click.option("--mag", default=None, help="Magnification [the reference's]; must match the reference.")
@click.option("--extractor", default=None, help="Only a check: must equal the reference's extractor.")
@click.option("--weights", default=None, help="Local weights file [the reference's, else eval.fid.weights].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[eval.fid.batch_size]")
@_common
def fid(samples, ref_path, out, method, cond, mag, extractor, weights, batch_size, config_path, device,
        progress) -> None:
    """FID of a patch sample set against reference statistics, with the reference's extractor."""
    from zoomldm.metrics.fid import StatsError, stats_from_features
    from zoomldm.metrics.refstats import build_extractor, extractor_info, features_from_batches, load_ref
    cfg = _config(config_path)
    samples = Path(samples)
    ref, key = load_ref(ref_path)
    ref_mag = key.get("mag")
    mag = _mag_name(cfg, _pick(mag, ref_mag))
    where = f"sample set {samples} (magnification {mag})"
    if ref_mag is not None and mag is not None and str(mag) != str(ref_mag):
        raise EvalInputError(f"{where}: --mag {mag} but the reference {ref_path} is of magnification "
                             f"{ref_mag}")
    if extractor is not None and extractor != ref.extractor:
        raise EvalInputError(f"--extractor {extractor} differs from {ref.extractor}, the extractor of the "
                             f"reference {ref_path} (magnification {mag})")
    shards, manifest = _patch_set(samples)
    set_mag = _unique(manifest, "mag")
    if mag is None:
        mag = set_mag
    elif set_mag is not None and set_mag != str(mag):
        raise EvalInputError(f"{where}: the set holds magnification {set_mag} images, the reference "
                             f"{ref_path} is of {mag}")
    n_gen = len(manifest)
    if n_gen < 2:
        raise EvalInputError(f"{where}: {n_gen} image(s); FID needs at least 2")
    bs = _pick(batch_size, cfg.eval.fid.batch_size)
    cfg_weights = cfg.eval.fid.weights if cfg.eval.fid.extractor == ref.extractor else None
    ex = build_extractor(ref.extractor, resolve_device(_pick(device, cfg.eval.device)),
                         _pick(weights, key.get("weights") or cfg_weights))

    def batches():
        for path in shards:
            arr = np.load(path, mmap_mode="r")                                   # (n, P, P, 3) uint8
            for i in range(0, len(arr), bs):
                yield np.asarray(arr[i:i + bs])
    n_batches = sum(-(-len(np.load(p, mmap_mode="r")) // bs) for p in shards)
    feats = features_from_batches(ex, batches(), n_batches, f"fid {mag} [{ref.extractor}]", progress)
    if len(feats) != n_gen:
        raise EvalInputError(f"{where}: the image shards hold {len(feats)} images, the manifest {n_gen} rows")
    try:
        gen = stats_from_features(feats, ref.extractor)
    except StatsError as e:
        raise EvalInputError(f"{where}: {e}") from None
    value = _fid(gen, ref, f"{where} vs {ref_path}")
    info = extractor_info(ref.extractor)
    record = {"method": _pick(method, samples.name), "cond": _pick(cond, _unique(manifest, "cond")),
              "magnification": None if mag is None else str(mag), "fid": value, "n_gen": int(n_gen),
              "n_ref": int(ref.n), "extractor": ref.extractor,
              "extractor_label": key.get("label", info["label"]),
              "stand_in": bool(key.get("stand_in", info["is_standin"])), "samples": str(samples)}
    _write_json(out, record)
    click.echo(f"{out}: FID {value:.3f} ({record['magnification']}, n_gen={n_gen}, n_ref={ref.n}, "
               f"{record['extractor_label']})")


# ---------------------------------------------------------------------------------------------------------
# large

def _large_items(images: Path, grid: int) -> list[tuple[int, Path, dict]]:
    """(i, <i>.png, parsed <i>.json) of every finished large image, i ascending (guide PNGs are ignored)."""
    if not images.is_dir():
        raise FileNotFoundError(f"large images {images} (grid {grid}): no such directory")
    items = []
    for png in images.glob("*.png"):
        if not re.fullmatch(r"\d+", png.stem):
            continue
        meta = png.with_suffix(".json")
        if not meta.is_file():
            log.warning("%s: no %s (unfinished item); skipped", png, meta.name)
            continue
        try:
            items.append((int(png.stem), png, json.loads(meta.read_text())))
        except json.JSONDecodeError as e:
            raise EvalInputError(f"{meta}: not valid JSON ({e})") from None
    if not items:
        raise EvalInputError(f"large images {images} (grid {grid}): no <i>.png with its <i>.json")
    return sorted(items, key=lambda t: t[0])


def _mean_of(records: list[dict], field: str) -> float | None:
    values = [float(r[field]) for r in records if isinstance(r.get(field), (int, float))]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else None


@click.command("large")
@click.option("--images", required=True, type=click.Path(), help="Folder of <i>.png + <i>.json large images.")
@click.option("--grid", required=True, type=int, help="Base patches per side of the images (4, 16).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON to write.")
@click.option("--method", default=None, help="Method name for the table [the images folder name].")
@click.option("--ref-cache", type=click.Path(file_okay=False), default=None,
              help="Folder of cached reference statistics [<folder of --out>/ref].")
@click.option("--clip-extractor", default=None, help="[eval.large.clip_extractor]")
@click.option("--crop-extractor", default=None, help="[eval.large.crop_extractor]")
@click.option("--crops-per-image", type=click.IntRange(min=1), default=None,
              help="[eval.large.crops_per_image]")
@click.option("--n-ref-large", type=click.IntRange(min=2), default=None, help="[eval.large.n_ref_large]")
@click.option("--n-ref-crops", type=click.IntRange(min=2), default=None,
              help="Real base-magnification patches for Crop-FID [eval.fid.n_ref].")
@click.option("--seed", type=int, default=None, help="Crop and reference seed [eval.seed].")
@click.option("--store", "store_path", type=click.Path(file_okay=False), default=None,
              help="Region store folder (default: the one of --config).")
@_common
def large(images, grid, out, method, ref_cache, clip_extractor, crop_extractor, crops_per_image, n_ref_large,
          n_ref_crops, seed, store_path, config_path, device, progress) -> None:
    """CLIP-FID (whole images) and Crop-FID (seeded full-resolution crops) of a folder of large images."""
    from zoomldm import mags
    from zoomldm.cli.sample import guide_magnification
    from zoomldm.metrics.fid import StatsError, stats_from_features
    from zoomldm.metrics.refstats import (batched, build_extractor, features_from_batches, large_ref_stats,
                                          patch_ref_stats, random_crops)
    from zoomldm.sampling.io import read_png
    cfg = _config(config_path)
    lc, fc = cfg.eval.large, cfg.eval.fid
    seed = _pick(seed, cfg.eval.seed)
    images = Path(images)
    items = _large_items(images, grid)
    store = _store(cfg, store_path)
    gmag = guide_magnification(store.ladder, grid)
    base = mags.ladder(store.ladder)[0]
    where = f"large images {images} (grid {grid}, {gmag.name})"
    p = store.patch_px
    dev = resolve_device(_pick(device, cfg.eval.device))
    clip_name, crop_name = _pick(clip_extractor, lc.clip_extractor), _pick(crop_extractor, lc.crop_extractor)
    k = _pick(crops_per_image, lc.crops_per_image)
    cache = Path(ref_cache) if ref_cache else Path(out).parent / "ref"

    clip_ref, clip_key, _ = large_ref_stats(
        store, gmag.name, clip_name, _pick(n_ref_large, lc.n_ref_large), seed,
        cache / f"large-{gmag.slug}-{clip_name}.npz", device=dev, weights=lc.clip_weights,
        batch_size=LARGE_BATCH, progress=progress)
    crop_ref, crop_key, _ = patch_ref_stats(
        store, base.name, crop_name, _pick(n_ref_crops, fc.n_ref), seed,
        cache / f"patch-{base.slug}-{crop_name}.npz", device=dev, weights=lc.crop_weights,
        batch_size=fc.batch_size, progress=progress)

    clip_ex = build_extractor(clip_name, dev, lc.clip_weights)
    crop_ex = clip_ex if (crop_name, lc.crop_weights) == (clip_name, lc.clip_weights) else \
        build_extractor(crop_name, dev, lc.crop_weights)
    sizes: set[tuple[int, int]] = set()
    clip_feats, crop_feats = [], []
    from tqdm.auto import tqdm
    for chunk in tqdm(list(batched(items, LARGE_BATCH)), desc=f"large grid {grid}", unit="batch",
                      disable=not progress):
        imgs = [read_png(path) for _, path, _ in chunk]
        sizes.update(im.shape[:2] for im in imgs)
        clip_feats.append(features_from_batches(clip_ex, [imgs], 1, "", progress=False))
        crops = np.concatenate([random_crops(im, p, k, seed, i) for (i, _, _), im in zip(chunk, imgs)])
        crop_feats.append(features_from_batches(crop_ex, batched(crops, fc.batch_size), None, "",
                                                progress=False))
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise EvalInputError(f"{where}: images must be square and of one size, got {sorted(sizes)}")
    size_px = next(iter(sizes))[0]
    if size_px != grid * p:
        log.warning("%s: images are %d px, grid %d x %d-px patches would be %d px", where, size_px, grid, p,
                    grid * p)
    try:
        clip_gen = stats_from_features(np.concatenate(clip_feats), clip_name)
        crop_gen = stats_from_features(np.concatenate(crop_feats), crop_name)
    except StatsError as e:
        raise EvalInputError(f"{where}: {e}") from None
    records = [r for _, _, r in items]
    record = {"method": _pick(method, images.name), "grid": int(grid), "size_px": int(size_px),
              "n_images": len(items),
              "clip_fid": _fid(clip_gen, clip_ref, f"{where}: CLIP-FID vs {cache}"),
              "clip_extractor": clip_name, "clip_extractor_label": clip_key["label"],
              "clip_stand_in": clip_key["stand_in"], "n_ref_large": int(clip_ref.n),
              "crop_fid": _fid(crop_gen, crop_ref, f"{where}: Crop-FID vs {cache}"),
              "crop_extractor": crop_name, "crop_extractor_label": crop_key["label"],
              "crop_stand_in": crop_key["stand_in"], "n_crops": int(crop_gen.n),
              "n_ref_crops": int(crop_ref.n),
              "seconds_per_image": _mean_of(records, "seconds"),
              "consistency_mae": _mean_of(records, "consistency_mae")}
    _write_json(out, record)
    click.echo(f"{out}: CLIP-FID {record['clip_fid']:.3f}, Crop-FID {record['crop_fid']:.3f} "
               f"({len(items)} images of {size_px} px, {record['n_crops']} crops)")


COMMANDS: list = [fid_ref, fid, large]
