"""`ptmig demo`, start to finish: two VMMs, the kv guest, load, a live migration, the verdict.

`run_demo(DemoOptions) -> DemoOutcome` builds the firmware, starts a UDP switch, a source VMM
and a destination VMM (`--incoming`) on one shared config and disk image, runs the load client
through a warm-up, the migration and the time after the switchover, then collects the source's
final `query-migrate`, the destination guest's own statistics and the load client's result into
the demo document (see `ptmig.demo.summary`). Every child is stopped on the way out.
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

from rich.console import Console

from ..migration.seal import new_key_file
from .live import LiveView
from .plan import DemoOptions, DemoPlan, free_port, write_configs
from .procs import Child, Children, DemoError, LineReader, ptmig_command
from .qmpclient import QmpClient
from .summary import EXIT_DEMO_FAILED, summary_lines, verdict
from .tapnet import TapNetwork
from .timeline import migration_phases, throughput

FINISHED = ("completed", "failed", "cancelled")
POLL_S = 0.05
MIGRATION_TIMEOUT_S = 120.0
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


def _wait_status(qmp: QmpClient, child: Child, status: str, timeout: float = 60.0) -> None:
    """Until `query-status` says `status` ("running": the guest runs; "inmigrate": the
    destination has prepared its RAM and accepts the migration)."""
    deadline = time.monotonic() + timeout
    while qmp.execute("query-status")["status"] != status:
        if not child.alive():
            raise child.died()
        if time.monotonic() > deadline:
            raise DemoError(f"{child.name}: not '{status}' after {timeout} s")
        time.sleep(0.05)


def _migrate(src: QmpClient, opts: DemoOptions, port: int, view: LiveView,
             events: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    """Start the migration and poll it to the end; (CLOCK_MONOTONIC of `migrate`, final info)."""
    src.execute("migrate-set-parameters", {
        "x-dma-tracking": opts.dma_tracking, "downtime-limit": opts.downtime_limit_ms,
        "max-bandwidth": int(opts.max_bandwidth_mib * (1 << 20))})
    src.execute("migrate-set-capabilities",
                {"capabilities": [{"capability": "x-verify", "state": True}]})
    t_migrate = time.monotonic()
    src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    deadline = t_migrate + MIGRATION_TIMEOUT_S
    last = ""
    while True:
        info: dict[str, Any] = src.execute("query-migrate")
        now = time.monotonic()
        if info["status"] != last:
            last = info["status"]
            events.append({"status": last, "t": now})
            view.progress.set_phase(f"migration: {last}")
        view.progress.migration(info)
        view.update()
        if last in FINISHED:
            return t_migrate, info
        if now > deadline:
            raise DemoError(f"the migration is still '{last}' after {MIGRATION_TIMEOUT_S} s")
        time.sleep(POLL_S)


def _max_gap_ms(stats: dict[str, Any] | None) -> float | None:
    if not stats or not stats.get("vcpus"):
        return None
    return max(v.get("max-gap-us", 0) for v in stats["vcpus"]) / 1000.0


def _demo_section(opts: DemoOptions, t0: float, t_migrate: float, info: dict[str, Any],
                  load: dict[str, Any], guest: dict[str, Any] | None,
                  guest_before: dict[str, Any] | None,
                  events: list[dict[str, Any]]) -> dict[str, Any]:
    load_end = float(load.get("duration_s") or 0.0)
    phases = migration_phases(info, t_migrate - t0, load_end)
    return {
        "options": {"memory": opts.memory, "dma-tracking": opts.dma_tracking,
                    "warmup-s": opts.warmup_s, "duration-s": opts.duration_s,
                    "max-bandwidth-mib": opts.max_bandwidth_mib,
                    "downtime-limit-ms": opts.downtime_limit_ms,
                    "network": "tap" if opts.tap else "udp"},
        "migration-start-s": round(t_migrate - t0, 4),
        "phases": [p.to_json() for p in phases],
        "status-events": [{"status": e["status"], "t_s": round(e["t"] - t0, 4)} for e in events],
        "outage": {"client-ms": load.get("max_gap_ms"), "guest-ms": _max_gap_ms(guest),
                   "guest-before-ms": _max_gap_ms(guest_before),
                   "downtime-ms": info.get("downtime")},
        "throughput": throughput(load.get("series") or [], phases, load_end),
    }


def _drive(plan: DemoPlan, kids: Children, view: LiveView) -> dict[str, Any]:
    opts = plan.opts
    from ..firmware import build_firmware

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
        src = kids.start("vmm-src", ptmig_command("run", str(src_cfg), "--qmp",
                                                   f"unix:{plan.qmp_src}", "--console",
                                                   str(plan.path("src.console")),
                                                   "--psk-file", key))
        dst = kids.start("vmm-dst", ptmig_command(
            "run", str(dst_cfg), "--qmp", f"unix:{plan.qmp_dst}", "--console",
            str(plan.path("dst.console")), "--incoming", f"tcp:127.0.0.1:{plan.migration_port}",
            "--psk-file", key))
        src_qmp = src.connect_qmp(plan.qmp_src)
        dst_qmp = dst.connect_qmp(plan.qmp_dst)
        _wait_status(src_qmp, src, "running")
        _wait_status(dst_qmp, dst, "inmigrate")  # its RAM prefaulted: not during the warm-up

        view.progress.set_phase("warm-up: kv load on the source")
        view.update()
        watch = _LoadWatch(view)
        load_out = plan.path("load.json")
        load_args = ["-m", "ptmig.demo.loadproc", str(src_cfg), str(opts.duration_s),
                     str(load_out)]
        if tapnet is not None:
            load_args += ["--target", tapnet.guest_target]
        loader = kids.start("load", [sys.executable, *load_args], stdout_pipe=True)
        assert loader.proc.stdout is not None
        LineReader(loader.proc.stdout, watch.on_line)
        if not watch.started.wait(45.0) or watch.t0 is None:
            raise DemoError(f"the load client never reached the guest: {watch.error or ''}\n"
                            f"{loader.log_tail()}")
        t0 = watch.t0
        while time.monotonic() < t0 + opts.warmup_s:
            if not loader.alive():
                raise loader.died()
            view.update()
            time.sleep(POLL_S)

        guest_before = src_qmp.execute("x-query-guest-stats")
        events: list[dict[str, Any]] = []
        t_migrate, info = _migrate(src_qmp, opts, plan.migration_port, view, events)
        view.progress.set_phase("after the switchover: kv load on the "
                                + ("destination" if info["status"] == "completed"
                                   else "source"))
        while loader.alive():
            if time.monotonic() > t0 + opts.duration_s:
                view.progress.set_phase("reading back every acknowledged value")
            view.update()
            time.sleep(POLL_S)
        if not load_out.exists():
            raise DemoError(f"the load client wrote no result (status "
                            f"{loader.proc.returncode}):\n{loader.log_tail()}")
        load_doc = json.loads(load_out.read_text())
        load = load_doc["result"]
        runner = dst_qmp if info["status"] == "completed" else src_qmp
        guest = runner.execute("x-query-guest-stats")
        return {"migration": info, "load": load, "guest": guest,
                "demo": _demo_section(opts, t0, t_migrate, info, load, guest, guest_before,
                                      events)}
    finally:
        kids.stop_all()
        if tapnet is not None:
            tapnet.close()


def run_demo(opts: DemoOptions, console: Console | None = None) -> DemoOutcome:
    """Run the demo; print the live view and the summary on `console`."""
    opts.check()
    console = console or Console(highlight=False)
    own_dir = opts.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="ptmig-demo-")) if opts.run_dir is None \
        else opts.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = DemoPlan(opts, run_dir, switch_port=0, migration_port=free_port())
    old_term = _terminate_as_interrupt()
    try:
        with Children(run_dir) as kids, LiveView(console, live=opts.live) as view:
            doc = _drive(plan, kids, view)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every child process was stopped[/yellow]")
        if own_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        return DemoOutcome({}, EXIT_INTERRUPTED, run_dir)
    except DemoError as e:
        console.print(f"[red]ptmig demo failed:[/red] {e}")
        if own_dir:
            console.print(f"(logs kept in {run_dir})")
        return DemoOutcome({}, EXIT_DEMO_FAILED, run_dir)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    v = verdict(doc)
    doc["demo"]["verified"] = v.ok
    doc["demo"]["problems"] = v.problems
    console.print()
    for line in summary_lines(doc):
        style = "bold green" if line.startswith("VERIFIED") else (
            "bold red" if line.startswith("NOT VERIFIED") else None)
        console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(doc, indent=1) + "\n")
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
