"""Tile encoders: the offline stand-in's numerics, and the local-checkpoint path of uni/dinov2 (no downloads).

The uni/dinov2 loading path is exercised on the same timm architectures built 64 wide and 2 blocks deep
(swapped into the spec table); the real ViT-L round trip is the slow test at the end.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from zoomldm.data import encoders
from zoomldm.data.encoders import CheckpointMismatchError, build_encoder
from zoomldm.metrics.extractors import MissingWeightsError


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)


TINY = dict(embed_dim=64, depth=2, num_heads=2)  # same timm architectures, narrow and shallow


@pytest.fixture
def tiny_specs(monkeypatch):
    """uni and dinov2 keep their timm architecture and kwargs but are built 64 wide and 2 blocks deep."""
    for name in ("uni", "dinov2"):
        spec = encoders._SPECS[name]
        tiny = replace(spec, dim=64, timm_kwargs={**spec.timm_kwargs, **TINY})
        monkeypatch.setitem(encoders._SPECS, name, tiny)


def _reference_features(enc, model, tiles) -> np.ndarray:
    with torch.inference_mode():
        x = enc.preprocess(torch.from_numpy(tiles))
        return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


def test_effnet_standin_features(tiles):
    enc = build_encoder("effnet-lite0")
    assert (enc.name, enc.dim, enc.input_px, enc.is_standin) == ("effnet-lite0", 1280, 224, True)
    assert enc.mean == (0.485, 0.456, 0.406) and enc.std == (0.229, 0.224, 0.225)
    a = enc.embed(tiles, batch_size=1)
    b = enc.embed(tiles, batch_size=3)
    assert a.shape == (3, 1280) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)   # batch-size independent
    np.testing.assert_array_equal(enc.embed(tiles, batch_size=3), b)  # deterministic
    assert np.abs(a[0] - a[1]).max() > 1e-2  # different tiles, different features


def test_preprocess_resizes_and_normalises():
    enc = build_encoder("effnet-lite0")
    grey = np.full((2, 32, 48, 3), 128, np.uint8)
    x = enc.preprocess(torch.from_numpy(grey))
    assert x.shape == (2, 3, 224, 224)
    expected = (128 / 255 - torch.tensor(enc.mean)) / torch.tensor(enc.std)
    torch.testing.assert_close(x[0, :, 100, 100], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", [".pth", ".safetensors"])
def test_uni_checkpoint_round_trip(tmp_path, tiles, tiny_specs, fmt):
    import timm
    from safetensors.torch import save_file

    spec = encoders._SPECS["uni"]
    torch.manual_seed(0)
    model = timm.create_model(spec.arch, pretrained=False, **spec.timm_kwargs).eval()
    path = tmp_path / f"uni{fmt}"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path)) if fmt == ".safetensors" else torch.save({"state_dict": sd}, path)
    enc = build_encoder("uni", checkpoint=str(path))
    assert (enc.dim, enc.input_px, enc.is_standin) == (64, 224, False)
    got = enc.embed(tiles, batch_size=2)
    np.testing.assert_allclose(got, _reference_features(enc, model, tiles), atol=1e-5, rtol=0)


def test_dinov2_checkpoint_at_518_is_resampled_to_224(tmp_path, tiles, tiny_specs):
    import timm

    spec = encoders._SPECS["dinov2"]
    model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **TINY)  # timm's 518²: 37 x 37
    assert model.pos_embed.shape[1] == 37 * 37
    torch.save(model.state_dict(), tmp_path / "dino.bin")
    enc = build_encoder("dinov2", checkpoint=str(tmp_path / "dino.bin"))
    assert enc.model.pos_embed.shape[1] == 16 * 16  # 224 / 14
    torch.testing.assert_close(enc.model.reg_token, model.reg_token)
    assert enc.embed(tiles[:2]).shape == (2, 64)


def test_checkpoint_mismatch_lists_keys(tmp_path, tiny_specs):
    import timm

    spec = encoders._SPECS["uni"]
    other = timm.create_model(spec.arch, pretrained=False, **{**spec.timm_kwargs, "embed_dim": 32})  # not 64
    torch.save(other.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(CheckpointMismatchError, match=r"wrong\.pth.*'uni'.*shape mismatch: cls_token"):
        build_encoder("uni", checkpoint=str(tmp_path / "wrong.pth"))
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing: cls_token.*unexpected: encoder\.weight"):
        build_encoder("uni", checkpoint=str(tmp_path / "junk.pth"))


def test_missing_weights_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"'uni'.*checkpoint=.*allow_download=True"):
        build_encoder("uni")
    with pytest.raises(MissingWeightsError, match=r"'dinov2'.*nope\.bin"):
        build_encoder("dinov2", checkpoint=str(tmp_path / "nope.bin"))
    with pytest.raises(ValueError, match="unknown encoder 'conch'"):
        build_encoder("conch")


@pytest.mark.slow
def test_real_uni_architecture_round_trip(tmp_path, tiles):
    import timm

    spec = encoders._SPECS["uni"]
    model = timm.create_model(spec.arch, pretrained=False, **spec.timm_kwargs).eval()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    enc = build_encoder("uni", checkpoint=str(tmp_path / "pytorch_model.bin"))
    assert enc.dim == 1024
    got = enc.embed(tiles[:2])
    np.testing.assert_allclose(got, _reference_features(enc, model, tiles[:2]), atol=1e-5, rtol=0)
