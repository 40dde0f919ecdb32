"""`zoomldm eval mil-*`: slide-level gated ABMIL on frozen features (the paper's MIL table, issue 6).

    zoomldm eval mil-features --config C --features ssl --mag 20x --out FEATS.npz
    zoomldm eval mil-features --config C --features zoomldm --ckpt LDM.safetensors --mag 5x --out FEATS.npz
    zoomldm eval mil-demo-labels --config C --out labels.csv           # the demo's pseudo-slide task
    zoomldm eval mil --config C --features F20.npz [--features F5.npz] --labels labels.csv --out RESULT.json

Feature choices (SSL pooling, UNet block, timestep, noise, fusion) are documented in `zoomldm.mil.features`;
ABMIL and the slide-grouped k-fold CV in `zoomldm.mil.abmil`. Defaults come from `eval.mil` of --config.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import click

from zoomldm.cli.data import resolve_device, store_dir
from zoomldm.config import load_config

log = logging.getLogger("zoomldm.eval.mil")


def _pick(value, default):
    return default if value is None else value


def _store(cfg, store_path):
    from zoomldm.data.store import RegionStore
    return RegionStore(store_path) if store_path else RegionStore(store_dir(cfg))


_config_option = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                              help="Config YAML: the store and the eval.mil defaults.")
_store_option = click.option("--store", "store_path", type=click.Path(file_okay=False), default=None,
                             help="Region store folder (default: the one of --config).")


@click.command("mil-features")
@_config_option
@click.option("--features", "kind", required=True, type=click.Choice(["ssl", "zoomldm"]),
              help="ssl: the store's SSL embedding per region (a coarser region: mean of its base tiles'); "
                   "zoomldm: pooled UNet block output of the noised region latent.")
@click.option("--mag", required=True, help="Magnification of the regions (e.g. 20x, 5x).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz.")
@click.option("--ckpt", type=click.Path(dir_okay=False), default=None,
              help="ZoomLDM model.safetensors (only for --features zoomldm).")
@click.option("--vq", "vq_path", type=click.Path(dir_okay=False), default=None,
              help="VQ checkpoint, for a --ckpt without a bundled VQ.")
@click.option("--timestep", type=click.IntRange(0, 999), default=None, help="[eval.mil.unet_timestep]")
@click.option("--block", type=click.Choice(["input", "middle", "output"]), default=None,
              help="[eval.mil.unet_block]")
@click.option("--max-per-slide", type=click.IntRange(min=1), default=None,
              help="Seeded subsample of regions per slide [eval.mil.max_tiles_per_slide].")
@click.option("--latents", type=click.Choice(["auto", "store", "encode"]), default="auto", show_default=True,
              help="zoomldm: z_0 from the store's VQ latents (auto: when the store has them and no --vq is "
                   "given) or by VQ-encoding the region images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=None, help="[eval.seed]")
@click.option("--device", default=None, help="cpu, cuda or auto [eval.device].")
@_store_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def mil_features(config_path, kind, mag, out, ckpt, vq_path, timestep, block, max_per_slide, latents,
                 batch_size, seed, device, store_path, progress) -> None:
    """Per-region features of one magnification: OUT.npz with features (N, D) float32, slide (N,), row0/col0
    (top-left base tile), x/y (slide pixels), store_row, and meta (JSON: kind, magnification, tiles_per_side,
    encoder_label, stand_in, unet_* for zoomldm)."""
    import numpy as np

    from zoomldm import mags
    from zoomldm.mil import features as mf

    cfg = load_config(config_path)
    mc = cfg.eval.mil
    seed = _pick(seed, cfg.eval.seed)
    store = _store(cfg, store_path)
    m_ = mags.find(store.ladder, mag)
    table = store.table(m_.name)                                    # one line when the store lacks it
    rows = mf.cap_rows(table.manifest, np.arange(len(table)), _pick(max_per_slide, mc.max_tiles_per_slide),
                       seed, m_.name)
    enc_label = mf.encoder_label(store.info.get("encoder", {}), store.ladder)
    meta = {"kind": kind, "magnification": m_.name, "mag_index": m_.index,
            "tiles_per_side": m_.tiles_per_side, "encoder_label": enc_label,
            "stand_in": bool(store.info.get("encoder", {}).get("is_standin")),
            "store": str(store.root), "seed": seed}
    if kind == "ssl":
        if ckpt:
            log.info("--ckpt is not used for --features ssl")
        feats = mf.ssl_features(table, rows)
    else:
        if ckpt is None:
            raise ValueError("--features zoomldm needs --ckpt (the ZoomLDM model.safetensors)")
        feats, zmeta = _zoomldm(ckpt, vq_path, store, table, rows, _pick(timestep, mc.unet_timestep),
                                _pick(block, mc.unet_block), seed, batch_size, _pick(device, cfg.eval.device),
                                progress, latents)
        meta.update(zmeta, encoder_label=f"ZoomLDM UNet {zmeta['unet_block_name']} at "
                                         f"t={zmeta['unet_timestep']} (conditioned on {enc_label})")
    man = table.manifest.iloc[rows]
    fs = mf.FeatureSet(feats, man["slide"].to_numpy().astype(str), man["row0"].to_numpy(),
                       man["col0"].to_numpy(), meta)
    path = fs.save(out, x=man["x"].to_numpy(np.int64), y=man["y"].to_numpy(np.int64),
                   store_row=rows.astype(np.int64))
    click.echo(f"{path}: {len(fs)} regions x {feats.shape[1]} ({kind}, {m_.name})")


def _zoomldm(ckpt, vq_path, store, table, rows, timestep, block, seed, batch_size, device, progress, latents):
    from zoomldm.mil import features as mf
    from zoomldm.sampling.denoisers import load_zoomldm

    m = load_zoomldm(ckpt, resolve_device(device), vq_path=vq_path)   # wrong kind: CheckpointKindError
    mag = table.magnification
    if store.patch_px != m.patch_px:
        raise ValueError(f"{ckpt} models {m.patch_px}-px regions but the store {store.root} holds "
                         f"{store.patch_px}-px regions")
    if mag.index >= m.summarizer.config.mag_levels:
        raise ValueError(f"--mag {mag.name}: {ckpt} knows {m.summarizer.config.mag_levels} magnifications")
    use_store = latents == "store" or (latents == "auto" and vq_path is None and table.has("latents"))
    need = "latents" if use_store else "images"
    if not table.has(need):
        why = "run `zoomldm data encode-latents`" if use_store else "dataset.store_images: false"
        raise ValueError(f"{store.root}: {mag.name} has no {need} array ({why})")
    for net in (m.unet, m.summarizer, m.vq):
        net.eval()
    feats = mf.zoomldm_features(m, table, rows, timestep, block, seed, batch_size, progress,
                                store_latents=use_store)
    return feats, {"unet_timestep": int(timestep), "unet_block": block,
                   "unet_block_name": mf.unet_block(m.unet, block)[0], "ckpt": str(ckpt), "ckpt_kind": m.kind,
                   "z0": "store latents" if use_store else "VQ-encoded images"}


@click.command("mil-demo-labels")
@_config_option
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Labels CSV; OUT with suffix .json gets the task.")
@click.option("--blocks", type=click.IntRange(min=2), default=4, show_default=True,
              help="Pseudo-slides (spatial bands) per image, at most.")
@_store_option
def mil_demo_labels(config_path, out, blocks, store_path) -> None:
    """The demo's honest small MIL task, a PIPELINE CHECK, NOT A PATHOLOGY RESULT: the demo has two images
    (CMU-1 H&E crop, scikit-image IHC), so each is cut into spatial bands ("pseudo-slides") and the label is
    the source image, i.e. the stain (H&E vs IHC). Easy by construction. With a single image (satellite demo)
    the label is which half of the image a band lies in.

    Writes OUT (columns slide,label,source_slide,row_min,row_max,col_min,col_max: a region of source_slide
    whose centre, in base tiles, lies in the half-open box belongs to pseudo-slide `slide`) and OUT.json
    ({"task": ...}); `zoomldm eval mil --labels OUT` uses them like a real (slide,label) CSV."""
    import numpy as np

    from zoomldm.mil import features as mf

    cfg = load_config(config_path)
    store = _store(cfg, store_path)
    names = cfg.eval.mil.magnifications or mf.default_magnifications(store.ladder, list(store.tables))
    if not names:
        raise ValueError(f"{store.root}: none of the MIL magnifications is in the store (it has "
                         f"{', '.join(store.tables)})")
    df, task = mf.demo_pseudo_slides(store, names, blocks)
    if cfg.demo_data == "he":
        task += ("; the two images are the CMU-1 H&E crop and scikit-image's IHC image, so the label is "
                 "the stain")
    for n in names:                                                   # say which pseudo-slides stay empty
        t = store.table(n)
        man = t.manifest
        fs = mf.FeatureSet(np.zeros((len(man), 1), np.float32), man["slide"].to_numpy().astype(str),
                           man["row0"].to_numpy(), man["col0"].to_numpy(),
                           {"tiles_per_side": t.magnification.tiles_per_side})
        empty = sorted(set(df["slide"]) - set(mf.bag_ids(df, fs)))
        if empty:
            log.warning("%s: pseudo-slides without regions: %s", n, ", ".join(empty))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    path.with_suffix(".json").write_text(json.dumps({"task": task, "blocks": blocks, "magnifications": names,
                                                     "pseudo_slides": int(len(df))}, indent=1))
    counts = df["label"].value_counts().sort_index()
    click.echo(f"{path}: {len(df)} pseudo-slides; " + ", ".join(f"{k}={v}" for k, v in counts.items()))


@click.command("mil")
@_config_option
@click.option("--features", "feature_paths", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Features .npz of `mil-features`; give two (e.g. 20x and 5x) to fuse them.")
@click.option("--labels", "labels_path", default=None, type=click.Path(dir_okay=False),
              help="CSV slide,label (optionally pseudo-slide boxes, see mil-demo-labels) [eval.mil.labels].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Result JSON.")
@click.option("--task", default=None,
              help="Task name for the JSON (default: the task in LABELS with suffix .json, else the CSV "
                   "name).")
@click.option("--folds", type=click.IntRange(min=2), default=None, help="[eval.mil.folds]")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="[eval.mil.epochs]")
@click.option("--lr", type=float, default=None, help="[eval.mil.lr]")
@click.option("--max-per-slide", type=click.IntRange(min=1), default=None,
              help="Seeded subsample of instances per bag [eval.mil.max_tiles_per_slide].")
@click.option("--seed", type=int, default=None, help="[eval.seed]")
@click.option("--device", default=None, help="[eval.device]")
def mil(config_path, feature_paths, labels_path, out, task, folds, epochs, lr, max_per_slide, seed,
        device) -> None:
    """Gated ABMIL (Ilse et al. 2018), k-fold cross-validation split by slide; AUC and balanced accuracy,
    mean ± std over folds, into OUT (JSON). k = eval.mil.folds, capped (with a warning) at the number of
    slides of the smallest class."""
    import numpy as np

    from zoomldm.mil import features as mf
    from zoomldm.mil.abmil import cross_validate

    cfg = load_config(config_path)
    mc = cfg.eval.mil
    seed = _pick(seed, cfg.eval.seed)
    labels_path = _pick(labels_path, mc.labels)
    if labels_path is None:
        raise ValueError("no labels: pass --labels CSV or set eval.mil.labels (the demo: `zoomldm eval "
                         "mil-demo-labels`)")
    if len(feature_paths) > 2:
        raise ValueError(f"--features: give one file, or two to fuse; got {len(feature_paths)}")
    labels = mf.read_labels(labels_path)
    sets = [mf.load_features(p) for p in feature_paths]
    bags_of = [mf.bag_ids(labels, fs) for fs in sets]
    if len(sets) == 1:
        fs, inst_bags = sets[0], bags_of[0]
        feats, dropped = fs.features, 0
        mag_label = fs.meta["magnification"]
    else:
        order = sorted(range(2), key=lambda i: sets[i].g)
        fine, coarse = sets[order[0]], sets[order[1]]
        feats, kept = mf.fuse(fine, coarse, bags_of[order[0]], bags_of[order[1]])
        inst_bags, dropped = bags_of[order[0]][kept], len(fine) - len(kept)
        if dropped:
            log.warning("fusion: %d of %d %s instances lie in no %s region and are dropped", dropped,
                        len(fine), fine.meta["magnification"], coarse.meta["magnification"])
        mag_label = f"{fine.meta['magnification']}+{coarse.meta['magnification']}"
        fs = fine
    unlabelled = sorted(set(np.unique(np.concatenate([s.slide for s in sets]))) -
                        set(labels["source_slide"] if "source_slide" in labels.columns else labels["slide"]))
    if unlabelled:
        log.warning("%d feature slide(s) have no label and are ignored: %s", len(unlabelled),
                    ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else ""))
    max_per = _pick(max_per_slide, mc.max_tiles_per_slide)
    bags, ids, ys = mf.assemble_bags(feats, inst_bags, labels, max_per, seed)
    missing = sorted(set(labels["slide"]) - set(ids))
    if not bags:
        raise mf.LabelsError(f"{labels_path}: none of its {len(labels)} slides has features in "
                             f"{', '.join(map(str, feature_paths))} (slide ids differ?)")
    if missing:
        log.warning("%d labelled slide(s) have no features and are left out: %s", len(missing),
                    ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    classes = mf.class_order(ys)
    y = np.array([classes.index(v) for v in ys])
    per_class = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    if len(classes) < 2 or min(per_class.values()) < 2:
        raise mf.LabelsError(f"{labels_path}: MIL cross-validation needs two classes with at least 2 slides "
                             f"each; the slides with features give {per_class}")
    k = _pick(folds, mc.folds)
    if min(per_class.values()) < k:
        log.warning("folds capped at %d: the smallest class has that many slides (%d asked)",
                    min(per_class.values()), k)
        k = min(per_class.values())
    cv = cross_validate(bags, y, np.array(ids), k=k, seed=seed, epochs=_pick(epochs, mc.epochs),
                        lr=_pick(lr, mc.lr), device=resolve_device(_pick(device, cfg.eval.device)),
                        num_threads=1 if resolve_device(_pick(device, cfg.eval.device)) == "cpu" else None)
    kinds = sorted({s.meta["kind"] for s in sets})
    if task is None:
        side = Path(labels_path).with_suffix(".json")
        try:
            task = json.loads(side.read_text()).get("task") if side.is_file() else None
        except (ValueError, AttributeError):                    # not mil-demo-labels' file: ignore it
            task = None
        task = task or Path(labels_path).stem
    result = {
        "features": "+".join(kinds), "encoder_label": " + ".join(dict.fromkeys(s.meta["encoder_label"]
                                                                                for s in sets)),
        "magnification": mag_label, "task": task, "labels": str(labels_path),
        "feature_files": [str(p) for p in feature_paths], "classes": classes, "positive_class": classes[-1],
        "n_slides": len(bags), "n_slides_per_class": per_class, "n_slides_without_features": len(missing),
        "n_instances": int(sum(len(b) for b in bags)), "n_instances_dropped_by_fusion": int(dropped),
        "feature_dim": int(feats.shape[1]), "folds": int(k), "splitter": cv["splitter"],
        "auc_mean": cv["auc_mean"], "auc_std": cv["auc_std"],
        "bacc_mean": cv["balanced_accuracy_mean"], "bacc_std": cv["balanced_accuracy_std"],
        "per_fold": cv["folds"], "epochs": cv["epochs"], "lr": cv["lr"], "seed": seed,
        "max_tiles_per_slide": max_per, "stand_in": any(bool(s.meta.get("stand_in")) for s in sets),
    }
    for s in sets:
        if s.meta["kind"] == "zoomldm":
            result.update(unet_timestep=s.meta["unet_timestep"], unet_block=s.meta["unet_block"],
                          unet_block_name=s.meta["unet_block_name"], ckpt=s.meta.get("ckpt"))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(result), indent=1))
    click.echo(f"{path}: {mag_label} {result['features']}: AUC {cv['auc_mean']:.3f} ± {cv['auc_std']:.3f}, "
               f"balanced acc {cv['balanced_accuracy_mean']:.3f} ± {cv['balanced_accuracy_std']:.3f} "
               f"({k} folds, {len(bags)} slides)")


def _finite(obj):
    """NaN (e.g. AUC of a single-class fold) -> null, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


COMMANDS: list = [mil_features, mil_demo_labels, mil]
