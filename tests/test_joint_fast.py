"""The linear-constraint joint sampler (joint_fast.py), the fitted linear VQ (surrogate.py) and the
larger-stride blended decode (blend_fast.py), on the toy problem of test_joint.py: analytic Gaussian denoiser,
linear f = 2 "VQ", 2 × 2 grid of 8-latent patches."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from test_joint import AB, G, SCHED, SHAPE, gauss_eps, run, vq_decode, vq_encode
from zoomldm.diffusion import randn_items, step_noise_fn
from zoomldm.diffusion.blend import count_windows, decode_large, patch_windows
from zoomldm.diffusion.blend_fast import blend_decode_count, blend_weights, half_stride
from zoomldm.diffusion.joint import JointConfig, _Step, pixel_iteration
from zoomldm.diffusion.joint_fast import FastJointConfig, joint_linear_sample, joint_sample, linear_iteration
from zoomldm.diffusion.surrogate import fit_linear_vq

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VARS = torch.tensor([0.02, 0.25, 1.0]).reshape(1, 3, 1, 1)   # per-channel data variance: J is not ∝ identity


def aniso_eps(x, t, which, index):
    """Optimal ε for data N(0, diag(VARS)) per channel: x̂0's Jacobian differs per channel."""
    ab = AB[t - 1].reshape(-1, 1, 1, 1)                                                  # (B, 1, 1, 1)
    return torch.sqrt(1 - ab) * x / (ab * VARS + 1 - ab)


def toy_linear_vq(seed=0):
    return fit_linear_vq(torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(seed)), vq_decode,
                         vq_encode, ridge=1e-9)


def run_fast(cfg, seed=0, eps_fn=gauss_eps, guide_image=None, linear_vq=None):
    x = randn_items(seed, range(1 + G * G), SHAPE)
    nf = step_noise_fn(seed, range(1 + G * G)) if cfg.stochastic else None
    return joint_sample(eps_fn, vq_encode, vq_decode, SCHED, x[:1], x[1:], G, cfg, noise_fn=nf,
                        guide_image=guide_image, linear_vq=linear_vq or toy_linear_vq())


