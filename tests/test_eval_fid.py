"""`zoomldm eval fid-ref | fid | large`: self-FID ~ 0, the reference cache (reuse, invalidation), seeded
subsets and crops, large-image JSON, one-line errors (missing/empty sets, unknown magnification, NaN).

A tiny store (one 4 x 8-tile slide, 16-px patches, 20x and 5x) and tiny fake extractors registered for the
test (hand-made pooled colour features, 15-d), through click's CliRunner; the EfficientNet stand-in runs
only in the slow check.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from conftest import toy_regions
from zoomldm.cli.main import main
from zoomldm.data import store as st
from zoomldm.metrics import extractors as ex
from zoomldm.metrics.fid import FeatureStats, frechet_distance, stats_from_features
from zoomldm.metrics.refstats import load_ref, random_crops, sample_rows

P, ROWS, COLS = 16, 4, 8
MISSING = {(1, 1)}       # a base tile kept by no 20x region: the 5x regions covering it are incomplete


class _Fake(ex.FeatureExtractor):
    """Per-channel mean/std and 2x2-quadrant means of [0, 1] images (any size): 15-d, deterministic."""
    name, label, is_standin, dim = "fake-test", "FID-Fake (test stand-in)", True, 15
    calls = 0

    def _forward(self, batch):
        type(self).calls += 1
        out = []
        for im in batch:
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)          # (H, W, 3)
            h, w = x.shape[0] // 2, x.shape[1] // 2
            quads = [x[:h, :w], x[:h, w:], x[h:, :w], x[h:, w:]]
            out.append(torch.cat([x.mean((0, 1)), x.std((0, 1)), torch.stack([q.mean() for q in quads]),
                                  torch.stack([(x[..., 0] - x[..., 2]).mean(), x.max(), x.min()])]))
        return torch.stack(out)                                                   # (B, 15)


class _Fake2(_Fake):
    name, label = "fake-test-2", "FID-Fake2 (test stand-in)"


class _FakeNaN(_Fake):
    name, label = "fake-nan", "NaN"

    def _forward(self, batch):
        return torch.full((len(batch), self.dim), float("nan"))


for _cls in (_Fake, _Fake2, _FakeNaN):
    ex.register_extractor(_cls)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalfid")
    rng = np.random.default_rng(0)
    per_mag = {}
    for name, step in [("20x", 1), ("5x", 1)]:
        m, origins, index = toy_regions("a", name, step, P, ROWS, COLS, MISSING if name == "20x" else ())
        base = np.array([[200, 120, 170]] if name == "20x" else [[150, 90, 160]], dtype=np.int16)
        imgs = base[None, None] + rng.integers(-40, 40, size=(len(origins), P, P, 3))
        per_mag[m.slug] = {"images": np.clip(imgs, 0, 255).astype(np.uint8), "index": index}
    enc = {"name": "fake", "dim": 4, "is_standin": True}
    parts = root / "store" / "toy.parts"
    st.write_part(parts / "a", {"slide": "a", "status": "ok", "counts": {}, "encoder": enc}, per_mag)
    st.build_store([parts / "a"], root / "store" / "toy", "brca", P, 8, enc)
    cfg = {"dataset": {"name": "toy", "store_root": str(root / "store"), "patch_px": P},
           "eval": {"device": "cpu", "seed": 0, "fid": {"n_ref": 1000, "batch_size": 8},
                    "large": {"crops_per_image": 3, "n_ref_large": 10}}}
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": str(config), "store": root / "store" / "toy", "per_mag": per_mag}


def run(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def ok(res):
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def fails(res, *needles):
    assert res.exit_code == 2, res.output + repr(res.exception)
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and line.startswith("zoomldm: error:"), res.output
    for s in needles:
        assert str(s) in line, (s, line)
    return line


def _patch_set(path, images, mag="20x", cond="store"):
    path.mkdir(parents=True)
    np.save(path / "images-00000.npy", images)
    pd.DataFrame({"index": np.arange(len(images)), "shard": 0, "row": np.arange(len(images)), "mag": mag,
                  "cond": cond}).to_parquet(path / "manifest.parquet", index=False)
    return path


# ---------------------------------------------------------------------------------------------------------
# numerics

def test_frechet_finite_and_zero_for_singular_tiny_sets():
    """16 images, 1280-d features (the demo's sizes): singular covariances, finite FID, self-FID ~ 0."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    with threadpool_limits(1):                # a 1280² eigh is seconds on 1 thread, far slower oversubscribed
        a = stats_from_features(rng.normal(size=(16, 1280)), "x")
        b = stats_from_features(rng.normal(size=(16, 1280)) + 0.1, "x")
        fd = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
        assert np.isfinite(fd) and fd > 0
        # singular vs singular, commuting covariances: S2 = c^2 S1 -> |dmu|^2 + (1 - c)^2 tr(S1); c = 1: 0
        a = stats_from_features(rng.normal(size=(16, 256)), "x")
        assert frechet_distance(a.mu, a.sigma, a.mu, a.sigma) < 1e-8 * np.trace(a.sigma)
        fd_c = frechet_distance(a.mu, a.sigma, a.mu + 1.0, 4.0 * a.sigma)
        assert fd_c == pytest.approx(256 + np.trace(a.sigma), rel=1e-6)


def test_seeded_rows_and_crops_are_deterministic():
    r1, r2 = sample_rows(100, 10, 0, "patch", "5x"), sample_rows(100, 10, 0, "patch", "5x")
    assert np.array_equal(r1, r2) and len(set(r1.tolist())) == 10 and np.all(np.diff(r1) > 0)
    assert not np.array_equal(r1, sample_rows(100, 10, 1, "patch", "5x"))
    assert np.array_equal(sample_rows(5, 10, 0), np.arange(5))
    img = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    c = random_crops(img, 16, 5, seed=0, index=3)
    assert c.shape == (5, 16, 16, 3)
    assert np.array_equal(c, random_crops(img, 16, 5, seed=0, index=3))
    assert not np.array_equal(c, random_crops(img, 16, 5, seed=0, index=4))
    assert not np.array_equal(c, random_crops(img, 16, 5, seed=1, index=3))
    # each crop is a real window of the image (full resolution, no resize)
    wins = np.lib.stride_tricks.sliding_window_view(img, (16, 16, 3))[..., 0, :, :, :]  # (49, 49, 16, 16, 3)
    for crop in c:
        assert (wins == crop).all(axis=(-3, -2, -1)).any()


# ---------------------------------------------------------------------------------------------------------
# fid-ref and fid

def test_fid_of_a_set_against_its_own_reference_is_zero(env, tmp_path):
    ref = tmp_path / "ref-20x.npz"
    ok(run("fid-ref", "--config", env["config"], "--mag", "20x", "--extractor", "fake-test", "--out", ref,
           "--no-progress"))
    stats, key = load_ref(ref)
    n20 = len(env["per_mag"]["20x"]["images"])
    assert stats.n == n20 and key["n"] == n20 and key["mag"] == "20x" and key["extractor"] == "fake-test"
    assert key["stand_in"] is True and key["label"] == "FID-Fake (test stand-in)"
    assert FeatureStats.load(ref).n == n20                         # still a plain FeatureStats file

    images = env["per_mag"]["20x"]["images"][::-1].copy()          # same set, other order
    samples = _patch_set(tmp_path / "same", images)
    out = tmp_path / "fid.json"
    ok(run("fid", "--config", env["config"], "--samples", samples, "--ref", ref, "--out", out,
           "--method", "zoomldm", "--no-progress"))
    rec = json.loads(out.read_text())
    assert set(rec) == {"method", "cond", "magnification", "fid", "n_gen", "n_ref", "extractor",
                        "extractor_label", "stand_in", "samples"}
    assert rec["fid"] == pytest.approx(0.0, abs=1e-8)
    assert (rec["method"], rec["cond"], rec["magnification"]) == ("zoomldm", "store", "20x")
    assert (rec["n_gen"], rec["n_ref"], rec["extractor"], rec["stand_in"]) == (n20, n20, "fake-test", True)
    assert rec["samples"] == str(samples)

    # a different set (the 5x images, other colours) is far; the JSON is the FID of the features' statistics
    other = _patch_set(tmp_path / "other", env["per_mag"]["5x"]["images"])
    ok(run("fid", "--config", env["config"], "--samples", other, "--ref", ref, "--out", out, "--cond", "cdm",
           "--mag", "20x", "--no-progress"))
    rec = json.loads(out.read_text())
    feats = _Fake()(env["per_mag"]["5x"]["images"], progress=False)
    g = stats_from_features(feats)
    assert rec["fid"] == pytest.approx(frechet_distance(g.mu, g.sigma, stats.mu, stats.sigma), rel=1e-9)
    assert rec["fid"] > 1e-3 and rec["cond"] == "cdm"


def test_reference_cache_reused_and_invalidated(env, tmp_path):
    ref = tmp_path / "ref.npz"
    args = ["fid-ref", "--config", env["config"], "--mag", "20x", "--out", ref, "--no-progress"]
    _Fake.calls = 0
    ok(run(*args, "--extractor", "fake-test", "--n-ref", 12))
    first = _Fake.calls
    assert first > 0
    mtime = ref.stat().st_mtime_ns
    res = ok(run(*args, "--extractor", "fake-test", "--n-ref", 12))
    assert _Fake.calls == first and ref.stat().st_mtime_ns == mtime and "(cached)" in res.output
    stats, key = load_ref(ref)
    assert stats.n == 12 and key["n"] == 12

    ok(run(*args, "--extractor", "fake-test", "--n-ref", 10))       # another n: recomputed
    assert _Fake.calls > first and load_ref(ref)[0].n == 10
    ok(run(*args, "--extractor", "fake-test", "--n-ref", 10, "--seed", 3))   # another subset
    assert load_ref(ref)[1]["seed"] == 3
    ok(run(*args, "--extractor", "fake-test-2", "--n-ref", 10))     # another extractor: recomputed
    stats, key = load_ref(ref)
    assert stats.extractor == key["extractor"] == "fake-test-2"
    # n larger than the store: capped, and equal keys for any larger n (same images) -> reused
    ok(run(*args, "--extractor", "fake-test", "--n-ref", 500))
    calls = _Fake.calls
    ok(run(*args, "--extractor", "fake-test", "--n-ref", 900))
    assert _Fake.calls == calls and load_ref(ref)[0].n == len(env["per_mag"]["20x"]["images"])


def test_fid_refuses_other_extractor_and_magnification(env, tmp_path):
    ref = tmp_path / "ref.npz"
    ok(run("fid-ref", "--config", env["config"], "--mag", "20x", "--extractor", "fake-test", "--out", ref,
           "--no-progress"))
    samples = _patch_set(tmp_path / "s", env["per_mag"]["20x"]["images"][:4])
    out = tmp_path / "fid.json"
    base = ["fid", "--config", env["config"], "--samples", samples, "--ref", ref, "--out", out,
            "--no-progress"]
    fails(run(*base, "--extractor", "fake-test-2"), "fake-test-2", "fake-test", ref)
    fails(run(*base, "--mag", "5x"), "5x", "20x", ref)
    five = _patch_set(tmp_path / "five", env["per_mag"]["5x"]["images"], mag="5x")
    fails(run("fid", "--config", env["config"], "--samples", five, "--ref", ref, "--out", out), "5x", five)
    assert not out.exists()


def test_errors_name_the_file_and_magnification(env, tmp_path):
    ref = tmp_path / "ref.npz"
    cmd = ["fid-ref", "--config", env["config"], "--out", ref, "--no-progress"]
    fails(run(*cmd, "--mag", "1.25x", "--extractor", "fake-test"), "1.25x", env["store"])
    fails(run(*cmd, "--mag", "7x", "--extractor", "fake-test"), "7x")
    fails(run(*cmd, "--mag", "20x", "--extractor", "nope"), "nope")
    fails(run(*cmd, "--mag", "20x", "--extractor", "fake-nan"), "20x", env["store"], "NaN")
    assert not ref.exists()

    ok(run("fid-ref", "--config", env["config"], "--mag", "20x", "--extractor", "fake-test", "--out", ref,
           "--no-progress"))
    out = tmp_path / "fid.json"
    base = ["fid", "--config", env["config"], "--ref", ref, "--out", out, "--no-progress"]
    fails(run(*base, "--samples", tmp_path / "nowhere"), "nowhere", "no such directory")
    (tmp_path / "nomanifest").mkdir()
    fails(run(*base, "--samples", tmp_path / "nomanifest"), "nomanifest", "manifest.parquet")
    empty = tmp_path / "empty"
    empty.mkdir()
    pd.DataFrame({"index": pd.Series([], dtype=int), "shard": pd.Series([], dtype=int),
                  "mag": pd.Series([], dtype=str)}).to_parquet(empty / "manifest.parquet")
    fails(run(*base, "--samples", empty), "empty", "20x", "at least 2")
    one = _patch_set(tmp_path / "one", env["per_mag"]["20x"]["images"][:1])
    fails(run(*base, "--samples", one), str(one), "20x", "at least 2")
    nan_ref = tmp_path / "nanref.npz"
    np.savez(nan_ref, mu=np.full(15, np.nan), sigma=np.eye(15), n=np.int64(5), extractor=np.str_("fake-test"))
    fails(run("fid", "--config", env["config"], "--samples", one, "--ref", nan_ref, "--out", out),
          nan_ref, "NaN")
    fails(run("fid", "--config", env["config"], "--samples", one, "--ref", tmp_path / "no.npz", "--out", out),
          "no.npz")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# large

def _large_set(path, n, grid=4, seed=0, with_meta=True):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.clip(np.array([190, 110, 170]) + rng.integers(-50, 50, size=(grid * P, grid * P, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(path / f"{i}.png")
        Image.fromarray(img[:P, :P].astype(np.uint8)).save(path / f"{i}_guide.png")   # must be ignored
        meta = {"seconds": 2.0 + i, "consistency_mae": 10.0 * (i + 1)} if with_meta else {}
        (path / f"{i}.json").write_text(json.dumps(meta))
    return path


def test_large_clip_and_crop_fid(env, tmp_path):
    images = _large_set(tmp_path / "zoomldm-g4", 3)
    out, cache = tmp_path / "large.json", tmp_path / "cache"
    args = ["large", "--config", env["config"], "--images", images, "--grid", 4, "--out", out,
            "--ref-cache", cache, "--clip-extractor", "fake-test", "--crop-extractor", "fake-test-2",
            "--no-progress"]
    ok(run(*args))
    rec = json.loads(out.read_text())
    assert set(rec) == {"method", "grid", "size_px", "n_images", "clip_fid", "clip_extractor",
                        "clip_extractor_label", "clip_stand_in", "n_ref_large", "crop_fid",
                        "crop_extractor", "crop_extractor_label", "crop_stand_in", "n_crops", "n_ref_crops",
                        "seconds_per_image", "consistency_mae"}
    assert (rec["method"], rec["grid"], rec["size_px"], rec["n_images"]) == ("zoomldm-g4", 4, 4 * P, 3)
    assert rec["n_crops"] == 9 and rec["n_ref_crops"] == len(env["per_mag"]["20x"]["images"])
    assert rec["seconds_per_image"] == pytest.approx(3.0) and rec["consistency_mae"] == pytest.approx(20.0)
    assert (rec["clip_extractor"], rec["crop_extractor"]) == ("fake-test", "fake-test-2")
    assert rec["clip_extractor_label"] == "FID-Fake (test stand-in)" and rec["clip_stand_in"] is True
    assert np.isfinite(rec["clip_fid"]) and np.isfinite(rec["crop_fid"]) and rec["crop_fid"] > 0

    # real large images: the 5x regions with every base tile present (those covering MISSING are left out)
    n_complete = sum(1 for r in range(ROWS - 3) for c in range(COLS - 3)
                     if not any((r + a, c + b) in MISSING for a in range(4) for b in range(4)))
    assert rec["n_ref_large"] == n_complete
    clip_ref, key = load_ref(cache / "large-5x-fake-test.npz")
    assert key["kind"] == "large" and key["grid"] == 4 and clip_ref.n == n_complete
    assert load_ref(cache / "patch-20x-fake-test-2.npz")[1]["kind"] == "patch"

    # deterministic crops; references reused (no extractor call beyond the generated images' features)
    _Fake.calls = 0
    ok(run(*args))
    again = json.loads(out.read_text())
    assert again == rec
    assert _Fake.calls == 1                                        # one batch of 3 whole images, no reference
    # another seed: other crops and other reference subsets -> another Crop-FID
    ok(run(*args, "--seed", 1))
    assert json.loads(out.read_text())["crop_fid"] != rec["crop_fid"]


def test_large_errors_and_missing_timings(env, tmp_path):
    out, cache = tmp_path / "large.json", tmp_path / "cache"
    base = ["large", "--config", env["config"], "--out", out, "--ref-cache", cache, "--clip-extractor",
            "fake-test", "--crop-extractor", "fake-test", "--no-progress"]
    fails(run(*base, "--images", tmp_path / "nowhere", "--grid", 4), "nowhere", "grid 4")
    (tmp_path / "empty").mkdir()
    fails(run(*base, "--images", tmp_path / "empty", "--grid", 4), "empty", "grid 4")
    images = _large_set(tmp_path / "plain", 2, with_meta=False)
    fails(run(*base, "--images", images, "--grid", 16), "1.25x", env["store"])      # no 1.25x in the store
    fails(run(*base, "--images", images, "--grid", 3), "--grid 3")
    ok(run(*base, "--images", images, "--grid", 4, "--crops-per-image", 2))
    rec = json.loads(out.read_text())
    assert rec["seconds_per_image"] is None and rec["consistency_mae"] is None and rec["n_crops"] == 4
    fails(run("large", "--config", env["config"], "--ref-cache", cache, "--clip-extractor", "fake-nan",
              "--crop-extractor", "fake-test", "--no-progress", "--images", images, "--grid", 4,
              "--out", tmp_path / "nan.json"), "5x", "NaN")
    assert not (tmp_path / "nan.json").exists()


@pytest.mark.slow
def test_effnet_standin_end_to_end(env, tmp_path):
    """The demo's extractor (EfficientNet-Lite0 stand-in, 1280-d) on 16-px patches: finite, labelled."""
    from threadpoolctl import threadpool_limits
    ref, out = tmp_path / "ref.npz", tmp_path / "fid.json"
    samples = _patch_set(tmp_path / "s", env["per_mag"]["5x"]["images"])
    with threadpool_limits(1):                # 1280² eigh: oversubscribed BLAS threads are far slower
        ok(run("fid-ref", "--config", env["config"], "--mag", "20x", "--extractor", "effnet-lite0",
               "--out", ref, "--no-progress"))
        ok(run("fid", "--config", env["config"], "--samples", samples, "--ref", ref, "--out", out,
               "--mag", "20x", "--no-progress"))
    rec = json.loads(out.read_text())
    assert rec["extractor"] == "effnet-lite0" and rec["stand_in"] is True
    assert "stand-in" in rec["extractor_label"]
    assert np.isfinite(rec["fid"]) and rec["fid"] > 0
