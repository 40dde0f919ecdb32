"""Per-region MIL features (SSL encoder, ZoomLDM UNet), their .npz files, labels, bags and 20x+5x fusion.

The ZoomLDM MIL protocol (which UNet block, timestep, pooling, fusion) is not in the official code
(official-implementation.md §7.1; peers-and-metrics.md §7): the choices below are ours; outputs record them.

- "ssl": the store's SSL embedding of the region. A base (20x) region's grid is (C, 1, 1) = its tile's
  embedding; a coarser region's grid is the avg-pool of its base tiles (DESIGN.md §3), so its spatial mean is
  exactly the mean of the SSL embeddings of the base tiles it covers (5x: the 4 x 4 = 16 tiles). Raw values
  (not standardised).
- "zoomldm": the region's VQ-f4 latent z_0 (pre-quantisation; by default the store's own float16 latents,
  which the VQ bundled in the checkpoint wrote, else the image VQ-encoded again: the same numbers up to
  float16) is noised to x_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε at t = eval.mil.unet_timestep, ε drawn from the region's
  own generator (seed, magnification, slide, row0, col0: independent of batch and store order), and passed
  through the UNet with the region's own conditioning (Summarizer of its standardised SSL grid and
  magnification, as in training). A forward hook takes the output of one block and stops the forward there;
  the feature is its global average over space. Blocks (`unet_block`): "input" = the last input block (the
  deepest encoder block, before the middle block), "middle" = the middle block (ResBlock, attention,
  ResBlock at the lowest resolution), "output" = output block len(output_blocks) // 2 (the decoder's middle,
  e.g. output_blocks.6 of 12).
- fused "20x+5x": each fine (20x) tile's feature concatenated with the feature of the coarse (5x) region that
  contains it, preferring one in the same (pseudo-)slide, then the one whose centre is nearest the tile's
  centre (coarse regions overlap); a tile no extracted coarse region contains is dropped (and counted).

Positions are in base-tile units: a region at magnification M covers tiles [row0, row0 + g) x
[col0, col0 + g), g = M.tiles_per_side; its centre is (row0 + g/2, col0 + g/2).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from zoomldm import mags
from zoomldm.diffusion import item_seed

log = logging.getLogger(__name__)

FEATURE_KINDS = ("ssl", "zoomldm")
UNET_BLOCKS = ("input", "middle", "output")
BOX_COLUMNS = ("source_slide", "row_min", "row_max", "col_min", "col_max")

# Display names of the SSL encoders (zoomldm.data.encoders) and what the stand-in replaces per ladder.
ENCODER_NAMES = {"uni": "UNI ViT-L/16", "dinov2": "DINOv2 ViT-L/14-reg4",
                 "effnet-lite0": "EfficientNet-Lite0"}
PAPER_ENCODER = {"brca": "UNI", "naip": "DINOv2"}


class FeatureFileError(ValueError):
    """A features .npz that is missing, malformed or does not fit the others (one line, naming the file)."""


class LabelsError(ValueError):
    """A labels CSV that is missing, malformed or shares no slide with the features (one line)."""


def encoder_label(encoder: dict, ladder: str) -> str:
    """E.g. "EfficientNet-Lite0 (offline stand-in for UNI)" from the store's `encoder` entry."""
    name = ENCODER_NAMES.get(encoder.get("name", ""), str(encoder.get("name", "unknown")))
    if encoder.get("is_standin"):
        return f"{name} (offline stand-in for {PAPER_ENCODER.get(ladder, 'the paper encoder')})"
    return name


def default_magnifications(ladder: str, available: list[str]) -> list[str]:
    """eval.mil.magnifications = None: the base magnification and the one spanning 4 x 4 base tiles (BRCA:
    20x and 5x, the paper's), those the store has."""
    levels = mags.ladder(ladder)
    want = [levels[0].name] + [m.name for m in levels if m.tiles_per_side == 4]
    return [n for n in want if n in available]


