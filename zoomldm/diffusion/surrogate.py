"""Linear stand-ins of the VQ decoder and encoder, fitted by least squares (issue #8's cut, item 2).

The reference joint sampler (``joint.py``) measures the guide constraint in pixel space, which costs one VQ
decode and two VQ encodes per inner iteration and patch. The cut (``joint_fast``, constraint mode ``linear``)
keeps the pixel-space residual but replaces, inside the loop only, the encoder's Jacobian by a linear map and,
in most outer steps (``decode_every``), the decoder too (after the codebook snap, below); the maps are
fitted to the networks near the data:

    D̃(z) = PixelShuffle_f(W_d ⋆ z + b_d)      latent (c, h, w) -> image (3, f·h, f·w); W_d: k_d × k_d taps
    Ẽ(I) = W_e ⋆_f I + b_e                      image -> latent; W_e: (3f) × (3f) taps at stride f, padding f

so an inner iteration can cost two small convolutions instead of three VQ passes. ``fit_linear_vq`` solves the
ridge regressions in closed form from latents the caller supplies (the store's, or any representative set):
targets D(z), E(D(z)) and, for the encoder's linear part (what the sampler uses), its finite-difference response
to smooth perturbations of D(z), from the real networks, once per run. Fitting the response rather than E(I)
matters: on the satellite demo the value fit left the cut 50% behind the reference, the response fit 4%.

A linear map cannot reproduce the decoder's texture, but the constraint only looks at A(D(z)), the patch
downscaled by the grid factor (4 or 16): low frequencies, which a local linear map of the VQ-f4 latent carries
well (the fit's relative error of A(D̃(z)) vs A(D(z)) is reported by ``LinearVQ.fit_error``).

The real decoder snaps its input to the nearest code first, so it is piecewise constant in the latent; a linear
map applied to the raw latent responds to every small move and mispredicts the change (demo: no better than
the constraint off). Fitted with the VQ's quantiser (``fit_linear_vq(..., quantize=...)``), the decoder part is
fitted on snapped latents and ``LinearVQ.decode_quantized`` snaps before it maps, D̃(Q(z)), piecewise constant
like D: the joint cut uses it, anchored on the last real decode, for the residual of most outer steps
(``joint_fast``, ``decode_every``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LinearVQ:
    """Fitted linear decoder/encoder (module docstring). Tensors live on the device they were fitted on."""

    dec_weight: Tensor   # (3·f², c, k_d, k_d)
    dec_bias: Tensor     # (3·f²,)
    enc_weight: Tensor   # (c, 3, 3f, 3f)
    enc_bias: Tensor     # (c,)
    f: int               # VQ downsampling factor
    fit_error: dict      # relative L2 errors on the fitting set: decode, encode, decode after ×1/4 downscale
    quantize: Callable[[Tensor], Tensor] | None = None   # Q: the VQ's codebook snap, for decode_quantized

    def decode(self, z: Tensor, bias: bool = True) -> Tensor:
        """(B, c, h, w) -> (B, 3, f·h, f·w), not clamped; bias=False: the linear part alone (the Jacobian)."""
        w = self.dec_weight.to(z.dtype)
        b = self.dec_bias.to(z.dtype) if bias else None
        return F.pixel_shuffle(F.conv2d(z, w, b, padding=w.shape[-1] // 2), self.f)   # (B, 3f², h, w) -> ...

    def decode_quantized(self, z: Tensor) -> Tensor:
        """D̃(Q(z)): z (B, c, h, w) snapped to the nearest code (as the real decoder does), then ``decode``."""
        if self.quantize is None:
            raise ValueError("LinearVQ.decode_quantized needs the quantiser: fit_linear_vq(..., quantize=...)")
        return self.decode(self.quantize(z).to(z.dtype))

    def encode(self, image: Tensor, bias: bool = True) -> Tensor:
        """(B, 3, f·h, f·w) -> (B, c, h, w); bias=False: the linear part alone (the Jacobian)."""
        w = self.enc_weight.to(image.dtype)
        b = self.enc_bias.to(image.dtype) if bias else None
        return F.conv2d(image, w, b, stride=self.f, padding=self.f)

    def to(self, device: torch.device | str) -> "LinearVQ":
        return LinearVQ(self.dec_weight.to(device), self.dec_bias.to(device), self.enc_weight.to(device),
                        self.enc_bias.to(device), self.f, self.fit_error, self.quantize)


def _ridge(features: Tensor, targets: Tensor, ridge: float) -> Tensor:
    """argmin_W ‖[X 1] W − Y‖² + ridge·n·‖W‖² over rows; X (n, p), Y (n, q) -> W (p + 1, q), bias last row."""
    x = torch.cat([features, torch.ones_like(features[:, :1])], dim=1).double()   # (n, p + 1)
    y = targets.double()
    gram = x.T @ x
    reg = ridge * x.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    reg[-1, -1] = 0                                                             # no penalty on the bias
    return torch.linalg.solve(gram + reg, x.T @ y)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).float().norm() / b.float().norm().clamp_min(1e-12))


def _fit_encoder_jacobian(images: Tensor, codes: Tensor, encode: Callable[[Tensor], Tensor], f: int,
                          ridge: float, batch: int, h: float) -> Tensor:
    """(c, 3, 3f, 3f) weights W with W ⋆_f δ ≈ (E(I + h·δ) − E(I)) / h over smooth perturbations δ."""
    from .joint import inf_normalize
    from .resize import upscale
    gen = torch.Generator().manual_seed(0)
    feats, targets = [], []
    side = images.shape[-1]
    for factor in (2, 4, 8):
        if side % factor:
            continue
        for i in range(0, len(images), batch):
            img = images[i:i + batch]
            low = torch.randn(len(img), 3, side // factor, side // factor, generator=gen).to(img)
            delta = inf_normalize(upscale(low, factor))                               # (B, 3, P, P)
            dz = (encode(img + h * delta).float() - codes[i:i + batch]) / h             # (B, c, h, w)
            feats.append(F.unfold(delta, 3 * f, stride=f, padding=f).transpose(1, 2).flatten(0, 1))
            targets.append(dz.flatten(2).transpose(1, 2).flatten(0, 1))
    w = _ridge(torch.cat(feats), torch.cat(targets), ridge)                          # (27f² + 1, c)
    return w[:-1].T.reshape(codes.shape[1], 3, 3 * f, 3 * f).float()


@torch.no_grad()
def fit_linear_vq(latents: Tensor, decode: Callable[[Tensor], Tensor], encode: Callable[[Tensor], Tensor],
                  dec_taps: int = 3, ridge: float = 1e-4, batch: int = 64, encoder: str = "jacobian",
                  fd_step: float = 0.05, quantize: Callable[[Tensor], Tensor] | None = None) -> LinearVQ:
    """Fit D̃ and Ẽ to ``decode`` / ``encode`` on ``latents`` (N, c, h, w) (module docstring).

    decode(latent) -> image in [−1, 1] (quantising, as the samplers use it); encode(image) -> latent. Both are
    called on batches of ``batch``. N·h·w must exceed the unknowns (c·k_d² + 1 and 27·f² + 1 per output);
    a few dozen patches are plenty.

    encoder "value" fits Ẽ(I) ≈ E(I) (weights and bias); "jacobian" fits the linear part to the encoder's
    response to smooth perturbations, (E(I + s·δ) − E(I)) / s (s = fd_step) with δ = Up(noise) at ×2, ×4 and
    ×8 (the shape of the sampler's residuals), which is all the sampler uses, and the bias as the mean of
    E(I) − W ⋆ I. Call it with a float32 encoder: the finite difference needs the mantissa.

    quantize(latent) -> the latent snapped to its nearest codes (the VQ's codebook search). Given, the decoder
    part is fitted on snapped latents (what the real decoder sees) and ``quantize`` is kept for
    ``LinearVQ.decode_quantized``.
    """
    if encoder not in ("jacobian", "value"):
        raise ValueError(f"fit_linear_vq: encoder must be 'jacobian' or 'value', got {encoder!r}")
    if latents.ndim != 4:
        raise ValueError(f"fit_linear_vq: latents must be (N, c, h, w), got {tuple(latents.shape)}")
    if dec_taps % 2 != 1:
        raise ValueError(f"fit_linear_vq: dec_taps must be odd, got {dec_taps}")
    latents = latents.float()
    if quantize is not None:
        snapped = torch.cat([quantize(latents[i:i + batch]).float() for i in range(0, len(latents), batch)])
        if snapped.shape != latents.shape:
            raise ValueError(f"fit_linear_vq: quantize changed the latents' shape {tuple(latents.shape)} "
                             f"to {tuple(snapped.shape)}")
        latents = snapped
    images = torch.cat([decode(latents[i:i + batch]).float() for i in range(0, len(latents), batch)])
    codes = torch.cat([encode(images[i:i + batch]).float() for i in range(0, len(images), batch)])
    n, c, h, w = latents.shape
    f = images.shape[-1] // w
    if images.shape[-2:] != (f * h, f * w):
        raise ValueError(f"fit_linear_vq: decode gave {tuple(images.shape[-2:])} px for {h}x{w} latents")
    if n * h * w <= max(c * dec_taps ** 2, 27 * f * f) + 1:
        raise ValueError(f"fit_linear_vq: {n} latents of {h}x{w} are too few for the fit")

    # decoder: k_d × k_d latent neighbourhood -> the f × f pixels of the centre latent (3·f² outputs)
    feats = F.unfold(latents, dec_taps, padding=dec_taps // 2)                  # (N, c·k², h·w)
    targets = F.pixel_unshuffle(images, f).flatten(2)                           # (N, 3f², h·w)
    wd = _ridge(feats.transpose(1, 2).reshape(-1, feats.shape[1]),
                targets.transpose(1, 2).reshape(-1, targets.shape[1]), ridge)  # (c·k² + 1, 3f²)
    dec_weight = wd[:-1].T.reshape(3 * f * f, c, dec_taps, dec_taps).float()
    dec_bias = wd[-1].float()

    # encoder: the 3f × 3f pixels around a latent's f × f block -> its c channels
    if encoder == "jacobian":
        enc_weight = _fit_encoder_jacobian(images, codes, encode, f, ridge, batch, fd_step)
        enc_bias = (codes - F.conv2d(images, enc_weight, stride=f, padding=f)).mean(dim=(0, 2, 3))   # (c,)
    else:
        feats = F.unfold(images, 3 * f, stride=f, padding=f)                    # (N, 27f², h·w)
        we = _ridge(feats.transpose(1, 2).reshape(-1, feats.shape[1]),
                    codes.flatten(2).transpose(1, 2).reshape(-1, c), ridge)     # (27f² + 1, c)
        enc_weight = we[:-1].T.reshape(c, 3, 3 * f, 3 * f).float()
        enc_bias = we[-1].float()

    lin = LinearVQ(dec_weight, dec_bias, enc_weight, enc_bias, f, {}, quantize)
    from .resize import downscale
    approx = lin.decode(latents)
    lin.fit_error.update(decode=_rel(approx, images), encode=_rel(lin.encode(images), codes),
                         decode_down4=_rel(downscale(approx, 4), downscale(images, 4)))
    return lin
