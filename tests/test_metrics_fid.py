"""Fréchet distance vs scipy/closed forms/clean-fid, statistics I/O, and the feature-extractor registry."""

import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from zoomldm.metrics import extractors as ex
from zoomldm.metrics.fid import (FeatureStats, StatsError, fid_from_stats, frechet_distance,
                                stats_from_features)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _random_stats(rng, d, n):
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + rng.normal(size=d)
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_reference(mu1, s1, mu2, s2):
    """The pytorch-fid / clean-fid formula with scipy.linalg.sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d,seed", [(8, 0), (64, 1), (128, 2)])
def test_frechet_matches_scipy_sqrtm(d, seed):
    rng = np.random.default_rng(seed)
    mu1, s1 = _random_stats(rng, d, 4 * d)
    mu2, s2 = _random_stats(rng, d, 4 * d)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _sqrtm_reference(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_identical_is_zero():
    mu, s = _random_stats(np.random.default_rng(3), 64, 200)
    assert abs(frechet_distance(mu, s, mu, s)) <= 1e-8


def test_frechet_closed_form_diagonal_and_singular():
    # Diagonal covariances: FD = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, also with zero variances
    # (singular).
    a, b = np.array([1.0, 4.0, 0.0, 2.0]), np.array([9.0, 0.0, 0.0, 2.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # Rank-deficient covariances from n < D samples stay finite and match sqrtm where that converges.
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 0.5
    s1, s2 = stats_from_features(f1), stats_from_features(f2)
    fd = fid_from_stats(s1, s2)
    ref = _sqrtm_reference(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert np.isfinite(fd) and fd == pytest.approx(ref, rel=1e-4)


def test_stats_errors_name_the_problem():
    rng = np.random.default_rng(0)
    good = stats_from_features(rng.normal(size=(20, 4)), "x")
    with pytest.raises(StatsError, match="NaN"):
        stats_from_features(np.full((5, 3), np.nan))
    with pytest.raises(StatsError, match="n=1"):
        stats_from_features(np.ones((1, 3)))
    with pytest.raises(StatsError, match="dimension mismatch: 4 .* 5"):
        fid_from_stats(good, stats_from_features(rng.normal(size=(20, 5)), "x"))
    with pytest.raises(StatsError, match="different extractors"):
        fid_from_stats(good, stats_from_features(rng.normal(size=(20, 4)), "y"))
    with pytest.raises(StatsError, match="NaN"):
        frechet_distance(good.mu, good.sigma * np.nan, good.mu, good.sigma)


def test_feature_stats_roundtrip(tmp_path):
    s = stats_from_features(np.random.default_rng(0).normal(size=(30, 6)), "effnet-lite0")
    path = s.save(tmp_path / "ref" / "stats.npz")
    t = FeatureStats.load(path)
    assert (t.n, t.extractor, t.dim) == (30, "effnet-lite0", 6)
    np.testing.assert_array_equal(t.mu, s.mu)
    np.testing.assert_array_equal(t.sigma, s.sigma)
    assert fid_from_stats(s, t) <= 1e-8
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        FeatureStats.load(tmp_path / "nope.npz")


# ------------------------------------------------------------------------------------- clean-fid parity
class TinyNet(nn.Module):
    """Deterministic stand-in feature net under clean-fid's convention: float NCHW in [0, 255] at 299²."""

    def __init__(self, out=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(3 * 4 * 4, out, generator=g))
        self.out = out

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32
        return torch.tanh(F.adaptive_avg_pool2d(x / 255.0, 4).flatten(1) @ self.w)  # (B, out)


