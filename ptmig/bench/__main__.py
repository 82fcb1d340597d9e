"""`python -m ptmig.bench`: the same as `ptmig bench`, for running the benchmarks directly."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import SECTIONS, main


@click.command()
@click.option("--quick", is_flag=True, help="3 runs per measurement and smaller sizes.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Where to write the results (default bench-results/bench.json; - for "
    "stdout, the tables then go to stderr).",
)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(list(SECTIONS)),
    help="Run only this section (repeatable).",
)
def cli(quick: bool, json_path: Path | None, only: tuple[str, ...]) -> None:
    """Run the ptmig benchmarks and report medians against their goals."""
    sys.exit(main(quick, json_path, list(only) or None))


if __name__ == "__main__":
    cli()
