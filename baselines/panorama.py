"""Graikos et al. (CVPR 2024) large images: the panorama sampler of their patch LDM (peers-and-metrics.md §2,
`notebooks/utils.py: get_panorama` semantics; our own implementation).

Given a g x g grid of base-tile SSL embeddings (a real region's tiles), a canvas of g x g patch latents is
denoised jointly:

1. windows of the patch latent size w (64 latents for 256-px patches) are laid over the canvas with stride
   w/4 (16), every window fully inside;
2. each window is conditioned on the bilinear *slerp* of the 4 tile embeddings nearest to its centre: a window
   whose top-left latent is (y, x) sits at tile coordinates (u, v) = (y/w, x/w) (its centre at tile centres
   when y, x are multiples of w), so the window aligned with tile (i, j) gets exactly tile (i, j)'s embedding;
   beyond the last tile the grid is replicate-padded;
3. every window's ε is predicted with CFG ε = (1 + g_cfg)·ε_c − g_cfg·ε_u (g_cfg = 3, null = zero context),
   the predictions are averaged per latent pixel over the overlapping windows (MultiDiffusion, uniform
   weights), and the canvas takes one DDIM step (50 steps, η = 1);
4. the canvas is decoded with the same Gaussian-blended sliding windows as ZoomLDM (`decode_large`).

Windows go through the UNet `window_batch` at a time (the official code sends all 169 x 2 at once).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from baselines.graikos import PatchEmbedder, PatchEmbedderConfig
from zoomldm.diffusion import FINAL_ALPHA_ONE, Schedule, cfg_eps_fn, ddim_step, scale_from_w
from zoomldm.diffusion.blend import window_origins
from zoomldm.diffusion.samplers import NoiseFn
from zoomldm.models.checkpoint import load_component, read_checkpoint
from zoomldm.models.unet import UNet
from zoomldm.models.vq import VQModel
from zoomldm.sampling.denoisers import CheckpointKindError, Counter, LatentModel


@dataclass(frozen=True)
class PanoramaConfig:
    steps: int = 50              # DDIM steps ("ldm" spacing: 981, 961, ..., 1)
    eta: float = 1.0             # η of DDIM; the official "ddim" flag with η = 1
    guidance: float = 3.0        # g of (1 + g) ε_c − g ε_u (standard scale 1 + g)
    window_batch: int = 64       # windows per UNet call (x2 for CFG)
    stride_fraction: float = 0.25  # window stride as a fraction of the window (16 of 64)


@dataclass
class GraikosModel(LatentModel):
    """The Graikos patch LDM (`zoomldm train graikos`): UNet, PatchEmbedder and the bundled VQ."""
    unet: UNet
    embedder: PatchEmbedder
    vq: VQModel
    path: Path
    schedule: Schedule = field(default_factory=Schedule.scaled_linear)
    counter: Counter = field(default_factory=Counter)

    kind = "graikos"


def load_graikos(ckpt_path: str | Path, device: str | torch.device = "cpu", ema: bool = True,
                 vq_path: str | Path | None = None) -> GraikosModel:
    """A Graikos checkpoint (kind "graikos": unet, embedder, and the VQ bundled in model.safetensors, or
    from `vq_path` for a checkpoint without one)."""
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    if ckpt.kind != "graikos" or not {"unet", "embedder"} <= set(ckpt.components):
        raise CheckpointKindError(f"{path} is a {ckpt.kind} checkpoint (components: "
                                  f"{', '.join(ckpt.components)}); --ckpt needs a Graikos model.safetensors "
                                  f"(unet, embedder, vq), e.g. resources/runs/<dataset>/graikos/model.safetensors")
    if vq_path is not None:
        vq_ckpt = read_checkpoint(vq_path)
        if "vq" not in vq_ckpt.components:
            raise CheckpointKindError(f"--vq {vq_path} has no vq component")
        vq = load_component(vq_ckpt, "vq", device)
    elif "vq" in ckpt.components:
        vq = load_component(ckpt, "vq", device)
    else:
        raise CheckpointKindError(f"{path} has no vq component: use the run's model.safetensors or pass --vq")
    name = "unet_ema" if ema and "unet_ema" in ckpt.components else "unet"
    embedder = PatchEmbedder(PatchEmbedderConfig(**ckpt.configs["embedder"]))
    embedder.load_state_dict(ckpt.state_dicts["embedder"], strict=True)
    return GraikosModel(load_component(ckpt, name, device), embedder.to(device).eval(), vq, path)


@torch.no_grad()
def context_from_store(gm: GraikosModel, store, rows) -> torch.Tensor:
    """Contexts (N, 1, D) of base-magnification store regions `rows`: each patch's own raw SSL embedding (not
    standardised: the PatchEmbedder L2-normalises it, as in training, `GraikosTask`)."""
    from zoomldm import mags
    from zoomldm.data.dataset import RegionDataset
    ds = RegionDataset(store, [mags.ladder(store.ladder)[0].name], standardize=False)
    grid = ds.__getitems__(list(rows))["grid"][:, :, 0, 0]                          # (N, C)
    return gm.embedder(grid.to(gm.device))

# ---------------------------------------------------------------------------------------------------------
# Slerp conditioning

def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation between rows a, b (..., C) by t (broadcastable to (..., 1)): the angle comes from
    the directions, the raw vectors are mixed (so norms interpolate too). t = 0 gives a and t = 1 gives b
    exactly; (anti)parallel pairs fall back to linear interpolation."""
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.ndim < a.ndim:
        t = t.reshape(*t.shape, *([1] * (a.ndim - t.ndim)))
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1, keepdim=True)
    omega = torch.arccos(cos.clamp(-1, 1))
    so = torch.sin(omega)
    safe = so.abs() > eps
    so = torch.where(safe, so, torch.ones_like(so))
    wa = torch.where(safe, torch.sin((1 - t) * omega) / so, 1 - t)
    wb = torch.where(safe, torch.sin(t * omega) / so, t)
    out = wa * a + wb * b
    return torch.where(t == 0, a, torch.where(t == 1, b, out))