# ------------------------------------------------------------------------------------------------ linear VQ
def test_fit_recovers_a_linear_vq_exactly():
    """The toy VQ is linear (nearest ×2 up, 2 × 2 mean down): the least-squares fit must reproduce it on new
    inputs, bias zero. The Jacobian fit (default) only sees smooth perturbations, so it is checked on smooth
    images; the value fit on any image."""
    lin = toy_linear_vq()
    assert max(lin.fit_error.values()) < 1e-6
    z, img = torch.randn(5, *SHAPE), torch.rand(5, 3, 16, 16) * 2 - 1
    smooth = F.interpolate(torch.randn(5, 3, 4, 4), scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(lin.decode(z), vq_decode(z), atol=1e-5, rtol=0)
    torch.testing.assert_close(lin.encode(smooth, bias=False), vq_encode(smooth), atol=1e-4, rtol=0)
    value = fit_linear_vq(torch.randn(24, *SHAPE), vq_decode, vq_encode, ridge=1e-9, encoder="value")
    torch.testing.assert_close(value.encode(img), vq_encode(img), atol=1e-5, rtol=0)
    torch.testing.assert_close(value.encode(img, bias=False), vq_encode(img), atol=1e-5, rtol=0)


def test_fit_of_an_affine_encoder_on_the_decoder_range_and_bad_input():
    """An affine encoder (3 × 3 taps at stride 2, bias) is recovered on what the decoder produces (the fit
    only sees decoded images, so only that range is identified); bias=False removes the fitted bias."""
    w, b = torch.randn(3, 3, 3, 3), torch.tensor([0.3, -0.2, 0.1])
    enc = lambda img: F.conv2d(img, w, b, stride=2, padding=1)                          # noqa: E731
    lin = fit_linear_vq(torch.randn(24, *SHAPE), vq_decode, enc, ridge=1e-9)
    img = vq_decode(torch.randn(4, *SHAPE))
    torch.testing.assert_close(lin.encode(img), enc(img), atol=1e-3, rtol=0)
    torch.testing.assert_close(lin.encode(img) - lin.encode(img, bias=False),
                               lin.enc_bias.reshape(1, 3, 1, 1).expand(4, 3, 8, 8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="too few"):
        fit_linear_vq(torch.randn(1, 3, 2, 2), vq_decode, vq_encode)
    with pytest.raises(ValueError, match="odd"):
        fit_linear_vq(torch.randn(4, *SHAPE), vq_decode, vq_encode, dec_taps=2)


def test_jacobian_fit_uses_its_finite_difference_step():
    """A saturating encoder E(I) = avgpool(tanh(3·I)): the Jacobian fit (the default) with a small step predicts
    the response to a small smooth perturbation on new images (toy: relative error 0.41, as the value fit), a
    step of 8 does not (0.86): the step must reach the finite difference (it once was shadowed by the latent
    height). On the demo models the Jacobian fit is the better one (bench/RESULTS.md)."""
    enc = lambda img: F.avg_pool2d(torch.tanh(3 * img), 2)                            # noqa: E731
    dec = lambda z: F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    z = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(1)) * 0.5
    img = dec(torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(2)) * 0.5)
    delta = F.interpolate(torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(3)), scale_factor=4,
                          mode="bilinear", align_corners=False)
    true = (enc(img + 1e-3 * delta) - enc(img)) / 1e-3

    def err(**kw):
        lin = fit_linear_vq(z, dec, enc, **kw)
        return float((lin.encode(delta, bias=False) - true).norm() / true.norm())
    small, large, value = err(), err(fd_step=8.0), err(encoder="value")
    assert small < 0.5 and small < 0.6 * large and small < 1.05 * value, (small, large, value)
    with pytest.raises(ValueError, match="encoder"):
        fit_linear_vq(z, dec, enc, encoder="newton")


# ------------------------------------------------------------------------------------------ linear sampler
def test_reference_mode_is_the_reference_sampler():
    a = run_fast(FastJointConfig(steps=4, inner_steps=2))
    b = run(JointConfig(steps=4, inner_steps=2))
    assert torch.equal(a.patch_latents, b.patch_latents) and a.consistency_mae == b.consistency_mae
    assert (a.unet_forwards, a.vq_decodes, a.vq_encodes) == (b.unet_forwards, b.vq_decodes, b.vq_encodes)


