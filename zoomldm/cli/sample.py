"""`zoomldm sample`: patch sets for FID, large images by joint multi-scale sampling, SR, Graikos panoramas.

    zoomldm sample patches --ckpt M --mag 5x --n 10000 --out DIR [--cond cdm --cdm-ckpt C] [--shard K]
    zoomldm sample large --ckpt M --grid 4 --n 8 --out DIR [--no-constraint] [--cond cdm --cdm-ckpt C]
    zoomldm sample fit-linear --ckpt M --config CFG --out FILE            # the cut's linear VQ, once per run
    zoomldm sample large --ckpt M --grid 4 --constraint-mode linear --linear-vq FILE --out DIR
    zoomldm sample graikos-large --ckpt G --grid 4 --n 8 --out DIR
    zoomldm sample sr-inputs --config CFG --grid 4 --n 4 --out DIR       # LR/HR pairs from the store
    zoomldm sample sr --ckpt M --lr IMAGE [--lr IMAGE ...] --out DIR
    zoomldm sample consistency --constrained DIR --unconstrained DIR --out JSON

Every item i depends only on (seed, i); items already written are skipped, so rerunning resumes. Defaults come
from the `sample:` section of --config (the built-in defaults without one); options override them.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from zoomldm.cli.data import resolve_device, store_dir
from zoomldm.config import Config, load_config

log = logging.getLogger("zoomldm.sample")


def _config(config_path: str | None) -> Config:
    return load_config(config_path) if config_path else Config()


def _store(cfg: Config, config_path: str | None, store_path: str | None, required: bool = True):
    from zoomldm.data.store import RegionStore
    if store_path:
        return RegionStore(store_path)
    if config_path:
        return RegionStore(store_dir(cfg))
    if required:
        raise ValueError("real conditioning needs the region store: pass --config CFG or --store DIR")
    return None


def _common(f):
    f = click.option("--progress/--no-progress", default=True, show_default=True)(f)
    f = click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default=None,
                     help="UNet autocast on CUDA; auto: bf16 for patches, fp16 for joint sampling, fp32 for SR; "
                          "CPU: fp32 [sample.precision].")(f)
    f = click.option("--device", default=None, help="cpu, cuda, cuda:1 or auto [sample.device].")(f)
    f = click.option("--seed", type=int, default=None, help="Base seed [sample.seed].")(f)
    f = click.option("--store", "store_path", type=click.Path(file_okay=False), default=None,
                     help="Region store folder (default: the one of --config).")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="Config YAML: defaults (sample: section) and the store.")(f)
    f = click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")(f)
    return f


def _model_options(f):
    f = click.option("--vq", "vq_path", type=click.Path(dir_okay=False), default=None,
                     help="VQ checkpoint, for a --ckpt without a bundled VQ.")(f)
    f = click.option("--cdm-ckpt", type=click.Path(dir_okay=False), default=None,
                     help="CDM checkpoint (with --cond cdm).")(f)
    f = click.option("--cond", type=click.Choice(["store", "cdm"]), default=None,
                     help="Conditioning: real regions of the store, or CDM samples.")(f)
    f = click.option("--ckpt", required=True, type=click.Path(dir_okay=False),
                     help="ZoomLDM (or single-scale) model.safetensors.")(f)
    return f


def _pick(value, default):
    return default if value is None else value


@click.group()
def sample() -> None:
    """Generate images: patch sets, large images, super-resolution, Graikos panoramas."""


# ---------------------------------------------------------------------------------------------------------
# patches

@sample.command()
@_model_options
@click.option("--mag", required=True, help="Magnification to sample (e.g. 20x, 5x).")
@click.option("--n", type=click.IntRange(min=1), default=None, help="Set size [sample.patches.n_per_mag].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[sample.patches.batch_size]")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="PLMS steps [sample.patches.plms_steps].")
@click.option("--cfg-scale", type=float, default=None, help="CFG s, standard form [sample.patches.cfg_scale].")
@click.option("--cdm-steps", type=click.IntRange(min=1), default=None, help="[sample.patches.cdm_steps]")
@click.option("--shard-size", type=click.IntRange(min=1), default=None, help="[sample.patches.shard_size]")
@click.option("--cache-every", type=click.IntRange(min=1), default=None,
              help="DeepCache: the whole UNet every N-th evaluation, its shallow branch in between (1: off) "
                   "[sample.patches.cache_every].")
@click.option("--cache-branch", type=click.IntRange(min=0), default=None,
              help="DeepCache shallow branch, 0 .. the UNet's num_res_blocks [sample.patches.cache_branch].")
@click.option("--cache-forecast/--no-cache-forecast", default=None,
              help="DeepCache: extrapolate the cached deep feature from the last two whole evaluations instead of "
                   "reusing it (first-order, TaylorSeer-style) [sample.patches.cache_forecast].")
@click.option("--shard", type=click.IntRange(min=0), default=None,
              help="Write only this shard (one Snakemake job); without it: every missing shard, then manifest.")
@_common
def patches(ckpt, cond, cdm_ckpt, vq_path, mag, n, batch_size, steps, cfg_scale, cdm_steps, shard_size, cache_every,
            cache_branch, cache_forecast, shard, out, config_path, store_path, seed, device, precision, progress) -> None:
    """A patch set of one magnification: images-KKKKK.npy shards (uint8) + manifest.parquet."""
    from zoomldm.sampling.io import PatchShards
    cfg = _config(config_path)
    pc, sc = cfg.sample.patches, cfg.sample
    cond = _pick(cond, "store")
    shards = PatchShards(out, _pick(n, pc.n_per_mag), _pick(shard_size, pc.shard_size))
    todo = [shard] if shard is not None else list(range(shards.num_shards))
    for s in todo:
        shards.items(s)                                                   # range check before loading models
    todo = [s for s in todo if not shards.shard_done(s)]
    if todo:
        _sample_patch_shards(shards, todo, ckpt, cond, cdm_ckpt, vq_path, mag, cfg, config_path, store_path,
                             seed=_pick(seed, sc.seed), batch=_pick(batch_size, pc.batch_size),
                             steps=_pick(steps, pc.plms_steps), scale=_pick(cfg_scale, pc.cfg_scale),
                             cdm_steps=_pick(cdm_steps, pc.cdm_steps), cache_every=_pick(cache_every, pc.cache_every),
                             cache_branch=_pick(cache_branch, pc.cache_branch),
                             cache_forecast=_pick(cache_forecast, pc.cache_forecast), device=_pick(device, sc.device),
                             precision=_pick(precision, sc.precision), progress=progress)
    if shard is None:
        click.echo(f"{shards.merge_manifest()}: {shards.n} images")


def _sample_patch_shards(shards, todo, ckpt, cond, cdm_ckpt, vq_path, mag, cfg, config_path, store_path, *,
                         seed, batch, steps, scale, cdm_steps, cache_every, cache_branch, cache_forecast, device,
                         precision, progress) -> None:
    import torch
    from tqdm.auto import tqdm

    from baselines.panorama import context_from_store as graikos_context
    from baselines.panorama import load_graikos
    from zoomldm import mags
    from zoomldm.models.checkpoint import read_checkpoint
    from zoomldm.sampling import denoisers as dn
    from zoomldm.sampling.io import to_uint8

    dev = resolve_device(device)
    graikos = read_checkpoint(ckpt).kind == "graikos"
    m = load_graikos(ckpt, dev, vq_path=vq_path) if graikos else dn.load_zoomldm(ckpt, dev, vq_path=vq_path)
    dn.fast_path(m, cfg.sample.compile, cfg.sample.vq_precision, cfg.sample.compile_cache)
    store = _store(cfg, config_path, store_path, required=cond == "store")
    ladder = store.ladder if store is not None else cfg.dataset.ladder
    mg = mags.find(ladder, mag)
    if graikos and (cond != "store" or mg.index != 0):
        raise ValueError(f"{ckpt} is a Graikos patch model: it samples base-magnification patches "
                         f"({mags.ladder(ladder)[0].name}) from real embeddings (--cond store) only")
    if not graikos and mg.index >= m.summarizer.config.mag_levels:
        raise ValueError(f"--mag {mg.name}: the model knows {m.summarizer.config.mag_levels} magnifications")
    if not 0 <= cache_branch <= m.unet.max_cache_branch:
        raise ValueError(f"--cache-branch {cache_branch}: {ckpt}'s UNet has branches 0..{m.unet.max_cache_branch} "
                         "(its num_res_blocks)")
    table = cdm = None
    if cond == "store":
        table = store.table(mg.name)
        if store.patch_px != m.patch_px:
            raise ValueError(f"{ckpt} generates {m.patch_px}-px patches but the store {store.root} holds "
                             f"{store.patch_px}-px regions")
    else:
        if cdm_ckpt is None:
            raise ValueError("--cond cdm needs --cdm-ckpt")
        cdm = dn.load_cdm(cdm_ckpt, dev)
        dn.check_cdm_fits(cdm, m, mg.index)
    x_seed = dn.stream_seed(seed, "patches", mg.name)
    total = sum(len(shards.pending(s)) for s in todo)
    bar = tqdm(total=total, desc=f"patches {mg.name} ({cond})", disable=not progress, unit="img")
    for s in todo:
        pending = shards.pending(s)
        for k in range(0, len(pending), batch):
            idx = pending[k:k + batch]
            with torch.no_grad(), dn.autocast(dev, precision):
                if cond == "store":
                    rows = dn.pick_rows(len(table), idx, seed, "patches", mg.name)
                    ctx = (graikos_context(m, store, rows.tolist()) if graikos else
                           dn.context_from_store(m.summarizer, store, mg.name, rows.tolist()))
                else:
                    rows = [-1] * len(idx)
                    ctx = dn.sample_cdm_contexts(cdm, len(idx), mg.index, dn.stream_seed(seed, "patches-cdm",
                                                 mg.name), cdm_steps, indices=idx, batch_size=len(idx))
                latents = dn.sample_patch_latents(m, ctx, idx, x_seed, steps, scale, cache_every=cache_every,
                                                  cache_branch=cache_branch, cache_forecast=cache_forecast,
                                                  pad_to=batch if m.static_batch else None)
                images = to_uint8(m.decode(latents))
            meta = []
            for i, r in zip(idx, rows):
                rec = table.manifest.iloc[int(r)] if cond == "store" else None
                meta.append({"index": i, "seed": seed, "mag": mg.name, "mag_index": mg.index, "cond": cond,
                             "slide": "" if rec is None else str(rec["slide"]),
                             "x": -1 if rec is None else int(rec["x"]), "y": -1 if rec is None else int(rec["y"]),
                             "store_row": int(r), "model": str(ckpt), "model_kind": m.kind,
                             "steps": steps, "cfg_scale": scale, "cache_every": cache_every,
                             "cache_branch": cache_branch, "cache_forecast": cache_forecast})
            shards.write_batch(s, idx, images, meta)
            bar.update(len(idx))
        shards.finish_shard(s)
    bar.close()


# ---------------------------------------------------------------------------------------------------------
# large images

def guide_magnification(ladder: str, grid: int):
    """The magnification whose region spans grid x grid base tiles (4 -> 5x, 16 -> 1.25x on BRCA)."""
    from zoomldm import mags
    levels = mags.ladder(ladder)
    for m in levels:
        if m.tiles_per_side == grid and grid > 1:
            return m
    options = ", ".join(f"{m.tiles_per_side} ({m.name})" for m in levels if m.tiles_per_side > 1)
    raise ValueError(f"--grid {grid}: no magnification of the {ladder} ladder spans {grid}x{grid} base tiles; "
                     f"choose one of {options}")


def _items(n: int, shard: int | None, num_shards: int) -> list[int]:
    if shard is not None and not 0 <= shard < num_shards:
        raise ValueError(f"--shard {shard} must lie in [0, --num-shards {num_shards})")
    return [i for i in range(n) if shard is None or i % num_shards == shard]


def _large_options(f):
    f = click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True)(f)
    f = click.option("--shard", type=click.IntRange(min=0), default=None,
                     help="Only items i with i % num-shards == shard (one Snakemake job).")(f)
    f = click.option("--window-batch", type=click.IntRange(min=1), default=None,
                     help="Windows per batch [sample.large.window_batch].")(f)
    f = click.option("--n", type=click.IntRange(min=1), default=None, help="Images [sample.large.n].")(f)
    f = click.option("--grid", required=True, type=int,
                     help="Base patches per side: 4 (1024 px at patch 256) or 16 (4096 px).")(f)
    return f


@sample.command()
@_model_options
@_large_options
@click.option("--constraint/--no-constraint", default=True, show_default=True,
              help="Off: the base patches are sampled independently (same seeds), to measure the constraint.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Outer steps [sample.large.steps].")
@click.option("--inner-steps", type=click.IntRange(min=0), default=None,
              help="K [sample.large.inner_steps; linear mode: sample.large.cut.inner_steps].")
@click.option("--guidance-w", type=float, default=None, help="w of (1+w)ε_c − wε_u [sample.large.guidance_w].")
@click.option("--patch-batch", type=click.IntRange(min=1), default=None,
              help="[sample.large.patch_batch; linear mode: sample.large.cut.patch_batch]")
@click.option("--constraint-mode", type=click.Choice(["reference", "linear"]), default=None,
              help="reference: the official algorithm; linear: the cut (1 VQ decode and no model call per "
                   "inner iteration) [sample.large.constraint_mode].")
@click.option("--constraint-steps", type=click.IntRange(min=0), default=None,
              help="linear mode: constrain only the first N outer steps [sample.large.cut.constraint_steps].")
@click.option("--decode-every", type=click.IntRange(min=1), default=None,
              help="linear mode: the real VQ decode in the residual only in every k-th constrained outer step "
                   "(counted back from the last), the anchored linear decoder in between "
                   "[sample.large.cut.decode_every; null: every step].")
@click.option("--decode-stride", type=click.IntRange(min=1), default=None,
              help="Blended-decode stride in latents [sample.large.decode_stride, default window/4; linear mode: "
                   "sample.large.cut.decode_stride, default window/2].")
@click.option("--linear-vq", "linear_vq_path", type=click.Path(dir_okay=False), default=None,
              help="linear mode: the fit `zoomldm sample fit-linear` wrote, instead of fitting here.")
@_common
def large(ckpt, cond, cdm_ckpt, vq_path, grid, n, window_batch, shard, num_shards, constraint, steps, inner_steps,
          guidance_w, patch_batch, constraint_mode, constraint_steps, decode_every, decode_stride, linear_vq_path,
          out, config_path, store_path, seed, device, precision, progress) -> None:
    """Large images by joint multi-scale sampling: OUT/<i>.png, OUT/<i>_guide.png and OUT/<i>.json."""
    import torch

    from zoomldm.diffusion.joint_fast import FastJointConfig
    from zoomldm.sampling import denoisers as dn
    from zoomldm.sampling.io import item_done, write_json, write_png
    from zoomldm.sampling.large import large_conditions, sample_large
    cfg = _config(config_path)
    lc, sc = cfg.sample.large, cfg.sample
    cond, seed = _pick(cond, lc.cond), _pick(seed, sc.seed)
    n = _pick(n, lc.n_by_grid.get(str(grid), lc.n))
    store = _store(cfg, config_path, store_path, required=cond == "store")
    guide = guide_magnification(store.ladder if store is not None else cfg.dataset.ladder, grid)
    lookup = dn.RegionLookup(store, guide.name) if cond == "store" else None   # fails if the store lacks it
    todo = [i for i in _items(n, shard, num_shards) if not item_done(out, i)]
    if not todo:
        return
    mode = _pick(constraint_mode, lc.constraint_mode)
    cut = lc.cut if mode == "linear" else None       # the cut runs with its own settings (sample.large.cut)
    for flag, value in (("--constraint-steps", constraint_steps), ("--decode-every", decode_every),
                        ("--linear-vq", linear_vq_path)):
        if cut is None and value is not None:
            raise click.UsageError(f"{flag} applies to --constraint-mode linear only")
    jcfg = FastJointConfig(steps=_pick(steps, lc.steps), h=lc.h, lr=lc.lr, constraint=constraint,
                           inner_steps=_pick(inner_steps, (cut or lc).inner_steps),
                           guidance_w=_pick(guidance_w, lc.guidance_w),
                           patch_batch=_pick(patch_batch, (cut or lc).patch_batch), constraint_mode=mode,
                           constraint_steps=_pick(constraint_steps, cut.constraint_steps) if cut else None,
                           decode_every=_pick(decode_every, cut.decode_every) if cut else None)
    decode_stride = _pick(decode_stride, (cut or lc).decode_stride)
    dev = resolve_device(_pick(device, sc.device))
    m = dn.fast_path(dn.load_zoomldm(ckpt, dev, vq_path=vq_path), sc.compile,
                     cut.vq_precision if cut else sc.vq_precision, sc.compile_cache)
    if guide.index >= m.summarizer.config.mag_levels:
        raise ValueError(f"--grid {grid}: the model knows {m.summarizer.config.mag_levels} magnifications, "
                         f"not {guide.name}")
    if store is not None and store.patch_px != m.patch_px:
        raise ValueError(f"{ckpt} generates {m.patch_px}-px patches but the store {store.root} holds "
                         f"{store.patch_px}-px regions")
    cdm = None
    if cond == "cdm":
        if cdm_ckpt is None:
            raise ValueError("--cond cdm needs --cdm-ckpt")
        cdm = dn.load_cdm(cdm_ckpt, dev)
        dn.check_cdm_fits(cdm, m, guide.index)
    cdm_steps = cfg.sample.patches.cdm_steps
    linear_vq = None
    if constraint and jcfg.constraint_mode == "linear":
        if linear_vq_path is not None:
            linear_vq = dn.load_linear_vq_for(m, linear_vq_path)
            log.info("linear VQ loaded from %s", linear_vq_path)
        else:
            linear_vq = dn.linear_vq_for(m, store)
            log.info("linear VQ fitted (relative errors %s)",
                     {k: round(v, 3) for k, v in linear_vq.fit_error.items()})
    for i in todo:
        with torch.no_grad(), dn.autocast(dev, _pick(precision, sc.precision), "joint"):
            guide_ctx, patch_ctx, source = large_conditions(m, i, grid, guide, seed, lookup, cdm, cdm_steps)
            item = sample_large(m, i, grid, guide, seed, jcfg, guide_ctx, patch_ctx,
                                _pick(window_batch, lc.window_batch), progress,
                                decode_stride=decode_stride, linear_vq=linear_vq)
        item.record.update(cond=cond, source=source, model=str(ckpt), device=str(dev))
        if linear_vq is not None:
            item.record["linear_vq"] = str(linear_vq_path) if linear_vq_path else "fitted in this run"
        write_png(Path(out) / f"{i}_guide.png", item.guide)
        write_png(Path(out) / f"{i}.png", item.image)
        write_json(Path(out) / f"{i}.json", item.record)
        log.info("%s/%d.png: consistency MAE %.2f, %.1f s", out, i, item.record["consistency_mae"],
                 item.record["seconds"])


@sample.command("fit-linear")
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="ZoomLDM model.safetensors.")
@click.option("--vq", "vq_path", type=click.Path(dir_okay=False), default=None,
              help="VQ checkpoint, for a --ckpt without a bundled VQ.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The fit's safetensors file (e.g. <samples>/large/zoomldm_linear/linear_vq.safetensors).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config YAML: the region store and sample.device.")
@click.option("--store", "store_path", type=click.Path(file_okay=False), default=None,
              help="Region store folder (default: the one of --config; none: random codebook latents).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 or auto [sample.device].")
def fit_linear(ckpt, vq_path, out, config_path, store_path, device) -> None:
    """The linear VQ of the cut (`--constraint-mode linear`), fitted once and written to OUT, for
    `sample large --linear-vq OUT` (the workflow's large-image jobs then skip the per-job fit)."""
    from zoomldm.sampling import denoisers as dn
    cfg = _config(config_path)
    store = _store(cfg, config_path, store_path, required=False)
    try:                                     # now, not after the fit
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create {Path(out).parent} ({e.strerror})") from None
    dev = resolve_device(_pick(device, cfg.sample.device))
    m = dn.load_zoomldm(ckpt, dev, vq_path=vq_path)
    lin = dn.save_linear_vq_for(m, out, store)
    log.info("linear VQ fitted and written to %s (relative errors %s)", out,
             {k: round(v, 3) for k, v in lin.fit_error.items()})


@sample.command("graikos-large")
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="Graikos model.safetensors.")
@click.option("--vq", "vq_path", type=click.Path(dir_okay=False), default=None,
              help="VQ checkpoint, for a --ckpt without a bundled VQ.")
