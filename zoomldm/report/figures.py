"""The report figures: FID vs magnification beside the paper's Table 1, sample grids per magnification,
large-image thumbnails with a full-resolution inset, and super-resolution examples (matplotlib, Agg backend).

Sample layout read here (written by `zoomldm sample`, workflow/rules/sample.smk):
  <samples>/patches/<model>/<cond>/<mag>/images-XXXXX.npy   uint8 (n, P, P, 3)
  <samples>/large/<variant>/grid<g>/<i>.png                 (<i>_guide.png is skipped)
  <samples>/sr/inputs/{lr,hr}/<k>.png and <samples>/sr/<method>/<k>.png
"""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from zoomldm.report import inputs as I
from zoomldm.report.paper import load_reference, value
from zoomldm.report.tables import FID_ROWS, LARGE_LABELS, SR_LABELS, fid_table

log = logging.getLogger(__name__)

FIGURES = ("fid", "samples", "large", "sr")
COLORS = {"ZoomLDM": "C0", "ZoomLDM (DeepCache: the speed cut)": "C4", "ZoomLDM + CDM (uncond.)": "C1",
          "Single-scale LDM": "C2", "Graikos et al.": "C3"}
PAPER_ROWS = {"zoomldm": ("paper: ZoomLDM", "C0"), "cdm": ("paper: CDM (uncond.)", "C1"),
              "sota": ("paper: SoTA (Graikos / PathLDM / single-scale)", "C7")}
LARGE_ORDER = ("zoomldm", "zoomldm_linear", "zoomldm_unconstrained", "graikos")
SR_ORDER = ("bicubic", "ldm_sr", "controlnet", "zoomldm")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path, dpi: int = 100) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    _plt().close(fig)
    return out


def _bare(ax) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _int_stem(p: Path) -> int | None:
    return int(p.stem) if p.stem.isdigit() else None


# --------------------------------------------------------------------------------------- FID vs magnification


def fid_vs_magnification(metrics_dir: Path | str, references_dir: Path | str, out: Path | str,
                         ladder: str = "brca") -> Path:
    """x: magnification (log scale, high to low), a solid line per method, the paper's Table 1 rows dashed."""
    plt = _plt()
    df = fid_table(metrics_dir, references_dir, ladder).frame
    ref = load_reference(references_dir, "fid_by_magnification")
    ref = ref[ref["ladder"] == ladder]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in [m for m in FID_ROWS.values() if m in set(df["method"])]:
        d = df[df["method"] == method].sort_values("mag_x")
        ax.plot(d["mag_x"], d["fid"], "o-", color=COLORS[method], label=f"{method} (n={int(d['n'].min())}+)")
    for row, (label, color) in PAPER_ROWS.items():
        d = ref[ref["paper_row"] == row]
        pts = sorted((I.mag_value(m), value(v)) for m, v in zip(d["magnification"], d["fid"]))
        pts = [(x, y) for x, y in pts if isinstance(y, float)]
        if pts:
            ax.plot(*zip(*pts), "s--", color=color, alpha=0.8, mfc="none", label=label)
    mags = sorted({*df["mag_x"], *(I.mag_value(m) for m in ref["magnification"])}, reverse=True)
    ax.set_xscale("log")
    ax.set_xticks(mags, [f"{m:g}x" for m in mags], rotation=45)
    ax.minorticks_off()
    ax.set_xlim(max(mags) * 1.3, min(mags) / 1.3)            # 20x on the left, as in Table 1
    labels = sorted(set(df["extractor_label"]))
    ax.set_xlabel("magnification")
    ax.set_ylabel(f"FID: {'; '.join(labels)} (solid)\nInception FID, paper (dashed)", fontsize=8)
    stand_in = bool(df["stand_in"].any())
    ax.set_title("Patch FID vs magnification" + (
        "\nsolid: offline stand-in extractor, not comparable to the paper's dashed lines"
        if stand_in else ""),
        fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, dpi=110)


# ------------------------------------------------------------------------------------------- sample grids


