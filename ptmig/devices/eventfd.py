"""Eventfd helpers shared by the VMM side and the device process.

Owns the one convention both sides rely on: every eventfd ptmig creates for a device (one doorbell
per virtqueue, one interrupt) is non-blocking and close-on-exec. Non-blocking matters because the
flag lives on the open file description, which the VMM and the device process share after the fd
is passed: a reader on either side must poll first and then read, never block in ``read``.
"""

from __future__ import annotations

import os


def create() -> int:
    """Create a non-blocking, close-on-exec eventfd with counter 0 and return its fd."""
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def signal(fd: int, value: int = 1) -> None:
    """Add ``value`` to the eventfd counter (wakes every poller of ``fd``)."""
    if value <= 0:
        raise ValueError(f"eventfd signal value must be positive, got {value}")
    os.eventfd_write(fd, value)


def drain(fd: int) -> int:
    """Read and reset the counter; return how many signals were pending (0 if none)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
