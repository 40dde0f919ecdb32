"""The compiled networks of the CUDA fast path (issue #8), checked on CPU: `compile_networks` wires the UNet, the
VQ decoder and the codebook search through torch.compile, the compiled decode gives the eager result and
quantises once, one graph serves every batch size > 1 and both memory formats (the static compile: one per batch
shape), and the kernel cache directory is honoured."""
from __future__ import annotations

import os

import pytest
import torch

from zoomldm.models.unet import UNet, UNetConfig
from zoomldm.models.vq import VQConfig, VQModel
from zoomldm.sampling import denoisers as dn


def tiny_model() -> dn.ZoomLDM:
    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                           context_dim=32, image_size=8)).eval()
    vq = VQModel(VQConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, n_embed=64, resolution=32)).eval()
    return dn.ZoomLDM(unet, None, vq, None, "test")


def live_model() -> dn.ZoomLDM:
    """tiny_model with its zero-initialised layers (output convs, ResBlock out convs, proj_out) re-drawn: otherwise
    the UNet's ε ≡ 0 and independent of t and the context, and an ε comparison could not fail."""
    m = tiny_model()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in m.unet.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


def exact_decode(m: dn.ZoomLDM, z: torch.Tensor) -> torch.Tensor:
    """The eager decode of the exact snapped latent z_q (eager `decode` feeds z + (z_q - z), equal to rounding)."""
    q = m.vq.quantize
    return m.vq.decode(q.lookup(q.codes(z)), quantize=False).clamp(-1, 1)


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@torch.no_grad()
def test_compiled_decode_equals_eager_and_one_graph_serves_every_batch_above_one():
    m = tiny_model()
    g = torch.Generator().manual_seed(1)
    batches = {b: torch.randn(b, 3, 8, 8, generator=g) for b in (2, 3, 5, 1)}
    want = {b: exact_decode(m, z) for b, z in batches.items()}
    want[1] = m.decode(batches[1])                                     # batch 1 stays eager: z + (z_q - z)
    backend = CountingBackend()
    dn.compile_networks(m, backend=backend)
    assert m.vq_decode_fn is not None and m.unet_fn is not None
    got = {}
    for b in (2, 3, 5):
        got[b] = m.decode(batches[b])
        if b == 2:
            after_first = backend.graphs
    got[1] = m.decode(batches[1])                                      # batch 1 (the guide) runs eager
    assert after_first >= 1 and backend.graphs == after_first          # batches 3, 5 and 1: no new graph
    for b in batches:
        torch.testing.assert_close(got[b], want[b], rtol=0, atol=1e-6)
    assert m.counter.vq_decode == 1 + sum(batches)                     # the counter still sees every patch


@torch.no_grad()
def test_compiled_unet_equals_eager_with_dynamic_batch():
    m = live_model()
    x, t, ctx = torch.randn(4, 3, 8, 8), torch.tensor([1, 200, 500, 999]), torch.randn(4, 5, 32)
    want = m.model_fn(x, t, ctx)
    backend = CountingBackend()
    dn.compile_networks(m, backend=backend)
    got = m.model_fn(x, t, ctx)
    n = backend.graphs
    m.model_fn(x[:3], t[:3], ctx[:3])
    assert n >= 1 and backend.graphs == n                              # dynamic=True: no recompile
    assert want.abs().mean() > 0.01                                    # a live model: ε is not zero
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)        # channels-last convolutions: rounding apart
    assert m.counter.unet == 4 + 4 + 3


def test_compile_cache_points_inductor_at_the_directory_unless_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")      # recorded, so that teardown restores the original
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    dn.compile_networks(tiny_model(), backend=CountingBackend(), compile_cache="cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    assert (tmp_path / "cache").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    dn.compile_networks(tiny_model(), backend=CountingBackend(), compile_cache="cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"


def test_a_compile_cache_that_cannot_be_created_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"sample.compile_cache .*file/cache: cannot create"):
        dn.compile_networks(tiny_model(), backend=CountingBackend(), compile_cache=tmp_path / "file" / "cache")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_fast_path_is_a_no_op_on_cpu_and_rejects_a_bad_precision():
    m = tiny_model()
    assert dn.fast_path(m, compile=True, vq_precision="bf16") is m
    assert m.unet_fn is None and m.vq_decode_fn is None and m.vq_dtype is None
    with pytest.raises(ValueError, match="vq_precision"):
        dn.fast_path(m, vq_precision="fp16")