def _patch_sets(samples_dir: Path) -> dict[str, list[tuple[str, str, list[Path]]]]:
    root = samples_dir / "patches"
    if not root.is_dir():
        raise I.ReportInputError(f"{root}: patch sample directory not found")
    by_mag: dict[str, list] = {}
    for d in sorted(p for p in root.glob("*/*/*") if p.is_dir()):
        shards = sorted(d.glob("images-*.npy"))
        if shards:
            by_mag.setdefault(d.name, []).append((d.parent.parent.name, d.parent.name, shards))
    if not by_mag:
        raise I.ReportInputError(
            f"{root}: no images-*.npy patch sets (<model>/<cond>/<mag>/images-XXXXX.npy)")
    order = list(FID_ROWS)
    for sets in by_mag.values():
        sets.sort(key=lambda s: order.index((s[0], s[1])) if (s[0], s[1]) in order else len(order))
    return by_mag


def _first_images(shards: list[Path], k: int) -> np.ndarray:
    out = []
    for s in shards:
        a = np.load(s, mmap_mode="r")
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise I.ReportInputError(f"{s}: expected uint8 (n, P, P, 3), got {a.dtype} {a.shape}")
        out.extend(np.asarray(a[: k - len(out)]))
        if len(out) >= k:
            break
    return np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)


def sample_grids(samples_dir: Path | str, out_dir: Path | str, k: int = 8) -> list[Path]:
    """One figure per magnification, `samples_<mag slug>.png`: k samples per (model, conditioning) row."""
    plt = _plt()
    paths = []
    for mag, sets in _patch_sets(Path(samples_dir)).items():
        fig, axes = plt.subplots(len(sets), k, figsize=(k * 1.0, len(sets) * 1.1 + 0.4), squeeze=False)
        for i, (model, cond, shards) in enumerate(sets):
            imgs = _first_images(shards, k)
            for j in range(k):
                _bare(axes[i, j])
                if j < len(imgs):
                    axes[i, j].imshow(imgs[j])
            axes[i, 0].set_ylabel(FID_ROWS.get((model, cond), f"{model}/{cond}"), rotation=0, ha="right",
                                  va="center", fontsize=7)
        fig.suptitle(f"Generated patches at {mag}", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, Path(out_dir) / f"samples_{mag.replace('.', '_')}.png"))
    return paths


# ------------------------------------------------------------------------------------- large-image thumbnails


def _large_sets(samples_dir: Path) -> dict[int, list[tuple[str, Path]]]:
    root = samples_dir / "large"
    if not root.is_dir():
        raise I.ReportInputError(f"{root}: large-image sample directory not found")
    by_grid: dict[int, list] = {}
    for d in sorted(p for p in root.glob("*/grid*") if p.is_dir() and p.name[4:].isdigit()):
        pngs = sorted((p for p in d.glob("*.png") if _int_stem(p) is not None), key=_int_stem)
        if pngs:
            by_grid.setdefault(int(d.name[4:]), []).append((d.parent.name, pngs[0]))
    if not by_grid:
        raise I.ReportInputError(f"{root}: no large images (<variant>/grid<g>/<i>.png)")
    for sets in by_grid.values():
        sets.sort(key=lambda s: LARGE_ORDER.index(s[0]) if s[0] in LARGE_ORDER else len(LARGE_ORDER))
    return by_grid


