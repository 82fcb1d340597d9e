"""`ptmig demo`, start to finish: two VMMs, the kv guest, load, a live migration, the verdict.

`run_demo(DemoOptions) -> DemoOutcome` builds the firmware, starts a UDP switch, a source VMM
and a destination VMM (`--incoming`) on one shared config and disk image, runs the load client
through a warm-up, the migration and `after_s` seconds after the switchover (timed by the
events, however long pre-copy takes: the demo tells the client when to stop once the source
says when the guest resumed), then collects the source's final `query-migrate`, the destination
guest's own statistics, the load client's result and the VMMs' CPU time during the migration
into the demo document (see `ptmig.demo.summary`). Every child is stopped on the way out.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from .. import cputime
from ..cliconv import json_to_stdout, write_json
from ..migration.seal import new_key_file
from ..vmmproc import FINISHED, QmpMonitor, VmmError, free_port, ptmig_command, run_command
from .live import LiveView
from .plan import DemoOptions, DemoPlan, latency_path, write_configs
from .procs import Child, Children, DemoError, LineReader
from .summary import EXIT_DEMO_FAILED, summary_lines, verdict
from .tapnet import TapNetwork
from .timeline import (
    Phase,
    bridge_stale_replies,
    gap_contains,
    last_reply_sent_s,
    latency_by_phase,
    migration_phases,
    stop_round,
    switchover_gap,
    throughput,
)

POLL_S = 0.05
MIGRATION_TIMEOUT_S = 120.0
# The report's phase names (`ptmig.demo.timeline`) for the source's statuses, so that the
# live view and the report show the same phases.
PHASE_OF_STATUS = {
    "setup": "setup",
    "active": "pre-copy",
    "device": "stop-and-copy",
    "completed": "switched over",
    "failed": "failed",
    "cancelled": "cancelled",
}
LOAD_MARGIN_S = 60.0  # the load client's own limit beyond the longest demo, a safety net
EXIT_INTERRUPTED = 130


@dataclass
class DemoOutcome:
    doc: dict[str, Any]
    exit_status: int
    run_dir: Path


class _LoadWatch:
    """The load client's progress lines, as they arrive."""

    def __init__(self, view: LiveView) -> None:
        self.view = view
        self.t0: float | None = None
        self.started = threading.Event()
        self.error: str | None = None

    def on_line(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "start":
            self.t0 = float(rest)
            self.started.set()
        elif word == "progress":
            when, ops = rest.split()
            self.view.progress.load_progress(float(when), int(ops))
        elif word == "error":
            self.error = rest
            self.started.set()


def _start_switch(kids: Children, tries: int = 5) -> tuple[Child, int]:
    from ..net.switch import probe_switch

    for _ in range(tries):
        port = free_port(socket.SOCK_DGRAM)
        sw = kids.start("switch", ptmig_command("switch", "--listen", f"127.0.0.1:{port}"))
        deadline = time.monotonic() + 10
        while sw.alive() and time.monotonic() < deadline:
            if probe_switch("127.0.0.1", port, timeout=0.1, tries=1) is not None:
                return sw, port
        sw.stop()  # the port was taken in the meantime: try another one
    raise DemoError(f"could not start a UDP switch on 127.0.0.1 after {tries} tries")


def _wait_status(qmp: QmpMonitor, child: Child, status: str, timeout: float = 60.0) -> None:
    """Until `query-status` says `status` ("running": the guest runs; "inmigrate": the
    destination has prepared its RAM and accepts the migration)."""
    try:
        qmp.wait_status(status, timeout, child.proc)
    except VmmError as e:
        raise (child.died() if not child.alive() else DemoError(str(e))) from None


@dataclass
class MigrationRun:
    """The migration as the demo saw it: when the source's migration began (its `total-time`
    origin, between `start_lo` and `start_hi` on CLOCK_MONOTONIC), the source's final
    `query-migrate`, and the status changes."""

    start_lo: float
    start_hi: float
    info: dict[str, Any]
    events: list[dict[str, Any]]

    @property
    def started(self) -> float:
        return (self.start_lo + self.start_hi) / 2

    @property
    def slack_s(self) -> float:
        """How far `started` may be from the source's own origin."""
        return (self.start_hi - self.start_lo) / 2

    def bound_start(self, asked: float, answered: float, total_ms: Any) -> None:
        """A `query-migrate` asked at `asked` and answered at `answered` said `total_ms`
        (whole ms since the origin): the origin lies in [asked - total - 1 ms, answered -
        total]. Intersecting these over the polls pins it down to a few ms at worst."""
        if not isinstance(total_ms, (int, float)) or isinstance(total_ms, bool) or total_ms <= 0:
            return  # 0: the source's clock has not started yet (its thread is starting)
        lo = asked - float(total_ms) / 1000.0 - 0.001
        hi = answered - float(total_ms) / 1000.0
        if lo <= self.start_hi and hi >= self.start_lo:  # else: inconsistent, keep what we had
            self.start_lo, self.start_hi = max(self.start_lo, lo), min(self.start_hi, hi)

    def resumed_at(self) -> float | None:
        """CLOCK_MONOTONIC when the guest resumed on the destination (None: not migrated)."""
        stop_at = stop_round(self.info).get("stop-at-ms")
        downtime = self.info.get("downtime")
        if (
            self.info.get("status") != "completed"
            or not isinstance(stop_at, (int, float))
            or not isinstance(downtime, (int, float))
        ):
            return None
        return self.started + (float(stop_at) + float(downtime)) / 1000.0


def _migrate(
    src: QmpMonitor, opts: DemoOptions, port: int, view: LiveView, cpu_watch: CpuWatch
) -> MigrationRun:
    """Start the migration and poll it to the end; `cpu_watch` gets a sample at the start, when
    the source has switched over (its run state `postmigrate`, before the verification that
    follows; seen by the next poll) and at the end."""
    src.execute(
        "migrate-set-parameters",
        {
            "x-dma-tracking": opts.dma_tracking,
            "downtime-limit": opts.downtime_limit_ms,
            "max-bandwidth": int(opts.max_bandwidth_mib * (1 << 20)),
        },
    )
    caps = {"x-verify": True, "auto-converge": opts.auto_converge}
    src.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": c, "state": on} for c, on in caps.items()]},
    )
    cpu_watch.start, cpu_watch.start_at = cpu_watch.take(), time.monotonic()
    sent = time.monotonic()
    src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    migrate_answered = time.monotonic()
    # The origin is after `sent`; its upper bound comes from the polls below.
    run = MigrationRun(sent, sent + MIGRATION_TIMEOUT_S, {}, [])
    deadline = sent + MIGRATION_TIMEOUT_S
    last = ""
    while True:
        asked = time.monotonic()
        info: dict[str, Any] = src.execute("query-migrate")
        now = time.monotonic()
        # total-time stands still from the switchover on (when `downtime` appears), though
        # the status says "completed" only after the verification that may follow it
        if info["status"] not in FINISHED and "downtime" not in info:
            run.bound_start(asked, now, info.get("total-time"))
        if info["status"] != last:
            last = info["status"]
            run.events.append({"status": last, "t": now})
            view.progress.set_phase(f"{PHASE_OF_STATUS.get(last, last)} (migration: {last})")
        view.progress.migration(info)
        view.update()
        if (
            last == "device"
            and cpu_watch.switched == (None, None)
            and src.execute("query-status")["status"] == "postmigrate"
        ):
            cpu_watch.switched, cpu_watch.switched_at = cpu_watch.take(), time.monotonic()
        if last in FINISHED:
            cpu_watch.end = cpu_watch.take()
            run.info = info
            if run.start_hi > deadline - 1:  # no poll bounded it: assume the reply's time
                run.start_hi = max(run.start_lo, migrate_answered)
            return run
        if now > deadline:
            raise DemoError(f"the migration is still '{last}' after {MIGRATION_TIMEOUT_S} s")
        time.sleep(POLL_S)


