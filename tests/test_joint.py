"""Joint multi-scale sampling, the bicubic operator A and the blended large-image decode, against closed
forms, numpy reference loops and PIL, with synthetic linear VQ maps and an analytic Gaussian denoiser."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from zoomldm.diffusion import Schedule, randn_items, step_noise_fn
from zoomldm.diffusion.blend import count_windows, decode_large, gaussian_window, window_origins
from zoomldm.diffusion.joint import (
    JointConfig, assemble, cfg_joint_eps_fn, inf_normalize, joint_multiscale_sample, split_tiles,
)
from zoomldm.diffusion.resize import bicubic_resize, downscale, upscale


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ resize
def keys(x: float) -> float:
    """Keys cubic, a = −0.5, written out."""
    x = abs(x)
    if x <= 1:
        return 1.5 * x ** 3 - 2.5 * x ** 2 + 1
    if x <= 2:
        return -0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2
    return 0.0


def ref_resize_1d(a: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB imresize along axis 0, one output pixel at a time (float64)."""
    n = a.shape[0]
    m = math.ceil(n * scale - 1e-9)
    s = min(scale, 1.0)                                   # antialiasing: kernel s·k(s·x) when downscaling
    out = np.zeros((m, *a.shape[1:]))
    for j in range(m):
        u = (j + 0.5 - (m - n * scale) / 2) / scale - 0.5  # centre of output pixel j in input coordinates
        acc, wsum = 0.0, 0.0
        for i in range(math.floor(u - 2 / s) - 1, math.ceil(u + 2 / s) + 2):
            w = s * keys(s * (u - i))
            k = i % (2 * n)
            k = k if k < n else 2 * n - 1 - k             # half-sample symmetric mirror
            acc = acc + w * a[k]
            wsum += w
        out[j] = acc / wsum
    return out


def ref_resize(img: np.ndarray, scale: float) -> np.ndarray:
    return ref_resize_1d(ref_resize_1d(img, scale).T, scale).T


@pytest.mark.parametrize("size,scale", [(16, 0.5), (16, 0.25), (12, 2.0), (9, 4.0), (10, 0.3), (7, 1.5)])
def test_resize_matches_reference_loop(size, scale):
    img = np.random.default_rng(0).normal(size=(size, size))
    ours = bicubic_resize(torch.from_numpy(img)[None, None], scale)[0, 0].numpy()
    np.testing.assert_allclose(ours, ref_resize(img, scale), atol=1e-12)


def test_resize_matches_pil_bicubic_upscale_interior():
    # PIL BICUBIC (Keys a = −0.5, centre-aligned) agrees with imresize for upscaling except within 2 input
    # pixels of the border: PIL renormalises the truncated kernel there, imresize mirrors. PIL's 8-bit path
    # rounds and clips its intermediate (horizontal-pass) image, so the uint8 check uses a smooth image.
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 255, size=(16, 16)).astype(np.float32)
    for s in (2, 4):
        ours = bicubic_resize(torch.from_numpy(a.astype(np.float64))[None, None], s)[0, 0].numpy()
        pil = np.asarray(Image.fromarray(a, mode="F").resize((16 * s, 16 * s), Image.BICUBIC))
        b = 2 * s
        np.testing.assert_allclose(ours[b:-b, b:-b], pil[b:-b, b:-b], atol=1e-3)
    yy, xx = np.mgrid[0:16, 0:16]
    smooth = np.round(127 + 100 * np.sin(xx / 3.0) * np.cos(yy / 4.0)).astype(np.uint8)
    ours = bicubic_resize(torch.from_numpy(smooth.astype(np.float64))[None, None], 4)[0, 0].numpy()
    pil = np.asarray(Image.fromarray(smooth).resize((64, 64), Image.BICUBIC)).astype(np.float64)
    assert np.abs(np.clip(np.round(ours), 0, 255) - pil)[8:-8, 8:-8].max() <= 2


@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0, 16.0])
def test_resize_keeps_constants(scale):
    x = torch.full((2, 3, 16, 16), 0.37, dtype=torch.float64)
    torch.testing.assert_close(bicubic_resize(x, scale), torch.full_like(bicubic_resize(x, scale), 0.37))


