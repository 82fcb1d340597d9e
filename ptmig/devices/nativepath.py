"""The native data paths of the device processes: `native/netpath.c` and `native/blkpath.c`.

A device process (`ptmig.devices.process`) keeps the register file, the control channel and
the `SplitQueue` objects; while a `NativePath` runs, its thread owns the per-request work: the
doorbells, the rings, the data, the interrupt (and a net device's backend fd). See the comment
at the top of `native/virtq.h` for the rules and the shared state. The two halves meet only
inside `locked()`, around every control command:

* `pull` (first) copies the thread's queue positions into the `SplitQueue`s and returns the
  interrupt bits it raised, for the register file, so the command sees the device as it is;
* `push` (last) hands the queues' geometry and positions, whether the device may run, and the
  DMA write log back to the thread, and wakes it to look at every ring again.

So a command never sees a request half done, exactly as with the Python data path, and the
device's state lives in one place at a time. The device models (`NetDevice`, `BlkDevice`)
stay the models of the devices (config space, features, backend, image) and their Python data
paths stay the reference, used when the native one is unavailable (no C compiler) or turned
off (`datapath = "python"` in the device config); tests/test_device_fuzz.py runs hostile rings
through both and compares.
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt

from ptmig.devices.virtio.queue import SplitQueue
from ptmig.nativelib import NativeLibraryError, load_library

ERROR_LEN: Final = 256
DATAPATHS: Final = ("native", "python")  # a device config's `datapath`; native by default
HEADERS: Final = ("chain.h", "virtq.h", "worker.h")

# The shared int64 array (virtq.h): per queue fields at q * QSTRIDE, for up to MAX_QUEUES ...
Q_READY, Q_SIZE, Q_DESC, Q_AVAIL, Q_USED, Q_NEXT_AVAIL, Q_NEXT_USED = range(7)
QSTRIDE: Final = 7
MAX_QUEUES: Final = 2
# ... then the flags and the counters every device keeps, then the device's own counters.
(
    S_ENABLED,
    S_LOG_ON,
    S_BROKEN,
    S_FAULT_QUEUE,
    S_FAULT_IOVA,
    S_FAULT_DMA,
    S_ISR,
    C_REQUESTS,
    C_INTERRUPTS,
    C_DOORBELLS,
    C_DMA_FAULTS,
    C_DEVICE,
) = range(MAX_QUEUES * QSTRIDE, MAX_QUEUES * QSTRIDE + 12)

_P, _U64, _U32, _INT = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
_COMMON: dict[str, tuple[object, list[object]]] = {
    "vq_lock": (None, [_P]),
    "vq_unlock": (None, [_P]),
    "vq_set_log": (None, [_P, _P]),
    "vq_poke": (None, [_P]),
    "vq_run_once": (_INT, [_P]),
    "vq_layout": (_INT, [_INT]),
}
# guest, guest size, pool, pool size, IOMMU entries, IOVA pages, shared array, error text
_MEMORY = [_P, _U64, _P, _U64, _P, _U64, _P, _P]


@dataclass(frozen=True)
class Fault:
    """Why the thread stopped the device."""

    queue: int
    reason: str
    iova: int | None
    dma: bool


def check_datapath(value: object, device: str) -> str:
    """A device config's `datapath` value, validated."""
    if value not in DATAPATHS:
        raise ValueError(f"{device} 'datapath' must be one of {DATAPATHS}, got {value!r}")
    return str(value)


def _address(buf: Any) -> tuple[int, Any]:
    """(address, keep-alive object) of a writable buffer such as an mmap."""
    base = ctypes.c_char.from_buffer(buf)
    return ctypes.addressof(base), base


