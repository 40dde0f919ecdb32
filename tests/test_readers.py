"""Readers: pyramid levels vs. level 0, OpenSlide vs. tifffile, plain images, rasters, metadata and bad files.

Tolerances (mean absolute difference in uint8 levels, on the smooth synthetic H&E of conftest.make_he):
pyramid level vs. level 0 < 2 (the levels are rounded to uint8 once per halving); OpenSlide vs. tifffile < 1
(OpenSlide renders a window that starts at a fractional level pixel bilinearly, up to 0.5/downsample px off).
"""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import make_he, write_pyramid
from PIL import Image

from zoomldm.data.readers import RESIZE_FILTER, SlideError, choose_backend, level_scales, open_slide

REGIONS = [  # (x, y, size, out_px): aligned, unaligned, non-power-of-two factors, partly outside
    (0, 0, 512, 256), (100, 37, 512, 128), (333, 211, 800, 100), (3, 5, 1001, 250), (1000, 900, 512, 64),
    (-100, -50, 300, 150), (0, 0, 1234, 300),
]


def _mad(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_pyramid_levels_match_level_zero(pyramid_tiff, backend):
    with open_slide(pyramid_tiff, backend=backend) as r, open_slide(pyramid_tiff, backend=backend) as r0:
        assert (r.width, r.height) == (1234, 1000)
        np.testing.assert_allclose(r.level_downsamples, [1.0, 2.0, (1234 / 308 + 1000 / 250) / 2])
        r0.best_level = lambda downsample: 0  # a reader forced to read level 0 only
        used = set()
        for x, y, size, out in REGIONS:
            used.add(r.best_level(size / out))
            a, b = r.read_region(x, y, size, out), r0.read_region(x, y, size, out)
            assert a.shape == b.shape == (out, out, 3) and a.dtype == np.uint8
            assert _mad(a, b) < 2.0, (x, y, size, out)
        assert used == {1, 2}  # both pyramid levels were exercised


def test_level_selection_rule(pyramid_tiff):
    with open_slide(pyramid_tiff, backend="tifffile") as r:
        # The coarsest level whose downsample is <= size / out_px; 308 x 250 is exactly 4x (1234 // 4).
        assert [r.best_level(d) for d in (0.5, 1.0, 1.9, 2.0, 3.99, 4.0, 64.0)] == [0, 0, 0, 1, 1, 2, 2]
        assert level_scales([(1234, 1000), (617, 500), (308, 250)]) == ((1, 1), (2, 2), (4, 4))
        assert level_scales([(1000, 1000), (300, 300)]) == ((1, 1), (1000 / 300, 1000 / 300))


def test_box_filter_is_block_mean(pyramid_tiff):
    base = make_he(1000, 1234)[0]
    with open_slide(pyramid_tiff, backend="tifffile") as r:
        np.testing.assert_array_equal(r.read_region(37, 91, 64, 64), base[91:155, 37:101])  # 1:1 is exact
        r.best_level = lambda downsample: 0
        got = r.read_region(40, 80, 256, 64).astype(np.float64)
    ref = base[80:336, 40:296].astype(np.float64).reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))  # (64, 64, 3)
    assert RESIZE_FILTER == Image.Resampling.BOX
    assert np.abs(got - ref).max() <= 1.0


def test_openslide_and_tifffile_agree(pyramid_tiff):
    assert choose_backend(pyramid_tiff) == "openslide"
    with open_slide(pyramid_tiff) as a, open_slide(pyramid_tiff, backend="tifffile") as b:
        assert (a.backend, b.backend) == ("openslide", "tifffile")
        assert a.level_downsamples == pytest.approx(b.level_downsamples)
        np.testing.assert_array_equal(a.read_region(5, 7, 300, 300), b.read_region(5, 7, 300, 300))
        for x, y, size, out in REGIONS:
            mad = _mad(a.read_region(x, y, size, out), b.read_region(x, y, size, out))
            assert mad < 1.0, (x, y, size, out)
        ta, da = a.thumbnail(200)
        tb, db = b.thumbnail(200)
        assert ta.shape == tb.shape == (162, 200, 3) and da == db == pytest.approx(6.17)
        assert _mad(ta, tb) < 1.0


def test_padding_outside_the_image(pyramid_tiff, tmp_path):
    with open_slide(pyramid_tiff) as r:
        reg = r.read_region(-64, -64, 128, 128)
        assert (reg[:64] == 255).all() and (reg[:, :64] == 255).all() and (reg[64:, 64:] < 255).any()
    raster = np.full((100, 120, 3), 500, dtype=np.uint16)
    tifffile.imwrite(tmp_path / "r.tif", raster, photometric="rgb")
    with open_slide(tmp_path / "r.tif") as r:
        assert r.kind == "raster" and r.pad_value == 0
        reg = r.read_region(100, 80, 40, 40)
        assert (reg[20:] == 0).all() and (reg[:, 20:] == 0).all() and (reg[:20, :20] > 0).all()


def test_plain_png(tmp_path, he_rgb):
    Image.fromarray(he_rgb).save(tmp_path / "he.png")
    with open_slide(tmp_path / "he.png") as r:
        assert r.backend == "pillow" and (r.width, r.height) == (700, 600)
        assert r.level_downsamples == (1.0,) and r.base_mag is None and r.mpp is None
        np.testing.assert_array_equal(r.read_region(10, 20, 256, 256), he_rgb[20:276, 10:266])
        thumb, ds = r.thumbnail(350)
        assert thumb.shape == (300, 350, 3) and ds == 2.0