# ---------------------------------------------------------------------------------------------------------
# Feature sets (.npz)

@dataclass
class FeatureSet:
    """Features of the regions of one magnification: features (N, D) and where each region lies."""
    features: np.ndarray      # (N, D) float32
    slide: np.ndarray         # (N,) str
    row0: np.ndarray          # (N,) int: top-left base tile
    col0: np.ndarray          # (N,) int
    meta: dict                # kind, magnification, tiles_per_side, encoder_label, stand_in, unet_* ...

    @property
    def g(self) -> int:
        return int(self.meta["tiles_per_side"])

    def __len__(self) -> int:
        return len(self.features)

    def centers(self) -> tuple[np.ndarray, np.ndarray]:
        return self.row0 + self.g / 2, self.col0 + self.g / 2

    def save(self, path: str | Path, **extra: np.ndarray) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, features=self.features.astype(np.float32), slide=self.slide.astype(str),
                 row0=self.row0.astype(np.int64), col0=self.col0.astype(np.int64),
                 meta=np.array(json.dumps(self.meta)), **extra)
        tmp.replace(path)
        return path


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path} (written by `zoomldm eval mil-features`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            fs = FeatureSet(np.asarray(z["features"], np.float32), np.asarray(z["slide"]).astype(str),
                            np.asarray(z["row0"]), np.asarray(z["col0"]), json.loads(str(z["meta"])))
    except KeyError as e:
        raise FeatureFileError(f"{path}: not a features file of `zoomldm eval mil-features` (no array {e})") \
            from None
    except (ValueError, OSError, json.JSONDecodeError):
        raise FeatureFileError(f"{path}: not a features .npz of `zoomldm eval mil-features`") from None
    if fs.features.ndim != 2 or not len(fs.features) == len(fs.slide) == len(fs.row0) == len(fs.col0):
        raise FeatureFileError(f"{path}: features {fs.features.shape} and positions differ in length")
    return fs


def ssl_features(table, rows: np.ndarray) -> np.ndarray:
    """(N, C) float32: the spatial mean of each region's stored (raw) SSL grid (C, g, g)."""
    return np.stack([np.asarray(table.get("grids", int(r)), dtype=np.float32).mean(axis=(1, 2))
                     for r in rows])  # (N, C, g, g) -> (N, C)


# ---------------------------------------------------------------------------------------------------------
# ZoomLDM UNet features

class _StopForward(Exception):
    """Raised by the hook once the wanted block has run: the rest of the UNet is not needed."""


def unet_block(unet, block: str) -> tuple[str, torch.nn.Module]:
    """(parameter-name prefix, module) of `block` in {"input", "middle", "output"} (module docstring)."""
    if block == "input":
        i = len(unet.input_blocks) - 1
        return f"input_blocks.{i}", unet.input_blocks[i]
    if block == "middle":
        return "middle_block", unet.middle_block
    if block == "output":
        i = len(unet.output_blocks) // 2
        return f"output_blocks.{i}", unet.output_blocks[i]
    raise ValueError(f"unet_block must be one of {', '.join(UNET_BLOCKS)}, got {block!r}")


@torch.no_grad()
def unet_block_features(unet, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        block: str) -> torch.Tensor:
    """Global-average-pooled output (B, channels) of `block` for UNet inputs (x_t, t, context)."""
    _, module = unet_block(unet, block)
    captured: dict[str, torch.Tensor] = {}

    def hook(_mod, _args, out):
        captured["h"] = out
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        unet(x_t, t, context)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"].float().mean(dim=(2, 3))  # (B, ch, h, w) -> (B, ch)


def region_noise(seed: int, mag: str, slides, row0, col0, shape) -> torch.Tensor:
    """ε (N, *shape) float32 on the CPU, region k's from its own generator (seed, mag, slide, row0, col0)."""
    gens = [torch.Generator().manual_seed(item_seed(seed, 0, "mil-noise", mag, str(s), int(r), int(c)))
            for s, r, c in zip(slides, row0, col0)]
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


@torch.no_grad()
def zoomldm_features(m, table, rows: np.ndarray, timestep: int, block: str, seed: int, batch_size: int = 64,
                     progress: bool = False, precision: str = "auto",
                     store_latents: bool = False) -> np.ndarray:
    """(N, channels) float32 UNet features of store regions `rows` of one magnification (module docstring).

    `store_latents`: take z_0 from the store's latents (float16, written by `zoomldm data encode-latents` with
    the VQ the checkpoint bundles) instead of VQ-encoding the images again: the same numbers up to float16
    rounding, at half the CPU cost."""
    from tqdm.auto import tqdm

    from zoomldm.sampling.denoisers import autocast, context_from_grids
    from zoomldm.sampling.io import from_uint8

    mag = table.magnification
    man = table.manifest
    dev = m.device
    out = []
    for i in tqdm(range(0, len(rows), batch_size), desc=f"zoomldm features {mag.name}", disable=not progress,
                  unit="batch"):
        idx = rows[i:i + batch_size]
        grids = np.stack([np.asarray(table.get("grids", int(r)), np.float32) for r in idx])  # (b, C, g, g)
        rec = man.iloc[idx]
        if store_latents:
            z0 = torch.from_numpy(np.stack([np.asarray(table.get("latents", int(r)), np.float32)
                                            for r in idx])).to(dev)                   # (b, 3, P/4, P/4)
        else:
            images = np.stack([np.asarray(table.get("images", int(r))) for r in idx])  # (b, P, P, 3) uint8
            z0 = m.encode(from_uint8(images, dev))                                     # (b, 3, P/4, P/4)
        eps = region_noise(seed, mag.name, rec["slide"], rec["row0"], rec["col0"], z0.shape[1:]).to(dev)
        t = torch.full((len(idx),), int(timestep), dtype=torch.long, device=dev)
        x_t = m.schedule.q_sample(z0, t, eps)
        ctx = context_from_grids(m.summarizer, grids, mag.index)                      # (b, 65, D)
        with autocast(dev, precision):
            out.append(unet_block_features(m.unet, x_t, t, ctx, block).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def cap_rows(manifest: pd.DataFrame, rows: np.ndarray, max_per_slide: int | None, seed: int,
             mag: str) -> np.ndarray:
    """At most `max_per_slide` rows per slide, a seeded choice per (seed, mag, slide); order kept."""
    if max_per_slide is None:
        return rows
    keep = []
    slides = manifest["slide"].to_numpy()[rows]
    for s in pd.unique(slides):
        r = rows[slides == s]
        if len(r) > max_per_slide:
            rng = np.random.default_rng(item_seed(seed, 0, "mil-cap", mag, str(s)))
            r = np.sort(rng.choice(r, size=max_per_slide, replace=False))
        keep.append(r)
    return np.sort(np.concatenate(keep)) if keep else rows


# ---------------------------------------------------------------------------------------------------------
# Labels and bags

def read_labels(path: str | Path) -> pd.DataFrame:
    """The labels CSV: columns slide,label; optionally the pseudo-slide boxes source_slide, row_min, row_max,
    col_min, col_max (base-tile units, half-open): then an instance of `source_slide` whose centre lies in the
    box belongs to bag `slide` (the demo's pseudo-slides); without them bag = the instance's slide."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV not found: {path}")
    try:
        df = pd.read_csv(path, dtype={"slide": str, "label": str, "source_slide": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise LabelsError(f"{path}: not a readable CSV ({' '.join(str(e).split())})") from None
    if not {"slide", "label"} <= set(df.columns):
        has = ",".join(map(str, df.columns)) or "none"
        raise LabelsError(f"{path}: needs columns slide,label (has {has})")
    box = [c for c in BOX_COLUMNS if c in df.columns]
    if box and len(box) != len(BOX_COLUMNS):
        raise LabelsError(f"{path}: pseudo-slide columns must all be present ({','.join(BOX_COLUMNS)}); "
                          f"missing {','.join(c for c in BOX_COLUMNS if c not in box)}")
    cols = ["slide", "label", *box]
    bad = df[cols].isna().any(axis=1)
    if bad.any():
        raise LabelsError(f"{path}: empty value in data row {int(np.flatnonzero(bad)[0]) + 1}")
    df = df[cols].drop_duplicates()
    dup = df["slide"][df["slide"].duplicated()]
    if len(dup):
        raise LabelsError(f"{path}: slide {dup.iloc[0]!r} is listed twice with different values")
    if df.empty:
        raise LabelsError(f"{path}: no rows")
    return df.reset_index(drop=True)


def bag_ids(labels: pd.DataFrame, fs: FeatureSet) -> np.ndarray:
    """(N,) bag (labels-CSV slide) of every instance, "" for instances no row of the CSV labels."""
    out = np.full(len(fs), "", dtype=object)
    if "source_slide" not in labels.columns:
        known = set(labels["slide"])
        mask = np.isin(fs.slide, list(known))
        out[mask] = fs.slide[mask]
        return out
    rc, cc = fs.centers()
    for rec in labels.itertuples(index=False):
        inside = ((fs.slide == rec.source_slide) & (rc >= float(rec.row_min)) & (rc < float(rec.row_max))
                  & (cc >= float(rec.col_min)) & (cc < float(rec.col_max)) & (out == ""))
        out[inside] = rec.slide
    return out


def fuse(fine: FeatureSet, coarse: FeatureSet, fine_bags: np.ndarray,
         coarse_bags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate each fine instance with the coarse instance containing it (module docstring).

    Returns (features (n_kept, D_f + D_c), kept fine indices)."""
    if coarse.g <= fine.g:
        raise FeatureFileError(f"fusion needs a finer and a coarser magnification, got "
                               f"{fine.meta['magnification']} and {coarse.meta['magnification']}")
    fr, fc = fine.centers()
    cr, cc = coarse.centers()
    feats, kept = [], []
    for s in np.unique(fine.slide):
        fi, ci = np.flatnonzero(fine.slide == s), np.flatnonzero(coarse.slide == s)
        if not len(ci):
            continue
        inside = ((coarse.row0[ci][None] <= fine.row0[fi][:, None])
                  & (fine.row0[fi][:, None] + fine.g <= coarse.row0[ci][None] + coarse.g)
                  & (coarse.col0[ci][None] <= fine.col0[fi][:, None])
                  & (fine.col0[fi][:, None] + fine.g <= coarse.col0[ci][None] + coarse.g))   # (n_f, n_c)
        dist = (fr[fi][:, None] - cr[ci][None]) ** 2 + (fc[fi][:, None] - cc[ci][None]) ** 2
        other_bag = fine_bags[fi][:, None] != coarse_bags[ci][None]
        score = np.where(inside, dist + 1e6 * other_bag, np.inf)
        best = score.argmin(axis=1)
        ok = np.isfinite(score[np.arange(len(fi)), best])
        feats.append(np.concatenate([fine.features[fi[ok]], coarse.features[ci[best[ok]]]], axis=1))
        kept.append(fi[ok])
    if not kept:
        raise FeatureFileError("fusion: no fine instance lies inside a coarse region of the same slide")
    order = np.argsort(np.concatenate(kept), kind="stable")
    return np.concatenate(feats)[order], np.concatenate(kept)[order]


def assemble_bags(features: np.ndarray, bags: np.ndarray, labels: pd.DataFrame,
                  max_per_bag: int | None = None,
                  seed: int = 0) -> tuple[list[np.ndarray], list[str], list[str]]:
    """(bags [(n_i, D)], bag ids, label strings): bags in the CSV's order, instances in feature order;
    labelled slides without instances are skipped (the caller reports them). `max_per_bag`: seeded
    subsample."""
    out, ids, ys = [], [], []
    for rec in labels.itertuples(index=False):
        idx = np.flatnonzero(bags == rec.slide)
        if not len(idx):
            continue
        if max_per_bag is not None and len(idx) > max_per_bag:
            rng = np.random.default_rng(item_seed(seed, 0, "mil-bag", rec.slide))
            idx = np.sort(rng.choice(idx, size=max_per_bag, replace=False))
        out.append(features[idx])
        ids.append(rec.slide)
        ys.append(rec.label)
    return out, ids, ys


def class_order(labels: list[str]) -> list[str]:
    """Sorted class names, numerically when every label is a number ("0" < "1" < "10")."""
    uniq = sorted(set(labels))
    try:
        return sorted(uniq, key=float)
    except ValueError:
        return uniq


# ---------------------------------------------------------------------------------------------------------
# The demo's pseudo-slides

def demo_pseudo_slides(store, mag_names: list[str], blocks: int) -> tuple[pd.DataFrame, str]:
    """Labels CSV rows (slide, label + boxes) and the task text of the demo's pipeline-check task.

    Each source image is cut into bands along the axis on which the regions of the coarsest MIL magnification
    take more distinct centre positions; band boundaries lie between consecutive groups of those positions, so
    every band holds at least one coarse region (`blocks` per image at most). With two or more images the
    label is the source image (for the H&E demo: CMU-1 H&E crop vs scikit-image IHC, i.e. the stain); with
    one image the bands are split into a first and a second half along the axis and that half is the label.
    """
    if blocks < 2:
        raise ValueError(f"--blocks {blocks}: needs at least 2 pseudo-slides per image")
    tables = [store.table(n) for n in mag_names]
    coarse = max(tables, key=lambda t: t.magnification.tiles_per_side)
    slides = list(pd.unique(coarse.manifest["slide"]))
    if not slides:
        raise ValueError(f"{store.root}: {coarse.magnification.name} has no regions")
    rows = []
    for s in slides:
        g = coarse.magnification.tiles_per_side
        cm = coarse.manifest[coarse.manifest["slide"] == s]
        centers = {"row": cm["row0"].to_numpy() + g / 2, "col": cm["col0"].to_numpy() + g / 2}
        extent = {}
        for ax in ("row", "col"):
            extent[ax] = max(float((t.manifest.loc[t.manifest["slide"] == s, f"{ax}0"]
                                    + t.magnification.tiles_per_side).max()) for t in tables
                             if (t.manifest["slide"] == s).any())
        axis = "row" if len(np.unique(centers["row"])) > len(np.unique(centers["col"])) else "col"
        other = "col" if axis == "row" else "row"
        values = np.unique(centers[axis])
        if len(slides) > 1:
            n = min(blocks, len(values))
        else:                                                   # an even number: two halves
            n = min(blocks - blocks % 2, len(values) - len(values) % 2)
        if n < 2:
            raise ValueError(f"{store.root}: slide {s} has too few {coarse.magnification.name} regions "
                             f"({len(values)} positions) for 2 pseudo-slides")
        groups = np.array_split(values, n)
        cuts = [0.0] + [(a[-1] + b[0]) / 2 for a, b in zip(groups[:-1], groups[1:])] + [extent[axis]]
        for j in range(n):
            label = s if len(slides) > 1 else ("first-half" if j < n // 2 else "second-half")
            box = {f"{axis}_min": cuts[j], f"{axis}_max": cuts[j + 1], f"{other}_min": 0.0,
                   f"{other}_max": extent[other]}
            rows.append({"slide": f"{s}__b{j}", "label": label, "source_slide": s, **box})
    df = pd.DataFrame(rows)[["slide", "label", *BOX_COLUMNS]]
    what = (f"source image ({' vs '.join(slides)})" if len(slides) > 1 else
            f"which half of {slides[0]} a band lies in")
    task = (f"demo pipeline check, not a pathology result: {what} from {len(df)} pseudo-slides "
            f"(each image cut into up to {blocks} spatial bands)")
    return df, task
