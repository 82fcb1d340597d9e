"""Device buffers: which guest page is shadowed by which pool page, and the IOMMU remaps.

While shadowing, the device's IOMMU domain maps *only* device buffers: every other IOVA is
unmapped, so a DMA outside a forwarded request faults instead of reaching guest RAM unseen. A
guest page is shadowed on demand (`acquire`) and released when no DMA work request references it
any more (`release`): its IOVA is unmapped and its pool page waits in quarantine until the next
IOTLB invalidation, so a stale IOTLB entry in the device can never hit a page reused for
something else.
"""

from __future__ import annotations

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


class ShadowMap:
    """GPA page → device-buffer page for one device's IOMMU domain."""

    def __init__(self, pool: ShadowPool, iommu: IommuTable, memory: GuestMemory) -> None:
        self.pool = pool
        self.iommu = iommu
        self.memory = memory
        self.pages: dict[int, _Shadow] = {}
        self.quarantine: list[int] = []
        self.dirty_mappings = False  # the device's IOTLB must be invalidated before use
        self.peak = 0

    def acquire(self, gpfn: int, *, copy: bool) -> int:
        """Reference the device buffer of guest page `gpfn`, creating it if needed."""
        sh = self.pages.get(gpfn)
        if sh is not None:
            sh.refs += 1
            return sh.pool_pfn
        if not 0 <= gpfn < self.memory.npages:
            raise ShadowError(f"guest page {gpfn} is outside guest RAM")
        try:
            pfn = self.pool.alloc()
        except PoolExhausted as e:
            raise ShadowError(str(e)) from None
        if copy:
            self.pool.write(pfn, 0, self.memory.slice(gpfn << PAGE_SHIFT, PAGE_SIZE))
        self.pages[gpfn] = _Shadow(pfn, 1)
        self.iommu.map(gpfn, 1, TARGET_POOL, pfn, read=True, write=True)
        self.dirty_mappings = True
        self.peak = max(self.peak, len(self.pages))
        return pfn

    def release(self, gpfn: int) -> None:
        sh = self.pages[gpfn]
        sh.refs -= 1
        if sh.refs == 0:
            del self.pages[gpfn]
            self.iommu.unmap(gpfn, 1)
            self.quarantine.append(sh.pool_pfn)

    def invalidated(self) -> None:
        """The device acknowledged an IOTLB invalidation: quarantined pages are free again."""
        for pfn in self.quarantine:
            self.pool.free(pfn)
        self.quarantine.clear()
        self.dirty_mappings = False

    def release_all(self) -> None:
        for sh in self.pages.values():
            self.quarantine.append(sh.pool_pfn)
        self.pages.clear()

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
                raise ShadowError(f"IOVA {addr:#x} has no device buffer")
            out.append((sh.pool_pfn, off, done, n))
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
