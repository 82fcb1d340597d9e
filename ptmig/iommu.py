"""The IOMMU: the table the VMM owns and the translated DMA view a device process uses.

Owns the IOVA -> backing-page table that sits in shared memory between the VMM and each device
process, the rules a DMA must satisfy to touch memory, the device's IOTLB, and the optional
device-side DMA write log (the "device/IOMMU dirty tracking" hardware feature that ptmig's
`device-log` strategy models).

Shared-memory layout (a memfd, so a device process maps the very same table by fd)::

    offset 0     header, 4 KiB:  magic u64 | version u32 | reserved u32 | iova_pages u64
                                 | generation u64
    offset 4096  entries: u64[iova_pages], entry i translates IOVA page i (4 KiB pages)

Entry encoding (u64, little-endian), shaped like a page-table entry::

    bit 0       VALID   the entry translates; an invalid entry faults every access
    bit 1       READ    the device may read the page (DMA to the device)
    bit 2       WRITE   the device may write the page (DMA from the device)
    bit 3       TARGET  0 = guest RAM, 1 = the shadow-page pool
    bits 4-11   reserved, zero
    bits 12-63  target page frame number (byte offset of the page in its target >> 12)

Rules, as on real hardware:

* The owner (the VMM) changes entries with `IommuTable.map` / `unmap`; each change bumps the
  generation counter in the header.
* The device caches translations in its IOTLB (`DmaView`). After changing or removing a valid
  entry the owner MUST ask the device to invalidate (the control channel's invalidate command
  calls `DmaView.invalidate_iotlb`) and wait for the ack; until then the device may keep using
  the stale translation. Invalid entries are never cached, so a newly mapped page is visible at
  once.
* A DMA that touches an unmapped page, lacks the permission, runs past the IOVA limit or
  lands outside its target memory raises `DmaFault` before a single byte is read or written.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .errors import PtmigError

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

ENTRY_VALID: Final = 1 << 0
ENTRY_READ: Final = 1 << 1
ENTRY_WRITE: Final = 1 << 2
ENTRY_TARGET_POOL: Final = 1 << 3
ENTRY_FLAGS_MASK: Final = (1 << PAGE_SHIFT) - 1
MAX_TARGET_PFN: Final = (1 << (64 - PAGE_SHIFT)) - 1

TARGET_RAM: Final = 0
TARGET_POOL: Final = 1
TARGET_NAMES: Final = {TARGET_RAM: "guest RAM", TARGET_POOL: "shadow pool"}

TABLE_MAGIC: Final = int.from_bytes(b"PTMIOMMU", "little")
TABLE_VERSION: Final = 1
HEADER_SIZE: Final = PAGE_SIZE
_HEADER_FORMAT: Final = "<QIIQQ"
_HDR_GENERATION_INDEX: Final = 3  # u64 index of the generation in the header
MAX_IOVA_PAGES: Final = 1 << 28  # 1 TiB of IOVA space: a 2 GiB table, far beyond any test

DEFAULT_IOTLB_ENTRIES: Final = 1024


class IommuError(PtmigError, ValueError):
    """The owner asked for an impossible table operation (out of range, bad target...)."""


class DmaFault(PtmigError):
    """A device DMA the IOMMU refused. No byte of the access was read or written."""

    def __init__(self, device: str, iova: int, length: int, write: bool, reason: str) -> None:
        self.device = device
        self.iova = iova
        self.length = length
        self.write = write
        self.reason = reason
        kind = "write" if write else "read"
        super().__init__(f"DMA fault: {device} {kind} iova={iova:#x} len={length}: {reason}")


@dataclass(frozen=True)
class Mapping:
    """One decoded table entry: IOVA page `iova_pfn` -> page `target_pfn` of `target`."""

    iova_pfn: int
    target: int
    target_pfn: int
    read: bool
    write: bool


def encode_entry(target: int, target_pfn: int, read: bool, write: bool) -> int:
    """The u64 table entry for a valid mapping (see the module docstring for the bits)."""
    if target not in TARGET_NAMES:
        raise IommuError(
            f"IOMMU target must be {TARGET_RAM} (RAM) or {TARGET_POOL} (pool), got {target}"
        )
    if not 0 <= target_pfn <= MAX_TARGET_PFN:
        raise IommuError(f"target page frame {target_pfn:#x} is outside 0..{MAX_TARGET_PFN:#x}")
    entry = ENTRY_VALID | (target_pfn << PAGE_SHIFT)
    if read:
        entry |= ENTRY_READ
    if write:
        entry |= ENTRY_WRITE
    if target == TARGET_POOL:
        entry |= ENTRY_TARGET_POOL
    return entry


def decode_entry(iova_pfn: int, entry: int) -> Mapping | None:
    """The mapping an entry describes, or None for an invalid entry."""
    if not entry & ENTRY_VALID:
        return None
    return Mapping(
        iova_pfn=iova_pfn,
        target=TARGET_POOL if entry & ENTRY_TARGET_POOL else TARGET_RAM,
        target_pfn=entry >> PAGE_SHIFT,
        read=bool(entry & ENTRY_READ),
        write=bool(entry & ENTRY_WRITE),
    )


class IommuTable:
    """The IOMMU table in a memfd. `create` on the VMM side, `attach` in a device process."""

    def __init__(self, fd: int, mm: mmap.mmap, iova_pages: int, owner: bool) -> None:
        self._fd = fd
        self._mm = mm
        self.iova_pages = iova_pages
        self.owner = owner
        self._header: npt.NDArray[np.uint64] = np.frombuffer(
            mm, dtype="<u8", count=HEADER_SIZE // 8
        )
        self._entries: npt.NDArray[np.uint64] = np.frombuffer(
            mm, dtype="<u8", count=iova_pages, offset=HEADER_SIZE
        )

    @property
    def nbytes(self) -> int:
        """Size of the table's memfd: the header and one entry per IOVA page."""
        return HEADER_SIZE + 8 * self.iova_pages

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, iova_pages: int) -> IommuTable:
        """A new, empty table (every entry invalid) covering IOVA [0, iova_pages * 4 KiB)."""
        _check_iova_pages(iova_pages)
        fd = os.memfd_create("ptmig-iommu", os.MFD_CLOEXEC)
        try:
            size = HEADER_SIZE + iova_pages * 8
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        mm[: struct.calcsize(_HEADER_FORMAT)] = struct.pack(
            _HEADER_FORMAT, TABLE_MAGIC, TABLE_VERSION, 0, iova_pages, 0
        )
        return cls(fd, mm, iova_pages, owner=True)

    @classmethod
    def attach(cls, fd: int, iova_pages: int, readonly: bool = True) -> IommuTable:
        """Map an existing table by fd (the device side). The fd stays owned by the caller."""
        _check_iova_pages(iova_pages)
        size = HEADER_SIZE + iova_pages * 8
        actual = os.fstat(fd).st_size
        if actual != size:
            raise IommuError(
                f"IOMMU table fd {fd} is {actual} bytes, expected {size} "
                f"for {iova_pages} IOVA pages"
            )
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        magic, version, _, pages, _ = struct.unpack_from(_HEADER_FORMAT, mm, 0)
        if magic != TABLE_MAGIC or version != TABLE_VERSION or pages != iova_pages:
            mm.close()
            raise IommuError(
                f"fd {fd} is not a version-{TABLE_VERSION} IOMMU table of "
                f"{iova_pages} pages (magic={magic:#x} version={version} "
                f"pages={pages})"
            )
        return cls(fd, mm, iova_pages, owner=False)

    def close(self) -> None:
        """Unmap the table; the owner also closes the memfd."""
        del self._header, self._entries
        self._mm.close()
        if self.owner:
            os.close(self._fd)

    # -- properties --------------------------------------------------------------------------
    @property
    def fd(self) -> int:
        """The memfd holding the table: pass it to the device process."""
        return self._fd

    @property
    def iova_limit(self) -> int:
        """First IOVA past the table's reach, in bytes."""
        return self.iova_pages << PAGE_SHIFT

    @property
    def generation(self) -> int:
        """Bumped by the owner on every change to the entries."""
        return int(self._header[_HDR_GENERATION_INDEX])

    @property
    def entries(self) -> npt.NDArray[np.uint64]:
        """The raw entries (read-only view; change them with map/unmap)."""
        view = self._entries.view()
        view.flags.writeable = False
        return view

    def raw_entry(self, iova_pfn: int) -> int:
        """The raw u64 entry of one IOVA page (0 if out of range: nothing maps there)."""
        if not 0 <= iova_pfn < self.iova_pages:
            return 0
        return int(self._entries[iova_pfn])

    # -- owner operations --------------------------------------------------------------------
    def map(
        self,
        iova_pfn: int,
        count: int,
        target: int,
        target_pfn: int,
        read: bool = True,
        write: bool = True,
    ) -> None:
        """Map IOVA pages [iova_pfn, +count) to target pages [target_pfn, +count).

        Overwrites whatever was there: a remap. The caller must then invalidate the device's
        IOTLB (through its control channel) before relying on the new translation.
        """
        self._check_range(iova_pfn, count)
        if count == 0:
            return
        if target_pfn < 0 or target_pfn + count - 1 > MAX_TARGET_PFN:
            raise IommuError(
                f"target pages {target_pfn:#x}+{count} are outside 0..{MAX_TARGET_PFN:#x}"
            )
        flags = encode_entry(target, 0, read, write)
        pfns = np.arange(target_pfn, target_pfn + count, dtype=np.uint64)
        self._writable()[iova_pfn : iova_pfn + count] = (pfns << np.uint64(PAGE_SHIFT)) | flags
        self._bump()

    def map_pages(
        self,
        iova_pfns: npt.NDArray[np.int64],
        target: int,
        target_pfns: npt.NDArray[np.int64],
        read: bool = True,
        write: bool = True,
    ) -> None:
        """Map each IOVA page `iova_pfns[i]` to target page `target_pfns[i]` (scattered pages
        in one write; the same entries as one `map(iova, 1, target, pfn)` per page)."""
        iova = np.asarray(iova_pfns, dtype=np.int64)
        pfns = np.asarray(target_pfns, dtype=np.int64)
        if iova.shape != pfns.shape or iova.ndim != 1:
            raise IommuError(f"{iova.size} IOVA pages for {pfns.size} target pages")
        if iova.size == 0:
            return
        if int(iova.min()) < 0 or int(iova.max()) >= self.iova_pages:
            raise IommuError(f"IOVA pages outside the table's {self.iova_pages:#x} pages")
        if int(pfns.min()) < 0 or int(pfns.max()) > MAX_TARGET_PFN:
            raise IommuError(f"target pages outside 0..{MAX_TARGET_PFN:#x}")
        flags = encode_entry(target, 0, read, write)
        self._writable()[iova] = (pfns.astype(np.uint64) << np.uint64(PAGE_SHIFT)) | np.uint64(
            flags
        )
        self._bump()

    def map_identity(self, guest_pages: int, writable: bool = True) -> None:
        """Map IOVA == GPA for guest pages [0, guest_pages), readable, writable if asked."""
        self.map(0, guest_pages, TARGET_RAM, 0, read=True, write=writable)

    def map_identity_ranges(self, ranges: Iterable[tuple[int, int]], writable: bool = True) -> None:
        """Map IOVA == GPA for each (first_page, npages) range of guest RAM (the RAM regions:
        the gaps between them stay unmapped, so a DMA there faults)."""
        for first, count in ranges:
            self.map(first, count, TARGET_RAM, first, read=True, write=writable)

    def unmap(self, iova_pfn: int, count: int = 1) -> None:
        """Invalidate IOVA pages [iova_pfn, +count); the device's IOTLB must then be flushed."""
        self._check_range(iova_pfn, count)
        if count == 0:
            return
        self._writable()[iova_pfn : iova_pfn + count] = 0
        self._bump()

    def lookup(self, iova_pfn: int) -> Mapping | None:
        """The current mapping of one IOVA page (None if unmapped or past the limit)."""
        return decode_entry(iova_pfn, self.raw_entry(iova_pfn))

    def writable_guest_pfns(self) -> npt.NDArray[np.uint64]:
        """Guest RAM page frames some valid entry lets the device write (sorted, unique).

        This is what the `all-dirty` strategy must treat as perpetually dirty.
        """
        e = self._entries
        want = ENTRY_VALID | ENTRY_WRITE
        sel = (e & np.uint64(want | ENTRY_TARGET_POOL)) == np.uint64(want)
        return np.unique(e[sel] >> np.uint64(PAGE_SHIFT))

    def mark_writable_guest(self, flags: npt.NDArray[np.bool_]) -> None:
        """Set `flags[pfn]` (one bool per guest page) for every guest RAM page frame some valid
        entry lets the device write; frames past the end of `flags` are left out.

        The `all-dirty` strategy's per-round question. Unlike `writable_guest_pfns` it neither
        sorts nor de-duplicates: a page mapped twice is set twice, which costs nothing, while
        sorting the whole table every round cost ~100 ms per GiB of IOVA space."""
        e = self._entries
        want = ENTRY_VALID | ENTRY_WRITE
        sel = (e & np.uint64(want | ENTRY_TARGET_POOL)) == np.uint64(want)
        pfns = e[sel] >> np.uint64(PAGE_SHIFT)
        flags[pfns[pfns < np.uint64(flags.size)]] = True

    # -- helpers -----------------------------------------------------------------------------
    def _check_range(self, iova_pfn: int, count: int) -> None:
        if count < 0 or iova_pfn < 0 or iova_pfn + count > self.iova_pages:
            raise IommuError(
                f"IOVA pages {iova_pfn:#x}+{count} are outside the table's "
                f"{self.iova_pages:#x} pages"
            )

    def _writable(self) -> npt.NDArray[np.uint64]:
        if not self.owner or not self._entries.flags.writeable:
            raise IommuError("only the owner of the IOMMU table (the VMM) may change it")
        return self._entries

    def _bump(self) -> None:
        self._header[_HDR_GENERATION_INDEX] += np.uint64(1)


