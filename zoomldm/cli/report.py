"""`zoomldm report`: tables and figures from metric JSON and sample files (DESIGN.md §7), beside the paper.

    zoomldm report tables  --metrics results/metrics --references workflow/references --out results/tables
                           [--table fid_by_magnification ...] [--config CFG | --ladder brca]
    zoomldm report figures --metrics results/metrics --references workflow/references
                           --samples resources/samples/<dataset> --out results/figures
                           [--figure fid|samples|large|sr ...] [--config CFG | --ladder brca]
"""
from __future__ import annotations

import logging

import click

log = logging.getLogger("zoomldm.report")


@click.group()
def report() -> None:
    """Render tables and figures from metric JSON."""


def _ladder(config_path: str | None, ladder: str) -> str:
    if config_path:
        from zoomldm.config import load_config
        return load_config(config_path).dataset.ladder
    return ladder


_common = [
    click.option("--metrics", "metrics_dir", default="results/metrics", show_default=True,
                 type=click.Path(file_okay=False), help="Root of the metric JSON tree."),
    click.option("--references", "references_dir", default="workflow/references", show_default=True,
                 type=click.Path(file_okay=False), help="Folder of the paper's numbers (*.csv)."),
    click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                 help="Workflow config; its dataset.ladder picks the paper values (overrides --ladder)."),
    click.option("--ladder", default="brca", show_default=True, help="Magnification ladder of the metrics."),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@report.command("tables")
@_with_common
@click.option("--out", "out_dir", default="results/tables", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--table", "names", multiple=True,
              type=click.Choice(["fid_by_magnification", "large_images", "super_resolution", "mil"]),
              help="Only these tables (repeatable; default: all four).")
def tables(metrics_dir, references_dir, config_path, ladder, out_dir, names) -> None:
    """Write <out>/<table>.{csv,md,tex} for FID per magnification, large images, super-resolution and MIL."""
    from zoomldm.report.tables import TABLES, write_tables
    paths = write_tables(metrics_dir, references_dir, out_dir, tuple(names) or TABLES,
                         _ladder(config_path, ladder))
    log.info("wrote %s", ", ".join(str(p) for p in paths))


@report.command("figures")
@_with_common
@click.option("--samples", "samples_dir", required=True, type=click.Path(file_okay=False),
              help="Sample root, e.g. resources/samples/<dataset> (patches/, large/, sr/).")
@click.option("--out", "out_dir", default="results/figures", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--figure", "names", multiple=True, type=click.Choice(["fid", "samples", "large", "sr"]),
              help="Only these figures (repeatable; default: all).")
@click.option("--k", default=8, show_default=True,
              help="Samples per row in the sample grids (SR examples: at most 4 rows).")
def figures(metrics_dir, references_dir, config_path, ladder, samples_dir, out_dir, names, k) -> None:
    """Write fid_vs_magnification.png, samples_<mag>.png, large_grid<g>.png, sr_examples.png in --out."""
    from zoomldm.report.figures import FIGURES, write_figures
    paths = write_figures(metrics_dir, references_dir, samples_dir, out_dir, tuple(names) or FIGURES,
                          _ladder(config_path, ladder), k)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
