"""Config: typed loading with one-line errors, and the committed schema generated from the dataclasses."""
from pathlib import Path

import pytest
import yaml

from zoomldm.config import ConfigError, config_from_dict, json_schema, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo", "demo_satellite", "brca", "naip"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "workflow/configs" / f"{name}.yaml")
    assert cfg.dataset.magnification_list()


@pytest.mark.parametrize("data, key", [
    ({"dataset": {"patchpx": 64}}, "dataset.patchpx"),            # unknown key, with a suggestion
    ({"datset": {}}, "datset"),                                   # unknown section
    ({"dataset": {"patch_px": "64"}}, "dataset.patch_px"),        # wrong type
    ({"dataset": {"patch_px": True}}, "dataset.patch_px"),        # bool is not an int
    ({"dataset": {"ladder": "imagenet"}}, "dataset.ladder"),      # not in the enum
    ({"dataset": {"magnifications": ["3x"]}}, "dataset.magnifications"),
    ({"dataset": {"stride_fraction_by_mag": {"20x": 0}}}, "dataset.stride_fraction_by_mag.20x"),
    ({"encoder": {"name": "resnet"}}, "encoder.name"),
    ({"sample": {"large": {"cut": {"decode_every": 0}}}}, "sample.large.cut.decode_every"),
    ({"sample": {"compile": "unet"}}, "sample.compile"),
    ({"sample": {"compile": 1}}, "sample.compile"),
    ({"sample": {"patches": {"cache_every": 0}}}, "sample.patches.cache_every"),
    ({"sample": {"patches": {"cache_branch": -1}}}, "sample.patches.cache_branch"),
])
def test_bad_config_names_the_key_in_one_line(data, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    msg = str(e.value)
    assert f"'{key}'" in msg and "\n" not in msg


def test_sample_compile_takes_a_bool_or_vq():
    for value in (False, True, "vq"):
        assert config_from_dict({"sample": {"compile": value}}).sample.compile == value


def test_suggests_close_key():
    with pytest.raises(ConfigError, match="did you mean 'patch_px'"):
        config_from_dict({"dataset": {"patchpx": 64}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_float_accepts_int_and_defaults_fill_in():
    cfg = config_from_dict({"dataset": {"base_mag": 40}})
    assert cfg.dataset.base_mag == 40.0 and isinstance(cfg.dataset.base_mag, float)
    assert cfg.encoder.name == "effnet-lite0"


def test_committed_schema_is_generated_from_dataclasses():
    committed = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    assert committed == json_schema(), "run: zoomldm config schema > workflow/schemas/config.schema.yaml"


def test_schema_rejects_what_the_loader_rejects():
    import jsonschema
    schema = json_schema()
    jsonschema.validate({"dataset": {"patch_px": 64}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"dataset": {"patchpx": 64}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"dataset": {"patch_px": "64"}}, schema)
