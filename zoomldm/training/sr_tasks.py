"""Training tasks of the two trained SR baselines (models in `zoomldm.models.sr_baselines`), run by the one loop.

Both train per base patch on the store's base magnification: x0 = the patch's VQ latent (P/4 side), its LR tile
= the patch's image downscaled by `grid` with the antialiased bicubic operator A, resized to the latent side
(identity for grid 4 with VQ-f4). At test time an LR image covering grid × grid base patches is cut into its
grid × grid tiles, each is super-resolved to a base patch, and the latents are decoded together
(`sample_sr_image`). ε-prediction MSE, t ~ U{0..T-1}, the scaled-linear schedule of ZoomLDM.

- `LDMSRTask`: the whole LDM-SR UNet is trained from scratch; with probability p_uncond the hint is zeroed.
- `ControlNetTask`: only the ControlNet is trained; the ZoomLDM UNet and Summarizer are frozen (held outside
  `modules`, so they get no optimizer state and are not written to the run's checkpoints). The frozen UNet's
  cross-attention context is the Summarizer output of the patch's own store embedding (1 × 1 grid at the base
  magnification), replaced by the null (all-zero) context with probability p_uncond (ControlNet drops 50 % of
  its prompts; at test time `sample sr-baseline` uses the null context, see there).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from zoomldm import mags
from zoomldm.config import ControlNetTrainConfig, LDMSRTrainConfig
from zoomldm.data.store import RegionStore
from zoomldm.diffusion import Schedule
from zoomldm.models.checkpoint import config_to_dict
from zoomldm.models.sr_baselines import (LATENT_CHANNELS, LDMSR, ControlNet, LDMSRConfig, controlled_eps, lr_hint,
                                         lr_tiles_of)
from zoomldm.models.summarizer import Summarizer
from zoomldm.models.unet import UNET_PRESETS, UNet
from zoomldm.training.tasks import StoreTask, _rand, _randint, _randn

log = logging.getLogger(__name__)


def _base_store(store) -> tuple[RegionStore, str]:
    store = store if isinstance(store, RegionStore) else RegionStore(store)
    return store, mags.ladder(store.ladder)[0].name


def _check_grid(grid: int, patch_px: int, what: str) -> None:
    if grid < 2 or patch_px % grid:
        raise ValueError(f"train.{what}.grid {grid}: the SR factor must be >= 2 and divide the patch size "
                         f"{patch_px}")


class _SRTask(StoreTask):
    """Base-patch latents and images of the store; the hint and noise draws shared by both baselines."""

    grid: int
    p_uncond: float
    schedule: Schedule

    def _draw(self, batch: dict, gen) -> tuple[torch.Tensor, ...]:
        """(x_t, t, noise, hint, keep): keep (N,) is 0 where the condition is dropped (p_uncond)."""
        x0 = batch["latent"]                                                        # (N, 3, h, w)
        n = len(x0)
        t = _randint(self.schedule.T, n, gen, x0.device)
        noise = _randn(x0.shape, gen, x0)
        keep = (_rand(n, gen, x0.device) >= self.p_uncond).to(x0.dtype)
        hint = lr_hint(lr_tiles_of(batch["image"], self.grid), x0.shape[-1])         # (N, 3, h, w)
        return self.schedule.q_sample(x0, t, noise), t, noise, hint, keep


class LDMSRTask(_SRTask):
    """LDM-SR: ε_θ([x_t, LR hint], t), no context."""

    ema_modules = ("ldm_sr",)
    kind = "ldm-sr"

    def __init__(self, store, cfg: LDMSRTrainConfig):
        store, base = _base_store(store)
        super().__init__(store, [base], latents=True, images=True)
        _check_grid(cfg.grid, store.patch_px, "ldm_sr")
        unet = dataclasses.replace(UNET_PRESETS[cfg.preset], in_channels=2 * LATENT_CHANNELS,
                                   image_size=store.patch_px // 4)
        self.modules = {"ldm_sr": LDMSR(LDMSRConfig(unet=config_to_dict(unet), grid=cfg.grid))}
        self.grid, self.p_uncond = cfg.grid, cfg.p_uncond
        self.schedule = Schedule.scaled_linear()

    def loss(self, batch: dict, gen) -> torch.Tensor:
        x_t, t, noise, hint, keep = self._draw(batch, gen)
        eps = self.modules["ldm_sr"](x_t, t, hint * keep[:, None, None, None])
        return F.mse_loss(eps.float(), noise.float())


class ControlNetTask(_SRTask):
    """ControlNet on the frozen ZoomLDM (`unet`, `summarizer`, e.g. from `sampling.denoisers.load_zoomldm`; both
    are set to eval mode and requires_grad False in place).

    Note: the LR test images of `sample sr-inputs` are the store's low-magnification regions, resized by the data
    pipeline with a BOX (area) filter, while the training LR tiles come from the bicubic operator A (the one
    ZoomLDM's own SR uses for LR consistency): a small, deliberate train/test filter gap for both baselines."""

    ema_modules = ("controlnet",)
    kind = "controlnet"

    def __init__(self, store, cfg: ControlNetTrainConfig, unet: UNet, summarizer: Summarizer):
        store, base = _base_store(store)
        super().__init__(store, [base], latents=True, images=True)
        _check_grid(cfg.grid, store.patch_px, "controlnet")
        if unet.config.image_size * 4 != store.patch_px:
            raise ValueError(f"the ZoomLDM UNet works on {unet.config.image_size}-latent patches but the store "
                             f"holds {store.patch_px}-px regions")
        if summarizer.config.input_dim != store.info["encoder"]["dim"]:
            raise ValueError(f"the ZoomLDM Summarizer takes {summarizer.config.input_dim}-d embeddings but the "
                             f"store holds {store.info['encoder']['dim']}-d ones")
        self.unet = unet.eval().requires_grad_(False)
        self.summarizer = summarizer.eval().requires_grad_(False)
        self.modules = {"controlnet": ControlNet.from_unet(self.unet, grid=cfg.grid)}
        self.grid, self.p_uncond = cfg.grid, cfg.p_uncond
        self.schedule = Schedule.scaled_linear()

    def to(self, device) -> ControlNetTask:
        self.unet.to(device)
        self.summarizer.to(device)
        return self

    def loss(self, batch: dict, gen) -> torch.Tensor:
        x_t, t, noise, hint, keep = self._draw(batch, gen)
        with torch.no_grad():
            context = self.summarizer(batch["grid"], batch["mag"], grid_size=batch["grid_side"])   # (N, 65, D)
        context = context * keep[:, None, None]                                     # null = all-zero context
        eps = controlled_eps(self.unet, self.modules["controlnet"], x_t, t, context, hint)
        return F.mse_loss(eps.float(), noise.float())


__all__ = ["ControlNetTask", "LDMSRTask"]
