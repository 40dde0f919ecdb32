"""Feature caching across sampler steps (DeepCache: Ma, Fang & Wang, CVPR 2024, arXiv 2312.00858), with an
optional first-order forecast of the cached feature (TaylorSeer: Liu et al., ICCV 2025, arXiv 2503.06923).

A UNet's deep features change little between adjacent denoising steps. ``feature_cache_model_fn`` turns a pair
of networks into one ``model_fn(x_t, t, cond) -> eps`` for the samplers and guidance wrappers:

- ``full_fn(x, t, cond) -> (eps, deep)``: the whole network, and the deep feature the shallow branch needs;
- ``shallow_fn(x, t, cond, deep) -> eps``: only the shallow branch, on a cached ``deep``.

Every ``every``-th call is a full one (the first call always is) and refreshes the cache; the calls in between
run the shallow branch (DeepCache's uniform 1:N strategy). ``every = 1`` is the network itself. The closure
counts its calls, so it belongs to one sampling run: build a new one per batch. A call whose batch does not fit
the cached feature (another batch size) is a full one. Classifier-free guidance passes both halves through one
call (``cfg_eps_fn``), so both halves share the schedule. The schedule counts evaluations, not sampler steps (it
sees no step index and reads no timestep, which would cost a device sync): under PLMS, whose first step evaluates
twice, the evaluation at the second timestep's x̃ is shallow and that step's own evaluation full, and the pattern
is shifted by one from there on; the demo's quality numbers were measured so (bench/RESULTS.md).

``forecast=True`` replaces reuse by extrapolation: a shallow call at timestep t gets
``deep₁ + (deep₁ − deep₀)·(t − t₁)/(t₁ − t₀)``, the line through the deep features of the last two full calls
(timesteps t₁, t₀), per item; before the second full call, or where t₁ = t₀ (PLMS's double evaluation), it is
plain reuse. It costs one more cached feature and one elementwise op per shallow call, reads the timesteps on the
device (no sync), and on the demo model cut the cached images' distance to the reference's by 35–50% at the same
FLOPs (bench/RESULTS.md, "ninth session").
"""
from __future__ import annotations

from collections.abc import Callable

import torch

FullFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ShallowFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def extrapolate(deep1: torch.Tensor, t1: torch.Tensor, deep0: torch.Tensor, t0: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
    """The line through (t₀, deep₀) and (t₁, deep₁) at t, per item (timesteps of shape (B,)); deep₁ where
    t₁ = t₀."""
    dt = (t1 - t0).float()
    ratio = torch.where(dt != 0, (t - t1).float() / torch.where(dt != 0, dt, torch.ones_like(dt)), 0.0)
    ratio = ratio.to(deep1.dtype).view(-1, *([1] * (deep1.ndim - 1)))
    return deep1 + (deep1 - deep0) * ratio


def feature_cache_model_fn(full_fn: FullFn, shallow_fn: ShallowFn, every: int, forecast: bool = False) -> ModelFn:
    """model_fn(x, t, cond): ``full_fn`` on calls 0, every, 2·every, … (keeping its deep feature), ``shallow_fn``
    on the cached feature otherwise (with ``forecast``: on its extrapolation from the last two full calls)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"feature cache: every must be an integer ≥ 1, got {every!r}")
    deep: torch.Tensor | None = None
    t_deep: torch.Tensor | None = None
    prev: tuple[torch.Tensor, torch.Tensor] | None = None    # (deep, t) of the full call before, for `forecast`
    since_full = 0

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        nonlocal deep, t_deep, prev, since_full
        if deep is None or since_full + 1 >= every or deep.shape[0] != x.shape[0]:
            eps, new = full_fn(x, t, cond)
            prev = (deep, t_deep) if forecast and deep is not None and deep.shape == new.shape else None
            deep, t_deep = new, t
            since_full = 0
            return eps
        since_full += 1
        if prev is None:
            return shallow_fn(x, t, cond, deep)
        return shallow_fn(x, t, cond, extrapolate(deep, t_deep, prev[0], prev[1], t))
    return model_fn


__all__ = ["extrapolate", "feature_cache_model_fn"]
