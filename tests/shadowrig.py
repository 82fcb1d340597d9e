"""Shared pieces of the shadow tests that run without KVM: the guest driver's own stores, a
stand-in for an attached device, and the device state a quiesced device would report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from ptmig.devices.control import DeviceState
from ptmig.devices.virtio.mmio import MmioState
from ptmig.devices.virtio.testing import DriverQueue
from ptmig.iommu import IommuTable
from ptmig.memory import GuestMemory

if TYPE_CHECKING:
    from ptmig.devices.attach import AttachedDevice


class GuestStores:
    """The guest's own stores (vCPU writes): straight into guest RAM."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.base = 0
        self.buf = mem.mmap

    def read(self, addr: int, length: int) -> bytes:
        return self.mem.mmap[addr : addr + length]

    def write(self, addr: int, data: bytes) -> None:
        self.mem.mmap[addr : addr + len(data)] = data


@dataclass
class FakeAttached:
    id: str
    iommu: IommuTable
    handle: object = None


def attached(dev_id: str, iommu: IommuTable, handle: object = None) -> AttachedDevice:
    """A `FakeAttached` as what `ShadowedDevice` takes: it has only the parts the shadow code
    reads without a device process (its id, IOMMU table and handle)."""
    return cast("AttachedDevice", FakeAttached(dev_id, iommu, handle))


def device_state(*drivers: DriverQueue, next_avail: int = 0) -> DeviceState:
    """What a quiesced device reports for the drivers' queues (`get_state`), queue k being the
    k-th driver's: its registers (driver OK) and each ring caught up to `next_avail`."""
    queues = {
        k: drv.state(next_avail=next_avail, next_used=next_avail) for k, drv in enumerate(drivers)
    }
    return DeviceState("net", MmioState(device_id=1, device_features=1 << 32, status=15), queues)
