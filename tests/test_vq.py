"""VQ-f4 autoencoder: official parity fixture, paper-size keys and size, quantiser, converter errors."""

from __future__ import annotations

import json

import pytest
import torch

from zoomldm.models.errors import CheckpointKeyError
from zoomldm.models.vq import VQ_PRESETS, VectorQuantizer, VQConfig, VQModel, vq_from_official
from conftest import FIXTURES, rel_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# `first_stage_config.params` of the official configs/zoomldm_brca.yaml.
OFFICIAL_VQ_F4 = {
    "embed_dim": 3,
    "n_embed": 8192,
    "ddconfig": {
        "double_z": False,
        "z_channels": 3,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "lossconfig": {"target": "torch.nn.Identity"},
}


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURES / "vq_f4.pt", weights_only=True)


def test_matches_official_fixture(fixture):
    model = vq_from_official(fixture["state_dict"], json.loads(fixture["config"]))
    with torch.no_grad():
        latent = model.encode(fixture["inputs"]["image"])
        _, codes = model.quantize(latent)
        ours = {
            "latent": latent,
            "decoded_quantized": model.decode(latent),
            "decoded_unquantized": model.decode(latent, quantize=False),
        }
    ref = fixture["outputs"]
    assert torch.equal(codes, ref["codes"])
    for name, value in ours.items():
        assert value.shape == ref[name].shape
        # measured 2.6e-6, 7.3e-6, 7.6e-6: the fixture itself is ~2e-6 from a float64 evaluation
        assert rel_err(value, ref[name]) <= 1e-5, name


def test_paper_preset_equals_official_keys_and_size():
    full = json.loads((FIXTURES / "full_size_keys.json").read_text())["latent_diffusion"]
    prefix = "first_stage_model."
    official = {k[len(prefix) :]: tuple(v) for k, v in full.items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = VQModel(VQ_PRESETS["paper"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 55.3


def test_from_official_config():
    assert VQConfig.from_official(OFFICIAL_VQ_F4) == VQ_PRESETS["paper"]
    with pytest.raises(ValueError, match="unknown argument 'foo'"):
        VQConfig.from_official({**OFFICIAL_VQ_F4, "foo": 1})
    with pytest.raises(ValueError, match="double_z"):
        VQConfig.from_official(
            {**OFFICIAL_VQ_F4, "ddconfig": {**OFFICIAL_VQ_F4["ddconfig"], "double_z": True}}
        )
    with pytest.raises(ValueError, match="n_embed"):
        VQConfig.from_official({k: v for k, v in OFFICIAL_VQ_F4.items() if k != "n_embed"})


def test_bad_state_dict_names_every_problem(fixture):
    sd = dict(fixture["state_dict"])
    del sd["post_quant_conv.bias"]
    sd["quantize.used"] = torch.zeros(3)
    sd["quantize.embedding.weight"] = torch.zeros(32, 3)
    with pytest.raises(CheckpointKeyError) as info:
        vq_from_official(sd, json.loads(fixture["config"]))
    msg = str(info.value)
    assert "1 missing [post_quant_conv.bias]" in msg
    assert "1 unexpected [quantize.used]" in msg
    assert "quantize.embedding.weight: checkpoint (32, 3) vs model (64, 3)" in msg


def test_prefix_is_stripped(fixture):
    sd = {"first_stage_model." + k: v for k, v in fixture["state_dict"].items()}
    model = vq_from_official(sd, json.loads(fixture["config"]), prefix="first_stage_model.")
    with torch.no_grad():
        latent = model.encode(fixture["inputs"]["image"])
    assert rel_err(latent, fixture["outputs"]["latent"]) <= 1e-5


def test_quantizer_is_nearest_code_with_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=50, embed_dim=3, chunk=7)  # chunk smaller than the pixel count
    torch.nn.init.normal_(vq.embedding.weight)
    z = torch.randn(2, 3, 5, 4, requires_grad=True)
    z_q, codes = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)  # (40, 3)
    expected = torch.cdist(flat, vq.embedding.weight.detach()).argmin(1).view(2, 5, 4)
    assert torch.equal(codes, expected)
    torch.testing.assert_close(z_q.detach(), vq.embedding.weight.detach()[codes].permute(0, 3, 1, 2))
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_small_preset_round_trip_shapes():
    torch.manual_seed(0)
    model = VQModel(VQ_PRESETS["small"]).eval()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latent = model.encode(img)
        assert latent.shape == (2, 3, 16, 16)
        for quantize in (True, False):
            out = model.decode(latent, quantize=quantize)
            assert out.shape == img.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode(img[..., :62])
