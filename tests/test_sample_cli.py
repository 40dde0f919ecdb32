"""`zoomldm sample`: patch shards + manifest, large images (constraint on/off), SR, Graikos panoramas, bad input.

Everything runs on a tiny store (one 4 x 8-tile slide, 16-px patches) and tiny random checkpoints (the small
presets shrunk further: 4 x 4 latents), through click's CliRunner.
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
from PIL import Image

from conftest import perturb, toy_regions
from zoomldm.cli.main import main
from zoomldm.data import store as st
from zoomldm.diffusion.blend import count_windows
from zoomldm.data.regions import pooled_grid
from zoomldm.models.cdm import CDMConfig, ConditionDiT
from zoomldm.models.checkpoint import save_checkpoint
from zoomldm.models.summarizer import Summarizer, SummarizerConfig
from zoomldm.models.unet import UNet, UNetConfig
from zoomldm.models.vq import VQConfig, VQModel

P, C, ROWS, COLS = 16, 6, 4, 8          # patch px, embedding dim, base-tile grid of the slide
MISSING = {(1, 1), (3, 2)}             # base tiles kept by no 20x region (their embedding comes from tiles.npy)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(ROWS, COLS, C)).astype(np.float16)
    per_mag = {}
    for name, step in [("20x", 1), ("5x", 4)]:
        m, origins, index = toy_regions("a", name, step, P, ROWS, COLS, MISSING if name == "20x" else ())
        per_mag[m.slug] = {
            "images": rng.integers(0, 256, size=(len(origins), P, P, 3), dtype=np.uint8),
            "grids": np.stack([pooled_grid(tiles, r, c, m) for r, c in origins]).astype(np.float16),
            "index": index,
        }
    parts = root / "store" / "toy.parts"
    enc = {"name": "fake", "dim": C, "is_standin": True}
    st.write_part(parts / "a", {"slide": "a", "status": "ok", "counts": {}, "encoder": enc}, per_mag, tiles=tiles)
    st.build_store([parts / "a"], root / "store" / "toy", "brca", P, 4, enc)

    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                           context_dim=32, image_size=P // 4))
    summ = Summarizer(SummarizerConfig(input_dim=C, hidden_dim=32, mlp_dim=64, depth=1, num_heads=2))
    vq = VQModel(VQConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, n_embed=64, resolution=P))
    cdm = ConditionDiT(CDMConfig(in_channels=32, hidden_size=32, depth=1, num_heads=2))
    perturb(unet, summ, cdm)
    ckpt = save_checkpoint(root / "zoomldm.safetensors", "zoomldm", {"unet": unet, "summarizer": summ, "vq": vq})
    cdm_ckpt = save_checkpoint(root / "cdm.safetensors", "cdm", {"cdm": cdm})

    from baselines.graikos import PatchEmbedder, PatchEmbedderConfig
    from zoomldm.training.loop import write_weights
    gunet = UNet(unet.config)
    embedder = PatchEmbedder(PatchEmbedderConfig(C, 32))
    perturb(gunet)
    graikos = root / "graikos.safetensors"
    write_weights(graikos, "graikos", {"unet": gunet, "embedder": embedder, "vq": vq}, {}, {})

    cfg = {"dataset": {"name": "toy", "store_root": str(root / "store"), "patch_px": P},
           "sample": {"device": "cpu",
                      "patches": {"n_per_mag": 5, "batch_size": 2, "plms_steps": 2, "cdm_steps": 3,
                                  "shard_size": 2},
                      "large": {"grids": [4], "n": 1, "steps": 2, "inner_steps": 1, "patch_batch": 8,
                                "graikos_steps": 2, "window_batch": 32, "cut": {"inner_steps": 2, "patch_batch": 5}},
                      "sr": {"n": 1, "inversion_steps": 2, "inner_steps": 1}}}
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": str(config), "ckpt": str(ckpt), "cdm": str(cdm_ckpt), "graikos": str(graikos)}


def run(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)])


def ok(res):
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


# ---------------------------------------------------------------------------------------------------------
# patches

def test_patch_shards_manifest_and_batch_size_independence(env, tmp_path):
    from zoomldm.sampling.io import read_patch_set
    outs = {}
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        ok(run("patches", "--config", env["config"], "--ckpt", env["ckpt"], "--mag", "5x", "--out", out,
               "--batch-size", bs, "--no-progress"))
        outs[bs] = read_patch_set(out)
        assert sorted(p.name for p in out.glob("images-*.npy")) == [f"images-{s:05d}.npy" for s in range(3)]
        assert not (out / ".partial").exists()
    images, manifest = outs[1]
    assert images.shape == (5, P, P, 3) and images.dtype == np.uint8
    assert manifest["index"].tolist() == list(range(5)) and set(manifest["cond"]) == {"store"}
    assert {"seed", "mag", "slide", "x", "y", "shard", "row"} <= set(manifest.columns)
    assert set(manifest["slide"]) == {"a"} and (manifest["mag"] == "5x").all()
    np.testing.assert_array_equal(images, outs[3][0])             # item i depends only on (seed, i)
    pd.testing.assert_frame_equal(manifest, outs[3][1])


def test_patch_feature_cache_is_recorded_changes_the_images_and_checks_its_branch(env, tmp_path, monkeypatch):
    """`--cache-every` (DeepCache, issue #8's patch cut) changes the images (the shallow branch really runs),
    `--cache-forecast` reaches the cache, the manifest records both, and a branch the UNet does not have is one
    line."""
    from zoomldm.sampling.io import read_patch_set
    base = ["patches", "--config", env["config"], "--ckpt", env["ckpt"], "--mag", "5x", "--n", 2, "--steps", 5,
            "--no-progress"]
    ok(run(*base, "--out", tmp_path / "ref"))
    ok(run(*base, "--out", tmp_path / "cached", "--cache-every", 3, "--cache-branch", 1))
    ref, ref_manifest = read_patch_set(tmp_path / "ref")
    cached, manifest = read_patch_set(tmp_path / "cached")
    assert (ref_manifest["cache_every"] == 1).all() and (manifest["cache_every"] == 3).all()
    assert (manifest["cache_branch"] == 1).all() and not manifest["cache_forecast"].any()
    assert not np.array_equal(ref, cached)
    # the forecast reaches the cache (its images can equal the reuse's here: the VQ snaps small latent changes)
    from zoomldm.sampling import denoisers as dn
    seen = []
    real = dn.feature_cache_model_fn
    monkeypatch.setattr(dn, "feature_cache_model_fn", lambda *a, **k: seen.append(a[2:]) or real(*a, **k))
    ok(run(*base, "--out", tmp_path / "forecast", "--cache-every", 3, "--cache-branch", 1, "--cache-forecast"))
    assert seen and all(a == (3, True) for a in seen)
    assert read_patch_set(tmp_path / "forecast")[1]["cache_forecast"].all()
    _one_line_error(run(*base, "--out", tmp_path / "bad", "--cache-branch", 9), "--cache-branch 9", "branches 0..1")
    assert not (tmp_path / "bad" / "images-00000.npy").exists()


def test_a_static_compiled_unet_gets_every_batch_at_the_full_batch_size(env, tmp_path, monkeypatch):
    """Under `sample.compile: static` (faked here: CPU compiles nothing) the last, shorter batch is padded to
    `--batch-size` (one compiled shape), and the images are those of the unpadded run; otherwise no padding."""
    from zoomldm.sampling import denoisers as dn
    from zoomldm.sampling.io import read_patch_set
    base = ["patches", "--config", env["config"], "--ckpt", env["ckpt"], "--mag", "5x", "--n", 3, "--steps", 5,
            "--batch-size", 2, "--no-progress"]
    seen, real = [], dn.sample_patch_latents
    monkeypatch.setattr(dn, "sample_patch_latents", lambda m, ctx, idx, *a, **k:
                        seen.append((len(idx), k["pad_to"])) or real(m, ctx, idx, *a, **k))
    ok(run(*base, "--out", tmp_path / "dynamic"))
    assert seen == [(2, None), (1, None)]
    real_fast_path = dn.fast_path

    def static(m, *a, **k):
        m.static_batch = True
        return real_fast_path(m, *a, **k)
    monkeypatch.setattr(dn, "fast_path", static)
    seen.clear()
    ok(run(*base, "--out", tmp_path / "static"))
    assert seen == [(2, 2), (1, 2)]
    np.testing.assert_array_equal(read_patch_set(tmp_path / "static")[0], read_patch_set(tmp_path / "dynamic")[0])


def test_patch_shards_resume_and_cdm_conditioning(env, tmp_path):
    out = tmp_path / "cdm"
    args = ["patches", "--config", env["config"], "--ckpt", env["ckpt"], "--mag", "20x", "--out", out, "--n", 3,
            "--cond", "cdm", "--cdm-ckpt", env["cdm"], "--no-progress"]
    ok(run(*args, "--shard", 1))                                  # one Snakemake job: shard 1 only
    assert (out / "images-00001.npy").is_file() and not (out / "manifest.parquet").exists()
    one = np.load(out / "images-00001.npy")
    ok(run(*args))                                                # the rest, then the manifest
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 3 and set(manifest["cond"]) == {"cdm"} and (manifest["store_row"] == -1).all()
    np.testing.assert_array_equal(np.load(out / "images-00001.npy"), one)
    res = run(*args[:-2], "--no-progress")                        # without --cdm-ckpt: nothing left to do
    assert res.exit_code == 0
    res = run(*args, "--shard", 7)
    assert res.exit_code == 2 and "--shard 7" in res.output and len(res.output.strip().splitlines()) == 1


def test_interrupted_shard_keeps_its_finished_batches(env, tmp_path):
    """A batch saved before an interruption is reused, not recomputed (a marker batch of zeros survives)."""
    from zoomldm.sampling.io import PatchShards
    out = tmp_path / "resume"
    args = ["patches", "--config", env["config"], "--ckpt", env["ckpt"], "--mag", "5x", "--out", out, "--n", 4,
            "--batch-size", 1, "--no-progress"]
    shards = PatchShards(out, 4, 2)
    marker = np.zeros((1, P, P, 3), np.uint8)
    shards.write_batch(1, [2], marker, [{"index": 2, "seed": 0, "mag": "5x", "cond": "store", "slide": "a",
                                         "x": -1, "y": -1, "store_row": 0, "model": "", "model_kind": "zoomldm",
                                         "mag_index": 2, "steps": 2, "cfg_scale": 1.75}])
    assert shards.pending(1) == [3]
    ok(run(*args))
    images = np.load(out / "images-00001.npy")
    assert (images[0] == 0).all() and images[1].std() > 0 and not (out / ".partial").exists()


def test_cdm_contexts_follow_the_official_sampler(env):
    """sample_cdm_contexts = ADM-spaced DDIM (η = 0) over x0-prediction, item-seeded, batch-independent."""
    from zoomldm.diffusion import Schedule
    from zoomldm.sampling.denoisers import load_cdm, sample_cdm_contexts
    cdm = load_cdm(env["cdm"])
    a = sample_cdm_contexts(cdm, 3, 2, seed=5, steps=4)
    b = torch.cat([sample_cdm_contexts(cdm, 1, 2, seed=5, steps=4, indices=[i]) for i in range(3)])
    assert a.shape == (3, 65, 32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # One step from t = 999 with ᾱ_prev = 1 (ADM) returns the model's x̂0 itself.
    one = sample_cdm_contexts(cdm, 1, 2, seed=5, steps=1)
    from zoomldm.diffusion import randn_items
    from zoomldm.sampling.denoisers import stream_seed
    x = randn_items(stream_seed(5, "cdm"), [0], (32, 65))
    assert Schedule.cosine().timesteps(1, "adm") == (0,)
    with torch.no_grad():
        x0 = cdm(x, torch.zeros(1, dtype=torch.long), torch.tensor([2]))[:, :32]
    torch.testing.assert_close(one, x0.transpose(1, 2), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# large images

def test_large_contract_constraint_off_and_consistency(env, tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    base = ["large", "--config", env["config"], "--ckpt", env["ckpt"], "--grid", 4, "--no-progress"]
    ok(run(*base, "--out", on))
    ok(run(*base, "--out", off, "--no-constraint"))
    recs = {}
    for out, flag in [(on, True), (off, False)]:
        assert Image.open(out / "0.png").size == (4 * P, 4 * P)
        assert Image.open(out / "0_guide.png").size == (P, P)
        rec = json.loads((out / "0.json").read_text())
        assert rec["constraint"] is flag and rec["seed"] == 0 and rec["seconds"] > 0
        assert math.isfinite(rec["consistency_mae"]) and 0 <= rec["consistency_mae"] <= 255
        assert rec["source"]["slide"] == "a" and rec["guide_mag"] == "5x"
        recs[flag] = rec
    # Same seed: the guide is identical (one-way coupling); only the constraint loop differs.
    guides = [np.asarray(Image.open(d / "0_guide.png")) for d in (on, off)]
    np.testing.assert_array_equal(*guides)
    assert recs[True]["joint_unet_forwards"] > recs[False]["joint_unet_forwards"] == 2 * 2 * (1 + 16)
    assert recs[False]["vq_encodes"] == 0 and recs[True]["vq_encodes"] == 2 * 2 * 16
    summary = tmp_path / "consistency.json"
    ok(CliRunner().invoke(main, ["sample", "consistency", "--constrained", str(on), "--unconstrained", str(off),
                                 "--out", str(summary)]))
    s = json.loads(summary.read_text())
    assert s["n"] == 1 and s["constrained_mae"] == recs[True]["consistency_mae"]
    assert s["unconstrained_mae"] == recs[False]["consistency_mae"]
    mtime = (on / "0.json").stat().st_mtime_ns
    ok(run(*base, "--out", on))                                   # finished items are skipped
    assert (on / "0.json").stat().st_mtime_ns == mtime
    ok(run(*base, "--out", tmp_path / "cdm", "--cond", "cdm", "--cdm-ckpt", env["cdm"], "--inner-steps", 0))
    rec = json.loads((tmp_path / "cdm" / "0.json").read_text())
    assert rec["cond"] == "cdm" and rec["source"] is None and rec["constraint"] is True


def test_real_conditioning_falls_back_to_the_part_tiles(env):
    from zoomldm.data.store import RegionStore
    from zoomldm.sampling.denoisers import RegionLookup
    store = RegionStore(env["root"] / "store" / "toy")
    tiles = np.load(env["root"] / "store" / "toy.parts" / "a" / "tiles.npy")
    lookup = RegionLookup(store, "5x")
    for row in range(len(lookup)):
        region = lookup.region(row)
        expect = tiles[region.row0:region.row0 + 4, region.col0:region.col0 + 4].reshape(16, C)
        np.testing.assert_array_equal(region.base_grids[:, :, 0, 0], expect.astype(np.float32))
        assert region.from_tiles == sum((region.row0 + a, region.col0 + b) in MISSING
                                        for a in range(4) for b in range(4))
    assert sum(lookup.region(r).from_tiles for r in range(len(lookup))) == len(MISSING)


# ---------------------------------------------------------------------------------------------------------
# Graikos panoramas

def test_graikos_panorama_runs(env, tmp_path):
    ok(run("graikos-large", "--config", env["config"], "--ckpt", env["graikos"], "--grid", 4, "--out", tmp_path,
           "--no-progress"))
    assert Image.open(tmp_path / "0.png").size == (4 * P, 4 * P)
    rec = json.loads((tmp_path / "0.json").read_text())
    windows = 13 * 13                                             # (4·4 − 4)/1 + 1 per side, stride = 4/4
    assert rec["unet_forwards"] == windows * 2 * 2 and rec["constraint"] is False and rec["seed"] == 0
    # same real region as ZoomLDM image 0
    from zoomldm.data.store import RegionStore
    from zoomldm.sampling.denoisers import RegionLookup, pick_rows
    lookup = RegionLookup(RegionStore(env["root"] / "store" / "toy"), "5x")
    assert rec["source"]["store_row"] == int(pick_rows(len(lookup), [0], 0, "large", "5x")[0])
    # its patch sets for FID: base magnification, real embeddings only
    ok(run("patches", "--config", env["config"], "--ckpt", env["graikos"], "--mag", "20x", "--n", 2, "--out",
           tmp_path / "patches", "--no-progress"))
    assert pd.read_parquet(tmp_path / "patches" / "manifest.parquet")["model_kind"].tolist() == ["graikos"] * 2
    _one_line_error(run("patches", "--config", env["config"], "--ckpt", env["graikos"], "--mag", "5x", "--out",
                        tmp_path / "bad"), "Graikos patch model")


def test_slerp_weights_interpolate_exactly_at_grid_points():
    from baselines.panorama import interpolate_grid, slerp, window_conditions, window_layout
    g, w, stride = 4, 8, 2
    tiles = torch.randn(g, g, 5, dtype=torch.float64)
    conds = window_conditions(tiles, w, stride)
    layout = window_layout(g, w, stride)
    assert len(layout) == conds.shape[0] == ((g * w - w) // stride + 1) ** 2
    for k, (i, j) in enumerate(layout):
        if i % w == 0 and j % w == 0:                             # window aligned with tile (i/w, j/w)
            assert torch.equal(conds[k], tiles[i // w, j // w])
    # closed form between orthogonal unit vectors: cos(tπ/2) a + sin(tπ/2) b
    a, b = torch.tensor([[1.0, 0, 0]], dtype=torch.float64), torch.tensor([[0, 2.0, 0]], dtype=torch.float64)
    for t in (0.0, 0.25, 0.5, 1.0):
        torch.testing.assert_close(slerp(a, b, t), math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b)
    torch.testing.assert_close(slerp(a, 3 * a, 0.5), 2 * a)       # parallel: linear
    mid = interpolate_grid(tiles, torch.tensor([0.5]), torch.tensor([0.0]))
    torch.testing.assert_close(mid[0], slerp(tiles[0, 0][None], tiles[1, 0][None], 0.5)[0])
    edge = interpolate_grid(tiles, torch.tensor([float(g - 1)]), torch.tensor([float(g - 1)]))
    assert torch.equal(edge[0], tiles[-1, -1])


def test_panorama_window_average_equals_a_canvas_ddim_step():
    """With a pointwise denoiser, the per-pixel mean over overlapping windows is the canvas ε itself, so the
    panorama sampler must reproduce plain DDIM on the whole canvas."""
    from baselines.panorama import GraikosModel, PanoramaConfig, panorama_sample
    from zoomldm.diffusion import Schedule, ddim_sample, randn_items, step_noise_fn

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = UNetConfig(model_channels=32, channel_mult=(1,), context_dim=4, image_size=4,
                                     attention_resolutions=())
            self.w = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, x, t, ctx):
            return self.w * x + 0.01 * ctx.mean() * 0 + 1e-4 * t[:, None, None, None]

    from baselines.graikos import PatchEmbedder, PatchEmbedderConfig
    gm = GraikosModel(Pointwise(), PatchEmbedder(PatchEmbedderConfig(5, 4)), None, None)
    cfg = PanoramaConfig(steps=4, eta=1.0, guidance=3.0, window_batch=7)
    x_T = randn_items(1, [0], (3, 12, 12))
    got = panorama_sample(gm, torch.randn(3, 3, 5), x_T, cfg, step_noise_fn(2, [0]))
    want = ddim_sample(lambda x, t: 0.3 * x + 1e-4 * t[:, None, None, None], x_T, Schedule.scaled_linear(), 4,
                       eta=1.0, noise_fn=step_noise_fn(2, [0]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# super-resolution and bad input

def test_large_linear_cut_is_a_config_choice(env, tmp_path):
    """--constraint-mode linear (issue #8's cut): 1 VQ decode per inner iteration and patch, no encode and no
    extra model call, same seeds and guide as the reference; it runs with the settings of sample.large.cut (K = 2
    and the half-stride decode here, against the reference's K = 1 and quarter stride); the JSON says which
    algorithm ran."""
    base = ["large", "--config", env["config"], "--ckpt", env["ckpt"], "--grid", 4, "--no-progress"]
    ok(run(*base, "--out", tmp_path / "ref"))
    ok(run(*base, "--out", tmp_path / "cut", "--constraint-mode", "linear"))
    ref, cut = (json.loads((tmp_path / d / "0.json").read_text()) for d in ("ref", "cut"))
    assert ref["constraint_mode"] == "reference" and cut["constraint_mode"] == "linear"
    n, k, steps = 16, ref["inner_steps"], ref["steps"]
    assert (k, cut["inner_steps"]) == (1, 2)
    assert cut["joint_vq_encodes"] == 0 and cut["joint_vq_decodes"] == steps * (1 + n * 2)
    assert ref["joint_vq_encodes"] == 2 * steps * n * k and ref["joint_vq_decodes"] == steps * (1 + n * k)
    assert cut["joint_unet_forwards"] == steps * 2 * (1 + n) < ref["joint_unet_forwards"]
    h = P // 4
    assert (ref["decode_stride"], cut["decode_stride"]) == (h // 4, h // 2)
    assert cut["blend_vq_decodes"] < ref["blend_vq_decodes"]
    for rec in (ref, cut):      # the 16 whole-patch windows reuse the final per-patch decodes
        assert rec["blend_vq_decodes"] == count_windows(4 * h, 4 * h, h, rec["decode_stride"]) - n
    ok(run(*base, "--out", tmp_path / "k1", "--constraint-mode", "linear", "--inner-steps", 1, "--decode-stride", 1))
    k1 = json.loads((tmp_path / "k1" / "0.json").read_text())
    assert (k1["inner_steps"], k1["decode_stride"], k1["joint_vq_decodes"]) == (1, 1, steps * (1 + n))
    ok(run(*base, "--out", tmp_path / "d1", "--constraint-mode", "linear", "--decode-every", steps))
    d1 = json.loads((tmp_path / "d1" / "0.json").read_text())    # real decodes: the guide's + the last step's
    assert (d1["decode_every"], d1["joint_vq_decodes"]) == (steps, steps + n * 2)
    assert steps > 1 and d1["joint_unet_forwards"] == cut["joint_unet_forwards"]
    ok(run(*base, "--out", tmp_path / "off", "--constraint-mode", "linear", "--no-constraint", "--decode-every", 2))
    off = json.loads((tmp_path / "off" / "0.json").read_text())      # nothing constrained: nothing to fit or record
    assert (off["constraint"], off["decode_every"], off["joint_vq_decodes"]) == (False, None, 0)
    for flag in ("--constraint-steps", "--decode-every", "--linear-vq"):
        res = run(*base, "--out", tmp_path / "bad", flag, 1)
        assert res.exit_code == 2 and f"{flag} applies to --constraint-mode linear only" in res.output
    guides = [np.asarray(Image.open(tmp_path / d / "0_guide.png")) for d in ("ref", "cut")]
    np.testing.assert_array_equal(*guides)                     # the guide is never corrected: same in both


def test_a_saved_linear_fit_gives_the_image_of_fitting_in_the_job(env, tmp_path):
    """`sample fit-linear` once, then `sample large --linear-vq FILE`: the same image as the job that fits for
    itself (the workflow's large-image jobs load the run's fit instead of refitting); a fit of another VQ, a
    missing file and a foreign file are one-line errors."""
    from zoomldm.sampling.denoisers import load_linear_vq, save_linear_vq
    base = ["large", "--config", env["config"], "--ckpt", env["ckpt"], "--grid", 4, "--no-progress",
            "--constraint-mode", "linear"]
    fit = tmp_path / "fit" / "linear_vq.safetensors"
    ok(run("fit-linear", "--config", env["config"], "--ckpt", env["ckpt"], "--out", fit))
    assert [f.name for f in fit.parent.iterdir()] == [fit.name]         # written atomically: no temporary left
    ok(run(*base, "--out", tmp_path / "own"))
    ok(run(*base, "--out", tmp_path / "loaded", "--linear-vq", fit))
    own, loaded = (np.asarray(Image.open(tmp_path / d / "0.png")) for d in ("own", "loaded"))
    np.testing.assert_array_equal(own, loaded)
    rec = json.loads((tmp_path / "loaded" / "0.json").read_text())
    assert rec["linear_vq"] == str(fit)
    assert json.loads((tmp_path / "own" / "0.json").read_text())["linear_vq"] == "fitted in this run"
    lin, meta = load_linear_vq(fit)
    assert meta["latents"] == "random codebook latents"             # the toy store holds no latents
    assert meta["n"] == 64 and len(meta["vq"]) == 16
    lin.enc_weight = lin.enc_weight.flip(-1)             # a different fit of the same VQ: a different image
    scaled = tmp_path / "scaled.safetensors"
    save_linear_vq(lin, scaled, meta)
    ok(run(*base, "--out", tmp_path / "scaled", "--linear-vq", scaled))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "scaled" / "0.png")), own)
    other = tmp_path / "other.safetensors"
    save_linear_vq(lin, other, dict(meta, vq="0123456789abcdef"))
    _one_line_error(run(*base, "--out", tmp_path / "x", "--linear-vq", other), "fitted for another VQ",
                    "zoomldm sample fit-linear")
    _one_line_error(run(*base, "--out", tmp_path / "x", "--linear-vq", tmp_path / "nope.safetensors"),
                    "does not exist")
    _one_line_error(run(*base, "--out", tmp_path / "x", "--linear-vq", env["ckpt"]),
                    "is not a linear VQ fit")
    (tmp_path / "file").write_text("")
    _one_line_error(run("fit-linear", "--ckpt", env["ckpt"], "--out", tmp_path / "file" / "fit.safetensors"),
                    "--out", "cannot create")


def test_sr_writes_consistency_and_psnr(env, tmp_path):
    ok(run("sr-inputs", "--config", env["config"], "--grid", 4, "--n", 1, "--out", tmp_path / "in"))
    lr = tmp_path / "in" / "lr" / "0.png"
    assert Image.open(tmp_path / "in" / "hr" / "0.png").size == (4 * P, 4 * P)
    ok(run("sr", "--config", env["config"], "--ckpt", env["ckpt"], "--lr", lr, "--out", tmp_path / "sr",
           "--no-progress"))
    assert Image.open(tmp_path / "sr" / "0.png").size == (4 * P, 4 * P)
    rec = json.loads((tmp_path / "sr" / "0.json").read_text())
    assert 0 <= rec["lr_consistency_mae"] <= 255 and rec["lr_psnr"] > 0


def _one_line_error(res, *needles):
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_are_one_line(env, tmp_path):
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((P + 3, P, 3), np.uint8)).save(wrong)
    _one_line_error(run("sr", "--config", env["config"], "--ckpt", env["ckpt"], "--lr", wrong, "--out", tmp_path),
                    "wrong.png", f"{P}x{P}", "at 5x")
    _one_line_error(run("large", "--config", env["config"], "--ckpt", env["ckpt"], "--grid", 3, "--out", tmp_path),
                    "--grid 3", "4 (5x)")
    _one_line_error(run("large", "--config", env["config"], "--ckpt", env["ckpt"], "--grid", 8, "--out", tmp_path),
                    "2.5x")                                       # no 2.5x regions in the store
    _one_line_error(run("patches", "--config", env["config"], "--ckpt", env["cdm"], "--mag", "5x", "--out",
                        tmp_path / "x"), "cdm checkpoint", "--ckpt")
    _one_line_error(run("large", "--config", env["config"], "--ckpt", env["cdm"], "--grid", 4, "--out", tmp_path),
                    "cdm checkpoint")
    _one_line_error(run("graikos-large", "--config", env["config"], "--ckpt", env["ckpt"], "--grid", 4, "--out",
                        tmp_path), "zoomldm checkpoint", "Graikos")
