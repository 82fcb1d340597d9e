"""The shadow page pool: VMM-owned memory that device buffers are made of.

A memfd the VMM maps and every device process maps at spawn (so the IOMMU can later point a
device at pool pages without any new fd passing). Pages are handed out on demand and returned
when no DMA work request references them any more.

Behind those shared pages the pool can hold *views*: one per device whose only address
translation is a memory table (a vhost-user backend), each as many pages as the guest's span,
where guest page g's device buffer is view page g. A memory table that maps a view at GPA 0 is
then the IOMMU remap of the seed: the backend reaches device buffers at the guest's own
addresses and nothing of guest RAM. Views are sparse (the memfd only holds pages that were
written); a view page that stops being a device buffer is given back to the kernel.
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
    def __init__(
        self, pages: int, *, name: str = "ptmig-shadow-pool", views: int = 0, view_pages: int = 0
    ) -> None:
        if pages <= 0:
            raise ValueError(f"shadow pool needs at least one page, got {pages}")
        if views < 0 or view_pages < 0 or (views and not view_pages):
            raise ValueError(f"shadow pool views: {views} of {view_pages} pages")
        self.shared_pages = pages
        self.views, self.view_pages = views, view_pages
        self.pages = pages + views * view_pages  # every page number a device buffer may have
        self.size = self.pages * PAGE_SIZE
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mmap = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._free = list(range(pages - 1, -1, -1))
        self._lock = threading.Lock()
        self.high_water = 0

    @property
    def in_use(self) -> int:
        """Shared pages handed out (view pages are not counted: they are taken by place)."""
        return self.shared_pages - len(self._free)

    @property
    def address(self) -> int:
        """The VMM's user address of pool page 0."""
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.mmap))

    def view_base(self, view: int) -> int:
        """The pool page number of page 0 of view `view`."""
        if not 0 <= view < self.views:
            raise ValueError(f"shadow pool view {view} out of range [0, {self.views})")
        return self.shared_pages + view * self.view_pages

    @property
    def free_pages(self) -> int:
        """Shared pages `alloc` can still hand out."""
        return len(self._free)

    def alloc(self) -> int:
        """A free pool page number."""
        with self._lock:
            if not self._free:
                raise PoolExhausted(f"shadow pool exhausted ({self.pages} pages in use)")
            pfn = self._free.pop()
            self.high_water = max(self.high_water, self.shared_pages - len(self._free))
            return pfn

    def free(self, pfn: int) -> None:
        if not 0 <= pfn < self.pages:
            raise ValueError(f"pool page {pfn} out of range [0, {self.pages})")
        if pfn >= self.shared_pages:  # a view page: its place is its identity, only drop it
            self.mmap.madvise(mmap.MADV_REMOVE, pfn * PAGE_SIZE, PAGE_SIZE)
            return
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
