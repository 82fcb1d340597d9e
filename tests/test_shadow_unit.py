"""The shadow engine's interception logic, without KVM or processes.

The guest driver is played by `DriverQueue` writing into a real `GuestMemory` (memfd); the
device is played by a `SplitQueue` over a `DmaView` of the same IOMMU domain the shadow engine
remaps — exactly what a device process does.
"""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from shadowrig import GuestStores, attached, device_state

from ptmig import bitmap
from ptmig.devices.virtio.constants import REG_QUEUE_NOTIFY
from ptmig.devices.virtio.queue import SplitQueue
from ptmig.devices.virtio.testing import Buffer, DriverQueue
from ptmig.iommu import DmaFault, DmaView, IommuTable
from ptmig.layout import PAGE_SIZE
from ptmig.memory import GuestMemory
from ptmig.shadow.device import ShadowedDevice, quiesced_positions, requests_taken
from ptmig.shadow.engine import ShadowEngine
from ptmig.shadow.pool import ShadowPool
from ptmig.shadow.reference import ReferenceDataplane
from ptmig.shadow.tracking import make_tracking

MEM = 4 << 20
RING_BASE = 0x10000
DATA = 0x40000


@pytest.fixture(params=["native", "reference"])
def rig(request):
    """Every test runs on both data paths: the native one and the Python reference."""
    mem = GuestMemory(MEM)
    iommu = IommuTable.create(mem.npages)
    iommu.map_identity(mem.npages)
    pool = ShadowPool(64)
    drv = DriverQueue(GuestStores(mem), 16, base=RING_BASE, data_start=DATA)
    dp = ReferenceDataplane(mem, pool) if request.param == "reference" else None
    sd = ShadowedDevice(attached("dev0", iommu), pool, mem, dp)
    dma = DmaView(iommu, mem.mmap, pool=pool.mmap, name="dev0")
    yield mem, iommu, pool, drv, sd, dma
    dma.close()
    iommu.close()


def enter(sd: ShadowedDevice, drv: DriverQueue, dma: DmaView) -> SplitQueue:
    sd.build(device_state(drv))
    sd.submit(0)
    dma.invalidate_iotlb()
    sd.map.invalidated()
    return SplitQueue(drv.state(), dma)


