"""Gaussian-blended sliding-window decoding of a large latent canvas (official ``decode_large_image``, §5.4).

The canvas is decoded window by window (``window`` × ``window`` latents, ``stride`` apart, windows fully
inside the canvas); each decoded window is weighted by a centred Gaussian
    w(x, y) = exp(−d²/σ²),  d = √(x² + y²),  x, y ∈ linspace(−1, 1, window px)    (σ = 0.8)
(max-normalised as in the official kernel; the normalisation cancels), accumulated, and divided by the
accumulated weights. Seams between the independently generated patches are thereby softened.

Deviation, only where the official code would leave pixels uncovered: when (side − window) is not a multiple
of ``stride`` the last window is added flush with the border (the official loop drops that strip and divides
by zero there). For the official sizes (64-latent windows, stride 16, 256 / 1024-latent canvases) the windows
are exactly the official ones: 13² = 169 and 61² = 3,721.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor


def window_origins(side: int, window: int, stride: int) -> list[int]:
    """Top/left offsets of the windows along one axis: 0, stride, …, plus ``side − window`` if missed."""
    if window > side or window < 1 or stride < 1:
        raise ValueError(f"decode_large: window {window} / stride {stride} do not fit a canvas side "
                         f"of {side}")
    starts = list(range(0, side - window + 1, stride))
    if starts[-1] != side - window:
        starts.append(side - window)
    return starts


def count_windows(height: int, width: int, window: int = 64, stride: int = 16) -> int:
    """Number of windows of ``decode_large`` on an (height, width) latent canvas: its VQ decodes, less those
    of its ``known`` windows."""
    return len(window_origins(height, window, stride)) * len(window_origins(width, window, stride))


def gaussian_window(size: int, sigma: float = 0.8, device=None, dtype=torch.float32) -> Tensor:
    """(size, size) weights exp(−d²/σ²) over [−1, 1]², divided by their max (official ``gaussian_kernel``)."""
    u = torch.linspace(-1, 1, size, device=device, dtype=torch.float64)
    d2 = u[:, None] ** 2 + u[None, :] ** 2                                    # (size, size)
    k = torch.exp(-d2 / sigma ** 2)
    return (k / k.max()).to(dtype)


def patch_windows(images: Tensor | None, grid: int, h: int) -> dict[tuple[int, int], Tensor]:
    """The sampler's final per-patch decodes (g², 3, P, P) keyed by their window origin on the latent canvas
    (row-major grid, h latents per patch side): the blended decode reuses every window that is a whole patch
    (all of them at stride h, a quarter at h/2) instead of decoding it again."""
    if images is None:
        return {}
    return {(r * h, c * h): images[r * grid + c] for r in range(grid) for c in range(grid)}


@torch.no_grad()
def decode_large(latent: Tensor, decode: Callable[[Tensor], Tensor], window: int = 64, stride: int = 16,
                 sigma: float = 0.8, batch: int = 16, return_count: bool = False,
                 known: Mapping[tuple[int, int], Tensor] | None = None) -> Tensor | tuple[Tensor, int]:
    """Decode a (1, c, H, W) latent canvas to a (1, 3, f·H, f·W) image in [−1, 1] by Gaussian-blended
    sliding windows. ``decode`` maps (B, c, window, window) latents to (B, 3, f·window, f·window) images;
    windows are decoded ``batch`` at a time. ``known`` maps window origins (top, left, in latents) to their
    already decoded images (3, f·window, f·window), e.g. the sampler's final per-patch decodes: those windows
    are not decoded again. With ``return_count`` also returns the number of decodes done."""
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise ValueError(f"decode_large: latent must be (1, c, H, W), got {tuple(latent.shape)}")
    _, _, hh, ww = latent.shape
    origins = [(i, j) for i in window_origins(hh, window, stride) for j in window_origins(ww, window, stride)]
    where = set(origins)
    known = {o: im for o, im in (known or {}).items() if o in where}
    todo = [o for o in origins if o not in known]
    out = acc = kernel = None
    f = 0

    def add(chunk: list[tuple[int, int]], images: Tensor) -> None:
        nonlocal out, acc, kernel, f
        if out is None:
            f = images.shape[-1] // window
            if images.shape[-1] != f * window or images.shape[-2] != f * window:
                raise ValueError(f"decode_large: decode gave {tuple(images.shape[-2:])} px for a "
                                 f"{window}-latent window; expected an integer upsampling factor")
            out = images.new_zeros(1, images.shape[1], f * hh, f * ww, dtype=torch.float32)
            acc = torch.zeros(1, 1, f * hh, f * ww, device=images.device)
            kernel = gaussian_window(f * window, sigma, device=images.device)           # (f·win, f·win)
        for (i, j), image in zip(chunk, images):
            ys, xs = slice(f * i, f * (i + window)), slice(f * j, f * (j + window))
            out[0, :, ys, xs] += image.float() * kernel
            acc[0, 0, ys, xs] += kernel

    if known:
        images = torch.stack([known[o] for o in known])
        if images.shape[-1] % window or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"decode_large: known windows of {tuple(images.shape[-2:])} px do not fit a "
                             f"{window}-latent window")
        add(list(known), images)
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        crops = torch.cat([latent[:, :, i:i + window, j:j + window] for i, j in chunk])  # (B, c, win, win)
        add(chunk, decode(crops))                                                       # (B, 3, f·win, f·win)
    image = (out / acc).clamp(-1, 1)
    return (image, len(todo)) if return_count else image