class NativePath:
    """One device's native data path thread and the state it shares with Python."""

    SOURCE: ClassVar[str]
    PREFIX: ClassVar[str]  # of the device's own functions: np_ / bp_
    COUNTERS: ClassVar[tuple[str, ...]]  # the device's counters, from C_DEVICE on
    NEW_ARGS: ClassVar[list[object]]  # np_new / bp_new arguments after _MEMORY

    def __init__(
        self, *, guest: Any, pool: Any | None, iommu: npt.NDArray[np.uint64], num_queues: int
    ) -> None:
        self.lib = self.library()
        self.num_queues = num_queues
        self.shared = np.zeros(C_DEVICE + len(self.COUNTERS), dtype=np.int64)
        self.shared[S_FAULT_IOVA] = -1
        self._error = ctypes.create_string_buffer(ERROR_LEN)
        self._iommu: npt.NDArray[np.uint64] | None = iommu  # kept alive for the thread
        self._log: npt.NDArray[np.uint8] | None = None
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pool_ref: Any = None
        guest_addr, self._guest_ref = _address(guest)
        pool_addr = 0
        if pool is not None:
            pool_addr, self._pool_ref = _address(pool)
        new = getattr(self.lib, f"{self.PREFIX}new")
        self.handle: int = (
            new(
                guest_addr,
                len(guest),
                pool_addr or None,
                len(pool) if pool is not None else 0,
                int(iommu.ctypes.data),
                iommu.size,
                int(self.shared.ctypes.data),
                ctypes.addressof(self._error),
                *self._device_args(),
            )
            or 0
        )
        if not self.handle:
            self._close_fds()
            raise OSError(f"could not set up native/{self.SOURCE} (out of memory or fds)")

    @classmethod
    def library(cls) -> ctypes.CDLL:
        """The loaded library (built on first use); raises NativeLibraryError."""
        own: dict[str, tuple[object, list[object]]] = {
            f"{cls.PREFIX}new": (_P, _MEMORY + cls.NEW_ARGS),
            f"{cls.PREFIX}start": (_INT, [_P]),
            f"{cls.PREFIX}free": (None, [_P]),
            f"{cls.PREFIX}shared_len": (_INT, []),
        }
        lib = load_library(
            (cls.SOURCE, "virtq.c"), {**_COMMON, **own, **cls.extra_functions()}, HEADERS
        )
        cls.check_layout(lib)
        return lib

    @classmethod
    def check_layout(cls, lib: ctypes.CDLL) -> None:
        """The shared array as the library was compiled must be the one described here: a
        mismatch would have each side read the other's counters as flags."""
        ours = (QSTRIDE, MAX_QUEUES, S_ENABLED, C_DEVICE, C_DEVICE + len(cls.COUNTERS))
        theirs = (*(lib.vq_layout(i) for i in range(4)), getattr(lib, f"{cls.PREFIX}shared_len")())
        if ours != theirs:
            raise NativeLibraryError(
                f"native/{cls.SOURCE}: shared layout {theirs} does not match nativepath.py's {ours}"
            )

    @classmethod
    def extra_functions(cls) -> dict[str, tuple[object, list[object]]]:
        return {}

    def _device_args(self) -> tuple[Any, ...]:
        """The device's own arguments of its `new` function (NEW_ARGS)."""
        raise NotImplementedError

    def start(self) -> None:
        if getattr(self.lib, f"{self.PREFIX}start")(self.handle):
            raise OSError("could not start the device thread")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The thread is between passes for the duration (no request is half done)."""
        self.lib.vq_lock(self.handle)
        try:
            yield
        finally:
            self.lib.vq_unlock(self.handle)

    # The methods below need `locked()`.
    def pull(self, queues: dict[int, SplitQueue]) -> int:
        """Copy the thread's positions into `queues`; return the interrupt bits it raised
        since the last pull (for the register file's InterruptStatus)."""
        s = self.shared
        for index, queue in queues.items():
            base = index * QSTRIDE
            if index >= self.num_queues or not s[base + Q_READY]:
                continue
            state = queue.state()
            avail, used = int(s[base + Q_NEXT_AVAIL]), int(s[base + Q_NEXT_USED])
            if (avail, used) != (state.next_avail, state.next_used):
                queue.set_state(replace(state, next_avail=avail, next_used=used))
        bits = int(s[S_ISR])
        s[S_ISR] = 0
        return bits

    def push(
        self, queues: dict[int, SplitQueue], *, enabled: bool, log: npt.NDArray[np.uint8] | None
    ) -> None:
        """Hand the queues, the run flag and the DMA write log to the thread and wake it."""
        s = self.shared
        for index in range(self.num_queues):
            base = index * QSTRIDE
            queue = queues.get(index)
            if queue is None:
                s[base + Q_READY] = 0
                continue
            st = queue.state()
            s[base : base + QSTRIDE] = (
                1,
                st.size,
                st.desc_addr,
                st.avail_addr,
                st.used_addr,
                st.next_avail,
                st.next_used,
            )
        s[S_ENABLED] = int(enabled)
        if log is not self._log:
            self._log = log
            self.lib.vq_set_log(self.handle, None if log is None else int(log.ctypes.data))
        s[S_LOG_ON] = int(log is not None)
        self.lib.vq_poke(self.handle)

    def run_once(self) -> bool:
        """One pass on this thread, as if every doorbell rang (and the device's own fd were
        readable); only while the thread is not started: tests drive a device step by step.
        Returns True when work is left."""
        return bool(self.lib.vq_run_once(self.handle))

    def take_fault(self) -> Fault | None:
        """The fault that stopped the device, once (then it counts as reported)."""
        s = self.shared
        if s[S_BROKEN] != 1:
            return None
        s[S_BROKEN] = 2  # reported; still broken until the device is reset
        iova = int(s[S_FAULT_IOVA])
        return Fault(
            int(s[S_FAULT_QUEUE]),
            self._error.value.decode(errors="replace"),
            None if iova < 0 else iova,
            bool(s[S_FAULT_DMA]),
        )

    def reset(self) -> None:
        """The device was reset: no fault any more (the thread runs again once enabled)."""
        self.shared[S_BROKEN] = 0
        self.shared[S_FAULT_IOVA] = -1
        self._error.value = b""

    def notices(self) -> list[str]:
        """Things worth a warning that happened since the last call (none by default)."""
        return []

    def device_counters(self) -> dict[str, int]:
        """The device's own counters, as the thread counted them (and `bytes` moved)."""
        counts = {
            name: int(v) for name, v in zip(self.COUNTERS, self.shared[C_DEVICE:], strict=True)
        }
        counts["bytes"] = self._bytes(counts)
        return counts

    def _bytes(self, counts: dict[str, int]) -> int:
        raise NotImplementedError

    def runtime_counters(self) -> dict[str, int]:
        """requests / interrupts / doorbells, as the thread counted them."""
        s = self.shared
        return {
            "requests": int(s[C_REQUESTS]),
            "interrupts": int(s[C_INTERRUPTS]),
            "doorbells": int(s[C_DOORBELLS]),
        }

    def close(self) -> None:
        """Stop the thread and free everything (idempotent)."""
        if self.handle:
            getattr(self.lib, f"{self.PREFIX}free")(self.handle)
            self.handle = 0
            self._close_fds()
        self._guest_ref = self._pool_ref = self._iommu = None  # let their mmaps close

    def _close_fds(self) -> None:
        for fd in (self.event_fd, self.wake_fd):
            os.close(fd)
        self.event_fd = self.wake_fd = -1


@dataclass(frozen=True)
class LinkRules:
    """What a net backend fd carries: the frame sizes it takes and what an empty read means."""

    rx_min: int = 1  # shorter datagrams are not frames (the switch's control messages)
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


class NetPath(NativePath):
    """virtio-net: TX to the backend fd, RX from it through a bounded backlog."""

    SOURCE = "netpath.c"
    PREFIX = "np_"
    COUNTERS: ClassVar[tuple[str, ...]] = (
        "link_down",
        "tx_frames",
        "tx_bytes",
        "tx_dropped",
        "rx_frames",
        "rx_bytes",
        "rx_dropped_no_buffer",
        "rx_dropped_too_big",
        "rx_control",
        "rx_backlog",
    )
    # rx doorbell, tx doorbell, irq, event, wake, backend, eof_on_empty, rx_min, tx_min, tx_max
    NEW_ARGS = [_INT, _INT, _INT, _INT, _INT, _INT, _INT, _U32, _U32, _U32]

    def __init__(
        self,
        *,
        guest: Any,
        pool: Any | None,
        iommu: npt.NDArray[np.uint64],
        backend: Any,
        doorbells: dict[int, int],
        irq_fd: int,
    ) -> None:
        self._rules = LinkRules.of(backend)
        os.set_blocking(backend.fileno(), False)
        self._backend_fd, self._doorbells, self._irq_fd = backend.fileno(), doorbells, irq_fd
        self._link_was_down = False
        super().__init__(guest=guest, pool=pool, iommu=iommu, num_queues=2)

    def _device_args(self) -> tuple[Any, ...]:
        r = self._rules
        return (
            self._doorbells.get(0, -1),
            self._doorbells.get(1, -1),
            self._irq_fd,
            self.event_fd,
            self.wake_fd,
            self._backend_fd,
            int(r.eof_on_empty),
            r.rx_min,
            r.tx_min,
            r.tx_max,
        )

    @classmethod
    def extra_functions(cls) -> dict[str, tuple[object, list[object]]]:
        return {"np_clear_backlog": (None, [_P])}

    def reset(self) -> None:
        super().reset()
        self.lib.np_clear_backlog(self.handle)

    def notices(self) -> list[str]:
        down = bool(self.shared[C_DEVICE])
        went, self._link_was_down = down and not self._link_was_down, down
        return ["network backend hung up; link down"] if went else []

    def device_counters(self) -> dict[str, int]:
        counts = super().device_counters()
        counts["link_up"] = int(not counts.pop("link_down"))
        return counts

    def _bytes(self, counts: dict[str, int]) -> int:
        return counts["tx_bytes"] + counts["rx_bytes"]


class BlkPath(NativePath):
    """virtio-blk: requests straight between guest pages and the image (preadv/pwritev)."""

    SOURCE = "blkpath.c"
    PREFIX = "bp_"
    COUNTERS: ClassVar[tuple[str, ...]] = (
        "reads",
        "writes",
        "flushes",
        "get_ids",
        "unsupported",
        "ioerrs",
        "bytes_read",
        "bytes_written",
    )
    # doorbell, irq, event, wake, image fd, capacity, readonly, serial (20 bytes)
    NEW_ARGS = [_INT, _INT, _INT, _INT, _INT, _U64, _INT, ctypes.c_char_p]

    def __init__(
        self,
        *,
        guest: Any,
        pool: Any | None,
        iommu: npt.NDArray[np.uint64],
        image_fd: int,
        capacity: int,
        readonly: bool,
        serial: bytes,
        doorbells: dict[int, int],
        irq_fd: int,
    ) -> None:
        from ptmig.devices.virtio.constants import VIRTIO_BLK_ID_BYTES

        self._doorbell, self._irq_fd = doorbells.get(0, -1), irq_fd
        self._image = (
            image_fd,
            capacity,
            int(readonly),
            serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:VIRTIO_BLK_ID_BYTES],
        )
        super().__init__(guest=guest, pool=pool, iommu=iommu, num_queues=1)

    def _device_args(self) -> tuple[Any, ...]:
        return (self._doorbell, self._irq_fd, self.event_fd, self.wake_fd, *self._image)

    def _bytes(self, counts: dict[str, int]) -> int:
        return counts["bytes_read"] + counts["bytes_written"]