def test_device_sees_only_device_buffers_and_guest_sees_only_synced_bytes(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    rx = drv.alloc(PAGE_SIZE, fill=b"G" * PAGE_SIZE, align=PAGE_SIZE)
    head = drv.add_chain([Buffer(rx, 100, writable=True)])
    other = DATA + 0x100000
    mem.mmap[other : other + 4] = b"SAFE"
    dq = enter(sd, drv, dma)
    sd.dataplane.take_dirty()

    chain = dq.pop()
    assert chain is not None and chain.head == head
    dma.write(rx, b"D" * 60)  # the device writes 60 bytes of its 100-byte buffer...
    with pytest.raises(DmaFault):  # ...and cannot reach any page that is not a device buffer
        dma.write(other, b"EVIL")
    dq.push_used(head, 60)
    assert mem.read(rx, 4) == b"GGGG", "device data reached guest RAM before the completion"
    assert drv.take_used() == []

    assert sd.complete() == 1
    assert mem.read(rx, PAGE_SIZE) == b"D" * 60 + b"G" * (PAGE_SIZE - 60)  # never whole pages
    assert drv.take_used() == [(head, 60)]
    assert mem.read(other, 4) == b"SAFE"
    dirty = bitmap.pages(sd.dataplane.take_dirty(), mem.npages).tolist()
    assert rx // PAGE_SIZE in dirty and drv.used_addr // PAGE_SIZE in dirty
    # the whole writable area (100 bytes, one page piece that changed) is copied back
    assert sd.stats.bytes_to_guest == 100 and sd.stats.completions_synced == 1


def test_readable_data_is_copied_at_submission(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    tx = drv.alloc(64, fill=b"frame-v1")
    dq = enter(sd, drv, dma)
    head = drv.add_chain([Buffer(tx, 8)])
    assert sd.submit(0)
    mem.mmap[tx : tx + 8] = b"frame-v2"  # the guest scribbles after submitting
    dma.invalidate_iotlb()
    chain = dq.pop()
    assert chain is not None and chain.head == head
    assert dma.read(tx, 8) == b"frame-v1", "the device must read what was submitted"
    assert sd.stats.bytes_to_device == 8


def test_released_buffers_stay_idle_and_are_reused_without_an_iotlb_flush(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    buf = drv.alloc(PAGE_SIZE, align=PAGE_SIZE)
    head = drv.add_chain([Buffer(buf, 16, writable=True)])
    dq = enter(sd, drv, dma)
    chain = dq.pop()
    assert chain is not None
    dq.push_used(head, 16)
    sd.complete()
    assert buf // PAGE_SIZE in sd.map.idle and buf // PAGE_SIZE not in sd.map.pages
    # the driver posts the same buffer again: no new mapping, so no invalidation is needed
    drv.add_chain([Buffer(buf, 16, writable=True)])
    assert sd.submit(0)
    assert not sd.map.dirty_mappings and sd.map.reused == 1


def _count_flushes(sd, dma) -> list[int]:
    """Give the shadowed device a handle whose IOTLB invalidations are counted (one entry each)."""
    flushes: list[int] = []

    class Handle:
        def iotlb_invalidate(self) -> int:
            flushes.append(1)
            return dma.invalidate_iotlb()

    sd.dev.handle = Handle()
    return flushes


def test_idle_buffers_are_reclaimed_when_the_pool_runs_out(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    flushes = _count_flushes(sd, dma)
    dq = enter(sd, drv, dma)
    first = drv.alloc(40 * PAGE_SIZE, align=PAGE_SIZE)
    head = drv.add_chain([Buffer(first, 40 * PAGE_SIZE, writable=True)])
    assert sd.submit(0)
    dma.invalidate_iotlb()
    sd.map.invalidated()
    chain = dq.pop()
    assert chain is not None
    dq.push_used(head, 0)
    sd.complete()
    assert len(sd.map.idle) == 40
    second = drv.alloc(40 * PAGE_SIZE, align=PAGE_SIZE)
    drv.add_chain([Buffer(second, 40 * PAGE_SIZE, writable=True)])
    assert sd.submit(0), sd.broken  # 64-page pool: only fits after reclaiming idle buffers
    assert flushes, "reclaimed pages must be flushed from the IOTLB before reuse"
    assert iommu.lookup(first // PAGE_SIZE) is None


def test_hostile_ring_marks_device_broken_without_raising(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    enter(sd, drv, dma)
    drv.write_desc(0, DATA, 16, 1, 1)  # 0 -> 1 -> 0: a loop
    drv.write_desc(1, DATA, 16, 1, 0)
    drv.write_avail_entry(0, 0)
    drv.write_avail_idx(1)
    assert sd.submit(0) is False
    assert sd.broken is not None and "queue 0" in sd.broken
    assert sd.submit(0) is False  # stays broken, still no exception


def test_avail_index_running_ahead_is_contained(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    enter(sd, drv, dma)
    drv.write_avail_idx(1000)
    assert sd.submit(0) is False and sd.broken is not None


def test_buffers_outside_guest_ram_are_refused(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    enter(sd, drv, dma)
    drv.write_desc(0, MEM - 8, 64, 2, 0)  # runs past the end of guest RAM
    drv.write_avail_entry(0, 0)
    drv.write_avail_idx(1)
    assert sd.submit(0) is False and sd.broken is not None
    assert np.all(pool.mmap[:] == pool.mmap[:])  # nothing raised, pool still mapped


def test_pool_exhaustion_fails_cleanly(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    enter(sd, drv, dma)
    big = drv.alloc(80 * PAGE_SIZE, align=PAGE_SIZE)
    drv.add_chain([Buffer(big, 80 * PAGE_SIZE, writable=True)])
    before = pool.in_use
    assert sd.submit(0) is False
    assert sd.broken is not None and "exhausted" in sd.broken
    # they are not referenced by anything: idle, reclaimable on demand
    assert pool.in_use - len(sd.map.idle) == before, "pages of a refused request leaked"


def test_completion_of_a_request_never_forwarded_is_a_device_error(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    enter(sd, drv, dma)
    # the "device" writes a used element for a head the VMM never forwarded
    st = drv.state()
    sd.dev_buf.write(st.used_addr + 4, (5).to_bytes(4, "little") + (1).to_bytes(4, "little"))
    sd.dev_buf.write(st.used_addr + 2, (1).to_bytes(2, "little"))
    assert sd.complete() == 0
    assert sd.broken is not None


def test_interception_log_names_inflight_requests_in_order(rig) -> None:
    mem, iommu, pool, drv, sd, dma = rig
    heads = [drv.add_chain([Buffer(drv.alloc(64), 64, writable=True)]) for _ in range(3)]
    enter(sd, drv, dma)
    state, inflight = sd.interception_log()
    assert [r.head for r in inflight[0]] == heads
    assert [r.avail_index for r in inflight[0]] == [0, 1, 2]
    q = state.queues[0]
    assert q.next_avail == 0 and q.next_used == 0 and q.ready


def test_a_view_places_each_device_buffer_at_its_guest_page_and_drops_it_when_freed() -> None:
    """A device that sees the pool through a memory table (vhost-user): guest page g's device
    buffer is view page g, the shared pages are not touched, and a reclaimed view page is given
    back (it reads as zeros: nothing of the guest's stays reachable there)."""
    mem = GuestMemory(MEM)
    iommu = IommuTable.create(mem.npages)
    pool = ShadowPool(8, views=2, view_pages=mem.npages)
    try:
        assert pool.pages == 8 + 2 * mem.npages and pool.view_base(1) == 8 + mem.npages
        with pytest.raises(ValueError, match="view 2 out of range"):
            pool.view_base(2)
        sd = ShadowedDevice(attached("vd", iommu), pool, mem, view_base=pool.view_base(1))
        gpfn = DATA // PAGE_SIZE + 3
        mem.mmap[gpfn * PAGE_SIZE : gpfn * PAGE_SIZE + 5] = b"GUEST"
        with sd.dataplane.locked():
            pfn = sd.map.acquire(gpfn, copy=True)
        assert pfn == pool.view_base(1) + gpfn and pool.in_use == 0
        assert pool.read(pfn, 0, 5) == b"GUEST"
        with sd.dataplane.locked():
            sd.map.release(gpfn)
            assert sd.map.reclaim(keep=0) == 1
            sd.map.invalidated()
        assert pool.read(pfn, 0, 5) == bytes(5) and pool.in_use == 0
        sd.close()
    finally:
        pool.close()
        iommu.close()
        mem.close()


def test_the_software_strategies_are_made_by_name_and_unknown_ones_refused() -> None:
    from ptmig.migration.tracking import make_strategy

    assert make_strategy("intercept").name == "intercept"
    assert make_strategy("shadow").name == "shadow"
    with pytest.raises(ValueError, match="'copy' is not a software DMA tracking strategy"):
        make_tracking("copy")


def test_switchover_marks_only_the_inflight_requests_the_device_took(rig) -> None:
    """Intercept's switchover: a request the device never took off the shadow ring (a posted
    receive buffer) cannot have been written; one it took may have been, even uncompleted."""
    mem, iommu, pool, drv, sd, dma = rig
    bufs = [drv.alloc(PAGE_SIZE, align=PAGE_SIZE) for _ in range(3)]
    for b in bufs:
        drv.add_chain([Buffer(b, PAGE_SIZE, writable=True)])
    dq = enter(sd, drv, dma)
    assert dq.pop() is not None  # the device takes the first request and completes nothing
    pages = [b // PAGE_SIZE for b in bufs]
    assert sd.inflight_writable_pages() == pages  # no report: every request in flight
    assert sd.inflight_writable_pages({0: dq.state().next_avail}) == pages[:1]
    assert sd.inflight_writable_pages({0: 0}) == []
    assert sd.inflight_writable_pages({0: 7}) == pages  # past what was forwarded: not believed
    assert sd.inflight_writable_pages({}) == pages  # the queue not reported


@given(
    first=st.integers(0, 0xFFFF),
    count=st.integers(0, 64),
    took=st.integers(0, 0x1FFFF),
)
def test_requests_taken_is_the_oldest_part_or_everything(first: int, count: int, took: int) -> None:
    inflight = [((first + k) & 0xFFFF, k) for k in range(count)]
    forwarded = (first + count) & 0xFFFF
    device_next = (first + took) & 0xFFFF
    got = requests_taken(inflight, forwarded, device_next)
    if took % 0x10000 <= count:
        assert got == inflight[: took % 0x10000]
    else:
        assert got == inflight  # a position the VMM never published up to
    assert requests_taken(inflight, forwarded, None) == inflight


def test_quiesce_positions_are_read_only_from_the_expected_shape() -> None:
    assert quiesced_positions({"in_flight": 0, "queues": {"0": {"next_avail": 70000}}}) == {
        0: 70000 & 0xFFFF
    }
    assert quiesced_positions({"queues": {"1": {"next_avail": 3, "next_used": 3}}}) == {1: 3}
    bad: dict[str, Any] | None
    for bad in (
        None,
        {},
        {"queues": []},
        {"queues": {"x": {"next_avail": 1}}},
        {"queues": {"0": {"next_avail": "1"}}},
        {"queues": {"0": {"next_avail": True}}},
        {"queues": {"0": 5}},
    ):
        assert quiesced_positions(bad) is None, bad


def test_a_doorbell_written_while_shadowing_is_left_never_reaches_a_closed_fd() -> None:
    """A vCPU's QueueNotify write that exits to the VMM while shadowing is being left (queue
    0's trapping eventfd already deassigned and closed, queue 1's not yet) must not be written
    to queue 0's fd: a closed fd raises EBADF in the vCPU thread, a reused one gets the kick.
    The fault is injected at exactly that point: the second deassign runs the vCPU's write."""
    doorbells = {q: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for q in (0, 1)}
    vcpu_write: list[Any] = []

    class Vmfd:  # KVM's ioeventfd ioctl; the engine's doorbell hand-off is what is tested
        def ioeventfd(
            self, fd: int, addr: int, length: int, *, datamatch: int, deassign: bool = False
        ) -> None:
            if deassign and datamatch == 1:
                t = threading.Thread(target=vcpu)
                t.start()
                t.join(10)

    def vcpu() -> None:
        try:
            vcpu_write.append(engine._on_mmio_write(sd, REG_QUEUE_NOTIFY, 4, 0))  # type: ignore[arg-type]
        except OSError as e:
            vcpu_write.append(e)

    vm = SimpleNamespace(vmfd=Vmfd(), wake_fds=[], vcpus=[])
    dev = SimpleNamespace(
        mmio_base=0xD0000000,
        handle=SimpleNamespace(doorbell_eventfds={}, irq_eventfd=-1),
        mmio_hook=None,
        direct_doorbells=False,
    )
    sd = SimpleNamespace(dev=dev, vmm_doorbells=dict(doorbells))
    engine = ShadowEngine(SimpleNamespace(vm=vm))  # type: ignore[arg-type]
    try:
        engine._untrap(sd)  # type: ignore[arg-type]
    finally:
        engine.close()
    assert vcpu_write == [True], vcpu_write  # consumed; leaving kicks every queue anyway
    assert sd.vmm_doorbells == {} and dev.direct_doorbells


def test_a_quiesced_device_gets_its_new_buffers_flushed_once_by_the_caller(rig) -> None:
    # Entering shadow mode: the requests made available while the device was quiesced are
    # forwarded without an IOTLB flush of their own (a round trip to the device each), since
    # the engine invalidates once before the resume; later bursts flush as before.
    mem, iommu, pool, drv, sd, dma = rig
    flushes = _count_flushes(sd, dma)
    sd.build(device_state(drv))
    for k in range(3):
        buf = drv.alloc(2 * PAGE_SIZE, align=PAGE_SIZE)
        drv.add_chain([Buffer(buf, 2 * PAGE_SIZE, writable=k > 0)])
    assert sd.submit(0, flush=False), sd.broken
    assert not flushes and sd.map.dirty_mappings, "the caller flushes once, before the resume"
    assert sd.stats.requests_forwarded == 3
    sd.flush_mappings()
    assert len(flushes) == 1 and not sd.map.dirty_mappings
    buf = drv.alloc(PAGE_SIZE, align=PAGE_SIZE)
    drv.add_chain([Buffer(buf, PAGE_SIZE, writable=True)])
    assert sd.submit(0), sd.broken  # a running device: the new buffer is flushed at once
    assert len(flushes) == 2 and not sd.map.dirty_mappings
