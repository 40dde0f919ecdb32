"""One large image at a time: conditioning (a real region or CDM samples), joint multi-scale sampling or the
Graikos panorama, blended decoding, and the numbers written next to each image.

Seeds: image i of grid g uses the random stream (seed, "large", g, i): item 0 of it is the guide's noise, items
1 … g² the base patches' (x_T and every step's noise, as `joint_multiscale_sample` expects). The constraint-off
variant therefore starts from the same noise, conditions and guide: only the inner constraint loop differs.
Graikos image i uses the same real region as ZoomLDM image i (same row pick) with its own noise stream.

Guide consistency (issue contract `consistency_mae`): mean |A(patch) − guide tile| over the g² base patches,
each decoded on its own, A = antialiased bicubic ×1/s (the operator the sampler constrains with), on the
[0, 255] scale (`JointResult.consistency_mae`). `image_consistency_mae` is the same comparison on the saved
uint8 images: A applied to the whole blended PNG vs the guide PNG.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from zoomldm.diffusion import randn_items, step_noise_fn
from zoomldm.diffusion.blend import decode_large, patch_windows
from zoomldm.diffusion.blend_fast import half_stride
from zoomldm.diffusion.joint import JointConfig, assemble
from zoomldm.diffusion.joint_fast import joint_sample
from zoomldm.diffusion.resize import downscale
from zoomldm.sampling import denoisers as dn
from zoomldm.sampling.io import from_uint8, to_uint8


@dataclass
class LargeImage:
    image: np.ndarray            # (g·P, g·P, 3) uint8
    guide: np.ndarray | None     # (P, P, 3) uint8 guide image (ZoomLDM only)
    record: dict                 # what goes into <i>.json


def image_consistency_mae(image: np.ndarray, guide: np.ndarray) -> float:
    """mean |A(image) − guide| on [0, 255]; A = bicubic-AA downscaling by image side / guide side."""
    factor = image.shape[0] // guide.shape[0]
    if image.shape[0] != factor * guide.shape[0]:
        raise ValueError(f"image {image.shape} is not an integer multiple of the guide {guide.shape}")
    small = downscale(from_uint8(image).double(), factor).clamp(-1, 1)
    return float((small - from_uint8(guide).double()).abs().mean()) * 127.5


def large_conditions(m: dn.ZoomLDM, i: int, grid: int, guide_mag, seed: int, lookup: dn.RegionLookup | None,
                     cdm=None, cdm_steps: int = 200) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """(guide context (1, 65, D), patch contexts (g², 65, D), source region or None) of image i.

    Real: the region picked for item i (`pick_rows`, tags ("large", guide mag)), the guide conditioned on its
    pooled grid at the guide magnification, each base patch on its own tile embedding (1 x 1 grid, mag 0).
    CDM: a guide context sampled at the guide magnification and g² independent base contexts (the CDM has
    no spatial model; the joint constraint is what ties the patches to the guide).
    """
    if lookup is not None:
        row = int(dn.pick_rows(len(lookup), [i], seed, "large", guide_mag.name)[0])
        region = lookup.region(row)
        guide_ctx = dn.context_from_grids(m.summarizer, region.guide_grid[None], guide_mag.index)
        patch_ctx = dn.context_from_grids(m.summarizer, region.base_grids, 0)
        return guide_ctx, patch_ctx, region.source()
    guide_ctx = dn.sample_cdm_contexts(cdm, 1, guide_mag.index, dn.stream_seed(seed, "large-cdm", grid),
                                       cdm_steps, indices=[i])
    patch_ctx = dn.sample_cdm_contexts(cdm, grid * grid, 0, dn.stream_seed(seed, "large-cdm-patches", grid, i),
                                       cdm_steps)
    return guide_ctx, patch_ctx, None


@torch.no_grad()
def sample_large(m: dn.ZoomLDM, i: int, grid: int, guide_mag, seed: int, jcfg: JointConfig,
                 guide_ctx: torch.Tensor, patch_ctx: torch.Tensor, window_batch: int = 16,
                 progress: bool = False, decode_stride: int | None = None, linear_vq=None) -> LargeImage:
    """Image i by joint multi-scale sampling (zoomldm.diffusion.joint, or the cut of joint_fast when jcfg is a
    FastJointConfig in linear mode, which needs `linear_vq`: `denoisers.linear_vq_for`) + Gaussian-blended
    decoding (stride decode_stride; default window/4, window/2 for the linear cut)."""
    start = time.perf_counter()
    m.counter = dn.Counter()
    c, h = m.unet.config.in_channels, m.latent_side
    base = dn.stream_seed(seed, "large", grid, i)
    x = randn_items(base, range(1 + grid * grid), (c, h, h), m.device)            # (1 + g², c, h, h)
    noise_fn = step_noise_fn(base, range(1 + grid * grid), m.device) if jcfg.stochastic else None
    eps_fn = dn.joint_eps_fn(m, guide_ctx.to(m.device), patch_ctx.to(m.device), jcfg.guidance_w)
    res = joint_sample(eps_fn, m.encode, m.decode, m.schedule, x[:1], x[1:], grid, jcfg, noise_fn=noise_fn,
                       progress=progress, linear_vq=linear_vq)
    linear = getattr(jcfg, "constraint_mode", "reference") == "linear"
    stride = decode_stride or (half_stride(h) if linear else max(1, h // 4))
    image_t, n_windows = decode_large(assemble(res.patch_latents, grid), m.decode, window=h, stride=stride,
                                      batch=window_batch, return_count=True,
                                      known=patch_windows(res.patch_images, grid, h))
    image, guide = to_uint8(image_t)[0], to_uint8(res.guide_image)[0]
    seconds = time.perf_counter() - start
    record = {
        "index": i, "seed": seed, "grid": grid, "size_px": int(image.shape[0]), "guide_mag": guide_mag.name,
        "constraint": jcfg.constraint, "consistency_mae": res.consistency_mae,
        "image_consistency_mae": image_consistency_mae(image, guide), "seconds": seconds,
        "steps": jcfg.steps, "inner_steps": jcfg.inner_steps if jcfg.constraint else 0,
        "guidance_w": jcfg.guidance_w, "constraint_mode": getattr(jcfg, "constraint_mode", "reference"),
        "constraint_steps": getattr(jcfg, "constraint_steps", None),
        "decode_every": getattr(jcfg, "decode_every", None) if jcfg.constraint else None, "decode_stride": stride,
        # Work per image: the sampler's own counters (loop) plus the final/blend decodes, and the wrappers'
        # totals (every UNet sample-forward and VQ pass this image caused).
        "joint_unet_forwards": res.unet_forwards, "joint_vq_decodes": res.vq_decodes,
        "joint_vq_encodes": res.vq_encodes, "final_vq_decodes": res.final_vq_decodes,
        "blend_vq_decodes": n_windows, **m.counter.as_dict(),
    }
    return LargeImage(image, guide, record)


@torch.no_grad()
def sample_graikos_large(gm, i: int, tiles: torch.Tensor, seed: int, pcfg, window_batch: int = 16,
                         progress: bool = False) -> LargeImage:
    """Image i by the Graikos panorama sampler (baselines.panorama) over a (g, g, C) tile-embedding grid."""
    from baselines.panorama import panorama_sample
    start = time.perf_counter()
    gm.counter = dn.Counter()
    g, c, h = tiles.shape[0], gm.unet.config.in_channels, gm.latent_side
    base = dn.stream_seed(seed, "graikos", g, i)
    x_T = randn_items(base, [0], (c, g * h, g * h), gm.device)                   # (1, c, g·h, g·h)
    noise_fn = step_noise_fn(base, [0], gm.device) if pcfg.eta > 0 else None
    latent = panorama_sample(gm, tiles.to(gm.device), x_T, pcfg, noise_fn, progress)
    image_t, n_windows = decode_large(latent, gm.decode, window=h, stride=max(1, h // 4), batch=window_batch,
                                      return_count=True)
    image = to_uint8(image_t)[0]
    record = {"index": i, "seed": seed, "grid": g, "size_px": int(image.shape[0]), "constraint": False,
              "consistency_mae": None, "seconds": time.perf_counter() - start, "steps": pcfg.steps,
              "eta": pcfg.eta, "guidance": pcfg.guidance, "blend_vq_decodes": n_windows, **gm.counter.as_dict()}
    return LargeImage(image, None, record)


def consistency_summary(constrained, unconstrained) -> dict:
    """{"constrained_mae", "unconstrained_mae", "n", "by_grid"} over the images present in both the
    constraint-on folders and their constraint-off twins (paired by file name, same seed)."""
    import json
    from pathlib import Path
    if len(constrained) != len(unconstrained):
        raise ValueError("--constrained and --unconstrained need the same number of folders")
    pairs, by_grid = [], {}
    for a, b in zip(constrained, unconstrained):
        for f in sorted(Path(a).glob("*.json"), key=lambda p: p.name):
            other = Path(b) / f.name
            if not other.is_file():
                continue
            ra, rb = json.loads(f.read_text()), json.loads(other.read_text())
            if ra.get("seed") != rb.get("seed") or not ra.get("constraint") or rb.get("constraint"):
                raise ValueError(f"{f} and {other} are not a constraint on/off pair with the same seed")
            pairs.append((ra["consistency_mae"], rb["consistency_mae"]))
            by_grid.setdefault(int(ra["grid"]), []).append(pairs[-1])
    if not pairs:
        raise ValueError(f"no image is present in both {list(constrained)} and {list(unconstrained)}")

    def summary(rows):
        a = np.asarray(rows, dtype=np.float64)
        return {"constrained_mae": float(a[:, 0].mean()), "unconstrained_mae": float(a[:, 1].mean()),
                "n": len(rows)}
    return {**summary(pairs), "by_grid": {str(g): summary(r) for g, r in sorted(by_grid.items())},
            "metric": "mean |A(base patch) - guide tile| on [0, 255], A = antialiased bicubic downscaling"}


