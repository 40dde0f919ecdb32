"""A toy `Task` for the training-loop tests, and a command line that trains it (for the multi-process tests).

    python tests/_train_toy.py OUT --steps 30 --batch 4 [--max-steps N] [--checkpoint-every K] [--sleep S]
    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/_train_toy.py OUT ...

The toy is a small MLP regressor on 64 fixed points, with a "timestep" input and an input-noise term drawn
from the loop's generator: the same kinds of random draws as a diffusion loss (randint, randn), in miniature.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable as a script from any directory

from zoomldm.config import TrainConfig  # noqa: E402
from zoomldm.training import SampleRNG, train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    dim: int = 4
    hidden: int = 32
    levels: int = 10  # number of "timesteps", fed through an embedding


class ToyNet(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.dim, config.hidden)
        self.t_embed = nn.Embedding(config.levels, config.hidden)
        self.out = nn.Linear(config.hidden, config.dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.inp(x) + self.t_embed(t)))


class ToyDataset(Dataset):
    """64 fixed points x (two "magnifications" of 32) with targets y = sin(x A)."""

    def __init__(self, dim: int, n: int = 64):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.sin(self.x @ torch.randn(dim, dim, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i}


class ToyTask:
    kind = "toy"
    ema_modules = ("net",)

    def __init__(self, config: ToyConfig = ToyConfig(), init_seed: int = 0, sleep: float = 0.0,
                 nan_at: int | None = None, per_sample_rng: bool = True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.modules = {"net": ToyNet(config)}
        self.dataset = ToyDataset(config.dim)
        self.sample_sizes = [32, 32]
        self.per_sample_rng = per_sample_rng
        self.sleep, self.nan_at, self.calls = sleep, nan_at, 0

    def loss(self, batch: dict, rng: SampleRNG | torch.Generator) -> torch.Tensor:
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        x, y = batch["x"], batch["y"]                                    # (n, dim)
        levels = self.modules["net"].config.levels
        if isinstance(rng, SampleRNG):
            t, noise = rng.randint(0, levels), rng.randn(x.shape[1])     # (n,), (n, dim)
        else:
            t = torch.randint(0, levels, (len(x),), generator=rng, device=rng.device)
            noise = torch.randn(x.shape, generator=rng, device=rng.device)
        x_in = x + 0.1 * noise * (t[:, None] / levels)
        loss = F.mse_loss(self.modules["net"](x_in, t), y)
        return loss * float("nan") if self.calls == self.nan_at else loss


def toy_config(**overrides) -> TrainConfig:
    base = dict(batch_size=4, lr=1e-2, warmup_steps=3, max_steps=12, ema_decay=0.9, checkpoint_every=5,
                log_every=1, seed=0)
    return TrainConfig(**{**base, **overrides})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=12, help="TrainConfig.max_steps")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (a slice)")
    p.add_argument("--batch", type=int, default=4, help="global batch size")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds of sleep per step")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    cfg = toy_config(max_steps=args.steps, batch_size=args.batch, checkpoint_every=args.checkpoint_every)
    train(ToyTask(sleep=args.sleep), cfg, args.out, max_steps=args.max_steps, device="cpu", progress=False)


if __name__ == "__main__":
    main()
