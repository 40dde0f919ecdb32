"""Graikos et al. (CVPR 2024), "Learned representation-guided diffusion models for large-image generation":
the patch LDM baseline (peers-and-metrics.md §2).

Base-magnification patches, each conditioned through cross-attention on a single SSL embedding of the patch
itself, L2-normalised then linearly projected (their `PatchEmbedder`), classifier-free dropout 0.1. The same
UNet as ZoomLDM; the panorama sampler (slerp-interpolated embeddings, window averaging) lives beside it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from zoomldm import mags
from zoomldm.config import GraikosTrainConfig
from zoomldm.diffusion import Schedule
from zoomldm.models.unet import UNET_PRESETS, UNet
from zoomldm.training.tasks import StoreTask, _rand, _randint, _randn


@dataclasses.dataclass(frozen=True)
class PatchEmbedderConfig:
    input_dim: int = 1024
    context_dim: int = 512


class PatchEmbedder(nn.Module):
    """SSL embedding (N, C) -> one context token (N, 1, D): L2 normalisation, then a linear projection."""

    def __init__(self, config: PatchEmbedderConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.input_dim, config.context_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.proj(F.normalize(embedding.float(), dim=-1))[:, None, :]          # (N, 1, D)


class GraikosTask(StoreTask):
    """eps-prediction MSE on base-magnification latents, conditioned on the patch's own raw SSL embedding."""

    ema_modules = ("unet",)
    kind = "graikos"

    def __init__(self, store, cfg: GraikosTrainConfig):
        from zoomldm.data.store import RegionStore
        store = store if isinstance(store, RegionStore) else RegionStore(store)
        base = mags.ladder(store.ladder)[0].name
        super().__init__(store, [base], latents=True, standardize=False)   # raw embedding, not standardised
        unet_cfg = dataclasses.replace(UNET_PRESETS[cfg.preset], image_size=store.patch_px // 4)
        embed_cfg = PatchEmbedderConfig(store.info["encoder"]["dim"], unet_cfg.context_dim)
        self.modules = {"unet": UNet(unet_cfg), "embedder": PatchEmbedder(embed_cfg)}
        self.p_uncond = cfg.p_uncond
        self.schedule = Schedule.scaled_linear()

    def loss(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        x0 = batch["latent"]
        n = len(x0)
        t = _randint(self.schedule.T, n, gen, x0.device)
        noise = _randn(x0.shape, gen, x0)
        keep = (_rand(n, gen, x0.device) >= self.p_uncond).to(x0.dtype)
        context = self.modules["embedder"](batch["grid"][:, :, 0, 0]) * keep[:, None, None]   # base tile: 1x1
        x_t = self.schedule.q_sample(x0, t, noise)
        return F.mse_loss(self.modules["unet"](x_t, t, context).float(), noise.float())
