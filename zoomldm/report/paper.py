"""The paper's numbers, read from `workflow/references/*.csv` (each row cites its source in `source`).

Cells hold a number, "n/r" (not recovered from the paper: see ../shared/reference/peers-and-metrics.md §8) or
are absent from the file; the tables write "n/a" where the paper has no such cell at all.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from zoomldm.report.inputs import ReportInputError

NOT_RECOVERED = "n/r"   # the paper has this cell but its value was not recovered
NOT_APPLICABLE = "n/a"  # the paper has no such cell (method, magnification or grid not in the paper)
NOT_COMPUTED = "n/c"    # our metric could not be computed (the note says why)

REFERENCE_COLUMNS = {
    "fid_by_magnification": ["ladder", "paper_row", "paper_method", "model", "cond", "magnification", "fid",
                             "source"],
    "large_images": ["method", "paper_method", "grid", "size_px", "clip_fid", "crop_fid", "seconds_per_image",
                     "source"],
    "super_resolution": ["method", "paper_method", "ssim", "psnr", "lpips", "source"],
    "mil": ["features", "paper_method", "magnification", "subtyping_auc", "hrd_auc", "source"],
    "dataset": ["ladder", "magnification", "training_patches", "source"],
}


NUMERIC_COLUMNS = ("fid", "clip_fid", "crop_fid", "seconds_per_image", "ssim", "psnr", "lpips",
                   "subtyping_auc", "hrd_auc", "training_patches")


def load_reference(references_dir: Path | str, name: str) -> pd.DataFrame:
    """`references_dir/<name>.csv` as strings (numbers are parsed per cell by `value`)."""
    path = Path(references_dir) / f"{name}.csv"
    if not path.is_file():
        raise ReportInputError(f"{path}: reference file not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in REFERENCE_COLUMNS[name] if c not in df.columns]
    if missing:
        raise ReportInputError(f"{path}: missing column(s) {', '.join(missing)}")
    empty = [c for c in REFERENCE_COLUMNS[name] if (df[c].str.strip() == "").any()]
    if empty:
        raise ReportInputError(
            f"{path}: empty cell(s) in column(s) {', '.join(empty)} (write {NOT_RECOVERED})")
    for col in REFERENCE_COLUMNS[name]:
        if col in NUMERIC_COLUMNS:
            for cell in df[col]:
                value(cell, f"{path}: column {col!r}")
    df.attrs["path"] = str(path)
    return df


def value(cell: str, where: str = "") -> float | str:
    """A reference cell as a float, or the token "n/r"."""
    cell = str(cell).strip()
    if cell == NOT_RECOVERED:
        return NOT_RECOVERED
    try:
        v = float(cell)
    except ValueError:
        raise ReportInputError(f"{where}: {cell!r} is neither a number nor {NOT_RECOVERED!r}") from None
    if not math.isfinite(v):
        raise ReportInputError(f"{where}: {cell!r} is not a finite number")
    return v


def lookup(df: pd.DataFrame, **keys: str | int) -> pd.Series | None:
    """The one reference row matching every key (compared as strings), or None."""
    mask = pd.Series(True, index=df.index)
    for k, v in keys.items():
        mask &= df[k] == str(v)
    hits = df[mask]
    if len(hits) > 1:
        raise ReportInputError(f"{df.attrs.get('path', 'reference')}: {len(hits)} rows match {keys}")
    return None if hits.empty else hits.iloc[0]