def _max_gap_ms(stats: dict[str, Any] | None) -> float | None:
    if not stats or not stats.get("vcpus"):
        return None
    return max(v.get("max-gap-us", 0) for v in stats["vcpus"]) / 1000.0


Samples = tuple[cputime.CpuSample | None, cputime.CpuSample | None]  # (source, destination)


@dataclass
class CpuWatch:
    """CPU samples of the two VMM processes: when `migrate` is sent, at the switchover (before
    the verification that follows it), and at the end of the migration."""

    src_pid: int
    dst_pid: int
    warm: Samples = (None, None)  # when the warm-up load began
    warm_at: float = 0.0
    start_at: float = 0.0
    switched_at: float = 0.0
    start: Samples = (None, None)
    switched: Samples = (None, None)
    end: Samples = (None, None)

    def take(self) -> Samples:
        return cputime.sample(self.src_pid), cputime.sample(self.dst_pid)

    def _baseline(self, i: int, migrating_s: float) -> float | None:
        """The side's CPU over `migrating_s` at its warm-up rate (the guest's I/O through the
        VMM, its QMP, ...: what it spends without migrating)."""
        a, b = self.warm[i], self.start[i]
        if a is None or b is None or self.start_at <= self.warm_at or migrating_s <= 0:
            return None
        return cputime.migration_cpu_s(a, b) / (self.start_at - self.warm_at) * migrating_s

    def to_json(self, info: dict[str, Any]) -> dict[str, Any]:
        """Per side, from the final `query-migrate` `info`: `-s` / `-s-per-gib` from `migrate`
        to the switchover (the migration itself: what the VMM metered itself, `x-cpu-s`, else
        the samples around the poll that saw the switchover), `-baseline-s` what the side
        spent in as long during the warm-up (not migrating), `-with-verify-s` to the end (the
        page verification after it included)."""
        ram = info.get("ram") or {}
        transferred, ram_total = ram.get("transferred"), ram.get("total")
        gib = float(transferred) / (1 << 30) if isinstance(transferred, (int, float)) else 0.0
        ram_gib = float(ram_total) / (1 << 30) if isinstance(ram_total, (int, float)) else 0.0
        metered = info.get("x-cpu-s") or {}
        total_ms = info.get("total-time")
        out: dict[str, Any] = {
            "gib-transferred": round(gib, 4),
            "gib-ram": round(ram_gib, 4),
            "what": "VMM process CPU (user + system, vCPU threads left "
            "out) from migrate to the switchover, and to the end "
            "of the migration with the verification after it",
        }
        for i, side in enumerate(("source", "destination")):
            a, mid, b = self.start[i], self.switched[i], self.end[i]
            used: float | None = None
            polled = None if a is None or mid is None else cputime.migration_cpu_s(a, mid)
            if isinstance(metered.get(side), (int, float)):
                used, out[f"{side}-by"] = float(metered[side]), "vmm"
                if polled is not None:  # the observer's figure, for comparison
                    out[f"{side}-poll-s"] = round(polled, 3)
            elif polled is not None:
                used, out[f"{side}-by"] = polled, "poll"
            if used is not None:
                out[f"{side}-s"] = round(used, 3)
                if gib > 0:
                    out[f"{side}-s-per-gib"] = round(used / gib, 3)
                if ram_gib > 0:  # every page of RAM is examined at least once
                    out[f"{side}-s-per-ram-gib"] = round(used / ram_gib, 3)
                migrating_s = (
                    float(total_ms) / 1000.0
                    if isinstance(total_ms, (int, float))
                    else self.switched_at - self.start_at
                )
                base = self._baseline(i, migrating_s)
                if base is not None:
                    out[f"{side}-baseline-s"] = round(base, 3)
            if a is not None and b is not None:
                out[f"{side}-with-verify-s"] = round(cputime.migration_cpu_s(a, b), 3)
        return out