def test_resize_downscale_of_block_constant_image():
    # Antialiased bicubic ×1/2 of a 2×2-block image: output j sits at u = 2j + 0.5, taps at distances
    # 0.5, 1.5, 2.5, 3.5 get k(·/2)/2 = 111, 29, −9, −3 (/256), i.e. block j 222/256, blocks j±1 20/256,
    # blocks j±2 −3/256 (blocks mirror like pixels). So the result is NOT the block values in general (the
    # kernel reaches the neighbouring blocks, with negative lobes); it is the block values filtered by
    # [−3, 20, 222, 20, −3]/256, which reproduces them exactly when they are constant or linear (interior).
    blocks = np.random.default_rng(2).normal(size=(6, 6))
    img = np.kron(blocks, np.ones((2, 2)))                                             # (12, 12)
    ours = downscale(torch.from_numpy(img)[None, None], 2)[0, 0].numpy()
    taps = np.array([-3, 20, 222, 20, -3]) / 256
    pad = np.pad(blocks, 2, mode="symmetric")
    rows = sum(w * pad[k:k + 6, 2:-2] for k, w in enumerate(taps))
    want = sum(w * np.pad(rows, ((0, 0), (2, 2)), mode="symmetric")[:, k:k + 6] for k, w in enumerate(taps))
    np.testing.assert_allclose(ours, want, atol=1e-12)
    ramp = np.add.outer(np.arange(8.0), 0.5 * np.arange(8.0))                          # linear block values
    out = downscale(torch.from_numpy(np.kron(ramp, np.ones((2, 2))))[None, None], 2)[0, 0].numpy()
    np.testing.assert_allclose(out[2:-2, 2:-2], ramp[2:-2, 2:-2], atol=1e-12)


def test_resize_is_differentiable_and_sized():
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: bicubic_resize(v, 0.5), (x,))
    assert upscale(torch.zeros(2, 3, 16, 16), 16).shape == (2, 3, 256, 256)
    assert downscale(torch.zeros(2, 3, 256, 256), 16).shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------------------------ helpers
def test_inf_normalize():
    x = torch.tensor([[[[2.0, -4.0]]], [[[0.5, 0.25]]], [[[0.0, 0.0]]]])               # (3, 1, 1, 2)
    y = inf_normalize(x)
    torch.testing.assert_close(y[0], torch.tensor([[[0.5, -1.0]]]))
    torch.testing.assert_close(y[1], torch.tensor([[[1.0, 0.5]]]))
    assert torch.equal(y[2], torch.zeros_like(y[2]))                                     # no NaN for zeros


def test_split_tiles_and_assemble_are_row_major_inverses():
    g = 3
    patches = torch.arange(g * g, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 2, 4, 4)
    canvas = assemble(patches, g)
    assert canvas.shape == (1, 2, 12, 12)
    assert canvas[0, 0, 0, 4] == 1 and canvas[0, 0, 4, 0] == g                # tile (0,1) = 1, (1,0) = g
    torch.testing.assert_close(split_tiles(canvas, g), patches)


# ------------------------------------------------------------------------------------------------ sampler
SCHED = Schedule.scaled_linear()
AB = SCHED.alphas_cumprod.float()
VAR = 0.25  # latents ~ N(0, VAR): the exact ε-denoiser is linear


def gauss_eps(x, t, which, index):
    """Optimal ε for data N(0, VAR) at the sampler's 1-based t (ᾱ = alphas_cumprod[t − 1])."""
    assert t.dtype == torch.long and t.shape == (x.shape[0],)
    ab = AB[t - 1].reshape(-1, 1, 1, 1)                                                  # (B, 1, 1, 1)
    return torch.sqrt(1 - ab) * x / (ab * VAR + 1 - ab)


def vq_encode(img):   # a fixed linear "VQ": f = 2
    return F.avg_pool2d(img, 2)


def vq_decode(z):
    return F.interpolate(z, scale_factor=2, mode="nearest")


G, SHAPE = 2, (3, 8, 8)  # 16-px patches, 16-px guide cut into 8-px tiles: A = ×1/2


def run(cfg, seed=0, eps_fn=gauss_eps, guide_image=None, **kw):
    x = randn_items(seed, range(1 + G * G), SHAPE)
    nf = step_noise_fn(seed, range(1 + G * G)) if cfg.stochastic else None
    return joint_multiscale_sample(eps_fn, vq_encode, vq_decode, SCHED, x[:1], x[1:], G, cfg, noise_fn=nf,
                                   guide_image=guide_image, **kw)


