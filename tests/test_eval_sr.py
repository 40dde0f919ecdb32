"""`zoomldm eval sr`: the JSON equals SSIM/PSNR computed directly with scikit-image on a bicubic output, incomplete
pairs are skipped and counted, missing LPIPS weights give a null cell naming the file, bad inputs fail in one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import make_he, one_line
from zoomldm.cli.main import main
from zoomldm.diffusion.resize import downscale
from zoomldm.metrics.sr import ALEXNET_FILE, lpips_distance
from zoomldm.sampling.io import from_uint8, read_png, to_uint8, write_json, write_png

HR = 64


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    """Three LR/HR pairs (pair 2 marked hr_complete false) and the bicubic baseline's outputs."""
    root = tmp_path_factory.mktemp("evalsr")
    rgb = make_he(300, 300, seed=1)[0]
    pairs = root / "pairs"
    for k, (y, x) in enumerate([(60, 60), (120, 150), (200, 40)]):
        hr = rgb[y:y + HR, x:x + HR]
        write_png(pairs / "hr" / f"{k}.png", hr)
        write_png(pairs / "lr" / f"{k}.png", to_uint8(downscale(from_uint8(hr), 4))[0])
        write_json(pairs / f"{k}.json", {"hr_complete": k != 2})
    res = cli("sample", "sr-baseline", "--method", "bicubic", *[a for k in range(3) for a in
              ("--lr", pairs / "lr" / f"{k}.png")], "--out", root / "bicubic", "--no-progress")
    assert res.exit_code == 0, res.output + repr(res.exception)
    return root


def test_eval_sr_matches_skimage_and_names_missing_lpips_weights(sr_run, tmp_path):
    out = tmp_path / "bicubic.json"
    res = cli("eval", "sr", "--pairs", sr_run / "pairs", "--outputs", sr_run / "bicubic", "--method", "bicubic",
              "--out", out, "--lpips-weights-dir", tmp_path / "no-weights")
    assert res.exit_code == 0, res.output + repr(res.exception)
    rec = json.loads(out.read_text())
    assert rec["method"] == "bicubic" and rec["n"] == 2 and rec["n_skipped_incomplete"] == 1
    assert rec["lpips"] is None and rec["lpips_note"] == ALEXNET_FILE
    assert rec["convention"] == "RGB, full image, data range 255; SSIM Gaussian σ=1.5"
    ssims, psnrs = [], []
    for k in ("0", "1"):
        a, b = read_png(sr_run / "bicubic" / f"{k}.png"), read_png(sr_run / "pairs" / "hr" / f"{k}.png")
        ssims.append(structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=255))
        psnrs.append(peak_signal_noise_ratio(b, a, data_range=255))
    assert [r["k"] for r in rec["per_image"]] == ["0", "1"]
    assert rec["ssim"] == pytest.approx(np.mean(ssims), rel=1e-9)
    assert rec["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-9)
    assert 0 < rec["ssim"] < 1 and 15 < rec["psnr"] < 60
    assert rec["seconds_per_image"] is not None


@pytest.mark.slow
def test_eval_sr_lpips_with_local_weights(sr_run, tmp_path):
    import torchvision
    torch.manual_seed(0)
    trunk = torchvision.models.alexnet(weights=None).features        # features only: LPIPS uses no more
    torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, tmp_path / ALEXNET_FILE)
    out = tmp_path / "bicubic.json"
    res = cli("eval", "sr", "--pairs", sr_run / "pairs", "--outputs", sr_run / "bicubic", "--method", "bicubic",
              "--out", out, "--lpips-weights-dir", tmp_path)
    assert res.exit_code == 0, res.output + repr(res.exception)
    rec = json.loads(out.read_text())
    direct = [lpips_distance(np.array(read_png(sr_run / "bicubic" / f"{k}.png")),
                             np.array(read_png(sr_run / "pairs" / "hr" / f"{k}.png")), tmp_path) for k in ("0", "1")]
    assert rec["lpips_note"] is None and rec["lpips"] == pytest.approx(np.mean(direct), rel=1e-6)


def test_eval_sr_errors_are_one_line(sr_run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(sr_run / "bicubic", partial)
    (partial / "1.png").unlink()
    res = cli("eval", "sr", "--pairs", sr_run / "pairs", "--outputs", partial, "--method", "x", "--out",
              tmp_path / "o.json", "--lpips-weights-dir", tmp_path)
    assert res.exit_code == 2 and one_line(res.output) and str(partial / "1.png") in res.output, res.output
    same = tmp_path / "same"                             # HR itself as the output: PSNR is infinite
    shutil.copytree(sr_run / "pairs" / "hr", same)
    res = cli("eval", "sr", "--pairs", sr_run / "pairs", "--outputs", same, "--method", "x", "--out",
              tmp_path / "o.json", "--lpips-weights-dir", tmp_path)
    assert res.exit_code == 2 and one_line(res.output) and str(same / "0.png") in res.output, res.output
    res = cli("eval", "sr", "--pairs", tmp_path / "nothing", "--outputs", same, "--method", "x", "--out",
              tmp_path / "o.json")
    assert res.exit_code == 2 and one_line(res.output) and "nothing" in res.output, res.output
