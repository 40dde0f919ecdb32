import pytest

from zoomldm import mags


def test_brca_ladder_matches_the_official_table():
    # official-implementation.md §2.1: 20x -> 256 px ... 0.15625x -> 32768 px regions; grids 1..128, pooled to 8.
    brca = mags.ladder("brca")
    assert [m.name for m in brca] == ["20x", "10x", "5x", "2.5x", "1.25x", "0.625x", "0.3125x", "0.15625x"]
    assert [m.region_px(256) for m in brca] == [256 * 2 ** i for i in range(8)]
    assert [m.grid_side for m in brca] == [1, 2, 4, 8, 8, 8, 8, 8]
    assert [m.index for m in brca] == list(range(8))


def test_naip_ladder():
    naip = mags.ladder("naip")
    assert [m.name for m in naip] == ["1x", "2x", "3x", "4x"]
    assert [m.region_px(256) for m in naip] == [256, 512, 1024, 2048]


def test_find_by_name_slug_and_index():
    assert mags.find("brca", "0.625x") is mags.find("brca", "0_625x") is mags.find("brca", 5)
    with pytest.raises(ValueError, match="not in the naip ladder"):
        mags.find("naip", "20x")
    with pytest.raises(ValueError, match="unknown magnification ladder"):
        mags.ladder("sentinel")
