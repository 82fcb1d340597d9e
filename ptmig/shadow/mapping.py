"""Device buffers: which guest page is shadowed by which pool page, and the IOMMU remaps.

While shadowing, the device's IOMMU domain maps *only* device buffers: every other IOVA is
unmapped, so a DMA outside a forwarded request faults instead of reaching guest RAM unseen. A
guest page gets a device buffer on demand (`acquire`) and loses its last reference when no DMA
work request uses it any more (`release`; the native data plane does the same per request).

Released device buffers are reclaimed lazily: an unreferenced buffer stays mapped (idle) until
the pool needs its page or there are more than `IDLE_MAX` idle buffers, and then the least
recently used go first. A driver recycles the same receive buffers over and over; unmapping
each one on completion and mapping it again on the next post would cost an IOTLB invalidation --
a round trip to the device -- per request. An idle buffer is harmless: the device only DMAs for
requests the VMM forwarded, and the VMM copies data in (readable bytes at submission) and out
(written bytes at completion) explicitly, never relying on what an idle page holds. A reclaimed
page's IOVA is unmapped and its pool page waits in quarantine until the next IOTLB
invalidation, so a stale IOTLB entry in the device can never hit a page reused for something
else.

The table itself is three arrays shared with the native data plane (`DataplaneDevice`): pool
page per guest page (-1: none), references, and the LRU stamp of when a page became idle.
Callers hold the data plane's lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..devices.virtio.queue import QueueError
from ..errors import PtmigError
from ..iommu import TARGET_POOL, IommuTable
from ..layout import PAGE_SHIFT, PAGE_SIZE
from ..memory import GuestMemory, GuestMemoryError
from .native import ST_ACTIVE, ST_CLOCK, ST_IDLE, ST_PEAK, ST_REUSED
from .pool import PoolExhausted, ShadowPool


class ShadowError(PtmigError):
    """Shadowing cannot continue for this device (hostile ring, pool exhausted, device fault).

    The base of the shadow package's errors; the engine turns a device's into `ShadowFailed`."""


IDLE_MAX = 1024  # unreferenced device buffers kept mapped for reuse
IDLE_KEEP = IDLE_MAX * 3 // 4  # reclaiming goes down to this many, so it runs rarely


class PageTable(Protocol):
    """A data plane device's shared page table and counters (native or reference)."""

    slot: np.ndarray
    refs: np.ndarray
    stamp: np.ndarray
    stats: np.ndarray


