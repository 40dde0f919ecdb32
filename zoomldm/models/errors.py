"""Errors shared by the model converters, and the key/shape check behind every official-checkpoint load."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

_SHOWN = 10  # names listed per category in an error message


class CheckpointKeyError(ValueError):
    """A state dict whose keys or shapes do not match the module built from its config.

    Attributes `missing`, `unexpected` and `mis_shaped` hold every offending name (the message lists the first
    ten of each, with counts); `mis_shaped` entries are `(name, checkpoint_shape, model_shape)`.
    """

    def __init__(
        self,
        what: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mis_shaped: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.what = what
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mis_shaped = list(mis_shaped)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected {_listing(self.unexpected)}")
        if self.mis_shaped:
            shown = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mis_shaped]
            parts.append(f"{len(self.mis_shaped)} mis-shaped {_listing(shown)}")
        super().__init__(
            f"{what}: state dict does not match the model built from its config: " + "; ".join(parts)
        )


def _listing(names: Sequence[str]) -> str:
    more = f", ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return "[" + ", ".join(names[:_SHOWN]) + more + "]"


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise `CheckpointKeyError` unless `state_dict` has exactly the keys and shapes of the module's.

    Works on modules built on the meta device (only shapes are compared), so a converter can check a
    checkpoint before allocating the model.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mis_shaped = [(k, given[k], expected[k]) for k in expected if k in given and given[k] != expected[k]]
    if missing or unexpected or mis_shaped:
        raise CheckpointKeyError(what, missing, unexpected, mis_shaped)


def build_checked(build: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], what: str,
                  device: str | torch.device = "cpu", assign: bool = False) -> nn.Module:
    """Build a module on the meta device, check `state_dict` against it (keys and shapes, before allocating
    anything), then load it strictly; eval mode. `assign=False` allocates in the module's own dtype and copies
    (casting, e.g. fp16 official weights to fp32); `assign=True` adopts the tensors as they are."""
    with torch.device("meta"):
        model = build()
    check_state_dict(model, state_dict, what)
    if assign:
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.to(device).eval()
    model = model.to_empty(device=device)  # every tensor is then overwritten by the strict load
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state_dict` under `prefix` (e.g. `model.diffusion_model.`), with the prefix removed."""
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