def test_constraint_reduces_inconsistency():
    free = run(JointConfig(constraint=False))
    joint = run(JointConfig())
    assert free.consistency_mae > 40                        # independent Gaussian patches vs the guide
    assert joint.consistency_mae < 0.5 * free.consistency_mae
    torch.testing.assert_close(joint.guide_latent, free.guide_latent)  # one-way coupling: same guide


def test_per_item_determinism():
    a, b = run(JointConfig(patch_batch=1)), run(JointConfig(patch_batch=16))
    torch.testing.assert_close(a.patch_latents, b.patch_latents, atol=1e-5, rtol=1e-5)
    c = run(JointConfig(patch_batch=3))
    torch.testing.assert_close(a.patch_latents, c.patch_latents, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(JointConfig(), seed=1).patch_latents, a.patch_latents)


@pytest.mark.parametrize("constraint,fixed", [(True, False), (False, False), (True, True)])
def test_counters_closed_form(constraint, fixed):
    cfg = JointConfig(steps=4, inner_steps=3, constraint=constraint, patch_batch=3)
    guide = torch.zeros(1, 3, 16, 16) if fixed else None
    res = run(cfg, guide_image=guide)
    n, k, s = G * G, cfg.inner_steps if constraint else 0, cfg.steps
    assert res.unet_forwards == s * (n * 2 * (1 + 2 * k) + (0 if fixed else 2))
    assert res.vq_decodes == s * (n * k + (1 if constraint and not fixed else 0))
    assert res.vq_encodes == s * n * 2 * k
    assert res.final_vq_decodes == n + (0 if fixed else 1)
    assert (res.guide_latent is None) == fixed
    # §9 table: 1024² (16 patches), 20 steps, K = 10 -> 13,480 sample-forwards, 3,220 decodes, 6,400 encodes
    s, n, k = 20, 16, 10
    assert (s * (2 + n * 2 * (1 + 2 * k)), s * (1 + n * k), s * n * 2 * k) == (13480, 3220, 6400)


def test_timestep_convention_and_update_match_official_loop():
    """Constraint off: guide and patches follow the official update with t = 1000 … 50 given to the model,
    ᾱ = ac[t−1], ᾱ_prev = ac[max(t−1−50, 0)], β̃ = β[t−1](1−ᾱ_prev)/(1−ᾱ), √(1−ᾱ_prev−β̃) ε + √β̃ z."""
    seen = []

    def eps_fn(x, t, which, index):
        seen.append((which, int(t[0]), index))
        return gauss_eps(x, t, which, index)

    res = run(JointConfig(constraint=False, patch_batch=4), eps_fn=eps_fn)
    assert [t for w, t, _ in seen if w == "guide"] == list(range(1000, 0, -50))
    assert all(i == slice(0, 4) for w, _, i in seen if w == "patches")
    ac, betas = SCHED.alphas_cumprod.numpy(), SCHED.betas.numpy()
    x = randn_items(0, range(1 + G * G), SHAPE).double().numpy()
    nf = step_noise_fn(0, range(1 + G * G))
    for i, t in enumerate(range(1000, 0, -50)):
        ab, ab_prev = ac[t - 1], ac[max(t - 1 - 50, 0)]
        eps = math.sqrt(1 - ab) * x / (ab * VAR + 1 - ab)
        x0 = x / math.sqrt(ab) - eps * math.sqrt((1 - ab) / ab)
        bt = betas[t - 1] * (1 - ab_prev) / (1 - ab)
        z = nf(i, x.shape).numpy()
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - bt) * eps + math.sqrt(bt) * z
    np.testing.assert_allclose(res.guide_latent.numpy(), x[:1], atol=1e-4)
    np.testing.assert_allclose(res.patch_latents.numpy(), x[1:], atol=1e-4)


