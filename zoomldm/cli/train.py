"""`zoomldm train <what>`: every trainer is a Task run by the one training loop; rerunning resumes.

    zoomldm train ldm --config CFG --out DIR [--max-steps N]
    zoomldm train ldm-sr --config CFG --out DIR                     # SR baseline (LDM-SR, concatenated LR)
    zoomldm train controlnet --config CFG --zoomldm LDM.safetensors --out DIR     # SR baseline (ControlNet)
    torchrun --nproc_per_node 4 -m zoomldm train ldm --config CFG --out DIR     # DDP; same global batch
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from zoomldm.cli.data import resolve_device, store_dir
from zoomldm.config import load_config

log = logging.getLogger("zoomldm.train")


def _common(f):
    f = click.option("--progress/--no-progress", default=True, show_default=True)(f)
    f = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, or auto.")(f)
    f = click.option("--max-steps", type=click.IntRange(min=1), default=None,
                     help="Stop after this many steps in total (a slice of train.<what>.max_steps).")(f)
    f = click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumable).")(f)
    f = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))(f)
    return f


@click.group()
def train() -> None:
    """Train a model; rerunning the same command in the same --out folder resumes it."""


def _seeded(build, seed: int):
    """Build a task with the model initialisation drawn from the run's seed (reruns start identically)."""
    import torch
    torch.manual_seed(seed)
    return build()


def _run(task, tcfg, out: str, max_steps, device: str, progress: bool) -> dict:
    from zoomldm.training.loop import train as train_loop
    summary = train_loop(task, tcfg, out, max_steps=max_steps, device=None if device == "auto" else device,
                         progress=progress)
    click.echo(f"{out}: {summary.get('steps')} steps; loss first 10% {summary.get('loss_first_10pct', float('nan')):.4f}"
               f" -> last 10% {summary.get('loss_last_10pct', float('nan')):.4f}")
    return summary


def _bundle_vq(out: str, store) -> None:
    """Copy the run's final checkpoint to model.safetensors with the VQ that encoded the store's latents added,
    so `sample` commands need only that one file. Tensors and configs are copied as they are (components such
    as the Graikos `embedder` need no rebuilding)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from zoomldm.models.checkpoint import META_KEY, config_to_dict, load_vq
    final = Path(out) / "final.safetensors"
    if not final.is_file():
        return
    if not (store.root / "latents.json").is_file():
        log.warning("%s: the store does not say which VQ encoded its latents (no latents.json); "
                    "model.safetensors not written", store.root)
        return
    source = json.loads((store.root / "latents.json").read_text())["vq"]
    vq = load_vq(source, trust_pickle=True)   # the file already passed encode-latents
    with safe_open(final, framework="pt") as f:
        header = json.loads(f.metadata()[META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.update({f"vq.{k}": v.detach().cpu().contiguous() for k, v in vq.state_dict().items()})
    header["configs"]["vq"] = config_to_dict(vq.config)
    header["extra"] = dict(header.get("extra", {}), vq=source)
    tmp = Path(out) / "model.safetensors.tmp"
    save_file(tensors, tmp, metadata={META_KEY: json.dumps(header)})
    tmp.replace(Path(out) / "model.safetensors")


@train.command()
@_common
def autoencoder(config_path, out, max_steps, device, progress) -> None:
    """VQ-f4 on the store's region images (then: zoomldm data encode-latents --vq OUT/final.safetensors)."""
    from zoomldm.training.tasks import AutoencoderTask
    cfg = load_config(config_path)
    tcfg = cfg.train.autoencoder
    task = _seeded(lambda: AutoencoderTask(store_dir(cfg), tcfg), tcfg.seed)
    _run(task, tcfg, out, max_steps, device, progress)


def _train_diffusion(config_path, out, max_steps, device, progress, what: str, build, kind: str | None = None):
    """The UNet trainers (ZoomLDM, single-scale, Graikos): seeded init, optional CompVis UNet init, the loop,
    then the bundled model.safetensors (with the VQ that encoded the store's latents)."""
    from zoomldm.data.store import RegionStore
    cfg = load_config(config_path)
    tcfg = getattr(cfg.train, what)
    store = RegionStore(store_dir(cfg))
    task = _seeded(lambda: build(cfg, store, tcfg), tcfg.seed)
    if kind:
        task.kind = kind
    _init_unet(task, tcfg.init_unet)
    _run(task, tcfg, out, max_steps, device, progress)
    _bundle_vq(out, store)


@train.command()
@_common
def ldm(config_path, out, max_steps, device, progress) -> None:
    """ZoomLDM: UNet + Summarizer on every magnification of the store."""
    from zoomldm.training.tasks import LDMTask
    _train_diffusion(config_path, out, max_steps, device, progress, "ldm",
                     lambda cfg, store, tcfg: LDMTask(store, tcfg))


@train.command("single-scale")
@_common
@click.option("--mag", required=True, help="The magnification of this single-scale model (e.g. 20x).")
def single_scale(config_path, out, max_steps, device, progress, mag) -> None:
    """The paper's single-scale comparison: the ZoomLDM architecture trained on one magnification."""
    from zoomldm import mags
    from zoomldm.training.tasks import LDMTask

    def build(cfg, store, tcfg):
        return LDMTask(store, tcfg, magnifications=[mags.find(cfg.dataset.ladder, mag).name])

    _train_diffusion(config_path, out, max_steps, device, progress, "single_scale", build, kind="single-scale")


