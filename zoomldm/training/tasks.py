"""What each trainer optimises, as `Task` objects for the one training loop (zoomldm/training/loop.py).

A task owns its modules, its dataset and sampler, and `loss(batch, generator)`; every random draw inside the
loss (timesteps, noise, null-condition dropout) comes from the generator the loop passes, so runs are
reproducible and resumable. The loop knows nothing about diffusion.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from zoomldm import mags
from zoomldm.config import AutoencoderTrainConfig, CDMTrainConfig, LDMTrainConfig
from zoomldm.data.dataset import RegionDataset, UniformMagnificationSampler
from zoomldm.data.store import RegionStore
from zoomldm.diffusion import Schedule
from zoomldm.models.cdm import CDM_PRESETS, ConditionDiT
from zoomldm.models.summarizer import SUMMARIZER_PRESETS, Summarizer
from zoomldm.models.unet import UNET_PRESETS, UNet
from zoomldm.models.vq import VQ_PRESETS, VQModel

log = logging.getLogger(__name__)


def _randn(shape, rng, like: torch.Tensor) -> torch.Tensor:
    """Noise of `shape` (batch first) from the loop's random source, moved next to `like`.

    `rng` is a torch.Generator, or the loop's per-sample `SampleRNG` (row i from sample i's own generator, so
    the draws do not depend on how the global batch is split across processes)."""
    if isinstance(rng, torch.Generator):
        return torch.randn(shape, generator=rng, device=rng.device).to(like.device, like.dtype)
    return rng.randn(*shape[1:]).to(like.device, like.dtype)


def _rand(n: int, rng, device) -> torch.Tensor:
    if isinstance(rng, torch.Generator):
        return torch.rand(n, generator=rng, device=rng.device).to(device)
    return rng.rand().to(device)


def _randint(high: int, n: int, rng, device) -> torch.Tensor:
    if isinstance(rng, torch.Generator):
        return torch.randint(0, high, (n,), generator=rng, device=rng.device).to(device)
    return rng.randint(0, high).to(device)


class StoreTask:
    """Shared plumbing: the store, a RegionDataset over it and the uniform-magnification sampler."""

    ema_modules: tuple[str, ...] = ()
    per_sample_rng = True      # draws per sample: results independent of the number of processes (loop.py)
    kind = "train"             # checkpoint kind
    modules: dict[str, nn.Module]

    def __init__(self, store: RegionStore | str, magnifications: list[str] | None, **dataset_kwargs):
        self.store = store if isinstance(store, RegionStore) else RegionStore(store)
        self.dataset = RegionDataset(self.store, magnifications, **dataset_kwargs)
        self.collate_fn = RegionDataset.collate

    def make_sampler(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1):
        return UniformMagnificationSampler(self.dataset.sizes, num_samples, seed=seed, rank=rank,
                                           world_size=world_size)


def ldm_model_configs(store: RegionStore, preset: str):
    """UNet and Summarizer configs for a store: encoder width, ladder length and latent size follow the data."""
    levels = len(mags.ladder(store.ladder))
    summ = dataclasses.replace(SUMMARIZER_PRESETS[preset], input_dim=store.info["encoder"]["dim"],
                               mag_levels=levels)
    unet = dataclasses.replace(UNET_PRESETS[preset], context_dim=summ.hidden_dim, image_size=store.patch_px // 4)
    return unet, summ


class LDMTask(StoreTask):
    """ZoomLDM (official-implementation.md §3): eps-prediction MSE, t ~ U{0..T-1}, scaled-linear betas,
    magnification drawn uniformly per sample (the sampler), whole-context null dropout with p_uncond.
    With one magnification it is the paper's single-scale model."""

    ema_modules = ("unet",)
    kind = "zoomldm"

    def __init__(self, store, cfg: LDMTrainConfig, magnifications: list[str] | None = None):
        super().__init__(store, magnifications, latents=True)
        unet_cfg, summ_cfg = ldm_model_configs(self.store, cfg.preset)
        self.modules = {"unet": UNet(unet_cfg), "summarizer": Summarizer(summ_cfg)}
        self.p_uncond = cfg.p_uncond
        self.schedule = Schedule.scaled_linear()

    def condition(self, batch: dict) -> torch.Tensor:
        return self.modules["summarizer"](batch["grid"], batch["mag"], grid_size=batch["grid_side"])  # (N,65,D)

    def loss(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        x0 = batch["latent"]                                                        # (N, 3, h, w)
        n = len(x0)
        t = _randint(self.schedule.T, n, gen, x0.device)
        noise = _randn(x0.shape, gen, x0)
        keep = (_rand(n, gen, x0.device) >= self.p_uncond).to(x0.dtype)
        context = self.condition(batch) * keep[:, None, None]                       # null = all-zero context
        x_t = self.schedule.q_sample(x0, t, noise)
        return F.mse_loss(self.modules["unet"](x_t, t, context).float(), noise.float())


class AutoencoderTask(StoreTask):
    """VQ-f4 on the store's region images: L1 reconstruction + codebook + beta-commitment terms (van den
    Oord et al. 2017, eq. 3). No adversarial or perceptual term: it is the offline stand-in for the CompVis
    vq-f4 weights, not a reproduction of their training."""

    kind = "vq"

    def __init__(self, store, cfg: AutoencoderTrainConfig, vq: VQModel | None = None):
        super().__init__(store, None, images=True)
        if vq is None:
            vq = VQModel(dataclasses.replace(VQ_PRESETS[cfg.preset], resolution=self.store.patch_px))
            self.init_codebook(vq)
        self.modules = {"vq": vq}
        self.beta = cfg.commitment
        self.crop = cfg.crop_px

    @torch.no_grad()
    def init_codebook(self, vq: VQModel, n_images: int = 32) -> None:
        """Data-dependent codebook init: codes drawn from encoder outputs of images spread over the store.

        With the default tiny uniform init only ~20 of 512 codes are ever used and training diverged after
        ~60 steps on the demo; started from data, ~250 codes stay in use and the loss falls steadily."""
        n = len(self.dataset)
        images = self.dataset.__getitems__(list(range(0, n, max(1, n // n_images)))[:n_images])["image"]
        z = vq.encode(images).permute(0, 2, 3, 1).reshape(-1, vq.config.embed_dim)       # (pixels, C)
        codebook = vq.quantize.embedding.weight
        pick = torch.randint(0, len(z), (len(codebook),))
        codebook.copy_(z[pick] + 1e-3 * torch.randn_like(codebook))

    def loss(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        vq = self.modules["vq"]
        x = batch["image"]                                                          # (N, 3, P, P) in [-1, 1]
        if self.crop and self.crop < x.shape[-1]:                                   # a random crop per sample
            c, span = self.crop, x.shape[-1] - self.crop + 1
            top, left = _randint(span, len(x), gen, "cpu").tolist(), _randint(span, len(x), gen, "cpu").tolist()
            x = torch.stack([im[:, t:t + c, l:l + c] for im, t, l in zip(x, top, left)])  # (N, 3, c, c)
        z = vq.encode(x)
        z_q = vq.quantize.lookup(vq.quantize.codes(z)).to(z.dtype)
        rec = vq.decoder(vq.post_quant_conv(z + (z_q - z).detach()))                 # straight-through
        codebook = F.mse_loss(z_q, z.detach())
        commit = F.mse_loss(z, z_q.detach())
        return F.l1_loss(rec, x) + codebook + self.beta * commit


class CDMTask(StoreTask):
    """The CDM (official-implementation.md §4): a DiT over frozen Summarizer outputs (65 x D, transposed to
    D x 65), x0-prediction on the cosine schedule, learned-range variance with the hybrid loss
    (MSE + VLB with a stopped-gradient mean, as DiT/ADM), magnification label."""

    ema_modules = ("cdm",)
    kind = "cdm"

    def __init__(self, store, cfg: CDMTrainConfig, summarizer: Summarizer):
        super().__init__(store, None)
        self.summarizer = summarizer.eval().requires_grad_(False)
        d = summarizer.config.hidden_dim
        cdm_cfg = dataclasses.replace(CDM_PRESETS[cfg.preset], in_channels=d,
                                      mag_levels=summarizer.config.mag_levels)
        self.modules = {"cdm": ConditionDiT(cdm_cfg)}
        self.schedule = Schedule.cosine()

    def to(self, device) -> CDMTask:
        self.summarizer.to(device)
        return self

    def loss(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            x0 = self.summarizer(batch["grid"], batch["mag"], grid_size=batch["grid_side"]).transpose(1, 2)
        x0 = x0.float().contiguous()                                                # (N, D, 65)
        n = len(x0)
        t = _randint(self.schedule.T, n, gen, x0.device)
        noise = _randn(x0.shape, gen, x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        out = self.modules["cdm"](x_t, t, batch["mag"]).float()                     # (N, 2D, 65)
        x0_hat, v = out.chunk(2, dim=1)
        mse = (x0_hat - x0).pow(2).mean()
        mean, _, _ = self.schedule.posterior_mean_variance(x0_hat.detach(), x_t, t)
        vb = self.schedule.vb_terms(mean, self.schedule.learned_range_log_variance(v, t), x0, x_t, t)
        return mse + vb.mean()
