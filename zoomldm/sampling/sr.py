"""Training-free super-resolution: condition inversion + joint multi-scale sampling (reference notes §6).

1. **Condition inversion** (`invert_condition`): the SSL embedding grid E (C × g × g, g = tiles per side of
   the LR magnification) that best explains the LR image is found by gradient descent through the frozen
   Summarizer and UNet: 200 Adam steps (lr 0.1), step i at t_i = round(linspace(950, 50, steps)_i), fresh
   noise ε_i,
       x_t = √ᾱ_t·E_vq(LR) + √(1 − ᾱ_t)·ε_i,       ᾱ_t = alphas_cumprod[t] (the training convention)
       loss = mean[w_t·(ε_θ(x_t, t, Summarizer(std(E), mag)) − ε_i)²] − cos_weight·mean_{i≠j} cos(e_i, e_j),
       w_t = √ᾱ_t·(1 − ᾱ_t),
   with E ~ N(0, 1) at the start and per-token standardised (``std``, as the data loader does) at every step.
   The cosine term is kept with the official sign: as written it *rewards* similar embeddings (pulls the
   inverted tokens together) rather than spreading them apart; we keep it and say so. The cosines are taken
   between the standardised tokens (= Pearson correlations of the raw ones). Grids wider than 8 × 8 (LR at
   1.25x and below) are average-pooled to 8 × 8 before the Summarizer, as the training data are.
2. **HR generation** (`super_resolve`): `joint_multiscale_sample` with the LR image as the fixed guide (not
   diffused), K = 5 inner iterations, CFG w = 2; each HR (base-magnification) patch is conditioned on its
   own inverted vector (1 × 1 grid, standardised, mag 0); the patch latents are assembled and decoded with
   `decode_large` (window = one patch's latent side, stride = window/4). Consistency with the LR image is
   reported as the MAE and PSNR of A(SR) against LR on the [0, 255] scale.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from zoomldm.data.regions import TOKEN_EPS
from zoomldm.diffusion import Schedule, randn_items, step_noise_fn
from zoomldm.diffusion.blend import decode_large, patch_windows
from zoomldm.diffusion.joint import (
    JointConfig, JointResult, assemble, cfg_joint_eps_fn, joint_multiscale_sample,
)
from zoomldm.diffusion.resize import downscale
from zoomldm.mags import MAX_GRID
from zoomldm.metrics.sr import psnr

log = logging.getLogger(__name__)

ImageFn = Callable[[Tensor], Tensor]

SR_CONFIG = JointConfig(inner_steps=5)  # §6: K = 5, else the joint defaults (20 steps, h 0.005, lr 0.5, w 2)


def standardize(grid: Tensor, dim: int = 1) -> Tensor:
    """Per-token standardisation over channels ``dim`` (torch twin of ``data.regions.standardize_tokens``)."""
    mean = grid.mean(dim=dim, keepdim=True)
    return (grid - mean) / (grid.std(dim=dim, keepdim=True) + TOKEN_EPS)  # unbiased std, as the loader


def summarizer_grid(grid: Tensor) -> Tensor:
    """(N, C, g, g) raw grid -> the Summarizer's input: avg-pooled to ≤ 8 × 8, then standardised per token."""
    if grid.shape[-1] > MAX_GRID:
        grid = F.avg_pool2d(grid, grid.shape[-1] // MAX_GRID)                      # (N, C, 8, 8)
    return standardize(grid)


def mean_pairwise_cosine(grid: Tensor) -> Tensor:
    """Mean cosine similarity over pairs i ≠ j of the g·g token vectors of (1, C, g, g); 0 if g = 1."""
    v = F.normalize(grid.flatten(2)[0].T, dim=1)                                     # (g·g, C)
    n = v.shape[0]
    if n < 2:
        return v.new_zeros(())
    cos = v @ v.T                                                                    # (n, n)
    return (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))


