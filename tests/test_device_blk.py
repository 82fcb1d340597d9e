"""virtio-blk through a real device process: the test plays the guest driver over a shared
memfd; the device DMAs through the IOMMU and does real I/O on an image file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from test_device_support import Guest, driver_init, guest, kick, kick_and_wait, wait_for

from ptmig.devices.handle import DeviceCommandError, DeviceHandle
from ptmig.devices.virtio import constants as c
from ptmig.devices.virtio.testing import Buffer, DriverQueue
from ptmig.iommu import PAGE_SIZE

__all__ = ["guest"]  # the fixture, re-exported for pytest

FEATURES = c.feature_mask(c.VIRTIO_F_VERSION_1, c.VIRTIO_BLK_F_FLUSH)
IMAGE_SIZE = 1 << 20


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.fixture(autouse=True, params=["native", "python"])
def datapath(request: pytest.FixtureRequest, guest: Guest) -> str:
    """Every test runs on both request paths: the native one (the default) and the Python one."""
    guest.datapath = str(request.param)
    return guest.datapath


def start(guest: Guest, tmp_path: Path, **cfg: object) -> tuple[DeviceHandle, DriverQueue]:
    h = guest.spawn("blk", {"path": str(tmp_path / "disk.img"), "size": IMAGE_SIZE, **cfg})
    dq = guest.queue(0)
    driver_init(h, {0: dq}, FEATURES)
    return h, dq


def request(
    dq: DriverQueue, rtype: int, sector: int, data: bytes = b"", read_len: int = 0, split: int = 1
) -> tuple[int, list[Buffer]]:
    """Build a request chain; data split across `split` descriptors. Returns (head, bufs)."""
    bufs = [Buffer(dq.alloc(16, hdr(rtype, sector)), 16)]
    payload_len = len(data) or read_len
    step = payload_len // split if payload_len else 0
    for i in range(split if payload_len else 0):
        n = step if i < split - 1 else payload_len - step * (split - 1)
        chunk = data[i * step : i * step + n] if data else None
        bufs.append(Buffer(dq.alloc(n, chunk), n, writable=not data))
    bufs.append(Buffer(dq.alloc(1, b"\xee"), 1, writable=True))
    return dq.add_chain(bufs), bufs


def status_of(guest: Guest, bufs: list[Buffer]) -> int:
    return guest.mem.read(bufs[-1].addr, 1)[0]


def test_write_then_read_back(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    data = os.urandom(8192)
    head, wbufs = request(dq, c.VIRTIO_BLK_T_OUT, 8, data, split=3)
    assert kick_and_wait(h, dq, 0) == [(head, 1)]
    assert status_of(guest, wbufs) == c.VIRTIO_BLK_S_OK
    with open(tmp_path / "disk.img", "rb") as f:
        f.seek(8 * 512)
        assert f.read(8192) == data
    head, rbufs = request(dq, c.VIRTIO_BLK_T_IN, 8, read_len=8192, split=2)
    assert kick_and_wait(h, dq, 0) == [(head, 8192 + 1)]
    assert status_of(guest, rbufs) == c.VIRTIO_BLK_S_OK
    got = b"".join(guest.mem.read(b.addr, b.length) for b in rbufs[1:-1])
    assert got == data
    stats = h.stats()
    assert stats["requests"] == 2 and stats["bytes"] == 16384 and stats["faults"] == 0
    assert stats["datapath"] == guest.datapath  # the native path did not silently fall back
    assert stats["device"]["writes"] == 1 and stats["device"]["reads"] == 1


def test_capacity_and_get_id(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path, serial="disk-42")
    capacity = h.mmio_read(c.REG_CONFIG + c.BLK_CONFIG_CAPACITY, 8)
    assert capacity == IMAGE_SIZE // 512
    head, bufs = request(dq, c.VIRTIO_BLK_T_GET_ID, 0, read_len=20)
    assert kick_and_wait(h, dq, 0) == [(head, 21)]
    assert guest.mem.read(bufs[1].addr, 20) == b"disk-42".ljust(20, b"\0")


def test_flush_calls_fdatasync_and_data_persists(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    data = b"\x5a" * 512
    request(dq, c.VIRTIO_BLK_T_OUT, 3, data)
    head, bufs = request(dq, c.VIRTIO_BLK_T_FLUSH, 0)
    used = kick_and_wait(h, dq, 0, count=2)
    assert used[-1] == (head, 1)
    assert status_of(guest, bufs) == c.VIRTIO_BLK_S_OK
    assert h.stats()["device"]["flushes"] == 1
    h.close()
    fd = os.open(tmp_path / "disk.img", os.O_RDONLY)
    try:
        assert os.pread(fd, 512, 3 * 512) == data
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "sector,length",
    [(IMAGE_SIZE // 512, 512), (IMAGE_SIZE // 512 - 1, 1024), (2**63, 512), (0, 100)],
)
def test_bad_sector_range_is_ioerr(guest: Guest, tmp_path: Path, sector: int, length: int) -> None:
    h, dq = start(guest, tmp_path)
    head, bufs = request(dq, c.VIRTIO_BLK_T_IN, sector, read_len=length)
    assert kick_and_wait(h, dq, 0) == [(head, 1)]
    assert status_of(guest, bufs) == c.VIRTIO_BLK_S_IOERR
    assert guest.mem.read(bufs[1].addr, length) == bytes(length)
    head, bufs = request(dq, c.VIRTIO_BLK_T_OUT, sector, b"x" * length)
    assert kick_and_wait(h, dq, 0) == [(head, 1)]
    assert status_of(guest, bufs) == c.VIRTIO_BLK_S_IOERR
    assert os.path.getsize(tmp_path / "disk.img") == IMAGE_SIZE
    assert h.stats()["faults"] == 0


def test_unknown_request_type_is_unsupp(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    head, bufs = request(dq, 77, 0)
    assert kick_and_wait(h, dq, 0) == [(head, 1)]
    assert status_of(guest, bufs) == c.VIRTIO_BLK_S_UNSUPP


def test_hostile_ring_needs_reset_and_device_survives(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    # a descriptor loop: 0 -> 1 -> 0
    dq.write_desc(0, dq.alloc(16, hdr(c.VIRTIO_BLK_T_IN)), 16, c.VIRTQ_DESC_F_NEXT, 1)
    dq.write_desc(1, dq.alloc(512), 512, c.VIRTQ_DESC_F_NEXT, 0)
    dq.write_avail_entry(0, 0)
    dq.write_avail_idx(1)
    kick(h, 0)
    wait_for(lambda: any(e.name == "needs_reset" for e in guest.events))
    fault = next(e for e in guest.events if e.name == "fault")
    assert fault.data["queue"] == 0 and "loop" in fault.data["reason"]
    assert h.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
    assert h.alive and h.stats()["faults"] == 1
    # more doorbells do nothing while broken
    kick(h, 0)
    assert not h.wait_interrupt(0.2) or dq.used_idx() == 0
    # a reset and a fresh driver bring it back
    dq2 = guest.queue(1)
    driver_init(h, {0: dq2}, FEATURES)
    head, bufs = request(dq2, c.VIRTIO_BLK_T_OUT, 0, b"y" * 512)
    assert kick_and_wait(h, dq2, 0) == [(head, 1)]
    assert status_of(guest, bufs) == c.VIRTIO_BLK_S_OK


def test_the_vmm_marks_a_device_for_reset_and_a_driver_reset_brings_it_back(
    guest: Guest, tmp_path: Path
) -> None:
    """What the shadow engine does to a device it could not take out of shadow mode: the
    device stops at once (nothing more is taken from its rings), tells a running driver by a
    configuration change interrupt, and works again after the driver's reset."""
    h, dq = start(guest, tmp_path)
    with pytest.raises(DeviceCommandError, match="reason"):
        h.needs_reset("")
    assert not h.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
    h.needs_reset("leaving shadow mode failed: injected")
    assert h.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
    assert h.wait_interrupt(5.0)
    assert h.mmio_read(c.REG_INTERRUPT_STATUS, 4) & c.INTERRUPT_CONFIG_CHANGE
    wait_for(lambda: any(e.name == "needs_reset" for e in guest.events))
    event = next(e for e in guest.events if e.name == "needs_reset")
    assert event.data["reason"] == "leaving shadow mode failed: injected"
    assert h.stats()["broken"] == "leaving shadow mode failed: injected"
    head, bufs = request(dq, c.VIRTIO_BLK_T_OUT, 0, b"n" * 512)
    kick(h, 0)
    assert not h.wait_interrupt(0.3)
    assert dq.used_idx() == 0 and status_of(guest, bufs) == 0xEE
    dq2 = guest.queue(1)
    driver_init(h, {0: dq2}, FEATURES)  # a reset, then a fresh driver
    assert h.stats()["broken"] is None
    head, bufs = request(dq2, c.VIRTIO_BLK_T_OUT, 0, b"y" * 512)
    assert kick_and_wait(h, dq2, 0) == [(head, 1)]
    assert status_of(guest, bufs) == c.VIRTIO_BLK_S_OK