def _switchover_outage(
    phases: list[Phase],
    gaps: list[list[float]],
    info: dict[str, Any],
    latency: dict[str, Any],
    slack_s: float,
    rows: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """The client's gap at the switchover, and whether it contains the guest's pause.

    Replies the guest sent before its pause still reach the client after the pause began:
    the devices deliver what they had queued until they are quiesced (pause + sync of the
    downtime's parts), and the switch and the client take up to a round trip of the pre-copy
    phase to pass a reply on: its p99, not its median, since a client descheduled for a few
    milliseconds on a busy host reads the last replies that late. The gap may begin that late.
    At the other end the downtime runs until the source has the destination's
    acknowledgement; the destination resumed the guest as it sent it, after restoring vCPUs
    and devices, so the guest may have run for the ack's wait less that restore.

    With the client's per-request record (`rows`: completed at s, latency ms) the beginning
    is judged by when the request answered last before the gap was sent (before the guest
    stopped, or the guest answered while paused); the p99 allowance is used only without it.
    The record also tells a stale reply inside the pause (read late, to a request sent
    before it) from service: the gap is carried over such replies to the first one after the
    guest may have resumed (`bridge_stale_replies`)."""
    stop = next((p for p in phases if p.name == "stop-and-copy"), None)
    if stop is None:
        return None
    gap = switchover_gap(gaps, stop)
    if gap is None:
        return {"contains-switchover": False, "slack-ms": round(slack_s * 1000, 2)}
    parts = stop_round(info).get("downtime-ms")
    quiesce_s = (
        sum(float(parts.get(k, 0)) for k in ("pause", "sync")) / 1000.0
        if isinstance(parts, dict)
        else 0.0
    )
    in_flight_s = float((latency.get("pre-copy") or {}).get("p99_ms", 0.0)) / 1000.0
    early_s = quiesce_s + in_flight_s
    dest = stop_round(info).get("destination-ms")
    restore_s = (
        sum(float(dest.get(k, 0)) for k in ("vcpus", "devices")) / 1000.0
        if isinstance(dest, dict)
        else 0.0
    )
    ack_s = float(parts.get("ack", 0)) / 1000.0 if isinstance(parts, dict) else 0.0
    late_s = max(0.0, ack_s - restore_s)
    sent_s = None if rows is None else last_reply_sent_s(rows, gap)
    stale = 0
    if rows is not None:
        gap, stale = bridge_stale_replies(
            rows, gap, stop.end_s - late_s - slack_s, stop.start_s + quiesce_s + slack_s
        )
    contains = gap_contains(gap, stop, early_s, late_s, slack_s, sent_s, quiesce_s)
    return {
        **gap.to_json(),
        "contains-switchover": contains,
        **({} if sent_s is None else {"last-reply-sent_s": round(sent_s, 4)}),
        **({"stale-replies-inside": stale} if stale else {}),
        "quiesce-ms": round(quiesce_s * 1000, 2),
        "early-ms": round(early_s * 1000, 2),
        "late-ms": round(late_s * 1000, 2),
        "slack-ms": round(slack_s * 1000, 2),
    }


def _latency_rows(path: Path) -> np.ndarray | None:
    """The load client's per-request record (completed at s, latency ms), if it wrote one."""
    try:
        return np.load(path).reshape(-1, 2)
    except (OSError, ValueError):
        return None


def _demo_section(
    opts: DemoOptions,
    t0: float,
    mig: MigrationRun,
    load_doc: dict[str, Any],
    lat_path: Path,
    guest: dict[str, Any] | None,
    guest_before: dict[str, Any] | None,
    cpu_watch: CpuWatch,
) -> dict[str, Any]:
    info, load = mig.info, load_doc["result"]
    load_end = float(load.get("duration_s") or 0.0)
    phases = migration_phases(info, mig.started - t0, load_end)
    rows = _latency_rows(lat_path)
    latency = {} if rows is None else latency_by_phase(rows, phases)
    outage = _switchover_outage(
        phases, load_doc.get("gaps") or [], info, latency, mig.slack_s + 0.002, rows
    )
    return {
        "options": {
            "memory": opts.memory,
            "dma-tracking": opts.dma_tracking,
            "warmup-s": opts.warmup_s,
            "after-s": opts.after_s,
            "rate": opts.rate,
            "max-bandwidth-mib": opts.max_bandwidth_mib,
            "downtime-limit-ms": opts.downtime_limit_ms,
            "auto-converge": opts.auto_converge,
            "network": "tap" if opts.tap else "udp",
            "disk": opts.disk,
        },
        "migration-start-s": round(mig.started - t0, 4),
        "phases": [p.to_json() for p in phases],
        "status-events": [
            {"status": e["status"], "t_s": round(e["t"] - t0, 4)} for e in mig.events
        ],
        "outage": {
            "client-ms": outage.get("ms") if outage else None,
            "client-switchover": outage,
            "client-longest-ms": load.get("max_gap_ms"),
            "client-longest-at-s": load.get("max_gap_at_s"),
            "guest-ms": _max_gap_ms(guest),
            "guest-before-ms": _max_gap_ms(guest_before),
            "downtime-ms": info.get("downtime"),
        },
        "throughput": throughput(load.get("series") or [], phases, load_end),
        "latency": latency,
        "cpu": cpu_watch.to_json(info),
    }


def _wait_loading(loader: Child, view: LiveView, until: float) -> None:
    while time.monotonic() < until:
        if not loader.alive():
            raise loader.died()
        view.update()
        time.sleep(POLL_S)


def _drive(plan: DemoPlan, kids: Children, view: LiveView) -> dict[str, Any]:
    opts = plan.opts
    from ..firmware import build_firmware

    _check_disk_backend(opts)
    view.progress.set_phase("building the guest firmware")
    view.update()
    build_firmware()
    tapnet = None
    if opts.tap:
        tapnet = TapNetwork.create()
        plan.tap_names = tapnet.taps
    else:
        _, plan.switch_port = _start_switch(kids)
    try:
        src_cfg, dst_cfg = write_configs(plan)
        view.progress.set_phase("starting source and destination VMMs")
        view.update()
        key = str(new_key_file(plan.path("migration.key")))  # the two VMMs' own key
        src = kids.start(
            "vmm-src",
            run_command(src_cfg, plan.qmp_src, plan.path("src.console"), "--psk-file", key),
        )
        dst = kids.start(
            "vmm-dst",
            run_command(
                dst_cfg,
                plan.qmp_dst,
                plan.path("dst.console"),
                "--incoming",
                f"tcp:127.0.0.1:{plan.migration_port}",
                "--psk-file",
                key,
            ),
        )
        src_qmp = src.connect_qmp(plan.qmp_src)
        dst_qmp = dst.connect_qmp(plan.qmp_dst)
        _wait_status(src_qmp, src, "running")
        _wait_status(dst_qmp, dst, "inmigrate")  # its RAM prefaulted: not during the warm-up

        view.progress.set_phase("warm-up: kv load on the source")
        view.update()
        watch = _LoadWatch(view)
        load_out = plan.path("load.json")
        cap_s = opts.warmup_s + MIGRATION_TIMEOUT_S + opts.after_s + LOAD_MARGIN_S
        load_args = ["-m", "ptmig.demo.loadproc", str(src_cfg), str(cap_s), str(load_out)]
        if tapnet is not None:
            load_args += ["--target", tapnet.guest_target]
        if opts.rate is not None:
            load_args += ["--rate", str(opts.rate)]
        loader = kids.start("load", [sys.executable, *load_args], stdout_pipe=True, stdin_pipe=True)
        assert loader.proc.stdout is not None
        LineReader(loader.proc.stdout, watch.on_line)
        if not watch.started.wait(45.0) or watch.t0 is None:
            raise DemoError(
                f"the load client never reached the guest: {watch.error or ''}\n{loader.log_tail()}"
            )
        t0 = watch.t0
        cpu_watch = CpuWatch(src.proc.pid, dst.proc.pid)
        cpu_watch.warm, cpu_watch.warm_at = cpu_watch.take(), time.monotonic()
        _wait_loading(loader, view, t0 + opts.warmup_s)

        guest_before = src_qmp.execute("x-query-guest-stats")
        devices_before = src_qmp.execute("x-query-devices")["devices"]
        mig = _migrate(src_qmp, opts, plan.migration_port, view, cpu_watch)
        info = mig.info
        resumed = mig.resumed_at()
        # The load goes on for after_s after the guest resumed on the destination (or, if the
        # migration failed, after it ended with the guest still on the source).
        stop_at = (resumed if resumed is not None else time.monotonic()) + opts.after_s
        loader.tell(f"stop-at {stop_at:.4f}")
        view.progress.set_phase(
            "after: kv load on the "
            + (
                "destination, past the switchover"
                if resumed is not None
                else "source, the migration having ended"
            )
        )
        while loader.alive():
            if time.monotonic() > stop_at:
                view.progress.set_phase("reading back every acknowledged value")
            view.update()
            time.sleep(POLL_S)
        if not load_out.exists():
            raise DemoError(
                f"the load client wrote no result (status "
                f"{loader.proc.returncode}):\n{loader.log_tail()}"
            )
        load_doc = json.loads(load_out.read_text())
        runner = dst_qmp if info["status"] == "completed" else src_qmp
        guest = runner.execute("x-query-guest-stats")
        return {
            "migration": info,
            "load": load_doc["result"],
            "guest": guest,
            # counters and ring positions: where a request stopped, if the load saw a stall
            "devices": {
                "before-migration": devices_before,
                "end": runner.execute("x-query-devices")["devices"],
            },
            "demo": _demo_section(
                opts, t0, mig, load_doc, latency_path(load_out), guest, guest_before, cpu_watch
            ),
        }
    finally:
        kids.stop_all()
        if tapnet is not None:
            tapnet.close()


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _check_disk_backend(opts: DemoOptions) -> None:
    """`--disk vhost-user` needs qemu-storage-daemon on this host: say so before anything runs."""
    from ..devices.vhost_user.daemon import PROGRAM, find_program

    if opts.disk == "vhost-user" and find_program() is None:
        raise DemoError(
            f"--disk vhost-user needs {PROGRAM}, which is not installed (Debian package "
            f"qemu-system-common; make test installs it as root)"
        )


def run_demo(opts: DemoOptions, console: Console | None = None) -> DemoOutcome:
    """Run the demo; print the live view and the summary on `console`."""
    opts.check()
    console = console or Console(highlight=False)
    own_dir = opts.run_dir is None
    run_dir = (
        Path(tempfile.mkdtemp(prefix="ptmig-demo-"))
        if opts.run_dir is None
        else opts.run_dir.resolve()
    )  # the children run inside it: relative paths would break
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = DemoPlan(opts, run_dir, switch_port=0, migration_port=free_port())
    old_term = _terminate_as_interrupt()
    try:
        with Children(run_dir) as kids, LiveView(console, live=opts.live) as view:
            doc = _drive(plan, kids, view)
    except KeyboardInterrupt:
        _stderr().print("[yellow]interrupted: every child process was stopped[/yellow]")
        if own_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        return DemoOutcome({}, EXIT_INTERRUPTED, run_dir)
    except DemoError as e:
        _stderr().print(f"[red]ptmig demo failed:[/red] {e}")
        if own_dir:
            _stderr().print(f"(logs kept in {run_dir})")
        return DemoOutcome({}, EXIT_DEMO_FAILED, run_dir)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    v = verdict(doc)
    doc["demo"]["verified"] = v.ok
    doc["demo"]["problems"] = v.problems
    console.print()
    for line in summary_lines(doc):
        style = (
            "bold green"
            if line.startswith("VERIFIED")
            else ("bold red" if line.startswith("NOT VERIFIED") else None)
        )
        console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)
    if opts.json_path is not None:
        write_json(doc, opts.json_path)
        if not json_to_stdout(opts.json_path):
            console.print(f"results written to {opts.json_path}")
    if opts.report_dir is not None:
        from ..report import write_report

        page = write_report(opts.report_dir, demo=doc, bench=_bench_doc(opts.bench_json))
        console.print(f"report written to {page}")
    if own_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return DemoOutcome(doc, v.exit_status, run_dir)


def _terminate_as_interrupt() -> Any:
    """SIGTERM stops the demo as Ctrl-C does (children cleaned up); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _bench_doc(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc
