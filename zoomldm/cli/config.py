"""`zoomldm config`: check a config file, print the resolved config, or print the JSON schema."""
from __future__ import annotations

import click
import yaml

from zoomldm.config import json_schema, load_config, to_dict


@click.group()
def config() -> None:
    """Inspect and validate configs."""


@config.command()
@click.argument("path", type=click.Path(dir_okay=False))
def check(path: str) -> None:
    """Validate PATH and print the resolved config (defaults filled in)."""
    click.echo(yaml.safe_dump(to_dict(load_config(path)), sort_keys=False))


@config.command()
def schema() -> None:
    """Print the JSON schema generated from the config dataclasses (workflow/schemas/config.schema.yaml)."""
    click.echo(yaml.safe_dump(json_schema(), sort_keys=False))
