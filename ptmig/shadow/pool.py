"""The shadow page pool: VMM-owned memory that device buffers are made of.

A memfd the VMM maps and every device process maps at spawn (so the IOMMU can later point a
device at pool pages without any new fd passing). Pages are handed out on demand and returned
when no DMA work request references them any more.
"""

from __future__ import annotations

import mmap
import os
import threading

from ..errors import PtmigError
from ..layout import PAGE_SIZE


class PoolExhausted(PtmigError, RuntimeError):
    pass


class ShadowPool:
    def __init__(self, pages: int, *, name: str = "ptmig-shadow-pool") -> None:
        if pages <= 0:
            raise ValueError(f"shadow pool needs at least one page, got {pages}")
        self.pages = pages
        self.size = pages * PAGE_SIZE
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mmap = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._free = list(range(pages - 1, -1, -1))
        self._lock = threading.Lock()
        self.high_water = 0

    @property
    def in_use(self) -> int:
        return self.pages - len(self._free)

    def alloc(self) -> int:
        """A free pool page number."""
        with self._lock:
            if not self._free:
                raise PoolExhausted(f"shadow pool exhausted ({self.pages} pages in use)")
            pfn = self._free.pop()
            self.high_water = max(self.high_water, self.pages - len(self._free))
            return pfn

    def free(self, pfn: int) -> None:
        if not 0 <= pfn < self.pages:
            raise ValueError(f"pool page {pfn} out of range [0, {self.pages})")
        with self._lock:
            self._free.append(pfn)

    def page(self, pfn: int) -> memoryview:
        off = pfn * PAGE_SIZE
        return memoryview(self.mmap)[off : off + PAGE_SIZE]

    def read(self, pfn: int, offset: int, length: int) -> bytes:
        base = pfn * PAGE_SIZE + offset
        return self.mmap[base : base + length]

    def write(self, pfn: int, offset: int, data: bytes | memoryview) -> None:
        base = pfn * PAGE_SIZE + offset
        self.mmap[base : base + len(data)] = data

    def close(self) -> None:
        try:
            self.mmap.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
