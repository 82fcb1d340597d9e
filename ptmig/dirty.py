"""The dirty set, one definition: KVM's log (vCPU writes) ∪ the VMM's bitmap (its own writes)
∪ whatever the active device-DMA strategy contributes (see `ptmig.migration.tracking`).

`KvmDirtyLog` harvests KVM's logs of the RAM memslots (one per region). With
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 the harvest is GET_DIRTY_LOG followed by CLEAR_DIRTY_LOG of
exactly the pages reported, so a page written between the two calls is never lost; without it,
GET_DIRTY_LOG clears as it reads.

A migration defers the CLEAR (QEMU's clear bitmap does the same): its harvests only read the
log, and each batch of pages is cleared (write-protected again, its bits reset) just before it
is read for sending (`reprotect`). A page is thus re-armed right before its contents are
taken, never after, so a write that lands later faults and is in the next harvest; a page
written between the harvest and its batch costs no fault at all; and the guest's write faults
are spread over the round at the sending rate instead of all following the harvest (on a host
without PML, where every re-armed page costs a fault, that burst is what the guest's latency
pays).

The bitmaps are numpy arrays (`bitmap`), allocated with the first harvest: numpy loads when
dirty tracking begins (a migration), not with every VM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .kvm import Cap, VmFd
from .kvm.ioctls import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
from .memory import GuestMemory

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from .bitmap import Bitmap


class KvmDirtyLog:
    """KVM's dirty logs of the RAM memslots, harvested into one page bitmap of the GPA span.

    `slots` are (slot, first_page, npages); each region starts on a 64-page boundary (the
    layout's regions start at 0 and 4 GiB and are 2 MiB multiples), so a slot's log is a run
    of whole words of the span bitmap.

    GET_DIRTY_LOG writes each slot's log into its words of one span-sized scratch bitmap,
    allocated with the first harvest and kept: a harvest allocates nothing and faults in no
    page, which at 8 GiB (a 288 KiB bitmap, above the VMM's 256 KiB mmap threshold, see
    `memstats.tune_malloc`) is most of its cost. The MMIO gap's words are never written."""

    def __init__(self, vm: VmFd, slots: list[tuple[int, int, int]], span_pages: int) -> None:
        self.vm = vm
        self.npages = span_pages
        for slot, first, _ in slots:
            if first % 64:
                raise ValueError(
                    f"memslot {slot} starts at page {first:#x}, not on a 64-page boundary"
                )
        self.slots = slots
        self.scratch: Bitmap | None = None  # the span's words, for GET_DIRTY_LOG to fill
        # Pages a harvest reported and left writable (protect=False): still set in KVM's
        # log, to be cleared by `reprotect` before they are read. None: nothing deferred.
        self.unprotected: Bitmap | None = None
        self.manual_protect = False
        if vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self.manual_protect = True
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of the scratch bitmap and, with manual protect, of the deferred pages' one
        (allocated or not yet: the memory report's)."""
        return (self.npages + 63) // 64 * 8 * (2 if self.manual_protect else 1)

    def harvest(self, *, protect: bool = True) -> Bitmap:
        """Pages vCPUs wrote since the last harvest (a fresh array over the span)."""
        from . import bitmap

        out = bitmap.empty(self.npages)
        self.harvest_into(out, protect=protect)
        return out

    def harvest_into(self, out: Bitmap, *, protect: bool = True) -> None:
        """Add the pages vCPUs wrote since the last harvest to `out` (a bitmap of the span).

        protect=False reads the log and leaves the reported pages writable and set in it:
        the caller must `reprotect` each page before it reads the page's contents. (Without
        manual protect GET_DIRTY_LOG has already re-armed them; nothing is deferred.) The
        next harvest reports every page not re-armed by then again."""
        import numpy as np

        from . import bitmap

        with self._lock:
            if self.scratch is None:
                self.scratch = bitmap.empty(self.npages)
            scratch = self.scratch
            for slot, first, npages in self.slots:
                log = scratch[first >> 6 : (first >> 6) + bitmap.words_for(npages)]
                addr = log.ctypes.data
                self.vm.get_dirty_log(slot, addr)
                # (max, not any: numpy's any on integers is several times slower)
                if protect and self.manual_protect and log.max():
                    self.vm.clear_dirty_log(slot, 0, npages, addr)
            # A deferred page not re-armed is still set in KVM's log: the scratch just read
            # holds it again, so it is the whole of what is deferred now.
            if protect or not self.manual_protect:
                self.unprotected = None
            elif self.unprotected is None:
                self.unprotected = scratch.copy()
            else:
                np.copyto(self.unprotected, scratch)
            np.bitwise_or(out, scratch, out=out)

    def reprotect(self, page_numbers: npt.NDArray[np.int64]) -> int:
        """Re-arm dirty tracking of these pages (sorted page numbers of the span) before they
        are read: those a deferred harvest left writable are cleared in KVM's log. Returns
        how many were. Only the pages given, not their 64-page words: a page re-armed long
        before its read costs the guest the faults deferring saves (and one re-armed after its
        read would lose a write landing between the two)."""
        from . import bitmap

        if self.unprotected is None or page_numbers.size == 0:
            return 0
        lo = int(page_numbers[0]) & ~63
        hi = min(self.npages, (int(page_numbers[-1]) + 64) & ~63)
        with self._lock:
            unprotected = self.unprotected
            if unprotected is None:
                return 0
            words = unprotected[lo >> 6 : (lo >> 6) + bitmap.words_for(hi - lo)]
            if not words.max():
                return 0  # (most batches of an idle guest's round 0: no page map to build)
            mask = bitmap.from_pages(page_numbers - lo, hi - lo) & words
            if not mask.max():
                return 0
            words &= ~mask
            for slot, first, npages in self.slots:
                start, end = max(lo, first), min(hi, first + npages)
                if start >= end:
                    continue  # (the MMIO gap has no slot: its pages are never in the log)
                addr = mask.ctypes.data + ((start - lo) >> 3)
                self.vm.clear_dirty_log(slot, start - first, end - start, addr)
            return bitmap.count(mask)


DirtySource = Callable[[], "Bitmap"]
DirtyMarker = Callable[[], None]


class DirtyTracker:
    """KVM log ∪ VMM bitmap ∪ other VMM writers' bitmaps for one guest memory.

    A writer that cannot share the VMM bitmap's lock (the native shadow data plane) keeps a
    bitmap of its own and registers its take-and-clear function as a source while it runs.
    A writer that only counts its writes (the native vCPU loop's halt replies) registers a
    marker: called at every harvest before the VMM bitmap is taken, it marks there what was
    written since its last call."""

    def __init__(self, kvm_log: KvmDirtyLog, memory: GuestMemory) -> None:
        self.kvm_log = kvm_log
        self.memory = memory
        self._sources: list[DirtySource] = []
        self._markers: list[DirtyMarker] = []
        self._lock = threading.Lock()

    def add_marker(self, mark: DirtyMarker) -> None:
        with self._lock:
            self._markers.append(mark)

    def add_source(self, take: DirtySource) -> None:
        with self._lock:
            self._sources.append(take)

    def remove_source(self, take: DirtySource) -> None:
        """Stop asking `take`; what it still holds moves to the VMM bitmap, so nothing is lost."""
        with self._lock:
            if take not in self._sources:
                return
            self._sources.remove(take)
        self.memory.merge_vmm_dirty(take())

    def harvest(self, *, protect: bool = True) -> Bitmap:
        """Everything dirtied since the last harvest (a fresh array over the span)."""
        from . import bitmap

        out = bitmap.empty(self.kvm_log.npages)
        self.harvest_into(out, protect=protect)
        return out

    def harvest_into(self, out: Bitmap, *, protect: bool = True) -> None:
        """Add everything dirtied since the last harvest to `out`, a bitmap the caller keeps
        (the stop-and-copy adds the last harvest to the pages still unsent, allocating
        nothing on the downtime's clock). protect=False: see `KvmDirtyLog.harvest_into`;
        the caller then calls `reprotect` before reading pages."""
        import numpy as np

        self.kvm_log.harvest_into(out, protect=protect)
        with self._lock:
            markers = list(self._markers)
        for mark in markers:
            mark()
        self.memory.take_vmm_dirty_into(out)
        with self._lock:
            sources = list(self._sources)
        for take in sources:
            np.bitwise_or(out, take(), out=out)

    def reprotect(self, page_numbers: npt.NDArray[np.int64]) -> int:
        """Re-arm KVM's tracking of these pages before reading them (`KvmDirtyLog.reprotect`);
        the VMM's and the devices' writers need nothing: their bitmaps are set on every write."""
        return self.kvm_log.reprotect(page_numbers)

    def reset(self, *, protect: bool = True) -> None:
        """Forget everything dirtied so far (start of a migration's round 0)."""
        self.harvest(protect=protect)
