"""Official ZoomLDM / CompVis checkpoints -> our modules, and back (DESIGN.md §5).

Our modules use the official parameter names, so conversion is config translation, prefix handling and
checks. The four per-module converters (the contract every parity test calls) live beside their modules
and are re-exported here:

    unet_from_official(sd, cfg), vq_from_official(sd, cfg), summarizer_from_official(sd, cfg),
    cdm_from_official(sd, cfg)

Whole checkpoints (reference report §2.3: HF `StonyBrook-CVLab/ZoomLDM`, `brca/weights.ckpt` +
`brca/config.yaml`, a full LatentDiffusion state dict):

    sd = read_official_state_dict("brca/weights.ckpt")
    modules = load_latent_diffusion(sd, "brca/config.yaml", ema=True)   # {"unet", "vq", "summarizer"}
    vq = load_compvis_vq_f4("vq-f4/model.ckpt")                         # CompVis first stage
    init_sd, report = load_compvis_cin256_unet("cin/model.ckpt")        # UNet init (§3), non-strict
    cdm = load_official_cdm("cdm.pt", "DiT-B", ema=True)                # the CDM (§4)

LatentDiffusion layout: UNet under `model.diffusion_model.`, VQ-f4 under `first_stage_model.`, Summarizer
under `cond_stage_model.`, and the EMA UNet (`LitEma`) under `model_ema.` with the name `diffusion_model` +
the UNet parameter name with every dot removed (`model_ema.diffusion_modelinput_blocks00weight`).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import types
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from zoomldm.models.cdm import ConditionDiT, cdm_from_official
from zoomldm.models.checkpoint import CheckpointFormatError
from zoomldm.models.errors import CheckpointKeyError, strip_prefix
from zoomldm.models.summarizer import Summarizer, SummarizerConfig, summarizer_from_official
from zoomldm.models.unet import UNET_PRESETS, UNet, UNetConfig, unet_from_official
from zoomldm.models.vq import VQ_PRESETS, VQConfig, VQModel, vq_from_official

log = logging.getLogger(__name__)

PREFIXES = {"unet": "model.diffusion_model.", "vq": "first_stage_model.", "summarizer": "cond_stage_model."}
EMA_PREFIX = "model_ema.diffusion_model"
# Non-parameter entries of a LatentDiffusion state dict (diffusion schedule buffers, LitEma counters).
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "scale_factor", "model_ema.decay", "model_ema.num_updates",
})
# `--model` names of the official cdm_dit/models.py factories: (depth, hidden_size, num_heads).
DIT_MODELS = {
    "DiT-S": (12, 384, 6), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16), "DiT-XL": (28, 1152, 16),
}  # fmt: skip


# What torch.load raises on truncated or corrupt files (zip, legacy pickle, or garbage).
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                zipfile.BadZipFile, pickle.UnpicklingError)


def ema_key(name: str) -> str:
    """LitEma's buffer name of UNet parameter `name` in a LatentDiffusion checkpoint (dots removed)."""
    return EMA_PREFIX + name.replace(".", "")


def _ema_names(unet: nn.Module) -> dict[str, str]:
    names = {ema_key(k): k for k in unet.state_dict()}
    if len(names) != len(unet.state_dict()):  # cannot happen for the official topology; guard anyway
        raise ValueError("UNet parameter names collide once dots are removed; no LitEma naming exists")
    return names


# --------------------------------------------------------------------------------------------- reading files
def read_official_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """`torch.load` an official checkpoint on the CPU, safely (`weights_only=True`) unless `trust_pickle`.

    A Lightning `.ckpt` may pickle non-tensor objects (hyper-parameters, callbacks); `weights_only` refuses
    those, and only `trust_pickle=True` retries with the full unpickler (classes of modules that are not
    installed, e.g. omegaconf or pytorch_lightning, become inert stand-ins). Errors: one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    mmap = zipfile.is_zipfile(path)  # multi-GB Lightning files: map, do not read twice (zip format only)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DiT checkpoints store their `args`
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise _corrupt(path, e) from None
        if not trust_pickle:
            raise CheckpointFormatError(
                f"{path} holds pickled Python objects{_unsafe_globals(path)} that "
                f"torch.load(weights_only=True) refuses; if you trust the file, pass trust_pickle=True "
                f"(CLI: --trust-pickle)") from None
    except _LOAD_ERRORS as e:
        raise _corrupt(path, e) from None
    log.warning("loading %s with the full pickle unpickler (trust_pickle=True)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=_LENIENT)
    except _LOAD_ERRORS as e:
        raise _corrupt(path, e) from None


def read_official_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The state dict of an official checkpoint: `state_dict` of a Lightning `.ckpt`, or the file itself."""
    obj = read_official_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    return _as_state_dict(obj, path)


