"""Our checkpoint format: one safetensors file holding every component's weights and resolved config.

    save_checkpoint("run/zoomldm.safetensors", "zoomldm", {"unet": unet, "unet_ema": ema, "vq": vq,
                                                          "summarizer": summarizer}, extra={"step": 1000})
    ckpt = read_checkpoint("run/zoomldm.safetensors", kind="zoomldm")
    unet = load_component(ckpt, "unet_ema", device="cuda")

Layout (DESIGN.md §5: "our own checkpoints are safetensors plus the resolved config"): tensors are named
`<component>.<parameter>` (`unet.`, `unet_ema.`, `summarizer.`, `vq.`, `cdm.`, `cdm_ema.`), and the
safetensors metadata entry `zoomldm-bench` is a JSON document
`{"format": "zoomldm-bench/1", "kind": ..., "configs": {component: {dataclass fields}}, "extra": {...}}`.
A component's module class follows from its name without the `_ema` suffix, so `sample`/`eval` commands need
only the path. Every load is strict, through `check_state_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zoomldm.models.cdm import CDMConfig, ConditionDiT
from zoomldm.models.errors import build_checked
from zoomldm.models.summarizer import Summarizer, SummarizerConfig
from zoomldm.models.unet import UNet, UNetConfig
from zoomldm.models.vq import VQConfig, VQModel

FORMAT = "zoomldm-bench/1"
META_KEY = "zoomldm-bench"  # the safetensors metadata entry holding the JSON header
# Component base name -> (config dataclass, module class). `<base>_ema` components use the same classes.
COMPONENTS: dict[str, tuple[type, type[nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    "summarizer": (SummarizerConfig, Summarizer),
    "vq": (VQConfig, VQModel),
    "cdm": (CDMConfig, ConditionDiT),
}
_KIND = re.compile(r"^[a-z][a-z0-9_-]*$")


class CheckpointFormatError(ValueError):
    """A file that is missing its header, truncated, corrupt, or of another kind than expected (one line)."""


@dataclass
class Checkpoint:
    """One checkpoint file: `configs[name]` is a config dataclass (a plain dict for a component outside
    `COMPONENTS`), `state_dicts[name]` its weights."""

    path: Path
    kind: str
    configs: dict[str, Any]
    state_dicts: dict[str, dict[str, Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return list(self.state_dicts)


def component_classes(name: str) -> tuple[type, type[nn.Module]]:
    """(config class, module class) of a component name such as `unet` or `unet_ema`."""
    base = name.removesuffix("_ema")
    if base not in COMPONENTS:
        raise ValueError(f"unknown checkpoint component {name!r}; known: "
                         f"{sorted(COMPONENTS)} (each optionally with an _ema suffix)")
    return COMPONENTS[base]


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready fields (tuples become lists)."""
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a config dataclass from `config_to_dict` output (lists back to tuples where fields are tuples).

    Fields missing from `data` take the dataclass defaults; unknown fields raise ValueError.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def save_checkpoint(path: str | Path, kind: str, modules: Mapping[str, nn.Module],
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write `modules` (component name -> module with a `.config` dataclass) to one safetensors file.

    The write is atomic (temporary file in the same folder, then `os.replace`), so an interrupted save never
    leaves a half-written checkpoint under `path`. `extra` must be JSON-serialisable (e.g. step, source file).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not _KIND.match(kind):
        raise ValueError(f"checkpoint kind must match {_KIND.pattern}, got {kind!r}")
    if not modules:
        raise ValueError(f"save_checkpoint: no modules to save to {path}")
    configs, tensors, seen = {}, {}, set()
    for name, module in modules.items():
        cfg_cls, mod_cls = component_classes(name)
        if not isinstance(module, mod_cls) or not isinstance(getattr(module, "config", None), cfg_cls):
            raise ValueError(f"component {name!r} must be a {mod_cls.__name__} with a {cfg_cls.__name__} "
                             f"config, got {type(module).__name__}")
        configs[name] = config_to_dict(module.config)
        for key, value in module.state_dict().items():
            value = value.detach().to("cpu").contiguous()
            if value.untyped_storage().data_ptr() in seen:  # safetensors refuses shared memory (tied copies)
                value = value.clone()
            seen.add(value.untyped_storage().data_ptr())
            tensors[f"{name}.{key}"] = value
    header = {"format": FORMAT, "kind": kind, "configs": configs, "extra": dict(extra or {})}
    try:
        meta = json.dumps(header)
    except TypeError as e:
        raise ValueError(f"save_checkpoint: extra is not JSON-serialisable ({e}): {path}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={META_KEY: meta})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path, kind: str | None = None) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (all tensors on the CPU).

    Raises FileNotFoundError for a missing file and `CheckpointFormatError` (one line naming the file) for a
    truncated or corrupt file, a safetensors file without our header, or a `kind` other than the expected one.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError) as e:
        raise CheckpointFormatError(f"cannot read {path}: not a complete safetensors file "
                                    f"(truncated or corrupt?): {_first_line(e)}") from None
    if META_KEY not in meta:
        raise CheckpointFormatError(f"{path} is a safetensors file without a {META_KEY} header "
                                    f"(not written by zoomldm; convert official weights with "
                                    f"`zoomldm convert`)")
    try:
        header = json.loads(meta[META_KEY])
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        found_kind, configs = header["kind"], header["configs"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointFormatError(f"{path}: unreadable {META_KEY} header ({_first_line(e)})") from None
    if kind is not None and found_kind != kind:
        raise CheckpointFormatError(f"expected a {kind} checkpoint, got {found_kind}: {path}")
    state_dicts: dict[str, dict[str, Tensor]] = {name: {} for name in configs}
    for key, value in tensors.items():
        name, _, param = key.partition(".")
        if name not in state_dicts:
            raise CheckpointFormatError(f"{path}: tensor {key!r} belongs to no component of the header "
                                        f"({sorted(configs)})")
        state_dicts[name][param] = value
    parsed = {}
    for name, cfg in configs.items():
        base = name.removesuffix("_ema")
        if base not in COMPONENTS:  # another module family (e.g. a test's toy net): its config stays a dict
            parsed[name] = dict(cfg)
            continue
        try:
            parsed[name] = config_from_dict(COMPONENTS[base][0], cfg)
        except (ValueError, TypeError) as e:
            raise CheckpointFormatError(f"{path}: bad {name} config in header: {_first_line(e)}") from None
    return Checkpoint(path, found_kind, parsed, state_dicts, dict(header.get("extra") or {}))


def load_component(ckpt: Checkpoint | str | Path, name: str, device: str | torch.device = "cpu",
                   config: Any | None = None) -> nn.Module:
    """Rebuild component `name` from its stored config (or from `config`, e.g. the preset a run expects) and
    load its weights strictly. A config that does not fit the weights raises `CheckpointKeyError` listing the
    missing, unexpected and mis-shaped keys. Returned in eval mode."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = read_checkpoint(ckpt)
    if name not in ckpt.state_dicts:
        raise CheckpointFormatError(f"{ckpt.path}: no component {name!r} (it has {ckpt.components})")
    cfg_cls, mod_cls = component_classes(name)
    cfg = ckpt.configs[name] if config is None else config
    if not isinstance(cfg, cfg_cls):
        raise ValueError(f"load_component: {name!r} needs a {cfg_cls.__name__}, got {type(cfg).__name__}")
    # assign=True adopts the checkpoint's tensors (and dtype) instead of allocating and copying; the module
    # therefore shares memory with `ckpt.state_dicts[name]` until it is moved to another device.
    return build_checked(lambda: mod_cls(cfg), ckpt.state_dicts[name], f"{name} in {ckpt.path}", device,
                         assign=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


__all__ = [
    "COMPONENTS",
    "FORMAT",
    "Checkpoint",
    "CheckpointFormatError",
    "component_classes",
    "config_from_dict",
    "config_to_dict",
    "load_component",
    "read_checkpoint",
    "save_checkpoint",
]


def load_vq(path: str | Path, device: str | torch.device = "cpu", trust_pickle: bool = False) -> nn.Module:
    """The VQ-f4 from any file the suite accepts: one of our checkpoints with a `vq` component (`.safetensors`),
    or the CompVis `vq-f4/model.ckpt` (converted on the fly; `trust_pickle` as in `zoomldm convert`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        ckpt = read_checkpoint(path)
        if "vq" not in ckpt.state_dicts:
            raise CheckpointFormatError(f"{path}: no vq component (it has {ckpt.components})")
        return load_component(ckpt, "vq", device=device)
    from zoomldm.models.official import load_compvis_vq_f4
    return load_compvis_vq_f4(path, device=device, trust_pickle=trust_pickle)
