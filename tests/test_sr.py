"""Super-resolution by condition inversion (reference notes §6) with tiny random models on CPU."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from zoomldm.data.regions import standardize_tokens
from zoomldm.diffusion import Schedule
from zoomldm.diffusion.blend import count_windows
from zoomldm.diffusion.joint import JointConfig
from zoomldm.diffusion.resize import downscale
from zoomldm.metrics.sr import psnr
from zoomldm.models.summarizer import SUMMARIZER_PRESETS, Summarizer
from zoomldm.models.unet import UNET_PRESETS, UNet
from zoomldm.models.vq import VQ_PRESETS, VQModel
from zoomldm.sampling.sr import (
    inversion_loss, inversion_timesteps, invert_condition, mean_pairwise_cosine, standardize, super_resolve,
    to_uint8,
)

C = 16      # Summarizer input dim (reduced from the small preset's 1280)
P = 32      # LR / HR patch side in px -> 8 x 8 latents
SCHED = Schedule.scaled_linear()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["small"]).eval()
    # The output conv and attention out-projections start at zero: give them weights so ε uses the context.
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(std=0.05)
    summ = Summarizer(dataclasses.replace(SUMMARIZER_PRESETS["small"], input_dim=C)).eval()
    vq = VQModel(dataclasses.replace(VQ_PRESETS["small"], resolution=P)).eval()
    return unet, summ, vq


@pytest.fixture(scope="module")
def lr_image():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, P), torch.linspace(-1, 1, P), indexing="ij")
    img = torch.stack([0.5 * torch.sin(3 * xx), 0.4 * torch.cos(2 * yy), 0.3 * xx * yy])
    return img[None]                                                                    # (1, 3, P, P)


def test_standardize_matches_loader_convention():
    g = np.random.default_rng(0).normal(size=(2, C, 3, 3))
    want = np.stack([standardize_tokens(x) for x in g])
    np.testing.assert_allclose(standardize(torch.from_numpy(g)).numpy(), want, atol=1e-12)


def test_mean_pairwise_cosine():
    v = torch.randn(C)
    same = v[None, :, None, None].expand(1, C, 2, 2)
    assert math.isclose(float(mean_pairwise_cosine(same)), 1.0, abs_tol=1e-6)
    eye = torch.eye(4)[:, :, None].reshape(1, 4, 2, 2)                                # 4 orthogonal tokens
    assert float(mean_pairwise_cosine(eye)) == 0.0
    assert float(mean_pairwise_cosine(torch.randn(1, C, 1, 1))) == 0.0


def test_inversion_timesteps():
    ts = inversion_timesteps(200)
    assert ts[0] == 950 and ts[-1] == 50 and len(ts) == 200 and all(a >= b for a, b in zip(ts, ts[1:]))


class ToyDenoiser(torch.nn.Module):
    """(x, t, context) -> ε depending strongly and linearly on the context (random tiny UNets barely do)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 3)
        with torch.no_grad():
            self.proj.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(1))
            self.proj.bias.zero_()

    def forward(self, x, t, context):
        return 0.5 * x + self.proj(context.mean(1))[:, :, None, None]


def fixed_objective(unet, summ, vq, lr_image, grid, steps, seed, cos_weight):
    """The §6 objective averaged over the (t, ε) pairs the seeded inversion draws (first draw: E's init)."""
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn((1, C, grid.shape[-1], grid.shape[-1]), generator=gen)
    with torch.no_grad():
        z = vq.encode(lr_image)
        pairs = [(t, torch.randn(z.shape, generator=gen)) for t in inversion_timesteps(steps)]
        return [sum(float(inversion_loss(unet, summ, e, z, t, n, 1, SCHED, cos_weight)) for t, n in pairs)
                / steps for e in (init, grid[None])]


