"""MIL evaluation: SSL/UNet features, the block hook, labels and bags, 20x+5x fusion, the CLI and its errors.

A tiny store (two 4 x 8-tile slides, 16-px patches, 6-d embeddings) and a tiny random ZoomLDM checkpoint,
as in test_sample_cli.py; the commands run through click's CliRunner.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import perturb, toy_regions
from zoomldm import mags
from zoomldm.cli.main import main
from zoomldm.data import store as st
from zoomldm.data.regions import pooled_grid
from zoomldm.mil import features as mf
from zoomldm.models.checkpoint import save_checkpoint
from zoomldm.models.summarizer import Summarizer, SummarizerConfig
from zoomldm.models.unet import UNet, UNetConfig, timestep_embedding
from zoomldm.models.vq import VQConfig, VQModel

P, C, ROWS, COLS = 16, 6, 4, 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mil")
    rng = np.random.default_rng(0)
    parts, tiles_of = root / "store" / "toy.parts", {}
    enc = {"name": "effnet-lite0", "dim": C, "is_standin": True}
    for k, slide in enumerate(["a", "b"]):
        tiles = (rng.normal(size=(ROWS, COLS, C)) + 3 * k).astype(np.float16)   # slide b shifted: learnable
        tiles_of[slide] = tiles
        per_mag = {}
        for name, step in [("20x", 1), ("5x", 2)]:
            m, origins, index = toy_regions(slide, name, step, P, ROWS, COLS)
            per_mag[m.slug] = {
                "images": rng.integers(0, 256, size=(len(origins), P, P, 3), dtype=np.uint8),
                "grids": np.stack([pooled_grid(tiles, r, c, m) for r, c in origins]).astype(np.float16),
                "index": index,
            }
        st.write_part(parts / slide, {"slide": slide, "status": "ok", "counts": {}, "encoder": enc}, per_mag,
                      tiles=tiles)
    st.build_store([parts / "a", parts / "b"], root / "store" / "toy", "brca", P, 16, enc)

    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(2,), context_dim=32, image_size=P // 4))
    summ = Summarizer(SummarizerConfig(input_dim=C, hidden_dim=32, mlp_dim=64, depth=1, num_heads=2))
    vq = VQModel(VQConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, n_embed=64, resolution=P))
    perturb(unet, summ)
    ckpt = save_checkpoint(root / "zoomldm.safetensors", "zoomldm",
                           {"unet": unet, "summarizer": summ, "vq": vq})
    vq_only = save_checkpoint(root / "vq.safetensors", "vq", {"vq": vq})
    cfg = {"dataset": {"name": "toy", "store_root": str(root / "store"), "patch_px": P},
           "eval": {"device": "cpu", "mil": {"folds": 2, "epochs": 2, "unet_timestep": 50}}}
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": str(config), "ckpt": str(ckpt), "vq_only": str(vq_only),
            "tiles": tiles_of, "unet": unet}


def run(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def ok(res):
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def one_line_error(res, *needles):
    assert res.exit_code != 0
    text = res.output.strip()
    assert len(text.splitlines()) == 1, text
    for n in needles:
        assert n in text, text


# ---------------------------------------------------------------------------------------------------------
# features

@pytest.mark.parametrize("block", ["input", "middle", "output"])
def test_hook_returns_the_pooled_block_output(env, block):
    unet = env["unet"].eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, P // 4, P // 4, generator=g)
    t = torch.tensor([5, 50, 500])
    ctx = torch.randn(3, 65, 32, generator=g)
    got = mf.unet_block_features(unet, x, t, ctx, block)
    with torch.no_grad():
        if block == "input":                           # manual encoder pass up to the last input block
            emb = unet.time_embed(timestep_embedding(t, unet.config.model_channels))
            h = x
            for b in unet.input_blocks:
                h = b(h, emb, ctx)
            want = h
        else:
            _, feats = unet(x, t, ctx, return_intermediates=True)
            want = feats[mf.unet_block(unet, block)[0]]
    assert mf.unet_block(unet, "output")[0] == f"output_blocks.{len(unet.output_blocks) // 2}"
    assert got.shape == (3, want.shape[1])
    torch.testing.assert_close(got, want.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    assert not unet.middle_block._forward_hooks                   # the hook is removed again


def test_ssl_features_are_the_tile_embeddings_and_their_mean(env, tmp_path):
    for mag in ("20x", "5x"):
        ok(run("mil-features", "--config", env["config"], "--features", "ssl", "--mag", mag,
               "--out", tmp_path / f"{mag}.npz", "--no-progress"))
    f20, f5 = mf.load_features(tmp_path / "20x.npz"), mf.load_features(tmp_path / "5x.npz")
    assert len(f20) == 2 * ROWS * COLS and f20.features.shape[1] == C and f20.g == 1 and f5.g == 4
    assert f20.meta["encoder_label"] == "EfficientNet-Lite0 (offline stand-in for UNI)"
    assert f20.meta["stand_in"] is True
    for fs in (f20, f5):
        for i in range(len(fs)):
            tiles = env["tiles"][fs.slide[i]][fs.row0[i]:fs.row0[i] + fs.g, fs.col0[i]:fs.col0[i] + fs.g]
            np.testing.assert_allclose(fs.features[i], tiles.astype(np.float32).mean(axis=(0, 1)),
                                       rtol=2e-3, atol=2e-3)   # float16 storage


def test_zoomldm_features_deterministic_and_batch_independent(env, tmp_path):
    outs = []
    for bs in (2, 5, 5):
        out = tmp_path / f"z{len(outs)}.npz"
        ok(run("mil-features", "--config", env["config"], "--features", "zoomldm", "--ckpt", env["ckpt"],
               "--mag", "5x", "--block", "middle", "--batch-size", bs, "--out", out, "--no-progress"))
        outs.append(mf.load_features(out))
    for o in outs[1:]:
        np.testing.assert_allclose(o.features, outs[0].features, rtol=1e-5, atol=1e-6)
    fs = outs[0]
    assert fs.features.shape == (6, 64) and np.isfinite(fs.features).all()   # middle block: 2 x 32 channels
    assert fs.meta["unet_timestep"] == 50 and fs.meta["unet_block_name"] == "middle_block"
    assert fs.features.std(axis=0).max() > 0                                 # regions differ
    # A different timestep changes the features (the noise level is used).
    ok(run("mil-features", "--config", env["config"], "--features", "zoomldm", "--ckpt", env["ckpt"],
           "--mag", "5x", "--block", "middle", "--timestep", 900, "--out", tmp_path / "t900.npz",
           "--no-progress"))
    assert not np.allclose(mf.load_features(tmp_path / "t900.npz").features, fs.features)


def test_store_latents_match_vq_encoding(env, tmp_path):
    """--latents store (the store's float16 VQ latents) = --latents encode (VQ-encoded images), to float16."""
    import shutil

    from zoomldm.sampling.denoisers import load_zoomldm
    from zoomldm.sampling.io import from_uint8
    store = tmp_path / "toy"
    shutil.copytree(env["root"] / "store" / "toy", store)
    vq = load_zoomldm(env["ckpt"]).vq.eval()
    with torch.no_grad():
        st.RegionStore(store).add_array("latents",
                                        lambda im: vq.encode(from_uint8(im)).numpy().astype(np.float16))
    feats = {}
    for how in ("store", "encode"):
        ok(run("mil-features", "--config", env["config"], "--store", store, "--features", "zoomldm", "--ckpt",
               env["ckpt"], "--mag", "20x", "--block", "output", "--latents", how,
               "--out", tmp_path / f"{how}.npz", "--no-progress"))
        feats[how] = mf.load_features(tmp_path / f"{how}.npz")
    assert feats["store"].meta["z0"] == "store latents" and feats["encode"].meta["z0"] == "VQ-encoded images"
    np.testing.assert_allclose(feats["store"].features, feats["encode"].features, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# labels, bags, fusion

def _fs(slides, row0, col0, g, feats=None):
    n = len(slides)
    feats = np.arange(n, dtype=np.float32)[:, None] if feats is None else feats
    return mf.FeatureSet(feats, np.array(slides), np.array(row0), np.array(col0),
                         {"tiles_per_side": g, "magnification": {1: "20x", 4: "5x"}[g]})


def test_bag_ids_plain_and_pseudo_slides(tmp_path):
    fs = _fs(["a", "a", "b", "c"], [0, 3, 0, 0], [0, 5, 2, 0], 1)
    plain = tmp_path / "plain.csv"
    plain.write_text("slide,label\na,IDC\nb,ILC\nz,ILC\n")
    labels = mf.read_labels(plain)
    assert mf.bag_ids(labels, fs).tolist() == ["a", "a", "b", ""]
    bags, ids, ys = mf.assemble_bags(fs.features, mf.bag_ids(labels, fs), labels)
    assert ids == ["a", "b"] and ys == ["IDC", "ILC"] and [b[:, 0].tolist() for b in bags] == [[0, 1], [2]]
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("slide,label,source_slide,row_min,row_max,col_min,col_max\n"
                     "a0,x,a,0,4,0,4\na1,x,a,0,4,4,8\nb0,y,b,0,4,0,8\n")
    # centres (0.5, 0.5) -> a0, (3.5, 5.5) -> a1, (0.5, 2.5) -> b0; c is unlabelled
    assert mf.bag_ids(mf.read_labels(boxes), fs).tolist() == ["a0", "a1", "b0", ""]
    assert mf.class_order(["10", "2", "1"]) == ["1", "2", "10"]


def test_fusion_concatenates_the_containing_coarse_region():
    fine = _fs(["a", "a", "a", "b"], [0, 1, 3, 0], [0, 5, 7, 0], 1, np.arange(4, dtype=np.float32)[:, None])
    coarse = _fs(["a", "a", "a"], [0, 0, 0], [0, 2, 4], 4, np.array([[10.0], [20.0], [30.0]], np.float32))
    bags_f = np.array(["a", "a", "a", "b"], dtype=object)
    feats, kept = mf.fuse(fine, coarse, bags_f, np.array(["a", "a", "a"], dtype=object))
    # tile (0,0) only in coarse 0; tile (1,5) in coarse 1 (centre col 4) and 2 (centre 6): nearest is 2
    # tile (3,7) in coarse 2; slide b has no coarse region -> dropped
    assert kept.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(feats, [[0, 10], [1, 30], [2, 30]])
    # Preferring a container of the same pseudo-slide beats distance.
    feats, _ = mf.fuse(fine, coarse, np.array(["p", "q", "p", "b"], dtype=object),
                       np.array(["p", "q", "p"], dtype=object))
    assert feats[1].tolist() == [1, 20]


# ---------------------------------------------------------------------------------------------------------
# CLI end to end and errors

def test_demo_labels_and_mil_json(env, tmp_path):
    labels = tmp_path / "labels.csv"
    ok(run("mil-demo-labels", "--config", env["config"], "--out", labels))
    df = pd.read_csv(labels)
    assert list(df.columns) == ["slide", "label", *mf.BOX_COLUMNS]
    assert sorted(df["label"].value_counts().tolist()) == [3, 3] and df["slide"].is_unique
    task = json.loads(labels.with_suffix(".json").read_text())["task"]
    assert "pipeline check, not a pathology result" in task
    for mag in ("20x", "5x"):
        ok(run("mil-features", "--config", env["config"], "--features", "ssl", "--mag", mag,
               "--out", tmp_path / f"{mag}.npz", "--no-progress"))
    for feats, mag in [(["20x"], "20x"), (["20x", "5x"], "20x+5x")]:
        out = tmp_path / f"{mag}.json"
        args = [a for f in feats for a in ("--features", tmp_path / f"{f}.npz")]
        ok(run("mil", "--config", env["config"], *args, "--labels", labels, "--out", out))
        r = json.loads(out.read_text())
        assert r["magnification"] == mag and r["features"] == "ssl" and r["task"] == task
        assert r["n_slides"] == 6 and r["folds"] == 2 and r["stand_in"] is True
        assert r["n_instances"] == (64 if mag == "20x" else 64 - r["n_instances_dropped_by_fusion"])
        assert r["feature_dim"] == C * len(feats)
        for key in ("auc_mean", "auc_std", "bacc_mean", "bacc_std"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and 0 <= r[key] <= 1
        assert r["encoder_label"] == "EfficientNet-Lite0 (offline stand-in for UNI)"


def test_errors_are_one_line(env, tmp_path):
    cfg = env["config"]
    feats = tmp_path / "f.npz"
    ok(run("mil-features", "--config", cfg, "--features", "ssl", "--mag", "20x", "--out", feats,
           "--no-progress"))
    one_line_error(run("mil-features", "--config", cfg, "--features", "ssl", "--mag", "10x", "--out",
                       tmp_path / "x.npz"), "10x", "has no samples")
    one_line_error(run("mil-features", "--config", cfg, "--features", "ssl", "--mag", "7x", "--out",
                       tmp_path / "x.npz"), "7x")
    one_line_error(run("mil-features", "--config", cfg, "--features", "zoomldm", "--mag", "20x", "--out",
                       tmp_path / "x.npz"), "--ckpt")
    one_line_error(run("mil-features", "--config", cfg, "--features", "zoomldm", "--ckpt", env["vq_only"],
                       "--mag", "20x", "--out", tmp_path / "x.npz"), "vq.safetensors")
    bad = tmp_path / "bad.csv"
    bad.write_text("case,y\na,1\n")
    one_line_error(run("mil", "--config", cfg, "--features", feats, "--labels", bad,
                       "--out", tmp_path / "r.json"),
                   "slide,label")
    none = tmp_path / "none.csv"
    none.write_text("slide,label\nq,0\nr,1\n")
    one_line_error(run("mil", "--config", cfg, "--features", feats, "--labels", none,
                       "--out", tmp_path / "r.json"),
                   "none of its 2 slides")
    few = tmp_path / "few.csv"
    few.write_text("slide,label\na,0\nb,1\n")                        # one slide per class: no CV possible
    one_line_error(run("mil", "--config", cfg, "--features", feats, "--labels", few,
                       "--out", tmp_path / "r.json"),
                   "at least 2 slides")
    one_line_error(run("mil", "--config", cfg, "--features", feats, "--labels", tmp_path / "missing.csv",
                       "--out", tmp_path / "r.json"), "missing.csv")
    one_line_error(run("mil", "--config", cfg, "--features", tmp_path / "nope.npz", "--labels", few,
                       "--out", tmp_path / "r.json"), "nope.npz")


def test_single_image_demo_task_splits_into_halves():
    """One source image (the satellite demo): bands, labelled by the half of the image they lie in."""
    from types import SimpleNamespace
    m = mags.find("brca", "5x")
    man = pd.DataFrame({"slide": "earth", "row0": 0, "col0": np.arange(0, 20, 2)})   # centres col 2 ... 20
    store = SimpleNamespace(root="toy", table=lambda n: SimpleNamespace(magnification=m, manifest=man))
    df, task = mf.demo_pseudo_slides(store, ["5x"], blocks=5)
    assert len(df) == 4 and df["label"].tolist() == ["first-half"] * 2 + ["second-half"] * 2
    assert df["col_min"].iloc[0] == 0 and df["col_max"].iloc[-1] == 22 and (df["row_max"] == 4).all()
    assert "pipeline check" in task and "half of earth" in task
    fs = mf.FeatureSet(np.zeros((len(man), 1), np.float32), man["slide"].to_numpy(), man["row0"].to_numpy(),
                       man["col0"].to_numpy(), {"tiles_per_side": 4})
    assert (mf.bag_ids(df, fs) != "").all()                       # every band holds coarse regions
