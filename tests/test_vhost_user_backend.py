"""The vhost-user frontend against a real backend, qemu-storage-daemon, without KVM.

The test plays the guest driver (register writes, a split ring in guest RAM); the frontend talks
to a daemon it spawned on an image. Shown: I/O through the backend reaches the image and guest
RAM; the backend's own dirty log holds the pages it wrote; stopping the rings exactly and
programming a second frontend + daemon from the first one's state continues the ring (what a
migration does); a killed daemon is reported as a gone device and nothing raises in the VMM.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from vmmrig import needs_storage_daemon

from ptmig.devices.handle import DeviceEvent, DeviceGoneError
from ptmig.devices.vhost_user.daemon import StorageDaemon
from ptmig.devices.vhost_user.frontend import VhostUserBlk
from ptmig.devices.virtio import constants as c
from ptmig.devices.virtio.testing import Buffer, DriverQueue
from ptmig.memory import GuestMemory

pytestmark = [
    needs_storage_daemon,
    pytest.mark.timeout(60),
]

MEM = 16 << 20
IMAGE = 16 << 20
RING_GPA = 0x100000
DATA_GPA = 0x300000
QSIZE = 64


class _GuestView:
    """GuestMemory as the test driver's memory (DriverMemory protocol)."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem, self.base, self.buf = mem, 0, mem.view

    def read(self, addr: int, length: int) -> bytes:
        return self.mem.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.mem.write(addr, data)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(MEM)
    yield m
    m.close()


def _open(tmp_path: Path, mem: GuestMemory, name: str = "vd0") -> VhostUserBlk:
    return VhostUserBlk.open(
        name, 0, mem, image=tmp_path / "disk.img", size=IMAGE, spawn="qemu-storage-daemon"
    )


def _bring_up(dev: VhostUserBlk, q: DriverQueue) -> None:
    """What the guest's virtio-mmio driver writes, up to and including DRIVER_OK."""
    _set_up_queue(dev, q)
    dev.mmio_write(c.REG_STATUS, 4, ALL_STATUS)
    assert dev.mmio_read(c.REG_STATUS, 4) & c.STATUS_DRIVER_OK


ALL_STATUS = c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK | c.STATUS_DRIVER_OK


