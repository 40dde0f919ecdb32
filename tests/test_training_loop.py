"""The shared training loop (zoomldm/training): resume = uninterrupted run, SIGKILL safety, DDP = one
process, NaN stop, config-mismatch errors, EMA and warm-up closed forms; a toy Task (tests/_train_toy.py)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_toy import ToyConfig, ToyTask, toy_config
from safetensors.torch import load_file

from zoomldm.config import ConfigError
from zoomldm.models.checkpoint import FORMAT, META_KEY
from zoomldm.training import EMA, ResumeError, SampleRNG, distributed, train
from zoomldm.training.loop import local_batches, sample_seeds

SCRIPT = Path(__file__).with_name("_train_toy.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(task, cfg, out, **kw) -> dict:
    return train(task, cfg, out, device="cpu", progress=False, **kw)


def _state(out: Path) -> dict:
    ptr = json.loads((out / "checkpoint.json").read_text())
    return torch.load(out / ptr["state"], weights_only=True)


def _log(out: Path) -> list[dict]:
    with (out / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        _assert_same_tensors(a["state"][i], b["state"][i])


# ---------------------------------------------------------------------------------------------------------
# Resume, determinism, logs.

@pytest.mark.parametrize("per_sample_rng", [True, False])
def test_resume_matches_uninterrupted_run(tmp_path, per_sample_rng):
    cfg = toy_config(max_steps=12, checkpoint_every=4)
    full = _run(ToyTask(per_sample_rng=per_sample_rng), cfg, tmp_path / "full")
    first = _run(ToyTask(per_sample_rng=per_sample_rng), cfg, tmp_path / "split", max_steps=6)
    assert first["steps"] == 6 and not first["complete"]
    assert not (tmp_path / "split" / "final.safetensors").exists()
    # A different initialisation proves the resumed weights come from the checkpoint.
    second = _run(ToyTask(init_seed=1, per_sample_rng=per_sample_rng), cfg, tmp_path / "split")
    assert second["resumed_from"] == 6 and second["steps"] == 12 and second["complete"]

    _assert_same_tensors(load_file(tmp_path / "full" / "final.safetensors"),
                         load_file(tmp_path / "split" / "final.safetensors"))   # weights and EMA, bitwise
    a, b = _state(tmp_path / "full"), _state(tmp_path / "split")
    _assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 12
    assert a["ema_updates"] == b["ema_updates"] == {"net": 12}
    assert torch.equal(a["loss_history"], b["loss_history"])
    assert [r["loss"] for r in _log(tmp_path / "full")] == [r["loss"] for r in _log(tmp_path / "split")]
    assert full["loss_last_10pct"] == second["loss_last_10pct"]
    # Rerunning a finished run does nothing and reports the same summary.
    again = _run(ToyTask(), cfg, tmp_path / "split")
    assert again["steps"] == 12 and again["loss_first_10pct"] == second["loss_first_10pct"]


def test_resume_ignores_what_a_kill_left_behind(tmp_path):
    cfg = toy_config(max_steps=8, checkpoint_every=4)
    _run(ToyTask(), cfg, tmp_path / "ref")
    _run(ToyTask(), cfg, tmp_path, max_steps=4)
    with (tmp_path / "log.csv").open("a") as f:  # a kill after step 6: rows 5, 6 and half a row
        f.write("5,1.0,0.01,1.0,10.0,1.0\n6,1.0,0.01,1.0,10.0,1.0\n7,0.5")
    (tmp_path / "checkpoint-00000008.safetensors").write_bytes(b"half")   # a kill while saving step 8
    (tmp_path / ".train-state-00000008.pt.tmp-99").write_bytes(b"half")
    _run(ToyTask(), cfg, tmp_path)
    _assert_same_tensors(load_file(tmp_path / "final.safetensors"),
                         load_file(tmp_path / "ref" / "final.safetensors"))
    assert not list(tmp_path.glob(".*tmp*"))
    assert [int(r["step"]) for r in _log(tmp_path)] == list(range(1, 9))
    lr = [float(r["lr"]) for r in _log(tmp_path)]
    assert lr == pytest.approx([1e-2 * min(1.0, n / 3) for n in range(1, 9)])  # linear warm-up over 3 updates


def test_checkpoint_layout(tmp_path):
    _run(ToyTask(), toy_config(max_steps=7, checkpoint_every=3), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00000007.safetensors", "checkpoint.json", "final.safetensors", "log.csv", "summary.json",
        "train-state-00000007.pt"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "final.safetensors"), "pt") as f:
        header = json.loads(f.metadata()[META_KEY])
        keys = set(f.keys())
    assert header["format"] == FORMAT and header["kind"] == "toy"
    assert header["configs"]["net"] == header["configs"]["net_ema"] == {"dim": 4, "hidden": 32, "levels": 10}
    assert header["extra"]["step"] == 7 and header["extra"]["ema_modules"] == ["net"]
    assert {"net.inp.weight", "net_ema.inp.weight"} <= keys
    state = _state(tmp_path)
    assert state["train_config"]["max_steps"] == 7 and {"torch", "numpy", "python"} <= state["rng"].keys()


def test_bf16_autocast_and_tensorboard_flag(tmp_path, caplog):
    summary = _run(ToyTask(), toy_config(max_steps=2, precision="bf16"), tmp_path, tensorboard=True)
    assert summary["precision"] == "bf16" and summary["complete"]   # CPU autocast when asked explicitly
    if importlib.util.find_spec("tensorboard"):
        assert (tmp_path / "tensorboard").is_dir()
    else:
        assert "tensorboard` package is not installed" in caplog.text


def test_loss_goes_down(tmp_path):
    cfg = toy_config(max_steps=60, batch_size=8, lr=3e-2, checkpoint_every=100, log_every=10)
    summary = _run(ToyTask(), cfg, tmp_path)
    assert summary["loss_last_10pct"] < 0.6 * summary["loss_first_10pct"]   # 0.51 -> 0.24
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 60


# ---------------------------------------------------------------------------------------------------------
# Bad input.

def test_non_finite_loss_stops_with_the_step_number(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite loss at step 7: nan"):
        _run(ToyTask(nan_at=7), toy_config(max_steps=12, checkpoint_every=5), tmp_path)
    assert _state(tmp_path)["step"] == 5
    assert not list(tmp_path.glob("*00000007*")) and not (tmp_path / "final.safetensors").exists()


def test_checkpoint_of_another_model_gives_one_line(tmp_path):
    _run(ToyTask(ToyConfig(hidden=32)), toy_config(max_steps=4), tmp_path, max_steps=2)
    with pytest.raises(ResumeError) as e:
        _run(ToyTask(ToyConfig(hidden=16)), toy_config(max_steps=4), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint-00000002.safetensors" in msg
    assert "net.hidden is 32 in the checkpoint, 16 now" in msg


def test_global_batch_not_divisible_by_processes(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"train.batch_size.*\(4, the global batch\).*divisible.*\(3\)"):
        distributed.local_batch_size(4, 3)
    fake = distributed.DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"),
                                owns_group=False)
    monkeypatch.setattr(distributed, "setup", lambda device=None: fake)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        _run(ToyTask(), toy_config(batch_size=4), tmp_path)


def test_bad_train_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.checkpoint_every"):
        _run(ToyTask(), toy_config(checkpoint_every=0), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Building blocks: process-count invariance of data and randomness, EMA.

def test_ranks_split_each_global_batch():
    task, cfg = ToyTask(), toy_config(batch_size=6)
    one = [b["index"] for _, b in local_batches(task, cfg, 0, 1, 998, 1003)]   # crosses an epoch boundary
    r0 = [b["index"] for _, b in local_batches(task, cfg, 0, 2, 998, 1003)]
    r1 = [b["index"] for _, b in local_batches(task, cfg, 1, 2, 998, 1003)]
    for full, a, b in zip(one, r0, r1):
        assert torch.equal(full[0::2], a) and torch.equal(full[1::2], b)
    resumed = [b["index"] for _, b in local_batches(task, cfg, 0, 1, 1001, 1003)]
    assert all(torch.equal(x, y) for x, y in zip(one[3:], resumed))
    assert len({tuple(x.tolist()) for x in one}) == 5   # batches differ from step to step


def test_sample_rng_is_per_sample():
    seeds = sample_seeds(0, 5, 6)
    whole = SampleRNG(seeds)
    halves = [SampleRNG(seeds[r::2]) for r in range(2)]
    for draw in (lambda g: g.randint(0, 1000), lambda g: g.randn(3, 2), lambda g: g.rand()):
        full, parts = draw(whole), [draw(h) for h in halves]
        assert torch.equal(full[0::2], parts[0]) and torch.equal(full[1::2], parts[1])
    assert whole.randn((2, 2)).shape == (6, 2, 2) and not torch.equal(whole.randn(4)[0], whole.randn(4)[0])
    assert sample_seeds(0, 5, 6) != sample_seeds(0, 6, 6) != sample_seeds(1, 5, 6)


def test_ema_follows_litema_warmup():
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, decay=0.3)
    with torch.no_grad():
        net.weight.fill_(1.0)
    expected = 0.0
    for n in range(1, 6):
        decay = min(0.3, (1 + n) / (10 + n))   # LitEma: 2/11, 3/12, then capped at 0.3 (4/13 > 0.3)
        ema.update(net)
        expected -= (1 - decay) * (expected - 1.0)
        assert ema.module.weight.item() == pytest.approx(expected, abs=1e-7)
    assert ema.num_updates == 5 and ema.current_decay() == 0.3
    plain = EMA(torch.nn.Linear(1, 1, bias=False).requires_grad_(True), decay=0.9, warmup=False)
    assert plain.current_decay() == 0.9
    restored = EMA(net, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    restored.copy_to(net)
    assert net.weight.item() == pytest.approx(expected) and restored.num_updates == 5


# ---------------------------------------------------------------------------------------------------------
# Multi-process checks (subprocesses; each pays for importing torch).

def _script(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=ENV, capture_output=True,
                         text=True, timeout=180, **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_loses_at_most_one_checkpoint_interval(tmp_path):
    args = ["--steps", "30", "--batch", "4", "--checkpoint-every", "5"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(killed), *args, "--sleep", "0.1"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:   # kill between checkpoints: after step 12, before step 15
            if (killed / "log.csv").is_file() and len(_log(killed)) >= 12:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = int(_log(killed)[-1]["step"])
    saved = json.loads((killed / "checkpoint.json").read_text())["step"]
    assert 12 <= done < 30 and done - saved <= 5

    _script(killed, *args)
    _script(tmp_path / "reference", *args)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] == saved and summary["complete"]
    assert [int(r["step"]) for r in _log(killed)] == list(range(1, 31))
    _assert_same_tensors(load_file(killed / "final.safetensors"),
                         load_file(tmp_path / "reference" / "final.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    args = ["--steps", "8", "--batch", "4", "--checkpoint-every", "4"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT),
                          str(tmp_path / "ddp"), *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _script(tmp_path / "single", *args)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4 and summary["complete"]
    _assert_same_tensors(load_file(tmp_path / "ddp" / "final.safetensors"),
                         load_file(tmp_path / "single" / "final.safetensors"), atol=1e-5)
    loss_ddp = [float(r["loss"]) for r in _log(tmp_path / "ddp")]
    loss_one = [float(r["loss"]) for r in _log(tmp_path / "single")]
    assert loss_ddp == pytest.approx(loss_one, abs=1e-5)
