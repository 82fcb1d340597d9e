"""VMM child processes and the QMP client that drives them, for the demo, the benchmarks and the
tests alike.

`QmpMonitor` is a blocking client on `qemu.qmp` (its synchronous `legacy` wrapper): it waits
for a child's QMP socket (failing at once if the child exits), runs commands (an error reply is
a `VmmError` naming the VMM, the command and QMP's description), collects the asynchronous
events that arrive with the replies (each stamped `x-received`, this process's monotonic
clock), and waits for a run status or for the end of a migration. It drives QEMU just as well.

`run_command` is the command line of a `ptmig run` with a QMP socket and a console file;
`stop_process` stops a child: politely first (`quit` over QMP), then SIGTERM, then SIGKILL,
to its whole process group when it was started in a session of its own (a VMM's device
processes go with it). `free_port` and `ptmig_command` are the small helpers every launcher
needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import PtmigError

# query-migrate's end states (a post-copy paused by a lost connection waits for an operator)
FINISHED = ("completed", "failed", "cancelled", "x-unresolved", "postcopy-paused")
POLL_S = 0.05


class VmmError(PtmigError, RuntimeError):
    """A VMM child exited early, did not reach a state in time, or refused a QMP command."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that is free now (the kernel's pick): TCP, or SOCK_DGRAM."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ptmig_command(*args: str) -> list[str]:
    """`python -m ptmig.cli ...` with this interpreter, so it works from any virtualenv."""
    return [sys.executable, "-m", "ptmig.cli", *args]


def run_command(config: Path, qmp_path: Path, console: Path, *extra: str) -> list[str]:
    """`ptmig run CONFIG` with its QMP socket at `qmp_path` and the guest's console in a file."""
    return ptmig_command(
        "run", str(config), "--qmp", f"unix:{qmp_path}", "--console", str(console), *extra
    )


def _ensure_event_loop() -> None:
    """The legacy client runs on the thread's default event loop, which an `asyncio.run()` in
    the same thread closes and unsets: give it a fresh one then."""
    try:
        asyncio.get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())


class QmpMonitor:
    """One QMP connection to a VMM, opened by `connect` and kept until `close`."""

    def __init__(self, path: Path, name: str = "vmm") -> None:
        self.path = Path(path)
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._qmp: Any = None

    def connect(self, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
        """Wait for the socket and connect; VmmError if `proc` exits first or time runs out."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # an early refusal is retried
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise VmmError(
                    f"{self.name} exited with status {proc.returncode} before its QMP socket "
                    f"{self.path} could be used"
                )
            if self.path.exists():
                _ensure_event_loop()
                qmp = QEMUMonitorProtocol(str(self.path))
                try:
                    qmp.connect()
                    self._qmp = qmp
                    return
                except Exception:
                    qmp.close()
            if time.monotonic() > deadline:
                raise VmmError(f"{self.name}: no QMP socket at {self.path} after {timeout} s")
            time.sleep(POLL_S)

    @property
    def connected(self) -> bool:
        return self._qmp is not None

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run `command`; its `return` value, or VmmError with QMP's error description."""
        if self._qmp is None:
            raise VmmError(f"{self.name} {command}: not connected to {self.path}")
        reply = self._qmp.cmd(command, arguments)
        now = time.monotonic()
        self.events.extend(dict(ev, **{"x-received": now}) for ev in self._qmp.get_events())
        if "error" in reply:
            raise VmmError(f"{self.name} {command}: {reply['error'].get('desc')}")
        return reply["return"]

    def status(self) -> str:
        return str(self.execute("query-status")["status"])

    def wait_status(
        self,
        wanted: str | tuple[str, ...],
        timeout: float = 60.0,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> str:
        """Until `query-status` is one of `wanted`; VmmError if `proc` exits or time runs out."""
        wanted = (wanted,) if isinstance(wanted, str) else wanted
        deadline = time.monotonic() + timeout
        while (status := self.status()) not in wanted:
            if proc is not None and proc.poll() is not None:
                raise VmmError(f"{self.name} exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise VmmError(
                    f"{self.name}: still {status!r}, not {' or '.join(wanted)}, after {timeout} s"
                )
            time.sleep(POLL_S)
        return status

    def wait_migration(self, timeout: float = 60.0, poll_s: float = 0.02) -> dict[str, Any]:
        """The final `query-migrate` of the migration in flight (completed, failed, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.execute("query-migrate")
            if info.get("status") in FINISHED:
                return info
            if time.monotonic() > deadline:
                raise VmmError(
                    f"{self.name}: migration still {info.get('status')!r} after {timeout} s"
                )
            time.sleep(poll_s)

    def close(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            try:
                qmp.close()
            except Exception:
                pass

    def __enter__(self) -> QmpMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_process(
    proc: subprocess.Popen[bytes],
    quit: Callable[[], object] | None = None,
    *,
    grace_s: float = 10.0,
    group: bool = False,
) -> int | None:
    """Stop a child: `quit()` (a VMM's QMP `quit`) and, if that was sent, up to `grace_s` for it
    to exit, then
    SIGTERM, then SIGKILL. With `group` the signals go to its process group (it was started
    with `start_new_session` or `process_group=0`), so what it spawned goes too, even after it
    exited itself.
    Returns the exit status."""
    if quit is not None and proc.poll() is None:
        try:
            quit()
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except Exception:  # no QMP to ask: go on with the signals at once
            pass
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            if group:
                os.killpg(proc.pid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)
            else:
                break
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    return proc.returncode
