"""PSNR/SSIM against scikit-image, LPIPS plumbing with a locally saved random AlexNet."""

import numpy as np
import pytest
import torch
from skimage.data import astronaut, chelsea
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from zoomldm.metrics.sr import ALEXNET_FILE, MissingWeightsError, load_lpips_alex, lpips_distance, psnr, ssim


def _pairs():
    rng = np.random.default_rng(0)
    img = chelsea()[:128, :160]
    noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    blurred = np.clip(img.astype(float) * 0.8 + 20, 0, 255).astype(np.uint8)
    rand = rng.integers(0, 256, size=(33, 47, 3), dtype=np.uint8)
    rand2 = rng.integers(0, 256, size=(33, 47, 3), dtype=np.uint8)
    return [(img, noisy), (img, blurred), (rand, rand2), (astronaut()[:64, :64], astronaut()[64:128, 64:128])]


@pytest.mark.parametrize("i", range(4))
def test_ssim_psnr_equal_skimage(i):
    a, b = _pairs()[i]
    ref_ssim = structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255)
    assert ssim(a, b) == pytest.approx(ref_ssim, abs=1e-6)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-6)


def test_identical_and_bad_input():
    a = chelsea()[:32, :32]
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert psnr(a, a) == float("inf")
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), a.astype(np.float32))
    with pytest.raises(ValueError, match="equal shape"):
        ssim(a, a[:16])
    with pytest.raises(ValueError, match="11-pixel"):
        ssim(a[:8, :8], a[:8, :8])


def test_lpips_missing_backbone_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    a = chelsea()[:64, :64]
    with pytest.raises(MissingWeightsError, match=ALEXNET_FILE):
        lpips_distance(a, a)
    with pytest.raises(FileNotFoundError, match=ALEXNET_FILE):
        lpips_distance(a, a, weights_dir=tmp_path / "elsewhere")


def test_lpips_with_local_random_alexnet(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints" / ALEXNET_FILE
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    # Only the conv trunk is used by LPIPS; saving `features.*` keeps the test file small (full file: 233 MB).
    trunk = torchvision.models.alexnet(weights=None).features
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, ckpt)

    # the local trunk really is the one inside LPIPS (conv at torchvision index 3 lives in slice2)
    conv3 = dict(load_lpips_alex().net.slice2.named_children())["3"]
    torch.testing.assert_close(conv3.weight, trunk[3].weight, rtol=0, atol=0)

    a, b = chelsea()[:64, :64], chelsea()[100:164, 200:264]
    d_ab = lpips_distance(a, b)
    assert np.isfinite(d_ab) and d_ab > 0
    assert lpips_distance(a, a) == pytest.approx(0.0, abs=1e-7)
    # symmetric; an explicit weights_dir naming the same folder works too
    assert lpips_distance(b, a, weights_dir=ckpt.parent) == pytest.approx(d_ab, rel=1e-5)