@_large_options
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="DDIM steps [sample.large.graikos_steps].")
@click.option("--eta", type=click.FloatRange(0, 1), default=None, help="[sample.large.graikos_eta]")
@click.option("--guidance", type=float, default=None,
              help="g of (1+g)ε_c − gε_u [sample.large.graikos_guidance].")
@_common
def graikos_large(ckpt, vq_path, grid, n, window_batch, shard, num_shards, steps, eta, guidance, out, config_path,
                  store_path, seed, device, precision, progress) -> None:
    """Graikos et al. panoramas of the same real regions as `sample large`: OUT/<i>.png and OUT/<i>.json."""
    import torch

    from baselines.panorama import PanoramaConfig, load_graikos
    from zoomldm.sampling import denoisers as dn
    from zoomldm.sampling.io import item_done, write_json, write_png
    from zoomldm.sampling.large import sample_graikos_large
    cfg = _config(config_path)
    lc, sc = cfg.sample.large, cfg.sample
    seed = _pick(seed, sc.seed)
    n = _pick(n, lc.n_by_grid.get(str(grid), lc.n))
    store = _store(cfg, config_path, store_path)
    guide = guide_magnification(store.ladder, grid)
    lookup = dn.RegionLookup(store, guide.name)
    todo = [i for i in _items(n, shard, num_shards) if not item_done(out, i)]
    if not todo:
        return
    dev = resolve_device(_pick(device, sc.device))
    gm = load_graikos(ckpt, dev, vq_path=vq_path)
    if gm.unet.config.image_size * gm.vq.config.downsampling != store.patch_px:
        raise ValueError(f"{ckpt} generates {gm.unet.config.image_size * gm.vq.config.downsampling}-px patches "
                         f"but the store {store.root} holds {store.patch_px}-px regions")
    pcfg = PanoramaConfig(steps=_pick(steps, lc.graikos_steps), eta=_pick(eta, lc.graikos_eta),
                          guidance=_pick(guidance, lc.graikos_guidance),
                          window_batch=_pick(window_batch, lc.window_batch))
    for i in todo:
        region = lookup.region(int(dn.pick_rows(len(lookup), [i], seed, "large", guide.name)[0]))
        tiles = torch.from_numpy(region.base_grids.reshape(grid, grid, -1))      # (g, g, C) raw embeddings
        with torch.no_grad(), dn.autocast(dev, _pick(precision, sc.precision)):
            item = sample_graikos_large(gm, i, tiles, seed, pcfg, pcfg.window_batch, progress)
        item.record.update(cond="store", source=region.source(), model=str(ckpt), device=str(dev),
                           guide_mag=guide.name)
        write_png(Path(out) / f"{i}.png", item.image)
        write_json(Path(out) / f"{i}.json", item.record)


