"""Super-resolution metrics on uint8 RGB images: PSNR, SSIM, LPIPS (peers-and-metrics.md §6.6–6.7).

Convention (the ZoomLDM SR table's own convention was not recovered): full-image RGB, data range 255.
``ssim`` is Wang et al. 2004: Gaussian window σ = 1.5 truncated at 3.5σ (11 taps), K1 = 0.01, K2 = 0.03,
population (co)variances, reflect padding, the 5-pixel border of the SSIM map dropped, averaged over the map
and then over the three channels -- numerically the same as ``skimage.metrics.structural_similarity(a, b,
channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``.
``lpips_distance`` is LPIPS v0.1 with the AlexNet trunk (``lpips`` package; its linear heads ship in the
wheel, the torchvision AlexNet backbone must be a local file).
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from zoomldm.metrics.extractors import MissingWeightsError

log = logging.getLogger(__name__)

__all__ = ["psnr", "ssim", "lpips_distance", "load_lpips_alex", "MissingWeightsError", "ALEXNET_FILE"]

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
DATA_RANGE = 255.0


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"images must be two HxWx3 arrays of equal shape, got {a.shape} and {b.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over all pixels and channels, data range 255; ``inf`` for identical images."""
    a, b = _check_pair(a, b)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(DATA_RANGE**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian window), averaged over RGB channels; data range 255."""
    a, b = _check_pair(a, b)
    truncate = 3.5  # 11-tap window for sigma = 1.5, as in Wang et al.
    pad = int(truncate * sigma + 0.5)  # window radius: the border where the window leaves the image
    if min(a.shape[:2]) < 2 * pad + 1:
        raise ValueError(f"images of shape {a.shape} are smaller than the {2 * pad + 1}-pixel SSIM window")
    c1, c2 = (k1 * DATA_RANGE) ** 2, (k2 * DATA_RANGE) ** 2

    def blur(x):
        return gaussian_filter(x, sigma=sigma, truncate=truncate, mode="reflect")

    scores = []
    for c in range(3):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx  # population (weighted) variances, as in the paper
        vy = blur(y * y) - my * my
        cxy = blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        scores.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(scores))


@functools.lru_cache(maxsize=4)
def _load_lpips_cached(weights_file: str, device: str) -> torch.nn.Module:
    import lpips

    # Build with a random trunk (no download; the linear heads come from the wheel), then load the local
    # torchvision AlexNet into it: lpips' alexnet wrapper keeps torchvision's `features` indices as the module
    # names inside slice1..slice5, so "features.3.weight" belongs to the child "3" of some slice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation inside lpips
        model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    children = {idx: m for sl in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4,
                                  model.net.slice5) for idx, m in sl.named_children()}
    expected = {f"features.{idx}.{p}" for idx, m in children.items() for p in m.state_dict()}
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"{weights_file}: not a torchvision AlexNet state dict (missing {missing[:3]})")
    for idx, m in children.items():
        m.load_state_dict({p: state[f"features.{idx}.{p}"] for p in m.state_dict()})
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_lpips_alex(weights_dir: str | Path | None = None,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """LPIPS-alex v0.1 with the AlexNet backbone read from ``weights_dir/alexnet-owt-7be5be79.pth``
    (default ``$TORCH_HOME/hub/checkpoints``, torchvision's cache). Cached per (file, device)."""
    wdir = Path(weights_dir) if weights_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    f = wdir / ALEXNET_FILE
    if not f.is_file():
        raise MissingWeightsError(f"LPIPS needs the torchvision AlexNet backbone {f} (file missing)")
    return _load_lpips_cached(str(f.resolve()), str(torch.device(device)))


def lpips_distance(a: np.ndarray, b: np.ndarray, weights_dir: str | Path | None = None,
                   device: str | torch.device = "cpu") -> float:
    """LPIPS-alex distance between two uint8 HxWx3 images (mapped to [-1, 1] as the package expects)."""
    a, b = _check_pair(a, b)
    model = load_lpips_alex(weights_dir, device)

    def to_t(x):
        return torch.from_numpy(x).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1.0  # (1,3,H,W)

    with torch.inference_mode():
        d = model(to_t(a), to_t(b))
    return float(d.flatten()[0])
