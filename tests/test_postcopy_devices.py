"""The shadow data plane on a post-copy destination, without KVM: guest RAM under the fault
server, a request whose buffers are still "on the source" (missing pages), and a stand-in
source that serves page requests (each page's `pattern`). The data plane must fetch every
page of a request before it copies it into device buffers, never fail a request whose pages
are merely late, and the device must see the source's bytes (never a zero page)."""

from __future__ import annotations

import numpy as np
import pytest
from shadowrig import FakeAttached, GuestStores, device_state
from test_postcopy_uffd import fetcher, pattern

from ptmig.devices.virtio.queue import SplitQueue
from ptmig.devices.virtio.testing import Buffer, DriverQueue
from ptmig.iommu import DmaView, IommuTable
from ptmig.layout import PAGE_SHIFT, PAGE_SIZE
from ptmig.memory import GuestMemory
from ptmig.migration.uffd import FaultServer, FaultServerError, PageState
from ptmig.shadow.device import ShadowedDevice
from ptmig.shadow.native import Dataplane
from ptmig.shadow.pool import ShadowPool

MEM = 2 << 20
RING_BASE = 0x10000
DATA = 0x40000
QSIZE = 16
WAIT_S = 30.0  # generous: a loaded 2-core host may take a while to schedule the threads


def _uffd_unavailable() -> str | None:
    mem = GuestMemory(PAGE_SIZE)
    try:
        FaultServer(mem.host_address, np.zeros(1, dtype=np.uint8)).close()
    except FaultServerError as e:
        return str(e)
    finally:
        mem.close()
    return None


_WHY = _uffd_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"userfaultfd unavailable: {_WHY}")


class Destination:
    """Guest RAM whose ring pages arrived and whose data pages did not; one shadowed device
    whose data plane fetches through the fault server."""

    def __init__(self, request_pages: int, wait_ms: int) -> None:
        self.mem = GuestMemory(MEM)
        self.iommu = IommuTable.create(self.mem.npages)
        self.iommu.map_identity(self.mem.npages)
        self.pool = ShadowPool(256)
        self.drv = DriverQueue(GuestStores(self.mem), QSIZE, base=RING_BASE, data_start=DATA)
        self.out = self.drv.alloc(request_pages * PAGE_SIZE, b"\0", align=PAGE_SIZE)
        self.rx = self.drv.alloc(PAGE_SIZE, b"\0", align=PAGE_SIZE)
        self.head = self.drv.add_chain(
            [
                Buffer(self.out, request_pages * PAGE_SIZE, False),
                Buffer(self.rx, PAGE_SIZE, True),
            ]
        )
        # the request's pages are still on the source: holes here, MISSING to the server
        self.missing = list(range(self.out >> PAGE_SHIFT, (self.rx >> PAGE_SHIFT) + 1))
        self.mem.punch_zero(self.missing[0], len(self.missing))
        states = np.full(self.mem.npages, PageState.PRESENT, dtype=np.uint8)
        states[self.missing] = PageState.MISSING
        self.server = FaultServer(self.mem.host_address, states)
        self.mem.presence = lambda gpa, n: self._present(gpa, n)
        self.dp = Dataplane(self.mem, self.pool)
        self.dp.fetch_pages_with(self.server.native_fetch(), wait_ms)
        self.sd = ShadowedDevice(FakeAttached("dev0", self.iommu), self.pool, self.mem, self.dp)
        self.dma = DmaView(self.iommu, self.mem.mmap, pool=self.pool.mmap, name="dev0")

    def _present(self, gpa: int, length: int) -> None:
        assert self.server.ensure(gpa, length, WAIT_S)

    def enter(self) -> SplitQueue:
        self.sd.build(device_state(self.drv))
        return SplitQueue(self.drv.state(), self.dma)

    def device_sees(self) -> SplitQueue:
        self.sd.flush_mappings()
        self.dma.invalidate_iotlb()
        self.sd.map.invalidated()
        return SplitQueue(self.drv.state(), self.dma)

    def close(self) -> None:
        self.sd.close()
        self.dp.close()
        self.mem.presence = None
        self.server.close()
        self.dma.close()
        self.iommu.close()
        self.pool.close()
        self.mem.close()


def test_a_request_on_pages_not_yet_sent_is_forwarded_with_the_sources_bytes() -> None:
    dst = Destination(request_pages=3, wait_ms=int(WAIT_S * 1000))
    served: list[int] = []
    try:
        with fetcher(dst.server, served):
            dst.enter()
            assert dst.sd.submit(0), dst.sd.broken
        assert sorted(served) == dst.missing  # each asked for once, by the data plane
        assert dst.sd.stats.pages_fetched == len(dst.missing)
        assert dst.sd.stats.requests_forwarded == 1
        dq = dst.device_sees()
        chain = dq.pop()
        assert chain is not None and chain.head == dst.head
        (readable,) = chain.readable
        want = b"".join(pattern(p) for p in dst.missing[:-1])
        assert dst.dma.read(readable.addr, readable.length) == want
        # the device starts from the guest's (the source's) bytes of its writable buffer too
        assert dst.dma.read(dst.rx, PAGE_SIZE) == pattern(dst.rx >> PAGE_SHIFT)
        # its reply reaches the guest page, which is present by now
        dst.dma.write(dst.rx, b"R" * 100)
        dq.push_used(dst.head, 100)
        assert dst.sd.complete() == 1
        assert dst.mem.read(dst.rx, PAGE_SIZE) == b"R" * 100 + pattern(dst.rx >> 12)[100:]
        assert dst.drv.take_used() == [(dst.head, 100)]
        stats = dst.server.stats()
        assert stats.missing == 0 and stats.eexist == 0, stats
    finally:
        dst.close()


def test_a_request_whose_pages_are_late_waits_and_is_not_failed() -> None:
    dst = Destination(request_pages=1, wait_ms=50)
    served: list[int] = []
    try:
        dst.enter()
        # no source yet: the data plane gives up waiting, forwards nothing, breaks nothing
        assert not dst.sd.submit(0)
        assert dst.sd.broken is None
        assert dst.sd.stats.requests_forwarded == 0
        assert dst.device_sees().pop() is None
        assert dst.server.stats().requests == len(dst.missing)  # asked for all the same
        with fetcher(dst.server, served):
            assert dst.sd.submit(0), dst.sd.broken
        assert sorted(served) == dst.missing
        chain = dst.device_sees().pop()
        assert chain is not None and chain.head == dst.head
        assert dst.dma.read(dst.out, PAGE_SIZE) == pattern(dst.out >> PAGE_SHIFT)
    finally:
        dst.close()


def test_without_a_fault_server_nothing_is_fetched() -> None:
    mem = GuestMemory(MEM)
    pool = ShadowPool(16)
    dp = Dataplane(mem, pool)
    try:
        dp.fetch_pages_with(None)  # the default: every page of guest RAM is here
        iommu = IommuTable.create(mem.npages)
        iommu.map_identity(mem.npages)
        drv = DriverQueue(GuestStores(mem), QSIZE, base=RING_BASE, data_start=DATA)
        drv.add_chain([Buffer(drv.alloc(PAGE_SIZE, b"x" * PAGE_SIZE), PAGE_SIZE, False)])
        sd = ShadowedDevice(FakeAttached("dev0", iommu), pool, mem, dp)
        sd.build(device_state(drv))
        assert sd.submit(0), sd.broken
        assert sd.stats.pages_fetched == 0 and sd.stats.fetch_waits == 0
        iommu.close()
    finally:
        dp.close()
        pool.close()
        mem.close()
