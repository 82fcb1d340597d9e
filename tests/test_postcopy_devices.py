"""The shadow data plane on a post-copy destination, without KVM: guest RAM under the fault
server, a request whose buffers are still "on the source" (missing pages), and a stand-in
source that serves page requests (each page's `pattern`). The data plane must fetch every
page of a request before it copies it into device buffers, never fail a request whose pages
are merely late, and the device must see the source's bytes (never a zero page)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
from shadowrig import GuestStores, attached, device_state
from test_postcopy_uffd import fetcher, pattern

from ptmig.devices.virtio.queue import SplitQueue
from ptmig.devices.virtio.testing import Buffer, DriverQueue
from ptmig.guest_state import DeviceSnapshot, InflightRequest
from ptmig.iommu import DmaView, IommuTable
from ptmig.layout import PAGE_SHIFT, PAGE_SIZE
from ptmig.memory import GuestMemory, GuestMemoryError
from ptmig.migration.events import PostcopyStart
from ptmig.migration.postcopy import PostcopyReceiver, pending_bytes
from ptmig.migration.postcopy_devices import PostcopyDevices
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
        self.sd = ShadowedDevice(attached("dev0", self.iommu), self.pool, self.mem, self.dp)
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
        sd = ShadowedDevice(attached("dev0", iommu), pool, mem, dp)
        sd.build(device_state(drv))
        assert sd.submit(0), sd.broken
        assert sd.stats.pages_fetched == 0 and sd.stats.fetch_waits == 0
        iommu.close()
    finally:
        dp.close()
        pool.close()
        mem.close()


# -- the devices' entry on a post-copy destination (`PostcopyDevices`) -------------------------


class Receiver:
    """A post-copy destination's guest RAM with the ring pages of one driver queue still on
    the source (no fetcher: nothing arrives until the test installs it), served through
    `PostcopyReceiver.presence` as the VMM's own accesses are."""

    def __init__(self) -> None:
        self.mem = GuestMemory(MEM)
        self.drv = DriverQueue(GuestStores(self.mem), QSIZE, base=RING_BASE, data_start=DATA)
        buf = self.drv.alloc(PAGE_SIZE, b"x" * PAGE_SIZE, align=PAGE_SIZE)
        self.head = self.drv.add_chain([Buffer(buf, PAGE_SIZE, False)])
        ring_end = DATA  # the rings lie in [RING_BASE, DATA)
        self.ring_pages = list(range(RING_BASE >> PAGE_SHIFT, ring_end >> PAGE_SHIFT))
        self.source = {p: self.mem.read(p << PAGE_SHIFT, PAGE_SIZE) for p in self.ring_pages}
        pending = np.zeros(self.mem.npages, dtype=bool)
        pending[self.ring_pages] = True
        self.pc = PostcopyReceiver(self.mem.view, self.mem.host_address, self.mem.npages)
        self.pc.arm(
            PostcopyStart(_pending_words(pending)), self.mem.allocated(), self.mem.punch_zero
        )
        self.mem.presence = self.pc.presence

    @property
    def server(self) -> FaultServer:
        assert self.pc.server is not None
        return self.pc.server

    def deliver_rings(self) -> None:
        """What the source sends once the link is back."""
        for p in self.ring_pages:
            self.server.install(p, self.source[p])

    def close(self) -> None:
        self.mem.presence = None
        self.pc.finish()
        self.mem.close()


def _pending_words(pending: np.ndarray) -> bytes:
    bits = np.packbits(pending, bitorder="little")
    words = np.zeros(-(-len(pending) // 64), dtype=np.uint64)
    words.view(np.uint8)[: len(bits)] = bits
    return pending_bytes(words)


class StandInDevice:
    """The device process's control surface, as `PostcopyDevices.program` drives it."""

    alive = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def quiesce(self) -> None:
        self.calls.append("quiesce")

    def set_state(self, state: object) -> None:
        self.calls.append("set_state")

    def resume(self) -> None:
        self.calls.append("resume")


class Events:
    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, object]]] = []

    def emit(self, event: str, data: dict[str, object] | None = None) -> None:
        self.got.append((event, dict(data or {})))


def _machine(rx: Receiver, events: Events) -> SimpleNamespace:
    dev = SimpleNamespace(id="net0", handle=StandInDevice(), view=None)
    return SimpleNamespace(devices=[dev], vm=SimpleNamespace(memory=rx.mem), qmp=events)


def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_vmm_access_waiting_for_a_page_gives_up_soon_after_the_link_breaks() -> None:
    """Before: it waited the whole INSTALL_WAIT_S (60 s) for a page that could not come."""
    rx = Receiver()
    failed: list[BaseException] = []

    def access() -> None:
        try:
            rx.mem.read(RING_BASE, 16)
        except GuestMemoryError as e:
            failed.append(e)

    try:
        waiter = threading.Thread(target=access, name="test-vmm-access")
        waiter.start()
        _until(lambda: rx.server.stats().requests > 0, "the access never asked for its page")
        rx.pc.paused("the link broke")
        waiter.join(WAIT_S)
        assert not waiter.is_alive(), "still waiting for a page the broken link cannot bring"
        assert len(failed) == 1 and "post-copy is postcopy-paused" in str(failed[0])
        assert rx.server.stats().missing == len(rx.ring_pages)  # nothing zero-filled
    finally:
        rx.close()


def test_devices_whose_entry_the_link_break_stopped_are_shadowed_after_the_resume() -> None:
    """The link breaks while the entry waits for ring pages: the thread ends at once, the
    devices stay quiesced (x-devices says "waiting-for-link"), and the resume starts the
    entry again. Here it then finds an in-flight request the guest's ring does not hold,
    which QMP is told about (an event and x-devices), not only the log."""
    rx = Receiver()
    events = Events()
    m = _machine(rx, events)
    pd = PostcopyDevices(m)  # type: ignore[arg-type]
    st = device_state(rx.drv)
    wrong = InflightRequest(0, (rx.head + 1) % QSIZE)  # the ring has rx.head at index 0
    pd.program([DeviceSnapshot("net0", "net", "shadow", st, {0: (wrong,)})])
    assert m.devices[0].handle.calls == ["quiesce", "set_state"]
    try:
        pd.start(rx.server, lambda: rx.pc.report.status == "postcopy-active")
        _until(lambda: rx.server.stats().requests > 0, "the entry never asked for the rings")
        rx.pc.paused("the link broke")
        assert pd._thread is not None
        pd._thread.join(WAIT_S)
        assert not pd._thread.is_alive(), "the entry still waits for the broken link"
        assert pd.report() == {"devices": ["net0"], "state": "waiting-for-link"}
        assert events.got == [] and pd.error is None
        # the resume: the status is active again, the pages come, the entry starts over
        rx.pc.report.status = "postcopy-active"
        rx.deliver_rings()
        pd.retry(rx.server)
        _until(lambda: events.got != [], "the failed in-flight check was not reported")
        ((name, data),) = events.got
        assert name == "X_POSTCOPY_DEVICES_FAILED"
        assert data["devices"] == ["net0"]
        assert "in-flight request 0" in str(data["error"]), data
        report = pd.report()
        assert report["state"] == "quiesced" and report["error"] == data["error"], report
        assert pd.engine is None  # never shadowed: the device touches no guest RAM
        pd.finish()  # every page is here: resumed as programmed
        assert m.devices[0].handle.calls[-1] == "resume"
        assert pd.report()["state"] == "direct"
    finally:
        rx.close()