def test_avail_idx_far_ahead_is_a_fault(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    dq.write_avail_idx(1000)
    kick(h, 0)
    wait_for(lambda: any(e.name == "fault" for e in guest.events))
    assert "ahead" in next(e for e in guest.events if e.name == "fault").data["reason"]
    assert h.alive and h.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET


def test_iommu_fault_leaves_memory_untouched(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    (tmp_path / "disk.img").write_bytes(b"\x77" * IMAGE_SIZE)
    # data buffer spans two pages; the second page is unmapped
    page = 0x300000
    guest.iommu.unmap(page // PAGE_SIZE + 1)
    assert h.iotlb_invalidate() == guest.iommu.generation
    sentinel = b"\xab" * (2 * PAGE_SIZE)
    guest.mem.write(page, sentinel)
    status_addr = dq.alloc(1, b"\xee")
    dq.add_chain(
        [
            Buffer(dq.alloc(16, hdr(c.VIRTIO_BLK_T_IN, 0)), 16),
            Buffer(page + 2048, 4096, writable=True),
            Buffer(status_addr, 1, writable=True),
        ]
    )
    kick(h, 0)
    wait_for(lambda: any(e.name == "fault" for e in guest.events))
    fault = next(e for e in guest.events if e.name == "fault")
    assert fault.data["error"] == "DmaFault" and fault.data["iova"] == page + 2048
    assert guest.mem.read(page, 2 * PAGE_SIZE) == sentinel
    assert guest.mem.read(status_addr, 1) == b"\xee"
    assert dq.used_idx() == 0
    assert h.stats()["dma_faults"] >= 1 and h.alive


def test_quiesce_holds_requests_until_resume(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    assert h.quiesce()["in_flight"] == 0
    head, bufs = request(dq, c.VIRTIO_BLK_T_OUT, 1, b"q" * 512)
    kick(h, 0)
    assert not h.wait_interrupt(0.3)
    assert dq.used_idx() == 0 and status_of(guest, bufs) == 0xEE
    h.resume()
    assert h.wait_interrupt(5.0)
    assert dq.take_used() == [(head, 1)]


def test_state_round_trip_into_fresh_device(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    for n in range(3):
        request(dq, c.VIRTIO_BLK_T_OUT, n, bytes([n]) * 512)
    kick_and_wait(h, dq, 0, count=3)
    h.quiesce()
    state = h.get_state()
    assert state["queues"][0]["next_avail"] == 3 and state["queues"][0]["next_used"] == 3
    h.close()
    h2 = guest.spawn("blk", {"path": str(tmp_path / "disk.img")})
    with pytest.raises(DeviceCommandError):
        h2.set_state({**state, "queues": [{**state["queues"][0], "size": 3}]})
    with pytest.raises(DeviceCommandError):
        h2.set_state({"version": 1})
    assert h2.alive
    h2.set_state(state)
    assert h2.mmio_read(c.REG_STATUS, 4) & c.STATUS_DRIVER_OK
    assert h2.get_state() == state
    head, bufs = request(dq, c.VIRTIO_BLK_T_IN, 2, read_len=512)
    assert kick_and_wait(h2, dq, 0) == [(head, 513)]  # the old requests were not re-run
    assert guest.mem.read(bufs[1].addr, 512) == bytes([2]) * 512
    assert h2.stats()["requests"] == 1


def test_dma_log_harvest_has_exactly_the_written_pages(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    h.dma_log_start()
    data_addr = 0x380000 + 100  # 3 pages touched by a 8192-byte read at an odd offset
    status_addr = 0x3A0000
    dq.add_chain(
        [
            Buffer(dq.alloc(16, hdr(c.VIRTIO_BLK_T_IN, 0)), 16),
            Buffer(data_addr, 8192, writable=True),
            Buffer(status_addr, 1, writable=True),
        ]
    )
    kick_and_wait(h, dq, 0)
    bits = h.dma_log_harvest()
    pages = {i for i in range(len(bits) * 8) if bits[i // 8] >> (i % 8) & 1}
    used_pages = {p // PAGE_SIZE for p in (dq.used_addr, dq.used_addr + 4 + 8 * 64 - 1)}
    expected = {0x380, 0x381, 0x382, 0x3A0} | used_pages
    assert pages == expected
    assert not h.dma_log_harvest().any()  # harvest clears
    h.dma_log_stop()
    request(dq, c.VIRTIO_BLK_T_IN, 0, read_len=512)
    kick_and_wait(h, dq, 0)
    assert not h.dma_log_harvest().any()


def test_remap_to_shadow_pool_redirects_device_writes(guest: Guest, tmp_path: Path) -> None:
    import mmap

    from ptmig.iommu import TARGET_POOL

    pool_fd = os.memfd_create("test-pool", os.MFD_CLOEXEC)
    os.ftruncate(pool_fd, 16 * PAGE_SIZE)
    pool = mmap.mmap(pool_fd, 16 * PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        h = guest.spawn(
            "blk", {"path": str(tmp_path / "disk.img"), "size": IMAGE_SIZE}, pool_fd=pool_fd
        )
        dq = guest.queue(0)
        driver_init(h, {0: dq}, FEATURES)
        data = os.urandom(512)
        request(dq, c.VIRTIO_BLK_T_OUT, 5, data)
        kick_and_wait(h, dq, 0)
        page = 0x300000
        h.dma_log_start()
        guest.iommu.map(page // PAGE_SIZE, 1, TARGET_POOL, 3)  # device buffer in pool page 3
        h.iotlb_invalidate()
        dq.add_chain(
            [
                Buffer(dq.alloc(16, hdr(c.VIRTIO_BLK_T_IN, 5)), 16),
                Buffer(page + 64, 512, writable=True),
                Buffer(dq.alloc(1), 1, writable=True),
            ]
        )
        kick_and_wait(h, dq, 0)
        assert pool[3 * PAGE_SIZE + 64 : 3 * PAGE_SIZE + 576] == data
        assert guest.mem.read(page, PAGE_SIZE) == bytes(PAGE_SIZE)  # the vCPU buffer: untouched
        bits = h.dma_log_harvest()
        assert not bits[page // PAGE_SIZE // 8] >> (page // PAGE_SIZE % 8) & 1
    finally:
        for hd in guest.handles:
            hd.close()
        pool.close()
        os.close(pool_fd)


def test_notify_forwarded_as_mmio_write(guest: Guest, tmp_path: Path) -> None:
    h, dq = start(guest, tmp_path)
    head, bufs = request(dq, c.VIRTIO_BLK_T_OUT, 0, b"n" * 512)
    h.mmio_write(c.REG_QUEUE_NOTIFY, 4, 0)  # a trapped doorbell the VMM forwards
    assert h.wait_interrupt(5.0)
    assert dq.take_used() == [(head, 1)]
    assert h.mmio_read(c.REG_INTERRUPT_STATUS, 4) & c.INTERRUPT_USED_BUFFER
    h.mmio_write(c.REG_INTERRUPT_ACK, 4, c.INTERRUPT_USED_BUFFER)
    assert h.mmio_read(c.REG_INTERRUPT_STATUS, 4) == 0
