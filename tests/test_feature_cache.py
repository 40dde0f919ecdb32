"""DeepCache feature reuse in patch sampling (issue #8's patch cut): the call schedule of
`feature_cache_model_fn`, its wiring through `LatentModel.cached_model_fn` (counts, eager and compiled), and
`sample_patch_latents` with `cache_every`; the first-order forecast of the cached feature (`cache_forecast`)."""
from __future__ import annotations

import pytest
import torch
from test_fast_path import CountingBackend, fresh_dynamo, live_model  # noqa: F401  (fixture re-used)

from zoomldm.diffusion import cfg_eps_fn, ddim_sample, feature_cache_model_fn, plms_sample, randn_items
from zoomldm.diffusion.cache import extrapolate
from zoomldm.sampling import denoisers as dn


def recorder():
    calls = []

    def full(x, t, c):
        calls.append(("full", int(t[0])))
        return x * 0 + int(t[0]), x * 0 + 1000 + int(t[0])             # eps = t, deep = 1000 + t

    def shallow(x, t, c, deep):
        calls.append(("shallow", int(t[0])))
        return deep - 1000 + 0.5                                         # eps = (t of the last full call) + 0.5
    return calls, full, shallow


@pytest.mark.parametrize("every", [1, 2, 3])
def test_every_nth_call_is_full_and_the_others_read_its_feature(every):
    calls, full, shallow = recorder()
    fn = feature_cache_model_fn(full, shallow, every)
    x, c = torch.zeros(2, 1), torch.zeros(2, 1)
    outs = [fn(x, torch.full((2,), k), c)[0, 0].item() for k in range(7)]
    kinds = [kind for kind, _ in calls]
    assert kinds == ["full" if k % every == 0 else "shallow" for k in range(7)]
    assert outs == [k if k % every == 0 else k - k % every + 0.5 for k in range(7)]


def test_a_batch_that_does_not_fit_the_cache_runs_the_whole_network_and_bad_every_is_refused():
    calls, full, shallow = recorder()
    fn = feature_cache_model_fn(full, shallow, 3)
    c = torch.zeros(1)
    fn(torch.zeros(2, 1), torch.zeros(2), c)
    fn(torch.zeros(4, 1), torch.ones(4), c)                               # another batch size: full
    fn(torch.zeros(4, 1), torch.ones(4), c)
    assert [k for k, _ in calls] == ["full", "full", "shallow"]
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="every must be an integer"):
            feature_cache_model_fn(full, shallow, bad)


def test_extrapolate_is_the_line_through_both_features_per_item():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    line = lambda t: a + b * t.float().view(-1, 1, 1, 1)                 # a feature exactly linear in t
    t0, t1 = torch.tensor([980, 980, 500]), torch.tensor([900, 960, 400])
    t = torch.tensor([840, 900, 380])
    torch.testing.assert_close(extrapolate(line(t1), t1, line(t0), t0, t), line(t))
    same = torch.tensor([900, 960, 400])                                  # t₁ = t₀ (PLMS): plain reuse, no nan
    out = extrapolate(line(t1), t1, line(t0), same, t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, line(t1))
    half = extrapolate(line(t1).half(), t1, line(t0).half(), t0, t)       # the feature's dtype is kept
    assert half.dtype == torch.float16


@pytest.mark.parametrize("every", [2, 3])
def test_forecast_extrapolates_from_the_last_two_full_calls(every):
    """deep = 1000 + t is linear in t, so the forecast is exact from the second full call on (the shallow ε reads
    t back); before it the shallow calls reuse the first feature; the schedule itself is unchanged."""
    calls, full, shallow = recorder()
    fn = feature_cache_model_fn(full, shallow, every, forecast=True)
    x, c = torch.zeros(2, 1), torch.zeros(2, 1)
    ts = [1000 - 20 * k for k in range(9)]
    outs = [fn(x, torch.full((2,), t), c)[0, 0].item() for t in ts]
    assert [kind for kind, _ in calls] == ["full" if k % every == 0 else "shallow" for k in range(9)]
    # full: its own t; shallow with one full call so far: reuse of the first; after: the forecast, exactly its t
    want = [t if k % every == 0 else (ts[0] if k < every else t) + 0.5 for k, t in enumerate(ts)]
    assert outs == want