def test_invert_condition_decreases_loss(models, lr_image):
    _, summ, vq = models
    toy = ToyDenoiser(summ.config.hidden_dim).eval()
    steps, seed, g = 30, 3, 2
    grid, losses = invert_condition(toy, summ, vq.encode, lr_image, mag_index=1, grid_side=g, schedule=SCHED,
                                    steps=steps, seed=seed, cos_weight=0.0, return_losses=True)
    assert grid.shape == (C, g, g) and len(losses) == steps
    torch.testing.assert_close(grid.mean(0), torch.zeros(g, g), atol=1e-5, rtol=0)    # standardised tokens
    before, after = fixed_objective(toy, summ, vq, lr_image, grid, steps, seed, 0.0)
    assert after < 0.8 * before, (before, after)
    assert all(p.grad is None for p in (*toy.parameters(), *summ.parameters()))      # networks stay frozen
    assert not toy.training and not summ.training


def test_invert_condition_cosine_term_rewards_similarity(models, lr_image):
    # Official sign: loss −= 0.05 · mean pairwise cosine, so the inverted tokens are pulled together.
    _, summ, vq = models
    toy = ToyDenoiser(summ.config.hidden_dim).eval()
    init = standardize(torch.randn((1, C, 2, 2), generator=torch.Generator().manual_seed(5)))
    grid = invert_condition(toy, summ, vq.encode, lr_image, 1, 2, SCHED, steps=10, seed=5, cos_weight=5.0)
    assert float(mean_pairwise_cosine(grid[None])) > float(mean_pairwise_cosine(init)) + 0.3


def test_invert_condition_real_unet_is_seeded(models, lr_image):
    unet, summ, vq = models
    a = invert_condition(unet, summ, vq.encode, lr_image, 1, 2, SCHED, steps=2, seed=7)
    b = invert_condition(unet, summ, vq.encode, lr_image, 1, 2, SCHED, steps=2, seed=7)
    torch.testing.assert_close(a, b)
    init = standardize(torch.randn((1, C, 2, 2), generator=torch.Generator().manual_seed(7)))[0]
    assert not torch.allclose(a, init)                                                # gradients reach E
    assert all(p.grad is None for p in unet.parameters())


def test_super_resolve_returns_documented_fields(models, lr_image):
    unet, summ, vq = models
    g = 2
    cfg = JointConfig(steps=3, inner_steps=2)
    res = super_resolve(unet, summ, vq.encode, vq.decode, lr_image, mag_index=1, grid_side=g, schedule=SCHED,
                        cfg=cfg, seed=0, inversion_steps=4)
    assert res.image.shape == (1, 3, g * P, g * P) and res.image.abs().max() <= 1
    assert res.condition.shape == (C, g, g)
    assert res.joint.patch_latents.shape == (g * g, 3, P // 4, P // 4) and res.joint.guide_latent is None
    n, k = g * g, cfg.inner_steps
    assert res.joint.unet_forwards == cfg.steps * n * 2 * (1 + 2 * k)
    assert (res.joint.vq_decodes, res.joint.vq_encodes) == (cfg.steps * n * k, cfg.steps * n * 2 * k)
    # the g² whole-patch windows reuse the sampler's final per-patch decodes
    assert res.blend_decodes == count_windows(g * P // 4, g * P // 4, P // 4, P // 16) - n
    back = downscale(res.image, g).clamp(-1, 1)
    assert math.isclose(res.lr_psnr, psnr(to_uint8(back), to_uint8(lr_image)))
    assert math.isclose(res.lr_consistency_mae, float((back - lr_image).abs().mean()) * 127.5, rel_tol=1e-5)
    assert np.isfinite(res.lr_psnr) and res.lr_consistency_mae > 0
    # A given condition skips the inversion; the same seed reproduces the same image.
    res2 = super_resolve(unet, summ, vq.encode, vq.decode, lr_image, 1, g, SCHED, cfg=cfg, seed=0,
                         condition=res.condition)
    torch.testing.assert_close(res2.image, res.image)