def _image_folder(path, seed, n=24, size=(40, 48), shift=0):
    path.mkdir()
    rng = np.random.default_rng(seed)
    imgs = []
    for i in range(n):
        base = rng.integers(0, 200, size=(1, 1, 3))
        im = np.clip(base + rng.integers(0, 56 + shift, size=(*size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(im).save(path / f"{i:03d}.png")
        imgs.append(im)
    return np.stack(imgs)


def test_resize_clean_matches_cleanfid():
    from cleanfid.resize import build_resizer

    im = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ex.resize_clean(im), build_resizer("clean")(im))


def test_fid_matches_cleanfid_custom_extractor(tmp_path):
    from cleanfid import fid as cfid

    a = _image_folder(tmp_path / "a", seed=0)
    b = _image_folder(tmp_path / "b", seed=1, shift=60)
    net = TinyNet()
    ref = cfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", custom_feat_extractor=net,
                           device=torch.device("cpu"), num_workers=0, batch_size=8, verbose=False)
    extractor = ex.CleanFIDExtractor(net, name="tiny", dim=8)
    fa, fb = extractor(a, batch_size=8, progress=False), extractor(b, batch_size=8, progress=False)
    ours = fid_from_stats(stats_from_features(fa, "tiny"), stats_from_features(fb, "tiny"))
    # Both paths feed identical float32 inputs to the same net, so features agree to float32 round-off; the
    # FIDs then differ only by clean-fid's sqrtm vs our eigendecomposition (~1e-9 relative here).
    assert ref > 0.01
    assert ours == pytest.approx(ref, rel=1e-6)


# ----------------------------------------------------------------------------------- Inception plumbing
class _FakeInception(nn.Module):
    """Same TorchScript interface as NVIDIA's inception-2015-12-05.pt (a `layers` submodule, 2048-d)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 2048))

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def test_inception_missing_weights_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("ZOOMLDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(ex.MissingWeightsError, match="inception-2015-12-05.pt"):
        ex.get_extractor("inception")
    with pytest.raises(FileNotFoundError, match="elsewhere.pt"):
        ex.get_extractor("inception", weights_path=tmp_path / "elsewhere.pt")


def test_inception_extractor_matches_cleanfid_wrapper(tmp_path, monkeypatch):
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    torch.manual_seed(0)
    torch.jit.script(_FakeInception()).save(str(tmp_path / ex.INCEPTION_FILE))
    monkeypatch.setenv("ZOOMLDM_INCEPTION_WEIGHTS", str(tmp_path / ex.INCEPTION_FILE))
    imgs = np.random.default_rng(0).integers(0, 256, size=(3, 32, 40, 3), dtype=np.uint8)
    inc = ex.get_extractor("inception")
    assert (inc.label, inc.is_standin, inc.dim) == ("FID-Inception (clean-fid)", False, 2048)
    ours = inc(imgs, progress=False)
    ref_model = InceptionV3W(str(tmp_path), download=False)
    x = torch.from_numpy(np.stack([build_resizer("clean")(im) for im in imgs])).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = ref_model(x).double().numpy()
    assert ours.dtype == np.float64 and ours.shape == (3, 2048)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_clip_missing_weights_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("ZOOMLDM_CLIP_WEIGHTS", raising=False)
    with pytest.raises(ex.MissingWeightsError, match="ViT-B-32.pt"):
        ex.get_extractor("clip")


# ------------------------------------------------------------------------------------ EfficientNet-Lite0
def test_registry_labels():
    reg = ex.available_extractors()
    assert reg["effnet-lite0"] == dict(label="FID-EffNetL0 (offline stand-in)", is_standin=True, dim=1280)
    assert not reg["inception"]["is_standin"] and not reg["clip"]["is_standin"]
    with pytest.raises(KeyError, match="unknown feature extractor 'nope'"):
        ex.get_extractor("nope")


def test_effnet_lite0_offline_weights_classify_chelsea():
    from skimage.data import chelsea

    model = ex.load_effnet_lite0("cpu")
    assert ex.load_effnet_lite0(torch.device("cpu")) is model  # cached per device
    x = ex.imagenet_preprocess(torch.from_numpy(chelsea()).permute(2, 0, 1)[None])  # (1,3,224,224)
    with torch.no_grad():
        top1 = int(model(x).argmax())
    assert top1 in (281, 285)  # tabby / Egyptian cat: proves the positional key mapping

    extractor = ex.get_extractor("effnet-lite0")
    imgs = np.stack([chelsea()[:256, :256], chelsea()[40:296, 100:356]])
    feats = extractor(imgs, batch_size=1, progress=False)
    assert feats.shape == (2, 1280) and feats.dtype == np.float64 and np.isfinite(feats).all()
    # uint8 NCHW tensors give the same features as NHWC arrays
    feats_t = extractor(torch.from_numpy(imgs).permute(0, 3, 1, 2), progress=False)
    np.testing.assert_allclose(feats_t, feats, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        extractor(imgs.astype(np.float32))
