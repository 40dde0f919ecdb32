"""`zoomldm eval`: metrics from sample sets and the store, one small JSON per evaluation (DESIGN.md §7).

Subcommands live in one module each (FID, large images, super-resolution, MIL); this group collects them.
"""
from __future__ import annotations

import click


@click.group("eval")
def eval_group() -> None:
    """Evaluate samples: FID per magnification, CLIP/Crop-FID of large images, SR metrics, MIL."""


def _register() -> None:
    from zoomldm.cli import eval_fid, eval_mil, eval_sr
    for module in (eval_fid, eval_mil, eval_sr):
        for command in module.COMMANDS:
            eval_group.add_command(command)


_register()

__all__ = ["eval_group"]
