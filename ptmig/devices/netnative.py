"""The net device's native frame path: `native/netpath.c` on a thread of the device process.

The device process (`ptmig.devices.process`) keeps the register file, the control channel and
the `SplitQueue` objects; while a `NativeFramePath` runs, its thread owns the per-frame work:
the two doorbells, the backend fd, the rings and the interrupt (see the comment at the top of
`native/netpath.c`). The two meet only inside `locked()`, around every control command:

* `pull` (first) copies the thread's queue positions into the `SplitQueue`s and folds the
  interrupt bits it raised into the register file, so the command sees the device as it is;
* `push` (last) hands the queues' geometry and positions, whether the device may run, and the
  DMA write log back to the thread, and wakes it to look at both rings again.

So a command never sees a frame half done, exactly as with the Python data path, and the
device's state lives in one place at a time. `ptmig.devices.net.NetDevice` stays the model of
the device (config space, features, backend keepalives) and the reference data path when the
native one is unavailable (no C compiler) or turned off (`datapath = "python"`).
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ptmig.devices.virtio.constants import NET_QUEUE_RX, NET_QUEUE_TX
from ptmig.devices.virtio.queue import SplitQueue
from ptmig.nativelib import load_library

SOURCE: Final = "netpath.c"
ERROR_LEN: Final = 256

# The shared int64 array (enums in netpath.c): per queue fields at q * QSTRIDE ...
Q_READY, Q_SIZE, Q_DESC, Q_AVAIL, Q_USED, Q_NEXT_AVAIL, Q_NEXT_USED = range(7)
QSTRIDE: Final = 7
_BASE: Final = 2 * QSTRIDE
# ... then the flags and counters.
(S_ENABLED, S_LOG_ON, S_BROKEN, S_FAULT_QUEUE, S_FAULT_IOVA, S_FAULT_DMA, S_ISR, S_LINK_DOWN,
 C_TX_FRAMES, C_TX_BYTES, C_TX_DROPPED, C_RX_FRAMES, C_RX_BYTES, C_RX_DROPPED_NO_BUFFER,
 C_RX_DROPPED_TOO_BIG, C_RX_CONTROL, C_REQUESTS, C_INTERRUPTS, C_DOORBELLS, C_DMA_FAULTS,
 C_RX_BACKLOG, S_COUNT) = range(_BASE, _BASE + 22)

_P, _U64, _U32, _INT = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "np_new": (_P, [_P, _U64, _P, _U64, _P, _U64, _P, _P, _INT, _INT, _U32, _U32, _U32, _INT,
                    _INT, _INT, _INT, _INT]),
    "np_start": (_INT, [_P]),
    "np_stop": (None, [_P]),
    "np_free": (None, [_P]),
    "np_lock": (None, [_P]),
    "np_unlock": (None, [_P]),
    "np_set_log": (None, [_P, _P]),
    "np_clear_backlog": (None, [_P]),
    "np_poke": (None, [_P]),
    "np_run_once": (_INT, [_P]),
}


def library() -> ctypes.CDLL:
    """The loaded frame path (built on first use); raises NativeLibraryError."""
    return load_library(SOURCE, _SIGNATURES)


@dataclass(frozen=True)
class LinkRules:
    """What a backend fd carries: the frame sizes it takes and what an empty read means."""

    rx_min: int = 1        # shorter datagrams are not frames (the switch's control messages)
    tx_min: int = 1
    tx_max: int = 65535
    eof_on_empty: bool = True  # an empty read is the peer hanging up (not an empty datagram)

    @classmethod
    def of(cls, backend: Any) -> LinkRules:
        """The rules of `backend` (a `ptmig.net.backend.NetBackend` or `FdBackend`)."""
        from ptmig.net.backend import MAX_FRAME, UdpNetBackend
        from ptmig.net.frames import ETH_HEADER_LEN

        if isinstance(backend, UdpNetBackend):
            return cls(ETH_HEADER_LEN, ETH_HEADER_LEN, MAX_FRAME, eof_on_empty=False)
        fd = backend.fileno()
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            with socket.socket(fileno=os.dup(fd)) as sock:
                return cls(eof_on_empty=sock.type != socket.SOCK_DGRAM)
        return cls(eof_on_empty=False)  # a TAP device: one frame per read, never EOF


def _address(buf: Any) -> tuple[int, Any]:
    """(address, keep-alive object) of a writable buffer such as an mmap."""
    base = ctypes.c_char.from_buffer(buf)
    return ctypes.addressof(base), base


@dataclass(frozen=True)
class Fault:
    """Why the thread stopped the device."""

    queue: int
    reason: str
    iova: int | None
    dma: bool


class NativeFramePath:
    """One net device's frame path thread and the state it shares with Python."""

    def __init__(self, *, guest: Any, pool: Any | None, iommu: npt.NDArray[np.uint64],
                 backend: Any, doorbells: dict[int, int], irq_fd: int) -> None:
        self.lib = library()
        self.shared = np.zeros(S_COUNT, dtype=np.int64)
        self.shared[S_FAULT_IOVA] = -1
        self._error = ctypes.create_string_buffer(ERROR_LEN)
        self._iommu: npt.NDArray[np.uint64] | None = iommu  # kept alive for the thread
        self._log: npt.NDArray[np.uint8] | None = None
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        guest_addr, self._guest_ref = _address(guest)
        pool_addr, self._pool_ref = _address(pool) if pool is not None else (0, None)
        rules = LinkRules.of(backend)
        os.set_blocking(backend.fileno(), False)
        self.handle: int = self.lib.np_new(
            guest_addr, len(guest), pool_addr or None, len(pool) if pool is not None else 0,
            int(iommu.ctypes.data), iommu.size, int(self.shared.ctypes.data),
            ctypes.addressof(self._error), backend.fileno(), int(rules.eof_on_empty),
            rules.rx_min, rules.tx_min, rules.tx_max, doorbells.get(NET_QUEUE_RX, -1),
            doorbells.get(NET_QUEUE_TX, -1), irq_fd, self.event_fd, self._wake_fd) or 0
        if not self.handle:
            self._close_fds()
            raise OSError("could not set up the native frame path (out of memory or fds)")
        self._link_was_down = False

    def start(self) -> None:
        if self.lib.np_start(self.handle):
            raise OSError("could not start the frame path thread")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The thread is between passes for the duration (no frame is half done)."""
        self.lib.np_lock(self.handle)
        try:
            yield
        finally:
            self.lib.np_unlock(self.handle)

    # The methods below need `locked()`.
    def pull(self, queues: dict[int, SplitQueue]) -> int:
        """Copy the thread's positions into `queues`; return the interrupt bits it raised
        since the last pull (for the register file's InterruptStatus)."""
        s = self.shared
        for index, queue in queues.items():
            base = index * QSTRIDE
            if not s[base + Q_READY]:
                continue
            state = queue.state()
            avail, used = int(s[base + Q_NEXT_AVAIL]), int(s[base + Q_NEXT_USED])
            if (avail, used) != (state.next_avail, state.next_used):
                queue.set_state(replace(state, next_avail=avail, next_used=used))
        bits = int(s[S_ISR])
        s[S_ISR] = 0
        return bits

    def push(self, queues: dict[int, SplitQueue], *, enabled: bool,
             log: npt.NDArray[np.uint8] | None) -> None:
        """Hand the queues, the run flag and the DMA write log to the thread and wake it."""
        s = self.shared
        for index in (NET_QUEUE_RX, NET_QUEUE_TX):
            base = index * QSTRIDE
            queue = queues.get(index)
            if queue is None:
                s[base + Q_READY] = 0
                continue
            st = queue.state()
            s[base:base + QSTRIDE] = (1, st.size, st.desc_addr, st.avail_addr, st.used_addr,
                                      st.next_avail, st.next_used)
        s[S_ENABLED] = int(enabled)
        if log is not self._log:
            self._log = log
            self.lib.np_set_log(self.handle, None if log is None else int(log.ctypes.data))
        s[S_LOG_ON] = int(log is not None)
        self.lib.np_poke(self.handle)

    def run_once(self) -> bool:
        """One pass on this thread, as if both doorbells rang and the backend were readable
        (only while the thread is not started: tests drive the path step by step). Returns
        True when work is left."""
        return bool(self.lib.np_run_once(self.handle))

    def clear_backlog(self) -> None:
        self.lib.np_clear_backlog(self.handle)

    def take_fault(self) -> Fault | None:
        """The fault that stopped the device, once (then it is acknowledged)."""
        s = self.shared
        if s[S_BROKEN] != 1:
            return None
        s[S_BROKEN] = 2  # reported; still broken until the device is reset
        iova = int(s[S_FAULT_IOVA])
        return Fault(int(s[S_FAULT_QUEUE]), self._error.value.decode(errors="replace"),
                     None if iova < 0 else iova, bool(s[S_FAULT_DMA]))

    def clear_fault(self) -> None:
        """The device was reset: the thread may run again once enabled."""
        self.shared[S_BROKEN] = 0
        self.shared[S_FAULT_IOVA] = -1
        self._error.value = b""

    def link_went_down(self) -> bool:
        """True once, when the backend has hung up since the last call."""
        down = bool(self.shared[S_LINK_DOWN])
        went = down and not self._link_was_down
        self._link_was_down = down
        return went

    def device_counters(self) -> dict[str, int]:
        """The counters `NetDevice.stats()` reports, as the thread counted them."""
        s = self.shared
        out = {"tx_frames": s[C_TX_FRAMES], "tx_bytes": s[C_TX_BYTES],
               "tx_dropped": s[C_TX_DROPPED], "rx_frames": s[C_RX_FRAMES],
               "rx_bytes": s[C_RX_BYTES], "rx_dropped_no_buffer": s[C_RX_DROPPED_NO_BUFFER],
               "rx_dropped_too_big": s[C_RX_DROPPED_TOO_BIG], "rx_control": s[C_RX_CONTROL],
               "rx_backlog": s[C_RX_BACKLOG]}
        result = {k: int(v) for k, v in out.items()}
        result["bytes"] = result["tx_bytes"] + result["rx_bytes"]
        result["link_up"] = int(not s[S_LINK_DOWN])
        return result

    def runtime_counters(self) -> dict[str, int]:
        """requests / interrupts / doorbells, as the thread counted them."""
        s = self.shared
        return {"requests": int(s[C_REQUESTS]), "interrupts": int(s[C_INTERRUPTS]),
                "doorbells": int(s[C_DOORBELLS])}

    def close(self) -> None:
        """Stop the thread and free everything (idempotent)."""
        if self.handle:
            self.lib.np_free(self.handle)
            self.handle = 0
            self._close_fds()
        self._guest_ref = self._pool_ref = self._iommu = None  # let their mmaps close

    def _close_fds(self) -> None:
        for fd in (self.event_fd, self._wake_fd):
            os.close(fd)
        self.event_fd = self._wake_fd = -1