def read_official_config(path: str | Path) -> dict[str, Any]:
    """An official YAML config (e.g. `brca/config.yaml`) as a dict; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official config not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(cfg).__name__}")
    return cfg


def _as_state_dict(obj: Any, where: Any) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointFormatError(f"{where}: no state dict found (got {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointFormatError(f"{where}: state dict has non-tensor entries {bad[:10]}")
    return dict(obj)


def _corrupt(path: Path, e: BaseException) -> CheckpointFormatError:
    lines = str(e).strip().splitlines()
    return CheckpointFormatError(f"cannot read {path}: not a complete PyTorch checkpoint (truncated or "
                                 f"corrupt?): {lines[0] if lines else type(e).__name__}")


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # diagnostics only; the caller's message stands without them
        return ""
    return f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""


class _Inert:
    """Stand-in for a pickled class whose module is not installed: keeps the data, runs no code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # not called when unpickled through __new__
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses: SETITEMS
        self.__dict__.setdefault("entries", {})[key] = value

    def append(self, value: Any) -> None:  # list subclasses: APPENDS falls back to this without `extend`
        entries = self.__dict__.setdefault("entries", {})
        entries[len(entries)] = value


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Inert,), {"__module__": module})


_LENIENT = types.ModuleType("zoomldm_lenient_pickle")
_LENIENT.Unpickler = _LenientUnpickler  # type: ignore[attr-defined]
_LENIENT.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------ configs, both ways
def unet_config_to_official(c: UNetConfig) -> dict[str, Any]:
    """`UNetModel` constructor arguments (YAML `unet_config.params`) of a UNetConfig."""
    return {
        "image_size": c.image_size, "in_channels": c.in_channels, "out_channels": c.out_channels,
        "model_channels": c.model_channels, "attention_resolutions": list(c.attention_resolutions),
        "num_res_blocks": c.num_res_blocks, "channel_mult": list(c.channel_mult), "num_heads": c.num_heads,
        "num_head_channels": c.num_head_channels, "use_spatial_transformer": True,
        "transformer_depth": c.transformer_depth, "context_dim": c.context_dim, "dropout": c.dropout,
        "use_checkpoint": c.gradient_checkpointing,
    }  # fmt: skip


def vq_config_to_official(c: VQConfig) -> dict[str, Any]:
    """`VQModelInterface` constructor arguments (YAML `first_stage_config.params`) of a VQConfig."""
    ddconfig = {
        "double_z": False, "z_channels": c.z_channels, "resolution": c.resolution,
        "in_channels": c.in_channels, "out_ch": c.out_channels, "ch": c.ch, "ch_mult": list(c.ch_mult),
        "num_res_blocks": c.num_res_blocks, "attn_resolutions": list(c.attn_resolutions),
        "dropout": c.dropout,
    }  # fmt: skip
    return {"embed_dim": c.embed_dim, "n_embed": c.n_embed, "ddconfig": ddconfig,
            "lossconfig": {"target": "torch.nn.Identity"}}


