"""Per-slide extraction end to end on synthetic slides: geometry, pooling, pyramids, bad input."""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_he, write_pyramid
from zoomldm.config import config_from_dict
from zoomldm.data.extract import extract_slide
from zoomldm.data.readers import open_slide
from zoomldm.data.store import RegionStore, build_store

P = 32


class FakeEncoder:
    """Deterministic, cheap features of a tile: channel means and stds and a few spatial moments."""
    name, dim, is_standin = "fake", 8, True

    def embed(self, tiles, batch_size=64, progress=False):
        x = tiles.astype(np.float64) / 255.0                             # (N, H, W, 3)
        feats = [x.mean(axis=(1, 2)), x.std(axis=(1, 2)),
                 x[:, : x.shape[1] // 2].mean(axis=(1, 2, 3))[:, None],
                 x[:, :, : x.shape[2] // 2].mean(axis=(1, 2, 3))[:, None]]
        return np.concatenate(feats, axis=1).astype(np.float32)


def _cfg(**dataset):
    base = {"patch_px": P, "ladder": "brca", "magnifications": ["20x", "10x", "5x", "2.5x"], "mask": "none",
            "fallback_base_mag": 20.0}
    base.update(dataset)
    return config_from_dict({"dataset": base}).dataset


@pytest.fixture
def png_slide(tmp_path):
    rgb, _ = make_he(300, 420, seed=3)
    path = tmp_path / "slide.png"
    Image.fromarray(rgb).save(path)
    return path


def test_counts_follow_geometry_and_grids_are_avg_pools_of_tiles(png_slide, tmp_path):
    cfg = _cfg(stride_fraction=0.5)
    meta = extract_slide(png_slide, tmp_path / "part", cfg, FakeEncoder(), progress=False)
    rows, cols = 300 // P, 420 // P                                         # 9 x 13 base tiles
    assert (meta["rows"], meta["cols"]) == (rows, cols)
    for m in cfg.magnification_list():
        n, stride = m.tiles_per_side, max(1, round(m.tiles_per_side * 0.5))
        assert meta["counts"][m.name] == ((rows - n) // stride + 1) * ((cols - n) // stride + 1)
    build_store([tmp_path / "part"], tmp_path / "store", "brca", P, 7, {"name": "fake", "dim": 8})
    store = RegionStore(tmp_path / "store")
    enc = FakeEncoder()
    with open_slide(png_slide) as reader:
        for m in cfg.magnification_list():
            t = store.table(m.name)
            for i in (0, len(t) - 1):
                r0, c0 = int(t.manifest.row0[i]), int(t.manifest.col0[i])
                n, g = m.tiles_per_side, m.grid_side
                # Independently: embed each base tile of the region, then average-pool to g x g.
                tiles = np.stack([[enc.embed(reader.read_region((c0 + c) * P, (r0 + r) * P, P, P)[None])[0]
                                   for c in range(n)] for r in range(n)])             # (n, n, C)
                k = n // g
                want = tiles.reshape(g, k, g, k, -1).mean(axis=(1, 3)).transpose(2, 0, 1)
                np.testing.assert_allclose(t.get("grids", i).astype(np.float32), want, atol=2e-3)
                region = reader.read_region(c0 * P, r0 * P, n * P, P)
                np.testing.assert_array_equal(t.get("images", i), region)
                assert (t.manifest.x[i], t.manifest.y[i]) == (c0 * P, r0 * P)


def test_pyramid_gives_the_same_regions_as_its_base_level(tmp_path):
    rgb, _ = make_he(512, 640, seed=5)
    pyr = write_pyramid(tmp_path / "pyr.tif", rgb, n_levels=3)
    flat = tmp_path / "flat.png"
    Image.fromarray(rgb).save(flat)
    cfg = _cfg()
    a = extract_slide(pyr, tmp_path / "a", cfg, FakeEncoder(), progress=False)
    b = extract_slide(flat, tmp_path / "b", cfg, FakeEncoder(), progress=False)
    assert a["counts"] == b["counts"]
    for m in cfg.magnification_list():
        ia = np.load(tmp_path / "a" / m.slug / "images.npy").astype(float)
        ib = np.load(tmp_path / "b" / m.slug / "images.npy").astype(float)
        # Resize tolerance: a 2x2-mean pyramid level then resize vs. resizing the base level directly.
        assert np.abs(ia - ib).mean() < 3.0, m.name
        ga = np.load(tmp_path / "a" / m.slug / "grids.npy").astype(float)
        gb = np.load(tmp_path / "b" / m.slug / "grids.npy").astype(float)
        np.testing.assert_allclose(ga, gb, atol=0.05)


def test_forty_x_slide_reads_twice_the_pixels_per_tile(png_slide, tmp_path):
    meta = extract_slide(png_slide, tmp_path / "p", _cfg(base_mag=40.0), FakeEncoder(), progress=False)
    assert meta["factor"] == 2.0 and (meta["rows"], meta["cols"]) == (300 // (2 * P), 420 // (2 * P))


def test_tissue_mask_drops_background_regions(tmp_path):
    rgb, tissue = make_he(320, 320, seed=1)
    path = tmp_path / "he.png"
    Image.fromarray(rgb).save(path)
    meta = extract_slide(path, tmp_path / "p", _cfg(mask="tissue", min_mask_fraction=0.9), FakeEncoder(),
                         progress=False)
    idx = __import__("pandas").read_parquet(tmp_path / "p" / "20x" / "index.parquet")
    assert 0 < meta["counts"]["20x"] < (320 // P) ** 2
    for x, y in zip(idx.x, idx.y):                                   # every kept tile is mostly tissue
        assert tissue[y:y + P, x:x + P].mean() > 0.8


def test_cli_skips_bad_slides_with_one_line_each_and_finishes_the_rest(tmp_path):
    from zoomldm.cli.main import main
    Image.fromarray(make_he(96, 128, seed=4)[0]).save(tmp_path / "slide.png")   # 3 x 4 base tiles
    trunc = tmp_path / "trunc.tif"
    write_pyramid(trunc, make_he(256, 256)[0], n_levels=1)
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    empty = tmp_path / "empty.tif"
    import tifffile
    tifffile.imwrite(empty, np.zeros((128, 128, 3), np.uint8), photometric="rgb")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset:\n  inputs: '{tmp_path}/*.[pt][ni][gf]'\n  patch_px: {P}\n  mask: valid\n"
                   f"  magnifications: ['20x', '10x']\n  fallback_base_mag: 20\n"
                   f"  store_root: '{tmp_path}/store'\nencoder:\n  batch_size: 16\n")
    res = CliRunner().invoke(main, ["data", "extract", "--config", str(cfg), "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = [l for l in res.output.splitlines() if l.startswith("  ")]
    assert len(lines) == 2
    assert any("trunc.tif" in l for l in lines) and any("empty.tif" in l for l in lines)
    parts = Path(tmp_path / "store" / "demo.parts")
    assert (parts / "slide" / "part.json").is_file()
    res = CliRunner().invoke(main, ["data", "build-store", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert RegionStore(tmp_path / "store" / "demo").info["slides"] == ["slide"]
