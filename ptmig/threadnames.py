"""OS names for the VMM's Python threads, so per-thread tools can tell them apart (Linux).

Python 3.11 names a thread for Python only: the kernel sees every thread of the VMM as
`python3`, so `/proc/PID/task/TID/comm`, `top -H` and `perf report --sort comm` cannot say
which one is the migration sender, a receiver or the shadow engine. `install()` (called once,
at the VMM's start, before its threads) makes each thread that `threading` starts afterwards
give itself its Python name as its OS name when it begins to run (`prctl(PR_SET_NAME)` names
only the calling thread, so it has to happen inside the new thread): a one-shot
`threading.setprofile` hook that removes itself on its first event, so the thread runs
unprofiled from then on. The kernel keeps 15 bytes of a name; `os_name` says which.
"""

from __future__ import annotations

import ctypes
import re
import sys
import threading
from types import FrameType
from typing import Any

from .memstats import libc

_PR_SET_NAME = 15
COMM_LEN = 15  # TASK_COMM_LEN less the terminating NUL
# threading's default name for a thread with a target: "Thread-3 (receiver)"
_DEFAULT = re.compile(r"Thread-\d+ \((.+)\)")


def os_name(name: str) -> str:
    """The OS name for a thread named `name` in Python: a default name "Thread-N (target)"
    becomes the target's name, and the whole is cut to what the kernel keeps (15 bytes)."""
    m = _DEFAULT.fullmatch(name)
    if m:
        name = m.group(1)
    return name.encode("utf-8", "replace")[:COMM_LEN].decode("utf-8", "ignore")


def set_current(name: str) -> bool:
    """Give the calling thread the OS name `os_name(name)`; False if the kernel refused."""
    raw = ctypes.c_char_p(os_name(name).encode())
    return int(libc().prctl(_PR_SET_NAME, raw, 0, 0, 0)) == 0


def _name_once(frame: FrameType, event: str, arg: Any) -> None:
    sys.setprofile(None)
    set_current(threading.current_thread().name)


def install() -> None:
    """Name each thread `threading` starts from now on after itself (see the module's text)."""
    threading.setprofile(_name_once)
