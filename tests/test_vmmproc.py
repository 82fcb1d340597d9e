"""The shared VMM-process helper (`ptmig.vmmproc`): the QMP client against ptmig's own QMP
server, and stopping children politely, then by force, process group included. No KVM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ptmig.qmp.server import QmpServer
from ptmig.qmp.session import ErrorClass, QmpError, RunStatus, query_status_reply
from ptmig.vmmproc import QmpMonitor, VmmError, stop_process

pytestmark = pytest.mark.timeout(120)


class FakeVmm:
    """QMP commands of a VMM whose guest becomes `running` after a few `query-status`es."""

    def __init__(self, server: QmpServer) -> None:
        self.server = server
        self.polls = 0
        self.quit = threading.Event()
        server.register("query-status", self.query_status)
        server.register("query-migrate", lambda: {"status": "completed", "total-time": 7})
        server.register("quit", self.quit.set)
        server.register("fail", self.fail)

    def query_status(self) -> dict[str, Any]:
        self.polls += 1
        if self.polls == 2:
            self.server.emit("RESUME")
        return query_status_reply(RunStatus.RUNNING if self.polls >= 3 else RunStatus.PRELAUNCH)

    def fail(self) -> None:
        raise QmpError(ErrorClass.GENERIC_ERROR, "the guest is in state 'shutdown'")


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[tuple[Path, FakeVmm]]:
    path = tmp_path / "vmm.qmp"
    with QmpServer(str(path)) as server:
        yield path, FakeVmm(server)


def test_commands_statuses_and_events_over_qmp(vmm: tuple[Path, FakeVmm]) -> None:
    path, fake = vmm
    with QmpMonitor(path, "src") as q:
        q.connect(timeout=30)
        assert q.wait_status("running", timeout=30) == "running"
        assert fake.polls == 3
        assert [e["event"] for e in q.events] == ["RESUME"] and "x-received" in q.events[0]
        assert q.wait_migration(timeout=30)["total-time"] == 7
        with pytest.raises(VmmError, match=r"^src fail: the guest is in state 'shutdown'$"):
            q.execute("fail")
        q.execute("quit")
        assert fake.quit.is_set()


def test_connect_fails_at_once_when_the_process_exits(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(VmmError, match="exited with status 3 before its QMP socket"):
        QmpMonitor(tmp_path / "never.qmp", "dst").connect(proc, timeout=600)


def test_a_command_before_connecting_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VmmError, match="not connected"):
        QmpMonitor(tmp_path / "x.qmp").execute("query-status")


# A child that ignores SIGTERM and leaves a grandchild in its process group: only SIGKILL to
# the group ends both. It reports the grandchild's pid, then that it is ready.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
kid = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(kid.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped later by its parent or init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_process_kills_the_whole_group_when_quit_is_ignored() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    asked: list[bool] = []
    code = stop_process(proc, lambda: asked.append(True), grace_s=0.2, group=True)
    assert asked == [True]
    assert code == -signal.SIGKILL
    for _ in range(200):  # the grandchild's end is asynchronous (init reaps it)
        if not _alive(grandchild):
            break
        threading.Event().wait(0.05)
    assert not _alive(grandchild)
    proc.stdout.close()


def test_a_failing_quit_goes_straight_to_the_signals() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    def broken_quit() -> None:
        raise VmmError("no QMP")

    assert stop_process(proc, broken_quit, grace_s=600) == -signal.SIGTERM
