"""The one training loop shared by every trainer (LDM, autoencoder, single-scale, Graikos, CDM).

A trainer is a `Task` (modules, dataset, loss); `train(task, cfg, out_dir)` does the rest: AdamW with linear
warm-up (official-implementation.md §3), EMA (`ema.py`, official LitEma), optional gradient clipping, bf16
autocast on CUDA, `torchrun` + DDP (DESIGN.md §8, the DiT pattern), periodic safetensors checkpoints, CSV and
TensorBoard logs, and resume by rerunning the same command in the same folder (EDM2's `load_latest`).

Reproducibility: everything random in step s is a function of (cfg.seed, s), never of state carried over from
step s-1, so a run resumed at step k does at step k exactly what an uninterrupted run does:
- data: the sampler is drawn in fixed epochs of STEPS_PER_EPOCH steps; global batch s is positions
  [s*B, (s+1)*B) of its epoch's stream and process r takes positions r, r+W, ... of it, so the global
  batch does not depend on the number of processes W (the `UniformMagnificationSampler` convention);
- loss randomness (timesteps, noise, condition dropout): the generator passed to `task.loss`, seeded from
  (seed, s, rank). A task that sets `per_sample_rng = True` gets a `SampleRNG` instead, one generator per
  sample seeded from (seed, s, position in the global batch) (EDM2's one generator per seed, for training):
  only then are the draws, and so the weights, independent of W (up to float summation order);
- the global torch/numpy/python RNGs (dropout layers) are reseeded every step from (seed, s, rank).
`cfg.deterministic` turns on `torch.use_deterministic_algorithms(True, warn_only=True)` during `train()` (CPU
only; restored after). It is off by default: on CPU it makes convolution backward about 7x slower (the VQ
autoencoder), and oneDNN's kernels already give bitwise-identical reruns at a fixed thread count (the resume
tests check it). On CUDA it is left alone (cuBLAS would need CUBLAS_WORKSPACE_CONFIG): GPU reruns agree to
tolerance, not bits.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import pickle
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zoomldm.config import ConfigError, TrainConfig
from zoomldm.data.dataset import UniformMagnificationSampler
from zoomldm.models.checkpoint import FORMAT, META_KEY, config_to_dict
from zoomldm.training import distributed
from zoomldm.training.distributed import DistInfo
from zoomldm.training.ema import EMA

logger = logging.getLogger(__name__)

STEPS_PER_EPOCH = 1000  # sampler stream drawn per 1000 steps: fixed, so raising max_steps keeps the stream
_SAMPLE, _GLOBAL, _LOADER, _TASK = 1, 2, 3, 4  # tags that keep the seed streams apart


# ---------------------------------------------------------------------------------------------------------
# What a trainer provides, and the random numbers it gets.

class SampleRNG:
    """Random numbers for one local batch: row i of every draw comes from sample i's own generator.

    `rng.randn(3, 8, 8)` -> (n, 3, 8, 8); `rng.rand()` -> (n,); `rng.randint(0, 1000)` -> (n,) int64.
    Drawn on the CPU (the same on every device), then moved to `device`. Successive calls continue each
    sample's stream.
    """

    def __init__(self, seeds: Sequence[int], device: str | torch.device = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def _draw(self, shape: tuple, dtype: torch.dtype, fill) -> torch.Tensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        out = torch.empty((len(self), *shape), dtype=dtype)
        for row, g in zip(out, self.generators):
            fill(row, g)
        return out.to(self.device)

    def randn(self, *shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._draw(shape, dtype, lambda row, g: row.normal_(generator=g))

    def rand(self, *shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._draw(shape, dtype, lambda row, g: row.uniform_(generator=g))

    def randint(self, low: int, high: int, *shape) -> torch.Tensor:
        return self._draw(shape, torch.int64, lambda row, g: row.random_(low, high, generator=g))


@runtime_checkable
class Task(Protocol):
    """A trainer, as the loop sees it. The loop knows nothing about diffusion.

    Required:
      modules: dict[str, nn.Module]  all weights the checkpoint holds; those with requires_grad are optimised.
                                     Each module's `.config` dataclass is stored and compared on resume.
      dataset: Dataset               items, or whole batches from `__getitems__` (RegionDataset)
      loss(batch, generator)         scalar mean loss over the local batch. ALL its randomness (timesteps,
                                     noise, null dropout) comes from `generator`: a torch.Generator on the
                                     training device seeded from (seed, step, rank), or a SampleRNG if
                                     per_sample_rng.
    Optional [default]:
      per_sample_rng: bool           take a SampleRNG: results independent of the number of processes [False]
      ema_modules: tuple[str, ...]   names in `modules` that get an EMA [()]; ema_warmup: bool [True, LitEma]
      sample_sizes: list[int]        per-magnification sizes for UniformMagnificationSampler [[len(dataset)]]
      make_sampler(num_samples, seed, rank, world_size)   instead of sample_sizes: a sampler with set_epoch(),
                                     deterministic in (seed, epoch); rank r yields positions r::world_size of
                                     one stream that does not depend on world_size
      collate_fn                     DataLoader collate [dataset.collate if it has one, else torch's default]
      kind: str                      checkpoint kind, e.g. "ldm" ["train"]
      to(device)                     move state outside `modules` (a frozen encoder) to the device
      find_unused_parameters: bool   passed to DDP [False]
    """

    modules: dict[str, nn.Module]
    dataset: Dataset

    def loss(self, batch: dict, generator: torch.Generator | SampleRNG) -> torch.Tensor: ...


def _seeds(*words: int, n: int = 1) -> list[int]:
    return [int(s) for s in np.random.SeedSequence(list(words)).generate_state(n, np.uint64)]


def sample_seeds(seed: int, step: int, global_batch: int) -> list[int]:
    """One seed per position of global batch `step` (process r uses positions r::world_size)."""
    return _seeds(seed, step, _SAMPLE, n=global_batch)


def _loss_rng(task: Task, cfg: TrainConfig, step: int, info: DistInfo) -> torch.Generator | SampleRNG:
    if getattr(task, "per_sample_rng", False):
        seeds = sample_seeds(cfg.seed, step, cfg.batch_size)[info.rank::info.world_size]
        return SampleRNG(seeds, info.device)
    return torch.Generator(device=info.device).manual_seed(_seeds(cfg.seed, step, info.rank, _TASK)[0])


def _seed_globals(seed: int, step: int, rank: int) -> None:
    s = _seeds(seed, step, rank, _GLOBAL)[0]
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


# ---------------------------------------------------------------------------------------------------------
# Data: process `rank`'s share of global batch `step`, for any step, with no iterator state to save.

def _make_sampler(task: Task, num_samples: int, seed: int, rank: int, world_size: int):
    if callable(getattr(task, "make_sampler", None)):
        return task.make_sampler(num_samples, seed, rank, world_size)
    sizes = getattr(task, "sample_sizes", None) or [len(task.dataset)]
    return UniformMagnificationSampler(list(sizes), num_samples, seed, rank, world_size)


def local_batches(task: Task, cfg: TrainConfig, rank: int, world_size: int, start: int, stop: int,
                  pin_memory: bool = False):
    """Yield (step, batch) for steps start..stop-1: this process's share of each global batch."""
    local = distributed.local_batch_size(cfg.batch_size, world_size)
    per_epoch = STEPS_PER_EPOCH * local
    sampler = _make_sampler(task, per_epoch, cfg.seed, rank, world_size)
    collate = getattr(task, "collate_fn", None) or getattr(task.dataset, "collate", None)
    step = start
    while step < stop:
        epoch, first = divmod(step, STEPS_PER_EPOCH)
        last = min(stop - epoch * STEPS_PER_EPOCH, STEPS_PER_EPOCH)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        if len(indices) != per_epoch:
            raise ValueError(f"{type(task).__name__}'s sampler yielded {len(indices)} indices, "
                             f"not {per_epoch}")
        worker_seeds = torch.Generator().manual_seed(_seeds(cfg.seed, epoch, rank, _LOADER)[0])
        loader = DataLoader(task.dataset, batch_size=local, sampler=indices[first * local:last * local],
                            collate_fn=collate, num_workers=cfg.num_workers, pin_memory=pin_memory,
                            generator=worker_seeds)
        for batch in loader:
            yield step, batch
            step += 1


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------------------
# Checkpoints. In out_dir:
#   checkpoint-<step>.safetensors  every module's weights and each EMA's (component `<name>_ema`) with the
#                                  module configs, in the zoomldm.models.checkpoint layout (header META_KEY)
#   train-state-<step>.pt          optimizer, scheduler, EMA update counts, RNG states, TrainConfig, losses
#   checkpoint.json                {"step", "weights", "state"}: written last, it always names a complete pair
# Each file is written under a temporary name and renamed. The step is in the names, so a SIGKILL while step
# k+1 is written leaves step k's pair intact and named by checkpoint.json; older pairs are deleted afterwards.

POINTER = "checkpoint.json"
LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s")


class ResumeError(ValueError):
    """out_dir holds a checkpoint this task cannot resume from (one line naming the file)."""


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)`, fsync, rename onto `path`: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _module_configs(modules: dict[str, nn.Module]) -> dict[str, dict]:
    return {name: config_to_dict(m.config) if is_dataclass(getattr(m, "config", None)) else {}
            for name, m in modules.items()}


def write_weights(path: Path, kind: str, modules: dict[str, nn.Module], emas: dict[str, EMA],
                  extra: dict) -> None:
    """One safetensors file: `<name>.<key>` per module, `<name>_ema.<key>` per EMA, configs in the header."""
    from safetensors.torch import save_file

    configs, tensors = _module_configs(modules), {}
    for name, module in [*modules.items(), *((f"{n}_ema", e.module) for n, e in emas.items())]:
        configs.setdefault(name, configs[name.removesuffix("_ema")])
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    header = json.dumps({"format": FORMAT, "kind": kind, "configs": configs, "extra": extra})
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={META_KEY: header}))


def _rng_states() -> dict:
    name, key, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (name, torch.from_numpy(key.astype(np.int64)), *rest), "python": random.getstate()}


def _set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, key, *rest = s["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    random.setstate(s["python"])


def _save(out: Path, step: int, kind: str, modules: dict[str, nn.Module], emas: dict[str, EMA], opt, sched,
          cfg: TrainConfig, history: list[float], elapsed_s: float) -> None:
    weights, state = f"checkpoint-{step:08d}.safetensors", f"train-state-{step:08d}.pt"
    write_weights(out / weights, kind, modules, emas,
                  {"step": step, "ema_modules": list(emas), "preset": cfg.preset})
    blob = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "ema_updates": {n: e.num_updates for n, e in emas.items()}, "rng": _rng_states(),
            "train_config": asdict(cfg), "loss_history": torch.tensor(history, dtype=torch.float64),
            "elapsed_s": elapsed_s}
    atomic_write(out / state, lambda p: torch.save(blob, p))
    pointer = json.dumps({"step": step, "weights": weights, "state": state}) + "\n"
    atomic_write(out / POINTER, lambda p: p.write_text(pointer))
    for p in [*out.glob("checkpoint-*.safetensors"), *out.glob("train-state-*.pt"), *out.glob(".*.tmp-*")]:
        if p.name not in (weights, state):
            p.unlink(missing_ok=True)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _read_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
        return json.loads(meta[META_KEY]), tensors
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ResumeError(f"{path}: not a readable training checkpoint ({_first_line(e)})") from None


def _part(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}


def _first_difference(then: Any, now: Any, key: str = "") -> str | None:
    if isinstance(then, dict) and isinstance(now, dict):
        for k in [*then, *(k for k in now if k not in then)]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in then:
                return f"{sub} is not in the checkpoint"
            if k not in now:
                return f"{sub} is in the checkpoint but not in this run"
            diff = _first_difference(then[k], now[k], sub)
            if diff:
                return diff
        return None
    return None if then == now else f"{key} is {then!r} in the checkpoint, {now!r} now"


def _check_model(path: Path, header: dict, tensors: dict, modules: dict[str, nn.Module], kind: str,
                 cfg: TrainConfig) -> None:
    """One-line ResumeError unless the checkpoint holds the same modules: same configs, then same shapes."""
    extra = header.get("extra") or {}
    if header.get("kind") != kind:
        raise ResumeError(f"{path} is a {header.get('kind')!r} checkpoint, this run trains {kind!r}; "
                          f"use another output directory")
    ema_then = {f"{n}_ema" for n in extra.get("ema_modules", [])}
    then = {k: v for k, v in (header.get("configs") or {}).items() if k not in ema_then}
    diff = _first_difference(then, _module_configs(modules))
    for name, m in modules.items():
        if diff:
            break
        diff = _first_difference({k: tuple(v.shape) for k, v in _part(tensors, name).items()},
                                 {k: tuple(v.shape) for k, v in m.state_dict().items()}, name)
    if diff:
        raise ResumeError(f"{path} was written for a different model ({diff}; train preset "
                          f"{extra.get('preset')!r} then, {cfg.preset!r} now); use another output directory")


def _resume(out: Path, modules: dict[str, nn.Module], emas: dict[str, EMA], opt, sched, cfg: TrainConfig,
            kind: str) -> dict | None:
    """Load the checkpoint named by out/checkpoint.json into everything; None when there is none."""
    pointer = out / POINTER
    if not pointer.is_file():
        return None
    try:
        ptr = json.loads(pointer.read_text())
        step, wpath, spath = int(ptr["step"]), out / ptr["weights"], out / ptr["state"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{pointer}: unreadable checkpoint pointer ({_first_line(e)})") from None
    header, tensors = _read_weights(wpath)
    _check_model(wpath, header, tensors, modules, kind, cfg)
    try:
        state = torch.load(spath, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ResumeError(f"{spath}: unreadable training state ({_first_line(e)})") from None
    if state.get("step") != step:
        raise ResumeError(f"{spath} holds step {state.get('step')} but {pointer} names step {step}")
    ema_then = list((header.get("extra") or {}).get("ema_modules", []))
    if sorted(ema_then) != sorted(emas):
        raise ResumeError(f"{wpath} keeps an EMA of {ema_then}, this run of {list(emas)} (train.ema_decay or "
                          f"the task's ema_modules changed); use another output directory")
    for name, m in modules.items():
        m.load_state_dict(_part(tensors, name))
    for name, e in emas.items():
        e.module.load_state_dict(_part(tensors, f"{name}_ema"))
        e.num_updates = int(state["ema_updates"][name])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_states(state["rng"])  # informational: every step reseeds from (seed, step) anyway
    now, free = asdict(cfg), {"max_steps", "checkpoint_every", "log_every", "num_workers", "precision"}
    changed = [f"{k} {v!r} -> {now.get(k)!r}" for k, v in state["train_config"].items()
               if k not in free and now.get(k) != v]
    if changed:
        logger.warning("resuming %s with changed train settings (%s): the result will differ from an "
                       "uninterrupted run", out, ", ".join(changed))
    return state


class CsvLog:
    """out_dir/log.csv, one row per logged step, flushed at once. On resume the rows after the resumed
    step (written before a kill) and a half-written last row are dropped: it reads as one unbroken run."""

    def __init__(self, path: Path, keep_until: int):
        rows = []
        if path.is_file() and keep_until > 0:
            with path.open(newline="") as f:
                for row in csv.DictReader(f):
                    try:
                        ok = None not in row.values() and "" not in row.values() \
                            and int(row["step"]) <= keep_until
                    except ValueError:
                        ok = False
                    if ok:
                        rows.append({k: row[k] for k in LOG_FIELDS})

        def rewrite(p: Path) -> None:
            with p.open("w", newline="") as f:
                w = csv.DictWriter(f, LOG_FIELDS)
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, rewrite)
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, LOG_FIELDS)

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------------------
# The loop.

class _LossModule(nn.Module):
    """Owns the task's modules for DDP; forward = task.loss (which calls the modules itself)."""

    def __init__(self, task: Task):
        super().__init__()
        self.parts = nn.ModuleDict(task.modules)
        self.loss_fn = task.loss

    def forward(self, batch: dict, rng: torch.Generator | SampleRNG) -> torch.Tensor:
        return self.loss_fn(batch, rng)


def _warmup(step: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up reaching 1 at update `warmup_steps`, then constant. (The official
    LambdaLinearScheduler ramps from 1e-6 at update 0; here update 0 already gets 1/warmup_steps.)"""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def _validate(task: Task, cfg: TrainConfig) -> tuple[str, ...]:
    name = type(task).__name__
    modules = getattr(task, "modules", None)
    if not (isinstance(modules, dict) and modules
            and all(isinstance(m, nn.Module) for m in modules.values())):
        raise TypeError(f"{name}.modules must be a non-empty dict of nn.Module")
    if getattr(task, "dataset", None) is None or not callable(getattr(task, "loss", None)):
        raise TypeError(f"{name} must have a `dataset` and a `loss(batch, generator)` method")
    ema = tuple(getattr(task, "ema_modules", ()))
    if any(n not in modules for n in ema):
        raise ValueError(f"{name}.ema_modules {list(ema)} names modules not in {list(modules)}")
    checks = {"batch_size": cfg.batch_size >= 1, "max_steps": cfg.max_steps >= 1, "lr": cfg.lr > 0,
              "warmup_steps": cfg.warmup_steps >= 0, "checkpoint_every": cfg.checkpoint_every >= 1,
              "log_every": cfg.log_every >= 1, "seed": cfg.seed >= 0, "num_workers": cfg.num_workers >= 0,
              "betas": len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas),
              "ema_decay": cfg.ema_decay is None or 0 <= cfg.ema_decay < 1,
              "grad_clip": cfg.grad_clip is None or cfg.grad_clip > 0}
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"config key 'train.{key}' has an invalid value {getattr(cfg, key)!r}")
    return ema


def train(task: Task, cfg: TrainConfig, out_dir: str | Path, max_steps: int | None = None,
          device: str | torch.device | None = None, *, tensorboard: bool = False,
          progress: bool = True) -> dict:
    """Train `task` to cfg.max_steps steps (or stop at step `max_steps`, a slice), resuming from out_dir if it
    holds a checkpoint. Returns the summary, also written to out_dir/summary.json. Under `torchrun`: DDP."""
    ema_names = _validate(task, cfg)
    info = distributed.setup(device)
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if info.device.type == "cpu" and cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(task, cfg, Path(out_dir), max_steps, info, ema_names, tensorboard, progress)
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
        distributed.teardown(info)


def _train(task: Task, cfg: TrainConfig, out: Path, max_steps: int | None, info: DistInfo,
           ema_names: tuple[str, ...], tensorboard: bool, progress: bool) -> dict:
    t0 = time.perf_counter()
    B, W, device = cfg.batch_size, info.world_size, info.device
    distributed.local_batch_size(B, W)
    stop = cfg.max_steps if max_steps is None else min(max_steps, cfg.max_steps)
    kind = getattr(task, "kind", "train")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()

    for m in task.modules.values():
        m.to(device).train()
    if callable(getattr(task, "to", None)):
        task.to(device)
    params = {id(p): p for m in task.modules.values() for p in m.parameters() if p.requires_grad}
    params = list(params.values())  # each shared parameter once
    if not params:
        raise ValueError(f"{type(task).__name__} has no trainable parameters")
    forward = task.loss
    if W > 1:  # DDP broadcasts rank 0's weights here and averages the gradients in backward()
        forward = DistributedDataParallel(
            _LossModule(task), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(task, "find_unused_parameters", False))
    emas = {} if cfg.ema_decay is None else {
        n: EMA(task.modules[n], cfg.ema_decay, getattr(task, "ema_warmup", True)) for n in ema_names}
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            fused=True if device.type == "cuda" else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup, warmup_steps=cfg.warmup_steps))

    state = _resume(out, task.modules, emas, opt, sched, cfg, kind)
    start = state["step"] if state else 0
    history: list[float] = state["loss_history"].tolist() if state else []
    elapsed0 = float(state["elapsed_s"]) if state else 0.0
    if state and info.is_main:
        logger.info("resuming %s from step %d", out, start)

    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    amp = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_bf16)
    log = CsvLog(out / "log.csv", keep_until=start) if info.is_main else None
    tb = _tensorboard(out) if tensorboard and info.is_main else None
    bar = tqdm(total=stop, initial=min(start, stop), unit="step", desc=out.name,
               disable=not (progress and info.is_main))
    t_loop = t_row = time.perf_counter()
    window, gnorms, done, saved = [], [], start, start
    try:
        for step, batch in local_batches(task, cfg, info.rank, W, start, stop, device.type == "cuda"):
            n = step + 1  # "step n" = the n-th optimizer update; a checkpoint at n holds n updates
            _seed_globals(cfg.seed, step, info.rank)
            with amp():
                loss = forward(_to_device(batch, device), _loss_rng(task, cfg, step, info))
            if loss.ndim:
                raise ValueError(f"{type(task).__name__}.loss returned shape {tuple(loss.shape)}, "
                                 f"not a scalar")
            value = distributed.mean_across_processes(loss.float()).item()
            if not math.isfinite(value):  # before backward: the weights stay those of step n-1
                raise FloatingPointError(f"non-finite loss at step {n}: {value} (last checkpoint: step "
                                         f"{saved} in {out})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            for name, ema in emas.items():
                ema.update(task.modules[name])
            done = n
            history.append(value)
            window.append(value)
            gnorms.append(gnorm.detach())
            bar.update(1)
            if n % cfg.log_every == 0 or n == stop:
                now = time.perf_counter()
                row = {"step": n, "loss": sum(window) / len(window), "lr": lr,
                       "grad_norm": torch.stack(gnorms).float().mean().item(),
                       "samples_per_s": len(window) * B / max(now - t_row, 1e-9),
                       "elapsed_s": elapsed0 + now - t_loop}
                if log:
                    log.write(row)
                if tb:
                    for k in ("loss", "lr", "grad_norm", "samples_per_s"):
                        tb.add_scalar(f"train/{k}", row[k], n)
                bar.set_postfix(loss=f"{row['loss']:.4g}")
                window, gnorms, t_row = [], [], now
            if n % cfg.checkpoint_every == 0 or n == stop:
                if info.is_main:
                    _save(out, n, kind, task.modules, emas, opt, sched, cfg, history,
                          elapsed0 + time.perf_counter() - t_loop)
                distributed.barrier()
                saved = n
    finally:
        bar.close()
        for closable in (log, tb):
            if closable:
                closable.close()

    final = out / "final.safetensors"
    if info.is_main and done >= cfg.max_steps and (done > start or not final.is_file()):
        write_weights(final, kind, task.modules, emas,
                      {"step": done, "ema_modules": list(emas), "train_config": asdict(cfg)})
    summary = _summary(history, done, start, cfg, info, use_bf16, time.perf_counter() - t0,
                       elapsed0 + time.perf_counter() - t_loop)
    if info.is_main:
        atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    distributed.barrier()
    return summary


def _summary(history: list[float], step: int, start: int, cfg: TrainConfig, info: DistInfo, bf16: bool,
             wall_s: float, total_s: float) -> dict:
    k = max(1, len(history) // 10)
    mean = (lambda xs: sum(xs) / len(xs)) if history else (lambda xs: None)
    return {"steps": step, "max_steps": cfg.max_steps, "complete": step >= cfg.max_steps,
            "resumed_from": start, "global_batch": cfg.batch_size, "world_size": info.world_size,
            "device": str(info.device), "precision": "bf16" if bf16 else "fp32",
            "loss_first_10pct": mean(history[:k]), "loss_last_10pct": mean(history[-k:]),
            "wall_s": wall_s, "train_s_total": total_s,
            "samples_per_s": (step - start) * cfg.batch_size / wall_s if step > start else None}


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("TensorBoard logging requested but the `tensorboard` package is not installed; "
                       "logging to log.csv only")
        return None
    return SummaryWriter(str(out / "tensorboard"))