@sample.command()
@click.option("--constrained", "constrained", multiple=True, required=True, type=click.Path(file_okay=False),
              help="Output folder(s) of `sample large` (constraint on).")
@click.option("--unconstrained", "unconstrained", multiple=True, required=True, type=click.Path(file_okay=False),
              help="The same runs with --no-constraint (same seeds), in the same order.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON to write.")
def consistency(constrained, unconstrained, out) -> None:
    """Mean guide-consistency error with and without the constraint, over images present in both."""
    from zoomldm.sampling.io import write_json
    from zoomldm.sampling.large import consistency_summary
    write_json(Path(out), consistency_summary(constrained, unconstrained))
    click.echo(Path(out).read_text().strip())


# ---------------------------------------------------------------------------------------------------------
# super-resolution

@sample.command("sr-inputs")
@click.option("--grid", type=int, default=None,
              help="SR factor = base tiles per side of the LR [sample.sr.grid].")
@click.option("--n", type=click.IntRange(min=1), default=None, help="[sample.sr.n]")
@_common
def sr_inputs(grid, n, out, config_path, store_path, seed, device, precision, progress) -> None:
    """LR/HR test pairs from the store: OUT/lr/<k>.png (a region at the magnification spanning grid x grid base
    tiles), OUT/hr/<k>.png (its base tiles assembled) and OUT/<k>.json (source; hr_complete is false when some
    base tiles are not in the store and are black in HR). Complete regions are used first."""
    from zoomldm.sampling.io import item_done, write_json, write_png
    from zoomldm.data.pairs import sr_pairs
    cfg = _config(config_path)
    grid, n, seed = _pick(grid, cfg.sample.sr.grid), _pick(n, cfg.sample.sr.n), _pick(seed, cfg.sample.seed)
    store = _store(cfg, config_path, store_path)
    guide = guide_magnification(store.ladder, grid)
    for k, (lr, hr, source) in enumerate(sr_pairs(store, guide.name, n, seed)):
        if not item_done(out, k):
            write_png(Path(out) / "lr" / f"{k}.png", lr)
            write_png(Path(out) / "hr" / f"{k}.png", hr)
            write_json(Path(out) / f"{k}.json", source)