def test_forecast_restarts_when_the_batch_changes():
    _, full, shallow = recorder()
    fn = feature_cache_model_fn(full, shallow, 2, forecast=True)
    c = torch.zeros(1)
    fn(torch.zeros(2, 1), torch.full((2,), 900), c)
    fn(torch.zeros(4, 1), torch.full((4,), 880), c)                       # another batch: full, no line yet
    assert fn(torch.zeros(4, 1), torch.full((4,), 860), c)[0, 0].item() == 880.5


@torch.no_grad()
def test_cached_model_fn_counts_and_matches_the_unet_pair():
    m = live_model()
    assert m.cached_model_fn(1) == m.model_fn                             # off: the plain model_fn
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 5, 32, generator=g)
    t0, t1 = torch.full((4,), 900), torch.full((4,), 880)
    fn = m.cached_model_fn(2, branch=1)
    torch.testing.assert_close(fn(x, t0, ctx), m.unet(x, t0, ctx), rtol=0, atol=0)
    _, deep = m.unet.forward_caching(x, t0, ctx, 1)
    x1 = x + 0.1 * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(fn(x1, t1, ctx), m.unet.forward_cached(x1, t1, ctx, deep, 1), rtol=0, atol=0)
    assert (m.counter.unet, m.counter.unet_cached) == (4, 4)
    assert m.counter.as_dict()["unet_cached_forwards"] == 4
    with pytest.raises(ValueError, match="cache branch 2 outside 0..1"):
        m.cached_model_fn(2, branch=2)


@torch.no_grad()
def test_sample_patch_latents_with_the_cache_off_is_the_reference_and_on_runs_fewer_full_forwards():
    m = live_model()
    ctx = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(4))
    steps = 5                                                             # 5 timesteps (6 would give 7)
    ref = dn.sample_patch_latents(m, ctx, [0, 1, 2], seed=7, steps=steps, sampler="ddim")
    counts_ref = (m.counter.unet, m.counter.unet_cached)
    m.counter = dn.Counter()
    off = dn.sample_patch_latents(m, ctx, [0, 1, 2], seed=7, steps=steps, sampler="ddim", cache_every=1)
    torch.testing.assert_close(off, ref, rtol=0, atol=0)
    m.counter = dn.Counter()
    on = dn.sample_patch_latents(m, ctx, [0, 1, 2], seed=7, steps=steps, sampler="ddim", cache_every=3)
    assert counts_ref == (steps * 3 * 2, 0)                               # CFG: both halves in every forward
    assert (m.counter.unet, m.counter.unet_cached) == (2 * 3 * 2, 3 * 3 * 2)   # steps 0, 3 full
    assert not torch.allclose(on, ref)
    # the same run by hand: DDIM over CFG over the cached model_fn
    x_T = randn_items(7, [0, 1, 2], (3, 8, 8), m.device)
    hand = ddim_sample(cfg_eps_fn(feature_cache_model_fn(
        lambda x, t, c: m.unet.forward_caching(x, t, c, 0),
        lambda x, t, c, d: m.unet.forward_cached(x, t, c, d, 0), 3), ctx, None, 1.75), x_T, m.schedule, steps)
    torch.testing.assert_close(on, hand, rtol=0, atol=0)


@torch.no_grad()
def test_the_forecast_feeds_the_shallow_branch_the_extrapolated_feature_of_the_live_unet():
    m = live_model()
    g = torch.Generator().manual_seed(8)
    ctx = torch.randn(2, 5, 32, generator=g)
    xs = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(3)]
    ts = [torch.full((2,), t) for t in (900, 880, 860)]
    fn = m.cached_model_fn(2, branch=1, forecast=True)
    got = [fn(x, t, ctx) for x, t in zip(xs, ts)]
    _, d0 = m.unet.forward_caching(xs[0], ts[0], ctx, 1)
    e2, d2 = m.unet.forward_caching(xs[2], ts[2], ctx, 1)
    torch.testing.assert_close(got[2], e2, rtol=0, atol=0)
    x3, t3 = xs[0] * 0.5, torch.full((2,), 840)                           # shallow, on the line through d0, d2
    want = m.unet.forward_cached(x3, t3, ctx, d2 + (d2 - d0) * (840 - 860) / (860 - 900), 1)
    torch.testing.assert_close(fn(x3, t3, ctx), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, m.unet.forward_cached(x3, t3, ctx, d2, 1))   # the forecast matters here
    assert (m.counter.unet, m.counter.unet_cached) == (4, 4)


