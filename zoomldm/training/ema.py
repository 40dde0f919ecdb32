"""Exponential moving average of a module's weights, as the official `LitEma` does it.

Official (official-implementation.md §3, `ldm/modules/ema.py::LitEma`): EMA of the trainable parameters,
updated after every optimizer step with the warm-up decay `min(decay, (1 + n) / (10 + n))`, n = number of
updates so far (counting this one), and the update `shadow -= (1 - decay) * (shadow - param)`. The CDM (DiT
recipe, §4) uses a plain constant decay: `warmup=False`.

Here the shadow weights live in a frozen copy of the module (DiT's `ema = deepcopy(model)`), so the EMA model
is a ready-to-use module that the checkpoint writer saves like any other component (`unet_ema`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA of `module`'s parameters that have requires_grad; buffers are copied as they are."""

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay!r}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]

    def current_decay(self) -> float:
        """The decay the next update will use."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step towards `module`'s current weights (call after each optimizer step)."""
        decay = self.current_decay()
        self.num_updates += 1
        src, dst = dict(module.named_parameters()), dict(self.module.named_parameters())
        shadow = [dst[n] for n in self.names]
        params = [src[n].detach().to(dst[n].dtype) for n in self.names]
        diff = torch._foreach_sub(shadow, params)                     # shadow - param
        torch._foreach_sub_(shadow, torch._foreach_mul(diff, 1.0 - decay))
        for b_dst, b_src in zip(self.module.buffers(), module.buffers()):
            b_dst.copy_(b_src)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite `module`'s tracked parameters with the EMA weights (LitEma.copy_to)."""
        src, dst = dict(self.module.named_parameters()), dict(module.named_parameters())
        for n in self.names:
            dst[n].copy_(src[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])