def large_thumbnails(samples_dir: Path | str, out_dir: Path | str, thumb_px: int = 384) -> list[Path]:
    """One figure per grid, `large_grid<g>.png`: image 0 of each variant as a thumbnail, with an inset showing
    one base patch (side / grid) from the centre at full resolution."""
    plt = _plt()
    paths = []
    for grid, sets in sorted(_large_sets(Path(samples_dir)).items()):
        fig, axes = plt.subplots(1, len(sets), figsize=(3.4 * len(sets), 3.7), squeeze=False)
        for ax, (variant, png) in zip(axes[0], sets):
            with Image.open(png) as im:
                im = im.convert("RGB")
                w, h = im.size
                side = max(1, min(w, h) // grid)                     # one base patch at full resolution
                x0, y0 = (w - side) // 2, (h - side) // 2
                crop = np.asarray(im.crop((x0, y0, x0 + side, y0 + side)))
                thumb = im.copy()
                thumb.thumbnail((thumb_px, thumb_px))
            s = thumb.size[0] / w
            ax.imshow(np.asarray(thumb))
            _bare(ax)
            ins = ax.inset_axes([0.6, 0.0, 0.4, 0.4])
            ins.imshow(crop, interpolation="nearest")
            _bare(ins)
            for sp in ins.spines.values():
                sp.set_visible(True), sp.set_color("yellow")
            ax.indicate_inset((x0 * s, y0 * s, side * s, side * s), inset_ax=ins, edgecolor="yellow",
                              linewidth=1.5, alpha=1.0)
            ax.set_title(f"{LARGE_LABELS.get(variant, variant)} ({w}x{h} px)", fontsize=8)
        fig.suptitle(f"Large images, grid {grid} (inset: one {side}-px patch at full resolution)", fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, Path(out_dir) / f"large_grid{grid}.png"))
    return paths


# --------------------------------------------------------------------------------------------- SR examples


def sr_examples(samples_dir: Path | str, out: Path | str, k: int = 4) -> Path:
    """Rows: the first k test pairs; columns: LR | each method's SR | HR."""
    plt = _plt()
    root = Path(samples_dir) / "sr"
    lr_dir, hr_dir = root / "inputs" / "lr", root / "inputs" / "hr"
    for d in (lr_dir, hr_dir, root / "zoomldm"):
        if not d.is_dir():
            raise I.ReportInputError(f"{d}: super-resolution sample directory not found")
    methods = sorted((d.name for d in root.iterdir() if d.is_dir() and d.name != "inputs"),
                     key=lambda m: (SR_ORDER.index(m) if m in SR_ORDER else len(SR_ORDER), m))
    keys = {_int_stem(p) for p in hr_dir.glob("*.png")} - {None}
    for d in [lr_dir] + [root / m for m in methods]:
        keys &= {_int_stem(p) for p in d.glob("*.png")}
    if not keys:
        raise I.ReportInputError(f"{root}: no test pair k with inputs/lr/k.png, inputs/hr/k.png and every "
                                 f"method's k.png ({', '.join(methods)})")
    keys = sorted(keys)[:k]
    cols = [("LR", lr_dir)] + [(SR_LABELS.get(m, m), root / m) for m in methods] + [("HR", hr_dir)]
    fig, axes = plt.subplots(len(keys), len(cols), figsize=(1.8 * len(cols), 1.9 * len(keys) + 0.3),
                             squeeze=False)
    for i, key in enumerate(keys):
        for j, (name, d) in enumerate(cols):
            with Image.open(d / f"{key}.png") as im:
                axes[i, j].imshow(np.asarray(im.convert("RGB")), interpolation="nearest")
            _bare(axes[i, j])
            if i == 0:
                axes[i, j].set_title(textwrap.fill(name, 22), fontsize=7)
    fig.suptitle("Super-resolution examples (LR | methods | HR)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def write_figures(metrics_dir: Path | str, references_dir: Path | str, samples_dir: Path | str,
                  out_dir: Path | str, names: tuple[str, ...] = FIGURES, ladder: str = "brca",
                  k: int = 8) -> list[Path]:
    out_dir = Path(out_dir)
    paths = []
    for name in names:
        if name == "fid":
            out = out_dir / "fid_vs_magnification.png"
            paths.append(fid_vs_magnification(metrics_dir, references_dir, out, ladder))
        elif name == "samples":
            paths += sample_grids(samples_dir, out_dir, k)
        elif name == "large":
            paths += large_thumbnails(samples_dir, out_dir)
        elif name == "sr":
            paths.append(sr_examples(samples_dir, out_dir / "sr_examples.png", min(k, 4)))
        else:
            raise ValueError(f"unknown figure {name!r}; choose from {', '.join(FIGURES)}")
    return paths