def test_linear_iteration_is_the_reference_step_for_a_linear_vq_and_isotropic_denoiser():
    """With an exactly linear VQ (Ẽ = E) and an isotropic linear denoiser (x̂0's Jacobian ∝ I) both
    finite differences of the reference are exact and its ∞-normalisations remove their scales, so one
    inner iteration moves x_t identically; only ε differs (recomputed there, held fixed here)."""
    step = _Step.make(600, 50, SCHED, True)
    x = torch.randn(4, *SHAPE, dtype=torch.float64)       # float64: the reference's (x̂0(x + h·e) − x̂0)/h
    tiles = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1       # amplifies float32 rounding of x̂0
    tv = step.tvec(x)
    eps = gauss_eps(x, tv, "patches", slice(0, 4))
    x0 = step.x0_hat(x, eps)
    cfg = JointConfig(h=1e-3)
    x_ref, _, _ = pixel_iteration(gauss_eps, vq_encode, vq_decode, step, x, x0, tiles, tv, slice(0, 4), cfg)
    x_lin, x0_lin = linear_iteration(vq_decode, toy_linear_vq(), step, x, eps, x0, tiles, cfg.lr)
    assert not torch.allclose(x_lin, x, atol=0.1)
    torch.testing.assert_close(x_lin, x_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(x0_lin, step.x0_hat(x_lin, eps))


@pytest.mark.parametrize("fixed", [False, True])
def test_linear_mode_without_iterations_equals_constraint_off(fixed):
    guide = torch.rand(1, 3, 16, 16) * 2 - 1 if fixed else None
    a = run_fast(FastJointConfig(constraint_mode="linear", inner_steps=0), guide_image=guide)
    b = run(JointConfig(constraint=False), guide_image=guide)
    torch.testing.assert_close(a.patch_latents, b.patch_latents, rtol=0, atol=0)
    if not fixed:
        torch.testing.assert_close(a.guide_latent, b.guide_latent, rtol=0, atol=0)
    assert a.consistency_mae == b.consistency_mae
    assert (a.unet_forwards, a.vq_decodes, a.vq_encodes, a.final_vq_decodes) == \
           (b.unet_forwards, b.vq_decodes, b.vq_encodes, b.final_vq_decodes)


@pytest.mark.parametrize("eps_fn,ratio", [(gauss_eps, 1.1), (aniso_eps, 1.8)])
def test_linear_mode_reduces_pixel_inconsistency_like_the_reference(eps_fn, ratio):
    """Pixel-space MAE (measured as joint.py does) far below the constraint-off run on the same seeds, K = 10
    both. Isotropic denoiser: within 10% of the reference (toy: off 54.6, reference 17.1, linear 14.3). With a
    per-channel Jacobian (aniso) holding ε fixed ignores the shrinkage the reference's second finite difference
    sees: off 54.6, reference 10.0, linear 16.7 (on the demo model the linear mode is as good, bench/RESULTS.md)."""
    free = run_fast(FastJointConfig(constraint=False), eps_fn=eps_fn)
    ref = run_fast(FastJointConfig(), eps_fn=eps_fn)
    lin = run_fast(FastJointConfig(constraint_mode="linear"), eps_fn=eps_fn)
    assert free.consistency_mae > 40
    assert lin.consistency_mae < ratio * ref.consistency_mae and lin.consistency_mae < 0.4 * free.consistency_mae
    torch.testing.assert_close(lin.guide_latent, free.guide_latent)            # one-way coupling


def test_linear_mode_follows_a_fixed_guide_image():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    guide = (0.6 * torch.sin(3 * xx) * torch.cos(2 * yy)).expand(1, 3, 16, 16)
    free = run_fast(FastJointConfig(constraint=False), guide_image=guide)
    ref = run_fast(FastJointConfig(inner_steps=5), guide_image=guide)
    sr = run_fast(FastJointConfig(constraint_mode="linear", inner_steps=5), guide_image=guide)
    # toy numbers, K = 5: off 40.9, reference 8.5, linear 17.0 (aniso denoiser: 42.1, 11.9, 8.7)
    assert sr.consistency_mae < 0.5 * free.consistency_mae and ref.consistency_mae < 0.5 * free.consistency_mae
    assert sr.guide_latent is None and torch.equal(sr.guide_image, guide)


@pytest.mark.parametrize("fixed", [False, True])
def test_linear_mode_counters(fixed):
    cfg = FastJointConfig(steps=3, inner_steps=2, patch_batch=3, constraint_mode="linear")
    calls = {"dec": 0, "enc": 0}

    def dec(z):
        calls["dec"] += z.shape[0]
        return vq_decode(z)

    def enc(img):
        calls["enc"] += img.shape[0]
        return vq_encode(img)

    x = randn_items(0, range(1 + G * G), SHAPE)
    guide = torch.zeros(1, 3, 16, 16) if fixed else None
    res = joint_sample(gauss_eps, enc, dec, SCHED, x[:1], x[1:], G, cfg, linear_vq=toy_linear_vq(),
                       noise_fn=step_noise_fn(0, range(1 + G * G)), guide_image=guide)
    n, k, s = G * G, cfg.inner_steps, cfg.steps
    assert res.unet_forwards == s * (2 * n + (0 if fixed else 2))          # no model call in the inner loop
    assert res.vq_decodes == s * (n * k + (0 if fixed else 1))              # + the guide, once per step
    assert res.vq_encodes == 0 and res.final_vq_decodes == n + (0 if fixed else 1)
    assert calls == {"dec": res.vq_decodes + res.final_vq_decodes, "enc": 0}


@pytest.mark.parametrize("fixed", [False, True])
def test_linear_mode_batches_the_guide_with_the_first_patch_batch(fixed):
    """One model call per outer step for the guide and the first patch batch (which = "guide+patches", the
    guide's row first), the other patch batches alone; the latents are those of separate calls (an ε that
    splits every merged call into the guide's and the patches' own calls)."""
    cfg = FastJointConfig(steps=3, inner_steps=1, patch_batch=3, constraint_mode="linear")
    seen = []

    def eps_fn(x, t, which, index):
        seen.append((which, x.shape[0], index))
        return aniso_eps(x, t, which, index)

    def split_eps(x, t, which, index):     # the merged call as two: guide, then patches
        if which != "guide+patches":
            return aniso_eps(x, t, which, index)
        return torch.cat([aniso_eps(x[:1], t[:1], "guide", None), aniso_eps(x[1:], t[1:], "patches", index)])

    guide = torch.zeros(1, 3, 16, 16) if fixed else None
    res = run_fast(cfg, eps_fn=eps_fn, guide_image=guide)
    n = G * G
    per_step = ([] if fixed else [("guide+patches", 4, slice(0, 3))]) + \
               ([("patches", 3, slice(0, 3))] if fixed else []) + [("patches", 1, slice(3, 4))]
    assert seen == per_step * cfg.steps
    assert res.unet_forwards == cfg.steps * (2 * n + (0 if fixed else 2))
    ref = run_fast(cfg, eps_fn=split_eps, guide_image=guide)
    assert torch.equal(res.patch_latents, ref.patch_latents)
    assert fixed or torch.equal(res.guide_latent, ref.guide_latent)


def test_constraint_steps_limits_the_constraint_to_the_first_outer_steps():
    """constraint_steps = N: the first N outer steps are those of the full run (same latents after them), the
    rest unconstrained (no decode); N = 0 is the constraint-off run exactly."""
    seen = {}
    for n_steps in (None, 3, 0):
        cfg = FastJointConfig(steps=6, inner_steps=2, constraint_mode="linear", constraint_steps=n_steps)
        states = []
        x = randn_items(0, range(1 + G * G), SHAPE)
        res = joint_sample(gauss_eps, vq_encode, vq_decode, SCHED, x[:1], x[1:], G, cfg, linear_vq=toy_linear_vq(),
                           noise_fn=step_noise_fn(0, range(1 + G * G)),
                           callback=lambda d: states.append(d["x_patches"].clone()))
        seen[n_steps] = (res, states)
    full, part, none = seen[None], seen[3], seen[0]
    torch.testing.assert_close(part[1][2], full[1][2], rtol=0, atol=0)          # after step 3: identical
    assert not torch.equal(part[1][3], full[1][3])
    assert part[0].vq_decodes == 3 * (G * G * 2 + 1) and full[0].vq_decodes == 6 * (G * G * 2 + 1)
    off = run(JointConfig(steps=6, constraint=False))
    torch.testing.assert_close(none[0].patch_latents, off.patch_latents, rtol=0, atol=0)
    assert none[0].vq_decodes == 0
    with pytest.raises(ValueError, match="constraint_steps"):
        FastJointConfig(constraint_steps=-1)


CODEBOOK = torch.rand(64, 3, generator=torch.Generator().manual_seed(7)) * 1.8 - 0.9   # 64 codes in (−1, 1)


def snap(z):
    """The toy VQ's quantiser: the nearest CODEBOOK row per pixel."""
    d = ((z.permute(0, 2, 3, 1)[..., None, :] - CODEBOOK) ** 2).sum(-1)            # (B, h, w, 64)
    return CODEBOOK[d.argmin(-1)].permute(0, 3, 1, 2)


def q_decode(z):   # the toy VQ with a codebook: snap, then the linear ×2 decoder (piecewise constant in z)
    return vq_decode(snap(z))


def test_decode_quantized_snaps_like_the_real_decoder():
    """Fitted with the quantiser, D̃(Q(z)) reproduces a snap-then-linear decoder exactly on new latents, and is
    as piecewise constant: a move too small to change a code changes nothing. Without it: a clear error."""
    lin = fit_linear_vq(torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1)), q_decode, vq_encode,
                        ridge=1e-9, quantize=snap)
    gen = torch.Generator().manual_seed(2)      # near (not on) a code everywhere: no near-ties in the snap
    z = snap(torch.randn(5, *SHAPE, generator=gen)) + 1e-3 * torch.randn(5, *SHAPE, generator=gen)
    torch.testing.assert_close(lin.decode_quantized(z), q_decode(z), atol=1e-5, rtol=0)
    assert lin.fit_error["decode"] < 1e-5
    torch.testing.assert_close(lin.decode_quantized(z + 1e-4), lin.decode_quantized(z), atol=0, rtol=0)
    far = torch.randn(5, *SHAPE, generator=gen)                                  # the raw map does not snap
    assert not torch.allclose(lin.decode(far), q_decode(far), atol=0.1)
    with pytest.raises(ValueError, match="needs the quantiser"):
        toy_linear_vq().decode_quantized(z)
    with pytest.raises(ValueError, match="quantize changed the latents' shape"):
        fit_linear_vq(torch.randn(24, *SHAPE), q_decode, vq_encode, quantize=lambda z: z[:, :2])


