"""`zoomldm convert`: official checkpoints -> our safetensors checkpoints (and back), opt-in hub download."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

log = logging.getLogger("zoomldm.convert")

HUB_REPO = "StonyBrook-CVLab/ZoomLDM"  # reference report §2.3
# Size class of each release file: UNet 400.9 M + its EMA copy + VQ-f4 55.3 M + Summarizer 38.7 M parameters
# in float32 (reference §1.4) is ~3.6 GB; a Lightning file may add optimizer state.
HUB_FILES = {"weights.ckpt": "several GB: ~3.6 GB of fp32 weights, more with optimizer state",
             "config.yaml": "a few kB"}


@click.group()
def convert() -> None:
    """Convert official ZoomLDM / CDM checkpoints to zoomldm checkpoints (safetensors + resolved config)."""


def _count(module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n:,} ({n / 1e6:.1f} M)"


@convert.command("official")
@click.option("--ckpt", "ckpt_path", required=True, type=click.Path(dir_okay=False),
              help="Official LatentDiffusion checkpoint (e.g. brca/weights.ckpt).")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Its official YAML (e.g. brca/config.yaml).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder; writes OUT/zoomldm.safetensors.")
@click.option("--ema", is_flag=True, help="Take the UNet from the EMA (model_ema.) weights.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow full unpickling if torch.load(weights_only=True) refuses the file.")
def official_cmd(ckpt_path: str, config_path: str, out_dir: str, ema: bool, trust_pickle: bool) -> None:
    """Official ZoomLDM checkpoint -> OUT/zoomldm.safetensors (UNet raw or EMA, VQ-f4, Summarizer)."""
    from zoomldm.models.checkpoint import save_checkpoint
    from zoomldm.models.official import load_latent_diffusion, read_official_config, read_official_state_dict

    official_yaml = read_official_config(config_path)
    sd = read_official_state_dict(ckpt_path, trust_pickle=trust_pickle)
    modules = load_latent_diffusion(sd, official_yaml, ema=ema)
    out = save_checkpoint(Path(out_dir) / "zoomldm.safetensors", "zoomldm", modules,
                          extra={"source": os.path.abspath(ckpt_path), "source_config": official_yaml,
                                 "unet_weights": "ema" if ema else "raw"})
    for name, module in modules.items():
        click.echo(f"{name}: {_count(module)} parameters")
    click.echo(f"wrote {out}")


@convert.command("official-cdm")
@click.option("--ckpt", "ckpt_path", required=True, type=click.Path(dir_okay=False),
              help="cdm_dit training checkpoint ({model, ema, opt, args}) or a bare DiT state dict.")
@click.option("--config", "config_arg", required=True,
              help="DiT model name (DiT-S/B/L/XL; the paper's is DiT-B) or a YAML/JSON file of DiT "
                   "arguments.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder; writes OUT/cdm.safetensors.")
@click.option("--ema", is_flag=True, help="Take the EMA weights.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow full unpickling if torch.load(weights_only=True) refuses the file.")
def official_cdm_cmd(ckpt_path: str, config_arg: str, out_dir: str, ema: bool, trust_pickle: bool) -> None:
    """Official CDM checkpoint -> OUT/cdm.safetensors."""
    from zoomldm.models.checkpoint import save_checkpoint
    from zoomldm.models.official import DIT_MODELS, load_official_cdm, read_official_config

    config = config_arg if config_arg in DIT_MODELS else read_official_config(config_arg)
    cdm = load_official_cdm(ckpt_path, config, ema=ema, trust_pickle=trust_pickle)
    out = save_checkpoint(Path(out_dir) / "cdm.safetensors", "cdm", {"cdm": cdm},
                          extra={"source": os.path.abspath(ckpt_path), "source_config": config,
                                 "cdm_weights": "ema" if ema else "raw"})
    click.echo(f"cdm: {_count(cdm)} parameters")
    click.echo(f"wrote {out}")


@convert.command("to-official")
@click.option("--ckpt", "ckpt_path", required=True, type=click.Path(dir_okay=False),
              help="A zoomldm checkpoint (kind zoomldm).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder; writes OUT/weights.ckpt and OUT/config.yaml.")
def to_official_cmd(ckpt_path: str, out_dir: str) -> None:
    """zoomldm checkpoint -> official naming ({"state_dict": ...} .ckpt + model YAML), e.g. for the
    official notebooks. `unet_ema`, when present, is written under model_ema. (LitEma naming)."""
    import torch
    import yaml

    from zoomldm.models.checkpoint import load_component, read_checkpoint
    from zoomldm.models.official import to_official_config, to_official_state_dict

    ckpt = read_checkpoint(ckpt_path, kind="zoomldm")
    modules = {name: load_component(ckpt, name) for name in ckpt.components}
    missing = sorted({"unet", "vq", "summarizer"} - set(modules))
    if missing:
        raise ValueError(f"{ckpt_path}: components {missing} are needed for an official checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": to_official_state_dict(modules)}, out / "weights.ckpt")
    cfg = to_official_config(modules["unet"].config, modules["vq"].config, modules["summarizer"].config)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    click.echo(f"wrote {out / 'weights.ckpt'} and {out / 'config.yaml'}")


@convert.command("info")
@click.argument("ckpt_path", type=click.Path(dir_okay=False))
def info_cmd(ckpt_path: str) -> None:
    """Print the kind, components, parameter counts and extra of a zoomldm checkpoint."""
    from zoomldm.models.checkpoint import config_to_dict, read_checkpoint

    ckpt = read_checkpoint(ckpt_path)
    click.echo(f"{ckpt.path}: kind {ckpt.kind}")
    for name, sd in ckpt.state_dicts.items():
        n = sum(v.numel() for v in sd.values())
        click.echo(f"  {name}: {n / 1e6:.1f} M parameters, {json.dumps(config_to_dict(ckpt.configs[name]))}")
    extra = {k: v for k, v in ckpt.extra.items() if k != "source_config"}
    click.echo(f"  extra: {json.dumps(extra)}")


@convert.command("fetch-official")
@click.option("--dataset", required=True, type=click.Choice(["brca", "naip"]))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Download folder (files keep their hub paths, e.g. OUT/brca/weights.ckpt).")
@click.option("--yes", is_flag=True, help="Confirm the download (nothing is fetched without it).")
@click.pass_context
def fetch_official_cmd(ctx: click.Context, dataset: str, out_dir: str, yes: bool) -> None:
    """Opt-in download of the official release from the Hugging Face hub (the only networked command)."""
    click.echo(f"would download from https://huggingface.co/{HUB_REPO} into {out_dir}:")
    for name, size in HUB_FILES.items():
        click.echo(f"  {dataset}/{name}  ({size})")
    if not yes:
        click.echo("nothing downloaded: pass --yes to download", err=True)
        ctx.exit(1)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        raise ValueError("HF_HUB_OFFLINE is set; unset it to download the official weights")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError("fetch-official needs huggingface_hub (pip install huggingface_hub)") from None
    for name in HUB_FILES:
        try:
            path = hf_hub_download(HUB_REPO, f"{dataset}/{name}", local_dir=out_dir)
        except Exception as e:  # network/auth errors of any kind: one line, not a traceback
            raise ValueError(f"download of {HUB_REPO}/{dataset}/{name} failed: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}") from None
        click.echo(f"downloaded {path}")
    click.echo(f"next: zoomldm convert official --ckpt {out_dir}/{dataset}/weights.ckpt "
               f"--config {out_dir}/{dataset}/config.yaml --out <DIR> [--ema]")
