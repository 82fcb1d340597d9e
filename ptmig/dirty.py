"""The dirty set, one definition: KVM's log (vCPU writes) ∪ the VMM's bitmap (its own writes)
∪ whatever the active device-DMA strategy contributes (see `ptmig.migration.tracking`).

`KvmDirtyLog` harvests KVM's logs of the RAM memslots (one per region). With
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 the harvest is GET_DIRTY_LOG followed by CLEAR_DIRTY_LOG of
exactly the pages reported, so a page written between the two calls is never lost; without it,
GET_DIRTY_LOG clears as it reads.

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
    from .bitmap import Bitmap


class KvmDirtyLog:
    """KVM's dirty logs of the RAM memslots, harvested into one page bitmap of the GPA span.

    `slots` are (slot, first_page, npages); each region starts on a 64-page boundary (the
    layout's regions start at 0 and 4 GiB and are 2 MiB multiples), so a slot's log is a run
    of whole words of the span bitmap and is copied in, never shifted."""

    def __init__(self, vm: VmFd, slots: list[tuple[int, int, int]], span_pages: int) -> None:
        self.vm = vm
        self.npages = span_pages
        for slot, first, _ in slots:
            if first % 64:
                raise ValueError(
                    f"memslot {slot} starts at page {first:#x}, not on a 64-page boundary"
                )
        self.slots = slots
        self.buffers: list[Bitmap] = []  # one per slot, for GET_DIRTY_LOG to fill
        self.manual_protect = False
        if vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self.manual_protect = True
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of the slots' log buffers (allocated or not yet: the memory report's)."""
        return sum((n + 63) // 64 * 8 for _, _, n in self.slots)

    def harvest(self) -> Bitmap:
        """Pages vCPUs wrote since the last harvest (a fresh array over the span)."""
        from . import bitmap

        out = bitmap.empty(self.npages)
        with self._lock:
            if not self.buffers:
                self.buffers = [bitmap.empty(n) for _, _, n in self.slots]
            for (slot, first, npages), buf in zip(self.slots, self.buffers, strict=True):
                addr = buf.ctypes.data
                self.vm.get_dirty_log(slot, addr)
                if self.manual_protect and buf.any():
                    self.vm.clear_dirty_log(slot, 0, npages, addr)
                out[first >> 6 : (first >> 6) + buf.size] = buf
        return out


DirtySource = Callable[[], "Bitmap"]


class DirtyTracker:
    """KVM log ∪ VMM bitmap ∪ other VMM writers' bitmaps for one guest memory.

    A writer that cannot share the VMM bitmap's lock (the native shadow data plane) keeps a
    bitmap of its own and registers its take-and-clear function as a source while it runs."""

    def __init__(self, kvm_log: KvmDirtyLog, memory: GuestMemory) -> None:
        self.kvm_log = kvm_log
        self.memory = memory
        self._sources: list[DirtySource] = []
        self._lock = threading.Lock()

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

    def harvest(self) -> Bitmap:
        import numpy as np

        out = self.kvm_log.harvest()
        np.bitwise_or(out, self.memory.take_vmm_dirty(), out=out)
        with self._lock:
            sources = list(self._sources)
        for take in sources:
            np.bitwise_or(out, take(), out=out)
        return out

    def reset(self) -> None:
        """Forget everything dirtied so far (start of a migration's round 0)."""
        self.harvest()
