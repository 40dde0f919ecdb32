"""Benchmark: the reference joint sampler + blended decode against the issue #8 cuts (joint_fast, blend_fast).

One markdown row per (algorithm, grid): seconds per image (sampling + blended decoding), UNet sample-forwards
(a CFG pair counts 2), VQ decodes (sampling loop + final consistency + blend) and encodes, all counted by the
wrappers around the networks, and the pixel-space consistency MAE (random weights: a plumbing check, not a
quality number). Same random-weight model, same seeds and contexts for every algorithm.

    python bench/sample_fast.py --preset paper --grid 4 16                  # on a GPU (fp16 UNet autocast)
    python bench/sample_fast.py --smoke                                     # CPU plumbing check, seconds

Algorithms (--algos):
    reference  joint.py (K pixel-space inner iterations, VQ round trips) + decode stride window/4 (official)
    latent     joint_fast latent mode, direction "direct", K latent iterations, no VQ in the loop
               + decode stride window/2 (blend_fast)
    hybrid     latent mode with K/2 latent iterations + 1 reference iteration per outer step + stride window/2
Paper-size decode counts per 4096² image: 3,721 (stride 16) vs 961 (stride 32); 1024²: 169 vs 49.
Extends nothing in bench/sample_large.py (its `build` and the guide-magnification stand-in are reused).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_large import PATCH_PX, _Mag, build  # noqa: E402

from zoomldm.diffusion import randn_items, step_noise_fn  # noqa: E402
from zoomldm.diffusion.blend import decode_large  # noqa: E402
from zoomldm.diffusion.joint import assemble  # noqa: E402
from zoomldm.diffusion.joint_fast import FastJointConfig, joint_sample  # noqa: E402
from zoomldm.models.summarizer import SUMMARIZER_PRESETS  # noqa: E402
from zoomldm.sampling import denoisers as dn  # noqa: E402

log = logging.getLogger("bench.sample_fast")
ALGOS = ("reference", "latent", "hybrid")


def algorithm(name: str, steps: int, inner: int, patch_batch: int,
              window: int) -> tuple[FastJointConfig, int]:
    """(sampler config, blend stride) of one algorithm."""
    base = dict(steps=steps, patch_batch=patch_batch)
    if name == "reference":
        return FastJointConfig(inner_steps=inner, **base), max(1, window // 4)
    if name == "latent":
        return FastJointConfig(inner_steps=inner, constraint_mode="latent", **base), max(1, window // 2)
    if name == "hybrid":
        return (FastJointConfig(inner_steps=inner // 2, constraint_mode="latent", pixel_steps=1, **base),
                max(1, window // 2))
    raise ValueError(f"--algos: unknown algorithm {name!r}; choose from {ALGOS}")


@torch.no_grad()
def sample_one(m: dn.ZoomLDM, grid: int, cfg: FastJointConfig, stride: int, guide_ctx: torch.Tensor,
               patch_ctx: torch.Tensor, window_batch: int, seed: int = 0) -> dict:
    """zoomldm.sampling.large.sample_large with the sampler and blend stride chosen here (same seeding)."""
    m.counter = dn.Counter()
    c, h = m.unet.config.in_channels, m.latent_side
    base = dn.stream_seed(seed, "large", grid, 0)
    x = randn_items(base, range(1 + grid * grid), (c, h, h), m.device)            # (1 + g², c, h, h)
    noise_fn = step_noise_fn(base, range(1 + grid * grid), m.device) if cfg.stochastic else None
    eps_fn = dn.joint_eps_fn(m, guide_ctx, patch_ctx, cfg.guidance_w)
    res = joint_sample(eps_fn, m.encode, m.decode, m.schedule, x[:1], x[1:], grid, cfg, noise_fn=noise_fn)
    _, n_windows = decode_large(assemble(res.patch_latents, grid), m.decode, window=h, stride=stride,
                                batch=window_batch, return_count=True)
    return {"mae": res.consistency_mae, "loop_dec": res.vq_decodes, "final_dec": res.final_vq_decodes,
            "blend_dec": n_windows, **m.counter.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["paper", "small"], default="paper")
    ap.add_argument("--grid", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--patch-batch", type=int, default=16)
    ap.add_argument("--window-batch", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--count-only", action="store_true", help="Network stand-ins (bench/sample_large.py).")
    ap.add_argument("--smoke", action="store_true",
                    help="Tiny CPU plumbing check: small preset, grid 2, 2 outer steps, K = 2, one thread.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smoke:
        args.preset, args.grid, args.steps, args.inner_steps, args.device = "small", [2], 2, 2, "cpu"
        torch.set_num_threads(1)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device if args.device != "auto" else auto)
    torch.manual_seed(0)
    m = build(args.preset, device, args.count_only)
    d = SUMMARIZER_PRESETS[args.preset].hidden_dim if not args.count_only else m.unet.config.context_dim
    amp = dn.amp_dtype(device, "auto", "joint") if not args.count_only else None   # fp16 on CUDA
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"preset {args.preset}, {'count-only stand-ins' if args.count_only else 'random weights'}, {name}, "
          f"{'fp16 UNet autocast' if amp else 'fp32'}, {args.steps} outer steps, K = {args.inner_steps}, "
          f"patch batch {args.patch_batch}, window batch {args.window_batch}\n")
    print("| algorithm | grid | image px | s / image | UNet sample-forwards "
          "| VQ decodes (loop + final + blend) | VQ encodes | consistency MAE (random weights) |")
    print("|---|---|---|---|---|---|---|---|")
    for grid in args.grid:
        g = torch.Generator().manual_seed(grid)
        guide_ctx = torch.randn(1, 65, d, generator=g).to(device)
        patch_ctx = torch.randn(grid * grid, 65, d, generator=g).to(device)
        for algo in args.algos:
            cfg, stride = algorithm(algo, args.steps, args.inner_steps, args.patch_batch, m.latent_side)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad(), dn.autocast(device, "auto" if amp else "fp32", "joint"):
                rec = sample_one(m, grid, cfg, stride, guide_ctx, patch_ctx, args.window_batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            px = grid * PATCH_PX[args.preset]
            dec = f"{rec['vq_decodes']:,} ({rec['loop_dec']:,} + {rec['final_dec']:,} + {rec['blend_dec']:,})"
            print(f"| {algo} | {grid} | {px}² | {seconds:.1f} | {rec['unet_forwards']:,} | {dec} | "
                  f"{rec['vq_encodes']:,} | {rec['mae']:.2f} |", flush=True)
        _ = _Mag  # the guide magnification only names records in sample_large; nothing to record here


if __name__ == "__main__":
    main()
