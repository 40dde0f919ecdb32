"""UNet denoiser: official parity fixture, paper-size key set and parameter count, converter errors, hooks."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from zoomldm.models.errors import CheckpointKeyError
from zoomldm.models.unet import UNET_PRESETS, UNet, UNetConfig, timestep_embedding, unet_from_official
from conftest import FIXTURES, rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# `unet_config.params` of the official configs/zoomldm_brca.yaml.
OFFICIAL_BRCA = {
    "use_checkpoint": True,
    "use_fp16": True,
    "image_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 192,
    "attention_resolutions": [8, 4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 3, 5],
    "num_heads": 1,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 512,
    "ckpt_path": "models/ldm_imgnet_unet.ckpt",
}


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURES / "unet.pt", weights_only=True)


def test_matches_official_fixture(fixture):
    model = unet_from_official(fixture["state_dict"], json.loads(fixture["config"]))
    with torch.no_grad():
        eps = model(**fixture["inputs"])
    assert eps.shape == fixture["outputs"]["eps"].shape
    assert rel_err(eps, fixture["outputs"]["eps"]) <= 1e-5  # measured 1.5e-6


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 999])
    dim = 6
    emb = timestep_embedding(t, dim)
    freqs = [10000 ** (-i / 3) for i in range(3)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 1, 999)]
    torch.testing.assert_close(emb, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    assert timestep_embedding(t, 7)[:, -1].eq(0).all()  # odd dims are zero-padded


def test_paper_preset_equals_official_keys_and_size():
    full = json.loads((FIXTURES / "full_size_keys.json").read_text())["latent_diffusion"]
    prefix = "model.diffusion_model."
    official = {k[len(prefix) :]: tuple(v) for k, v in full.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = UNet(UNET_PRESETS["paper"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 400.9


def test_from_official_config():
    cfg = UNetConfig.from_official(OFFICIAL_BRCA)
    assert cfg == dataclasses.replace(UNET_PRESETS["paper"], gradient_checkpointing=True)
    with pytest.raises(ValueError, match="unknown argument 'foo'"):
        UNetConfig.from_official({**OFFICIAL_BRCA, "foo": 1})
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        UNetConfig.from_official({**OFFICIAL_BRCA, "use_scale_shift_norm": True})
    with pytest.raises(ValueError, match="context_dim"):
        UNetConfig.from_official({k: v for k, v in OFFICIAL_BRCA.items() if k != "context_dim"})
    with pytest.raises(ValueError, match="multiples of 32"):
        UNetConfig(model_channels=48)


def test_bad_state_dict_names_every_problem(fixture):
    sd = dict(fixture["state_dict"])
    del sd["out.2.bias"]
    sd["input_blocks.99.weight"] = torch.zeros(1)
    sd["time_embed.0.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointKeyError) as info:
        unet_from_official(sd, json.loads(fixture["config"]))
    msg = str(info.value)
    assert "1 missing [out.2.bias]" in msg
    assert "1 unexpected [input_blocks.99.weight]" in msg
    assert "time_embed.0.weight: checkpoint (5, 5) vs model (128, 32)" in msg
    assert isinstance(info.value, ValueError)


def test_prefix_is_stripped(fixture):
    sd = {"model.diffusion_model." + k: v for k, v in fixture["state_dict"].items()}
    sd["cond_stage_model.other"] = torch.zeros(1)  # other prefixes are ignored
    model = unet_from_official(sd, json.loads(fixture["config"]), prefix="model.diffusion_model.")
    with torch.no_grad():
        assert rel_err(model(**fixture["inputs"]), fixture["outputs"]["eps"]) <= 1e-5


@pytest.fixture(scope="module")
def small() -> UNet:
    torch.manual_seed(0)
    model = UNet(UNET_PRESETS["small"])
    for p in model.parameters():  # re-draw the zero-initialised output convs so every layer matters
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def small_inputs(batch: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 65, UNET_PRESETS["small"].context_dim, generator=g)
    return x, t, context


def test_intermediates_names_shapes_and_values(small):
    x, t, context = small_inputs(2)
    seen = {}
    hooks = [small.middle_block.register_forward_hook(lambda m, i, o: seen.__setitem__("middle_block", o))]
    for i, block in enumerate(small.output_blocks):
        hooks.append(
            block.register_forward_hook(lambda m, inp, o, i=i: seen.__setitem__(f"output_blocks.{i}", o))
        )
    with torch.no_grad():
        eps, feats = small(x, t, context, return_intermediates=True)
        plain = small(x, t, context)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(eps, plain, rtol=0, atol=0)
    assert (
        list(feats)
        == small.intermediate_names
        == ["middle_block"] + [f"output_blocks.{i}" for i in range(12)]
    )
    shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    # small preset: widths 32, 32, 64, 64 at 16, 8, 4, 2 px; each decoder level ends with a 2x upsample.
    expected = [(64, 2, 2), (64, 2, 2), (64, 2, 2), (64, 4, 4), (64, 4, 4), (64, 4, 4), (64, 8, 8)]
    expected += [(32, 8, 8), (32, 8, 8), (32, 16, 16)] + [(32, 16, 16)] * 3
    assert list(shapes.values()) == expected
    for name, value in feats.items():
        torch.testing.assert_close(value, seen[name], rtol=0, atol=0)


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_feature_cache_pair_reproduces_forward_and_skips_the_deep_blocks(small, branch):
    """DeepCache's pair: `forward_caching` returns `forward`'s ε and the input of output block 11 − branch (the
    output of block 10 − branch, seen through `return_intermediates`); `forward_cached` on that feature gives the
    same ε, and it never runs the deep blocks (changing them changes nothing)."""
    x, t, context = small_inputs(3)
    with torch.no_grad():
        eps, feats = small(x, t, context, return_intermediates=True)
        eps_full, deep = small.forward_caching(x, t, context, branch)
        eps_cached = small.forward_cached(x, t, context, deep, branch)
    torch.testing.assert_close(eps_full, eps, rtol=0, atol=0)
    torch.testing.assert_close(deep, feats[f"output_blocks.{10 - branch}"], rtol=0, atol=0)
    torch.testing.assert_close(eps_cached, eps, rtol=0, atol=0)
    deep_model = UNet(UNET_PRESETS["small"]).eval()
    deep_model.load_state_dict(small.state_dict())
    with torch.no_grad():
        for block in [*deep_model.input_blocks[branch + 1:], deep_model.middle_block,
                      *deep_model.output_blocks[:11 - branch]]:
            for p in block.parameters():
                p.add_(1.0)
        torch.testing.assert_close(deep_model.forward_cached(x, t, context, deep, branch), eps, rtol=0, atol=0)
        assert not torch.allclose(deep_model(x, t, context), eps)          # the perturbation is real
        # a feature cached at another timestep gives another ε: the shallow branch does use it
        _, deep_other = small.forward_caching(x, (t + 300) % 1000, context, branch)
        assert not torch.allclose(small.forward_cached(x, t, context, deep_other, branch), eps)


def test_feature_cache_rejects_bad_branches_and_features(small):
    x, t, context = small_inputs(2)
    with pytest.raises(ValueError, match=r"cache branch 3 outside 0..2"):
        small.forward_caching(x, t, context, 3)
    with torch.no_grad():
        _, deep = small.forward_caching(x, t, context, 0)
        with pytest.raises(ValueError, match="cached feature of shape"):
            small.forward_cached(x[:1], t[:1], context[:1], deep, 0)


def test_small_preset_forward_backward(small):
    x, t, context = small_inputs(8)
    with torch.no_grad():
        eps = small(x, t, context)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    # channels-last input gives the same result
    with torch.no_grad():
        eps_cl = small(x[:2].contiguous(memory_format=torch.channels_last), t[:2], context[:2])
    torch.testing.assert_close(eps_cl, eps[:2], rtol=1e-5, atol=1e-5)
    # gradient checkpointing changes neither the output nor the gradients (8x8 latents keep this cheap)
    grads = []
    for ckpt in (False, True):
        model = UNet(dataclasses.replace(UNET_PRESETS["small"], gradient_checkpointing=ckpt)).train()
        model.load_state_dict(small.state_dict())
        model(x[:1, :, :8, :8], t[:1], context[:1]).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_fresh_model_predicts_zero_and_checks_inputs():
    model = UNet(UNET_PRESETS["small"])
    x, t, context = small_inputs(2)
    with torch.no_grad():
        assert model(x, t, context).eq(0).all()  # zero-initialised output conv, as the official init
    with pytest.raises(ValueError, match="divisible by 8"):
        model(x[..., :12], t, context)
    with pytest.raises(ValueError, match="context"):
        model(x, t, context[..., :5])
