"""The two trained super-resolution baselines of the ZoomLDM SR table (issue #6 item 3; reference notes §6).

**LDM-SR** (`LDMSR`): the CompVis LDM-SR recipe (peers-and-metrics.md §6.7) on our store. An ε-prediction UNet on
the VQ-f4 latent of one base-magnification patch whose input is x_t concatenated with the LR *image tile*
resized to the latent side (in_channels = 3 + 3). We pick the image, not its VQ latent: with the paper's 4× factor
and an f4 autoencoder the LR tile of a base patch is exactly latent-sized (P/4 px), as in CompVis' own
bsr_sr/LDM-SR configs, so the hint needs no encoder and no resampling; for other factors it is resized with the
antialiased bicubic operator. The UNet keeps its cross-attention layers but attends to a single all-zero token:
q/k/v are bias-free, so each cross-attention then contributes only its output bias (no conditioning).

**ControlNet** (`ControlNet`, Zhang et al. 2023): a trainable copy of the frozen ZoomLDM UNet's time embedding,
input blocks and middle block, initialised from it. The LR hint (the same latent-sized LR tile) goes through a
small conv stack ending in a zero-initialised conv and is added to the copy after its first input block (the
stem conv), as in the official ControlNet; every copied block's output passes a zero-initialised 1×1 conv and
is added to the frozen UNet's matching skip connection, the middle block's to the frozen middle output
(`controlled_eps`). All zero convs start at 0, so at step 0 the model is ZoomLDM exactly.

Each module carries its own config dataclass (stored in the checkpoint header, `zoomldm.models.checkpoint`), with
the wrapped UNet's fields as a plain dict and the SR factor `grid` it was trained for.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from zoomldm.diffusion import Schedule, ddim_sample, randn_items
from zoomldm.diffusion.blend import decode_large
from zoomldm.diffusion.joint import assemble, split_tiles
from zoomldm.diffusion.resize import bicubic_resize, downscale, upscale
from zoomldm.models.attention import zero_module
from zoomldm.models.checkpoint import config_from_dict, config_to_dict
from zoomldm.models.unet import UNet, UNetConfig, timestep_embedding

LATENT_CHANNELS = 3  # VQ-f4 latents


def unet_config(data: dict[str, Any] | UNetConfig) -> UNetConfig:
    return data if isinstance(data, UNetConfig) else config_from_dict(UNetConfig, data)


def lr_hint(lr_tiles: Tensor, latent_side: int) -> Tensor:
    """LR tiles (N, 3, p, p) in [-1, 1] -> the hint (N, 3, h, h) at the latent side h (bicubic, antialiased when
    shrinking; identity when p == h, the 4×/f4 case)."""
    if lr_tiles.shape[-1] == latent_side:
        return lr_tiles
    return bicubic_resize(lr_tiles, latent_side / lr_tiles.shape[-1])


def lr_tiles_of(hr_patches: Tensor, grid: int) -> Tensor:
    """Training pairs: base patches (N, 3, P, P) -> their LR tiles (N, 3, P/grid, P/grid), the antialiased bicubic
    downscaling A of the joint sampler (`diffusion.resize.downscale`)."""
    if hr_patches.shape[-1] % grid:
        raise ValueError(f"patch side {hr_patches.shape[-1]} is not divisible by the SR factor {grid}")
    return downscale(hr_patches, grid)


def null_context(n: int, context_dim: int, like: Tensor) -> Tensor:
    """The all-zero context (n, 1, D): ZoomLDM's null condition (its attention output does not depend on the
    number of zero tokens)."""
    return like.new_zeros((n, 1, context_dim))


# ---------------------------------------------------------------------------------------------------------
# LDM-SR

@dataclass(frozen=True)
class LDMSRConfig:
    unet: dict = field(default_factory=lambda: config_to_dict(UNetConfig(in_channels=2 * LATENT_CHANNELS)))
    grid: int = 4                                   # SR factor the model was trained for

    def __post_init__(self) -> None:
        c = unet_config(self.unet)
        if c.in_channels != 2 * LATENT_CHANNELS or c.out_channels != LATENT_CHANNELS:
            raise ValueError(f"LDMSRConfig: the UNet needs in_channels {2 * LATENT_CHANNELS} (x_t + LR hint) and "
                             f"out_channels {LATENT_CHANNELS}, got {c.in_channels} / {c.out_channels}")
        if self.grid < 1:
            raise ValueError(f"LDMSRConfig: grid must be >= 1, got {self.grid}")


class LDMSR(nn.Module):
    """ε_θ([x_t, hint], t) with no conditioning context: `model(x_t (N,3,h,w), t (N,), hint (N,3,h,w))`."""

    def __init__(self, config: LDMSRConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = UNet(unet_config(config.unet))

    @property
    def latent_side(self) -> int:
        return self.unet.config.image_size

    def forward(self, x_t: Tensor, timesteps: Tensor, hint: Tensor) -> Tensor:
        if hint.shape != x_t.shape:
            raise ValueError(f"LDMSR: hint {tuple(hint.shape)} must have the shape of x_t {tuple(x_t.shape)}")
        ctx = null_context(x_t.shape[0], self.unet.config.context_dim, x_t)
        x_in = torch.cat([x_t, hint.to(x_t.dtype)], dim=1)                                # (N, 6, h, w)
        return self.unet(x_in, timesteps, ctx)


# ---------------------------------------------------------------------------------------------------------
# ControlNet

@dataclass(frozen=True)
class ControlNetConfig:
    unet: dict = field(default_factory=lambda: config_to_dict(UNetConfig()))   # the frozen ZoomLDM UNet's
    grid: int = 4
    hint_channels: tuple[int, ...] = (16, 32)      # widths of the hint conv stack before the zero conv
    base_fingerprint: str = ""                     # sha256 of the frozen UNet's weights it was made from


def unet_fingerprint(unet: UNet) -> str:
    """sha256 over the frozen UNet's tensors (names, shapes, float32 bytes): ties a ControlNet to its ZoomLDM."""
    h = hashlib.sha256()
    for k, v in sorted(unet.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ControlNet(nn.Module):
    """Trainable encoder copy + hint stack + zero convs. `forward(x_t, t, context, hint)` returns the residuals
    (one per input block, then the middle block's), all exactly 0 at initialisation."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        ucfg = unet_config(config.unet)
        copy = UNet(ucfg)
        self.time_embed, self.input_blocks, self.middle_block = copy.time_embed, copy.input_blocks, copy.middle_block
        del copy                                      # its output blocks are not part of the copy
        widths = (LATENT_CHANNELS, *config.hint_channels)
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.SiLU()]
        layers.append(zero_module(nn.Conv2d(widths[-1], ucfg.model_channels, 3, padding=1)))
        self.hint_block = nn.Sequential(*layers)
        chans = [self._out_channels(b) for b in self.input_blocks]
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in chans)
        mid = self._out_channels(self.middle_block)
        self.middle_out = zero_module(nn.Conv2d(mid, mid, 1))

    @staticmethod
    def _out_channels(block: nn.Module) -> int:
        for m in reversed(list(block.modules())):
            if isinstance(m, nn.Conv2d):
                return m.out_channels
        raise ValueError("ControlNet: block without a convolution")

    @classmethod
    def from_unet(cls, unet: UNet, grid: int = 4, hint_channels: tuple[int, ...] = (16, 32)) -> ControlNet:
        """A ControlNet whose encoder copy starts as `unet`'s (same weights), tied to it by fingerprint."""
        net = cls(ControlNetConfig(unet=config_to_dict(unet.config), grid=grid, hint_channels=tuple(hint_channels),
                                   base_fingerprint=unet_fingerprint(unet)))
        own = net.state_dict()
        copied = {k: v for k, v in unet.state_dict().items() if k in own}
        if len(copied) != sum(k.startswith(("time_embed.", "input_blocks.", "middle_block.")) for k in own):
            raise ValueError("ControlNet.from_unet: the UNet's encoder does not match the copy")
        net.load_state_dict(copied, strict=False)
        return net

    def check_base(self, unet: UNet, path: str) -> None:
        """One-line ValueError unless `unet` is the ZoomLDM UNet this ControlNet was made from."""
        if config_to_dict(unet.config) != dict(self.config.unet):
            raise ValueError(f"--zoomldm {path}: its UNet architecture differs from the one this ControlNet "
                             f"was trained on")
        if self.config.base_fingerprint and unet_fingerprint(unet) != self.config.base_fingerprint:
            raise ValueError(f"--zoomldm {path}: not the ZoomLDM weights this ControlNet was trained on "
                             f"(fingerprint {unet_fingerprint(unet)} != {self.config.base_fingerprint})")

    def forward(self, x_t: Tensor, timesteps: Tensor, context: Tensor, hint: Tensor) -> list[Tensor]:
        c = unet_config(self.config.unet)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x_t.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, c.model_channels).to(self.time_embed[0].weight.dtype))
        guided = self.hint_block(hint.to(x_t.dtype))                                     # (N, model_ch, h, w)
        outs, h = [], x_t
        for i, (block, zc) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            outs.append(zc(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_out(h))
        return outs


def controlled_eps(unet: UNet, control: ControlNet, x_t: Tensor, timesteps: Tensor, context: Tensor,
                   hint: Tensor) -> Tensor:
    """The frozen UNet's forward (`UNet.forward`) with the control residuals added to its skip connections and
    middle output (official ControlNet `ControlledUnetModel`)."""
    residuals = control(x_t, timesteps, context, hint)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(x_t.shape[0])
    c = unet.config
    emb = unet.time_embed(timestep_embedding(timesteps, c.model_channels).to(unet.time_embed[0].weight.dtype))
    skips, h = [], x_t
    for block in unet.input_blocks:
        h = unet._block(block, h, emb, context)
        skips.append(h)
    h = unet._block(unet.middle_block, h, emb, context) + residuals.pop()
    for block in unet.output_blocks:
        h = unet._block(block, torch.cat([h, skips.pop() + residuals.pop()], dim=1), emb, context)
    return unet.out(h).to(x_t.dtype)


# ---------------------------------------------------------------------------------------------------------
# Sampling: one LR image (1, 3, P, P) covering grid × grid base patches -> its g·P-px HR estimate.

HintEpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]          # (x_t, t, hint) -> eps