@torch.no_grad()
def test_sample_patch_latents_with_the_forecast_is_the_hand_run_and_not_plain_reuse():
    m = live_model()
    ctx = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(4))
    reuse = dn.sample_patch_latents(m, ctx, [0, 1, 2], seed=7, steps=7, sampler="ddim", cache_every=3)
    counts = (m.counter.unet, m.counter.unet_cached)
    m.counter = dn.Counter()
    on = dn.sample_patch_latents(m, ctx, [0, 1, 2], seed=7, steps=7, sampler="ddim", cache_every=3,
                                 cache_forecast=True)
    assert (m.counter.unet, m.counter.unet_cached) == counts                     # the same FLOPs
    assert not torch.allclose(on, reuse)
    x_T = randn_items(7, [0, 1, 2], (3, 8, 8), m.device)
    hand = ddim_sample(cfg_eps_fn(feature_cache_model_fn(
        lambda x, t, c: m.unet.forward_caching(x, t, c, 0),
        lambda x, t, c, d: m.unet.forward_cached(x, t, c, d, 0), 3, forecast=True), ctx, None, 1.75),
        x_T, m.schedule, 7)
    torch.testing.assert_close(on, hand, rtol=0, atol=0)


@torch.no_grad()
def test_the_compiled_pair_equals_eager_with_one_graph_each_for_both_layouts():
    m = live_model()
    g = torch.Generator().manual_seed(5)
    x, ctx, t = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 5, 32, generator=g), torch.full((4,), 500)
    eager = m.cached_model_fn(2)
    want = [eager(x, t, ctx), eager(x * 0.9, t - 20, ctx)]
    plain = m.model_fn(x, t, ctx)
    backend = CountingBackend()
    dn.compile_networks(m, backend=backend)
    torch.testing.assert_close(m.model_fn(x, t, ctx), plain, rtol=1e-4, atol=1e-5)
    n_plain = backend.graphs
    compiled = m.cached_model_fn(2)
    got = [compiled(x, t, ctx)]
    assert backend.graphs == n_plain >= 1                                # plain sampling's graph serves full steps
    got.append(compiled(x * 0.9, t - 20, ctx))
    n = backend.graphs
    again = m.cached_model_fn(2)                                         # NCHW then channels-last, batch 3
    again(x[:3].contiguous(memory_format=torch.channels_last), t[:3], ctx[:3])
    again(x[:3], t[:3], ctx[:3])
    assert n >= 2 and backend.graphs == n                                # no recompile
    for a, b in zip(got, want):                 # channels-last convolutions: float32 rounding apart
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_the_compiled_pair_of_another_branch_equals_eager():
    """Branch 1 specialises the compiled forward_caching on its own (one more graph), same ε as eager."""
    m = live_model()
    g = torch.Generator().manual_seed(6)
    x, ctx, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.full((2,), 700)
    eager = m.cached_model_fn(2, branch=1)
    want = [eager(x, t, ctx), eager(x * 0.9, t - 20, ctx)]
    dn.compile_networks(m, backend=CountingBackend())
    compiled = m.cached_model_fn(2, branch=1)
    got = [compiled(x, t, ctx), compiled(x * 0.9, t - 20, ctx)]
    for a, b in zip(got, want):                 # channels-last convolutions: float32 rounding apart
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want[0], want[1])                          # a live model: the steps differ


@torch.no_grad()
def test_under_plms_the_schedule_counts_evaluations():
    """PLMS evaluates twice in its first step (at t and at the next timestep), and the cache counts evaluations,
    not steps: with every 2 the second evaluation at the next timestep is shallow, the step there full (the
    demo's quality numbers, bench/RESULTS.md, were measured so)."""
    calls, full, shallow = recorder()
    x = torch.zeros(1, 1)
    ts = dn.Schedule.scaled_linear().timesteps(5)
    fn = feature_cache_model_fn(full, shallow, 2)
    plms_sample(lambda x_t, t: fn(x_t, t, None), x, dn.Schedule.scaled_linear(), 5)
    assert calls == [("full", ts[0]), ("shallow", ts[1]), ("full", ts[1]), ("shallow", ts[2]),
                     ("full", ts[3]), ("shallow", ts[4])]
