"""A cheaper joint multi-scale sampler: the reference constraint with its two finite differences made linear
(issue #8, item 2).

One inner iteration of the reference sampler (``joint.py``, official algorithm, reference notes §5.3) costs per
base patch 1 VQ decode, 2 VQ encodes and 2 CFG model calls:

    r = ‖Up(tile − A(D(x̂0)))‖∞                     pixel residual                        (1 decode)
    e = ‖E(D(x̂0) + h·r) − E(D(x̂0))‖∞              ≈ J_E·r, finite difference through E  (2 encodes)
    g = ‖x̂0(x_t + h·e) − x̂0(x_t)‖∞                ≈ J_x̂0·e, finite difference, UNet    (1 CFG call)
    x_t ← x_t + lr·g;  ε, x̂0 at the new x_t                                               (1 CFG call)

The ``linear`` constraint mode keeps the residual exactly (same decode, same A, same guide tiles) and replaces
both Jacobians by linear maps:

    e = ‖Ẽ·r‖∞       Ẽ: a linear map fitted to E's response to smooth perturbations (``surrogate.fit_linear_vq``)
    g = e            ε held fixed: x̂0 = (x_t − √(1−ᾱ)ε)/√ᾱ moves by Δx_t/√ᾱ, i.e. J_x̂0 = I/√ᾱ, and the
                     ∞-normalisation removes the 1/√ᾱ
    x_t ← x_t + lr·e;  x̂0 ← x̂0(x_t, ε)  (no model call)

so an inner iteration costs 1 VQ decode (none in most steps with ``decode_every``, below) and no model call; the
outer loop, the DDIM-style update, the one-way
coupling, the guide decoded at every outer step and the final pixel-space ``consistency_mae`` are those of
``joint.py`` (same function), so the two modes are compared apples to apples. On the demo model (10 outer steps,
16 images, same seeds; bench/RESULTS.md) K = 1 gives a consistency MAE of 19.3 against the reference's 20.0
with K = 2 and the same Crop-FID (211.3 vs 211.2, seed-to-seed spread 5.6), at 1/6 of the reference's
inner-loop VQ passes and 1/5 of its model calls.

``constraint_steps = N`` constrains only the first N outer steps: the early, noisy steps are where the
constraint matters (demo, 10 outer steps, K = 1, images 0–3: all steps 19.8; skipping the first 2 steps 23.8;
skipping the last 2, 3, 4 steps 20.7, 21.4, 22.6; the reference 20.5), so the last ones can go for speed.

``decode_every = k`` goes further: the residual is measured through the real decoder only in every k-th
constrained outer step, counted back from the last one (which always decodes); in the steps between, through
the fitted linear decoder after the codebook snap, D̃(Q(x̂0)) (``LinearVQ.decode_quantized``), plus the anchor
D(x̂0) − D̃(Q(x̂0)) that the patch kept from its last real decode: those steps cost no VQ pass. The snap
matters: the real decoder is piecewise constant in x̂0, and the raw linear map is not (H&E demo, images 0, 1,
no real decode: 34.0 without the snap, 22.3 with it). The anchor matters too: it carries the surrogate's
systematic error, which depends on the data. Demo models, 10 outer steps, K = 1, same seeds (consistency MAE;
H&E on 16 images, satellite on 6):

    loop decodes per step and patch                 H&E demo   satellite demo
    reference, K = 2: 2 decodes + 4 encodes           20.0         17.5
    linear, every step decodes: 1                     19.3         18.5
    decode_every = 3 (steps 9, 6, 3, 0): 0.4          18.8         19.2
    decode_every = 2: 0.5                               -          20.1
    real decode only in the last 2 steps: 0.2         19.6         26.6   (no anchor: fails on satellite)

Crop-FID (H&E, 16 images, 128 crops, stand-in extractor; bench/RESULTS.md): decode_every = 3 sits 4.3 and 5.2
above the reference on two seed sets (217.0 vs 212.7, 214.6 vs 209.4), about the reference's own seed-to-seed
spread (3.3 and 5.7), while its CLIP-FID is lower (449.7 vs 469.2, 449.1 vs 476.5). At the paper's 20 outer
steps (images 0–5) k = 3 matches decoding in every step: H&E 17.9 vs 18.0 (reference 17.0), satellite 17.50
vs 17.53.

Why the linear encoder and not the latent residual of an earlier version: averaging VQ latents is not the
latent of the averaged image, so a residual measured on latents misses most of the pixel inconsistency (demo:
50.1); the direction, by contrast, only needs the encoder's local response, which a linear fit carries
(cosine 0.91 with the finite difference through the demo encoder). A linear *decoder* in the residual fails:
the real decoder quantises, so it is piecewise constant in x̂0 and a linear model of it mispredicts the
change (demo: no better than the constraint off).

The guide's ε comes from the same model call as the first patch batch (``eps_fn(..., "guide+patches", ...)``):
one UNet batch of 2(1 + B) per outer step at 1024², instead of that batch less the guide plus a batch of 2 that
launches every kernel of a forward for one image. Per item the ε is the same (up to the rounding of the batch
shape), and so are the counts.

Select with ``FastJointConfig(constraint_mode="linear")`` and call ``joint_sample(..., linear_vq=...)``, which
falls back to the untouched reference ``joint_multiscale_sample`` for ``constraint_mode="reference"`` (or a
plain JointConfig).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .joint import (
    ImageFn, JointConfig, JointEpsFn, JointResult, _factor, _Step, check_inputs, inf_normalize,
    joint_multiscale_sample, pixel_consistency, split_tiles,
)
from .resize import downscale, upscale
from .samplers import NoiseFn, ddim_step
from .schedule import Schedule
from .surrogate import LinearVQ

CONSTRAINT_MODES = ("reference", "linear")


@dataclass(frozen=True)
class FastJointConfig(JointConfig):
    """JointConfig plus the choice of constraint algorithm; ``reference`` reproduces ``joint.py`` exactly."""

    constraint_mode: str = "reference"   # "reference" (official) | "linear" (1 VQ decode per inner iteration)
    constraint_steps: int | None = None  # linear mode: constrain only the first N outer steps (None: all)
    decode_every: int | None = None      # linear mode: the real VQ decode in the residual only in every k-th
    #                                      constrained outer step (counted back from the last), the anchored
    #                                      D̃(Q(x̂0)) in between (None or 1: every step)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.constraint_mode not in CONSTRAINT_MODES:
            raise ValueError(f"FastJointConfig.constraint_mode must be one of {CONSTRAINT_MODES}, "
                             f"got {self.constraint_mode!r}")
        if self.constraint_steps is not None and self.constraint_steps < 0:
            raise ValueError(f"FastJointConfig.constraint_steps must be >= 0 or None, got {self.constraint_steps}")
        if self.decode_every is not None and self.decode_every < 1:
            raise ValueError(f"FastJointConfig.decode_every must be >= 1 or None, got {self.decode_every}")


def joint_sample(eps_fn: JointEpsFn, encode: ImageFn, decode: ImageFn, schedule: Schedule,
                 x_guide: Tensor | None, x_patches: Tensor, grid: int, cfg: JointConfig,
                 linear_vq: LinearVQ | None = None, **kwargs) -> JointResult:
    """Dispatch on ``cfg.constraint_mode``: ``joint_linear_sample`` (needs ``linear_vq``) or the reference
    ``joint_multiscale_sample`` (same arguments: noise_fn, guide_image, callback, progress)."""
    if isinstance(cfg, FastJointConfig) and cfg.constraint_mode == "linear":
        if linear_vq is None and cfg.constraint and cfg.inner_steps > 0:     # constraint off: never used
            raise ValueError("joint_sample: constraint_mode 'linear' needs linear_vq "
                             "(zoomldm.diffusion.surrogate.fit_linear_vq)")
        return joint_linear_sample(eps_fn, linear_vq, decode, schedule, x_guide, x_patches, grid, cfg, **kwargs)
    return joint_multiscale_sample(eps_fn, encode, decode, schedule, x_guide, x_patches, grid, cfg, **kwargs)


def linear_iteration(decode: ImageFn, linear_vq: LinearVQ, step: _Step, x: Tensor, eps: Tensor, x0: Tensor,
                     tiles: Tensor, lr: float) -> tuple[Tensor, Tensor]:
    """One inner iteration of the linear mode (module docstring) on a batch of patches: (x_t, x̂0) moved.
    ``tiles`` (B, 3, p, p): their guide tiles. Costs 1 ``decode`` per item (the VQ, or the fitted D̃∘Q of
    ``decode_every``) and no model call."""
    image = decode(x0)                                                          # (B, 3, P, P)
    factor = _factor(image, tiles)
    r = inf_normalize(upscale(tiles - downscale(image, factor), factor))        # (B, 3, P, P)
    x = x + lr * inf_normalize(linear_vq.encode(r.to(x.dtype), bias=False))     # (B, c, h, w)
    return x, step.x0_hat(x, eps)


def _anchored_decode(decode: ImageFn, linear_vq: LinearVQ, anchor: dict[int, Tensor], key: int,
                     z: Tensor) -> Tensor:
    """The real decode, keeping its difference to the surrogate as the anchor of the following steps."""
    image = decode(z)
    anchor[key] = image.float() - linear_vq.decode_quantized(z).float()     # float32 even under autocast
    return image


def _surrogate_decode(decode: ImageFn, linear_vq: LinearVQ, anchor: dict[int, Tensor], key: int,
                      z: Tensor) -> Tensor:
    """D̃(Q(z)) plus the anchor of the last real decode (none before the first), clamped as the decoder is."""
    image = linear_vq.decode_quantized(z).float()
    return (image if key not in anchor else image + anchor[key]).clamp(-1, 1)


@torch.no_grad()
def joint_linear_sample(eps_fn: JointEpsFn, linear_vq: LinearVQ, decode: ImageFn, schedule: Schedule,
                        x_guide: Tensor | None, x_patches: Tensor, grid: int, cfg: JointConfig,
                        noise_fn: NoiseFn | None = None, guide_image: Tensor | None = None,
                        callback: Callable[[dict], None] | None = None,
                        progress: bool = False) -> JointResult:
    """The joint sampler with the linear constraint (module docstring). Arguments, seeding and the returned
    JointResult are those of ``joint.joint_multiscale_sample`` (``vq_encodes`` stays 0)."""
    n = grid * grid
    check_inputs("joint_linear_sample", schedule, x_guide, x_patches, grid, cfg, noise_fn, guide_image)
    fixed_guide = guide_image is not None
    noise_shape = (1 + n, *x_patches.shape[1:])
    fpc = cfg.forwards_per_call
    unet = dec = 0
    x_g = None if fixed_guide else x_guide.clone()
    x_p = x_patches.clone()
    image_g = guide_image
    last = cfg.steps if getattr(cfg, "constraint_steps", None) is None else cfg.constraint_steps
    every = getattr(cfg, "decode_every", None) or 1
    end = min(last, cfg.steps) - 1                       # the last constrained outer step always decodes
    constrained = cfg.constraint and cfg.inner_steps > 0 and end >= 0
    if linear_vq is None and constrained:
        raise ValueError("joint_linear_sample: the constraint needs linear_vq (surrogate.fit_linear_vq)")
    if every > 1 and constrained and linear_vq.quantize is None:
        raise ValueError("joint_linear_sample: decode_every needs a linear_vq fitted with the quantiser "
                         "(fit_linear_vq(..., quantize=...))")
    anchor: dict[int, Tensor] = {}   # per patch batch (its first index): D(x̂0) − D̃(Q(x̂0)), last real decode

    for i, t in enumerate(tqdm(cfg.timesteps(), desc="joint-linear", disable=not progress)):
        inner = cfg.inner_steps if cfg.constraint and i < last else 0
        step = _Step.make(t, cfg.stride, schedule, cfg.stochastic)
        z = noise_fn(i, noise_shape).to(x_p.device) if cfg.stochastic else None  # (1+N, c, h, w)
        first = None    # the first patch batch's ε, from the guide's model call
        if not fixed_guide:
            # the guide in the same model call as the first patch batch: one UNet batch of 2(1 + B) instead of
            # an extra batch of 2, which on a GPU costs the launches of a whole forward for one image (the
            # eps_fn is batch-independent per item, so ε is the same up to the rounding of the batch shape)
            sl0 = slice(0, min(cfg.patch_batch, n))
            x_both = torch.cat([x_g, x_p[sl0]])
            eps_g, first = eps_fn(x_both, step.tvec(x_both), "guide+patches", sl0).split([1, sl0.stop])
            unet += fpc
            if inner:
                image_g = decode(step.x0_hat(x_g, eps_g)).clamp(-1, 1)       # (1, 3, P, P)
                dec += 1
            x_g, _ = ddim_step(x_g, eps_g, step.idx, step.idx_prev, schedule, sigma=step.sigma,
                               noise=None if z is None else z[:1])
        tiles = split_tiles(image_g, grid) if inner else None                   # (N, 3, p, p)
        real = every == 1 or (end - i) % every == 0        # this step's residual decodes for real

        for start in range(0, n, cfg.patch_batch):
            sl = slice(start, min(start + cfg.patch_batch, n))
            x = x_p[sl]
            eps = first if start == 0 and first is not None else eps_fn(x, step.tvec(x), "patches", sl)
            unet += fpc * x.shape[0]
            x0 = step.x0_hat(x, eps)
            fn = decode if every == 1 else partial(_anchored_decode if real else _surrogate_decode,
                                                   decode, linear_vq, anchor, sl.start)
            for _ in range(inner):
                x, x0 = linear_iteration(fn, linear_vq, step, x, eps, x0, tiles[sl], cfg.lr)
                dec += x.shape[0] if real else 0
            x_p[sl], _ = ddim_step(x, eps, step.idx, step.idx_prev, schedule, sigma=step.sigma,
                                   noise=None if z is None else z[1 + sl.start:1 + sl.stop])
        if callback is not None:
            callback(dict(i=i, t=t, x_guide=x_g, x_patches=x_p, guide_image=image_g))

    image_g, mae, final_dec, images = pixel_consistency(decode, x_g, x_p, guide_image, grid, cfg.patch_batch)
    return JointResult(guide_latent=x_g, patch_latents=x_p, guide_image=image_g, unet_forwards=unet,
                       vq_decodes=dec, vq_encodes=0, final_vq_decodes=final_dec, consistency_mae=mae,
                       patch_images=images)
