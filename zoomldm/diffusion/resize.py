"""MATLAB-``imresize``-style bicubic resizing: the operator A of joint multi-scale sampling and its "Up".

ZoomLDM's joint sampler compares a decoded 20x patch with its tile of the low-magnification guide through
A = "bicubic downscale by 1/f with antialiasing" and lifts pixel residuals back with Up = "bicubic upscale by
f" (official ``large_image_gen/resizer.py::Resizer``, a port of MATLAB ``imresize``; reference notes §5.1).
Written here from MATLAB's documented algorithm:

* Keys cubic kernel with a = −0.5 (support 2):
      k(x) = 1.5|x|³ − 2.5|x|² + 1              for |x| ≤ 1
           = −0.5|x|³ + 2.5|x|² − 4|x| + 2      for 1 < |x| ≤ 2,   0 otherwise;
* antialiasing when downscaling (scale s < 1): the kernel is stretched to s·k(s·x), support 2/s;
* output pixel j (0-based) sits at input coordinate u_j = (j + 0.5 − δ)/s − 0.5 (pixel centres aligned,
  δ = (n_out − s·n_in)/2 recentres when s·n_in is not an integer; n_out = ⌈s·n_in⌉);
* taps i = ⌊u_j − support⌋ … ⌊u_j − support⌋ + ⌈2·support⌉ + 1 with weights k_s(u_j − i), normalised to
  sum 1, out-of-range taps mirrored half-sample-symmetrically (… 1 0 | 0 1 … n−1 | n−1 n−2 …).

Each axis is a fixed linear map, so it is precomputed once per (length, scale) as a dense (n_out, n_in)
matrix and applied with two matmuls: batched, differentiable, no host syncs. Separable axes commute, so
unlike the official Resizer no axis order is needed.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

CUBIC_A = -0.5  # Keys (1981) parameter used by MATLAB imresize, PIL BICUBIC and the official Resizer


def cubic(x: Tensor) -> Tensor:
    """Keys cubic convolution kernel with a = −0.5 (see module docstring)."""
    ax = x.abs()
    ax2, ax3 = ax ** 2, ax ** 3
    inner = (CUBIC_A + 2) * ax3 - (CUBIC_A + 3) * ax2 + 1
    outer = CUBIC_A * ax3 - 5 * CUBIC_A * ax2 + 8 * CUBIC_A * ax - 4 * CUBIC_A
    return torch.where(ax <= 1, inner, torch.where(ax <= 2, outer, torch.zeros_like(ax)))


def output_size(in_size: int, scale: float) -> int:
    """MATLAB's output length ⌈scale · in_size⌉ (tolerant to float round-off, e.g. 256 · 0.25)."""
    return max(1, math.ceil(in_size * scale - 1e-9))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, scale: float, antialias: bool = True) -> Tensor:
    """The (n_out, n_in) float64 CPU matrix W of one axis: y = W @ x. Treat as read-only (cached)."""
    if in_size < 1 or not scale > 0:
        raise ValueError(f"resize: need in_size >= 1 and scale > 0, got {in_size}, {scale}")
    out_size = output_size(in_size, scale)
    k_scale = scale if (antialias and scale < 1) else 1.0  # kernel stretch 1/s when downscaling
    support = 2.0 / k_scale
    shift = (out_size - in_size * scale) / 2
    u = (torch.arange(out_size, dtype=torch.float64) + 0.5 - shift) / scale - 0.5   # (n_out,) input coords
    taps = int(math.ceil(2 * support)) + 2
    idx = torch.floor(u - support)[:, None] + torch.arange(taps, dtype=torch.float64)  # (n_out, taps)
    w = k_scale * cubic(k_scale * (u[:, None] - idx))                                # (n_out, taps)
    w = w / w.sum(dim=1, keepdim=True)
    period = 2 * in_size                                                             # half-sample mirror
    m = torch.remainder(idx.long(), period)
    m = torch.where(m < in_size, m, period - 1 - m)
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    return mat.scatter_add_(1, m, w)                                                 # mirrored taps add up


@functools.lru_cache(maxsize=64)
def _resize_matrix(in_size: int, scale: float, antialias: bool, device: torch.device,
                   dtype: torch.dtype) -> Tensor:
    # Cached per device/dtype so repeated calls inside a sampling loop do no host-to-device copies.
    return resize_matrix(in_size, scale, antialias).to(device=device, dtype=dtype)


def bicubic_resize(x: Tensor, scale: float, antialias: bool = True) -> Tensor:
    """Resize (N, C, H, W) by ``scale`` on both axes -> (N, C, ⌈sH⌉, ⌈sW⌉), MATLAB imresize semantics."""
    if x.ndim != 4:
        raise ValueError(f"bicubic_resize: expected (N, C, H, W), got shape {tuple(x.shape)}")
    scale = float(scale)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    mh = _resize_matrix(x.shape[-2], scale, antialias, x.device, dtype)            # (H', H)
    mw = _resize_matrix(x.shape[-1], scale, antialias, x.device, dtype)            # (W', W)
    y = torch.matmul(mh, torch.matmul(x.to(dtype), mw.T))                          # (N, C, H', W')
    return y.to(x.dtype)


def downscale(x: Tensor, factor: int) -> Tensor:
    """The operator A: antialiased bicubic downscaling by 1/factor (official Resizer with scale 1/f)."""
    return bicubic_resize(x, 1.0 / factor)


def upscale(x: Tensor, factor: int) -> Tensor:
    """"Up": bicubic upscaling by ``factor``, used by the official sampler in place of Aᵀ (§5.1)."""
    return bicubic_resize(x, float(factor))
