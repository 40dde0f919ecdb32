"""Magnification ladders, defined once for the whole suite.

A scale-``s`` sample is a ``patch_px * 2**s`` pixel region at the base magnification, resized to ``patch_px``
(paper §3; official ``ldm/data/brca.py`` MAG_DICT / MAG_NUM_IMGS). Its conditioning covers the
``2**s x 2**s`` base tiles inside the region, average-pooled to at most ``MAX_GRID x MAX_GRID``.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_GRID = 8  # grids larger than 8x8 are average-pooled to 8x8 (official feat_target_size)


@dataclass(frozen=True)
class Magnification:
    index: int   # the magnification label fed to the Summarizer / CDM (0 = base)
    name: str    # paper name, e.g. "20x"
    scale: int   # s: the region spans 2**s base tiles per side

    @property
    def tiles_per_side(self) -> int:
        return 2 ** self.scale

    @property
    def grid_side(self) -> int:
        """Side of the conditioning grid after pooling."""
        return min(self.tiles_per_side, MAX_GRID)

    def region_px(self, patch_px: int) -> int:
        """Side of the region at the base magnification, in base pixels."""
        return patch_px * self.tiles_per_side

    @property
    def slug(self) -> str:
        """File-system and wildcard-safe name ("0.15625x" -> "0_15625x")."""
        return self.name.replace(".", "_")


def _ladder(names: list[str]) -> tuple[Magnification, ...]:
    return tuple(Magnification(i, n, i) for i, n in enumerate(names))


# Magnification of the base level each ladder is defined at (None: the raster's native resolution).
BASE_MAGNIFICATION: dict[str, float | None] = {"brca": 20.0, "naip": None}

LADDERS: dict[str, tuple[Magnification, ...]] = {
    # TCGA-BRCA, base 20x: 256 px ... 32768 px regions (official MAG_DICT, 8 levels).
    "brca": _ladder(["20x", "10x", "5x", "2.5x", "1.25x", "0.625x", "0.3125x", "0.15625x"]),
    # NAIP (Chesapeake), base 1x: regions of 256/512/1024/2048 px (official naip.py, 4 levels).
    "naip": _ladder(["1x", "2x", "3x", "4x"]),
}


def ladder(name: str) -> tuple[Magnification, ...]:
    try:
        return LADDERS[name]
    except KeyError:
        raise ValueError(f"unknown magnification ladder {name!r}; choose one of {sorted(LADDERS)}") from None


def find(ladder_name: str, mag: str | int) -> Magnification:
    """Look up a magnification by name ("5x"), slug ("0_625x") or index."""
    levels = ladder(ladder_name)
    for m in levels:
        if mag in (m.index, m.name, m.slug) or str(mag) in (str(m.index), m.name, m.slug):
            return m
    raise ValueError(
        f"magnification {mag!r} is not in the {ladder_name} ladder ({', '.join(m.name for m in levels)})"
    )
