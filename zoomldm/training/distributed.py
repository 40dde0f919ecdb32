"""torch.distributed plumbing for the training loop: `torchrun` + DDP, the DiT pattern (DESIGN.md §8).

`torchrun --nproc_per_node K ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `setup()`
reads them and joins the process group (NCCL on CUDA, gloo on CPU). A plain `python ...` run is one process
with no process group at all, and every helper below is then a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # setup() created the process group, so teardown() must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick the device (default: this rank's GPU, or CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    owns = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, device, owns)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Per-process batch: the global batch stays fixed whatever the number of processes."""
    if global_batch % world_size:
        raise ValueError(f"config key 'train.batch_size' ({global_batch}, the global batch) must be "
                         f"divisible by the number of processes ({world_size})")
    return global_batch // world_size


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_across_processes(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all processes (a copy; the input is left alone)."""
    x = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x
