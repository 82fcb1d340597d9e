"""A vCPU's KVM_RUN with the guest's halt served in C: building `native/vcpuloop.c`, driving it.

The guest halts through a hypercall; the VMM's answer is a wait for a device interrupt. Served
in Python, each wake-up needs the GIL twice before the guest runs again, and during a
migration the GIL is often held by a pre-copy thread (niced: `ptmig.migration.background`),
so a guest woken by a request waited for that thread. `NativeRunLoop.run` is one ctypes call
(GIL released) that runs the guest, serves its halts and runs it again, and returns only for
an exit Python handles (see the comment at the top of `native/vcpuloop.c`).

The halt's reply is written into the mailbox by C, which KVM's dirty log does not see:
`mark_replies` (called before every dirty harvest, `DirtyTracker.add_marker`) marks the
mailbox's page in the VMM's bitmap whenever a reply was written since the last call.

Built at first use and cached (`ptmig.nativelib`); where it cannot be built the vCPU serves
its halts in Python, as before.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from .errors import PtmigError
from .nativelib import NativeLibraryError, load_library

SOURCE = "vcpuloop.c"
MAX_WAKE_FDS = 64  # VL_MAX_FDS
EXIT, KICKED = 0, 1  # vl_run results (VL_EXIT, VL_KICKED); negative: -errno of KVM_RUN


class NativeLoopUnavailable(PtmigError, RuntimeError):
    """The native vCPU loop could not be built or loaded."""


class _VlVcpu(ctypes.Structure):
    _fields_ = [
        ("vcpu_fd", ctypes.c_int32),
        ("kick_fd", ctypes.c_int32),
        ("run", ctypes.c_uint64),
        ("mailbox", ctypes.c_uint64),
        ("port", ctypes.c_uint32),
        ("halt_nr", ctypes.c_uint32),
        ("halts", ctypes.c_uint64),
        ("mailbox_writes", ctypes.c_uint64),
    ]


_P = ctypes.POINTER(_VlVcpu)
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "vl_run": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int32), ctypes.c_int]),
    "vl_mailbox_writes": (ctypes.c_uint64, [_P]),
}


def library() -> ctypes.CDLL:
    """The loaded loop (built on first use). ctypes releases the GIL around each call."""
    try:
        return load_library((SOURCE,), _SIGNATURES)
    except NativeLibraryError as e:
        raise NativeLoopUnavailable(f"the native vCPU loop is unavailable: {e}") from e


class NativeRunLoop:
    """One vCPU's loop: `vcpu_fd` and its mmap'd kvm_run at `run_address`, the mailbox at
    `mailbox_address` (host), and `wake_fds`, the VM's list of wake eventfds (read at every
    call: a change of it is followed by a kick, which ends the wait in progress)."""

    def __init__(
        self,
        vcpu_fd: int,
        kick_fd: int,
        run_address: int,
        mailbox_address: int,
        port: int,
        halt_nr: int,
        wake_fds: Sequence[int],
    ) -> None:
        self._lib = library()
        self._state = _VlVcpu(vcpu_fd, kick_fd, run_address, mailbox_address, port, halt_nr)
        self._ref = ctypes.byref(self._state)
        self.wake_fds = wake_fds
        self._fds_key: tuple[int, ...] = ()
        self._fds = (ctypes.c_int32 * 0)()
        self._replies_seen = 0

    def run(self) -> int | None:
        """KVM_RUN until an exit for Python (`EXIT`) or a halt ended by a kick (`KICKED`);
        -errno when KVM_RUN failed; None (nothing run) when there are more wake sources than
        the loop takes (a VM has at most 9). Halts served are in `take_halts()`."""
        key = tuple(self.wake_fds)
        if key != self._fds_key:
            if len(key) > MAX_WAKE_FDS:
                return None
            self._fds = (ctypes.c_int32 * len(key))(*key)
            self._fds_key = key
        return int(self._lib.vl_run(self._ref, self._fds, len(key)))

    def take_halts(self) -> int:
        """Halts served since the last call (only the vCPU's own thread calls it)."""
        n = int(self._state.halts)
        self._state.halts = 0
        return n

    def replies_since_last(self) -> bool:
        """Whether a halt reply was written into the mailbox since the last call."""
        n = int(self._lib.vl_mailbox_writes(self._ref))
        moved = n != self._replies_seen
        self._replies_seen = n
        return moved
