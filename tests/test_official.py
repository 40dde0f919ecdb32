"""Official checkpoints -> our modules (zoomldm/models/official.py) and `zoomldm convert`.

Every fixture of ../shared/fixtures/official/ is reproduced through official.py; a synthetic LatentDiffusion
checkpoint (the fixtures' state dicts under the official prefixes, an EMA copy with LitEma naming and
different values, schedule buffers) goes through `zoomldm convert official`; the paper presets have exactly
the official full-size key set.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from zoomldm.cli.main import main
from zoomldm.models.cdm import CDM_PRESETS, CDMConfig, ConditionDiT
from zoomldm.models.checkpoint import CheckpointFormatError, load_component, read_checkpoint
from zoomldm.models.errors import CheckpointKeyError
from zoomldm.models.official import (
    DIT_MODELS,
    IGNORED_KEYS,
    cdm_from_official,
    ema_key,
    load_compvis_cin256_unet,
    load_compvis_vq_f4,
    load_latent_diffusion,
    load_official_cdm,
    read_official_state_dict,
    summarizer_from_official,
    to_official_state_dict,
    unet_from_official,
    vq_from_official,
)
from zoomldm.models.summarizer import SUMMARIZER_PRESETS, Summarizer
from zoomldm.models.unet import UNET_PRESETS, UNet, UNetConfig
from zoomldm.models.vq import VQ_PRESETS, VQModel
from conftest import FIXTURES, one_line, rel_err

pytestmark = [pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no official fixtures at {FIXTURES}"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def fx() -> dict[str, dict]:
    out = {n: torch.load(FIXTURES / f"{n}.pt", weights_only=True) for n in ("unet", "vq_f4", "summarizer",
                                                                               "cdm_dit")}
    for d in out.values():
        d["cfg"] = json.loads(d["config"])
    return out


def unet_eps(model: torch.nn.Module, f: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**f["inputs"])


# ------------------------------------------------------------------------------------- fixture parity
def test_every_fixture_through_the_converters(fx):
    f = fx["unet"]
    assert rel_err(unet_eps(unet_from_official(f["state_dict"], f["cfg"]), f), f["outputs"]["eps"]) <= 1e-5

    f = fx["vq_f4"]
    vq = vq_from_official(f["state_dict"], f["cfg"])
    with torch.no_grad():
        latent = vq.encode(f["inputs"]["image"])
        _, codes = vq.quantize(latent)
        dec_q, dec_u = vq.decode(latent), vq.decode(latent, quantize=False)
    assert torch.equal(codes, f["outputs"]["codes"])
    for ours, ref in ((latent, "latent"), (dec_q, "decoded_quantized"), (dec_u, "decoded_unquantized")):
        assert rel_err(ours, f["outputs"][ref]) <= 1e-5, ref

    f = fx["summarizer"]
    inp = f["inputs"]
    with torch.no_grad():
        ctx = summarizer_from_official(f["state_dict"], f["cfg"]).eval()(
            [inp["grid_1"], inp["grid_2"], inp["grid_4"], inp["grid_8"]], inp["mag"])
    assert rel_err(ctx, f["outputs"]["context"]) <= 1e-5

    f = fx["cdm_dit"]
    with torch.no_grad():
        out = cdm_from_official(f["state_dict"], f["cfg"]).eval()(**f["inputs"])
    assert rel_err(out, f["outputs"]["out"]) <= 1e-5


# ------------------------------------------------------------------ a synthetic official LatentDiffusion
def ema_of(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def official_sd(fx) -> dict[str, torch.Tensor]:
    unet = fx["unet"]["state_dict"]
    sd = {"model.diffusion_model." + k: v for k, v in unet.items()}
    sd.update({ema_key(k): v for k, v in ema_of(unet).items()})
    sd.update({"first_stage_model." + k: v for k, v in fx["vq_f4"]["state_dict"].items()})
    sd.update({"cond_stage_model." + k: v for k, v in fx["summarizer"]["state_dict"].items()})
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    sd.update({k: betas.float() for k in IGNORED_KEYS})
    sd.update({"scale_factor": torch.tensor(1.0), "model_ema.decay": torch.tensor(0.9999),
               "model_ema.num_updates": torch.tensor(5000, dtype=torch.int32)})
    return sd


def official_yaml(fx) -> dict:
    vq = {**fx["vq_f4"]["cfg"], "lossconfig": {"target": "torch.nn.Identity"}}
    params = {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "cond_stage_key": "hybrid",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": fx["unet"]["cfg"]},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": vq},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.EmbeddingViT2_5",
                              "params": {**fx["summarizer"]["cfg"], "p_uncond": 0.1}},
    }  # fmt: skip
    return copy.deepcopy({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}})


@pytest.fixture(scope="module")
def official_files(fx, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("official")
    torch.save({"state_dict": official_sd(fx), "epoch": 3, "global_step": 100}, root / "weights.ckpt")
    (root / "config.yaml").write_text(yaml.safe_dump(official_yaml(fx)))
    return root / "weights.ckpt", root / "config.yaml"


def convert(ckpt: Path, config: Path, out: Path, *flags: str):
    return CliRunner().invoke(main, ["convert", "official", "--ckpt", str(ckpt), "--config", str(config),
                                     "--out", str(out), *flags])


def test_convert_official_reproduces_the_fixtures(fx, official_files, tmp_path):
    result = convert(*official_files, tmp_path)
    assert result.exit_code == 0, result.output
    n_unet = sum(v.numel() for v in fx["unet"]["state_dict"].values())
    assert f"unet: {n_unet:,} ({n_unet / 1e6:.1f} M) parameters" in result.output
    assert "summarizer:" in result.output
    ckpt = read_checkpoint(tmp_path / "zoomldm.safetensors", kind="zoomldm")
    assert ckpt.components == ["unet", "vq", "summarizer"] and ckpt.extra["unet_weights"] == "raw"
    assert ckpt.configs["summarizer"].p_uncond == 0.1
    f = fx["unet"]
    assert rel_err(unet_eps(load_component(ckpt, "unet"), f), f["outputs"]["eps"]) <= 1e-5
    with torch.no_grad():
        latent = load_component(ckpt, "vq").encode(fx["vq_f4"]["inputs"]["image"])
    assert rel_err(latent, fx["vq_f4"]["outputs"]["latent"]) <= 1e-5
    s = fx["summarizer"]["inputs"]
    with torch.no_grad():
        grids = [s["grid_1"], s["grid_2"], s["grid_4"], s["grid_8"]]
        ctx = load_component(ckpt, "summarizer")(grids, s["mag"])
    assert rel_err(ctx, fx["summarizer"]["outputs"]["context"]) <= 1e-5


def test_convert_official_ema_takes_the_ema_weights(fx, official_files, tmp_path):
    result = convert(*official_files, tmp_path, "--ema")
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(tmp_path / "zoomldm.safetensors")
    assert ckpt.extra["unet_weights"] == "ema"
    expected = ema_of(fx["unet"]["state_dict"])
    got = ckpt.state_dicts["unet"]
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    ref = unet_eps(unet_from_official(expected, fx["unet"]["cfg"]), fx["unet"])
    assert torch.equal(unet_eps(load_component(ckpt, "unet"), fx["unet"]), ref)
    assert rel_err(ref, fx["unet"]["outputs"]["eps"]) > 1e-3  # really a different set of weights


def test_export_back_to_official_and_reconvert(official_files, tmp_path):
    assert convert(*official_files, tmp_path / "a").exit_code == 0
    ours, off = tmp_path / "a" / "zoomldm.safetensors", tmp_path / "off"
    result = CliRunner().invoke(main, ["convert", "to-official", "--ckpt", str(ours), "--out", str(off)])
    assert result.exit_code == 0, result.output
    assert convert(off / "weights.ckpt", off / "config.yaml", tmp_path / "b").exit_code == 0
    a, b = (read_checkpoint(tmp_path / d / "zoomldm.safetensors") for d in ("a", "b"))
    assert a.configs == b.configs
    for name, sd in a.state_dicts.items():
        assert all(torch.equal(v, b.state_dicts[name][k]) for k, v in sd.items())


def test_paper_presets_have_exactly_the_official_full_size_keys():
    full = json.loads((FIXTURES / "full_size_keys.json").read_text())
    with torch.device("meta"):
        unet = UNet(UNET_PRESETS["paper"])
        modules = {"unet": unet, "vq": VQModel(VQ_PRESETS["paper"]),
                   "summarizer": Summarizer(SUMMARIZER_PRESETS["paper"])}
        cdm = ConditionDiT(CDM_PRESETS["paper"])
    ours = {k: list(v.shape) for k, v in to_official_state_dict(modules, ema_unet=unet).items()}
    assert ours == full["latent_diffusion"]  # 688 UNet + 688 EMA (dots removed) + 205 VQ + 155 Summarizer
    assert {k: list(v.shape) for k, v in cdm.state_dict().items()} == full["cdm_dit_b"]
    d, h, n = DIT_MODELS["DiT-B"]
    assert CDMConfig.from_official({"depth": d, "hidden_size": h, "num_heads": n}) == CDM_PRESETS["paper"]


def test_missing_unexpected_and_misshaped_keys_are_listed(fx, tmp_path):
    sd = official_sd(fx)
    del sd["model.diffusion_model.out.2.bias"]
    sd["model.extra_head.weight"] = torch.zeros(3)
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(CheckpointKeyError) as err:
        load_latent_diffusion(sd, official_yaml(fx))
    e = err.value
    assert e.missing == ["model.diffusion_model.out.2.bias"] and e.unexpected == ["model.extra_head.weight"]
    assert [m[0] for m in e.mis_shaped] == ["first_stage_model.quant_conv.weight"]
    for name in ("out.2.bias", "model.extra_head.weight", "quant_conv.weight: checkpoint (3, 3, 3, 3)"):
        assert name in str(e)
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(official_yaml(fx)))
    result = convert(tmp_path / "bad.ckpt", tmp_path / "config.yaml", tmp_path / "out")
    assert result.exit_code == 2 and one_line(result.output) and "model.extra_head.weight" in result.output
    assert not (tmp_path / "out" / "zoomldm.safetensors").exists()


def test_ema_key_errors(fx):
    sd = official_sd(fx)
    key = ema_key("input_blocks.0.0.weight")
    assert key == "model_ema.diffusion_modelinput_blocks00weight"
    del sd[key]
    with pytest.raises(CheckpointKeyError, match="model_ema.diffusion_modelinput_blocks00weight"):
        load_latent_diffusion(sd, official_yaml(fx), ema=True)
    load_latent_diffusion(sd, official_yaml(fx), ema=False)  # the EMA copy is not needed then
    no_ema = {k: v for k, v in sd.items() if not k.startswith("model_ema.diffusion_model")}
    with pytest.raises(ValueError, match="no EMA weights"):
        load_latent_diffusion(no_ema, official_yaml(fx), ema=True)


def test_config_errors(fx):
    cfg = official_yaml(fx)
    cfg["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.ClassEmbedder"
    with pytest.raises(ValueError, match="cond_stage_config.target is .*ClassEmbedder"):
        load_latent_diffusion(official_sd(fx), cfg)
    cfg = official_yaml(fx)
    cfg["model"]["params"]["unet_config"]["params"]["context_dim"] = 32
    with pytest.raises(ValueError, match="UNet context_dim 32 vs Summarizer hidden 64"):
        load_latent_diffusion(official_sd(fx), cfg)
    with pytest.raises(ValueError, match="no model.params"):
        load_latent_diffusion(official_sd(fx), {"data": {}})


def test_truncated_ckpt_is_one_line_naming_the_file(official_files, tmp_path):
    data = official_files[0].read_bytes()
    for cut in (len(data) // 2, 200, 0):
        bad = tmp_path / f"cut{cut}.ckpt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError) as err:
            read_official_state_dict(bad)
        assert str(bad) in str(err.value) and one_line(str(err.value))
        result = convert(bad, official_files[1], tmp_path / "out")
        assert result.exit_code == 2 and one_line(result.output) and str(bad) in result.output, result.output
    result = convert(tmp_path / "absent.ckpt", official_files[1], tmp_path / "out")
    assert result.exit_code == 2 and one_line(result.output) and "absent.ckpt" in result.output


def test_pickled_objects_need_trust_pickle(fx, tmp_path, monkeypatch):
    # A Lightning-style file whose hyper-parameters are an object of a module that is not installed.
    mod = types.ModuleType("not_installed_omegaconf")

    class DictConfig:
        def __init__(self, content):
            self.content = content

    DictConfig.__module__, DictConfig.__qualname__ = mod.__name__, "DictConfig"
    mod.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": official_sd(fx), "hyper_parameters": DictConfig({"a": 1})}, path)
    monkeypatch.delitem(sys.modules, mod.__name__)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(official_yaml(fx)))
    result = convert(path, tmp_path / "config.yaml", tmp_path / "out")
    assert result.exit_code == 2 and one_line(result.output), result.output
    assert "--trust-pickle" in result.output and str(path) in result.output
    result = convert(path, tmp_path / "config.yaml", tmp_path / "out", "--trust-pickle")
    assert result.exit_code == 0, result.output
    sd = read_checkpoint(tmp_path / "out" / "zoomldm.safetensors").state_dicts["unet"]
    assert torch.equal(sd["out.2.weight"], fx["unet"]["state_dict"]["out.2.weight"])


# ------------------------------------------------------------------------------------ CompVis releases
def test_compvis_vq_f4_drops_loss_keys(fx, tmp_path):
    f = fx["vq_f4"]
    sd = {**f["state_dict"], "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
          "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
          "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": sd, "global_step": 1}, tmp_path / "model.ckpt")
    cfg = {"model": {"base_learning_rate": 4.5e-6, "target": "ldm.models.autoencoder.VQModel",
                     "params": {**f["cfg"], "monitor": "val/rec_loss",
                                "lossconfig": {"target": "taming.modules.losses.vqperceptual.X"}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    vq = load_compvis_vq_f4(tmp_path / "model.ckpt", tmp_path / "config.yaml")
    with torch.no_grad():
        assert rel_err(vq.encode(f["inputs"]["image"]), f["outputs"]["latent"]) <= 1e-5
    with pytest.raises(CheckpointKeyError, match="mis-shaped"):  # no yaml: the paper preset
        load_compvis_vq_f4(sd)


def cin256_sd(fx) -> dict[str, torch.Tensor]:
    unet = fx["unet"]["state_dict"]
    return {**{"model.diffusion_model." + k: v for k, v in unet.items()},
            **{ema_key(k): v for k, v in ema_of(unet).items()},
            "cond_stage_model.embedding.weight": torch.randn(1001, 64),  # the class embedder
            "first_stage_model.quant_conv.weight": torch.randn(3, 3, 1, 1), "betas": torch.ones(1000)}


def test_compvis_cin256_unet_init(fx, tmp_path):
    f = fx["unet"]
    torch.save({"state_dict": cin256_sd(fx)}, tmp_path / "model.ckpt")
    init, report = load_compvis_cin256_unet(tmp_path / "model.ckpt", f["cfg"])
    assert report.missing == [] and "cond_stage_model.embedding.weight" in report.dropped
    assert len(report.taken) == len(f["state_dict"])
    unet = UNet(UNetConfig.from_official(f["cfg"]))
    unet.load_state_dict(init, strict=False)
    assert rel_err(unet_eps(unet.eval(), f), f["outputs"]["eps"]) <= 1e-5
    ema_init, _ = load_compvis_cin256_unet(cin256_sd(fx), f["cfg"], ema=True)
    assert torch.equal(ema_init["out.2.bias"], ema_of(f["state_dict"])["out.2.bias"])
    # A bare UNet state dict (the official models/ldm_imgnet_unet.ckpt) with one tensor absent: reported.
    bare = {k: v for k, v in f["state_dict"].items() if k != "out.2.bias"}
    _, report = load_compvis_cin256_unet(bare, UNetConfig.from_official(f["cfg"]))
    assert report.missing == ["out.2.bias"]
    with pytest.raises(CheckpointKeyError, match="mis-shaped"):  # default: the paper UNet
        load_compvis_cin256_unet(bare)


# ----------------------------------------------------------------------------------------------- CDM
def test_official_cdm_checkpoint(fx, tmp_path):
    f = fx["cdm_dit"]
    ema = ema_of(f["state_dict"])
    torch.save({"model": f["state_dict"], "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-S", epochs=1400)}, tmp_path / "0050000.pt")
    with torch.no_grad():
        out = load_official_cdm(tmp_path / "0050000.pt", f["cfg"])(**f["inputs"])
    assert rel_err(out, f["outputs"]["out"]) <= 1e-5
    (tmp_path / "dit.json").write_text(f["config"])
    result = CliRunner().invoke(main, ["convert", "official-cdm", "--ckpt", str(tmp_path / "0050000.pt"),
                                       "--config", str(tmp_path / "dit.json"), "--out", str(tmp_path),
                                       "--ema"])
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(tmp_path / "cdm.safetensors", kind="cdm")
    assert all(torch.equal(ckpt.state_dicts["cdm"][k], v) for k, v in ema.items())
    ddp = {"module." + k: v for k, v in f["state_dict"].items()}
    assert load_official_cdm(ddp, json.dumps(f["cfg"])).x_embedder.weight.shape == (96, 64)
    with pytest.raises(ValueError, match="no EMA copy"):
        load_official_cdm(ddp, f["cfg"], ema=True)


def test_fetch_official_refuses_without_yes(tmp_path):
    args = ["convert", "fetch-official", "--dataset", "brca", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "brca/weights.ckpt" in result.output and "GB" in result.output and "--yes" in result.output
    assert list(tmp_path.iterdir()) == []


def test_paper_unet_config_round_trips_through_official_names():
    from zoomldm.models.official import unet_config_to_official, vq_config_to_official
    from zoomldm.models.vq import VQConfig

    for preset in ("paper", "small"):
        assert UNetConfig.from_official(unet_config_to_official(UNET_PRESETS[preset])) == UNET_PRESETS[preset]
        assert VQConfig.from_official(vq_config_to_official(VQ_PRESETS[preset])) == VQ_PRESETS[preset]
    ckpt_cfg = dataclasses.replace(UNET_PRESETS["paper"], gradient_checkpointing=True)
    assert unet_config_to_official(ckpt_cfg)["use_checkpoint"] is True