@torch.no_grad()
def test_aot_tracing_of_the_vq_decoder_matches_eager():
    """The decoder graph goes through AOTAutograd and the decompositions inductor starts from (`aot_eager`) and
    gives the eager result. (Inductor's own code generation runs on the GPU benchmark: on CPU it takes ~40 s
    and exercises the C++ backend, not Triton.)"""
    m = tiny_model()
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    want = exact_decode(m, z)
    dn.compile_networks(m, backend="aot_eager")          # compiles lazily: only the VQ is called here
    torch.testing.assert_close(m.decode(z), want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_direct_codebook_search_finds_the_same_codes_as_the_official_expansion():
    """`codes_direct` (the compiled search) against `codes` (||z||² + ||e||² − 2 z·e in chunks, the official
    form) on a codebook of the paper's shape (8192 × 3) and latents near and far from the codes; traced through
    AOTAutograd as inductor sees it, and eager."""
    from zoomldm.models.vq import VectorQuantizer
    g = torch.Generator().manual_seed(3)
    vq = VectorQuantizer(8192, 3)
    vq.embedding.weight.data = torch.randn(8192, 3, generator=g)
    near = vq.lookup(torch.randint(0, 8192, (2, 16, 16), generator=g)) + 0.01 * torch.randn(2, 3, 16, 16, generator=g)
    for z in (torch.randn(3, 3, 16, 16, generator=g), near):
        want = vq.codes(z)
        assert torch.equal(vq.codes_direct(z), want)
        assert torch.equal(torch.compile(vq.codes_direct, backend="aot_eager")(z), want)
    def dist(z, c):
        return (z.permute(0, 2, 3, 1) - vq.embedding.weight[c]).pow(2).sum(-1)
    z = torch.randn(2, 3, 8, 8, generator=g)
    assert torch.all(dist(z, vq.codes_direct(z)) <= dist(z, torch.randint(0, 8192, (2, 8, 8), generator=g)))


def test_the_compiled_search_serves_decode_and_quantize_once_and_batch_one_stays_eager():
    m = tiny_model()
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want_q = m.quantize(z)
    fast, eager = [], []
    m.vq_codes_fn = lambda latent: fast.append(latent.shape[0]) or m.vq.quantize.codes_direct(latent)
    m.vq_decode_fn = lambda latent: m.vq.decode(latent, quantize=False)
    codes = m.vq.quantize.codes
    m.vq.quantize.codes = lambda latent: eager.append(latent.shape[0]) or codes(latent)
    with torch.no_grad():
        torch.testing.assert_close(m.quantize(z), want_q, rtol=0, atol=1e-6)
        m.decode(z)
        m.quantize(z[:1])
        m.decode(z[:1])
    assert fast == [3, 3] and eager == [1, 1]           # one search per call; batch 1 the eager one
    z.requires_grad_(True)                               # straight-through, as the eager quantiser
    m.quantize(z).sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_fast_path_compiles_what_compile_says_on_cuda(monkeypatch):
    """`compile="vq"` compiles the VQ only, True the UNet too (one dynamic-shape graph), "static" the UNet with a
    graph per batch shape, False nothing (CUDA faked: the wiring, not the compile)."""
    calls = []
    monkeypatch.setattr(dn.LatentModel, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(dn, "compile_networks",
                        lambda m, compile_cache=None, unet=True, dynamic=True: calls.append((unet, dynamic)))
    for value in (False, "vq", True, "static"):
        dn.fast_path(tiny_model(), compile=value)
    assert calls == [(False, True), (True, True), (True, False)]


@torch.no_grad()
def test_static_compile_builds_a_graph_per_batch_shape_and_gives_the_eager_result():
    """`dynamic=False` (sample.compile: static): a batch shape met before reuses its graph, a new one compiles
    another (the dynamic graph would not), the shallow DeepCache branch too, and torch's recompile limit is raised
    so that the samplers' few shapes never fall back to eager."""
    m = live_model()
    x, t, ctx = torch.randn(4, 3, 8, 8), torch.tensor([1, 200, 500, 999]), torch.randn(4, 5, 32)
    want, want3 = m.model_fn(x, t, ctx), m.model_fn(x[:3], t[:3], ctx[:3])
    backend = CountingBackend()
    with torch._dynamo.config.patch(recompile_limit=8):            # torch's default; restored after
        dn.compile_networks(m, backend=backend, dynamic=False)
        assert torch._dynamo.config.recompile_limit == dn.STATIC_SHAPES
    got = m.model_fn(x, t, ctx)
    n = backend.graphs
    assert n >= 1 and torch.equal(m.model_fn(x, t, ctx), got) and backend.graphs == n     # same shape: no compile
    got3 = m.model_fn(x[:3], t[:3], ctx[:3])
    assert backend.graphs > n                                                             # a new shape: its own graph
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got3, want3, rtol=1e-4, atol=1e-5)
    eps_fn = m.cached_model_fn(every=2)
    full = eps_fn(x, t, ctx)                                                              # whole UNet: graph reused
    k = backend.graphs
    shallow = eps_fn(x, t, ctx)                                                           # the shallow branch's graph
    assert backend.graphs > k and m.counter.unet_cached == 4
    deep = m.unet.forward_caching(x, t, ctx, 0)[1]
    torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shallow, m.unet.forward_cached(x, t, ctx, deep, 0), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_the_compiled_unet_sees_one_memory_format_whatever_the_sampler_passes():
    """The H100 bench of 2026-11-27 traced the UNet on channels-last batches; the patch sampler's NCHW batches then
    failed the graph's stride guard and recompiled it (minutes, and there it hung). `model_fn` hands the compiled
    UNet channels-last inputs always: one graph for both layouts, and the eager result."""
    m = live_model()
    x, t, ctx = torch.randn(4, 3, 8, 8), torch.tensor([1, 200, 500, 999]), torch.randn(4, 5, 32)
    want = m.model_fn(x, t, ctx)
    backend = CountingBackend()
    dn.compile_networks(m, backend=backend)
    got_cl = m.model_fn(x.contiguous(memory_format=torch.channels_last), t, ctx)
    n = backend.graphs
    got = m.model_fn(x, t, ctx)
    assert n >= 1 and backend.graphs == n                              # no recompile for the NCHW batch
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_cl, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, got_cl, rtol=0, atol=0)            # the same graph on the same values


