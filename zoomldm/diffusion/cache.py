"""Feature caching across sampler steps (DeepCache: Ma, Fang & Wang, CVPR 2024, arXiv 2312.00858).

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
"""
from __future__ import annotations

from collections.abc import Callable

import torch

FullFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ShallowFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def feature_cache_model_fn(full_fn: FullFn, shallow_fn: ShallowFn, every: int) -> ModelFn:
    """model_fn(x, t, cond): ``full_fn`` on calls 0, every, 2·every, … (keeping its deep feature), ``shallow_fn``
    on the cached feature otherwise."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"feature cache: every must be an integer ≥ 1, got {every!r}")
    deep: torch.Tensor | None = None
    since_full = 0

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        nonlocal deep, since_full
        if deep is None or since_full + 1 >= every or deep.shape[0] != x.shape[0]:
            eps, deep = full_fn(x, t, cond)
            since_full = 0
            return eps
        since_full += 1
        return shallow_fn(x, t, cond, deep)
    return model_fn


__all__ = ["feature_cache_model_fn"]
