"""CDM ConditionDiT (official cdm_dit DiT): fixture parity, key/shape/size checks, DiT closed forms."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from timm.layers import Mlp as TimmMlp
from timm.models.vision_transformer import Attention as TimmAttention

from zoomldm.models.cdm import (
    CDM_PRESETS,
    CDMConfig,
    ConditionDiT,
    TimestepEmbedder,
    cdm_from_official,
    sincos_pos_embed_1d,
)
from zoomldm.models.errors import CheckpointKeyError
from conftest import FIXTURES

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no official fixtures at {FIXTURES}")


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURES / "cdm_dit.pt", weights_only=True)


@needs_fixtures
def test_official_fixture_parity(official):
    model = cdm_from_official(official["state_dict"], official["config"]).eval()
    inp, ref = official["inputs"], official["outputs"]["out"]  # x (3, 64, 65) -> (3, 128, 65)
    with torch.no_grad():
        out = model(inp["x"], inp["timesteps"], inp["mag"])
    assert out.shape == ref.shape == (3, 128, 65)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert not model.pos_embed.requires_grad


@needs_fixtures
def test_paper_preset_has_official_keys_and_shapes():
    official = json.loads((FIXTURES / "full_size_keys.json").read_text())["cdm_dit_b"]
    with torch.device("meta"):
        model = ConditionDiT(CDM_PRESETS["paper"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official


def test_paper_parameter_count():
    with torch.device("meta"):
        model = ConditionDiT(CDM_PRESETS["paper"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert trainable == 130_696_960 and round(trainable / 1e6, 1) == 130.7  # reference §1.4
    assert frozen == 65 * 768  # the fixed sin-cos pos_embed, "+50 k frozen"


def test_from_official_defaults_and_round_trip():
    # The official `DiT_B` factory: DiT(depth=12, hidden_size=768, num_heads=12) with constructor defaults.
    assert CDMConfig.from_official({"depth": 12, "hidden_size": 768, "num_heads": 12}) == CDM_PRESETS["paper"]
    assert CDMConfig.from_official({}).hidden_size == 1152  # bare constructor default is DiT-XL width
    small = CDM_PRESETS["small"]
    assert CDMConfig.from_official(small.to_official()) == small


@pytest.mark.parametrize("bad, match", [
    ({"patch_size": 2}, "unknown official argument"),
    ({"class_dropout_prob": 0.1}, "class_dropout_prob"),
    ({"hidden_size": 96, "num_heads": 5}, "divisible"),
    ({"num_classes": 0}, "mag_levels"),
])
def test_from_official_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        CDMConfig.from_official(bad)


@needs_fixtures
def test_bad_state_dict_names_missing_unexpected_and_misshaped(official):
    sd = dict(official["state_dict"])
    del sd["final_layer.linear.bias"]
    sd["y_embedder.embedding_table.weight"] = torch.zeros(9, 96)  # a CFG null row the CDM does not have
    sd["blocks.2.attn.qkv.weight"] = torch.zeros(288, 96)
    with pytest.raises(CheckpointKeyError) as err:
        cdm_from_official(sd, official["config"])
    message = str(err.value)
    for text in ("missing", "final_layer.linear.bias", "unexpected", "blocks.2.attn.qkv.weight",
                 "mis-shaped", "y_embedder.embedding_table.weight"):
        assert text in message


@needs_fixtures
def test_pos_embed_is_the_official_1d_sincos(official):
    cfg = CDMConfig.from_official(official["config"])
    torch.testing.assert_close(ConditionDiT(cfg).pos_embed, official["state_dict"]["pos_embed"])


def test_sincos_closed_form():
    dim, positions = 16, 65
    table = sincos_pos_embed_1d(dim, positions).numpy()
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim // 2))
    np.testing.assert_allclose(table[:, : dim // 2], np.sin(np.arange(positions)[:, None] * omega), atol=1e-6)
    np.testing.assert_allclose(table[:, dim // 2:], np.cos(np.arange(positions)[:, None] * omega), atol=1e-6)
    # Timestep sinusoid: [cos, sin] halves, so t = 0 gives ones then zeros; frequency 1 in slot 0.
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 0].item() == pytest.approx(math.cos(3.0))
    assert emb[1, 4].item() == pytest.approx(math.sin(3.0))
    assert emb[1, 1].item() == pytest.approx(math.cos(3.0 * 10000 ** -0.25), abs=1e-6)


def test_adaln_zero_init_outputs_zero_and_shapes():
    torch.manual_seed(0)
    model = ConditionDiT(CDM_PRESETS["small"])
    C = CDM_PRESETS["small"].in_channels
    out = model(torch.randn(2, C, 65), torch.tensor([10, 500]), torch.tensor([0, 7]))
    assert out.shape == (2, 2 * C, 65) and not out.any()  # zero-initialised final layer (DiT §3.2)
    x = torch.randn(2, 64, 65)
    plain = ConditionDiT(CDMConfig(in_channels=64, hidden_size=32, depth=1, num_heads=2, learn_sigma=False))
    assert plain(x, torch.tensor([1, 2]), torch.tensor([0, 1])).shape == (2, 64, 65)


def test_attention_and_mlp_match_timm():
    """Our blocks load strictly into timm's Attention / Mlp (what the official DiT uses) and agree."""
    torch.manual_seed(0)
    block = ConditionDiT(CDMConfig(in_channels=16, hidden_size=32, depth=1, num_heads=4)).blocks[0]
    attn = TimmAttention(32, num_heads=4, qkv_bias=True).eval()
    attn.load_state_dict(block.attn.state_dict(), strict=True)
    mlp = TimmMlp(32, 128, act_layer=lambda: torch.nn.GELU(approximate="tanh"), drop=0).eval()
    mlp.load_state_dict(block.mlp.state_dict(), strict=True)
    x = torch.randn(2, 65, 32)
    with torch.no_grad():
        torch.testing.assert_close(block.attn(x), attn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block.mlp(x), mlp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x, t, mag, match", [
    (torch.randn(2, 64, 64), torch.zeros(2), torch.zeros(2, dtype=torch.long), r"\(N, 64, 65\)"),
    (torch.randn(2, 64, 65), torch.zeros(3), torch.zeros(2, dtype=torch.long), "timesteps and mag"),
    (torch.randn(2, 64, 65), torch.zeros(2), torch.tensor([0, 8]), "mag must be"),
])
def test_bad_inputs_raise_clear_errors(x, t, mag, match):
    model = ConditionDiT(dataclasses.replace(CDM_PRESETS["small"], in_channels=64))
    with pytest.raises(ValueError, match=match):
        model(x, t, mag)
