"""The native shadow data plane, without KVM: hostile rings, the device's view, the thread.

The guest is played by `DriverQueue` stores into a real `GuestMemory`; the device by a
`SplitQueue` over a `DmaView` of the IOMMU domain the shadow engine remaps, as in a device
process. A crash of the native code would take the test process down: these tests fail then.
"""

from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shadowrig import GuestStores, attached, device_state

from ptmig import bitmap
from ptmig.devices.virtio.queue import SplitQueue
from ptmig.devices.virtio.testing import Buffer, DriverQueue
from ptmig.iommu import DmaView, IommuTable
from ptmig.layout import PAGE_SIZE
from ptmig.memory import GuestMemory
from ptmig.shadow.device import ShadowedDevice
from ptmig.shadow.native import Dataplane
from ptmig.shadow.pool import ShadowPool

MEM = 4 << 20
RING_BASE = 0x10000
DATA = 0x40000
QSIZE = 16


@dataclass
class Rig:
    mem: GuestMemory
    iommu: IommuTable
    pool: ShadowPool
    drv: DriverQueue
    sd: ShadowedDevice
    dma: DmaView

    def enter(self) -> SplitQueue:
        self.sd.build(device_state(self.drv))
        self.sd.submit(0)
        self.dma.invalidate_iotlb()
        self.sd.map.invalidated()
        return SplitQueue(self.drv.state(), self.dma)

    def close(self) -> None:
        self.sd.close()
        self.dma.close()
        self.iommu.close()
        self.pool.close()
        self.mem.close()


def make_rig(dataplane_for=None) -> Rig:
    mem = GuestMemory(MEM)
    iommu = IommuTable.create(mem.npages)
    iommu.map_identity(mem.npages)
    pool = ShadowPool(256)
    drv = DriverQueue(GuestStores(mem), QSIZE, base=RING_BASE, data_start=DATA)
    dp = dataplane_for(mem, pool) if dataplane_for else None
    sd = ShadowedDevice(attached("dev0", iommu), pool, mem, dp)
    dma = DmaView(iommu, mem.mmap, pool=pool.mmap, name="dev0")
    return Rig(mem, iommu, pool, drv, sd, dma)


# --- the device sees exactly the validated chains ------------------------------------------

chains = st.lists(
    st.lists(st.tuples(st.integers(1, 3 * PAGE_SIZE), st.booleans()), min_size=1, max_size=4).map(
        lambda bufs: sorted(bufs, key=lambda b: b[1])
    ),  # readable before writable
    min_size=1,
    max_size=QSIZE // 4,
)  # at most QSIZE descriptors in all


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains)
def test_device_pops_the_guest_chains_with_their_bytes(spec) -> None:
    rig = make_rig()
    try:
        dq = rig.enter()
        heads, expect = [], []
        for n, bufs in enumerate(spec):
            chain = []
            for k, (length, writable) in enumerate(bufs):
                fill = None if writable else bytes([n + k + 1]) * length
                chain.append(Buffer(rig.drv.alloc(length, fill=fill), length, writable))
            heads.append(rig.drv.add_chain(chain))
            expect.append(chain)
        assert rig.sd.submit(0), rig.sd.broken
        rig.sd.flush_mappings()
        rig.dma.invalidate_iotlb()
        rig.sd.map.invalidated()
        for head, chain in zip(heads, expect, strict=True):
            got = dq.pop()
            assert got is not None and got.head == head
            assert [(d.addr, d.length, d.writable) for d in got.descriptors] == [
                (b.addr, b.length, b.writable) for b in chain
            ]
            for d in got.readable:
                assert rig.dma.read(d.addr, d.length) == rig.mem.read(d.addr, d.length)
        assert dq.pop() is None
    finally:
        rig.close()


