"""Summarizer (official EmbeddingViT2_5): fixture parity, key/shape/size checks, mixed-grid batching."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torchvision.models.vision_transformer import Encoder as TorchvisionEncoder

from zoomldm.models.errors import CheckpointKeyError
from conftest import FIXTURES, rel_err
from zoomldm.models.summarizer import (
    SUMMARIZER_PRESETS,
    Summarizer,
    SummarizerConfig,
    null_context_like,
    num_params,
    pad_grids,
    summarizer_from_official,
)

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no official fixtures at {FIXTURES}")


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURES / "summarizer.pt", weights_only=True)


def tiny_config(**kw) -> SummarizerConfig:
    base = dataclasses.replace(SUMMARIZER_PRESETS["small"], input_dim=32, hidden_dim=32, mlp_dim=64,
                               num_heads=4)
    return dataclasses.replace(base, **kw)


@needs_fixtures
def test_official_fixture_parity(official):
    model = summarizer_from_official(official["state_dict"], official["config"]).eval()
    inp = official["inputs"]
    grids = [inp["grid_1"], inp["grid_2"], inp["grid_4"], inp["grid_8"]]
    ref = official["outputs"]["context"]  # (4, 65, 64)
    with torch.no_grad():
        from_list = model(grids, inp["mag"])
        padded, grid_size = pad_grids(grids)
        from_padded = model(padded, inp["mag"], grid_size=grid_size)
        one_by_one = torch.cat([model(g[None], m[None]) for g, m in zip(grids, inp["mag"])])
    assert from_list.shape == ref.shape == (4, 65, 64)
    for out in (from_list, from_padded, one_by_one):
        assert rel_err(out, ref) <= 1e-5


@needs_fixtures
def test_paper_preset_has_official_keys_and_shapes():
    full = json.loads((FIXTURES / "full_size_keys.json").read_text())["latent_diffusion"]
    prefix = "cond_stage_model."
    official = {k[len(prefix):]: list(v) for k, v in full.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = Summarizer(SUMMARIZER_PRESETS["paper"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official


def test_paper_parameter_count():
    with torch.device("meta"):
        model = Summarizer(SUMMARIZER_PRESETS["paper"])
    assert num_params(model) == 38_656_000  # reference §1.4: 38.7 M
    assert round(num_params(model) / 1e6, 1) == 38.7


def test_from_official_paper_yaml_and_naip():
    # configs/zoomldm_brca.yaml `cond_stage_config.params`; the rest are constructor defaults.
    brca = {"feat_key": "ssl_feat", "mag_key": "mag", "num_layers": 12, "input_channels": 1024,
            "hidden_channels": 512, "vit_mlp_dim": 2048, "p_uncond": 0.1}
    assert SummarizerConfig.from_official(brca) == SUMMARIZER_PRESETS["paper"]
    naip = SummarizerConfig.from_official({**brca, "mag_levels": 4})
    assert naip.mag_levels == 4
    with torch.device("meta"):
        assert Summarizer(naip).mag_embedding.weight.shape == (4, 512)
    assert SummarizerConfig.from_official(naip.to_official()) == naip


@pytest.mark.parametrize("bad, match", [
    ({"hidden_chanels": 64}, "unknown official argument"),
    ({"seq_length": 32}, "seq_length"),
    ({"hidden_channels": 64, "output_channels": 32}, "output_channels"),
    ({"hidden_channels": 64, "num_heads": 5}, "divisible"),
    ({"mag_levels": 0}, "mag_levels"),
])
def test_from_official_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        SummarizerConfig.from_official(bad)


@needs_fixtures
def test_bad_state_dict_names_missing_unexpected_and_misshaped(official):
    sd = dict(official["state_dict"])
    del sd["final_proj.bias"]
    sd["encoder.layers.encoder_layer_9.ln_1.weight"] = torch.zeros(64)
    sd["dim_reduce.weight"] = torch.zeros(64, 47)
    with pytest.raises(CheckpointKeyError) as err:
        summarizer_from_official(sd, official["config"])
    message = str(err.value)
    for text in ("missing", "final_proj.bias", "unexpected", "encoder_layer_9.ln_1.weight",
                 "mis-shaped", "dim_reduce.weight"):
        assert text in message
    assert isinstance(err.value, ValueError)


def test_mixed_grid_batch_matches_items_one_by_one():
    torch.manual_seed(0)
    model = Summarizer(tiny_config()).eval()
    sides = [1, 8, 2, 4, 2, 1]
    grids = [torch.randn(32, s, s) for s in sides]
    mag = torch.tensor([0, 1, 2, 3, 4, 7])
    with torch.no_grad():
        singles = torch.cat([model(g[None], m[None]) for g, m in zip(grids, mag)])  # (6, 65, 32)
        from_list = model(grids, mag)
        padded, grid_size = pad_grids(grids)
        padded = padded + 100.0 * (padded == 0)  # junk outside each item's grid must be ignored
        from_padded = model(padded, mag, grid_size=grid_size)
    assert grid_size.tolist() == sides
    assert from_list.shape == (6, 65, 32)
    torch.testing.assert_close(from_list, singles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_padded, singles, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side, slots", [(1, range(32, 33)), (2, range(30, 34)), (4, range(24, 40)),
                                         (8, range(0, 64))])
def test_centred_padding_layout(side, slots):
    torch.manual_seed(0)
    model = Summarizer(tiny_config())
    grid = torch.randn(1, 32, side, side)
    with torch.no_grad():
        tokens = model.tokenize(grid, torch.tensor([side]))[0]  # (64, D)
        expected = model.dim_reduce(grid[0].flatten(1).T)  # (n, D), row-major
    is_grid = torch.zeros(64, dtype=torch.bool)
    is_grid[list(slots)] = True
    torch.testing.assert_close(tokens[is_grid], expected)
    torch.testing.assert_close(tokens[~is_grid], model.pad_token[0].expand(int((~is_grid).sum()), -1))


def test_encoder_matches_torchvision_vit_encoder():
    """Our Encoder loads strictly into torchvision's (the official dependency) and computes the same."""
    torch.manual_seed(0)
    cfg = tiny_config(depth=2)
    ours = Summarizer(cfg).encoder.eval()
    ref = TorchvisionEncoder(seq_length=65, num_layers=cfg.depth, num_heads=cfg.num_heads,
                             hidden_dim=cfg.hidden_dim, mlp_dim=cfg.mlp_dim, dropout=0.0,
                             attention_dropout=0.0).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 65, cfg.hidden_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_forward_is_deterministic_and_null_context_is_zero():
    torch.manual_seed(0)
    model = Summarizer(tiny_config(p_uncond=0.5)).train()  # no CFG dropout inside forward, even in train mode
    grid, mag = torch.randn(4, 32, 2, 2), torch.tensor([0, 1, 2, 3])
    ctx = model(grid, mag)
    torch.testing.assert_close(model(grid, mag), ctx, rtol=0, atol=0)
    assert (ctx.abs().sum(dim=(1, 2)) > 0).all()
    null = null_context_like(ctx)
    assert null.shape == ctx.shape and not null.any()


@pytest.mark.parametrize("grid, mag, grid_size, match", [
    (torch.randn(2, 32, 3, 3), torch.tensor([0, 1]), None, "grid sides"),
    (torch.randn(2, 32, 2, 2), torch.tensor([0, 8]), None, "mag indices"),
    (torch.randn(2, 31, 2, 2), torch.tensor([0, 1]), None, r"\(N, 32, h, h\)"),
    (torch.randn(2, 32, 4, 4), torch.tensor([0, 1]), torch.tensor([8, 1]), "exceeds"),
])
def test_bad_inputs_raise_clear_errors(grid, mag, grid_size, match):
    model = Summarizer(tiny_config())
    with pytest.raises(ValueError, match=match):
        model(grid, mag, grid_size=grid_size)


def test_small_presets_fit_together():
    from zoomldm.models.cdm import CDM_PRESETS
    from zoomldm.models.unet import UNET_PRESETS
    hidden = SUMMARIZER_PRESETS["small"].hidden_dim
    assert UNET_PRESETS["small"].context_dim == hidden == CDM_PRESETS["small"].in_channels
    assert UNET_PRESETS["paper"].context_dim == SUMMARIZER_PRESETS["paper"].hidden_dim == \
        CDM_PRESETS["paper"].in_channels
