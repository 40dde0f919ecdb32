"""SR baselines: ControlNet = ZoomLDM exactly at init, gradients only in the ControlNet, LDM-SR's 3 + 3 input
channels and a loss that falls, and `train ldm-sr` / `train controlnet` / `sample sr-baseline` end to end on a
tiny store (one 4 x 8-tile slide, 32-px patches, 8 x 8 latents) with tiny random checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from conftest import one_line, perturb, toy_regions
from zoomldm.cli.main import main
from zoomldm.config import config_from_dict
from zoomldm.data import store as st
from zoomldm.data.regions import pooled_grid
from zoomldm.diffusion.resize import downscale
from zoomldm.models.checkpoint import read_checkpoint, save_checkpoint
from zoomldm.models.sr_baselines import ControlNet, controlled_eps, lr_hint, lr_tiles_of
from zoomldm.models.summarizer import Summarizer, SummarizerConfig
from zoomldm.models.unet import UNet, UNetConfig
from zoomldm.models.vq import VQConfig, VQModel

P, C, ROWS, COLS = 32, 6, 4, 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                           context_dim=32, image_size=P // 4))
    perturb(unet, seed=seed)
    return unet


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("srb")
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(ROWS, COLS, C)).astype(np.float16)
    per_mag = {}
    for name, step in [("20x", 1), ("5x", 4)]:
        m, origins, index = toy_regions("a", name, step, P, ROWS, COLS)
        per_mag[m.slug] = {
            "images": rng.integers(0, 256, size=(len(origins), P, P, 3), dtype=np.uint8),
            "grids": np.stack([pooled_grid(tiles, r, c, m) for r, c in origins]).astype(np.float16),
            "latents": rng.normal(size=(len(origins), 3, P // 4, P // 4)).astype(np.float16),
            "index": index,
        }
    parts = root / "store" / "toy.parts"
    enc = {"name": "fake", "dim": C, "is_standin": True}
    st.write_part(parts / "a", {"slide": "a", "status": "ok", "counts": {}, "encoder": enc}, per_mag, tiles=tiles)
    st.build_store([parts / "a"], root / "store" / "toy", "brca", P, 8, enc)

    torch.manual_seed(0)
    vq = VQModel(VQConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, n_embed=64, resolution=P))
    vq_path = save_checkpoint(root / "vq.safetensors", "vq", {"vq": vq})
    (root / "store" / "toy" / "latents.json").write_text(json.dumps({"vq": str(vq_path)}))
    summ = Summarizer(SummarizerConfig(input_dim=C, hidden_dim=32, mlp_dim=64, depth=1, num_heads=2))
    perturb(summ, seed=0)
    ldm = save_checkpoint(root / "zoomldm.safetensors", "zoomldm",
                          {"unet": _tiny_unet(0), "summarizer": summ, "vq": vq})
    other = save_checkpoint(root / "other.safetensors", "zoomldm",
                            {"unet": _tiny_unet(1), "summarizer": summ, "vq": vq})
    train = {"preset": "small", "batch_size": 2, "max_steps": 2, "checkpoint_every": 2, "log_every": 1,
             "ema_decay": 0.9}
    cfg = {"dataset": {"name": "toy", "store_root": str(root / "store"), "patch_px": P},
           "train": {"ldm_sr": train, "controlnet": train},
           "sample": {"device": "cpu", "seed": 0, "sr": {"grid": 4}, "large": {"patch_batch": 16}}}
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": str(config), "ldm": str(ldm), "other": str(other), "vq": vq,
            "store": root / "store" / "toy", "cfg": config_from_dict(cfg)}


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def ok(res):
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _error_line(res, *needles):
    assert res.exit_code == 2, res.output + repr(res.exception)
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert one_line(err), err
    for n in needles:
        assert n in err, err
    return err


# ---------------------------------------------------------------------------------------------------------
# models and tasks

def test_controlnet_at_init_reproduces_the_frozen_unet_exactly():
    unet = _tiny_unet().eval()
    control = ControlNet.from_unet(unet, grid=4).eval()
    g = torch.Generator().manual_seed(1)
    x, hint = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    ctx, t = torch.randn(3, 5, 32, generator=g), torch.tensor([0, 500, 999])
    with torch.no_grad():
        ref = unet(x, t, ctx)
        assert torch.equal(controlled_eps(unet, control, x, t, ctx, hint), ref)
        # the copy really starts as the frozen encoder, and the residuals really reach the UNet once non-zero
        assert torch.equal(control.input_blocks[1].state_dict()["0.in_layers.2.weight"],
                           unet.input_blocks[1].state_dict()["0.in_layers.2.weight"])
        perturb(control.zero_convs, control.middle_out, control.hint_block, seed=3)
        assert not torch.allclose(controlled_eps(unet, control, x, t, ctx, hint), ref)


def test_lr_tiles_and_hint():
    hr = torch.rand(2, 3, P, P) * 2 - 1
    lr = lr_tiles_of(hr, 4)
    assert lr.shape == (2, 3, 8, 8) and torch.equal(lr, downscale(hr, 4))
    assert lr_hint(lr, 8) is lr                                                  # 4x with VQ-f4: identity
    assert lr_hint(lr_tiles_of(hr, 2), 8).shape == (2, 3, 8, 8)                  # other factors: resized
    with pytest.raises(ValueError, match="divisible"):
        lr_tiles_of(hr, 5)


def test_controlnet_task_trains_only_the_controlnet(env):
    from zoomldm.sampling.denoisers import load_zoomldm
    from zoomldm.training.loop import SampleRNG
    from zoomldm.training.sr_tasks import ControlNetTask
    m = load_zoomldm(env["ldm"])
    task = ControlNetTask(env["store"], env["cfg"].train.controlnet, m.unet, m.summarizer)
    assert task.dataset.sizes == [ROWS * COLS]                                      # base patches only
    batch = task.dataset.__getitems__([0, 5, 9])
    loss = task.loss(batch, SampleRNG([1, 2, 3]))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in [*m.unet.parameters(), *m.summarizer.parameters()])
    control = task.modules["controlnet"]
    assert all(p.grad is not None for p in control.parameters())
    assert control.middle_out.weight.grad.abs().sum() > 0 and control.zero_convs[0].weight.grad.abs().sum() > 0


def test_ldm_sr_has_six_input_channels_and_its_loss_falls(env):
    from zoomldm.training.loop import SampleRNG
    from zoomldm.training.sr_tasks import LDMSRTask
    torch.manual_seed(0)
    task = LDMSRTask(env["store"], env["cfg"].train.ldm_sr)
    model = task.modules["ldm_sr"]
    assert model.unet.config.in_channels == 6 and model.unet.input_blocks[0][0].in_channels == 6
    assert model.config.grid == 4
    batch = task.dataset.__getitems__([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = task.loss(batch, SampleRNG([7, 8, 9, 10]))                    # the same t and noise each step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


# ---------------------------------------------------------------------------------------------------------
# command line

@pytest.fixture(scope="module")
def trained(env):
    root = env["root"]
    ok(cli("train", "ldm-sr", "--config", env["config"], "--out", root / "ldm_sr", "--no-progress",
           "--device", "cpu"))
    ok(cli("train", "controlnet", "--config", env["config"], "--zoomldm", env["ldm"], "--out", root / "cn",
           "--no-progress", "--device", "cpu"))
    ok(cli("sample", "sr-inputs", "--config", env["config"], "--grid", 4, "--n", 2, "--out", root / "pairs"))
    return {"ldm_sr": root / "ldm_sr" / "model.safetensors", "controlnet": root / "cn" / "model.safetensors",
            "pairs": root / "pairs"}


def test_train_commands_write_model_safetensors(env, trained):
    a = read_checkpoint(trained["ldm_sr"])
    assert a.kind == "ldm-sr" and {"ldm_sr", "ldm_sr_ema", "vq"} <= set(a.components)
    assert a.configs["ldm_sr"]["grid"] == 4 and a.configs["ldm_sr"]["unet"]["in_channels"] == 6
    b = read_checkpoint(trained["controlnet"])
    assert b.kind == "controlnet" and {"controlnet", "controlnet_ema"} <= set(b.components)
    assert not any(c.startswith(("unet", "summarizer")) for c in b.components)      # ZoomLDM stays outside


def test_sample_sr_baseline_all_methods(env, trained, tmp_path):
    lrs = sorted(str(p) for p in (trained["pairs"] / "lr").glob("*.png"))
    assert len(lrs) == 2
    runs = {"bicubic": ([], lrs), "ldm_sr": (["--ckpt", trained["ldm_sr"]], lrs[:1]),
            "controlnet": (["--ckpt", trained["controlnet"], "--zoomldm", env["ldm"]], lrs[:1])}
    for method, (extra, inputs) in runs.items():
        out = tmp_path / method
        args = [a for p in inputs for a in ("--lr", p)]
        ok(cli("sample", "sr-baseline", "--method", method, *extra, *args, "--out", out, "--steps", 2,
               "--config", env["config"], "--no-progress"))
        for p in inputs:
            k = p.rsplit("/", 1)[-1][:-4]
            assert Image.open(out / f"{k}.png").size == (4 * P, 4 * P)
            rec = json.loads((out / f"{k}.json").read_text())
            assert rec["method"] == method and rec["seconds"] > 0 and rec["grid"] == 4
            assert np.isfinite(rec["lr_psnr"]) and 0 <= rec["lr_consistency_mae"] < 255
        if method == "bicubic":                       # exactly the Keys bicubic upscaling of the LR image
            from zoomldm.diffusion.resize import upscale
            from zoomldm.sampling.io import from_uint8, read_png, to_uint8
            ref = to_uint8(upscale(from_uint8(read_png(lrs[0])), 4).clamp(-1, 1))[0]
            assert np.array_equal(read_png(out / "0.png"), ref)
        else:
            assert rec["unet_forwards"] == 16 * 2 and rec["steps"] == 2 and rec["eta"] == 0.0
    # a rerun skips finished items
    stamp = (tmp_path / "ldm_sr" / "0.json").stat().st_mtime_ns
    ok(cli("sample", "sr-baseline", "--method", "ldm_sr", "--ckpt", trained["ldm_sr"], "--lr", lrs[0], "--out",
           tmp_path / "ldm_sr", "--config", env["config"], "--no-progress"))
    assert (tmp_path / "ldm_sr" / "0.json").stat().st_mtime_ns == stamp


def test_sample_sr_image_is_patch_batch_independent():
    from zoomldm.diffusion import Schedule
    from zoomldm.models.sr_baselines import sample_sr_image

    def eps_fn(x, t, hint):                          # a toy denoiser that depends on x, t and the hint
        return 0.5 * x + 0.1 * hint + 1e-4 * t[:, None, None, None]

    def decode(z):                                   # latents -> "images" 4x larger
        return torch.nn.functional.interpolate(z, scale_factor=4.0).tanh()
    lr = torch.rand(1, 3, 16, 16) * 2 - 1
    a, n = sample_sr_image(eps_fn, decode, lr, 4, 4, Schedule.scaled_linear(), steps=2, seed=5, patch_batch=16)
    b, _ = sample_sr_image(eps_fn, decode, lr, 4, 4, Schedule.scaled_linear(), steps=2, seed=5, patch_batch=3)
    assert a.shape == (1, 3, 64, 64) and n == 16 * 2
    assert torch.equal(a, b)


def test_sample_sr_baseline_errors_are_one_line(env, trained, tmp_path):
    lr = str(trained["pairs"] / "lr" / "0.png")
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(wrong)
    base = ["sample", "sr-baseline", "--out", tmp_path / "o", "--config", env["config"], "--no-progress"]
    _error_line(cli(*base, "--method", "ldm_sr", "--ckpt", env["ldm"], "--lr", lr), "zoomldm checkpoint")
    _error_line(cli(*base, "--method", "controlnet", "--ckpt", trained["ldm_sr"], "--zoomldm", env["ldm"],
                    "--lr", lr), "ldm-sr checkpoint")
    _error_line(cli(*base, "--method", "ldm_sr", "--ckpt", trained["ldm_sr"], "--lr", wrong), str(wrong), "32x32")
    _error_line(cli(*base, "--method", "bicubic", "--lr", wrong), str(wrong))
    _error_line(cli(*base, "--method", "controlnet", "--ckpt", trained["controlnet"], "--lr", lr), "--zoomldm")
    _error_line(cli(*base, "--method", "controlnet", "--ckpt", trained["controlnet"], "--zoomldm", env["other"],
                    "--lr", lr), "not the ZoomLDM weights")
    _error_line(cli(*base, "--method", "ldm_sr", "--ckpt", trained["ldm_sr"], "--grid", 2, "--lr", lr), "--grid 2")
    _error_line(cli(*base, "--method", "bicubic", "--lr", tmp_path / "nope.png"), "nope.png")