def test_completion_copies_exactly_the_written_bytes_and_marks_them_dirty() -> None:
    rig = make_rig()
    try:
        rx = rig.drv.alloc(2 * PAGE_SIZE, fill=b"G" * 2 * PAGE_SIZE, align=PAGE_SIZE)
        head = rig.drv.add_chain([Buffer(rx, 2 * PAGE_SIZE, writable=True)])
        dq = rig.enter()
        rig.sd.dataplane.take_dirty()
        chain = dq.pop()
        assert chain is not None
        rig.dma.write(rx, b"D" * (PAGE_SIZE + 10))
        dq.push_used(head, PAGE_SIZE + 10)
        assert rig.sd.complete() == 1
        assert rig.mem.read(rx, 2 * PAGE_SIZE) == b"D" * (PAGE_SIZE + 10) + b"G" * (PAGE_SIZE - 10)
        assert rig.drv.take_used() == [(head, PAGE_SIZE + 10)]
        dirty = bitmap.pages(rig.sd.dataplane.take_dirty(), rig.mem.npages).tolist()
        assert {rx // PAGE_SIZE, rx // PAGE_SIZE + 1} <= set(dirty)
        assert rig.drv.used_addr // PAGE_SIZE in dirty
        assert rig.sd.map.active_count == len(rig.sd.map.pages)  # only the rings stay referenced
    finally:
        rig.close()


# --- hostile input never crashes and never escapes ------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.binary(min_size=16 * QSIZE, max_size=16 * QSIZE),
    avail=st.binary(min_size=2 * QSIZE, max_size=2 * QSIZE),
    idx=st.integers(0, 0xFFFF),
)
def test_hostile_guest_rings_are_refused_or_forwarded_never_a_crash(table, avail, idx) -> None:
    rig = make_rig()
    try:
        rig.enter()
        st_ = rig.drv.state()
        rig.mem.mmap[st_.desc_addr : st_.desc_addr + len(table)] = table
        rig.mem.mmap[st_.avail_addr + 4 : st_.avail_addr + 4 + len(avail)] = avail
        rig.drv.write_avail_idx(idx)
        before = rig.mem.array.copy()
        for _ in range(2):
            rig.sd.submit(0)
            rig.sd.complete()
        # the VMM writes nothing to guest RAM without a completion from the device
        assert np.array_equal(before, rig.mem.array)
        if rig.sd.broken is None:
            assert rig.sd.stats.requests_forwarded <= min(idx, QSIZE)
    finally:
        rig.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=4
    ),
    used_idx=st.integers(0, 0xFFFF),
)
def test_a_broken_device_used_ring_is_contained(entries, used_idx) -> None:
    rig = make_rig()
    try:
        for _ in range(2):
            rig.drv.add_chain([Buffer(rig.drv.alloc(64), 64, writable=True)])
        rig.enter()
        st_ = rig.drv.state()
        for n, (head, length) in enumerate(entries):
            rig.sd.dev_buf.write(st_.used_addr + 4 + 8 * n, struct.pack("<II", head, length))
        rig.sd.dev_buf.write(st_.used_addr + 2, struct.pack("<H", used_idx))
        done = rig.sd.complete()
        assert done <= 2
        if rig.sd.broken is None:
            for head, written in rig.drv.take_used():
                assert written <= 64 and head < QSIZE
    finally:
        rig.close()


# --- the thread: doorbell in, device kicked, completion synced, guest woken ------------------


def _wait(fd: int, timeout: float = 5.0) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        os.eventfd_read(fd)
    return bool(ready)


def _thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass  # the thread ended
    return names


def _thread_id(name: str) -> int | None:
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    return int(tid)
        except OSError:
            pass  # the thread ended
    return None


def test_the_data_plane_thread_runs_under_sched_batch() -> None:
    """Like the rest of the frame path (`ptmig.net.sched`): a burst the vCPU or a device posts
    reaches it whole, without it preempting them at every request."""
    rig = make_rig(lambda mem, pool: Dataplane(mem, pool))
    dp = rig.sd.dataplane
    assert isinstance(dp, Dataplane)
    try:
        dp.start()
        deadline = time.monotonic() + 5
        while (tid := _thread_id("shadow-dplane")) is None:
            assert time.monotonic() < deadline, _thread_names()
            time.sleep(0.01)
        deadline = time.monotonic() + 5  # (the thread sets it first thing: wait for that)
        while os.sched_getscheduler(tid) != os.SCHED_BATCH:
            assert time.monotonic() < deadline, os.sched_getscheduler(tid)
            time.sleep(0.01)
        # the caller's own policy is untouched
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        dp.stop()
    finally:
        rig.close()
        dp.close()


