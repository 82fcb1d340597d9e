"""The `ptmig` command line: one click group, a subcommand per tool.

Every subcommand follows `cliconv`'s conventions: the exit statuses in its table (usage errors
are click's 2), errors on stderr, `--json FILE` or `--json -` (stdout), QEMU's parameter names
and units where QEMU has them (`--downtime-limit` in ms, `--max-bandwidth` in bytes/s with
K/M/G suffixes). Heavy modules are imported inside the commands, not at start-up.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .cliconv import EXIT_STATUS_TEXT, VMM_FAILED, json_to_stdout, parse_bandwidth
from .migration.params import DMA_TRACKING


def _unix_path(spec: str | None, what: str) -> str | None:
    if spec is None:
        return None
    if not spec.startswith("unix:") or len(spec) <= 5:
        raise click.BadParameter(f"{what} must look like unix:PATH, got {spec!r}")
    return spec[5:]


class VmmCommand(click.Command):
    """`ptmig run` exits with the guest's code, so its own failures -- usage errors, a bad
    config, no KVM, a crash -- exit with VMM_FAILED (125), never a code the guest could give."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as e:
            e.exit_code = VMM_FAILED
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            e.exit_code = VMM_FAILED
            raise
        except (click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception:
            traceback.print_exc()
            print("ptmig run: internal error (above); exit status 125", file=sys.stderr)
            sys.exit(VMM_FAILED)


class Bandwidth(click.ParamType):
    """A click type for `cliconv.parse_bandwidth`."""

    name = "BYTES/S"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_bandwidth(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


JSON_TYPE = click.Path(dir_okay=False, allow_dash=True, path_type=Path)


def json_option(what: str, human: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--json FILE` (into the command's `json_path`): write `what` to FILE, or to stdout with
    `-`, in which case `human` (the command's human-readable output) goes to stderr."""
    return click.option(
        "--json",
        "json_path",
        type=JSON_TYPE,
        metavar="FILE",
        help=f"Write {what} to FILE (- for stdout, sending {human} to stderr).",
    )


def migration_options(
    *, tracking: str | None, downtime_ms: int | None, bandwidth: str | None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The migration parameters `migrate` and `demo` both take, under QEMU's names
    (x-dma-tracking, downtime-limit, max-bandwidth); each command gives its defaults (None:
    leave the VMM's own)."""
    options = [
        click.option(
            "--dma-tracking",
            type=click.Choice(DMA_TRACKING),
            default=tracking,
            show_default=tracking is not None,
            help="How device DMA writes are tracked (x-dma-tracking); `none` shows what goes "
            "wrong without.",
        ),
        click.option(
            "--downtime-limit",
            type=click.IntRange(min=1),
            default=downtime_ms,
            show_default=downtime_ms is not None,
            metavar="MS",
            help="Maximum downtime in ms (QEMU's downtime-limit).",
        ),
        click.option(
            "--max-bandwidth",
            type=Bandwidth(),
            default=bandwidth,
            show_default=bandwidth is not None,
            help="Migration bandwidth in bytes/s, K/M/G suffixes (100M), 0 unlimited "
            "(max-bandwidth).",
        ),
    ]

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@click.group(epilog=EXIT_STATUS_TEXT)
@click.version_option(__version__, prog_name="ptmig")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """ptmig: live migration of KVM guests with passthrough DMA devices."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command(cls=VmmCommand)
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--qmp", "qmp_spec", metavar="unix:PATH", help="QMP control socket.")
@click.option(
    "--console",
    "console_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the guest console to FILE instead of stdout.",
)
@click.option(
    "--incoming",
    metavar="tcp:HOST:PORT|unix:PATH",
    help="Wait for an incoming migration instead of booting.",
)
@click.option(
    "--psk-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Pre-shared key the migration source must prove it knows.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow unauthenticated migrations (in and out), loopback included: anyone "
    "who reaches the port can feed or read the migration.",
)
@click.option(
    "--prefault/--no-prefault",
    default=True,
    show_default=True,
    help="With --incoming: allocate and map all guest RAM before accepting "
    "(like QEMU's -mem-prealloc), so receiving pages never faults.",
)
@click.option(
    "--incoming-timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="With --incoming: stop waiting for a source SECONDS after start-up and exit 125 "
    "(refused attempts count against it; a migration under way is not cut short). "
    "Default: wait for ever.",
)
def run(
    config: Path,
    qmp_spec: str | None,
    console_file: Path | None,
    incoming: str | None,
    psk_file: Path | None,
    insecure: bool,
    prefault: bool,
    incoming_timeout: float | None,
) -> None:
    """Run a VM until the guest exits or `quit`.

    Runs the VM described by CONFIG (or, with --incoming, receives it from a migration). Exit
    status: the guest's own exit code (0 after `quit`, also once the guest has migrated away;
    128 when a vCPU stopped on an internal error, e.g. a guest fault); 125 when ptmig run
    itself failed: bad options, a bad config, no KVM, the firmware or a device process, a
    failed incoming migration.
    """
    if incoming_timeout is not None and incoming is None:
        raise click.UsageError("--incoming-timeout needs --incoming")
    from .runvm import VmmOptions, exec_vmm

    exec_vmm(  # the VMM runs without click (see `ptmig.runvm`)
        VmmOptions(
            config=str(config),
            qmp_path=_unix_path(qmp_spec, "--qmp"),
            console_file=str(console_file) if console_file else None,
            incoming=incoming,
            psk_file=str(psk_file) if psk_file else None,
            insecure=insecure,
            prefault=prefault,
            incoming_timeout=incoming_timeout,
            log_level=logging.getLogger().level,
        )
    )


# `ptmig load`'s defaults are LoadOptions' (ptmig.load imports numpy: not at every start-up;
# tests/test_load_client.py checks the two agree).
LOAD_DEFAULTS = {
    "keys": 65536,
    "window": 128,
    "value_size": 64,
    "ready_timeout_s": 30.0,
    "drain_timeout_s": 30.0,
}


def _load_int(name: str, text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An integer option of `ptmig load` whose default is the load client's own."""
    flag = "--" + name.replace("_", "-")
    return click.option(flag, type=int, default=LOAD_DEFAULTS[name], show_default=True, help=text)


@main.command()
@click.argument(
    "config", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="N",
    help="Pace to N ops/s (default: as fast as the window allows).",
)
@click.option("--max", "unpaced", is_flag=True, help="Unthrottled (the default).")
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds of load.",
)
@json_option("the result as JSON", "the summary")
@click.option(
    "--target",
    metavar="HOST:PORT",
    help="The kv service through the host's network (TAP) instead of a switch.",
)
@click.option("--switch", metavar="udp:HOST:PORT", help="The switch (overrides the config).")
@click.option("--guest-ip", help="Guest address (overrides the config).")
@click.option("--client-ip", help="This client's address on the switch.")
@click.option("--port", "kv_port", type=int, help="kv port (default: the config's, or 7000).")
@click.option("--keys-prefix", help="Key prefix (default: random).")
@_load_int(
    "keys",
    "Key space the PUTs cycle through; each key is checked against its latest acknowledged value.",
)
@_load_int("window", "Outstanding requests.")
@_load_int("value_size", "Value bytes.")
@click.option(
    "--reads",
    "read_ratio",
    type=click.FloatRange(0, 1, max_open=True),  # (some PUTs: the GETs read acknowledged keys)
    default=0.0,
    show_default=True,
    help="Fraction of load ops that GET an acknowledged key.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    help="Read every acknowledged key back at the end (default: verify).",
)
@click.option(
    "--ready-timeout",
    type=float,
    default=LOAD_DEFAULTS["ready_timeout_s"],
    show_default=True,
    metavar="SECONDS",
    help="Seconds to wait for the guest to answer ARP.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=LOAD_DEFAULTS["drain_timeout_s"],
    show_default=True,
    metavar="SECONDS",
    help="Seconds to wait, after the load, for replies still outstanding.",
)
@click.option(
    "--durable/--no-durable", default=True, help="Set the durable flag on PUTs (default: durable)."
)
def load(
    config: Path | None,
    rate: float | None,
    unpaced: bool,
    duration: float,
    json_path: Path | None,
    target: str | None,
    switch: str | None,
    guest_ip: str | None,
    client_ip: str | None,
    kv_port: int | None,
    keys_prefix: str | None,
    keys: int,
    window: int,
    value_size: int,
    read_ratio: float,
    verify: bool,
    ready_timeout: float,
    drain_timeout: float,
    durable: bool,
) -> None:
    """Drive a kv guest; verify what it acknowledged.

    Drives the guest's kv service and reads every acknowledged value back. CONFIG is the VM's
    config (it names the switch, the guest's IP and kv port). Exit status: 0 all verified,
    1 an acknowledged value was lost or wrong, 2 usage error, 3 the run proved nothing.
    """
    from .load import LoadOptions
    from .load import main as load_main

    if rate is not None and unpaced:
        raise click.UsageError("--rate and --max exclude each other")
    sys.exit(
        load_main(
            LoadOptions(
                config=str(config) if config else None,
                target=target,
                switch=switch,
                guest_ip=guest_ip,
                client_ip=client_ip,
                kv_port=kv_port,
                rate=rate,
                duration_s=duration,
                window=window,
                keys_prefix=keys_prefix,
                keys=keys,
                value_size=value_size,
                read_ratio=read_ratio,
                durable=durable,
                verify=verify,
                ready_timeout_s=ready_timeout,
                drain_timeout_s=drain_timeout,
                json_path=str(json_path) if json_path else None,
            )
        )
    )


@main.command()
@click.option("--listen", required=True, metavar="HOST:PORT", help="UDP address to serve on.")
@click.option(
    "--age",
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds before a MAC is forgotten.",
)
@click.option(
    "--native/--no-native",
    default=None,
    help="Forward known unicast frames in native code (default: when it builds).",
)
@click.option(
    "--idle-exit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Exit after this long without a datagram (default: never).",
)
def switch(listen: str, age: float, native: bool | None, idle_exit: float | None) -> None:
    """A learning L2 switch over UDP datagrams.

    Carries Ethernet frames between VMs (and load clients) as UDP datagrams. Exit status:
    0 after --idle-exit or a signal, 2 a bad --listen address.
    """
    from .net.switch import switch_main

    sys.exit(switch_main(listen, age_s=age, native=native, idle_exit_s=idle_exit))


@main.command()
@click.option(
    "--qmp", "qmp_spec", required=True, metavar="unix:PATH", help="The source VMM's QMP socket."
)
@click.argument("destination", metavar="tcp:HOST:PORT|unix:PATH")
@migration_options(tracking=None, downtime_ms=None, bandwidth=None)
@click.option("--downtime-limit-ms", "downtime_limit_old", type=click.IntRange(min=1), hidden=True)
@click.option("--verify", is_flag=True, help="Compare every page of RAM after the switchover.")
@click.option("--auto-converge", is_flag=True, help="Throttle the vCPUs if it does not converge.")
@click.option(
    "--postcopy",
    is_flag=True,
    help="Allow post-copy (postcopy-ram): switch over early once pre-copy stops converging "
    "and fetch the remaining pages on demand.",
)
@click.option(
    "--postcopy-after-rounds",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --postcopy: switch to post-copy after N pre-copy rounds at the latest.",
)
@json_option("the final query-migrate reply", "the tables")
def migrate(
    qmp_spec: str,
    destination: str,
    dma_tracking: str | None,
    downtime_limit: int | None,
    downtime_limit_old: int | None,
    max_bandwidth: int | None,
    verify: bool,
    auto_converge: bool,
    postcopy: bool,
    postcopy_after_rounds: int | None,
    json_path: Path | None,
) -> None:
    """Live-migrate a VM to DESTINATION.

    Migrates the VM behind --qmp to DESTINATION (a `ptmig run --incoming`). Exit status:
    0 completed; 1 failed or cancelled (the guest runs on the source); 2 usage error; 3 the
    VMM refused or was unreachable; 4 completed but verification found differing pages; 5 the
    switchover is still unresolved once the source's own fate queries to the destination
    ended (the guest is paused on the source: see x-migrate-resolve), or
    post-copy was interrupted (postcopy-paused: the guest is paused on both sides).
    """
    from .migrate import MigrateOptions
    from .migrate import run as run_migrate

    path = _unix_path(qmp_spec, "--qmp")
    assert path is not None
    if downtime_limit is not None and downtime_limit_old is not None:
        raise click.UsageError("--downtime-limit and --downtime-limit-ms are the same option")
    try:
        opts = MigrateOptions(
            path,
            destination,
            dma_tracking,
            downtime_limit if downtime_limit is not None else downtime_limit_old,
            max_bandwidth,
            verify,
            auto_converge,
            json_path,
            postcopy=postcopy,
            postcopy_after_rounds=postcopy_after_rounds,
        )
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    sys.exit(run_migrate(opts))


@main.command()
@click.option("--quick", is_flag=True, help="A smaller version that fits a few minutes.")
@json_option("the results (default bench-results/bench.json)", "the tables")
@click.option(
    "--only", multiple=True, metavar="SECTION", help="Run only these sections (repeatable)."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    metavar="N",
    help="Offer N kv ops/s in the strategies and bandwidth cells (default: half the "
    "measured maximum).",
)
def bench(quick: bool, json_path: Path | None, only: tuple[str, ...], rate: float | None) -> None:
    """Run the benchmarks: tables and one JSON file.

    Exit status: 0 every section ran (missed goals are in the tables and the JSON, not in the
    status); 1 a section crashed; 2 usage error (an unknown --only section).
    """
    from .bench import main as bench_main
    from .bench import select_sections

    try:
        select_sections(list(only) or None)
    except KeyError as e:
        raise click.BadParameter(e.args[0], param_hint="--only") from None
    sys.exit(bench_main(quick, json_path, list(only) or None, rate))


@main.command()
@migration_options(tracking="shadow", downtime_ms=300, bandwidth="100M")
@json_option("{migration, load, guest, demo}", "the live view and summary")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write an HTML report with plots to DIR.",
)
@click.option(
    "--bench-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench-results") / "bench.json",
    show_default=True,
    help="Bench results to add to the report (strategy comparison), if present.",
)
@click.option("--quick", is_flag=True, help="256 MiB, a shorter load before and after.")
@click.option("--memory", default=None, help="Guest RAM (default 1G, 256M with --quick).")
@click.option(
    "--warmup",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Seconds of load before migrating.",
)
@click.option(
    "--after",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Seconds of load after the switchover (default 4, 3 with --quick).",
)
@click.option(
    "--rate",
    type=float,
    default=None,
    metavar="OPS",
    help="Offered kv load in ops/s (default: as fast as the client can).",
)
@click.option(
    "--auto-converge/--no-auto-converge",
    default=True,
    show_default=True,
    help="QEMU's auto-converge: throttle the vCPUs while pre-copy does not converge, so the "
    "switchover fits --downtime-limit (without it, a guest that out-dirties the link ends in "
    "a forced switchover over the limit).",
)
@click.option("--tap", is_flag=True, help="Real Linux networking through TAP (needs root).")
@click.option(
    "--disk",
    "disk",
    type=click.Choice(["builtin", "vhost-user"]),
    default="builtin",
    show_default=True,
    help="The kv log's disk: ptmig's own device, or a qemu-storage-daemon it spawns as a "
    "vhost-user backend.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep configs, disk image and logs here (default: a temporary directory).",
)
@click.option("--no-live", is_flag=True, help="Plain progress lines instead of the live view.")
def demo(
    dma_tracking: str,
    json_path: Path | None,
    report_dir: Path | None,
    bench_json: Path,
    quick: bool,
    memory: str | None,
    warmup: float | None,
    after: float | None,
    rate: float | None,
    max_bandwidth: int,
    downtime_limit: int,
    auto_converge: bool,
    tap: bool,
    disk: str,
    run_dir: Path | None,
    no_live: bool,
) -> None:
    """Migrate a kv VM under load; verify nothing is lost.

    Live-migrates a kv VM with passthrough NIC and disk while a client loads it; the load runs
    from the warm-up until --after seconds after the switchover, however long pre-copy takes.
    Exit status: 0 everything verified; 1 the migration lost or corrupted something (expected
    with --dma-tracking none), or the load did not span the switchover (the summary says which
    condition failed); 2 usage error; 3 the demo could not run.
    """
    from rich.console import Console

    from .demo import DemoOptions, run_demo

    base = DemoOptions.quick() if quick else DemoOptions()
    try:
        opts = DemoOptions(
            memory=memory or base.memory,
            dma_tracking=dma_tracking,
            warmup_s=warmup if warmup is not None else base.warmup_s,
            after_s=after if after is not None else base.after_s,
            rate=rate,
            max_bandwidth_mib=max_bandwidth / (1 << 20),
            downtime_limit_ms=downtime_limit,
            auto_converge=auto_converge,
            tap=tap,
            disk=disk,
            json_path=json_path,
            report_dir=report_dir,
            bench_json=bench_json,
            run_dir=run_dir,
            live=not no_live,
        )
        opts.check()
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    console = Console(stderr=True, highlight=False) if json_to_stdout(json_path) else None
    sys.exit(run_demo(opts, console).exit_status)


if __name__ == "__main__":
    main()