def test_decode_every_anchors_the_surrogate_on_the_last_real_decode():
    """decode_every = k: the residual decodes for real only in every k-th constrained outer step counted back
    from the last; in between D̃(Q(x̂0)) plus the anchor D(x̂0) − D̃(Q(x̂0)) of the patch's last real decode.
    Exact surrogate (snap-then-linear toy VQ): the all-decode latents with fewer loop decodes. A surrogate off
    by a constant: the anchor cancels it exactly wherever one exists (k = 2 over 5 steps decodes at 4, 2, 0),
    not in a step before the first anchor (4 steps decode at 3, 1). Off by a scale: it changes the result (so it
    is the one used). k ≥ the constrained steps decodes in the last one only; k = 1 is the all-decode run."""
    k_in, n = 2, G * G
    x = randn_items(0, range(1 + G * G), SHAPE)
    exact = fit_linear_vq(torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1)), q_decode, vq_encode,
                          ridge=1e-9, quantize=snap)
    shifted = dataclasses.replace(exact, dec_bias=exact.dec_bias + 0.05)
    scaled = dataclasses.replace(exact, dec_weight=1.3 * exact.dec_weight)

    def go(every, lin=exact, steps=5, constraint_steps=None, patch_batch=16):
        cfg = FastJointConfig(steps=steps, inner_steps=k_in, constraint_mode="linear", decode_every=every,
                              constraint_steps=constraint_steps, patch_batch=patch_batch)
        return joint_sample(gauss_eps, vq_encode, q_decode, SCHED, x[:1], x[1:], G, cfg, linear_vq=lin,
                            noise_fn=step_noise_fn(0, range(1 + G * G)))
    full, two, one = go(None), go(2), go(1)
    assert full.vq_decodes == 5 * (1 + n * k_in) and two.vq_decodes == 5 + 3 * n * k_in
    torch.testing.assert_close(two.patch_latents, full.patch_latents, atol=1e-4, rtol=0)
    torch.testing.assert_close(one.patch_latents, full.patch_latents, atol=0, rtol=0)    # 1 means None
    assert one.vq_decodes == full.vq_decodes
    torch.testing.assert_close(go(2, shifted).patch_latents, full.patch_latents, atol=1e-4, rtol=0)
    four = go(2, steps=4)
    assert four.vq_decodes == 4 + 2 * n * k_in
    assert (go(2, shifted, steps=4).patch_latents - four.patch_latents).abs().max() > 1e-2
    scaled_run = go(2, scaled)
    assert (scaled_run.patch_latents - full.patch_latents).abs().max() > 1e-2
    # each patch keeps its own anchor: batches of 3 + 1 patches give the one-batch result with a surrogate whose
    # error differs per patch
    torch.testing.assert_close(go(2, scaled, patch_batch=3).patch_latents, scaled_run.patch_latents,
                               atol=1e-5, rtol=0)
    assert go(9).vq_decodes == 5 + n * k_in
    # the constraint on the first 4 of 6 steps, k = 3: decodes at steps 3 and 0 (counted back from step 3, not 5)
    part = go(3, steps=6, constraint_steps=4)
    assert part.vq_decodes == 4 + 2 * n * k_in
    torch.testing.assert_close(part.patch_latents, go(None, steps=6, constraint_steps=4).patch_latents,
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="fitted with the quantiser"):
        go(2, toy_linear_vq())
    assert go(2, toy_linear_vq(), constraint_steps=0).vq_decodes == 0   # nothing constrained: no quantiser needed
    with pytest.raises(ValueError, match="decode_every"):
        FastJointConfig(decode_every=0)


def test_surrogate_decode_adds_the_anchor_and_clamps():
    """Between real decodes the residual sees clamp(D̃(Q(z)) + anchor) in float32; the real step stores
    D(z) − D̃(Q(z)) for its patch batch and returns D(z) unchanged."""
    from zoomldm.diffusion.joint_fast import _anchored_decode, _surrogate_decode
    lin = fit_linear_vq(torch.randn(24, *SHAPE, generator=torch.Generator().manual_seed(1)), q_decode, vq_encode,
                        ridge=1e-9, quantize=snap)
    z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(3))
    real = lambda v: q_decode(v) + 0.5                                            # noqa: E731  (off by +0.5)
    anchor = {}
    torch.testing.assert_close(_surrogate_decode(real, lin, anchor, 0, z), q_decode(z).clamp(-1, 1), atol=1e-5,
                               rtol=0)                                            # no anchor yet
    torch.testing.assert_close(_anchored_decode(real, lin, anchor, 0, z), real(z), atol=0, rtol=0)
    torch.testing.assert_close(anchor[0], torch.full_like(anchor[0], 0.5), atol=1e-5, rtol=0)
    out = _surrogate_decode(real, lin, anchor, 0, z.half())
    assert out.dtype == torch.float32 and out.max() <= 1 and out.min() >= -1
    torch.testing.assert_close(out, real(z).clamp(-1, 1), atol=2e-3, rtol=0)
    assert (real(z) > 1).any()                                                    # so the clamp mattered
    torch.testing.assert_close(_surrogate_decode(real, lin, anchor, 7, z), q_decode(z).clamp(-1, 1), atol=1e-5,
                               rtol=0)                                            # another batch: its own anchor


def test_config_and_input_checks():
    with pytest.raises(ValueError, match="constraint_mode"):
        FastJointConfig(constraint_mode="latent")
    x = randn_items(0, range(1 + G * G), SHAPE)
    with pytest.raises(ValueError, match="needs linear_vq"):
        joint_sample(gauss_eps, vq_encode, vq_decode, SCHED, x[:1], x[1:], G,
                     FastJointConfig(constraint_mode="linear", stochastic=False))
    with pytest.raises(ValueError, match="joint_linear_sample: x_patches"):
        joint_linear_sample(gauss_eps, toy_linear_vq(), vq_decode, SCHED, x[:1], x[1:4], G,
                            FastJointConfig(constraint_mode="linear", stochastic=False))


# ------------------------------------------------------------------------------------------------ decode cut
def test_blend_decode_count_formula():
    assert blend_decode_count(1024) == 31 ** 2 == 961                       # 4096² px, stride 32
    assert blend_decode_count(1024, 64, 16) == 61 ** 2 == 3721              # the reference
    assert blend_decode_count(1024, 64, 64) == 256 and blend_decode_count(256) == 49
    for side, win, stride in [(256, 64, 32), (100, 16, 7), (48, 16, 16)]:
        assert blend_decode_count(side, win, stride) == count_windows(side, side, win, stride)
        n = (side - win) // stride + 1 + ((side - win) % stride > 0)
        assert blend_decode_count(side, win, stride) == n * n


