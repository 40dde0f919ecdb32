"""Packaging: environment.yml mirrors pyproject's dependencies; the CLI and the workflow entry points exist."""
import tomllib
from pathlib import Path

import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_pins_the_same_packages_as_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(pip) == sorted(deps)


def test_cli_help_lists_the_stages():
    from zoomldm.cli.main import main
    out = CliRunner().invoke(main, ["--help"]).output
    assert "data" in out and "config" in out


def test_cli_reports_user_errors_in_one_line(tmp_path):
    from zoomldm.cli.main import main
    bad = tmp_path / "cfg.yaml"
    bad.write_text("dataset:\n  patch_pxx: 64\n")
    res = CliRunner().invoke(main, ["data", "extract", "--config", str(bad)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "dataset.patch_pxx" in lines[0] and str(bad) in lines[0]
