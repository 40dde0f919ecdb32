"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that turns a conditional model into an eps_fn.

Convention used everywhere in zoomldm: the *standard form* with scale s,
    ε̃ = ε_u + s · (ε_c − ε_u),
so s = 1 is the conditional model alone and s = 0 the unconditional one. The official scripts mix two
forms (official-implementation.md §10.6): patch notebooks s = 2; CDM-FID PLMS s = 1.75; the joint
multi-scale and SR samplers write ε̃ = (1 + w) ε_c − w ε_u with w = 2, i.e. s = 1 + w = 3. Convert with
``scale_from_w`` / ``w_from_scale``.

Notation (<code name> -> <name in paper>)
- scale -> s (Ho & Salimans write 1 + w);  eps_c -> ε_θ(x_t, c);  eps_u -> ε_θ(x_t, ∅)
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .samplers import EpsFn

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, cond) -> eps


def scale_from_w(w: float) -> float:
    """Standard-form scale s from the ``(1 + w) ε_c − w ε_u`` convention: s = 1 + w."""
    return 1.0 + w


def w_from_scale(scale: float) -> float:
    """Inverse of ``scale_from_w``: w = s − 1."""
    return scale - 1.0


def cfg_eps_fn(model_fn: ModelFn, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> EpsFn:
    """eps_fn(x_t, t) = ε_u + scale·(ε_c − ε_u), both halves in ONE batched call of ``model_fn``.

    The model sees x, t repeated and conditions stacked as [uncond, cond] along the batch (the order of
    CompVis DDIM/PLMS samplers), so a batch of N costs one forward of 2N. ``uncond=None`` uses the ZoomLDM
    null condition, an all-zero tensor like ``cond`` (official-implementation §10.2). ``scale == 1``
    skips the unconditional half entirely (N-sized call, conditional output unchanged).
    """
    if uncond is None:
        uncond = torch.zeros_like(cond)
    if uncond.shape != cond.shape:
        raise ValueError(f"cfg_eps_fn: uncond shape {tuple(uncond.shape)} != cond shape {tuple(cond.shape)}")

    if scale == 1.0:
        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model_fn(x_t, t, cond)
        return eps_fn

    c_in = torch.cat([uncond, cond])  # (2N, ...)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x_t, x_t])                       # (2N, ...)
        t_in = torch.cat([t, t])                           # (2N,)
        eps_u, eps_c = model_fn(x_in, t_in, c_in).chunk(2)  # (N, ...) each
        return eps_u + scale * (eps_c - eps_u)
    return eps_fn
