"""Device buffers: which guest page is shadowed by which pool page, and the IOMMU remaps.

While shadowing, the device's IOMMU domain maps *only* device buffers: every other IOVA is
unmapped, so a DMA outside a forwarded request faults instead of reaching guest RAM unseen. A
guest page is shadowed on demand (`acquire`) and released when no DMA work request references it
any more (`release`).

Released device buffers are reclaimed lazily: an unreferenced buffer stays mapped (idle, in LRU
order) until the pool needs its page or there are more than `IDLE_MAX` idle buffers. A driver
recycles the same receive buffers over and over; unmapping each one on completion and mapping it
again on the next post would cost an IOTLB invalidation — a round trip to the device — per
request. An idle buffer is harmless: the device only DMAs for requests the VMM forwarded, and
the VMM copies data in (readable bytes at submission) and out (written bytes at completion)
explicitly, never relying on what an idle page holds. A reclaimed page's IOVA is unmapped and its
pool page waits in quarantine until the next IOTLB invalidation, so a stale IOTLB entry in the
device can never hit a page reused for something else.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..devices.virtio.queue import QueueError
from ..iommu import TARGET_POOL, IommuTable
from ..layout import PAGE_SHIFT, PAGE_SIZE
from ..memory import GuestMemory, GuestMemoryError
from .pool import PoolExhausted, ShadowPool


class ShadowError(Exception):
    """Shadowing cannot continue for this device (hostile ring, pool exhausted, device fault)."""


@dataclass
class _Shadow:
    pool_pfn: int
    refs: int


IDLE_MAX = 1024  # unreferenced device buffers kept mapped for reuse


class ShadowMap:
    """GPA page → device-buffer page for one device's IOMMU domain.

    `invalidate` flushes the device's IOTLB (synchronously); it is used when the pool runs out
    and idle buffers must be reclaimed on the spot."""

    def __init__(self, pool: ShadowPool, iommu: IommuTable, memory: GuestMemory,
                 invalidate: Callable[[], None] | None = None) -> None:
        self.pool = pool
        self.iommu = iommu
        self.memory = memory
        self.invalidate = invalidate
        self.pages: dict[int, _Shadow] = {}
        self.idle: OrderedDict[int, int] = OrderedDict()  # gpfn -> pool pfn, still mapped
        self.quarantine: list[int] = []
        self.dirty_mappings = False  # the device's IOTLB must be invalidated before use
        self.peak = 0
        self.reused = 0

    def acquire(self, gpfn: int, *, copy: bool) -> int:
        """Reference the device buffer of guest page `gpfn`, creating it if needed."""
        sh = self.pages.get(gpfn)
        if sh is not None:
            sh.refs += 1
            return sh.pool_pfn
        if not 0 <= gpfn < self.memory.npages:
            raise ShadowError(f"guest page {gpfn} is outside guest RAM")
        idle = self.idle.pop(gpfn, None)
        if idle is not None:
            self.pages[gpfn] = _Shadow(idle, 1)
            self.reused += 1
            if copy:
                self.pool.write(idle, 0, self.memory.slice(gpfn << PAGE_SHIFT, PAGE_SIZE))
            return idle
        pfn = self._alloc()
        if copy:
            self.pool.write(pfn, 0, self.memory.slice(gpfn << PAGE_SHIFT, PAGE_SIZE))
        self.pages[gpfn] = _Shadow(pfn, 1)
        self.iommu.map(gpfn, 1, TARGET_POOL, pfn, read=True, write=True)
        self.dirty_mappings = True
        self.peak = max(self.peak, len(self.pages))
        return pfn

    def _alloc(self) -> int:
        try:
            return self.pool.alloc()
        except PoolExhausted as e:
            if not self.idle or self.invalidate is None:
                raise ShadowError(str(e)) from None
        while self.idle:  # reclaim every idle buffer, flush the IOTLB, then retry
            self._reclaim_oldest()
        self.invalidate()
        self.invalidated()
        try:
            return self.pool.alloc()
        except PoolExhausted as e:
            raise ShadowError(str(e)) from None

    def release(self, gpfn: int) -> None:
        sh = self.pages[gpfn]
        sh.refs -= 1
        if sh.refs == 0:
            del self.pages[gpfn]
            self.idle[gpfn] = sh.pool_pfn
            if len(self.idle) > IDLE_MAX:
                self._reclaim_oldest()

    def _reclaim_oldest(self) -> None:
        gpfn, pfn = self.idle.popitem(last=False)
        self.iommu.unmap(gpfn, 1)
        self.quarantine.append(pfn)

    def invalidated(self) -> None:
        """The device acknowledged an IOTLB invalidation: quarantined pages are free again."""
        for pfn in self.quarantine:
            self.pool.free(pfn)
        self.quarantine.clear()
        self.dirty_mappings = False

    def release_all(self) -> None:
        for sh in self.pages.values():
            self.quarantine.append(sh.pool_pfn)
        self.quarantine.extend(self.idle.values())
        self.pages.clear()
        self.idle.clear()

    # --- the device buffers as memory, addressed by IOVA (= GPA) ----------------------------

    def _spans(self, iova: int, length: int) -> list[tuple[int, int, int, int]]:
        """(pool_pfn, offset, start_in_data, n) pieces of [iova, iova+length)."""
        out = []
        done = 0
        while done < length:
            addr = iova + done
            gpfn, off = addr >> PAGE_SHIFT, addr & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - off, length - done)
            sh = self.pages.get(gpfn)
            if sh is None:
                raise ShadowError(f"IOVA {addr:#x} has no device buffer in use")
            out.append((sh.pool_pfn, off, done, n))
            done += n
        return out

    def _within_page(self, iova: int, length: int) -> int | None:
        """Pool byte offset of [iova, iova+length) when it lies in one device buffer (the
        common case: ring fields, descriptors, packets): the hot path skips `_spans`."""
        off = iova & (PAGE_SIZE - 1)
        if off + length > PAGE_SIZE:
            return None
        sh = self.pages.get(iova >> PAGE_SHIFT)
        if sh is None:
            return None
        return (sh.pool_pfn << PAGE_SHIFT) + off

    def read(self, iova: int, length: int) -> bytes:
        at = self._within_page(iova, length)
        if at is not None:
            return self.pool.mmap[at : at + length]
        return b"".join(self.pool.read(p, off, n) for p, off, _, n in self._spans(iova, length))

    def write(self, iova: int, data: bytes | memoryview) -> None:
        at = self._within_page(iova, len(data))
        if at is not None:
            self.pool.mmap[at : at + len(data)] = data
            return
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
