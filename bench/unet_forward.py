"""Benchmark: milliseconds per sample-forward of the denoiser UNet (no grad), one markdown row per setting.

On CUDA: the paper UNet (400.9 M parameters, random weights) on 64x64x3 latents with a (B, 65, 512) context,
bf16 autocast, channels-last, at batch 34 and 128 (optionally `torch.compile`d); TFLOP/s uses 210.6 GFLOP per
sample-forward (reference report §1.4). On CPU (no GPU here) it runs the small preset at small batches in
float32 and says so: those numbers only show that the script works, not how fast the paper model is.

    python bench/unet_forward.py [--batch 34 128] [--iters 20] [--warmup 5] [--compile] [--preset paper]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from zoomldm.models.unet import UNET_PRESETS, UNet, UNetConfig

log = logging.getLogger("bench.unet_forward")
# Per sample-forward of the paper UNet at 64x64 latents (reference §1.4); `gflop_per_sample` counts 210.62.
PAPER_GFLOP = 210.6


def gflop_per_sample(model: UNet, side: int, context_dim: int, cached_branch: int | None = None) -> float:
    """Counted FLOPs of one sample-forward (convolutions, matmuls, attention) on the meta device; with
    `cached_branch`, of DeepCache's shallow step on that branch (`UNet.forward_cached`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = UNet(model.config)
        x, t = torch.empty(1, model.config.in_channels, side, side), torch.zeros(1, dtype=torch.long)
        ctx = torch.empty(1, 65, context_dim)
        deep = None
        if cached_branch is not None:
            with torch.no_grad():
                deep = meta.forward_caching(x, t, ctx, cached_branch)[1]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            if deep is None:
                meta(x, t, ctx)
            else:
                meta.forward_cached(x, t, ctx, deep, cached_branch)
    return counter.get_total_flops() / 1e9


def time_forward(model, batch: int, side: int, device: torch.device, bf16: bool, iters: int,
                 warmup: int, config: UNetConfig | None = None, channels_last: bool = True) -> float:
    """Median milliseconds of one batched forward of `model(x, t, context)`: a UNet, or any callable given the
    UNet's `config` (e.g. a compiled `UNet.forward_caching` wrapped to return ε); x channels-last unless told."""
    cfg = config or model.config
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g).to(device)
    x = x.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ctx = torch.randn(batch, 65, cfg.context_dim, generator=g).to(device)
    cuda = device.type == "cuda"
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(warmup + iters):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x, t, ctx)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(UNET_PRESETS), default=None,
                    help="Default: paper on CUDA, small on CPU.")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="Default: 34 128 on CUDA, 2 8 on CPU.")
    ap.add_argument("--iters", type=int, default=None, help="Timed forwards (default 20 CUDA, 5 CPU).")
    ap.add_argument("--warmup", type=int, default=None, help="Untimed forwards (default 5 CUDA, 1 CPU).")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (also a row without).")
    ap.add_argument("--fp32", action="store_true", help="No bf16 autocast on CUDA.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("paper" if cuda else "small")
    batches = args.batch or ([34, 128] if cuda else [2, 8])
    iters, warmup = args.iters or (20 if cuda else 5), args.warmup or (5 if cuda else 1)
    bf16 = cuda and not args.fp32
    if not cuda:
        log.info("CPU run: the %s preset in float32 (no bf16 autocast) at batch %s; not comparable to the "
                 "GPU benchmark of the paper UNet", preset, batches)
    cfg = UNET_PRESETS[preset]
    side = cfg.image_size
    torch.manual_seed(0)
    model = UNet(cfg).to(device).eval().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    paper_like = preset == "paper" and side == 64
    gflop = PAPER_GFLOP if paper_like else gflop_per_sample(model, side, cfg.context_dim)
    variants = [("eager", model)]
    if args.compile:
        variants.append(("compile", torch.compile(model)))

    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\nUNet `{preset}` ({n_params / 1e6:.1f} M parameters), latent {cfg.in_channels}x{side}x{side}, "
          f"context 65x{cfg.context_dim}, {gflop:.1f} GFLOP/sample-forward"
          f"{' (reference §1.4)' if paper_like else ' (counted)'}, median of {iters} after {warmup} "
          f"warm-up\n")
    print("| device | preset | batch | precision | mode | ms / batch | ms / sample-forward | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, m in variants:
        for batch in batches:
            ms = time_forward(m, batch, side, device, bf16, iters, warmup)
            tflops = gflop * batch / ms  # GFLOP / ms = TFLOP / s
            print(f"| {name} | {preset} | {batch} | {'bf16 autocast' if bf16 else 'fp32'} | {mode} | "
                  f"{ms:.2f} | {ms / batch:.3f} | {tflops:.3g} |", flush=True)


if __name__ == "__main__":
    main()