def test_the_data_plane_thread_services_doorbells_and_interrupts() -> None:
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    holder: list[Dataplane] = []

    def dataplane(mem: GuestMemory, pool: ShadowPool) -> Dataplane:
        holder.append(Dataplane(mem, pool, guest_wake_fd=wake))
        return holder[0]

    rig = make_rig(dataplane)
    dp = holder[0]
    try:
        rx = rig.drv.alloc(PAGE_SIZE, align=PAGE_SIZE)
        sd = ShadowedDevice(rig.sd.dev, rig.pool, rig.mem, dp, irq_fd=irq)
        sd.build(device_state(rig.drv), doorbells={0: doorbell}, kicks={0: kick})
        rig.dma.invalidate_iotlb()
        sd.map.invalidated()
        dq = SplitQueue(rig.drv.state(), rig.dma)
        dp.start()
        # the thread carries an OS name of its own (per-thread CPU tools tell it apart)
        assert "shadow-dplane" in _thread_names(), _thread_names()
        # the first request needs a new device buffer: the thread stalls and asks for help
        head = rig.drv.add_chain([Buffer(rx, 32, writable=True)])
        os.eventfd_write(doorbell, 1)
        assert _wait(dp.slow_fd), "a request on an unshadowed page must ask Python for help"
        with dp.locked():
            assert sd.queues[0].native.stalled
            assert sd.shadow_stalled(0)
        rig.dma.invalidate_iotlb()
        sd.map.invalidated()
        dp.poke()
        assert _wait(kick), "the device was not kicked"
        chain = dq.pop()
        assert chain is not None and chain.head == head
        rig.dma.write(rx, b"hello")
        dq.push_used(head, 5)
        os.eventfd_write(irq, 1)
        assert _wait(wake), "the guest was not woken after the completion"
        assert rig.drv.take_used() == [(head, 5)] and rig.mem.read(rx, 5) == b"hello"
        # the same buffer again: already shadowed, so the thread forwards it on its own
        head = rig.drv.add_chain([Buffer(rx, 32, writable=True)])
        os.eventfd_write(doorbell, 1)
        assert _wait(kick)
        assert dq.pop() is not None
        assert sd.stats.stalls == 1 and sd.map.reused == 1
        # each doorbell and the interrupt woke the thread once (the wake-ups the engine reports)
        assert (sd.stats.doorbells, sd.stats.interrupts) == (2, 1)
        assert sd.stats.wakeups == 3  # the poke after the stall is Python's, not the device's
        # the device was kicked for each forwarded burst (not for the stalled doorbell) and the
        # guest woken once, for the one completion
        assert (sd.stats.device_kicks, sd.stats.guest_interrupts) == (2, 1)
        dp.stop()
        sd.close()
    finally:
        rig.close()
        for fd in (wake, doorbell, kick, irq):
            os.close(fd)
        dp.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, 3),
    addr=st.one_of(st.integers(0, MEM + PAGE_SIZE), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.integers(0, 3 * PAGE_SIZE), st.integers(0, 2**32 - 1)),
    flags=st.integers(0, 0xFFFF),
    nxt=st.integers(0, 0xFFFF),
)
def test_one_corrupted_descriptor_in_a_valid_ring_is_contained(
    index, addr, length, flags, nxt
) -> None:
    rig = make_rig()
    try:
        dq = rig.enter()
        for _ in range(2):
            rig.drv.add_chain(
                [
                    Buffer(rig.drv.alloc(100, fill=b"r" * 100), 100),
                    Buffer(rig.drv.alloc(100), 100, writable=True),
                ]
            )
        rig.drv.write_desc(index, addr, length, flags, nxt)
        rig.sd.submit(0)
        rig.sd.flush_mappings()
        rig.dma.invalidate_iotlb()
        rig.sd.map.invalidated()
        # whatever was forwarded is what the device can pop, completes, and syncs back
        while (chain := dq.pop()) is not None:
            for d in chain.writable:
                rig.dma.write(d.addr, b"w" * min(d.length, 16))
            dq.push_used(chain.head, min(chain.total_writable, 16))
        rig.sd.complete()
        forwarded = rig.sd.stats.requests_forwarded
        synced = len(rig.drv.take_used())
        assert synced == rig.sd.stats.completions_synced
        if rig.sd.broken is None:
            assert synced == forwarded == 2
        else:  # a broken device stops syncing: leaving shadow mode redoes from the guest ring
            assert synced <= forwarded < 2
    finally:
        rig.close()
