"""SCHED_BATCH for the frame path: set for a block and restored, and in effect in the net
device and switch processes (woken per frame: they must not preempt the sender), not in the
blk device process (the guest waits for it)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from test_device_support import Guest, guest
from vmmrig import free_port

from ptmig.net.sched import batch_scheduling, use_batch_scheduling
from ptmig.net.switch import EXIT_ADDRESS_IN_USE, ensure_switch, probe_switch, switch_main

__all__ = ["guest"]  # the fixture, shared with the other device tests

T = TypeVar("T")
pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH here")


def in_thread(fn: Callable[[], T]) -> T:
    """Run fn on a fresh thread (the policy is per thread: pytest's own stays untouched)."""
    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_batch_scheduling_is_set_inside_and_restored_after() -> None:
    def body() -> tuple[bool, int, int]:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        with batch_scheduling() as active:
            inside = os.sched_getscheduler(0)
        return active, inside, os.sched_getscheduler(0)

    assert in_thread(body) == (True, os.SCHED_BATCH, os.SCHED_OTHER)


def test_use_batch_scheduling_sets_the_calling_thread_only() -> None:
    def body() -> tuple[bool, int]:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        return use_batch_scheduling(), os.sched_getscheduler(0)

    mine = os.sched_getscheduler(0)
    assert in_thread(body) == (True, os.SCHED_BATCH)
    assert os.sched_getscheduler(0) == mine


def test_a_switch_that_cannot_bind_leaves_the_policy_alone() -> None:
    def body() -> tuple[int, int]:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            status = switch_main(f"127.0.0.1:{taken.getsockname()[1]}")
        return status, os.sched_getscheduler(0)

    assert in_thread(body) == (EXIT_ADDRESS_IN_USE, os.SCHED_OTHER)


def test_net_device_runs_under_sched_batch_and_blk_device_does_not(
    guest: Guest, tmp_path: Path
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        net = guest.spawn(
            "net",
            {"mac": "52:54:00:12:34:56", "backend": f"fd:{theirs.fileno()}"},
            pass_fds=[theirs.fileno()],
        )
    finally:
        theirs.close()
    blk = guest.spawn("blk", {"path": str(tmp_path / "d.img"), "size": 1 << 20})
    try:
        deadline = time.monotonic() + 5
        while os.sched_getscheduler(net.pid) != os.SCHED_BATCH and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.sched_getscheduler(net.pid) == os.SCHED_BATCH
        assert os.sched_getscheduler(blk.pid) == os.sched_getscheduler(0) != os.SCHED_BATCH
    finally:
        ours.close()


def test_switch_process_runs_under_sched_batch() -> None:
    port = free_port(socket.SOCK_DGRAM)
    proc = ensure_switch("127.0.0.1", port)
    assert proc is not None and probe_switch("127.0.0.1", port) == proc.pid
    try:
        assert os.sched_getscheduler(proc.pid) == os.SCHED_BATCH
    finally:
        proc.terminate()
        proc.wait(10)
