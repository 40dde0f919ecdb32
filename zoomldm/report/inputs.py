"""Reading the metric JSON files the report aggregates (DESIGN.md §7: `report/` reads metric JSON only).

Every file is checked against a small schema: a missing field, a null where a number is required, or a NaN/inf
value raises one line naming the file and the field, so a table never shows a silent empty cell.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


class ReportInputError(ValueError):
    """A metric or reference file is missing, empty or malformed (the message names the file)."""


# kind: "float", "int", "str", "bool", "any"; a trailing "?" allows null.
FID_SCHEMA = {"method": "str", "cond": "str", "magnification": "str", "fid": "float", "n_gen": "int",
              "n_ref": "int", "extractor": "str", "extractor_label": "str", "stand_in": "bool"}
LARGE_SCHEMA = {"method": "str", "grid": "int", "size_px": "int", "n_images": "int", "clip_fid": "float",
                "clip_extractor": "str", "clip_extractor_label": "str", "clip_stand_in": "bool",
                "n_ref_large": "int", "crop_fid": "float", "crop_extractor": "str",
                "crop_extractor_label": "str", "crop_stand_in": "bool", "n_crops": "int",
                "n_ref_crops": "int", "seconds_per_image": "float", "consistency_mae": "float?"}
CONSISTENCY_SCHEMA = {"constrained_mae": "float", "unconstrained_mae": "float", "n": "int"}
SR_SCHEMA = {"method": "str", "n": "int", "ssim": "float", "psnr": "float", "lpips": "float?",
             "lpips_note": "str?", "convention": "str"}
MIL_SCHEMA = {"features": "str", "encoder_label": "str", "magnification": "str", "task": "str",
              "n_slides": "int", "n_instances": "int", "folds": "int", "auc_mean": "float",
              "auc_std": "float", "bacc_mean": "float", "bacc_std": "float", "stand_in": "bool"}

FID_METHODS = ("zoomldm", "zoomldm_cached", "single_scale", "graikos")
FID_CONDS = ("store", "cdm")
LARGE_METHODS = ("zoomldm", "zoomldm_linear", "zoomldm_unconstrained", "graikos")
SR_METHODS = ("bicubic", "ldm_sr", "controlnet", "zoomldm", "zoomldm_unconstrained")
MIL_FEATURES = ("ssl", "zoomldm")


def _check(path: Path, key: str, value, kind: str) -> None:
    nullable = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        if nullable:
            return
        raise ReportInputError(f"{path}: field {key!r} is null")
    ok = {"float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "str": isinstance(value, str) and value.strip() != "",
          "bool": isinstance(value, bool),
          "any": True}[kind]
    if not ok:
        raise ReportInputError(f"{path}: field {key!r} should be {kind}, got {value!r}")
    if kind == "float" and not math.isfinite(float(value)):
        raise ReportInputError(f"{path}: field {key!r} is {value} (not a finite number)")


def read_metric(path: Path | str, schema: dict[str, str]) -> dict:
    """The JSON object in `path`, with every field of `schema` present and of the right kind."""
    path = Path(path)
    if not path.is_file():
        raise ReportInputError(f"{path}: metric file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportInputError(f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(data, dict):
        raise ReportInputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in schema if k not in data]
    if missing:
        raise ReportInputError(f"{path}: missing field(s) {', '.join(missing)}")
    for key, kind in schema.items():
        _check(path, key, data[key], kind)
    data["_path"] = str(path)
    return data


def check_choice(record: dict, key: str, choices: tuple[str, ...]) -> None:
    if record[key] not in choices:
        raise ReportInputError(
            f"{record['_path']}: field {key!r} is {record[key]!r}; expected one of {choices}")


def scan(metrics_dir: Path | str, category: str, pattern: str, expected: str) -> list[Path]:
    """The metric files of `metrics_dir/category/pattern`, sorted; an error when there are none."""
    root = Path(metrics_dir) / category
    if not root.is_dir():
        raise ReportInputError(f"{root}: metric directory not found (expected {expected})")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise ReportInputError(f"{root}: no metric files (expected {expected})")
    return files


def mag_value(name: str, where: str = "") -> float:
    """Magnification as a number: "0.15625x" -> 0.15625 (also for NAIP levels "1x".."4x")."""
    try:
        value = float(str(name).rstrip("x").replace("_", "."))
    except ValueError:
        raise ReportInputError(
            f"{where + ': ' if where else ''}magnification {name!r} is not like '20x'") from None
    if value <= 0:
        raise ReportInputError(f"{where + ': ' if where else ''}magnification {name!r} is not positive")
    return value
