"""The demo's children run in the demo's session, each in a process group of its own, and are
stopped with everything in that group (`ptmig.demo.procs`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ptmig.demo.procs import Children

# A child that starts a grandchild in its own process group and prints the grandchild's pid.
PARENT = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(g.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie whose parent is gone is reaped by init; ours are waited for
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


def test_a_child_shares_the_demo_session_in_its_own_group_and_its_group_is_stopped(
    tmp_path: Path,
) -> None:
    with Children(tmp_path) as kids:
        child = kids.start("parent", [sys.executable, "-c", PARENT], stdout_pipe=True)
        assert child.proc.stdout is not None
        grandchild = int(child.proc.stdout.readline())
        # one session for the whole demo: its CPU shares and idle priorities are one group
        assert os.getsid(child.proc.pid) == os.getsid(0)
        # a group of its own: a Ctrl-C at the terminal reaches the demo only
        assert os.getpgid(child.proc.pid) == child.proc.pid != os.getpgid(0)
        assert os.getpgid(grandchild) == child.proc.pid
    assert child.proc.returncode is not None
    assert _gone(grandchild)
