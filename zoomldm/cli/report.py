"""Placeholder: filled in by its owner."""
import click


@click.group()
def report() -> None:
    """Render tables and figures from metric JSON."""