class ShadowMap:
    """GPA page → device-buffer page for one device's IOMMU domain.

    `invalidate` flushes the device's IOTLB (synchronously); it is used when the pool runs out
    and idle buffers must be reclaimed on the spot. `view_base`, for a device that sees the
    pool through a memory table (see `pool.py`), is the pool page of its view's page 0: guest
    page g's device buffer is then always view page g."""

    def __init__(
        self,
        pool: ShadowPool,
        iommu: IommuTable,
        memory: GuestMemory,
        table: PageTable,
        invalidate: Callable[[], None] | None = None,
        view_base: int | None = None,
    ) -> None:
        self.pool = pool
        self.view_base = view_base
        self.iommu = iommu
        self.memory = memory
        self.invalidate = invalidate
        self.slot = table.slot
        self.refs = table.refs
        self.stamp = table.stamp
        self.counters = table.stats
        self.quarantine: list[int] = []
        self.dirty_mappings = False  # the device's IOTLB must be invalidated before use

    # --- what the table holds ------------------------------------------------------------------

    @property
    def pages(self) -> set[int]:
        """Guest pages whose device buffer a request (or a ring) references."""
        return set(np.flatnonzero(self.refs > 0).tolist())

    @property
    def idle(self) -> set[int]:
        """Guest pages with a device buffer that nothing references (kept for reuse)."""
        return set(self._idle_pages().tolist())

    @property
    def active_count(self) -> int:
        return int(self.counters[ST_ACTIVE])

    @property
    def idle_count(self) -> int:
        return int(self.counters[ST_IDLE])

    @property
    def reused(self) -> int:
        return int(self.counters[ST_REUSED])

    @property
    def peak(self) -> int:
        return int(self.counters[ST_PEAK])

    def _idle_pages(self) -> np.ndarray:
        return np.flatnonzero((self.slot >= 0) & (self.refs == 0))

    # --- references ----------------------------------------------------------------------------

    def acquire(self, gpfn: int, *, copy: bool) -> int:
        """Reference the device buffer of guest page `gpfn`, creating it if needed; `copy`
        fills a new or reused buffer with the guest page (the rings at entry)."""
        if not self.memory.is_ram(gpfn, 1):
            raise self._outside_ram(gpfn)
        pfn = int(self.slot[gpfn])
        c = self.counters
        if pfn < 0:
            pfn = self._alloc() if self.view_base is None else self.view_base + gpfn
            self.slot[gpfn] = pfn
            self.stamp[gpfn] = 0  # never used: taking it is not a reuse
            self.iommu.map(gpfn, 1, TARGET_POOL, pfn, read=True, write=True)
            self.dirty_mappings = True
            c[ST_IDLE] += 1  # a fresh buffer counts as idle until referenced
        elif self.refs[gpfn] == 0 and self.stamp[gpfn]:
            c[ST_REUSED] += 1
        if self.refs[gpfn] == 0:
            c[ST_IDLE] -= 1
            c[ST_ACTIVE] += 1
            c[ST_PEAK] = max(int(c[ST_PEAK]), int(c[ST_ACTIVE]))
        self.refs[gpfn] += 1
        if copy:
            self.pool.write(pfn, 0, self.memory.slice(gpfn << PAGE_SHIFT, PAGE_SIZE))
        return pfn

    def acquire_many(self, gpfns: list[int] | np.ndarray) -> int:
        """`acquire(g, copy=False)` for each page of `gpfns` in order, with one pass over the
        table: the pages of a burst of requests. Returns how many were acquired; on a
        `ShadowError` (a page outside guest RAM, the pool exhausted) the pages before the
        failing one stay acquired, as with one `acquire` per page, and the error carries
        `acquired`. The result -- buffers, references, counters, IOMMU entries -- is the same
        as the per-page calls'; the pages run one by one only when the pool might run out (a
        reclaim must then see the references as they were at that page)."""
        pages = np.asarray(gpfns, dtype=np.int64)
        if pages.size == 0:
            return 0
        bad = self._first_outside_ram(pages)
        n = pages.size if bad is None else bad
        todo = pages[:n]
        uniq, first, counts = np.unique(todo, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")  # first-seen order: the allocation order
        uniq, counts = uniq[order], counts[order]
        new = uniq[self.slot[uniq] < 0]
        if self.view_base is None and new.size > self.pool.free_pages:
            return self._acquire_each(pages.tolist())
        c = self.counters
        refs0 = self.refs[uniq]
        reused = int(
            np.count_nonzero((refs0 == 0) & (self.slot[uniq] >= 0) & (self.stamp[uniq] != 0))
        )
        if new.size:
            if self.view_base is None:
                taken: list[int] = []
                try:
                    for _ in range(new.size):
                        taken.append(self.pool.alloc())
                except PoolExhausted:  # another map of the pool took pages since the check
                    for pfn in reversed(taken):
                        self.pool.free(pfn)
                    return self._acquire_each(pages.tolist())
                pfns = np.asarray(taken, dtype=np.int64)
            else:
                pfns = new + self.view_base
            self.slot[new] = pfns
            self.stamp[new] = 0
            self.iommu.map_pages(new, TARGET_POOL, pfns, read=True, write=True)
            self.dirty_mappings = True
        woke = int(np.count_nonzero(refs0 == 0))
        c[ST_REUSED] += reused
        c[ST_IDLE] += new.size  # (unsigned counters: add before taking away)
        c[ST_IDLE] -= woke
        c[ST_ACTIVE] += woke
        c[ST_PEAK] = max(int(c[ST_PEAK]), int(c[ST_ACTIVE]))
        self.refs[uniq] += counts.astype(self.refs.dtype)
        if bad is not None:
            err = self._outside_ram(int(pages[bad]))
            err.acquired = n  # type: ignore[attr-defined]
            raise err
        return n

    def _acquire_each(self, gpfns: list[int]) -> int:
        for n, gpfn in enumerate(gpfns):
            try:
                self.acquire(gpfn, copy=False)
            except ShadowError as e:
                e.acquired = n  # type: ignore[attr-defined]
                raise
        return len(gpfns)

    def _first_outside_ram(self, pages: np.ndarray) -> int | None:
        """Index of the first page of `pages` outside guest RAM, or None."""
        inside = np.zeros(pages.size, dtype=bool)
        for first, count in self.memory.page_ranges():
            inside |= (pages >= first) & (pages < first + count)
        out = np.flatnonzero(~inside)
        return int(out[0]) if out.size else None

    def _outside_ram(self, gpfn: int) -> ShadowError:
        return ShadowError(
            f"guest page {gpfn} is outside guest RAM {self.memory.describe_regions()}"
        )

    def release_many(self, gpfns: list[int]) -> None:
        """`release(g, used=False)` for each page of `gpfns` (a burst's reservations), at once."""
        if not gpfns:
            return
        uniq, counts = np.unique(np.asarray(gpfns, dtype=np.int64), return_counts=True)
        short = np.flatnonzero(self.refs[uniq] < counts)
        if short.size:
            raise ShadowError(f"guest page {int(uniq[short[0]])} released more often than acquired")
        self.refs[uniq] -= counts.astype(self.refs.dtype)
        idle = int(np.count_nonzero(self.refs[uniq] == 0))
        self.counters[ST_ACTIVE] -= idle
        self.counters[ST_IDLE] += idle

    def release(self, gpfn: int, *, used: bool = True) -> None:
        """Drop a reference. `used=False`: the page was only reserved for a request the data
        plane will forward (its LRU stamp stays, 0 if the buffer is new)."""
        if self.refs[gpfn] <= 0:
            raise ShadowError(f"guest page {gpfn} released more often than acquired")
        self.refs[gpfn] -= 1
        if self.refs[gpfn] == 0:
            self.counters[ST_ACTIVE] -= 1
            self.counters[ST_IDLE] += 1
            if used:
                self.counters[ST_CLOCK] += 1
                self.stamp[gpfn] = int(self.counters[ST_CLOCK]) & 0xFFFF_FFFF

    def _alloc(self) -> int:
        try:
            return self.pool.alloc()
        except PoolExhausted as e:
            if not self.idle_count or self.invalidate is None:
                raise ShadowError(str(e)) from None
        self.reclaim(keep=0)  # every idle buffer, flush the IOTLB, then retry
        self.invalidate()
        self.invalidated()
        try:
            return self.pool.alloc()
        except PoolExhausted as e:
            raise ShadowError(str(e)) from None

    def reclaim(self, keep: int = IDLE_KEEP) -> int:
        """Unmap the least recently used idle buffers until `keep` remain; their pool pages
        wait in quarantine for the next IOTLB invalidation. Returns how many."""
        idle = self._idle_pages()
        excess = idle.size - keep
        if excess <= 0:
            return 0
        oldest = idle[np.argsort(self.stamp[idle], kind="stable")[:excess]]
        for gpfn in oldest.tolist():
            self.iommu.unmap(gpfn, 1)
            self.quarantine.append(int(self.slot[gpfn]))
            self.slot[gpfn] = -1
        self.counters[ST_IDLE] -= excess
        return int(excess)

    def invalidated(self) -> None:
        """The device acknowledged an IOTLB invalidation: quarantined pages are free again."""
        for pfn in self.quarantine:
            self.pool.free(pfn)
        self.quarantine.clear()
        self.dirty_mappings = False

    def release_all(self) -> None:
        """Drop every device buffer (the caller restores the IOMMU map and invalidates)."""
        mapped = np.flatnonzero(self.slot >= 0)
        self.quarantine.extend(int(p) for p in self.slot[mapped])
        self.slot[:] = -1
        self.refs[:] = 0
        self.counters[ST_ACTIVE] = 0
        self.counters[ST_IDLE] = 0

    # --- the device buffers as memory, addressed by IOVA (= GPA) ----------------------------

    def _spans(self, iova: int, length: int) -> list[tuple[int, int, int, int]]:
        """(pool_pfn, offset, start_in_data, n) pieces of [iova, iova+length)."""
        out = []
        done = 0
        while done < length:
            addr = iova + done
            gpfn, off = addr >> PAGE_SHIFT, addr & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, length - done)
            pfn = int(self.slot[gpfn]) if 0 <= gpfn < self.slot.size else -1
            if pfn < 0:
                raise ShadowError(f"IOVA {addr:#x} has no device buffer")
            out.append((pfn, off, done, n))
            done += n
        return out

    def read(self, iova: int, length: int) -> bytes:
        return b"".join(self.pool.read(p, off, n) for p, off, _, n in self._spans(iova, length))

    def write(self, iova: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        for p, off, start, n in self._spans(iova, len(mv)):
            self.pool.write(p, off, mv[start : start + n])


class DeviceBufferView:
    """The device buffers of one device as a `RingMemory` (the shadow rings live here)."""

    def __init__(self, smap: ShadowMap) -> None:
        self.smap = smap

    def read(self, addr: int, length: int) -> bytes:
        try:
            return self.smap.read(addr, length)
        except ShadowError as e:
            raise QueueError(str(e)) from None

    def write(self, addr: int, data: bytes) -> None:
        try:
            self.smap.write(addr, data)
        except ShadowError as e:
            raise QueueError(str(e)) from None


class VcpuBufferView:
    """Guest RAM (the vCPU buffers) as a `RingMemory`: reads are bounds-checked, writes go
    through the VMM's one dirty-marking write path; a bad address is a `QueueError`."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def read(self, addr: int, length: int) -> bytes:
        try:
            return self.memory.read(addr, length)
        except GuestMemoryError as e:
            raise QueueError(str(e)) from None

    def write(self, addr: int, data: bytes) -> None:
        try:
            self.memory.write(addr, data)
        except GuestMemoryError as e:
            raise QueueError(str(e)) from None