def _set_up_queue(dev: VhostUserBlk, q: DriverQueue) -> None:
    """Features (VERSION_1 and FLUSH) and queue 0, everything but DRIVER_OK."""
    w = dev.mmio_write
    w(c.REG_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    w(c.REG_DRIVER_FEATURES_SEL, 4, 1)
    w(c.REG_DRIVER_FEATURES, 4, 1)  # VERSION_1 (bit 32)
    w(c.REG_DRIVER_FEATURES_SEL, 4, 0)
    w(c.REG_DRIVER_FEATURES, 4, 1 << 9)  # FLUSH
    w(c.REG_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK)
    assert dev.mmio_read(c.REG_STATUS, 4) & c.STATUS_FEATURES_OK
    w(c.REG_QUEUE_SEL, 4, 0)
    w(c.REG_QUEUE_NUM, 4, q.size)
    for reg, addr in (
        (c.REG_QUEUE_DESC_LOW, q.desc_addr),
        (c.REG_QUEUE_DRIVER_LOW, q.avail_addr),
        (c.REG_QUEUE_DEVICE_LOW, q.used_addr),
    ):
        w(reg, 4, addr & 0xFFFFFFFF)
        w(reg + 4, 4, addr >> 32)
    w(c.REG_QUEUE_READY, 4, 1)


def _request(
    dev: VhostUserBlk, q: DriverQueue, kind: int, sector: int, data: bytes | int
) -> tuple[int, bytes]:
    """One blk request (OUT with bytes, IN of n bytes); returns (status, data read)."""
    hdr = q.alloc(16, struct.pack("<IIQ", kind, 0, sector))
    status = q.alloc(1, b"\xff")
    if isinstance(data, bytes):
        buf = q.alloc(len(data), data, align=4096)
        chain = [Buffer(hdr, 16), Buffer(buf, len(data)), Buffer(status, 1, True)]
        length = len(data)
    else:
        buf = q.alloc(data, align=4096)
        chain = [Buffer(hdr, 16), Buffer(buf, data, True), Buffer(status, 1, True)]
        length = data
    before = q.used_idx()
    q.add_chain(chain)
    dev.kick(0)  # what the guest's QueueNotify does through KVM_IOEVENTFD
    deadline = time.monotonic() + 10
    while q.used_idx() == before:
        assert time.monotonic() < deadline, "the backend did not complete the request"
        time.sleep(0.0005)
    q.take_used()
    return q.mem.read(status, 1)[0], q.mem.read(buf, length)


def _queue(mem: GuestMemory) -> DriverQueue:
    return DriverQueue(_GuestView(mem), QSIZE, base=RING_GPA, data_start=DATA_GPA, data_end=MEM)


def test_requests_through_the_backend_reach_the_image_and_guest_ram(
    tmp_path: Path, mem: GuestMemory
) -> None:
    with _open(tmp_path, mem) as dev:
        assert dev.config[:8] == struct.pack("<Q", IMAGE // 512)  # capacity from GET_CONFIG
        q = _queue(mem)
        _bring_up(dev, q)
        payload = os.urandom(4096)
        assert _request(dev, q, 1, 8, payload)[0] == 0
        status, back = _request(dev, q, 0, 8, 4096)
        assert status == 0 and back == payload
    with open(tmp_path / "disk.img", "rb") as f:
        f.seek(8 * 512)
        assert f.read(4096) == payload


def test_the_backends_dirty_log_holds_the_pages_it_wrote(tmp_path: Path, mem: GuestMemory) -> None:
    with _open(tmp_path, mem) as dev:
        q = _queue(mem)
        _bring_up(dev, q)
        assert _request(dev, q, 1, 0, b"x" * 8192)[0] == 0
        mem.take_vmm_dirty()
        dev.dma_log_start()
        dev.dma_log_harvest()  # from zero
        status, _ = _request(dev, q, 0, 0, 8192)
        assert status == 0
        log = np.unpackbits(dev.dma_log_harvest(), bitorder="little")
        # the IN's data pages (the last two 4 KiB-aligned allocations before the status byte)
        # and the used ring's page are in the backend's log ...
        used_page = q.used_addr // 4096
        assert log[used_page], "the used ring's page is not in the backend's log"
        written = np.flatnonzero(log)
        data_pages = [p for p in written if p * 4096 >= DATA_GPA]
        assert len(data_pages) >= 2, f"data pages missing from the log: {written}"
        # ... and a harvest takes them: the next one is empty
        assert not dev.dma_log_harvest().any()


def test_exact_stop_and_a_second_backend_continues_the_ring(
    tmp_path: Path, mem: GuestMemory
) -> None:
    src = _open(tmp_path, mem, "src")
    try:
        q = _queue(mem)
        _bring_up(dev := src, q)
        for i in range(5):
            assert _request(dev, q, 1, i, bytes([i]) * 512)[0] == 0
        state = src.quiesce()
        assert state["queues"]["0"]["next_avail"] == 5
        saved = src.get_state()
    finally:
        src.close()
    # the "destination": its own daemon on the shared image, programmed from the state
    with _open(tmp_path, mem, "dst") as dst:
        dst.set_state(saved)
        for i in range(5):
            status, data = _request(dst, q, 0, i, 512)
            assert status == 0 and data == bytes([i]) * 512
        assert q.used_idx() == 10


def test_a_killed_backend_is_reported_gone_and_nothing_raises_in_the_vmm(
    tmp_path: Path, mem: GuestMemory
) -> None:
    with _open(tmp_path, mem) as dev:
        events: list[DeviceEvent] = []
        seen = threading.Event()

        def record(ev: DeviceEvent) -> None:
            events.append(ev)
            seen.set()

        dev.on_event(record)
        q = _queue(mem)
        _bring_up(dev, q)
        assert dev.pid is not None
        os.kill(dev.pid, signal.SIGKILL)
        assert seen.wait(5), "no gone event after the daemon was killed"
        assert events[0].name == "gone" and "SIGKILL" in events[0].data["reason"]
        assert not dev.alive
        # the guest's view: the device needs a reset; register accesses still work
        assert dev.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
        dev.mmio_write(c.REG_QUEUE_NOTIFY, 4, 0)
        with pytest.raises(DeviceGoneError, match="SIGKILL"):
            dev.quiesce()
        dev.mmio_write(c.REG_STATUS, 4, 0)  # a guest reset with the backend gone: no raise


def test_a_guest_reset_with_a_request_in_flight_keeps_the_backend(
    tmp_path: Path, mem: GuestMemory
) -> None:
    """GET_VRING_BASE does not wait for a request the daemon has taken; stopping the ring under
    it would make the completion hit closed fds and the daemon drop us. The reset waits first."""
    with _open(tmp_path, mem) as dev:
        q = _queue(mem)
        _bring_up(dev, q)
        hdr = q.alloc(16, struct.pack("<IIQ", 0, 0, 0))
        buf = q.alloc(8 << 20, align=4096)
        status = q.alloc(1, b"\xff")
        q.add_chain([Buffer(hdr, 16), Buffer(buf, 8 << 20, True), Buffer(status, 1, True)])
        dev.kick(0)
        dev.mmio_write(c.REG_STATUS, 4, 0)  # the driver resets the device at once
        assert mem.read(status, 1) == b"\0", "the reset did not wait for the request"
        time.sleep(0.2)
        assert dev.alive, dev.gone_reason
        q2 = DriverQueue(
            _GuestView(mem), QSIZE, base=RING_GPA + 0x8000, data_start=DATA_GPA, data_end=MEM
        )
        _bring_up(dev, q2)
        assert _request(dev, q2, 0, 0, 4096)[0] == 0


def test_a_backend_someone_else_runs_is_used_through_its_socket(
    tmp_path: Path, mem: GuestMemory
) -> None:
    other = StorageDaemon("ext", tmp_path / "ext.img", IMAGE, tmp_path / "ext.sock")
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "ext.sock").exists():
            assert time.monotonic() < deadline and other.exit_reason() is None
            time.sleep(0.02)
        with VhostUserBlk.open("vd", 0, mem, socket_path=tmp_path / "ext.sock") as dev:
            assert dev.pid is None  # not ours to supervise
            q = _queue(mem)
            _bring_up(dev, q)
            assert _request(dev, q, 1, 3, b"e" * 512)[0] == 0
        assert other.exit_reason() is None  # closing our frontend leaves their daemon running
    finally:
        other.stop()
    with open(tmp_path / "ext.img", "rb") as f:
        f.seek(3 * 512)
        assert f.read(512) == b"e" * 512


def test_a_missing_backend_socket_is_a_clear_error(tmp_path: Path, mem: GuestMemory) -> None:
    with pytest.raises(DeviceGoneError, match="cannot connect to the vhost-user backend at"):
        VhostUserBlk.open("vd", 0, mem, socket_path=tmp_path / "nobody.sock")


def test_quiesce_completes_a_request_published_without_its_kick(
    tmp_path: Path, mem: GuestMemory
) -> None:
    """A vCPU paused between publishing avail idx and its QueueNotify: the backend does not
    poll, so quiesce kicks the ring itself and the request completes before the ring stops."""
    with _open(tmp_path, mem) as dev:
        q = _queue(mem)
        _bring_up(dev, q)
        assert _request(dev, q, 1, 0, b"k" * 512)[0] == 0
        hdr = q.alloc(16, struct.pack("<IIQ", 0, 0, 0))
        buf = q.alloc(512, align=4096)
        status = q.alloc(1, b"\xff")
        q.add_chain([Buffer(hdr, 16), Buffer(buf, 512, True), Buffer(status, 1, True)])
        state = dev.quiesce()  # no kick from the "guest"
        assert state["queues"]["0"]["next_avail"] == 2 and q.used_idx() == 2
        assert mem.read(status, 1) == b"\0" and mem.read(buf, 512) == b"k" * 512