def test_fixed_guide_pulls_patches_to_the_lr_image():
    """Super-resolution mode: a fixed guide image is matched far better than by unconstrained sampling."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    guide = (0.6 * torch.sin(3 * xx) * torch.cos(2 * yy)).expand(1, 3, 16, 16)
    free = run(JointConfig(constraint=False), guide_image=guide)
    sr = run(JointConfig(inner_steps=5), guide_image=guide)
    assert sr.consistency_mae < 0.5 * free.consistency_mae
    assert torch.equal(sr.guide_image, guide)


def test_deterministic_mode_and_input_checks():
    a = run(JointConfig(stochastic=False, steps=5))
    x_g, x_p = randn_items(0, range(5), SHAPE).split([1, 4])
    b = joint_multiscale_sample(gauss_eps, vq_encode, vq_decode, SCHED, x_g, x_p, G,
                                JointConfig(stochastic=False, steps=5))
    torch.testing.assert_close(a.patch_latents, b.patch_latents)
    with pytest.raises(ValueError, match="noise_fn"):
        joint_multiscale_sample(gauss_eps, vq_encode, vq_decode, SCHED, torch.zeros(1, *SHAPE),
                                torch.zeros(4, *SHAPE), G, JointConfig())
    with pytest.raises(ValueError, match="x_patches"):
        joint_multiscale_sample(gauss_eps, vq_encode, vq_decode, SCHED, torch.zeros(1, *SHAPE),
                                torch.zeros(3, *SHAPE), G, JointConfig(stochastic=False))


def test_cfg_joint_eps_fn_official_form():
    def model_fn(x, t, ctx):   # ε depends linearly on the context's first token
        return x * ctx[:, :1, :1, None] + 1.0

    pc = torch.arange(1.0, 5.0).reshape(4, 1, 1)                                          # (4, M=1, D=1)
    fn = cfg_joint_eps_fn(model_fn, torch.full((1, 1, 1), 7.0), pc, w=2.0)
    x = torch.ones(2, 1, 2, 2)
    t = torch.full((2,), 1000)
    # (1 + w)(x·c + 1) − w(x·0 + 1) = 3c x + 1
    torch.testing.assert_close(fn(x, t, "patches", slice(1, 3)), torch.tensor([7.0, 10.0]).reshape(2, 1, 1, 1)
                               .expand(2, 1, 2, 2))
    torch.testing.assert_close(fn(x[:1], t[:1], "guide", None), torch.full((1, 1, 2, 2), 22.0))
    # the guide and patches 1, 2 in one call: the guide's context on row 0, the patches' after it
    x3, t3 = torch.ones(3, 1, 2, 2), torch.full((3,), 1000)
    torch.testing.assert_close(fn(x3, t3, "guide+patches", slice(1, 3)),
                               torch.tensor([22.0, 7.0, 10.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2))
    with pytest.raises(ValueError, match="no guide_context"):
        cfg_joint_eps_fn(model_fn, None, pc, w=2.0)(x3, t3, "guide+patches", slice(1, 3))
    with pytest.raises(ValueError, match="which must be"):
        fn(x, t, "both", slice(1, 3))


def test_callback_and_guide_image_range():
    steps = []
    res = run(JointConfig(steps=3, inner_steps=1), callback=lambda d: steps.append(d["t"]))
    assert steps == [1000, 667, 334]                      # stride = t0 // steps
    assert res.guide_image.shape == (1, 3, 16, 16) and res.guide_image.abs().max() <= 1


# ------------------------------------------------------------------------------------------------ blend
def test_decode_large_equals_whole_decode_for_equivariant_decoder():
    def up4(z):  # linear, translation-equivariant on the latent grid
        return F.interpolate(z, scale_factor=4, mode="nearest").clamp(-1, 1)

    latent = torch.rand(1, 3, 48, 40) * 2 - 1
    image, n = decode_large(latent, up4, window=16, stride=4, batch=5, return_count=True)
    torch.testing.assert_close(image, up4(latent))
    assert n == 9 * 7 == count_windows(48, 40, 16, 4)
    # a side not covered by the stride gets a flush last window (no gaps, no NaN)
    assert window_origins(50, 16, 4)[-2:] == [32, 34]
    torch.testing.assert_close(decode_large(latent[..., :50, :38], up4, 16, 4), up4(latent[..., :50, :38]))


def test_decode_large_window_count_and_kernel():
    assert count_windows(256, 256, 64, 16) == 13 ** 2
    assert count_windows(1024, 1024, 64, 16) == 61 ** 2
    calls = []

    def ident(z):
        calls.append(z.shape[0])
        return z

    _, n = decode_large(torch.zeros(1, 3, 256, 256), ident, 64, 16, return_count=True)
    assert n == 169 and sum(calls) == 169 and max(calls) == 16
    k = gaussian_window(8, 0.8)
    u = np.linspace(-1, 1, 8)
    want = np.exp(-(u[:, None] ** 2 + u[None] ** 2) / 0.64)
    np.testing.assert_allclose(k.numpy(), want / want.max(), rtol=1e-6)
