"""The guest side for device-process tests: guest RAM in a memfd that both the test (playing
the driver, with DriverQueue) and a real device process map, an identity IOMMU, and a driver
that programs the virtio-mmio registers through the control channel as the VMM would forward
them. No KVM: doorbells are written to the doorbell eventfds exactly as KVM_IOEVENTFD would."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ptmig.devices import eventfd
from ptmig.devices.handle import DeviceEvent, DeviceHandle
from ptmig.devices.virtio import constants as c
from ptmig.devices.virtio.testing import DriverQueue
from ptmig.iommu import PAGE_SIZE, DmaFault, IommuTable

GUEST_SIZE = 4 << 20


class MemfdMemory:
    """Guest RAM as the driver (test) sees it: a MAP_SHARED mapping of the guest memfd."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.buf = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.base = 0
        self.name = "guest"

    def read(self, addr: int, length: int) -> bytes:
        if addr < 0 or addr + length > len(self.buf):
            raise DmaFault(self.name, addr, length, False, "outside guest RAM")
        return bytes(self.buf[addr : addr + length])

    def write(self, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > len(self.buf):
            raise DmaFault(self.name, addr, len(data), True, "outside guest RAM")
        self.buf[addr : addr + len(data)] = data

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


@dataclass
class Guest:
    mem: MemfdMemory
    iommu: IommuTable
    handles: list[DeviceHandle] = field(default_factory=list)
    events: list[DeviceEvent] = field(default_factory=list)
    datapath: str | None = None  # the devices' data path, when a test module chooses one

    def spawn(self, kind: str, config: dict[str, Any], **kw: Any) -> DeviceHandle:
        if self.datapath is not None:
            config = {"datapath": self.datapath, **config}
        h = DeviceHandle.spawn(
            kind, len(self.handles), config, self.mem.fd, GUEST_SIZE, self.iommu, **kw
        )
        h.on_event(self.events.append)
        self.handles.append(h)
        return h

    def queue(self, slot: int, size: int = 64) -> DriverQueue:
        """A driver queue with its rings and data in its own 512 KiB region of guest RAM."""
        base = 0x100000 + slot * 0x80000
        return DriverQueue(
            self.mem, size, base=base, data_start=base + 0x4000, data_end=base + 0x80000
        )  # type: ignore[arg-type]


@pytest.fixture
def guest() -> Iterator[Guest]:
    mem = MemfdMemory(GUEST_SIZE)
    iommu = IommuTable.create(GUEST_SIZE // PAGE_SIZE)
    iommu.map_identity(GUEST_SIZE // PAGE_SIZE)
    g = Guest(mem, iommu)
    yield g
    for h in g.handles:
        h.close()
    iommu.close()
    mem.close()


def driver_init(h: DeviceHandle, queues: dict[int, DriverQueue], features: int) -> None:
    """What a virtio 1.x driver does at probe, as register writes the VMM forwards."""
    assert h.mmio_read(c.REG_MAGIC_VALUE, 4) == c.MMIO_MAGIC
    h.mmio_write(c.REG_STATUS, 4, 0)
    h.mmio_write(c.REG_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    for word in (0, 1):
        h.mmio_write(c.REG_DRIVER_FEATURES_SEL, 4, word)
        h.mmio_write(c.REG_DRIVER_FEATURES, 4, (features >> (32 * word)) & 0xFFFFFFFF)
    status = c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK
    h.mmio_write(c.REG_STATUS, 4, status)
    assert h.mmio_read(c.REG_STATUS, 4) & c.STATUS_FEATURES_OK, "features refused"
    for index, dq in queues.items():
        h.mmio_write(c.REG_QUEUE_SEL, 4, index)
        h.mmio_write(c.REG_QUEUE_NUM, 4, dq.size)
        for reg, addr in (
            (c.REG_QUEUE_DESC_LOW, dq.desc_addr),
            (c.REG_QUEUE_DRIVER_LOW, dq.avail_addr),
            (c.REG_QUEUE_DEVICE_LOW, dq.used_addr),
        ):
            h.mmio_write(reg, 4, addr & 0xFFFFFFFF)
            h.mmio_write(reg + 4, 4, addr >> 32)
        h.mmio_write(c.REG_QUEUE_READY, 4, 1)
    h.mmio_write(c.REG_STATUS, 4, status | c.STATUS_DRIVER_OK)
    assert h.mmio_read(c.REG_STATUS, 4) & c.STATUS_DRIVER_OK


def kick(h: DeviceHandle, index: int) -> None:
    """The guest's doorbell write, as KVM_IOEVENTFD delivers it."""
    eventfd.signal(h.doorbell_eventfds[index])


def kick_and_wait(
    h: DeviceHandle, dq: DriverQueue, index: int, count: int = 1, timeout: float = 5.0
) -> list[tuple[int, int]]:
    """Ring the doorbell and collect `count` used elements (waiting on the interrupt)."""
    kick(h, index)
    used: list[tuple[int, int]] = []
    while len(used) < count:
        if not h.wait_interrupt(timeout):
            raise AssertionError(f"no interrupt after {timeout} s; used so far {used}")
        used += dq.take_used()
    return used


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
