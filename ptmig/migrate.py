"""`ptmig migrate`: drive a migration from outside, over QMP, as a management layer would.

Owns the client side of the migration QMP commands: `MigrateOptions` (what the CLI passes), the
command sequence (`migrate-set-parameters`, `migrate-set-capabilities`, `migrate`, then polling
`query-migrate`, with `migrate_cancel` on Ctrl-C), the live progress view and the final summary
(rich), and the exit status. An unresolved switchover is not final while the source still asks
the destination for the migration's fate (`x-fate-query`): the client waits for those queries,
up to `RESOLVE_WAIT_S`, showing them, and reports the state they leave. It talks to the
source VMM with the `qemu.qmp` client, so it drives a QEMU source just as well (ptmig's `x-`
parameters are then simply not sent).

The parts that decide something — which commands to send, what a `query-migrate` reply means,
the progress and summary rows — are pure functions of dicts and are tested without sockets.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .cliconv import CANNOT_RUN, FAILED, MISMATCH, OK, UNRESOLVED, json_to_stdout, write_json
from .errors import PtmigError
from .migration.params import DMA_TRACKING

EXIT_OK = OK
EXIT_FAILED = FAILED  # failed or cancelled: the guest still runs on the source
EXIT_MISMATCH = MISMATCH  # completed, but verification found pages that differ
EXIT_ERROR = CANNOT_RUN  # could not talk to the VMM, or it refused a command
EXIT_UNRESOLVED = UNRESOLVED  # the switchover's answer was lost: x-migrate-resolve decides

FINISHED = ("completed", "failed", "cancelled", "x-unresolved", "postcopy-paused")
MiB = 1 << 20
# An unresolved source asks the destination for its fate by itself for up to 60 s
# (`source.FATE_ASK_FOR_S`); the client waits this long for those queries to end.
RESOLVE_WAIT_S = 90.0


class MigrateClientError(PtmigError, RuntimeError):
    """The VMM could not be reached or refused a command; the message says which and why."""


@dataclass(frozen=True)
class MigrateOptions:
    qmp_path: str  # the source VMM's QMP unix socket
    uri: str  # tcp:HOST:PORT or unix:PATH of the destination
    dma_tracking: str | None = None  # x-dma-tracking; None leaves the VMM's setting alone
    downtime_limit_ms: int | None = None
    max_bandwidth: int | None = None  # bytes/s
    verify: bool = False
    auto_converge: bool = False
    json_path: Path | None = None
    postcopy: bool = False  # postcopy-ram: switch to post-copy when the policy says so
    postcopy_after_rounds: int | None = None  # x-postcopy-after-rounds
    poll_interval_s: float = 0.05
    timeout_s: float | None = None  # give up waiting (the migration is cancelled) after this
    resolve_wait_s: float = RESOLVE_WAIT_S  # for an unresolved source's own fate queries

    def __post_init__(self) -> None:
        if not self.uri.startswith(("tcp:", "unix:")):
            raise ValueError(f"destination must be tcp:HOST:PORT or unix:PATH, got {self.uri!r}")
        if self.dma_tracking is not None and self.dma_tracking not in DMA_TRACKING:
            raise ValueError(
                f"dma tracking must be one of {', '.join(DMA_TRACKING)}, got {self.dma_tracking!r}"
            )
        if self.downtime_limit_ms is not None and self.downtime_limit_ms < 1:
            raise ValueError(f"downtime limit must be at least 1 ms, got {self.downtime_limit_ms}")
        if self.max_bandwidth is not None and self.max_bandwidth < 0:
            raise ValueError(f"max bandwidth must be >= 0 bytes/s, got {self.max_bandwidth}")
        if self.postcopy_after_rounds is not None and (
            not self.postcopy or self.postcopy_after_rounds < 1
        ):
            raise ValueError(
                f"post-copy after {self.postcopy_after_rounds} rounds needs --postcopy and "
                "at least 1 round"
            )
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll interval must be positive, got {self.poll_interval_s}")
        if self.resolve_wait_s < 0:
            raise ValueError(f"resolve wait must be >= 0 s, got {self.resolve_wait_s}")


# --- pure logic -----------------------------------------------------------------------------


def setup_commands(opts: MigrateOptions) -> list[tuple[str, dict[str, Any]]]:
    """The QMP commands that prepare and start the migration, in order."""
    params: dict[str, Any] = {}
    if opts.dma_tracking is not None:
        params["x-dma-tracking"] = opts.dma_tracking
    if opts.downtime_limit_ms is not None:
        params["downtime-limit"] = opts.downtime_limit_ms
    if opts.max_bandwidth is not None:
        params["max-bandwidth"] = opts.max_bandwidth
    if opts.postcopy_after_rounds is not None:
        params["x-postcopy-after-rounds"] = opts.postcopy_after_rounds
    caps = [
        {"capability": "x-verify", "state": opts.verify},
        {"capability": "auto-converge", "state": opts.auto_converge},
    ]
    if opts.postcopy:  # only when asked: a QEMU source without it is driven as before
        caps.append({"capability": "postcopy-ram", "state": True})
    cmds: list[tuple[str, dict[str, Any]]] = []
    if params:
        cmds.append(("migrate-set-parameters", params))
    cmds.append(("migrate-set-capabilities", {"capabilities": caps}))
    cmds.append(("migrate", {"uri": opts.uri}))
    return cmds


def asking_fate(info: dict[str, Any]) -> bool:
    """The source is unresolved and still asks the destination for the migration's fate
    (`x-fate-query`): its status may yet become completed or failed. A source that does not
    report its queries (QEMU) is taken at its word."""
    query = info.get("x-fate-query")
    return (
        info.get("status") == "x-unresolved"
        and isinstance(query, dict)
        and bool(query.get("asking"))
    )


def finished(info: dict[str, Any], waited_s: float, opts: MigrateOptions) -> bool:
    """The final reply: a status that ends the migration, unless it is an unresolved one whose
    source still asks the destination and has been waited for less than `resolve_wait_s`."""
    if info.get("status") not in FINISHED:
        return False
    return not asking_fate(info) or waited_s >= opts.resolve_wait_s


def exit_status(info: dict[str, Any]) -> int:
    """What the final `query-migrate` reply means for the caller's exit status."""
    if info.get("status") in ("x-unresolved", "postcopy-paused"):
        return EXIT_UNRESOLVED  # the guest is paused: an operator decides what happens
    if info.get("status") != "completed":
        return EXIT_FAILED
    verify = info.get("x-verify")
    if isinstance(verify, dict) and verify.get("mismatched", 0):
        return EXIT_MISMATCH
    return EXIT_OK