def test_compile_vq_leaves_the_unet_eager_and_fast_path_rejects_other_values():
    m = tiny_model()
    dn.compile_networks(m, backend=CountingBackend(), unet=False)
    assert m.unet_fn is None and m.vq_decode_fn is not None
    m = tiny_model()                                                    # and the other way round (the bench's UNet)
    dn.compile_networks(m, backend=CountingBackend(), vq=False)
    assert m.unet_fn is not None and m.unet_cached_fn is not None and m.vq_decode_fn is None and m.vq_codes_fn is None
    for bad in ("unet", 1, None):
        with pytest.raises(ValueError, match="compile must be false, true, 'static' or 'vq'"):
            dn.fast_path(tiny_model(), compile=bad)
    assert dn.fast_path(tiny_model(), compile="vq") is not None       # CPU: accepted, a no-op


@torch.no_grad()
def test_the_linear_vq_fit_runs_the_eager_decoder_and_restores_the_compiled_one():
    """The fit decodes in float32; the compiled decoder was traced under the samplers' bf16 autocast, so calling it
    would recompile it (25 s on an H100) for a one-off decode. It is set aside for the fit and put back."""
    m = tiny_model()
    calls = []

    def compiled(z):
        calls.append(z.shape[0])
        return m.vq.decode(z, quantize=False)
    m.vq_decode_fn, m.vq_dtype = compiled, torch.bfloat16
    lin = dn.linear_vq_for(m, n=16)
    assert lin is not None and calls == []
    assert m.vq_decode_fn is compiled and m.vq_dtype is torch.bfloat16


