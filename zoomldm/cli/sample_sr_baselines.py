"""`zoomldm sample sr-baseline`: the SR baselines on the LR test images of `sample sr-inputs`.

    zoomldm sample sr-baseline --method bicubic --lr LR.png [--lr ...] --out DIR [--grid 4]
    zoomldm sample sr-baseline --method ldm_sr --ckpt runs/ldm_sr/model.safetensors --lr ... --out DIR
    zoomldm sample sr-baseline --method controlnet --ckpt runs/controlnet/model.safetensors \
        --zoomldm runs/ldm/model.safetensors --lr ... --out DIR

Writes DIR/<name>.png (the HR estimate, grid·P px) and then DIR/<name>.json (name = the LR file's stem), like
`sample sr`; items already done are skipped. The trained baselines sample each base patch from its LR tile by
DDIM (η = 0, --steps, per-item noise of (seed, "sr", name, patch)), decode the assembled latents with the blended
`decode_large`, and report LR consistency (|A(SR) − LR| on [0, 255] and PSNR(A(SR), LR)).

ControlNet's test-time context is the null (all-zero) context: the conditions ZoomLDM could get for a new LR
image are either inverted (that is ZoomLDM's own SR method) or computed from the HR tiles (the store's grids,
which would leak the answer), so the baseline runs ZoomLDM unconditionally plus the control residuals.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from zoomldm.cli.data import resolve_device
from zoomldm.config import Config, load_config

log = logging.getLogger("zoomldm.sample")

METHODS = ("bicubic", "ldm_sr", "controlnet")


def _load_trained(path: str, kind: str, component: str, config_cls, model_cls, device):
    """(model, checkpoint): `component` (its EMA copy when saved) of a `zoomldm train <kind>`
    model.safetensors, built and checked; --method <component> is the baseline that needs it."""
    from zoomldm.models.checkpoint import config_from_dict, read_checkpoint
    from zoomldm.models.errors import build_checked
    from zoomldm.sampling.denoisers import CheckpointKindError
    ckpt = read_checkpoint(path)
    if ckpt.kind != kind or component not in ckpt.components:
        raise CheckpointKindError(f"--ckpt {path} is a {ckpt.kind} checkpoint (components: "
                                  f"{', '.join(ckpt.components)}); --method {component} needs a "
                                  f"`zoomldm train {kind}` model.safetensors")
    name = f"{component}_ema" if f"{component}_ema" in ckpt.components else component
    cfg = config_from_dict(config_cls, ckpt.configs[name])
    model = build_checked(lambda: model_cls(cfg), ckpt.state_dicts[name], f"{name} in {path}", device)
    return model, ckpt


def _load_ldm_sr(path: str, device, vq_path: str | None):
    """(LDMSR (EMA when present), VQ) from a `train ldm-sr` model.safetensors."""
    from zoomldm.models.checkpoint import load_vq
    from zoomldm.models.sr_baselines import LDMSR, LDMSRConfig
    from zoomldm.sampling.denoisers import CheckpointKindError
    model, ckpt = _load_trained(path, "ldm-sr", "ldm_sr", LDMSRConfig, LDMSR, device)
    if vq_path is not None:
        vq = load_vq(vq_path, device)
    elif "vq" in ckpt.components:
        vq = load_vq(path, device)
    else:
        raise CheckpointKindError(f"--ckpt {path} has no vq component: use the run's model.safetensors or pass --vq")
    return model, vq


def _load_controlnet(path: str, zoomldm: str | None, device):
    """(ControlNet (EMA when present), the frozen ZoomLDM it was trained on)."""
    from zoomldm.models.sr_baselines import ControlNet, ControlNetConfig
    from zoomldm.sampling.denoisers import load_zoomldm
    if zoomldm is None:
        raise ValueError("--method controlnet needs --zoomldm (the ZoomLDM model.safetensors it was trained on)")
    control, _ = _load_trained(path, "controlnet", "controlnet", ControlNetConfig, ControlNet, device)
    m = load_zoomldm(zoomldm, device)
    control.check_base(m.unet, zoomldm)
    return control, m


@click.command("sr-baseline")
@click.option("--method", required=True, type=click.Choice(METHODS), help="Which SR baseline.")
@click.option("--ckpt", type=click.Path(dir_okay=False), default=None,
              help="ldm_sr: `train ldm-sr` model.safetensors; controlnet: `train controlnet` model.safetensors.")
@click.option("--zoomldm", "zoomldm_ckpt", type=click.Path(dir_okay=False), default=None,
              help="controlnet: the frozen ZoomLDM model.safetensors it was trained on.")
@click.option("--vq", "vq_path", type=click.Path(dir_okay=False), default=None,
              help="ldm_sr: VQ checkpoint, for a --ckpt without a bundled VQ.")
@click.option("--lr", "lr_paths", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="LR image(s), patch_px x patch_px, at the magnification spanning --grid base patches.")
@click.option("--grid", type=int, default=None,
              help="SR factor (base patches per side); default: the checkpoint's, else [sample.sr.grid].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="DDIM steps, η = 0 [sample.sr.baseline_steps].")
@click.option("--patch-batch", type=click.IntRange(min=1), default=None, help="[sample.large.patch_batch]")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config YAML: defaults (sample: section); bicubic checks the LR size against dataset.patch_px.")
@click.option("--seed", type=int, default=None, help="Base seed [sample.seed].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 or auto [sample.device].")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default=None,
              help="UNet autocast on CUDA (auto: bf16); CPU: fp32 [sample.precision].")
@click.option("--progress/--no-progress", default=True, show_default=True)
def sr_baseline(method, ckpt, zoomldm_ckpt, vq_path, lr_paths, grid, steps, patch_batch, out, config_path, seed,
                device, precision, progress) -> None:
    """SR baselines (bicubic, LDM-SR, ControlNet): OUT/<name>.png and OUT/<name>.json."""
    import torch

    from zoomldm.diffusion import Schedule
    from zoomldm.diffusion.resize import downscale
    from zoomldm.metrics.sr import psnr
    from zoomldm.models.sr_baselines import bicubic_sr, controlled_eps, null_context, sample_sr_image
    from zoomldm.sampling import denoisers as dn
    from zoomldm.sampling.io import from_uint8, pending_inputs, read_lr_images, write_json, write_png
    from zoomldm.sampling.sr import to_uint8
    cfg = load_config(config_path) if config_path else Config()
    sc = cfg.sample
    seed, patch_batch = sc.seed if seed is None else seed, patch_batch or sc.large.patch_batch
    steps = sc.sr.baseline_steps if steps is None else steps
    if method == "bicubic" and (ckpt or zoomldm_ckpt):
        raise ValueError("--method bicubic takes no --ckpt / --zoomldm")
    if method != "bicubic" and ckpt is None:
        raise ValueError(f"--method {method} needs --ckpt")
    todo = pending_inputs(lr_paths, out)
    if not todo:
        return
    dev = resolve_device(device or sc.device)

    model_path, eps_fn, decode, patch_px, latent_side = None, None, None, None, None
    if method == "ldm_sr":
        model, vq = _load_ldm_sr(ckpt, dev, vq_path)
        model_grid, latent_side = model.config.grid, model.latent_side

        def eps_fn(x, t, hint):
            return model(x, t, hint).float()

        def decode(z):                            # quantised, float32 even inside autocast (as ZoomLDM.decode)
            with torch.autocast(z.device.type, enabled=False):
                return vq.decode(z.float(), quantize=True).clamp(-1, 1)

        patch_px, model_path = latent_side * vq.config.downsampling, ckpt
    elif method == "controlnet":
        control, m = _load_controlnet(ckpt, zoomldm_ckpt, dev)
        model_grid, latent_side, patch_px, decode, model_path = (control.config.grid, m.latent_side, m.patch_px,
                                                                  m.decode, ckpt)

        def eps_fn(x, t, hint):
            ctx = null_context(x.shape[0], m.unet.config.context_dim, x)
            return controlled_eps(m.unet, control, x, t, ctx, hint).float()
    else:
        model_grid = None
        patch_px = cfg.dataset.patch_px if config_path else None
    if grid is None:
        grid = model_grid or sc.sr.grid
    elif model_grid is not None and grid != model_grid:
        raise ValueError(f"--grid {grid}: {ckpt} was trained for {model_grid}x super-resolution")
    images = read_lr_images([p for p, _ in todo], patch_px, grid, split=True)
    schedule = Schedule.scaled_linear()
    for p, name in todo:
        start = time.perf_counter()
        lr = from_uint8(images[p], dev)                                              # (1, 3, P, P)
        forwards = 0
        if method == "bicubic":
            image = bicubic_sr(lr, grid)
        else:
            with torch.no_grad(), dn.autocast(dev, precision or sc.precision, "patches"):
                image, forwards = sample_sr_image(eps_fn, decode, lr, grid, latent_side, schedule, steps,
                                                  dn.stream_seed(seed, "sr", name), patch_batch, progress)
        back = downscale(image.float(), grid).clamp(-1, 1)                           # A(SR): (1, 3, P, P)
        mae = float((back - lr).abs().mean()) * 127.5
        record = {"method": method, "lr": str(p), "grid": grid, "seed": seed, "size_px": int(image.shape[-1]),
                  "lr_psnr": psnr(to_uint8(back), to_uint8(lr)), "lr_consistency_mae": mae,
                  "seconds": time.perf_counter() - start, "device": str(dev), "model": model_path,
                  "zoomldm": zoomldm_ckpt, "steps": None if method == "bicubic" else steps,
                  "eta": None if method == "bicubic" else 0.0, "unet_forwards": forwards,
                  "context": "null" if method == "controlnet" else None}
        write_png(Path(out) / f"{name}.png", to_uint8(image))
        write_json(Path(out) / f"{name}.json", record)
        log.info("%s/%s.png (%s): LR consistency MAE %.2f, %.1f s", out, name, method, mae, record["seconds"])


__all__ = ["sr_baseline", "METHODS"]