def _mib(nbytes: Any) -> str:
    return f"{nbytes / MiB:,.1f} MiB" if isinstance(nbytes, int | float) else "-"


def _round(info: dict[str, Any]) -> int:
    rounds = info.get("x-rounds")
    if isinstance(rounds, list):
        return len(rounds)
    return int(info.get("ram", {}).get("dirty-sync-count", 0))


def progress_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The live view: status, round, remaining, dirty rate, throughput, expected downtime."""
    ram = info.get("ram", {})
    rate = ram.get("dirty-pages-rate")
    page = ram.get("page-size", 4096)
    rows = [
        ("status", str(info.get("status", "?"))),
        ("round", str(_round(info))),
        ("remaining", _mib(ram.get("remaining"))),
        ("transferred", _mib(ram.get("transferred"))),
        ("dirty rate", f"{rate * page / MiB:,.1f} MiB/s" if isinstance(rate, int) else "-"),
        ("throughput", f"{ram['mbps'] / 8:,.1f} MB/s" if "mbps" in ram else "-"),
        (
            "expected downtime",
            f"{info['expected-downtime']} ms" if "expected-downtime" in info else "-",
        ),
        ("elapsed", f"{info['total-time']} ms" if "total-time" in info else "-"),
    ]
    if info.get("cpu-throttle-percentage"):
        rows.append(("cpu throttle", f"{info['cpu-throttle-percentage']} %"))
    if asking_fate(info):
        query = info["x-fate-query"]
        last = f"; last: {query['last']}" if query.get("last") else ""
        rows.append(
            (
                "unresolved",
                f"the source asks the destination for the migration's fate "
                f"({query.get('queries', 0)} queries{last})",
            )
        )
    return rows


def summary_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The final table: QEMU's fields, then ptmig's (downtime, rounds, verify, shadow)."""
    ram = info.get("ram", {})
    rows: list[tuple[str, str]] = [("status", str(info.get("status")))]
    if info.get("error-desc"):
        rows.append(("error", str(info["error-desc"])))
    for key in ("total-time", "setup-time", "downtime"):
        if key in info:
            rows.append((key, f"{info[key]} ms"))
    for key in ("transferred", "remaining", "total", "normal-bytes"):
        if key in ram:
            rows.append((f"ram.{key}", f"{ram[key]} ({_mib(ram[key])})"))
    for key in ("duplicate", "normal", "dirty-sync-count", "dirty-pages-rate", "mbps"):
        if key in ram:
            rows.append((f"ram.{key}", str(ram[key])))
    if "x-dma-tracking" in info:
        rows.append(("x-dma-tracking", str(info["x-dma-tracking"])))
    rounds = info.get("x-rounds")
    if isinstance(rounds, list) and rounds:
        pages = ", ".join(str(r.get("pages")) for r in rounds)
        rows.append(("rounds", f"{len(rounds)} (pages: {pages})"))
    if info.get("x-forced-switchover"):
        rows.append(("forced switchover", "yes (the dirty set stopped shrinking)"))
    verify = info.get("x-verify")
    if isinstance(verify, dict):
        bad = verify.get("mismatched", 0)
        text = (
            f"{verify.get('pages')} pages, all identical"
            if not bad
            else f"{bad} of {verify.get('pages')} pages DIFFER "
            f"(first {verify.get('first-mismatched')})"
        )
        rows.append(("x-verify", text))
    shadow = info.get("x-shadow")
    if isinstance(shadow, dict):
        rows.append(("x-shadow", ", ".join(f"{k}={v}" for k, v in shadow.items())))
    return rows


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


