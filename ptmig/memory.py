"""Guest RAM: one memfd, mapped MAP_SHARED, registered with KVM as dirty-logged memslots.

RAM may be split in regions (`layout.ram_regions`: below the MMIO windows, and from 4 GiB up).
The memfd and the mapping span GPA 0 up to the end of the last region, so a GPA is its offset
in the memfd for every process that maps it; the gap between regions is a hole of the memfd
that is never allocated, never registered with KVM, and refused by every access check.

`GuestMemory` owns the mapping and the VMM's own dirty bitmap. There is exactly one way for
the VMM to write guest RAM — `write` (and the typed helpers built on it) — and it marks the pages
it touches in that bitmap, because KVM's dirty log only sees vCPU writes. Device processes map
the same memfd (`fd`); their writes are invisible to both logs, which is the problem ptmig
solves. Every access is bounds-checked by GPA.

The VMM bitmap is marked without numpy (plain words in a bytearray, in `bitmap`'s layout):
numpy loads with the first method that hands out an array (a harvest, a zero-page scan, a
merge), i.e. once a migration or dirty tracking begins; a VM that only runs never loads it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import PtmigError
from .layout import PAGE_SHIFT, PAGE_SIZE, RamRegion, ram_regions
from .memstats import libc

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from .bitmap import Bitmap

_ALL_BITS = (1 << 64) - 1


class GuestMemoryError(PtmigError, ValueError):
    """An access outside guest RAM."""


def host_available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """The host's MemAvailable in bytes (None where the kernel does not report it)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(ram: int, available: int | None = None) -> None:
    """Refuse guest RAM larger than what the host can give now (MemAvailable): such a guest
    would be killed, or would push the host into swap, once it touched its memory."""
    if available is None:
        available = host_available_memory()
    if available is not None and ram > available:
        raise GuestMemoryError(
            f"guest memory of {ram >> 20} MiB is more than the host has available "
            f"({available >> 20} MiB MemAvailable)"
        )


