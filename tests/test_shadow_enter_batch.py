"""The burst path of shadowing (entering shadow mode, a stalled queue): the chains are walked
from one copy of the descriptor table and their pages acquired in one pass. It must do exactly
what walking and acquiring chain by chain, page by page did -- the same device buffers, the
same references, counters and IOMMU entries, the same errors -- on any ring, hostile ones
included (loops, bad links and flags, zero lengths, buffers outside guest RAM, the pool
running out with or without idle buffers to reclaim). No KVM needed."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from shadowrig import attached

from ptmig.devices.virtio.queue import QueueError, QueueState, walk_chain
from ptmig.iommu import IommuTable
from ptmig.layout import PAGE_SHIFT, PAGE_SIZE
from ptmig.memory import GuestMemory
from ptmig.shadow.device import DescriptorTableSnapshot, ShadowedDevice
from ptmig.shadow.mapping import ShadowError
from ptmig.shadow.pool import ShadowPool
from ptmig.shadow.reference import ReferenceDataplane

MEM = 1 << 20  # 256 guest pages
SIZE = 16
DESC = 0x1000
AVAIL = 0x2000
USED = 0x3000
DATA_PAGE = 8  # data buffers from here on

RING = QueueState(SIZE, DESC, AVAIL, USED, 0, 0, True)


def _acquire_chains_page_by_page(sd: ShadowedDevice, q: QueueState, heads: list[int]) -> list[int]:
    """The per-chain, per-page path the batched one replaced (the oracle)."""
    held: list[int] = []
    for n, head in enumerate(heads):
        try:
            chain = walk_chain(sd.vcpu_buf, q, None, head)
            got: list[int] = []
            try:
                for d in chain.descriptors:
                    last = (d.addr + d.length - 1) >> PAGE_SHIFT
                    for gpfn in range(d.addr >> PAGE_SHIFT, last + 1):
                        sd.map.acquire(gpfn, copy=False)
                        got.append(gpfn)
            except ShadowError:
                for gpfn in got:
                    sd.map.release(gpfn)
                raise
            held += got
        except (QueueError, ShadowError):
            if n == 0:
                raise
            break
    return held


addrs = st.one_of(
    st.integers(DATA_PAGE * PAGE_SIZE, 40 * PAGE_SIZE),  # guest RAM, pages shared by chains
    st.integers(DATA_PAGE * PAGE_SIZE, 40 * PAGE_SIZE).map(lambda a: a & ~(PAGE_SIZE - 1)),
    st.integers(MEM - 3 * PAGE_SIZE, MEM - 1),  # at the end of guest RAM: may run past it
    st.integers(MEM, 4 * MEM),  # outside guest RAM
    st.just((1 << 64) - 8),  # wraps the address space
)
lengths = st.one_of(st.integers(1, 3 * PAGE_SIZE), st.integers(1, 64), st.just(0), st.just(1 << 30))
# mostly single readable or writable descriptors (chains that pass), then NEXT, INDIRECT and
# a reserved bit
flags = st.sampled_from([0, 0, 2, 2, 0, 2, 1, 3, 4, 8, 1 | 8])
descriptors = st.tuples(addrs, lengths, flags, st.integers(0, SIZE + 1))


def _setup(pool_pages: int, table: list[tuple[int, int, int, int]], warm: list[int]):
    mem = GuestMemory(MEM)
    blob = b"".join(struct.pack("<QIHH", a, n, f, x) for a, n, f, x in table)
    mem.write(DESC, blob)
    iommu = IommuTable.create(mem.npages)
    pool = ShadowPool(pool_pages)
    sd = ShadowedDevice(attached("dev0", iommu), pool, mem, ReferenceDataplane(mem, pool))
    flushes: list[int] = []
    sd.map.invalidate = lambda: flushes.append(1)
    for gpfn in warm:  # buffers made and used before: idle (stamped, reclaimable)
        if sd.map.slot[gpfn] < 0 and pool.free_pages:
            sd.map.acquire(gpfn, copy=False)
            sd.map.release(gpfn)
    return sd, iommu, pool, flushes


def _close(sd: ShadowedDevice, iommu: IommuTable, pool: ShadowPool) -> None:
    sd.dataplane.close()
    iommu.close()
    pool.close()
    sd.memory.close()


def _state(sd: ShadowedDevice, iommu: IommuTable, pool: ShadowPool, flushes: list[int]):
    return (
        sd.map.slot.tolist(),
        sd.map.refs.tolist(),
        sd.map.stamp.tolist(),
        sd.map.counters.tolist(),
        iommu.entries.tolist(),
        sorted(pool._free),
        sorted(sd.map.quarantine),
        sd.map.dirty_mappings,
        len(flushes),
    )


@settings(max_examples=500, deadline=None)
@given(
    table=st.lists(descriptors, min_size=SIZE, max_size=SIZE),
    heads=st.lists(st.integers(0, SIZE + 1), max_size=SIZE),
    pool_pages=st.sampled_from([4, 12, 40, 200]),
    warm=st.lists(st.integers(DATA_PAGE, 40), max_size=12),
)
@example(  # the first chain runs past the end of guest RAM after one page
    table=[(MEM - 100, PAGE_SIZE, 2, 0)] + [(0x9000, 16, 0, 0)] * (SIZE - 1),
    heads=[0, 1],
    pool_pages=40,
    warm=[],
)
@example(  # the second does, the third is never looked at
    table=[(0x9000, 16, 0, 0), (MEM - 100, PAGE_SIZE, 2, 0)] + [(0xA000, 16, 0, 0)] * (SIZE - 2),
    heads=[0, 1, 2],
    pool_pages=40,
    warm=[],
)
@example(  # a chain that starts right where the one before it ended fails
    table=[(0x9000, PAGE_SIZE, 0, 0), (MEM - 100, PAGE_SIZE, 2, 0)] + [(0, 1, 0, 0)] * (SIZE - 2),
    heads=[0, 1],
    pool_pages=40,
    warm=[],
)
@example(  # the pool runs out at the third chain; idle buffers are reclaimed first
    table=[(0xA000, 2 * PAGE_SIZE, 2, 0)] * 2 + [(0x10000, 3 * PAGE_SIZE, 2, 0)] * (SIZE - 2),
    heads=[0, 1, 2, 3],
    pool_pages=4,
    warm=[20, 21],
)
@example(  # chains of several descriptors, readable then writable, sharing pages
    table=[
        (0x9F00, PAGE_SIZE, 1, 1),
        (0x20000, 2 * PAGE_SIZE, 1 | 2, 2),
        (0x9000, 16, 2, 0),
        (0xA000, 16, 1, 4),
        (0x9000, 3 * PAGE_SIZE, 0, 0),
    ]
    + [(0, 1, 0, 0)] * (SIZE - 5),
    heads=[3, 0, 2, 0],
    pool_pages=40,
    warm=[10, 32],
)
@example(  # two chains of two descriptors: new buffers are made in chain order
    table=[(0x9000, 16, 1, 1), (0xA000, 16, 0, 0), (0xB000, 16, 1, 3), (0xC000, 16, 0, 0)]
    + [(0, 1, 0, 0)] * (SIZE - 4),
    heads=[0, 2],
    pool_pages=40,
    warm=[],
)
@example(  # a readable descriptor after a writable one, in the third chain
    table=[(0x9000, 16, 0, 0), (0xA000, 16, 3, 2), (0xB000, 16, 0, 0)] + [(0, 1, 0, 0)] * 13,
    heads=[0, 0, 1],
    pool_pages=40,
    warm=[],
)
@example(  # more bytes than a chain may describe, over several descriptors
    table=[(0x9000, 40 << 20, 1, 1), (0x9000, 40 << 20, 0, 0)] + [(0, 1, 0, 0)] * 14,
    heads=[2, 0],
    pool_pages=40,
    warm=[],
)
@example(  # a loop in the second chain
    table=[(0x9000, 16, 0, 0), (0xA000, 16, 1, 2), (0xB000, 16, 1, 1)] + [(0, 1, 0, 0)] * 13,
    heads=[0, 1],
    pool_pages=40,
    warm=[],
)
def test_batched_acquire_equals_page_by_page(table, heads, pool_pages, warm) -> None:
    results = []
    for path in ("batched", "page by page"):
        sd, iommu, pool, flushes = _setup(pool_pages, table, warm)
        try:
            if path == "batched":
                held = sd._acquire_chains(RING, heads)
            else:
                held = _acquire_chains_page_by_page(sd, RING, heads)
            outcome: object = sorted(held)
        except (QueueError, ShadowError) as e:
            outcome = (type(e).__name__, str(e))
        results.append((outcome, _state(sd, iommu, pool, flushes)))
        _close(sd, iommu, pool)
    assert results[0] == results[1]


@settings(max_examples=100, deadline=None)
@given(
    table=st.lists(descriptors, min_size=SIZE, max_size=SIZE),
    heads=st.lists(st.integers(0, SIZE - 1), min_size=1, max_size=SIZE),
)
def test_releasing_a_burst_at_once_equals_one_page_at_a_time(table, heads) -> None:
    results = []
    for path in ("at once", "one at a time"):
        sd, iommu, pool, flushes = _setup(200, table, [])
        try:
            held = sd._acquire_chains(RING, heads)
        except (QueueError, ShadowError):
            held = []
        if path == "at once":
            sd.map.release_many(held)
        else:
            for gpfn in held:
                sd.map.release(gpfn, used=False)
        results.append(_state(sd, iommu, pool, flushes))
        _close(sd, iommu, pool)
    assert results[0] == results[1]
    assert not any(results[0][1]), "every reservation of the burst was dropped"


def test_releasing_more_than_was_acquired_is_refused() -> None:
    sd, iommu, pool, _ = _setup(8, [(0, 1, 0, 0)] * SIZE, [])
    sd.map.acquire_many([DATA_PAGE, DATA_PAGE + 1])
    try:
        sd.map.release_many([DATA_PAGE, DATA_PAGE])
    except ShadowError as e:
        assert "released more often than acquired" in str(e)
    else:
        raise AssertionError("a page released twice after one acquire was accepted")
    assert sd.map.refs[DATA_PAGE] == 1  # nothing was dropped
    _close(sd, iommu, pool)


def test_the_table_copy_serves_the_table_and_passes_other_reads_through() -> None:
    mem = GuestMemory(MEM)
    mem.write(DESC, bytes(range(256)) * (SIZE * 16 // 256))
    mem.write(AVAIL, b"\x07\x08")
    sd, iommu, pool, _ = _setup(8, [(0, 1, 0, 0)] * SIZE, [])
    snap = DescriptorTableSnapshot.of(sd.vcpu_buf.__class__(mem), RING)
    assert isinstance(snap, DescriptorTableSnapshot)
    mem.write(DESC, b"\xff" * 16)  # a later guest store: the copy keeps what was read
    assert snap.read(DESC, 16) == bytes(range(16))
    assert snap.read(AVAIL, 2) == b"\x07\x08"
    outside = QueueState(SIZE, MEM - 64, AVAIL, USED, 0, 0, True)  # runs past guest RAM
    assert DescriptorTableSnapshot.of(sd.vcpu_buf, outside) is sd.vcpu_buf
    mem.close()
    _close(sd, iommu, pool)


def test_iommu_map_pages_writes_the_entries_of_one_page_maps() -> None:
    one, many = IommuTable.create(64), IommuTable.create(64)
    iova = np.array([5, 1, 9, 63], dtype=np.int64)
    pfns = np.array([7, 0, 3, 2], dtype=np.int64)
    for i, p in zip(iova.tolist(), pfns.tolist(), strict=True):
        one.map(i, 1, 1, p)
    many.map_pages(iova, 1, pfns)
    assert one.entries.tolist() == many.entries.tolist()
    one.close()
    many.close()


def test_a_pool_emptied_by_another_map_after_the_check_loses_no_page(monkeypatch) -> None:
    """The batch checks the pool's free pages, then allocates; another map of the same pool
    may take pages in between (found in review). The batch then gives back what it took and
    goes page by page: the error is the usual ShadowError with the pages before it acquired,
    and no pool page is left allocated without a guest page that owns it."""
    sd, iommu, pool, _ = _setup(4, [(0, 1, 0, 0)] * SIZE, [])
    monkeypatch.setattr(ShadowPool, "free_pages", property(lambda self: 1 << 20))
    pages = [DATA_PAGE + i for i in range(6)]
    try:
        sd.map.acquire_many(pages)
    except ShadowError as e:
        assert e.acquired == 4  # type: ignore[attr-defined]
    else:
        raise AssertionError("6 new pages were acquired from a pool of 4")
    assert sd.map.refs[pages[:4]].tolist() == [1, 1, 1, 1]
    assert (sd.map.slot[pages[4:]] < 0).all()
    assert pool.in_use == 4 == int((sd.map.slot >= 0).sum())
    _close(sd, iommu, pool)
