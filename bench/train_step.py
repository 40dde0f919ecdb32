"""Benchmark: ZoomLDM training throughput (UNet + Summarizer, AdamW step) and peak memory.

On CUDA: the paper preset at batch 64 under bf16 autocast (issue 4 target: >= 400 samples/s on one H100; the
official code measured 234 samples/s at batch 64 with fp16 autocast). On CPU: the small preset at batch 8, fp32
(a smoke test, not a performance claim). Random data of the real shapes: 3x64x64 latents (3x16x16 for small),
8x8 grids of 1024-d (1280-d for small) embeddings, magnifications drawn uniformly.

    python bench/train_step.py [--preset paper|small] [--batch 64] [--steps 20] [--compile]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F

from zoomldm.diffusion import Schedule
from zoomldm.models.summarizer import SUMMARIZER_PRESETS, Summarizer
from zoomldm.models.unet import UNET_PRESETS, UNet


def measure(preset: str, batch: int, steps: int = 20, warmup: int = 3, compile: bool = False) -> dict:
    """Samples/s of UNet + Summarizer training steps (forward, backward, AdamW) on random data of the real
    shapes; bf16 autocast on CUDA, fp32 on CPU."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # torch's defaults, as the zoomldm commands run (fp32 matmuls exact: the codebook search's argmin needs
    # it); runs before 2026-11-27 had TF32 matmuls on, which touched only matmuls outside bf16 autocast
    summ_cfg = SUMMARIZER_PRESETS[preset]
    unet_cfg = dataclasses.replace(UNET_PRESETS[preset], context_dim=summ_cfg.hidden_dim)
    unet = UNet(unet_cfg).to(device, memory_format=torch.channels_last)
    summ = Summarizer(summ_cfg).to(device)
    params = [*unet.parameters(), *summ.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, fused=cuda)
    schedule = Schedule.scaled_linear()
    fwd = torch.compile(unet) if compile else unet
    side, n = unet_cfg.image_size, batch

    def step() -> torch.Tensor:
        x0 = torch.randn(n, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
        grid = torch.randn(n, summ_cfg.input_dim, 8, 8, device=device)
        mag = torch.randint(0, summ_cfg.mag_levels, (n,), device=device)
        t = torch.randint(0, schedule.T, (n,), device=device)
        noise = torch.randn_like(x0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            context = summ(grid, mag)
            loss = F.mse_loss(fwd(schedule.q_sample(x0, t, noise), t, context).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"samples_per_s": n * steps / dt, "batch": n, "precision": "bf16" if cuda else "fp32",
            "compile": compile, "peak": f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a"}


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper" if cuda else "small", choices=["paper", "small"])
    ap.add_argument("--batch", type=int, default=64 if cuda else 8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    r = measure(args.preset, args.batch, args.steps, args.warmup, args.compile)
    card = torch.cuda.get_device_name() if cuda else "CPU (small preset, fp32: smoke test only)"
    print(f"| train step | {card} | {args.preset} | batch {r['batch']} | {r['precision']}"
          f"{' + compile' if args.compile else ''} | {r['samples_per_s']:,.1f} samples/s | peak {r['peak']} |")


if __name__ == "__main__":
    main()
