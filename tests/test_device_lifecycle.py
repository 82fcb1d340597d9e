"""Device process life and death as the VMM sees it through DeviceHandle."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_device_support import Guest, cpu_ticks, driver_init, guest, wait_for

from ptmig.devices.handle import (
    DeviceCommandError,
    DeviceGoneError,
    DeviceStartError,
    DeviceTimeoutError,
)
from ptmig.devices.virtio import constants as c

__all__ = ["guest"]

FEATURES = c.feature_mask(c.VIRTIO_F_VERSION_1)


def test_kill_is_reported_and_later_calls_fail(guest: Guest, tmp_path: Path) -> None:
    h = guest.spawn("blk", {"path": str(tmp_path / "d.img"), "size": 65536})
    assert h.alive and h.stats()["requests"] == 0
    os.kill(h.pid, signal.SIGKILL)
    wait_for(lambda: any(e.name == "gone" for e in guest.events))
    gone = next(e for e in guest.events if e.name == "gone")
    assert "SIGKILL" in gone.data["reason"] and not gone.data["expected"]
    assert not h.alive and "SIGKILL" in (h.gone_reason or "")
    with pytest.raises(DeviceGoneError, match="SIGKILL"):
        h.stats()
    with pytest.raises(DeviceGoneError):
        h.mmio_read(0, 4)


def test_idle_device_uses_no_cpu(guest: Guest, tmp_path: Path) -> None:
    blk = guest.spawn("blk", {"path": str(tmp_path / "d.img"), "size": 65536})
    driver_init(blk, {0: guest.queue(0)}, FEATURES | (1 << c.VIRTIO_BLK_F_FLUSH))
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    net = guest.spawn("net", {"backend": f"fd:{b.fileno()}"}, pass_fds=[b.fileno()])
    b.close()
    time.sleep(0.3)  # let start-up work finish
    before = {h.pid: cpu_ticks(h.pid) for h in (blk, net)}
    time.sleep(1.0)
    for h in (blk, net):
        used = cpu_ticks(h.pid) - before[h.pid]
        assert used <= 2, f"{h.name} used {used} clock ticks while idle for 1 s"
    a.close()


def test_startup_failure_reports_reason(guest: Guest, tmp_path: Path) -> None:
    with pytest.raises(DeviceStartError, match="does not exist and no size"):
        guest.spawn("blk", {"path": str(tmp_path / "missing.img")})
    with pytest.raises(DeviceStartError, match="unknown virtio-blk config keys"):
        guest.spawn("blk", {"path": str(tmp_path / "x.img"), "size": 4096, "bogus": 1})


def test_requests_from_many_threads(guest: Guest, tmp_path: Path) -> None:
    h = guest.spawn("blk", {"path": str(tmp_path / "d.img"), "size": 65536})
    errors: list[BaseException] = []
    values: list[int] = []

    def worker() -> None:
        try:
            for _ in range(50):
                values.append(h.mmio_read(c.REG_MAGIC_VALUE, 4))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and values == [c.MMIO_MAGIC] * 400


def test_timeout_then_recovery(guest: Guest, tmp_path: Path) -> None:
    h = guest.spawn("blk", {"path": str(tmp_path / "d.img"), "size": 65536})
    os.kill(h.pid, signal.SIGSTOP)
    try:
        with pytest.raises(DeviceTimeoutError):
            h.request("stats", timeout=0.3)
    finally:
        os.kill(h.pid, signal.SIGCONT)
    assert h.alive and h.stats()["control_requests"] >= 2


def test_bad_command_arguments_are_refused(guest: Guest, tmp_path: Path) -> None:
    h = guest.spawn("blk", {"path": str(tmp_path / "d.img"), "size": 65536})
    with pytest.raises(DeviceCommandError, match="offset"):
        h.request("mmio_read", {"offset": "zero", "size": 4})
    with pytest.raises(DeviceCommandError, match="never started"):
        h.dma_log_harvest()
    assert h.mmio_read(0x1000, 4) == 0  # out of the window: ignored, reads 0
    assert h.stats()["bad_register_accesses"] == 1


def test_close_is_clean(guest: Guest, tmp_path: Path) -> None:
    h = guest.spawn("blk", {"path": str(tmp_path / "d.img"), "size": 65536})
    pid = h.pid
    h.close()
    assert not h.alive and h.gone_reason == "closed by the VMM"
    wait_for(lambda: any(e.name == "gone" for e in guest.events))
    assert next(e for e in guest.events if e.name == "gone").data["expected"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
