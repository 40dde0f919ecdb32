"""The dataset table (samples per magnification and slide) and the montage figure of a built store."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from zoomldm.data.store import RegionStore, read_part_meta


def dataset_table(store: RegionStore, parts: list[Path]) -> pd.DataFrame:
    """One row per slide (plus a total row), one column per magnification of the ladder, and the status."""
    mag_names = [m.name for m in store.magnifications]
    rows = []
    for p in sorted(parts, key=lambda p: Path(p).name):
        meta = read_part_meta(p)
        row = {"slide": meta["slide"], "status": meta["status"]}
        row.update({m: int(meta["counts"].get(m, 0)) for m in mag_names})
        row["reason"] = meta.get("reason", "")
        rows.append(row)
    df = pd.DataFrame(rows, columns=["slide", "status", *mag_names, "reason"])
    total = {"slide": "total", "status": "", "reason": ""}
    total.update({m: int(len(store.table(m))) for m in mag_names})
    df = pd.concat([df, pd.DataFrame([total])], ignore_index=True)
    return df


PAPER_ROW = "paper: training patches"


def with_paper_row(df: pd.DataFrame, ladder: str, references: Path) -> tuple[pd.DataFrame, str]:
    """`df` plus a row of the paper's training patches per magnification (ZoomLDM Table 1, TCGA-BRCA), read
    from `references` (workflow/references/dataset.csv: ladder, magnification, training_patches, source), and
    a note. Cells: the count, "n/r" (no recovered counts for the ladder) or "n/a" (not in the paper)."""
    references = Path(references)
    if not references.is_file():
        raise FileNotFoundError(f"{references}: reference file not found")
    ref = pd.read_csv(references, dtype=str, keep_default_na=False)
    missing = [c for c in ("ladder", "magnification", "training_patches", "source") if c not in ref.columns]
    if missing:
        raise ValueError(f"{references}: missing column(s) {', '.join(missing)}")
    ref = ref[ref["ladder"] == ladder]
    counts = dict(zip(ref["magnification"], ref["training_patches"]))
    mags = [c for c in df.columns if c not in ("slide", "status", "reason")]
    row = {"slide": PAPER_ROW, "status": "paper",
           "reason": "; ".join(sorted(set(ref.loc[ref["magnification"].isin(mags), "source"])))
           or f"paper counts for the {ladder} ladder not recovered"}
    for m in mags:
        row[m] = int(float(counts[m])) if m in counts else ("n/r" if ref.empty else "n/a")
    out = pd.concat([df.astype({m: object for m in mags}), pd.DataFrame([row])], ignore_index=True)
    note = (f"Row '{PAPER_ROW}': the paper's training patches per magnification (ZoomLDM Table 1, TCGA-BRCA, "
            "256-px patches), beside this run's counts; n/r: not recovered, n/a: not in the paper.")
    return out, note


def write_dataset_table(df: pd.DataFrame, store: RegionStore, out_stem: Path,
                        references: Path | None = None) -> None:
    """Write <out_stem>.{csv,md,tex}; with `references`, add the paper's training-patch counts as a row."""
    out_stem = Path(out_stem)
    paper_note = ""
    if references is not None:
        df, paper_note = with_paper_row(df, store.ladder, references)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    enc = store.info["encoder"]
    label = f"{enc['name']} ({'offline stand-in, not the paper encoder' if enc.get('is_standin') else 'paper encoder'})"
    df.to_csv(out_stem.with_suffix(".csv"), index=False)
    note = (f"Samples per magnification and slide. Ladder: {store.ladder}; patch {store.patch_px} px; "
            f"conditioning encoder: {label}, {enc['dim']}-d.") + (f" {paper_note}" if paper_note else "")
    md = _markdown(df)
    out_stem.with_suffix(".md").write_text(f"{note}\n\n{md}\n")
    tex = df.to_latex(index=False, escape=True, caption=note, label="tab:dataset")
    out_stem.with_suffix(".tex").write_text(tex)


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def montage(store: RegionStore, out: Path, per_row: int = 8, seed: int = 0) -> None:
    """A row of sample regions per magnification (drawn with `seed`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mags_ = [m for m in store.magnifications if store.table(m.name).has("images")]
    if not mags_:
        raise ValueError(f"{store.root}: no images in the store (dataset.store_images is false)")
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(mags_), per_row, figsize=(per_row * 1.2, len(mags_) * 1.25), squeeze=False)
    for i, m in enumerate(mags_):
        t = store.table(m.name)
        picks = np.sort(rng.choice(len(t), size=min(per_row, len(t)), replace=False))
        for j in range(per_row):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(picks):
                ax.imshow(np.asarray(t.get("images", int(picks[j]))))
        axes[i, 0].set_ylabel(f"{m.name}\n(n={len(t)})", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{Path(store.root).name}: sample regions per magnification", fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