def test_base_mag_from_mpp_power_and_override(pyramid_tiff, tmp_path):
    for backend in ("openslide", "tifffile"):
        with open_slide(pyramid_tiff, backend=backend) as r:
            assert r.mpp == pytest.approx(0.5) and r.base_mag == pytest.approx(20.0)  # 10 / mpp
        with open_slide(pyramid_tiff, base_mag=40, backend=backend) as r:
            assert r.base_mag == 40.0
    # Aperio description: AppMag is the objective power (it wins over 10 / MPP = 20).
    desc = "Aperio Image Library v10.0.0\n700x600 [0,0 700x600] (256x256) RAW|AppMag = 40|MPP = 0.5"
    tifffile.imwrite(tmp_path / "ap.svs", make_he()[0], tile=(256, 256), compression="zlib",
                     photometric="rgb", description=desc, metadata=None)
    for backend in ("openslide", "tifffile"):
        with open_slide(tmp_path / "ap.svs", backend=backend) as r:
            assert r.base_mag == 40.0 and r.mpp == pytest.approx(0.5)
    with open_slide(tmp_path / "ap.svs", base_mag=20) as r:
        assert r.backend == "openslide" and r.base_mag == 20.0


def test_uint16_raster_percentile_stretch_and_nodata(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(6000, 12000, (200, 240, 3)).astype(np.uint16)
    raw[:, :40] = 0  # nodata strip
    tifffile.imwrite(tmp_path / "landsat.tif", raw, tile=(64, 64), compression="zlib", photometric="rgb")
    assert choose_backend(tmp_path / "landsat.tif") == "tifffile"  # OpenSlide would misread uint16 as RGBA
    with open_slide(tmp_path / "landsat.tif") as r:
        assert r.kind == "raster" and r.base_mag is None
        img = r.read_region(0, 0, 200, 200)
    assert (img[:, :40] == 0).all() and (img[:, 40:] >= 1).all()
    valid = raw[:200, 40:200].reshape(-1, 3).astype(np.float64)
    lo, hi = np.percentile(raw[:, 40:].reshape(-1, 3), [1, 99], axis=0)
    ref = np.clip((valid - lo) / (hi - lo) * 254 + 1, 1, 255).round()
    np.testing.assert_array_equal(img[:, 40:].reshape(-1, 3), ref)


def test_geotiff_nodata_tag(tmp_path):
    raw = np.full((64, 80, 3), 2000, dtype=np.uint16)
    raw[:, :16] = 65535
    geo = [(33550, "d", 3, (30.0, 30.0, 0.0), True),  # ModelPixelScale: 30 m pixels
           (42113, "s", 0, "65535", True)]              # GDAL_NODATA
    tifffile.imwrite(tmp_path / "geo.tif", raw, photometric="rgb", extratags=geo, resolution=(100, 100),
                     resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "geo.tif") as r:
        assert r.kind == "raster" and r.mpp is None and r.base_mag is None  # ground units, not microns
        img = r.read_region(0, 0, 64, 64)
    assert (img[:, :16] == 0).all() and (img[:, 16:] > 0).all()


def test_rgbn_raster_takes_first_three_bands(tmp_path):
    rgbn = np.random.default_rng(1).integers(1, 255, (90, 80, 4)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgbn.tif", rgbn, tile=(32, 32), compression="zlib", photometric="rgb",
                     extrasamples=["unspecified"])
    with open_slide(tmp_path / "rgbn.tif") as r:
        assert r.backend == "tifffile" and r.kind == "raster"
        np.testing.assert_array_equal(r.read_region(0, 0, 80, 80), rgbn[:80, :80, :3])


def _assert_one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    msg = str(err.value)
    assert path.name in msg and "\n" not in msg, msg


@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_truncated_tiff_raises(pyramid_tiff, tmp_path, backend):
    data = pyramid_tiff.read_bytes()
    bad = tmp_path / "half.tif"
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(SlideError) as err:
        open_slide(bad, backend=backend)
    _assert_one_line_naming(err, bad)


def test_truncated_png_raises(tmp_path, he_rgb):
    Image.fromarray(he_rgb).save(tmp_path / "he.png")
    bad = tmp_path / "half.png"
    bad.write_bytes((tmp_path / "he.png").read_bytes()[:5000])
    with pytest.raises(SlideError) as err:
        open_slide(bad)
    _assert_one_line_naming(err, bad)


@pytest.mark.parametrize("name", ["notes.svs", "notes.tif", "notes.png", "notes.txt"])
def test_non_image_raises(tmp_path, name):
    bad = tmp_path / name
    bad.write_text("this is not an image\n" * 20)
    with pytest.raises(SlideError) as err:
        open_slide(bad)
    _assert_one_line_naming(err, bad)


def test_missing_file_raises(tmp_path):
    with pytest.raises(SlideError, match=r"missing\.svs: no such file$"):
        open_slide(tmp_path / "missing.svs")



def test_unknown_backend_raises(tmp_path):
    path = write_pyramid(tmp_path / "p.tif", make_he(64, 64)[0], n_levels=1)
    with pytest.raises(ValueError, match="unknown reader backend 'vips'"):
        open_slide(path, backend="vips")