@torch.no_grad()
def test_one_compiled_search_graph_serves_both_memory_formats():
    m = tiny_model()
    backend = CountingBackend()
    dn.compile_networks(m, backend=backend)
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    want = m.quantize(z)
    n = backend.graphs
    got = m.quantize(z.contiguous(memory_format=torch.channels_last))
    assert n == 1 and backend.graphs == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_vq_fingerprint_sees_any_weight_and_only_the_weights():
    a, b = tiny_model(), tiny_model()                    # same seed: same weights
    assert dn.vq_fingerprint(a.vq) == dn.vq_fingerprint(b.vq)
    with torch.no_grad():
        b.vq.decoder.conv_out.bias[0] += 1e-6
    assert dn.vq_fingerprint(a.vq) != dn.vq_fingerprint(b.vq)


def test_the_guide_and_patches_in_one_unet_call_equal_separate_calls():
    """`joint_eps_fn`'s "guide+patches" call (the linear joint sampler's one UNet batch for the guide and the first
    patch batch) gives each row the ε of its own call: the guide's context on row 0, the patches' after it."""
    m = live_model()
    g = torch.Generator().manual_seed(3)
    guide_ctx, patch_ctx = torch.randn(1, 65, 32, generator=g), torch.randn(4, 65, 32, generator=g)
    x = torch.randn(5, 3, 8, 8, generator=g)
    t = torch.full((5,), 600)
    fn = dn.joint_eps_fn(m, guide_ctx, patch_ctx, 2.0)
    with torch.no_grad():
        both = fn(x[:3], t[:3], "guide+patches", slice(1, 3))
        apart = torch.cat([fn(x[:1], t[:1], "guide", None), fn(x[1:3], t[1:3], "patches", slice(1, 3))])
        wrong = fn(x[1:3], t[1:3], "patches", slice(0, 2))        # other contexts: the comparison can fail
    assert m.counter.unet == 2 * 3 + 2 * 3 + 2 * 2
    torch.testing.assert_close(both, apart, rtol=1e-4, atol=1e-5)
    assert (wrong - apart[1:]).abs().max() > 1e-2


@torch.no_grad()
def test_a_short_batch_padded_to_the_static_shape_gives_its_items_and_compiles_nothing_new():
    """`sample_patch_latents(pad_to=)`, which `zoomldm sample patches` uses under `sample.compile: static`: a
    shard's last, shorter batch runs at the full batch's shape (no new graph) and returns the latents of its own
    items, those of the unpadded run."""
    m = live_model()
    ctx = torch.randn(5, 5, 32, generator=torch.Generator().manual_seed(3))
    want = dn.sample_patch_latents(m, ctx[:3], [0, 1, 2], seed=7, steps=5, cache_every=2, cache_forecast=True)
    assert m.counter.unet + m.counter.unet_cached == 3 * 2 * 6                # PLMS: 6 evaluations, CFG: 2 halves
    dn.compile_networks(m, backend=(backend := CountingBackend()), vq=False, dynamic=False)
    assert m.static_batch
    dn.sample_patch_latents(m, ctx, [3, 4, 5, 6, 7], seed=7, steps=5, cache_every=2, cache_forecast=True)
    graphs, m.counter = backend.graphs, dn.Counter()
    got = dn.sample_patch_latents(m, ctx[:3], [0, 1, 2], seed=7, steps=5, cache_every=2, cache_forecast=True,
                                  pad_to=5)
    assert backend.graphs == graphs and got.shape == want.shape               # the full batch's graphs served it
    assert m.counter.unet + m.counter.unet_cached == 5 * 2 * 6                # the padding ran (and is counted)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)                 # channels-last, batch 5: rounding
    swapped = dn.sample_patch_latents(m, ctx[[1, 0, 2]], [0, 1, 2], seed=7, steps=5, cache_every=2,
                                      cache_forecast=True, pad_to=5)                # items 0 and 1 swap contexts
    assert (swapped - want).abs().max() > 100 * 2e-4                          # the tolerance can tell items apart
    full = dn.sample_patch_latents(m, ctx[:3], [0, 1, 2], seed=7, steps=5, pad_to=3)   # no padding needed
    assert full.shape[0] == 3
