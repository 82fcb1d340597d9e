"""The `ptmig` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import __version__


def _unix_path(spec: str | None, what: str) -> str | None:
    if spec is None:
        return None
    if not spec.startswith("unix:") or len(spec) <= 5:
        raise click.BadParameter(f"{what} must look like unix:PATH, got {spec!r}")
    return spec[5:]


@click.group()
@click.version_option(__version__, prog_name="ptmig")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """ptmig: live migration of KVM guests with passthrough DMA devices."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--qmp", "qmp_spec", metavar="unix:PATH", help="QMP control socket.")
@click.option("--console", "console_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the guest console to FILE instead of stdout.")
@click.option("--incoming", metavar="tcp:HOST:PORT",
              help="Wait for an incoming migration instead of booting.")
@click.option("--psk-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pre-shared key the migration source must prove it knows.")
@click.option("--insecure", is_flag=True,
              help="Allow an unauthenticated incoming listener on a non-loopback address.")
def run(config: Path, qmp_spec: str | None, console_file: Path | None, incoming: str | None,
        psk_file: Path | None, insecure: bool) -> None:
    """Run the VM described by CONFIG until the guest exits or `quit`.

    The exit status is the guest's exit code.
    """
    from .config import ConfigError, load_config
    from .devices.handle import DeviceError
    from .firmware import FirmwareBuildError
    from .kvm import KvmUnavailable
    from .machine import Machine

    try:
        cfg = load_config(config)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    qmp_path = _unix_path(qmp_spec, "--qmp")
    console = open(console_file, "a", buffering=1) if console_file else sys.stdout
    try:
        machine = Machine(cfg, console=console, qmp_path=qmp_path, psk_file=psk_file,
                          insecure=insecure)
    except KvmUnavailable as e:
        raise click.ClickException(str(e)) from None
    try:
        machine.start_qmp()
        if incoming is not None:
            from .migration.destination import run_incoming

            code = run_incoming(machine, incoming)
        else:
            try:
                machine.boot()
            except (FirmwareBuildError, DeviceError) as e:
                raise click.ClickException(str(e)) from None
            code = machine.run()
    finally:
        machine.close()
    sys.exit(code)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def load(args: tuple[str, ...]) -> None:
    """Drive the guest's kv service and verify every acknowledged value (see --help)."""
    from .load import main as load_main

    sys.exit(load_main(list(args)))


@main.command()
@click.option("--listen", required=True, metavar="HOST:PORT", help="UDP address to serve on.")
@click.option("--age", default=300.0, show_default=True, help="Seconds before a MAC is forgotten.")
def switch(listen: str, age: float) -> None:
    """A learning L2 switch carrying Ethernet frames in UDP datagrams."""
    from .net.switch import switch_main

    sys.exit(switch_main(listen, age_s=age))


@main.command()
@click.option("--quick", is_flag=True, help="A smaller version that fits a few minutes.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the results (default bench-results/bench.json).")
@click.option("--only", multiple=True, help="Run only these sections (repeatable).")
def bench(quick: bool, json_path: Path | None, only: tuple[str, ...]) -> None:
    """Run the benchmarks: tables on stdout, one JSON file."""
    from .bench import main as bench_main

    sys.exit(bench_main(quick, json_path, list(only) or None))


if __name__ == "__main__":
    main()
