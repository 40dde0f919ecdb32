"""`zoomldm eval sr`: SSIM, PSNR and LPIPS of one SR method's outputs against the HR test images.

    zoomldm eval sr --pairs PAIRS_DIR --outputs DIR --method NAME --out JSON [--lpips-weights-dir D]

PAIRS_DIR is a `sample sr-inputs` folder (hr/<k>.png, <k>.json with `hr_complete`), DIR a `sample sr` or
`sample sr-baseline` folder (<k>.png). Pairs whose HR has missing base tiles (black in HR, hr_complete false) are
skipped and counted. Convention (peers-and-metrics.md §6.6–6.7, zoomldm.metrics.sr): RGB uint8, full image,
data range 255; SSIM with a Gaussian window σ = 1.5 (Wang et al. 2004); LPIPS v0.1 AlexNet. Without the local
AlexNet backbone the LPIPS cell is null and `lpips_note` names the missing file.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import click

log = logging.getLogger("zoomldm.eval")

CONVENTION = "RGB, full image, data range 255; SSIM Gaussian σ=1.5"


def _key(path: Path):
    return (0, int(path.stem), "") if re.fullmatch(r"\d+", path.stem) else (1, 0, path.stem)


def evaluate_sr(pairs: str | Path, outputs: str | Path, method: str, lpips_weights_dir: str | Path | None = None,
                device: str = "cpu") -> dict:
    """The metric record of one method (see the module docstring); one-line errors for bad inputs."""
    import numpy as np

    from zoomldm.metrics.sr import ALEXNET_FILE, MissingWeightsError, load_lpips_alex, lpips_distance, psnr, ssim
    from zoomldm.sampling.io import read_png
    pairs, outputs = Path(pairs), Path(outputs)
    hr_files = sorted((pairs / "hr").glob("*.png"), key=_key)
    if not hr_files:
        raise FileNotFoundError(f"--pairs {pairs}: no HR images (hr/<k>.png; run `zoomldm sample sr-inputs`)")
    lpips_note, lpips_ok = None, True
    try:
        load_lpips_alex(lpips_weights_dir, device)
    except MissingWeightsError as e:
        lpips_ok, lpips_note = False, ALEXNET_FILE
        log.warning("LPIPS skipped: %s", e)
    rows, skipped = [], []
    for hr_path in hr_files:
        k = hr_path.stem
        meta = pairs / f"{k}.json"
        if meta.is_file() and json.loads(meta.read_text()).get("hr_complete") is False:
            skipped.append(k)
            continue
        out_path = outputs / f"{k}.png"
        if not out_path.is_file():
            raise FileNotFoundError(f"{out_path}: missing output of {method} for the test pair {hr_path}")
        hr, sr = np.array(read_png(hr_path)), np.array(read_png(out_path))   # writable copies for torch
        if sr.shape != hr.shape:
            raise ValueError(f"{out_path}: {sr.shape[1]}x{sr.shape[0]} px, but its HR {hr_path} is "
                             f"{hr.shape[1]}x{hr.shape[0]}")
        row = {"k": k, "ssim": ssim(sr, hr), "psnr": psnr(sr, hr),
               "lpips": lpips_distance(sr, hr, lpips_weights_dir, device) if lpips_ok else None}
        for name, v in row.items():
            if name != "k" and v is not None and not math.isfinite(v):
                raise ValueError(f"{out_path}: {name} is {v} against {hr_path} (an identical or corrupt image?)")
        meta_out = outputs / f"{k}.json"
        if meta_out.is_file():                  # the sampler's own record: time and consistency with the LR input
            rec = json.loads(meta_out.read_text())
            row.update({name: rec.get(name) for name in ("seconds", "lr_psnr", "lr_consistency_mae")})
        rows.append(row)
    if not rows:
        raise ValueError(f"--pairs {pairs}: every pair has hr_complete false ({len(skipped)} skipped); "
                         f"nothing to evaluate")

    def mean(name):
        vals = [r[name] for r in rows if r.get(name) is not None]
        return float(np.mean(vals)) if len(vals) == len(rows) else None
    return {"method": method, "n": len(rows), "n_skipped_incomplete": len(skipped), "skipped": skipped,
            "ssim": mean("ssim"), "psnr": mean("psnr"), "lpips": mean("lpips") if lpips_ok else None,
            "lpips_note": lpips_note, "lpips_net": "alex v0.1", "convention": CONVENTION,
            "seconds_per_image": mean("seconds"), "lr_psnr": mean("lr_psnr"),
            "lr_consistency_mae": mean("lr_consistency_mae"), "pairs": str(pairs), "outputs": str(outputs),
            "per_image": rows}


@click.command("sr")
@click.option("--pairs", required=True, type=click.Path(file_okay=False),
              help="`sample sr-inputs` folder: hr/<k>.png and <k>.json.")
@click.option("--outputs", required=True, type=click.Path(file_okay=False), help="The method's <k>.png folder.")
@click.option("--method", required=True, help="Method name written into the JSON (e.g. zoomldm, bicubic).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON to write.")
@click.option("--lpips-weights-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with the torchvision AlexNet backbone [eval.sr.lpips_weights_dir; "
                   "default $TORCH_HOME/hub/checkpoints].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config YAML (eval.sr.lpips_weights_dir, eval.device).")
@click.option("--device", default=None, help="LPIPS device: cpu, cuda or auto [eval.device].")
def sr(pairs, outputs, method, out, lpips_weights_dir, config_path, device) -> None:
    """SSIM / PSNR / LPIPS of one SR method's outputs vs the HR test images -> one JSON."""
    from zoomldm.cli.data import resolve_device
    from zoomldm.config import Config, load_config
    from zoomldm.sampling.io import write_json
    cfg = load_config(config_path) if config_path else Config()
    wdir = lpips_weights_dir or cfg.eval.sr.lpips_weights_dir
    record = evaluate_sr(pairs, outputs, method, wdir, resolve_device(device or cfg.eval.device))
    write_json(Path(out), record)
    lp = f"n/a ({record['lpips_note']} missing)" if record["lpips"] is None else f"{record['lpips']:.4f}"
    click.echo(f"{out}: {method} n={record['n']} SSIM {record['ssim']:.4f} PSNR {record['psnr']:.2f} dB LPIPS {lp}")


COMMANDS: list = [sr]
