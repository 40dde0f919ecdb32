"""Our checkpoint format (safetensors + resolved configs): bitwise round trip, strict loads, clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from zoomldm.cli.main import main
from zoomldm.models.cdm import CDM_PRESETS, ConditionDiT
from zoomldm.models.checkpoint import (
    FORMAT,
    CheckpointFormatError,
    config_from_dict,
    config_to_dict,
    load_component,
    read_checkpoint,
    save_checkpoint,
)
from zoomldm.models.errors import CheckpointKeyError
from zoomldm.models.summarizer import SUMMARIZER_PRESETS, Summarizer
from zoomldm.models.unet import UNET_PRESETS, UNet, UNetConfig
from zoomldm.models.vq import VQ_PRESETS, VQConfig, VQModel
from conftest import one_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def modules() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["small"])
    ema = UNet(UNET_PRESETS["small"])
    with torch.no_grad():  # the small presets zero-init some layers; make every tensor distinct
        for p in [*unet.parameters(), *ema.parameters()]:
            p.add_(torch.randn_like(p), alpha=0.02)
    return {"unet": unet, "unet_ema": ema, "vq": VQModel(VQ_PRESETS["small"]),
            "summarizer": Summarizer(SUMMARIZER_PRESETS["small"])}


@pytest.fixture(scope="module")
def saved(modules, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "zoomldm.safetensors"
    save_checkpoint(path, "zoomldm", modules, extra={"step": 1234, "note": "test", "lr": 2e-5})
    return path


def test_round_trip_is_bitwise_and_configs_round_trip(modules, saved):
    ckpt = read_checkpoint(saved, kind="zoomldm")
    assert ckpt.kind == "zoomldm" and ckpt.extra == {"step": 1234, "note": "test", "lr": 2e-5}
    assert ckpt.components == list(modules)
    for name, module in modules.items():
        assert ckpt.configs[name] == module.config  # dataclass equality: tuples restored from JSON lists
        ref = module.state_dict()
        assert ckpt.state_dicts[name].keys() == ref.keys()
        for k, v in ref.items():
            assert ckpt.state_dicts[name][k].dtype == v.dtype and torch.equal(ckpt.state_dicts[name][k], v), k
        loaded = load_component(ckpt, name)
        assert type(loaded) is type(module) and not loaded.training
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ref.values()))
    assert isinstance(ckpt.configs["unet"].channel_mult, tuple)
    assert not [p for p in saved.parent.iterdir() if p.name != saved.name]  # no temporary file left behind


def test_loaded_module_computes_the_same_output(modules, saved):
    unet = load_component(saved, "unet_ema")
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), torch.randn(2, 65, 128)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx), modules["unet_ema"].eval()(x, t, ctx))


def test_header_is_plain_json(saved):
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        header = json.loads(f.metadata()["zoomldm-bench"])
    assert header["format"] == FORMAT and header["kind"] == "zoomldm"
    assert header["configs"]["unet"]["channel_mult"] == list(UNET_PRESETS["small"].channel_mult)


@pytest.mark.parametrize("cfg", [UNET_PRESETS["paper"], VQ_PRESETS["paper"], SUMMARIZER_PRESETS["paper"],
                                 CDM_PRESETS["small"]])
def test_config_dict_round_trip(cfg):
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(type(cfg), data) == cfg


def test_unknown_config_field_raises():
    with pytest.raises(ValueError, match="unknown field.*'bogus'"):
        config_from_dict(VQConfig, {"ch": 32, "bogus": 1})


def test_bf16_and_cdm_round_trip(tmp_path):
    cdm = ConditionDiT(CDM_PRESETS["small"]).to(torch.bfloat16)
    path = save_checkpoint(tmp_path / "cdm.safetensors", "cdm", {"cdm": cdm})
    ckpt = read_checkpoint(path, kind="cdm")
    assert all(v.dtype == torch.bfloat16 for v in ckpt.state_dicts["cdm"].values())
    loaded = load_component(ckpt, "cdm")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), cdm.state_dict().values()))
    assert not loaded.pos_embed.requires_grad


def test_wrong_kind_is_one_clear_line(tmp_path):
    path = save_checkpoint(tmp_path / "cdm.safetensors", "cdm", {"cdm": ConditionDiT(CDM_PRESETS["small"])})
    with pytest.raises(CheckpointFormatError) as err:
        read_checkpoint(path, kind="zoomldm")
    assert str(err.value) == f"expected a zoomldm checkpoint, got cdm: {path}"


def test_config_of_another_preset_lists_mismatched_keys(saved):
    other = dataclasses.replace(UNET_PRESETS["small"], model_channels=64)
    with pytest.raises(CheckpointKeyError) as err:
        load_component(saved, "unet", config=other)
    assert err.value.mis_shaped and "time_embed.0.weight" in str(err.value)
    with pytest.raises(ValueError, match="needs a UNetConfig"):
        load_component(saved, "unet", config=VQ_PRESETS["small"])
    with pytest.raises(CheckpointFormatError, match="no component 'cdm'"):
        load_component(saved, "cdm")


def test_truncated_safetensors_is_one_line_naming_the_file(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError) as err:
            read_checkpoint(bad)
        assert str(bad) in str(err.value) and one_line(str(err.value))
        result = CliRunner().invoke(main, ["convert", "info", str(bad)])
        assert result.exit_code == 2 and one_line(result.output) and str(bad) in result.output, result.output


def test_foreign_or_missing_file(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointFormatError, match="without a zoomldm-bench header"):
        read_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_checkpoint(tmp_path / "nope.safetensors")


def test_save_rejects_bad_input_and_leaves_no_file(modules, tmp_path):
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "x.safetensors", "zoomldm", {"vq": modules["vq"]}, extra={"t": object()})
    with pytest.raises(ValueError, match="unknown checkpoint component 'decoder'"):
        save_checkpoint(tmp_path / "x.safetensors", "zoomldm", {"decoder": modules["vq"]})
    with pytest.raises(ValueError, match="must be a VQModel"):
        save_checkpoint(tmp_path / "x.safetensors", "zoomldm", {"vq": modules["unet"]})
    assert list(tmp_path.iterdir()) == []


def test_info_command(saved):
    result = CliRunner().invoke(main, ["convert", "info", str(saved)])
    assert result.exit_code == 0, result.output
    assert "kind zoomldm" in result.output and "unet_ema:" in result.output
    assert '"step": 1234' in result.output


def test_unet_config_type_hints_cover_tuples():
    data = config_to_dict(UNetConfig(channel_mult=(1, 2), attention_resolutions=(2,)))
    assert config_from_dict(UNetConfig, data).channel_mult == (1, 2)


def test_same_module_twice_is_saved(modules, tmp_path):
    path = save_checkpoint(tmp_path / "x.safetensors", "vq", {"vq": modules["vq"], "vq_ema": modules["vq"]})
    ckpt = read_checkpoint(path)
    assert all(torch.equal(v, ckpt.state_dicts["vq"][k]) for k, v in ckpt.state_dicts["vq_ema"].items())


def test_foreign_component_reads_but_does_not_build(tmp_path):
    from safetensors.torch import save_file

    header = {"format": FORMAT, "kind": "toy", "configs": {"net": {"width": 4}}, "extra": {}}
    path = tmp_path / "toy.safetensors"
    save_file({"net.w": torch.ones(4)}, str(path), metadata={"zoomldm-bench": json.dumps(header)})
    ckpt = read_checkpoint(path, kind="toy")
    assert ckpt.configs == {"net": {"width": 4}} and torch.equal(ckpt.state_dicts["net"]["w"], torch.ones(4))
    with pytest.raises(ValueError, match="unknown checkpoint component 'net'"):
        load_component(ckpt, "net")


def test_load_vq_from_our_checkpoint_or_refuses_without_vq(modules, saved, tmp_path):
    from zoomldm.models.checkpoint import load_vq
    vq = load_vq(saved)
    for k, v in modules["vq"].state_dict().items():
        assert torch.equal(vq.state_dict()[k], v)
    path = tmp_path / "unet_only.safetensors"
    save_checkpoint(path, "unet", {"unet": modules["unet"]})
    with pytest.raises(CheckpointFormatError, match="no vq component"):
        load_vq(path)