def to_official_config(unet: UNetConfig, vq: VQConfig, summarizer: SummarizerConfig) -> dict[str, Any]:
    """The model section of an official LatentDiffusion YAML (architecture and schedule, §1 and §3)."""
    params = {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": unet.image_size,
        "channels": unet.in_channels, "conditioning_key": "crossattn", "cond_stage_trainable": True,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": unet_config_to_official(unet)},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                               "params": vq_config_to_official(vq)},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.EmbeddingViT2_5",
                              "params": summarizer.to_official()},
    }  # fmt: skip
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def official_ldm_params(official_yaml: Mapping[str, Any] | str | Path) -> dict[str, dict[str, Any]]:
    """Constructor arguments of the three sub-models of an official LatentDiffusion YAML (dict or path)."""
    cfg = official_yaml if isinstance(official_yaml, Mapping) else read_official_config(official_yaml)
    sections = {"unet": ("unet_config", ("UNetModel",)),
                "vq": ("first_stage_config", ("VQModelInterface", "VQModel")),
                "summarizer": ("cond_stage_config", ("EmbeddingViT2_5",))}
    params = (cfg.get("model") or {}).get("params") if isinstance(cfg.get("model"), Mapping) else None
    if not isinstance(params, Mapping):
        raise ValueError("official config: no model.params section (expected a LatentDiffusion YAML)")
    out = {}
    for name, (section, classes) in sections.items():
        sec = params.get(section)
        if not isinstance(sec, Mapping):
            raise ValueError(f"official config: model.params.{section} is missing")
        target = str(sec.get("target", classes[0]))
        if target.rsplit(".", 1)[-1] not in classes:
            raise ValueError(f"official config: model.params.{section}.target is {target}, "
                             f"expected {' or '.join(classes)}")
        out[name] = dict(sec.get("params") or {})
    return out


# ---------------------------------------------------------------------------- whole LatentDiffusion files
def load_latent_diffusion(state_dict: Mapping[str, Tensor], official_yaml: Mapping[str, Any] | str | Path,
                          ema: bool = False, *, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """`{"unet", "vq", "summarizer"}` from an official LatentDiffusion state dict and its YAML.

    `ema=True` takes the UNet from the `model_ema.` (LitEma) copy; the Summarizer is never EMA'd (§3).
    Every key and shape is checked first: one `CheckpointKeyError` lists all missing, unexpected and
    mis-shaped official names. Schedule buffers and LitEma counters (`IGNORED_KEYS`, `ddim_*`) are ignored.
    """
    p = official_ldm_params(official_yaml)
    cfg_u, cfg_v = UNetConfig.from_official(p["unet"]), VQConfig.from_official(p["vq"])
    cfg_s = SummarizerConfig.from_official(p["summarizer"])
    if cfg_u.context_dim != cfg_s.hidden_dim or cfg_u.in_channels != cfg_v.embed_dim:
        raise ValueError(f"official config: inconsistent sub-models (UNet context_dim {cfg_u.context_dim} vs "
                         f"Summarizer hidden {cfg_s.hidden_dim}; UNet in_channels {cfg_u.in_channels} vs "
                         f"VQ embed_dim {cfg_v.embed_dim})")
    if ema and not any(k.startswith(EMA_PREFIX) for k in state_dict):
        raise ValueError("checkpoint has no EMA weights (model_ema.diffusion_model*); convert without --ema")
    with torch.device("meta"):
        unet_meta = UNet(cfg_u)
        metas = {"vq": VQModel(cfg_v), "summarizer": Summarizer(cfg_s)}
    expected = to_official_state_dict({**metas, ("unet_ema" if ema else "unet"): unet_meta})
    other = PREFIXES["unet"] if ema else "model_ema."  # the UNet copy not asked for: present, unchecked
    given = {k: v for k, v in state_dict.items()
             if k not in IGNORED_KEYS and not k.startswith(("ddim_", other))}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mis_shaped = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in given and tuple(given[k].shape) != tuple(v.shape)]
    if missing or unexpected or mis_shaped:
        raise CheckpointKeyError("official LatentDiffusion checkpoint", missing, unexpected, mis_shaped)
    if "scale_factor" in state_dict and float(state_dict["scale_factor"]) != 1.0:
        log.warning("checkpoint scale_factor is %g; zoomldm uses unscaled VQ latents (reference §1.2)",
                    float(state_dict["scale_factor"]))
    if ema:
        unet_sd = {name: state_dict[key] for key, name in _ema_names(unet_meta).items()}
    else:
        unet_sd = strip_prefix(state_dict, PREFIXES["unet"])
    summarizer = summarizer_from_official(strip_prefix(state_dict, PREFIXES["summarizer"]), p["summarizer"])
    return {
        "unet": unet_from_official(unet_sd, p["unet"], device=device),
        "vq": vq_from_official(state_dict, p["vq"], prefix=PREFIXES["vq"], device=device),
        "summarizer": summarizer.to(device),
    }