class GuestMemory:
    """`ram` bytes of guest RAM laid out in `regions`, backed by a shareable memfd.

    `size` and `npages` describe the whole span from GPA 0 to the end of RAM (the holes
    between regions included): the extent of the mapping, of page bitmaps and digest arrays."""

    def __init__(self, ram: int, *, name: str = "ptmig-guest-ram", fd: int | None = None) -> None:
        if ram <= 0 or ram % PAGE_SIZE:
            raise GuestMemoryError(f"guest memory size {ram:#x} is not a positive page multiple")
        self.ram = ram
        self.regions: tuple[RamRegion, ...] = ram_regions(ram)
        self._low_end = self.regions[0].end
        size = self.regions[-1].end
        self.size = size
        self.npages = size >> PAGE_SHIFT
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self.mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mmap)
        # Post-copy on a destination: makes sure the pages of an access are here (fetching
        # them with the GIL released) or raises GuestMemoryError; see `migration.postcopy`.
        self.presence: Callable[[int, int], None] | None = None
        self._vmm_dirty = DirtyWords(self.npages)
        self._dirty_lock = threading.Lock()

    @functools.cached_property
    def array(self) -> npt.NDArray[np.uint8]:
        """Guest RAM as a numpy array (a view, no copy)."""
        import numpy as np

        return np.frombuffer(self.mmap, dtype=np.uint8)

    # --- address arithmetic -------------------------------------------------------------

    def check(self, gpa: int, length: int) -> None:
        if self.presence is not None:
            self.presence(gpa, length)
        self._check_bounds(gpa, length)

    def _check_bounds(self, gpa: int, length: int) -> None:
        if 0 <= gpa and 0 <= length and gpa + length <= self._low_end:
            return  # the common case: RAM below the MMIO windows
        if (
            length < 0
            or gpa < 0
            or not any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)
        ):
            raise GuestMemoryError(
                f"guest access [{gpa:#x}, +{length:#x}) is outside guest RAM "
                f"{self.describe_regions()}"
            )

    def describe_regions(self) -> str:
        return " ".join(f"[{r.gpa:#x}, {r.end:#x})" for r in self.regions)

    def is_ram(self, first_page: int, npages: int) -> bool:
        """Whether pages [first_page, +npages) all lie in one RAM region."""
        return npages >= 0 and any(
            r.first_page <= first_page and first_page + npages <= r.first_page + r.npages
            for r in self.regions
        )

    def page_ranges(self) -> list[tuple[int, int]]:
        """(first_page, npages) of each RAM region."""
        return [(r.first_page, r.npages) for r in self.regions]

    def holes(self) -> list[tuple[int, int]]:
        """(first_page, npages) of each gap between RAM regions (below the span's end)."""
        out = []
        for a, b in zip(self.regions, self.regions[1:], strict=False):
            if b.first_page > a.first_page + a.npages:
                out.append((a.first_page + a.npages, b.first_page - a.first_page - a.npages))
        return out

    def ram_bitmap(self) -> Bitmap:
        """A page bitmap of the span with every RAM page set (the holes clear)."""
        from . import bitmap

        out = bitmap.empty(self.npages)
        for r in self.regions:
            bitmap.set_range(out, r.first_page, r.npages)
        return out

    @property
    def host_address(self) -> int:
        """The userspace address of the mapping (for KVM_SET_USER_MEMORY_REGION)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mmap))

    # --- reads --------------------------------------------------------------------------

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        if length == 2 and not gpa & 1:
            # a ring index the guest may be changing: one 16-bit load (a 2-byte memcpy() may
            # take its bytes at different moments; see native/virtq.c's rd16)
            return int(self.view[gpa : gpa + 2].cast("H")[0]).to_bytes(2, "little")
        return self.mmap[gpa : gpa + length]

    def slice(self, gpa: int, length: int) -> memoryview:
        """A read-only view (no copy) of guest RAM; use `write` to modify."""
        self.check(gpa, length)
        return self.view[gpa : gpa + length].toreadonly()

    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    # --- the VMM's one write path --------------------------------------------------------

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write into guest RAM and mark the touched pages in the VMM dirty bitmap."""
        length = len(data)
        self.check(gpa, length)
        if length == 0:
            return
        self.mmap[gpa : gpa + length] = data
        self.mark_dirty(gpa, length)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))

    def mark_dirty(self, gpa: int, length: int) -> None:
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        with self._dirty_lock:
            self._vmm_dirty.set_range(first, last - first + 1)

    @property
    def vmm_dirty_bytes(self) -> int:
        """Size of the VMM's dirty bitmap (for the memory report)."""
        return len(self._vmm_dirty.buf)

    def merge_vmm_dirty(self, other: Bitmap) -> None:
        """Add another writer's dirty pages to the VMM bitmap."""
        with self._dirty_lock:
            self._vmm_dirty.merge(other)

    def take_vmm_dirty(self) -> Bitmap:
        """The VMM's dirty bitmap since the last call, and clear it."""
        with self._dirty_lock:
            return self._vmm_dirty.take()

    def take_vmm_dirty_into(self, out: Bitmap) -> None:
        """Add the VMM's dirty pages since the last take to `out`, and clear them."""
        with self._dirty_lock:
            self._vmm_dirty.take_into(out)

    # --- holes: pages the memfd never allocated read as zero ---------------------------------

    def allocated(self) -> npt.NDArray[np.bool_]:
        """One bool per page: False where the memfd has a hole (never written, or punched).

        Found with lseek(SEEK_DATA/SEEK_HOLE), so an untouched page is never read (reading a
        shmem hole through a shared mapping would allocate it)."""
        import numpy as np

        out = np.zeros(self.npages, dtype=bool)
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            out[data >> PAGE_SHIFT : (hole + PAGE_SIZE - 1) >> PAGE_SHIFT] = True
            pos = hole
        return out

    def has_data(self, first_page: int, npages: int) -> bool:
        """Whether any of the pages is allocated in the memfd (one lseek(SEEK_DATA); a page
        is never read). For a range checked at a time: `allocated` maps all of RAM."""
        self.check(first_page << PAGE_SHIFT, npages << PAGE_SHIFT)
        try:
            data = os.lseek(self.fd, first_page << PAGE_SHIFT, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return False  # only holes from here to the end
            raise
        return data < (first_page + npages) << PAGE_SHIFT

    def punch_zero(self, first_page: int, npages: int) -> None:
        """Make pages read as zero by returning them to the memfd (no write, no allocation).

        Only for a guest that is not running (the destination of a migration). It reads
        nothing, so post-copy's `presence` is not asked (the pages are being made missing)."""
        self._check_bounds(first_page << PAGE_SHIFT, npages << PAGE_SHIFT)
        if (
            libc().fallocate(
                self.fd,
                _FALLOC_PUNCH,
                ctypes.c_long(first_page << PAGE_SHIFT),
                ctypes.c_long(npages << PAGE_SHIFT),
            )
            != 0
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate(PUNCH_HOLE) on guest RAM: {os.strerror(err)}")

    # --- prefaulting: a migration destination pays for page allocation before it starts ----

    def prefault(self) -> bool:
        """Allocate every page of the memfd and map it writable in this process, now.

        The first write to a page of fresh shared memory costs a page allocation and a page
        fault (several µs each on nested KVM hosts, more than copying the 4 KiB): a destination
        that receives into fresh RAM pays that 262144 times per GiB while the migration runs.
        `posix_fallocate` allocates the pages in bulk, then `MADV_POPULATE_WRITE` (Linux 5.14+)
        fills this mapping's page tables, so writes through `view` are plain copies. Like
        QEMU's `-mem-prealloc`, it makes the whole guest resident at once.

        Returns True when the mapping is populated; False when only the allocation was possible
        (older kernel: receiving then faults each page in, as without prefaulting)."""
        for r in self.regions:  # never the holes between regions
            os.posix_fallocate(self.fd, r.gpa, r.size)
        try:
            for r in self.regions:
                self.mmap.madvise(_MADV_POPULATE_WRITE, r.gpa, r.size)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS):
                return False
            raise
        return True

    def close(self) -> None:
        self.__dict__.pop("array", None)  # its export of the mapping would keep it open
        self.view.release()
        self.mmap.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+


class DirtyWords:
    """A page bitmap in `bitmap`'s layout (bit p % 64 of little-endian 64-bit word p // 64)
    kept in a bytearray and marked with plain integer operations, so marking needs no numpy;
    `take` and `merge` exchange numpy bitmaps (and load numpy: a harvest has begun)."""

    def __init__(self, npages: int) -> None:
        self.buf = bytearray((npages + 63) // 64 * 8)
        self.words = memoryview(self.buf).cast("Q")

    def set_range(self, first: int, count: int) -> None:
        """Set bits [first, first+count)."""
        if count <= 0:
            return
        end = first + count
        lo, hi = first >> 6, (end - 1) >> 6
        head = (_ALL_BITS << (first & 63)) & _ALL_BITS
        tail = _ALL_BITS >> (63 - ((end - 1) & 63))
        if lo == hi:
            self.words[lo] |= head & tail
            return
        self.words[lo] |= head
        self.buf[(lo + 1) * 8 : hi * 8] = b"\xff" * ((hi - lo - 1) * 8)
        self.words[hi] |= tail

    def take(self) -> Bitmap:
        """The bits as a numpy bitmap, and clear them."""
        import numpy as np

        words = np.frombuffer(self.buf, dtype=np.uint64)
        out = words.copy()
        words.fill(0)
        return out

    def take_into(self, out: Bitmap) -> None:
        """Set the bits in `out` (a numpy bitmap of as many words), and clear them here: in
        place, no array allocated (a copy of 8 GiB's bitmap is a fresh mmap to fault in)."""
        import numpy as np

        words = np.frombuffer(self.buf, dtype=np.uint64)
        np.bitwise_or(out, words, out=out)
        words.fill(0)

    def merge(self, other: Bitmap) -> None:
        """Set the bits `other` (a numpy bitmap of as many words) has set."""
        import numpy as np

        words = np.frombuffer(self.buf, dtype=np.uint64)
        np.bitwise_or(words, other, out=words)
