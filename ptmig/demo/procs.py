"""The demo's child processes: the UDP switch, the two VMMs, the load client.

Each child runs in a process group of its own (so a Ctrl-C meant for the demo reaches the demo,
which then stops its children in order) and is stopped with its whole process group: first
politely (`quit` over QMP for a VMM), then SIGTERM, then SIGKILL (`ptmig.vmmproc.stop_process`;
the QMP client is `ptmig.vmmproc.QmpMonitor`).

The children stay in the demo's session. Where the kernel groups tasks by session for CPU
shares (autogroups, on by default), a child in a session of its own would be a scheduling
entity of its own: the destination VMM's migration threads, which `ptmig.migration.background`
puts below the guest's, would still take a whole session's share of the CPU from the source's
guest, and a frame-path process woken on a CPU they hold would wait for the next tick (a
SCHED_IDLE thread is preempted at once only by a task of its own group). One session puts the
whole demo, source, destination, switch and client, in one group, where those priorities hold;
on two hosts the destination would not compete at all. Measured (shadow, 1 GiB, 20,429 ops/s,
4 alternating runs each, idle host): kv p99 during pre-copy 10.3-11.3 ms with sessions, 7.4-9.4
with process groups, 3.8-6.5 with process groups and SCHED_IDLE migration threads.
`Children` is a context manager; leaving it, by return, exception or Ctrl-C, stops them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..errors import PtmigError
from ..vmmproc import QmpMonitor, VmmError, stop_process


class DemoError(PtmigError, RuntimeError):
    """The demo could not set up or run (as opposed to a migration that did not verify)."""


class Child:
    def __init__(
        self,
        name: str,
        args: list[str],
        log_path: Path,
        *,
        cwd: Path,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            process_group=0,  # in the demo's session: see above
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.qmp: QmpMonitor | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tell(self, line: str) -> None:
        """A line on the child's stdin (started with `stdin_pipe`); a child that has already
        exited is not an error here (its exit status says what happened)."""
        assert self.proc.stdin is not None, f"{self.name} has no stdin pipe"
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def died(self) -> DemoError:
        return DemoError(
            f"{self.name} exited early with status {self.proc.returncode}; "
            f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
        )

    def connect_qmp(self, path: Path, timeout: float = 60.0) -> QmpMonitor:
        monitor = QmpMonitor(path, self.name)
        try:
            monitor.connect(self.proc, timeout)
        except VmmError as e:
            raise (self.died() if not self.alive() else DemoError(str(e))) from None
        self.qmp = monitor
        return monitor

    def stop(self, grace_s: float = 5.0) -> None:
        qmp, self.qmp = self.qmp, None
        # The group: the child and whatever it spawned (device processes) that is still there.
        stop_process(
            self.proc,
            (lambda: qmp.execute("quit")) if qmp is not None else None,
            grace_s=grace_s,
            group=True,
        )
        if qmp is not None:
            qmp.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._log.close()


class Children:
    """The children of one demo run, stopped in reverse order of start."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.children: list[Child] = []

    def start(
        self, name: str, args: list[str], *, stdout_pipe: bool = False, stdin_pipe: bool = False
    ) -> Child:
        child = Child(
            name,
            args,
            self.cwd / f"{name}.log",
            cwd=self.cwd,
            stdout_pipe=stdout_pipe,
            stdin_pipe=stdin_pipe,
        )
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception:
                pass
        self.children.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: Any) -> None:
        # A second Ctrl-C during cleanup must not leave processes behind.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            self.stop_all()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class LineReader:
    """Reads a child's stdout lines in a thread and hands each to `on_line`."""

    def __init__(self, stream: IO[bytes], on_line: Callable[[str], None]) -> None:
        self._stream = stream
        self._on_line = on_line
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for raw in self._stream:
                self._on_line(raw.decode(errors="replace").rstrip("\n"))
        except (OSError, ValueError):
            pass