# --- the QMP conversation ------------------------------------------------------------------


async def _execute(qmp: Any, cmd: str, args: dict[str, Any] | None = None) -> Any:
    from qemu.qmp import ExecuteError

    try:
        return await qmp.execute(cmd, args)
    except ExecuteError as e:
        raise MigrateClientError(f"{cmd} {json.dumps(args or {})} refused: {e}") from None


async def drive(
    opts: MigrateOptions, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Start the migration and poll it to the end; returns the final `query-migrate` reply."""
    from qemu.qmp import QMPClient, QMPError

    qmp = QMPClient("ptmig-migrate")
    try:
        await qmp.connect(opts.qmp_path)
    except (QMPError, OSError) as e:
        raise MigrateClientError(
            f"cannot connect to the VMM's QMP socket {opts.qmp_path}: {e}"
        ) from None
    try:
        info = await _execute(qmp, "query-migrate")
        if info.get("status") in ("setup", "active", "device", "cancelling"):
            raise MigrateClientError(
                f"a migration is already in progress (status {info['status']!r})"
            )
        for cmd, args in setup_commands(opts):
            await _execute(qmp, cmd, args)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + opts.timeout_s if opts.timeout_s else None
        cancelled = False
        unresolved_at: float | None = None  # when the source was first seen unresolved
        try:
            while True:
                info = await _execute(qmp, "query-migrate")
                if on_progress is not None:
                    on_progress(info)
                if info.get("status") == "x-unresolved" and unresolved_at is None:
                    unresolved_at = loop.time()
                waited = 0.0 if unresolved_at is None else loop.time() - unresolved_at
                if finished(info, waited, opts):
                    return dict(info)
                if deadline is not None and loop.time() > deadline and not cancelled:
                    await _execute(qmp, "migrate_cancel")
                    cancelled = True
                await asyncio.sleep(opts.poll_interval_s)
        except asyncio.CancelledError:  # Ctrl-C: do not leave a migration running
            await _execute(qmp, "migrate_cancel")
            raise
    finally:
        try:
            await qmp.disconnect()
        except Exception:
            pass  # the VMM may already be gone


def run(opts: MigrateOptions, console: Console | None = None, errors: Console | None = None) -> int:
    """`ptmig migrate`: live progress, summary table, optional JSON; returns the exit status.
    Errors go to `errors` (stderr); with `--json -` the tables go there too."""
    errors = errors or Console(stderr=True, soft_wrap=True)
    console = console or (errors if json_to_stdout(opts.json_path) else Console())
    live_view = Live(Text("connecting ..."), console=console, refresh_per_second=10, transient=True)

    def show(info: dict[str, Any]) -> None:
        live_view.update(Group(_table(f"migrating to {opts.uri}", progress_rows(info))))

    try:
        with live_view:
            info = asyncio.run(drive(opts, show))
    except MigrateClientError as e:
        errors.print(f"[red]ptmig migrate: {e}[/red]")
        return EXIT_ERROR
    except KeyboardInterrupt:
        errors.print("[yellow]ptmig migrate: interrupted; the migration was cancelled[/yellow]")
        return EXIT_FAILED
    console.print(_table("migration", summary_rows(info)))
    if opts.json_path is not None:
        write_json(info, opts.json_path)
    status = exit_status(info)
    if status == EXIT_FAILED:
        errors.print(
            f"[red]migration {info.get('status')}: "
            f"{info.get('error-desc', 'no reason given')}; the guest runs on the "
            "source[/red]"
        )
    elif status == EXIT_UNRESOLVED:
        errors.print(f"[red]migration unresolved: {info.get('error-desc')}[/red]")
    elif status == EXIT_MISMATCH:
        errors.print("[red]verification found pages that differ on the destination[/red]")
    return status
