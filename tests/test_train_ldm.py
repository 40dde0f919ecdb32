"""The real ZoomLDM trainer through the loop: bitwise resume, and torchrun with 2 processes on CPU."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import fake_part
from zoomldm.config import config_from_dict
from zoomldm.data import store as st
from zoomldm.models.checkpoint import read_checkpoint
from zoomldm.training.loop import train
from zoomldm.training.tasks import LDMTask

ROOT = Path(__file__).resolve().parents[1]
P, C = 32, 6


@pytest.fixture
def cfg_file(tmp_path):
    fake_part(tmp_path / "store" / "toy.parts", "a", {"20x": 12, "10x": 6, "5x": 4}, 0, P=P, C=C, latents=True)
    st.build_store([tmp_path / "store" / "toy.parts" / "a"], tmp_path / "store" / "toy", "brca", P, 8,
                   {"name": "fake", "dim": C, "is_standin": True})
    data = {"dataset": {"name": "toy", "store_root": str(tmp_path / "store"), "patch_px": P},
            "train": {"ldm": {"preset": "small", "batch_size": 4, "max_steps": 6, "checkpoint_every": 3,
                              "lr": 1e-4, "warmup_steps": 2, "ema_decay": 0.9, "log_every": 1}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _weights(path):
    return read_checkpoint(path).state_dicts


def test_ldm_resume_is_bitwise(cfg_file, tmp_path):
    cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()))
    store = tmp_path / "store" / "toy"
    torch.manual_seed(0)
    train(LDMTask(store, cfg.train.ldm), cfg.train.ldm, tmp_path / "once", progress=False)
    torch.manual_seed(0)                                   # same init (the CLI seeds it from train.*.seed)
    train(LDMTask(store, cfg.train.ldm), cfg.train.ldm, tmp_path / "twice", max_steps=3, progress=False)
    a = _weights(tmp_path / "once" / "final.safetensors")
    torch.manual_seed(2)                                   # init differs: the resume must restore everything
    train(LDMTask(store, cfg.train.ldm), cfg.train.ldm, tmp_path / "twice", progress=False)
    b = _weights(tmp_path / "twice" / "final.safetensors")
    assert a.keys() == b.keys() and {"unet", "unet_ema", "summarizer"} <= set(a)
    for comp in a:
        for k in a[comp]:
            assert torch.equal(a[comp][k], b[comp][k]), f"{comp}.{k}"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(cfg_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    one = [sys.executable, "-m", "zoomldm", "train", "ldm", "--config", str(cfg_file), "--out",
           str(tmp_path / "one"), "--no-progress", "--device", "cpu"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "zoomldm", "train", "ldm", "--config", str(cfg_file), "--out",
           str(tmp_path / "two"), "--no-progress", "--device", "cpu"]
    for cmd in (one, two):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    a = _weights(tmp_path / "one" / "final.safetensors")
    b = _weights(tmp_path / "two" / "final.safetensors")
    # Float summation order differs between 1 and 2 processes; Adam turns a tiny gradient difference into at
    # most ~lr per step, so the tolerance is meaningful only with a small lr (1e-4 here, 6 steps).
    worst = max(((b[c][k] - a[c][k]).abs().max().item(), f"{c}.{k}") for c in a for k in a[c])
    assert worst[0] < 1e-5, worst


def test_graikos_cli_bundles_the_store_vq(tmp_path):
    import json

    from click.testing import CliRunner

    from zoomldm.cli.main import main
    from zoomldm.models.checkpoint import load_component, save_checkpoint
    from zoomldm.models.vq import VQ_PRESETS, VQModel
    fake_part(tmp_path / "store" / "toy.parts", "a", {"20x": 6}, 0, P=P, C=C, latents=True)
    st.build_store([tmp_path / "store" / "toy.parts" / "a"], tmp_path / "store" / "toy", "brca", P, 8,
                   {"name": "fake", "dim": C, "is_standin": True})
    vq = VQModel(VQ_PRESETS["small"])
    save_checkpoint(tmp_path / "vq.safetensors", "vq", {"vq": vq})
    (tmp_path / "store" / "toy" / "latents.json").write_text(json.dumps({"vq": str(tmp_path / "vq.safetensors")}))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": {"name": "toy", "store_root": str(tmp_path / "store"), "patch_px": P},
                                   "train": {"graikos": {"batch_size": 2, "max_steps": 2, "log_every": 1}}}))
    res = CliRunner().invoke(main, ["train", "graikos", "--config", str(cfg), "--out", str(tmp_path / "g"),
                                    "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    ckpt = read_checkpoint(tmp_path / "g" / "model.safetensors")
    assert {"unet", "embedder", "vq"} <= set(ckpt.state_dicts) and ckpt.kind == "graikos"
    for k, v in load_component(ckpt, "vq").state_dict().items():
        assert torch.equal(v, vq.state_dict()[k])