def inversion_timesteps(steps: int) -> list[int]:
    """t_i = round(linspace(950, 50, steps)_i): deterministic, decreasing (§6)."""
    return [int(round(t)) for t in np.linspace(950, 50, steps)]


def inversion_loss(unet: nn.Module, summarizer: nn.Module, grid: Tensor, z: Tensor, t: int, noise: Tensor,
                   mag_index: int, schedule: Schedule, cos_weight: float = 0.05) -> Tensor:
    """The §6 objective for one (t, ε): weighted ε-loss of the UNet on x_t(z, ε) given the raw grid
    (1, C, g, g), minus ``cos_weight`` × the mean pairwise cosine of the standardised tokens."""
    tokens = standardize(grid)
    context = summarizer(summarizer_grid(grid), torch.tensor([mag_index], device=grid.device))  # (1, 65, D)
    tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
    x_t = schedule.q_sample(z, tt, noise)
    ab = schedule.alpha_bar_at(t)
    w_t = math.sqrt(ab) * (1 - ab)
    eps_hat = unet(x_t, tt, context.expand(z.shape[0], -1, -1)).float()
    return (w_t * (eps_hat - noise) ** 2).mean() - cos_weight * mean_pairwise_cosine(tokens)


@torch.enable_grad()
def invert_condition(unet: nn.Module, summarizer: nn.Module, encode: ImageFn, lr_image: Tensor,
                     mag_index: int, grid_side: int, schedule: Schedule, steps: int = 200, lr: float = 0.1,
                     cos_weight: float = 0.05, seed: int = 0, progress: bool = False, *,
                     amp_dtype: torch.dtype | None = None, return_losses: bool = False
                     ) -> Tensor | tuple[Tensor, list[float]]:
    """Invert the SSL condition of an LR image (1, 3, P, P) in [−1, 1] at magnification ``mag_index``.

    Returns the *standardised* inverted grid (C, g, g), C = the Summarizer's input dim (standardising it
    again is a no-op up to eps). The UNet and Summarizer are frozen (only the grid gets gradients; their
    train/eval mode is restored). E's init and every step's noise come from one CPU generator seeded with
    ``seed``. ``return_losses`` also returns the per-step losses (one host sync per step).
    """
    if lr_image.ndim != 4 or lr_image.shape[0] != 1:
        raise ValueError(f"invert_condition: lr_image must be (1, 3, P, P), got {tuple(lr_image.shape)}")
    device = lr_image.device
    gen = torch.Generator().manual_seed(seed)
    channels = summarizer.config.input_dim
    grid = torch.randn((1, channels, grid_side, grid_side), generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([grid], lr=lr)
    with torch.no_grad():
        z = encode(lr_image).float()                                                 # (1, c, h, w)
    modes = (unet.training, summarizer.training)
    unet.eval()
    summarizer.eval()
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    losses = []
    try:
        for t in tqdm(inversion_timesteps(steps), desc="invert", disable=not progress):
            noise = torch.randn(z.shape, generator=gen).to(device)
            with amp:
                loss = inversion_loss(unet, summarizer, grid, z, t, noise, mag_index, schedule, cos_weight)
            # Gradient for the grid only: the frozen networks accumulate no .grad.
            (grid.grad,) = torch.autograd.grad(loss, [grid])
            opt.step()
            if return_losses:
                losses.append(float(loss.detach()))
    finally:
        unet.train(modes[0])
        summarizer.train(modes[1])
    out = standardize(grid.detach())[0]                                              # (C, g, g)
    return (out, losses) if return_losses else out


@dataclass
class SRResult:
    image: Tensor               # (1, 3, g·P, g·P) in [−1, 1], after decode_large
    condition: Tensor           # (C, g, g) standardised inverted grid
    joint: JointResult          # latents and counters of the joint sampler (guide_latent None: fixed guide)
    blend_decodes: int          # VQ decodes of decode_large
    lr_consistency_mae: float   # mean |A(SR) − LR| on [0, 255]
    lr_psnr: float              # PSNR(A(SR), LR) on uint8 images, dB


def to_uint8(image: Tensor) -> np.ndarray:
    """(1, 3, H, W) in [−1, 1] -> (H, W, 3) uint8 (round half to even, as torch.round)."""
    return ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def super_resolve(unet: nn.Module, summarizer: nn.Module, encode: ImageFn, decode: ImageFn, lr_image: Tensor,
                  mag_index: int, grid_side: int, schedule: Schedule, *, cfg: JointConfig = SR_CONFIG,
                  seed: int = 0, condition: Tensor | None = None, inversion_steps: int = 200,
                  inversion_lr: float = 0.1, cos_weight: float = 0.05, patch_mag_index: int = 0,
                  window: int | None = None, stride: int | None = None, amp_dtype: torch.dtype | None = None,
                  progress: bool = False) -> SRResult:
    """g× super-resolution of ``lr_image`` (1, 3, P, P) in [−1, 1] at ``mag_index`` (g = ``grid_side``).

    ``condition`` (C, g, g) skips the inversion. Initial and step noise are per item (item 0 = the unused
    guide slot, 1 + k = HR patch k, row-major), seeded from ``seed``. ``decode`` must quantise (as the
    official ``decode_first_stage``); window/stride default to one patch latent and a quarter of it.
    """
    g = grid_side
    if lr_image.ndim != 4 or lr_image.shape[0] != 1 or lr_image.shape[-1] % g:
        raise ValueError(f"super_resolve: lr_image must be (1, 3, P, P) with P divisible by grid_side {g}, "
                         f"got {tuple(lr_image.shape)}")
    device = lr_image.device
    if condition is None:
        condition = invert_condition(unet, summarizer, encode, lr_image, mag_index, g, schedule,
                                     inversion_steps, inversion_lr, cos_weight, seed, progress,
                                     amp_dtype=amp_dtype)
    if condition.shape[1:] != (g, g):
        raise ValueError(f"super_resolve: condition must be (C, {g}, {g}), got {tuple(condition.shape)}")

    n = g * g
    per_patch = condition.reshape(condition.shape[0], n).T.reshape(n, -1, 1, 1)      # (N, C, 1, 1) row-major
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with amp:
        contexts = summarizer(standardize(per_patch.to(device)),
                              torch.full((n,), patch_mag_index, dtype=torch.long, device=device))  # (N,65,D)

    def model_fn(x: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
        with amp:
            return unet(x, t, ctx).float()

    eps_fn = cfg_joint_eps_fn(model_fn, None, contexts, cfg.guidance_w)
    shape = encode(lr_image).shape[1:]                                               # (c, h, w) per patch
    x_patches = randn_items(seed, range(1, 1 + n), shape, device=device)             # (N, c, h, w)
    noise_fn = step_noise_fn(seed, range(1 + n), device=device) if cfg.stochastic else None
    joint = joint_multiscale_sample(eps_fn, encode, decode, schedule, None, x_patches, g, cfg,
                                    noise_fn=noise_fn, guide_image=lr_image.float(), progress=progress)

    window = window or shape[-1]
    stride = stride or max(1, window // 4)
    image, n_dec = decode_large(assemble(joint.patch_latents, g), decode, window, stride, return_count=True,
                                known=patch_windows(joint.patch_images, g, window) if window == shape[-1] else None)
    back = downscale(image, g).clamp(-1, 1)                                          # A(SR): (1, 3, P, P)
    mae = float((back - lr_image.clamp(-1, 1)).abs().mean()) * 127.5
    score = psnr(to_uint8(back), to_uint8(lr_image))
    log.info("super_resolve: %d patches, LR consistency MAE %.2f, PSNR %.2f dB", n, mae, score)
    return SRResult(image=image, condition=condition, joint=joint, blend_decodes=n_dec,
                    lr_consistency_mae=mae, lr_psnr=score)
