"""Joint multi-scale sampling (ZoomLDM §3.3; official ``large_image_gen`` demo; reference §5.1–5.3, §5.6).

One low-magnification "guide" latent and the g × g grid of base-magnification (20x) patch latents it covers
are denoised side by side. At every outer step the guide's prediction x̂0_g is decoded to an image I_g, cut
into g × g tiles, and each patch's x_t is pulled towards consistency with its tile under A (bicubic ×1/s
downscaling, ``resize.py``, s = patch px / tile px) by K inner iterations that need no back-propagation:

    I  = D(x̂0)                        (VQ decode, with codebook quantisation)
    z  = E(I)
    r  = ‖Up(tile − A(I))‖∞-normalised                pixel residual, lifted by bicubic Up instead of Aᵀ
    e  = ‖E(I + h·r) − z‖∞-normalised                 latent direction: finite difference through E
    g  = ‖(x̂0(x_t + h·e) − x̂0(x_t)) / h‖∞-normalised   ≈ J·e, J = ∂x̂0/∂x_t: finite difference (UNet)
    x_t ← x_t + lr·g;  recompute ε, x̂0 at the new x_t

followed by the DDIM-style update of the official helpers (``postprocess.py``):
    x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − β̃)·ε + √β̃·z,     β̃ = β_{t−1}(1 − ᾱ_prev)/(1 − ᾱ_t).
Coupling is one way: the guide is never corrected by the patches. ‖·‖∞-normalised means divided per sample by
its max |·| (a zero tensor stays zero).

Timesteps (§5.2): t = t0, t0 − stride, …, stride (t0 = 1000, stride = t0/steps = 50, 20 outer steps) are
1-based: ᾱ_t = ``alphas_cumprod[t − 1]``, ᾱ_prev = ``alphas_cumprod[max(t − 1 − stride, 0)]``, β_{t−1} =
``betas[t − 1]``, while the denoiser receives t itself. This one-index offset between the UNet's timestep
and the ᾱ used to form x̂0 is the official code's (inherited from the lab's earlier samplers); we keep it.

The denoiser is a callable ``eps_fn(x, t, which, index) -> ε``:
    x      latents (B, c, h, w) — the guide (B = 1), any contiguous sub-batch of the patches, or (which =
           "guide+patches") the guide's row followed by such a sub-batch;
    t      LongTensor (B,) on x's device, the 1-based sampler timestep (what the UNet receives);
    which  "guide", "patches" or "guide+patches" (only ``joint_fast``'s sampler makes such calls: the guide's
           ε in the same model call as the first patch batch);
    index  ``slice`` of patch indices (row-major over the grid) that x holds, so the caller can pick each
           patch's context; None for the guide.
It must already include classifier-free guidance (official form ε = (1 + w)·ε_c − w·ε_u, w = 2, i.e.
standard scale s = 1 + w = 3; ``cfg_joint_eps_fn`` builds one) and must be batch-independent per item.
The sampler counts the model work itself: 2 sample-forwards per item per CFG call (1 when w = 0).

Notation (<code name> -> <symbol>): alpha_bar -> ᾱ_t; alpha_bar_prev -> ᾱ_prev; beta_tilde -> β̃;
x0_hat -> x̂0; h -> finite-difference step; lr -> inner update size; K = inner_steps; g = grid.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .guidance import ModelFn, cfg_eps_fn, scale_from_w
from .resize import downscale, upscale
from .samplers import NoiseFn, ddim_step
from .schedule import Schedule

JointEpsFn = Callable[[Tensor, Tensor, str, "slice | None"], Tensor]  # (x, t (B,) long, which, index) -> eps
ImageFn = Callable[[Tensor], Tensor]                                 # img -> latent, or latent -> img


@dataclass(frozen=True)
class JointConfig:
    """Hyper-parameters of the joint sampler; defaults are the official 1024²/4096² demo (§5.2)."""

    steps: int = 20            # outer steps: t = t0, t0 − t0/steps, …  (1000, 950, …, 50)
    inner_steps: int = 10      # K: constraint iterations per outer step and patch (SR: 5, §6)
    h: float = 0.005           # finite-difference step through the VQ encoder and the denoiser
    lr: float = 0.5            # update size of x_t per inner iteration
    constraint: bool = True    # False: patches sampled independently (same seeds, inner loop skipped)
    guidance_w: float = 2.0    # CFG w of ε = (1 + w) ε_c − w ε_u: for the caller's eps_fn, and for counting
    stochastic: bool = True    # official √β̃·z noise; False = DDIM η = 0
    patch_batch: int = 16      # patches per eps_fn / VQ call; results do not depend on it
    t0: int = 1000             # first (1-based) timestep

    def __post_init__(self) -> None:
        for name in ("steps", "patch_batch", "t0"):
            if getattr(self, name) < 1:
                raise ValueError(f"JointConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.inner_steps < 0 or self.h <= 0:
            raise ValueError(f"JointConfig: need inner_steps >= 0 and h > 0, "
                             f"got {self.inner_steps}, {self.h}")
        if self.t0 // self.steps < 1:
            raise ValueError(f"JointConfig: steps {self.steps} exceeds t0 {self.t0}")

    @property
    def stride(self) -> int:
        return self.t0 // self.steps

    def timesteps(self) -> tuple[int, ...]:
        """The 1-based outer timesteps, descending (1000, 950, …, 50 by default)."""
        return tuple(self.t0 - i * self.stride for i in range(self.steps))

    @property
    def forwards_per_call(self) -> int:
        """UNet sample-forwards per item per eps_fn call: both CFG halves count."""
        return 2 if self.guidance_w != 0 else 1


@dataclass
class JointResult:
    """Output of ``joint_multiscale_sample``.

    Counters cover the sampling loop (they equal reference notes §5.6/§9: per outer step per patch
    2(1 + 2K) UNet sample-forwards, K VQ decodes, 2K VQ encodes; guide 2 forwards + 1 decode).
    ``final_vq_decodes`` counts the decodes done afterwards for ``guide_image`` and ``consistency_mae``.
    """

    guide_latent: Tensor | None   # (1, c, h, w) final guide latent; None when a fixed guide_image was given
    patch_latents: Tensor         # (g*g, c, h, w) final patch latents, row-major over the grid
    guide_image: Tensor           # (1, 3, H, W) in [−1, 1]: clamp(decode(guide_latent)) or the given image
    unet_forwards: int
    vq_decodes: int
    vq_encodes: int
    final_vq_decodes: int
    consistency_mae: float        # mean |A(decode(patch)) − guide tile| on the [0, 255] scale (both clamped)
    patch_images: Tensor | None = None   # (g*g, 3, P, P) decode(patch) of the final patches (float32, as decoded,
    #                                      before the clamp): the blended decode reuses them for whole-patch windows


def inf_normalize(x: Tensor) -> Tensor:
    """x divided per sample (dim 0) by its max |·|; an all-zero sample stays zero (no NaN)."""
    norm = x.abs().flatten(1).amax(dim=1).clamp_min(torch.finfo(x.dtype).tiny)  # (N,)
    return x / norm.reshape(-1, *([1] * (x.ndim - 1)))


def split_tiles(image: Tensor, grid: int) -> Tensor:
    """(1, C, g·p, g·p) -> (g·g, C, p, p), tiles row-major (tile (i, j) at index i·g + j)."""
    _, c, hh, ww = image.shape
    if hh % grid or ww % grid:
        raise ValueError(f"split_tiles: image {tuple(image.shape)} not divisible into a {grid}x{grid} grid")
    p, q = hh // grid, ww // grid
    tiles = image.reshape(c, grid, p, grid, q).permute(1, 3, 0, 2, 4)  # (g, g, C, p, q)
    return tiles.reshape(grid * grid, c, p, q)


def assemble(patches: Tensor, grid: int) -> Tensor:
    """(g·g, c, h, w) row-major -> (1, c, g·h, g·w); the inverse of ``split_tiles``."""
    n, c, h, w = patches.shape
    if n != grid * grid:
        raise ValueError(f"assemble: {n} patches do not form a {grid}x{grid} grid")
    canvas = patches.reshape(grid, grid, c, h, w).permute(2, 0, 3, 1, 4)  # (c, g, h, g, w)
    return canvas.reshape(1, c, grid * h, grid * w)


def cfg_joint_eps_fn(model_fn: ModelFn, guide_context: Tensor | None, patch_contexts: Tensor,
                     w: float) -> JointEpsFn:
    """A joint ``eps_fn`` from ``model_fn(x, t, context) -> ε``: CFG ε = (1 + w)·ε_c − w·ε_u with the all-zero
    null context, both halves in one batched call (official ``large_image_gen/utils.py::model_pred``).
    guide_context (1, M, D) (None when the guide is a fixed image); patch_contexts (g·g, M, D)."""
    scale = scale_from_w(w)  # ε_u + s(ε_c − ε_u) with s = 1 + w is the same expression

    def eps_fn(x: Tensor, t: Tensor, which: str, index: slice | None) -> Tensor:
        if which in ("guide", "guide+patches") and guide_context is None:
            raise ValueError("cfg_joint_eps_fn: no guide_context was given")
        if which == "guide":
            ctx = guide_context
        elif which in ("patches", "guide+patches"):
            ctx = patch_contexts if index is None else patch_contexts[index]
            if which == "guide+patches":                          # row 0 the guide, then the patches
                ctx = torch.cat([guide_context, ctx])
        else:
            raise ValueError("cfg_joint_eps_fn: which must be 'guide', 'patches' or 'guide+patches', "
                             f"got {which!r}")
        return cfg_eps_fn(model_fn, ctx, None, scale)(x, t)
    return eps_fn


@dataclass
class _Step:
    """Coefficients of one outer step (Python floats: nothing touches the device)."""

    t: int
    idx: int         # t − 1: index into alphas_cumprod for ᾱ_t
    idx_prev: int    # max(t − 1 − stride, 0)
    alpha_bar: float
    sigma: float     # √β̃ (0 when not stochastic)

    @classmethod
    def make(cls, t: int, stride: int, schedule: Schedule, stochastic: bool) -> "_Step":
        if not 1 <= t <= schedule.T:
            raise ValueError(f"joint sampler: timestep {t} outside [1, {schedule.T}]")
        idx, idx_prev = t - 1, max(t - 1 - stride, 0)
        ab, ab_prev = schedule.alpha_bar_at(idx), schedule.alpha_bar_at(idx_prev)
        beta_tilde = float(schedule.betas[idx]) * (1 - ab_prev) / (1 - ab)
        return cls(t, idx, idx_prev, ab, math.sqrt(beta_tilde) if stochastic else 0.0)

    def x0_hat(self, x: Tensor, eps: Tensor) -> Tensor:
        return (x - math.sqrt(1 - self.alpha_bar) * eps) / math.sqrt(self.alpha_bar)

    def tvec(self, x: Tensor) -> Tensor:
        return torch.full((x.shape[0],), self.t, dtype=torch.long, device=x.device)


@torch.no_grad()
def joint_multiscale_sample(eps_fn: JointEpsFn, encode: ImageFn, decode: ImageFn, schedule: Schedule,
                            x_guide: Tensor | None, x_patches: Tensor, grid: int, cfg: JointConfig,
                            noise_fn: NoiseFn | None = None, guide_image: Tensor | None = None,
                            callback: Callable[[dict], None] | None = None,
                            progress: bool = False) -> JointResult:
    """Sample a guide latent and its g × g patch latents jointly (module docstring; reference §5.3).

    x_guide (1, c, h, w) and x_patches (g·g, c, h, w): the initial noise x_T, patches row-major; with
      per-item seeding use ``randn_items(seed, range(1 + g·g), shape)`` (item 0 = guide, items 1… = patches).
    encode(img in [−1, 1]) -> latent; decode(latent) -> img (quantising, as official ``decode_first_stage``).
    noise_fn(step_index, (1 + g·g, c, h, w)) -> z: item 0 is the guide's, item 1 + k patch k's (e.g.
      ``step_noise_fn(seed, range(1 + g·g))``); required when ``cfg.stochastic``. Row 0 is drawn and unused
      when the guide is a fixed image, so patch noise is the same in both modes.
    guide_image (1, 3, H, W) in [−1, 1]: a fixed guide (super-resolution, §6): not diffused, x_guide unused.
    callback: called after each outer step with dict(i, t, x_guide, x_patches, guide_image).
    """
    n = grid * grid
    check_inputs("joint_multiscale_sample", schedule, x_guide, x_patches, grid, cfg, noise_fn, guide_image)
    fixed_guide = guide_image is not None
    noise_shape = (1 + n, *x_patches.shape[1:])

    fpc = cfg.forwards_per_call
    unet = dec = enc = 0
    x_g = None if fixed_guide else x_guide.clone()
    x_p = x_patches.clone()
    image_g = guide_image

    for i, t in enumerate(tqdm(cfg.timesteps(), desc="joint", disable=not progress)):
        step = _Step.make(t, cfg.stride, schedule, cfg.stochastic)
        z = noise_fn(i, noise_shape).to(x_p.device) if cfg.stochastic else None  # (1+N, c, h, w)

        # 1. guide: ε_g, x̂0_g, I_g = clamp(D(x̂0_g), −1, 1); never corrected by the patches
        if not fixed_guide:
            eps_g = eps_fn(x_g, step.tvec(x_g), "guide", None)
            unet += fpc
            if cfg.constraint:
                image_g = decode(step.x0_hat(x_g, eps_g)).clamp(-1, 1)
                dec += 1
            x_g, _ = ddim_step(x_g, eps_g, step.idx, step.idx_prev, schedule, sigma=step.sigma,
                               noise=None if z is None else z[:1])
        tiles = split_tiles(image_g, grid) if cfg.constraint else None  # (N, 3, p, p)

        # 2–4. patches, in sub-batches
        for start in range(0, n, cfg.patch_batch):
            sl = slice(start, min(start + cfg.patch_batch, n))
            x = x_p[sl]
            b = x.shape[0]
            tv = step.tvec(x)
            eps = eps_fn(x, tv, "patches", sl)
            unet += fpc * b
            x0 = step.x0_hat(x, eps)
            for _ in range(cfg.inner_steps if cfg.constraint else 0):
                x, eps, x0 = pixel_iteration(eps_fn, encode, decode, step, x, x0, tiles[sl], tv, sl, cfg)
                dec += b
                enc += 2 * b
                unet += 2 * fpc * b
            x_p[sl], _ = ddim_step(x, eps, step.idx, step.idx_prev, schedule, sigma=step.sigma,
                                   noise=None if z is None else z[1 + sl.start:1 + sl.stop])
        if callback is not None:
            callback(dict(i=i, t=t, x_guide=x_g, x_patches=x_p, guide_image=image_g))

    # Final guide image and the consistency of the patches with it (not part of the loop counters).
    image_g, mae, final_dec, images = pixel_consistency(decode, x_g, x_p, None if not fixed_guide else image_g,
                                                        grid, cfg.patch_batch)
    return JointResult(guide_latent=x_g, patch_latents=x_p, guide_image=image_g, unet_forwards=unet,
                       vq_decodes=dec, vq_encodes=enc, final_vq_decodes=final_dec, consistency_mae=mae,
                       patch_images=images)


def check_inputs(name: str, schedule: Schedule, x_guide: Tensor | None, x_patches: Tensor, grid: int,
                 cfg: JointConfig, noise_fn: NoiseFn | None, guide_image: Tensor | None) -> None:
    """The argument checks every joint sampler makes (one ValueError line each, prefixed with its name)."""
    n = grid * grid
    if x_patches.ndim != 4 or x_patches.shape[0] != n:
        raise ValueError(f"{name}: x_patches must be ({n}, c, h, w) for grid {grid}, "
                         f"got {tuple(x_patches.shape)}")
    fixed_guide = guide_image is not None
    if not fixed_guide and (x_guide is None or x_guide.shape[0] != 1):
        raise ValueError(f"{name}: x_guide must be (1, c, h, w) unless guide_image is given")
    if fixed_guide and (guide_image.ndim != 4 or guide_image.shape[0] != 1):
        raise ValueError(f"{name}: guide_image must be (1, 3, H, W), got {tuple(guide_image.shape)}")
    if cfg.stochastic and noise_fn is None:
        raise ValueError(f"{name}: cfg.stochastic needs noise_fn, e.g. step_noise_fn(seed, range(1 + grid * grid))")
    if cfg.t0 > schedule.T:
        raise ValueError(f"{name}: t0 {cfg.t0} exceeds the schedule's T {schedule.T}")
    if not fixed_guide and x_guide.shape[1:] != x_patches.shape[1:] and cfg.stochastic:
        raise ValueError(f"{name}: guide and patch latents must have the same shape (one noise_fn draws both)")


def pixel_iteration(eps_fn: JointEpsFn, encode: ImageFn, decode: ImageFn, step: "_Step", x: Tensor, x0: Tensor,
                    tiles: Tensor, tv: Tensor, sl: slice, cfg: JointConfig) -> tuple[Tensor, Tensor, Tensor]:
    """One inner iteration of the reference constraint (§5.3 a–e) on patches ``sl``: (x, ε, x̂0) at the moved
    x_t. ``tiles`` (B, 3, p, p): their guide tiles. Costs 1 VQ decode, 2 encodes and 2 eps_fn calls per item."""
    image = decode(x0)                                                          # (B, 3, P, P)
    z_img = encode(image)
    factor = _factor(image, tiles)
    r = inf_normalize(upscale(tiles - downscale(image, factor), factor))
    e = inf_normalize(encode(image + cfg.h * r) - z_img)
    x0_plus = step.x0_hat(x + cfg.h * e, eps_fn(x + cfg.h * e, tv, "patches", sl))
    x = x + cfg.lr * inf_normalize((x0_plus - x0) / cfg.h)
    eps = eps_fn(x, tv, "patches", sl)
    return x, eps, step.x0_hat(x, eps)


@torch.no_grad()
def pixel_consistency(decode: ImageFn, x_guide: Tensor | None, x_patches: Tensor, guide_image: Tensor | None,
                      grid: int, patch_batch: int) -> tuple[Tensor, float, int, Tensor]:
    """(guide image, consistency MAE on [0, 255], decodes done, the decoded patches) after sampling:
    clamp(D(guide)) (or the fixed guide image) cut into tiles, each patch decoded and clamped, A in pixel space,
    mean |A(patch) − tile|."""
    n, final_dec, images = x_patches.shape[0], 0, []
    image_g = guide_image
    if image_g is None:
        image_g = decode(x_guide).clamp(-1, 1)
        final_dec += 1
    tiles = split_tiles(image_g, grid)                                          # (N, 3, p, p)
    abs_err = x_patches.new_zeros(())
    for start in range(0, n, patch_batch):
        sl = slice(start, min(start + patch_batch, n))
        raw = decode(x_patches[sl])
        images.append(raw.float())
        image = raw.clamp(-1, 1)
        final_dec += image.shape[0]
        abs_err = abs_err + (downscale(image, _factor(image, tiles)) - tiles[sl]).abs().float().sum()
    mae = float(abs_err) * 127.5 / tiles.numel()                                # [−1, 1] -> [0, 255]: × 255/2
    return image_g, mae, final_dec, torch.cat(images)


def _factor(image: Tensor, tiles: Tensor) -> int:
    """A's integer downscaling factor: patch px / tile px."""
    p, q = image.shape[-1], tiles.shape[-1]
    if p % q or image.shape[-2] != p or tiles.shape[-2] != q:
        raise ValueError(f"joint sampler: decoded patches of {tuple(image.shape[-2:])} px are not an integer "
                         f"multiple of the guide tiles of {tuple(tiles.shape[-2:])} px")
    return p // q