def test_stride_equal_window_is_per_tile_decode():
    def dec(z):   # non-equivariant (depends on the window's own mean): blending would show
        return F.interpolate(z - z.mean(dim=(2, 3), keepdim=True), scale_factor=2).tanh()

    latent = torch.randn(1, 3, 24, 24)
    image, n = decode_large(latent, dec, window=8, stride=8, batch=4, return_count=True)
    tiles = torch.cat([dec(latent[:, :, i:i + 8, j:j + 8]) for i in range(0, 24, 8) for j in range(0, 24, 8)])
    per_tile = tiles.reshape(3, 3, 3, 16, 16).permute(2, 0, 3, 1, 4).reshape(1, 3, 48, 48)  # (1, 3, 48, 48)
    assert n == 9
    torch.testing.assert_close(image, per_tile.clamp(-1, 1))


def test_blend_reuses_known_patch_windows():
    """Windows given in `known` (the sampler's final per-patch decodes) are not decoded again and the blend is
    the same; origins off the window grid are ignored."""
    def dec(z):   # non-equivariant: a wrong window anywhere would show
        return F.interpolate(z - z.mean(dim=(2, 3), keepdim=True), scale_factor=2).tanh()

    latent = torch.randn(1, 3, 32, 32)
    patches = torch.cat([latent[:, :, i:i + 8, j:j + 8] for i in range(0, 32, 8) for j in range(0, 32, 8)])
    known = patch_windows(dec(patches), 4, 8)
    assert set(known) == {(i, j) for i in range(0, 32, 8) for j in range(0, 32, 8)}
    for stride, reused in [(4, 16), (8, 16), (6, 4)]:             # stride 6: origins 0, 6, 12, 18, 24
        calls = []
        want, n = decode_large(latent, dec, 8, stride, batch=5, return_count=True)
        got, m = decode_large(latent, lambda z: calls.append(z.shape[0]) or dec(z), 8, stride, batch=5,
                              return_count=True, known=known)
        assert m == n - reused == sum(calls)
        torch.testing.assert_close(got, want)


def test_blend_weights_and_half_stride_decode():
    w = blend_weights(64, 64, 16, 8, f=2)
    assert w.shape == (128, 128) and w.min() > 0.04                           # every pixel covered
    up = lambda z: F.interpolate(z, scale_factor=2).clamp(-1, 1)              # equivariant: exact blend
    latent = torch.rand(1, 3, 64, 64) * 2 - 1
    img, n = decode_large(latent, up, window=16, stride=half_stride(16), batch=8, return_count=True)
    assert n == blend_decode_count(64, 16) == 7 ** 2
    torch.testing.assert_close(img, up(latent))
    const = decode_large(torch.full((1, 3, 64, 64), 0.3), up, window=16, stride=half_stride(16))  # weights sum to 1
    torch.testing.assert_close(const, torch.full((1, 3, 128, 128), 0.3))
    torch.testing.assert_close(decode_large(latent, up, 16, 8), img)
