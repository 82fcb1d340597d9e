"""The dirty set, one definition: KVM's log (vCPU writes) ∪ the VMM's bitmap (its own writes)
∪ whatever the active device-DMA strategy contributes (see `ptmig.migration.strategies`).

`KvmDirtyLog` harvests KVM's log for the RAM memslot. With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
the harvest is GET_DIRTY_LOG followed by CLEAR_DIRTY_LOG of exactly the pages reported, so a page
written between the two calls is never lost; without it, GET_DIRTY_LOG clears as it reads.
"""

from __future__ import annotations

import threading

import numpy as np

from . import bitmap
from .kvm import Cap, VmFd
from .kvm.ioctls import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
from .memory import GuestMemory


class KvmDirtyLog:
    def __init__(self, vm: VmFd, slot: int, npages: int) -> None:
        self.vm = vm
        self.slot = slot
        self.npages = npages
        self.buffer = bitmap.empty(npages)
        self.manual_protect = False
        if vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self.manual_protect = True
        self._lock = threading.Lock()

    def harvest(self) -> bitmap.Bitmap:
        """Pages vCPUs wrote since the last harvest (a fresh array)."""
        with self._lock:
            buf = self.buffer
            addr = buf.ctypes.data
            self.vm.get_dirty_log(self.slot, addr)
            if self.manual_protect and buf.any():
                self.vm.clear_dirty_log(self.slot, 0, self.npages, addr)
            return buf.copy()


class DirtyTracker:
    """KVM log ∪ VMM bitmap for one guest memory."""

    def __init__(self, kvm_log: KvmDirtyLog, memory: GuestMemory) -> None:
        self.kvm_log = kvm_log
        self.memory = memory

    def harvest(self) -> bitmap.Bitmap:
        out = self.kvm_log.harvest()
        np.bitwise_or(out, self.memory.take_vmm_dirty(), out=out)
        return out

    def reset(self) -> None:
        """Forget everything dirtied so far (start of a migration's round 0)."""
        self.harvest()
