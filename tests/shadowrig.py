"""Shared pieces of the shadow tests that run without KVM: the guest driver's own stores, a
stand-in for an attached device, and the device state a quiesced device would report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ptmig.devices.virtio.testing import DriverQueue
from ptmig.iommu import IommuTable
from ptmig.memory import GuestMemory


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


def device_state(drv: DriverQueue, next_avail: int = 0) -> dict[str, Any]:
    """What a quiesced device reports for the driver's one queue (`get_state`)."""
    st = drv.state(next_avail=next_avail, next_used=next_avail)
    return {
        "mmio": {"status": 15},
        "queues": [
            {
                "index": 0,
                "size": st.size,
                "desc_addr": st.desc_addr,
                "avail_addr": st.avail_addr,
                "used_addr": st.used_addr,
                "next_avail": next_avail,
                "next_used": next_avail,
                "ready": True,
            }
        ],
    }