def to_official_state_dict(modules: Mapping[str, nn.Module], ema_unet: nn.Module | None = None
                           ) -> dict[str, Tensor]:
    """Official LatentDiffusion names for `{"unet", "vq", "summarizer"}` (any subset); the EMA UNet, given as
    `ema_unet` or a `"unet_ema"` entry, goes under `model_ema.` with LitEma naming. Parameters only: the
    schedule buffers are not exported (the official `init_from_ckpt` loads non-strictly)."""
    out: dict[str, Tensor] = {}
    for name, module in modules.items():
        if name == "unet_ema":
            ema_unet = module if ema_unet is None else ema_unet
        elif name in PREFIXES:
            out.update({PREFIXES[name] + k: v for k, v in module.state_dict().items()})
        else:
            raise ValueError(f"to_official_state_dict: unknown component {name!r}; "
                             f"known: {[*PREFIXES, 'unet_ema']}")
    if ema_unet is not None:
        sd = ema_unet.state_dict()
        out.update({key: sd[name] for key, name in _ema_names(ema_unet).items()})
    return out


# ----------------------------------------------------------------------------------- CompVis releases
def _state_dict_arg(path_or_sd: str | Path | Mapping[str, Tensor], trust_pickle: bool) -> dict[str, Tensor]:
    if isinstance(path_or_sd, Mapping):
        obj = path_or_sd.get("state_dict", path_or_sd)
        return _as_state_dict(obj, "state dict")
    return read_official_state_dict(path_or_sd, trust_pickle=trust_pickle)


def load_compvis_vq_f4(path_or_sd: str | Path | Mapping[str, Tensor],
                       yaml: Mapping[str, Any] | str | Path | None = None, *,
                       device: str | torch.device = "cpu", trust_pickle: bool = False) -> nn.Module:
    """The CompVis `first_stage_models/vq-f4/model.ckpt` as a VQModel (paper preset unless `yaml` is given).

    The training-only `loss.` entries (discriminator, LPIPS) are dropped; a full LatentDiffusion state dict
    also works (its `first_stage_model.` part is used). `yaml`: the CompVis `config.yaml` (dict or path;
    `model.params`), an official LatentDiffusion YAML, or the `VQModelInterface` arguments themselves.
    """
    sd = _state_dict_arg(path_or_sd, trust_pickle)
    if any(k.startswith(PREFIXES["vq"]) for k in sd):
        sd = strip_prefix(sd, PREFIXES["vq"])
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    if yaml is None:
        params = vq_config_to_official(VQ_PRESETS["paper"])
    else:
        cfg = dict(yaml) if isinstance(yaml, Mapping) else read_official_config(yaml)
        params = cfg["model"]["params"] if isinstance(cfg.get("model"), Mapping) else cfg
        params = params.get("first_stage_config", {}).get("params", params)
    return vq_from_official(sd, params, device=device)


@dataclass
class UNetInitReport:
    """What `load_compvis_cin256_unet` took: `taken`/`missing` are our UNet names, `dropped` source keys."""

    taken: list[str]
    missing: list[str]
    dropped: list[str]

    def __str__(self) -> str:
        return (f"UNet init: {len(self.taken)} tensors taken, {len(self.missing)} missing "
                f"{self.missing[:10]}, {len(self.dropped)} source entries dropped")