@torch.no_grad()
def sample_sr_image(eps_fn: HintEpsFn, decode: Callable[[Tensor], Tensor], lr_image: Tensor, grid: int,
                    latent_side: int, schedule: Schedule, steps: int = 50, seed: int = 0, patch_batch: int = 16,
                    progress: bool = False) -> tuple[Tensor, int]:
    """Cut the LR image into grid × grid tiles (row-major), sample each base patch's latent by DDIM (η = 0) from
    the per-item noise of (seed, k) given its tile as the hint, assemble the latents and decode the canvas with
    `decode_large` (window = one patch latent, stride = a quarter). Returns ((1, 3, g·P, g·P) in [-1, 1], UNet
    forwards). Patches are sampled `patch_batch` at a time; results do not depend on it."""
    tiles = split_tiles(lr_image, grid)                                            # (g², 3, P/g, P/g)
    hints = lr_hint(tiles, latent_side)                                            # (g², 3, h, h)
    n, latents, forwards = grid * grid, [], 0
    for start in range(0, n, patch_batch):
        idx = list(range(start, min(n, start + patch_batch)))
        hint = hints[idx[0]:idx[-1] + 1]
        x_T = randn_items(seed, idx, (LATENT_CHANNELS, latent_side, latent_side), device=lr_image.device)
        latents.append(ddim_sample(lambda x, t, h=hint: eps_fn(x, t, h), x_T, schedule, steps, eta=0.0,
                                   progress=progress))
        forwards += len(idx) * steps
    canvas = assemble(torch.cat(latents).float(), grid)                            # (1, 3, g·h, g·h)
    image = decode_large(canvas, decode, latent_side, max(1, latent_side // 4))
    return image, forwards


def bicubic_sr(lr_image: Tensor, grid: int) -> Tensor:
    """The bicubic baseline: `diffusion.resize.upscale` (Keys a = −0.5, MATLAB imresize geometry), clamped."""
    return upscale(lr_image, grid).clamp(-1, 1)


__all__ = ["ControlNet", "ControlNetConfig", "LDMSR", "LDMSRConfig", "controlled_eps", "lr_hint", "lr_tiles_of",
           "null_context", "unet_config", "unet_fingerprint", "sample_sr_image", "bicubic_sr"]