def _check_iova_pages(iova_pages: int) -> None:
    if not 0 < iova_pages <= MAX_IOVA_PAGES:
        raise IommuError(f"iova_pages must be in 1..{MAX_IOVA_PAGES}, got {iova_pages}")


def _byte_view(buf: Any, what: str) -> memoryview:
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    if not mv.contiguous:
        raise ValueError(f"{what} must be a contiguous buffer")
    return mv


# A planned piece of an access: (target, start byte, end byte) in the target's memory.
_Piece = tuple[int, int, int]


class DmaView:
    """What a device sees of memory: every access translated page by page through the IOMMU.

    `guest_mem` is the device's mapping of guest RAM (mmap, memoryview or bytearray),
    `pool` the optional mapping of the shadow-page pool, `write_log` an optional bitmap over
    guest pages (any contiguous numpy unsigned array; bit p%8 of byte p//8 is page p, which is
    also KVM's dirty-log layout on little-endian hosts): while set, every guest-RAM page a DMA
    writes gets its bit set (pool pages are not guest pages and are not logged).

    Satisfies the virtqueue parser's `RingMemory` protocol (`read`, `write`).
    """

    def __init__(
        self,
        table: IommuTable,
        guest_mem: Any,
        pool: Any = None,
        write_log: npt.NDArray[Any] | None = None,
        name: str = "device",
        iotlb_entries: int = DEFAULT_IOTLB_ENTRIES,
    ) -> None:
        self.table = table
        self.name = name
        self._targets: dict[int, memoryview] = {TARGET_RAM: _byte_view(guest_mem, "guest RAM")}
        if pool is not None:
            self._targets[TARGET_POOL] = _byte_view(pool, "shadow pool")
        self._iotlb: dict[int, int] = {}
        self._iotlb_capacity = max(1, iotlb_entries)
        self._log: npt.NDArray[np.uint8] | None = None
        self.write_log = write_log
        self.fault_count = 0
        self.last_fault: DmaFault | None = None
        self.iotlb_hits = 0
        self.iotlb_misses = 0
        self.invalidations = 0

    # -- configuration -----------------------------------------------------------------------
    @property
    def guest_size(self) -> int:
        """Bytes of guest RAM this device can reach (through the IOMMU)."""
        return len(self._targets.get(TARGET_RAM, b""))

    @property
    def write_log(self) -> npt.NDArray[np.uint8] | None:
        """The DMA write-log bitmap (as bytes), or None while logging is off."""
        return self._log

    @write_log.setter
    def write_log(self, bitmap: npt.NDArray[Any] | None) -> None:
        if bitmap is None:
            self._log = None
            return
        if not bitmap.flags.c_contiguous or bitmap.dtype.kind != "u":
            raise ValueError(
                f"write log must be a contiguous unsigned numpy array, got dtype={bitmap.dtype}"
            )
        log = bitmap.reshape(-1).view(np.uint8)
        pages = -(-self.guest_size // PAGE_SIZE)
        if log.size * 8 < pages:
            raise ValueError(f"write log has {log.size * 8} bits but guest RAM has {pages} pages")
        self._log = log

    # -- IOTLB -------------------------------------------------------------------------------
    def invalidate_iotlb(self, iova_pfn: int | None = None, count: int = 1) -> int:
        """Drop cached translations (all, or pages [iova_pfn, +count)).

        Returns the table generation seen after the flush: the ack the owner waits for.
        """
        if iova_pfn is None:
            self._iotlb.clear()
        else:
            for pfn in range(iova_pfn, iova_pfn + max(0, count)):
                self._iotlb.pop(pfn, None)
        self.invalidations += 1
        return self.table.generation

    def _entry(self, iova_pfn: int) -> int:
        entry = self._iotlb.get(iova_pfn)
        if entry is not None:
            self.iotlb_hits += 1
            return entry
        self.iotlb_misses += 1
        entry = self.table.raw_entry(iova_pfn)
        if entry & ENTRY_VALID:  # faults are never cached: a new mapping is seen at once
            if len(self._iotlb) >= self._iotlb_capacity:
                self._iotlb.clear()
            self._iotlb[iova_pfn] = entry
        return entry

    # -- translation -------------------------------------------------------------------------
    def _fault(self, iova: int, length: int, write: bool, reason: str) -> DmaFault:
        fault = DmaFault(self.name, iova, length, write, reason)
        self.fault_count += 1
        self.last_fault = fault
        return fault

    def _plan(self, iova: int, length: int, write: bool) -> list[_Piece]:
        """Translate and check every page of the access; merge contiguous target runs."""
        if iova < 0 or length < 0:
            raise self._fault(iova, length, write, "negative address or length")
        if length == 0:  # touches no page, wherever it points (as native/virtq.c's vq_dma)
            return []
        limit = self.table.iova_limit
        if iova + length > limit:
            raise self._fault(iova, length, write, f"access runs past the IOVA limit {limit:#x}")
        need = ENTRY_WRITE if write else ENTRY_READ
        pieces: list[_Piece] = []
        pos, end = iova, iova + length
        while pos < end:
            pfn = pos >> PAGE_SHIFT
            n = min(PAGE_SIZE - (pos & ENTRY_FLAGS_MASK), end - pos)
            entry = self._entry(pfn)
            if not entry & ENTRY_VALID:
                raise self._fault(iova, length, write, f"IOVA page {pfn:#x} is not mapped")
            if not entry & need:
                perm = "writable" if write else "readable"
                raise self._fault(iova, length, write, f"IOVA page {pfn:#x} is not {perm}")
            target = TARGET_POOL if entry & ENTRY_TARGET_POOL else TARGET_RAM
            mem = self._targets.get(target)
            start = ((entry >> PAGE_SHIFT) << PAGE_SHIFT) | (pos & ENTRY_FLAGS_MASK)
            if mem is None or start + n > len(mem):
                size = 0 if mem is None else len(mem)
                raise self._fault(
                    iova,
                    length,
                    write,
                    f"IOVA page {pfn:#x} maps to byte {start:#x} of the "
                    f"{TARGET_NAMES[target]}, which has {size:#x} bytes",
                )
            if pieces and pieces[-1][0] == target and pieces[-1][2] == start:
                pieces[-1] = (target, pieces[-1][1], start + n)
            else:
                pieces.append((target, start, start + n))
            pos += n
        return pieces

    def _log_pieces(self, pieces: list[_Piece]) -> None:
        log = self._log
        if log is None:
            return
        for target, start, end in pieces:
            if target != TARGET_RAM or end <= start:
                continue
            first, last = start >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
            for page in range(first, last + 1):
                log[page >> 3] |= np.uint8(1 << (page & 7))

    # -- accesses ----------------------------------------------------------------------------
    def read(self, iova: int, length: int) -> bytes:
        """Read `length` bytes at `iova` (device reads guest memory)."""
        pieces = self._plan(iova, length, write=False)
        if len(pieces) == 1:
            target, start, end = pieces[0]
            if length == 2 and not start & 1:  # a ring index: one 16-bit load, never torn
                return int(self._targets[target][start:end].cast("H")[0]).to_bytes(2, "little")
            return bytes(self._targets[target][start:end])
        return b"".join(bytes(self._targets[t][s:e]) for t, s, e in pieces)

    def read_into(self, iova: int, buf: Any) -> None:
        """Fill the writable buffer `buf` from `iova`."""
        out = _byte_view(buf, "destination buffer")
        pieces = self._plan(iova, len(out), write=False)
        pos = 0
        for target, start, end in pieces:
            out[pos : pos + end - start] = self._targets[target][start:end]
            pos += end - start

    def write(self, iova: int, data: Any) -> None:
        """Write `data` at `iova` (device writes guest memory); all-or-nothing."""
        src = _byte_view(data, "source data")
        pieces = self._plan(iova, len(src), write=True)
        pos = 0
        for target, start, end in pieces:
            self._targets[target][start:end] = src[pos : pos + end - start]
            pos += end - start
        self._log_pieces(pieces)

    def segments(self, iova: int, length: int, write: bool) -> list[memoryview]:
        """The access as translated, contiguous memoryviews, for zero-copy I/O (readv/preadv).

        With `write=True` the pages are logged as written at once (the caller is about to
        write them). Release the views when done: they pin the mappings.
        """
        pieces = self._plan(iova, length, write)
        if write:
            self._log_pieces(pieces)
        return [self._targets[t][s:e] for t, s, e in pieces]

    def close(self) -> None:
        """Release the views of guest RAM and pool (so their mmaps can be closed)."""
        for mv in self._targets.values():
            mv.release()
        self._targets.clear()
        self._iotlb.clear()

    def check(self, iova: int, length: int, write: bool) -> None:
        """Raise DmaFault if the access would fault; touch nothing."""
        self._plan(iova, length, write)


__all__ = [
    "DmaFault",
    "DmaView",
    "IommuError",
    "IommuTable",
    "Mapping",
    "PAGE_SIZE",
    "TARGET_POOL",
    "TARGET_RAM",
    "decode_entry",
    "encode_entry",
]
