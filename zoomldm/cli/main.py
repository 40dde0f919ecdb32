"""`zoomldm` command line: one group per stage (data, train, sample, eval, report), each a thin layer."""
from __future__ import annotations

import logging
import os
import sys

import click

# Known user errors print one line, never a traceback from deep inside a library.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError,
                                                 PermissionError, IsADirectoryError)


class CLI(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if os.environ.get("ZOOMLDM_DEBUG"):
                raise
            click.echo(f"zoomldm: error: {_one_line(e)}", err=True)
            sys.exit(2)


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


@click.group(cls=CLI)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """ZoomLDM replication suite. Set ZOOMLDM_DEBUG=1 for full tracebacks."""
    level = logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from zoomldm.cli import config as config_cli
    from zoomldm.cli import convert as convert_cli
    from zoomldm.cli import data as data_cli
    from zoomldm.cli import eval as eval_cli
    from zoomldm.cli import fetch as fetch_cli
    from zoomldm.cli import report as report_cli
    from zoomldm.cli import sample as sample_cli
    from zoomldm.cli import train as train_cli
    main.add_command(config_cli.config)
    main.add_command(convert_cli.convert)
    main.add_command(data_cli.data)
    main.add_command(eval_cli.eval_group)
    main.add_command(fetch_cli.fetch)
    main.add_command(report_cli.report)
    main.add_command(sample_cli.sample)
    main.add_command(train_cli.train)


_register()

if __name__ == "__main__":
    main()