def load_compvis_cin256_unet(path_or_sd: str | Path | Mapping[str, Tensor],
                             config: UNetConfig | Mapping[str, Any] | None = None, *, ema: bool = False,
                             trust_pickle: bool = False) -> tuple[dict[str, Tensor], UNetInitReport]:
    """UNet initialisation from the CompVis LDM-4 cin256-v2 checkpoint (reference §3): `(state_dict, report)`
    for `unet.load_state_dict(state_dict, strict=False)`.

    cin256-v2 conditions on the class through cross-attention with context_dim 512, like ZoomLDM, so every
    UNet tensor transfers; its class embedder (`cond_stage_model.`, any `label_emb.`) is dropped, as are the
    first stage and schedule buffers. Accepts the full Lightning checkpoint (`model.diffusion_model.`, or
    the LitEma copy with `ema=True`) or a bare UNet state dict (the official `models/ldm_imgnet_unet.ckpt`).
    Mis-shaped or unknown UNet tensors raise `CheckpointKeyError`: they mean a different architecture.
    """
    sd = _state_dict_arg(path_or_sd, trust_pickle)
    cfg = config if isinstance(config, UNetConfig) else (
        UNET_PRESETS["paper"] if config is None else UNetConfig.from_official(config))
    with torch.device("meta"):
        target = UNet(cfg)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    if ema:
        src = {name: sd[key] for key, name in _ema_names(target).items() if key in sd}
        used = {ema_key(k) for k in src}
    else:
        prefix = PREFIXES["unet"] if any(k.startswith(PREFIXES["unet"]) for k in sd) else ""
        src = {k: v for k, v in strip_prefix(sd, prefix).items() if not k.startswith("label_emb.")}
        used = {prefix + k for k in src} if prefix else set(src)
    unexpected = [k for k in src if k not in expected]
    mis_shaped = [(k, tuple(v.shape), expected[k]) for k, v in src.items()
                  if k in expected and tuple(v.shape) != expected[k]]
    if unexpected or mis_shaped:
        raise CheckpointKeyError("CompVis cin256 UNet init", [], unexpected, mis_shaped)
    if not src:
        where = "model_ema." if ema else f"{PREFIXES['unet']} or bare UNet"
        raise ValueError(f"no UNet weights found (no {where} keys)")
    report = UNetInitReport(taken=list(src), missing=[k for k in expected if k not in src],
                            dropped=[k for k in sd if k not in used])
    log.info("%s", report)
    return src, report


# ------------------------------------------------------------------------------------------------- CDM
def load_official_cdm(state_dict_or_path: str | Path | Mapping[str, Any], config: Mapping[str, Any] | str,
                      *, ema: bool = False, trust_pickle: bool = False,
                      device: str | torch.device = "cpu") -> ConditionDiT:
    """The CDM from a `cdm_dit` training checkpoint (`{"model", "ema", "opt", "args"}`; `ema=True` takes
    `ema`) or a bare DiT state dict. `config`: the official DiT arguments (dict or JSON), or a model name
    (`DiT-B`, the paper's, with the paper's 65 tokens x 512 channels and 8 magnifications)."""
    where = "CDM state dict" if isinstance(state_dict_or_path, Mapping) else state_dict_or_path
    obj = state_dict_or_path if isinstance(state_dict_or_path, Mapping) else (
        read_official_checkpoint(state_dict_or_path, trust_pickle=trust_pickle))
    if isinstance(obj, Mapping) and ("model" in obj or "ema" in obj):
        pick = "ema" if ema else "model"
        if pick not in obj:
            raise ValueError(f"{where}: no {pick!r} entry (has {sorted(map(str, obj))})")
        obj = obj[pick]
    elif ema:
        raise ValueError(f"{where}: a bare state dict has no EMA copy; convert without --ema")
    sd = _as_state_dict(obj, where)
    for wrapper in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if all(k.startswith(wrapper) for k in sd):
            sd = strip_prefix(sd, wrapper)
    if isinstance(config, str) and config in DIT_MODELS:
        depth, hidden, heads = DIT_MODELS[config]
        config = {"depth": depth, "hidden_size": hidden, "num_heads": heads}
    return cdm_from_official(sd, config).to(device)


__all__ = [
    "DIT_MODELS", "IGNORED_KEYS", "PREFIXES", "UNetInitReport", "cdm_from_official", "ema_key",
    "load_compvis_cin256_unet", "load_compvis_vq_f4", "load_latent_diffusion", "load_official_cdm",
    "official_ldm_params", "read_official_checkpoint", "read_official_config", "read_official_state_dict",
    "summarizer_from_official", "to_official_config", "to_official_state_dict", "unet_config_to_official",
    "unet_from_official", "vq_config_to_official", "vq_from_official",
]  # fmt: skip