def interpolate_grid(grid: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bilinear slerp of a (g, g, C) embedding grid at fractional tile coordinates u (rows), v (cols), each
    (n,): first along columns in the two neighbouring rows, then between the rows. Integer coordinates return
    the grid entries exactly; coordinates past the last tile are replicate-padded."""
    g = grid.shape[0]
    u, v = u.to(grid.dtype).clamp(0, g - 1), v.to(grid.dtype).clamp(0, g - 1)
    r0, c0 = u.floor().long(), v.floor().long()
    r1, c1 = (r0 + 1).clamp(max=g - 1), (c0 + 1).clamp(max=g - 1)
    fu, fv = u - r0, v - c0
    top = slerp(grid[r0, c0], grid[r0, c1], fv)       # (n, C)
    bottom = slerp(grid[r1, c0], grid[r1, c1], fv)    # (n, C)
    return slerp(top, bottom, fu)


def window_layout(grid: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Top-left latent offsets of every window over a canvas of grid x grid patches of `window` latents."""
    starts = window_origins(grid * window, window, stride)
    return [(i, j) for i in starts for j in starts]


def window_conditions(tiles: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """The slerp-interpolated embedding (n_windows, C) of every window over a (g, g, C) tile grid."""
    origins = torch.tensor(window_layout(tiles.shape[0], window, stride), dtype=torch.float64)  # (n, 2)
    return interpolate_grid(tiles.double(), origins[:, 0] / window, origins[:, 1] / window).to(tiles.dtype)


# ---------------------------------------------------------------------------------------------------------
# Sampling

@torch.no_grad()
def panorama_sample(model: GraikosModel, tiles: torch.Tensor, x_T: torch.Tensor, cfg: PanoramaConfig,
                    noise_fn: NoiseFn | None = None, progress: bool = False) -> torch.Tensor:
    """Denoise a (1, c, g·w, g·w) canvas from x_T with window-averaged ε (module docstring). tiles: (g, g, C)
    raw SSL embeddings of the base tiles. Returns the final latent canvas."""
    from tqdm.auto import tqdm
    g, w = tiles.shape[0], model.latent_side
    if x_T.shape[-1] != g * w or x_T.shape[-2] != g * w:
        raise ValueError(f"panorama_sample: x_T {tuple(x_T.shape)} is not a {g}x{g} grid of {w}-latent patches")
    if cfg.eta > 0 and noise_fn is None:
        raise ValueError("panorama_sample: eta > 0 needs noise_fn")
    stride = max(1, round(w * cfg.stride_fraction))
    origins = window_layout(g, w, stride)
    device = x_T.device
    context = model.embedder(window_conditions(tiles.float(), w, stride).to(device))   # (n_win, 1, D)
    cover = torch.zeros_like(x_T[:, :1])
    for i, j in origins:
        cover[:, :, i:i + w, j:j + w] += 1
    schedule = model.schedule
    ts = schedule.timesteps(cfg.steps, "ldm")
    scale = scale_from_w(cfg.guidance)
    x = x_T
    for k, t in enumerate(tqdm(ts, desc="panorama", disable=not progress)):
        eps_sum = torch.zeros_like(x)
        for start in range(0, len(origins), cfg.window_batch):
            chunk = origins[start:start + cfg.window_batch]
            crops = torch.cat([x[:, :, i:i + w, j:j + w] for i, j in chunk])                 # (B, c, w, w)
            eps_fn = cfg_eps_fn(model.model_fn, context[start:start + len(chunk)], None, scale)
            tv = torch.full((len(chunk),), t, dtype=torch.long, device=device)
            eps = eps_fn(crops, tv)
            for (i, j), e in zip(chunk, eps):
                eps_sum[0, :, i:i + w, j:j + w] += e.float()
        eps = eps_sum / cover                                                                  # per-pixel mean
        t_prev = ts[k + 1] if k + 1 < len(ts) else -1
        noise = noise_fn(k, x.shape) if cfg.eta > 0 else None
        x, _ = ddim_step(x, eps.to(x.dtype), t, t_prev, schedule, cfg.eta, noise,
                         final_alpha_one=FINAL_ALPHA_ONE["ldm"])
    return x


def count_forwards(grid: int, window: int, cfg: PanoramaConfig) -> int:
    """UNet sample-forwards of one panorama: windows x steps x 2 (CFG)."""
    stride = max(1, round(window * cfg.stride_fraction))
    return len(window_layout(grid, window, stride)) * cfg.steps * (2 if cfg.guidance != 0 else 1)


__all__ = ["GraikosModel", "PanoramaConfig", "context_from_store", "count_forwards", "interpolate_grid",
           "load_graikos",
           "panorama_sample", "slerp", "window_conditions", "window_layout"]