@train.command()
@_common
def graikos(config_path, out, max_steps, device, progress) -> None:
    """Graikos et al. (CVPR 2024) patch LDM on base-magnification patches."""
    from baselines.graikos import GraikosTask
    _train_diffusion(config_path, out, max_steps, device, progress, "graikos",
                     lambda cfg, store, tcfg: GraikosTask(store, tcfg))


@train.command()
@_common
@click.option("--ldm-ckpt", required=True, type=click.Path(dir_okay=False),
              help="A zoomldm checkpoint whose Summarizer the CDM learns to sample (frozen).")
def cdm(config_path, out, max_steps, device, progress, ldm_ckpt) -> None:
    """The conditioning diffusion model over frozen Summarizer outputs."""
    from zoomldm.models.checkpoint import load_component, read_checkpoint
    from zoomldm.training.tasks import CDMTask
    cfg = load_config(config_path)
    ckpt = read_checkpoint(ldm_ckpt)
    if "summarizer" not in ckpt.state_dicts:
        raise ValueError(f"{ldm_ckpt}: a {ckpt.kind} checkpoint without a summarizer; pass a ZoomLDM checkpoint")
    summarizer = load_component(ckpt, "summarizer")
    task = _seeded(lambda: CDMTask(store_dir(cfg), cfg.train.cdm, summarizer), cfg.train.cdm.seed)
    _run(task, cfg.train.cdm, out, max_steps, device, progress)


@train.command("ldm-sr")
@_common
def ldm_sr(config_path, out, max_steps, device, progress) -> None:
    """SR baseline: an LDM on base patches conditioned on the LR tile by concatenation (train.ldm_sr)."""
    from zoomldm.training.sr_tasks import LDMSRTask
    if load_config(config_path).train.ldm_sr.init_unet:
        raise ValueError("train.ldm_sr.init_unet must be null: the 6-channel LDM-SR UNet is trained from scratch")
    _train_diffusion(config_path, out, max_steps, device, progress, "ldm_sr",
                     lambda cfg, store, tcfg: LDMSRTask(store, tcfg))


@train.command()
@_common
@click.option("--zoomldm", "zoomldm_ckpt", required=True, type=click.Path(dir_okay=False),
              help="The ZoomLDM model.safetensors to control (frozen; its EMA UNet when present).")
def controlnet(config_path, out, max_steps, device, progress, zoomldm_ckpt) -> None:
    """SR baseline: a ControlNet (trainable copy of ZoomLDM's encoder fed the LR tile) on frozen ZoomLDM."""
    import shutil

    from zoomldm.data.store import RegionStore
    from zoomldm.sampling.denoisers import load_zoomldm
    from zoomldm.training.sr_tasks import ControlNetTask
    cfg = load_config(config_path)
    tcfg = cfg.train.controlnet
    if tcfg.init_unet:
        raise ValueError("train.controlnet.init_unet must be null: the ControlNet starts as a copy of --zoomldm")
    m = load_zoomldm(zoomldm_ckpt, "cpu")
    store = RegionStore(store_dir(cfg))
    task = _seeded(lambda: ControlNetTask(store, tcfg, m.unet, m.summarizer), tcfg.seed)
    _run(task, tcfg, out, max_steps, device, progress)
    final = Path(out) / "final.safetensors"
    if final.is_file():                 # the ControlNet alone; `sample sr-baseline` takes the ZoomLDM beside it
        shutil.copyfile(final, Path(out) / "model.safetensors.tmp")
        (Path(out) / "model.safetensors.tmp").replace(Path(out) / "model.safetensors")


def _init_unet(task, path: str | None) -> None:
    """Initialise the UNet from the CompVis cin256-v2 checkpoint (paper §3), only for a fresh run."""
    if path is None:
        return
    from zoomldm.models.official import load_compvis_cin256_unet
    sd, report = load_compvis_cin256_unet(path, task.modules["unet"].config)
    task.modules["unet"].load_state_dict(sd, strict=False)
    log.info("UNet initialised from %s: %s", path, report)


__all__ = ["train", "resolve_device"]


@train.command("table")
@click.option("--out", "out_stem", required=True, help="Writes OUT.csv and OUT.md.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
def table(out_stem: str, runs: tuple[str, ...]) -> None:
    """The training log table: loss over the first and last 10% of steps, time and throughput per run."""
    import json

    import pandas as pd

    rows = []
    for run in runs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no training summary (has `zoomldm train` finished in {run}?)")
        s = json.loads(path.read_text())
        first, last = s.get("loss_first_10pct"), s.get("loss_last_10pct")
        rows.append({"run": str(Path(run)), "steps": s["steps"], "global_batch": s["global_batch"],
                     "device": s["device"], "precision": s["precision"],
                     "loss_first_10pct": first, "loss_last_10pct": last,
                     "loss_decreased": bool(first is not None and last is not None and last < first),
                     "wall_s": round(s["wall_s"], 1), "samples_per_s": round(s["samples_per_s"], 2)})
    df = pd.DataFrame(rows)
    out = Path(out_stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    cols = list(df.columns)
    lines = ["Training runs: mean loss over the first and the last 10% of steps (from each run's log.csv).", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) and c.startswith("loss") else str(r[c])
                                for c in cols) + " |" for _, r in df.iterrows()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