@sample.command()
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False), help="ZoomLDM model.safetensors.")
@click.option("--lr", "lr_paths", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="LR image(s), patch_px x patch_px, at the magnification spanning --grid base tiles.")
@click.option("--grid", type=int, default=None, help="SR factor [sample.sr.grid]: 4 = LR at 5x -> 20x.")
@click.option("--vq", "vq_path", type=click.Path(dir_okay=False), default=None)
@click.option("--inversion-steps", type=click.IntRange(min=1), default=None, help="[sample.sr.inversion_steps]")
@click.option("--inner-steps", type=click.IntRange(min=0), default=None, help="[sample.sr.inner_steps]")
@click.option("--constraint/--no-constraint", default=True, show_default=True,
              help="Off: the HR patches ignore the LR image (same seeds and inverted condition), to measure "
                   "what the constraint adds.")
@_common
def sr(ckpt, lr_paths, grid, vq_path, inversion_steps, inner_steps, constraint, out, config_path, store_path, seed,
       device, precision, progress) -> None:
    """Super-resolution by condition inversion + joint sampling: OUT/<name>.png and OUT/<name>.json."""
    from zoomldm.diffusion.joint import JointConfig
    from zoomldm.sampling import denoisers as dn
    from zoomldm.sampling.io import from_uint8, pending_inputs, read_lr_images, write_json, write_png
    from zoomldm.sampling.sr import super_resolve, to_uint8
    cfg = _config(config_path)
    src, sc, lc = cfg.sample.sr, cfg.sample, cfg.sample.large
    grid, seed = _pick(grid, src.grid), _pick(seed, sc.seed)
    ladder = _store(cfg, None, store_path).ladder if store_path else cfg.dataset.ladder   # no store needed
    guide = guide_magnification(ladder, grid)
    todo = pending_inputs(lr_paths, out)
    if not todo:
        return
    dev = resolve_device(_pick(device, sc.device))
    m = dn.load_zoomldm(ckpt, dev, vq_path=vq_path)
    images = read_lr_images([p for p, _ in todo], m.patch_px, grid, mag=guide.name)
    jcfg = JointConfig(steps=lc.steps, inner_steps=_pick(inner_steps, src.inner_steps), h=lc.h, lr=lc.lr,
                       guidance_w=lc.guidance_w, patch_batch=lc.patch_batch, constraint=constraint)
    amp = dn.amp_dtype(dev, _pick(precision, sc.precision), "sr")
    for p, name in todo:
        start = time.perf_counter()
        m.counter = dn.Counter()
        res = super_resolve(m.unet, m.summarizer, m.encode, m.decode, from_uint8(images[p], dev), guide.index,
                            grid, m.schedule, cfg=jcfg, seed=dn.stream_seed(seed, "sr", name),
                            inversion_steps=_pick(inversion_steps, src.inversion_steps),
                            inversion_lr=src.inversion_lr, window=m.latent_side, amp_dtype=amp, progress=progress)
        write_png(Path(out) / f"{name}.png", to_uint8(res.image))
        write_json(Path(out) / f"{name}.json", {
            "lr": str(p), "lr_mag": guide.name, "grid": grid, "seed": seed, "size_px": int(res.image.shape[-1]),
            "lr_psnr": res.lr_psnr, "lr_consistency_mae": res.lr_consistency_mae,
            "seconds": time.perf_counter() - start, "inner_steps": jcfg.inner_steps, "constraint": constraint,
            "inversion_steps": _pick(inversion_steps, src.inversion_steps),   # UNet forward + backward each
            "joint_unet_forwards": res.joint.unet_forwards, "joint_vq_decodes": res.joint.vq_decodes,
            "joint_vq_encodes": res.joint.vq_encodes, "blend_vq_decodes": res.blend_decodes,
            "vq_decodes": m.counter.vq_decode, "vq_encodes": m.counter.vq_encode, "model": str(ckpt)})


__all__ = ["sample", "guide_magnification"]
from zoomldm.cli.sample_sr_baselines import sr_baseline as _sr_baseline  # noqa: E402
sample.add_command(_sr_baseline)
