"""Benchmark: seconds per large image by joint multi-scale sampling, and the work per image.

One markdown row per grid: seconds per image (sampling + Gaussian-blended decoding), and the UNet
sample-forwards (a CFG pair counts 2) and VQ decodes/encodes the image took, counted by wrappers around the
networks. Random weights of the chosen preset; contexts are random (the Summarizer/CDM are not timed).

    python bench/sample_large.py --preset paper --grid 4 16             # on a GPU: fp16 autocast (UNet)
    python bench/sample_large.py --preset small --grid 4                # CPU smoke test (64-px patches)
    python bench/sample_large.py --preset paper --grid 4 16 --count-only

Grid 4 = 1024² px and grid 16 = 4096² px at the paper's 256-px patches (64-px in the small preset: 256² and
1024²). `--count-only` replaces the networks by cheap stand-ins of the same shapes: the counts are exact for
the chosen settings (they depend on the sampler, not on the weights), the seconds are meaningless. Expected
at paper settings (reference notes §5.6): per outer step 2(1 + 2K) = 42 forwards, K = 10 decodes and 2K = 20
encodes per base patch, plus 2 forwards and 1 decode for the guide.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import torch
import torch.nn.functional as F

from zoomldm.diffusion.joint import JointConfig
from zoomldm.models.summarizer import SUMMARIZER_PRESETS
from zoomldm.models.unet import UNET_PRESETS, UNet
from zoomldm.models.vq import VQ_PRESETS, VQModel
from zoomldm.sampling import denoisers as dn
from zoomldm.sampling.large import sample_large

log = logging.getLogger("bench.sample_large")
PATCH_PX = {"paper": 256, "small": 64}


class CountOnly(dn.ZoomLDM):
    """Same shapes and call pattern, no network: ε = 0.1·x, decode = ×f nearest upsampling, encode = f×f mean."""

    def model_fn(self, x, t, context):
        self.counter.unet += x.shape[0]
        return 0.1 * x

    def decode(self, latent):
        self.counter.vq_decode += latent.shape[0]
        return F.interpolate(latent, scale_factor=self.vq.config.downsampling).tanh()

    def encode(self, image):
        self.counter.vq_encode += image.shape[0]
        return F.avg_pool2d(image, self.vq.config.downsampling)


def build(preset: str, device: torch.device, count_only: bool) -> dn.ZoomLDM:
    px = PATCH_PX[preset]
    cls = CountOnly if count_only else dn.ZoomLDM
    arch = "small" if count_only else preset          # stand-ins only need the configs' shapes
    unet = UNet(dataclasses.replace(UNET_PRESETS[arch], image_size=px // 4)).to(device).eval()
    vq = VQModel(dataclasses.replace(VQ_PRESETS[arch], resolution=px)).to(device).eval()
    summarizer = None  # contexts are given directly
    return cls(unet, summarizer, vq, path=None, kind=f"bench-{preset}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["paper", "small"], default="paper")
    ap.add_argument("--grid", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--patch-batch", type=int, default=16)
    ap.add_argument("--window-batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=1, help="Images per grid (seconds are averaged).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--count-only", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device if args.device != "auto" else auto)
    torch.manual_seed(0)
    m = build(args.preset, device, args.count_only)
    d = SUMMARIZER_PRESETS[args.preset].hidden_dim if not args.count_only else m.unet.config.context_dim
    cfg = JointConfig(steps=args.steps, inner_steps=args.inner_steps, patch_batch=args.patch_batch)
    amp = dn.amp_dtype(device, "auto", "joint") if not args.count_only else None   # fp16 on CUDA
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"preset {args.preset}, {'count-only stand-ins' if args.count_only else 'random weights'}, {name}, "
          f"{'fp16 UNet autocast' if amp else 'fp32'}, {args.steps} outer steps, K = {args.inner_steps}, "
          f"patch batch {args.patch_batch}, window batch {args.window_batch}\n")
    print("| grid | image px | s / image | UNet sample-forwards | VQ decodes (loop + final + blend) "
          "| VQ encodes |")
    print("|---|---|---|---|---|---|")
    for grid in args.grid:
        g = torch.Generator().manual_seed(grid)
        guide_ctx = torch.randn(1, 65, d, generator=g).to(device)
        patch_ctx = torch.randn(grid * grid, 65, d, generator=g).to(device)
        times, rec = [], None
        for i in range(args.images):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad(), dn.autocast(device, "auto" if amp else "fp32", "joint"):
                rec = sample_large(m, i, grid, _Mag(grid), 0, cfg, guide_ctx, patch_ctx, args.window_batch).record
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        px = grid * PATCH_PX[args.preset]
        dec = f"{rec['vq_decodes']:,} ({rec['joint_vq_decodes']:,} + {rec['final_vq_decodes']:,} + " \
              f"{rec['blend_vq_decodes']:,})"
        print(f"| {grid} | {px}² | {sum(times) / len(times):.1f} | {rec['unet_forwards']:,} | {dec} | "
              f"{rec['vq_encodes']:,} |")


@dataclasses.dataclass(frozen=True)
class _Mag:
    """Stands in for the guide magnification (only its name is recorded)."""
    grid: int

    @property
    def name(self) -> str:
        return f"guide of grid {self.grid}"


if __name__ == "__main__":
    main()
