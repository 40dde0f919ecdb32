"""Per-item random noise: item i's noise depends only on (seed, i) (and the step, for per-step noise).

Results then do not depend on batch size, batch order or worker count (DESIGN §6; the idea of EDM2's
``StackedRandomGenerator``: one generator per sample seed). Each item gets its own CPU ``torch.Generator``
seeded from a SHA-256 hash of a tagged tuple, so the streams for x_T and for each sampler step are
independent and identical on every device; the stacked noise is then moved to the requested device.
Noise is always drawn in float32 and cast, so a float16 run sees the float32 run's noise rounded.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch

from .samplers import NoiseFn


def item_seed(seed: int, index: int, *tags: int | str) -> int:
    """A 63-bit generator seed from (seed, index, *tags), stable across runs, platforms and Pythons."""
    key = "/".join(str(v) for v in ("zoomldm", seed, index, *tags))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2 ** 63 - 1)


def item_generators(seed: int, indices: Iterable[int], *tags: int | str) -> list[torch.Generator]:
    """One CPU generator per item, seeded from ``item_seed(seed, i, *tags)``."""
    return [torch.Generator().manual_seed(item_seed(seed, int(i), *tags)) for i in indices]


def _stacked_randn(gens: list[torch.Generator], shape: Sequence[int], device, dtype) -> torch.Tensor:
    out = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32)
                       for g in gens])  # (N, *shape)
    if device is not None and torch.device(device).type == "cuda":   # no host sync inside the sampling loops:
        return out.pin_memory().to(device=device, dtype=dtype, non_blocking=True)   # pinned, asynchronous
    return out.to(device=device, dtype=dtype)


def randn_items(seed: int, indices: Iterable[int], shape: Sequence[int],
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial noise x_T: (len(indices), *shape), row k drawn from item ``indices[k]``'s own generator."""
    return _stacked_randn(item_generators(seed, indices, "x_T"), shape, device, dtype)


def step_noise_fn(seed: int, indices: Sequence[int], device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> NoiseFn:
    """A ``noise_fn(step_index, shape)`` for stochastic samplers (DDIM η > 0): the noise of item i at step k
    depends only on (seed, i, k). ``shape`` is the batch shape (N, ...); N must equal len(indices).
    dtype None keeps float32."""
    indices = [int(i) for i in indices]

    def noise_fn(step_index: int, shape: Sequence[int]) -> torch.Tensor:
        if shape[0] != len(indices):
            raise ValueError(f"step_noise_fn: batch of {shape[0]} but {len(indices)} item indices")
        gens = [torch.Generator().manual_seed(item_seed(seed, i, "step", step_index)) for i in indices]
        return _stacked_randn(gens, shape[1:], device, dtype or torch.float32)
    return noise_fn
