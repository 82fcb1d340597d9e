"""The shadow data plane's native half: building `native/dataplane.c` and calling into it.

The per-request work of shadow mode (forward a request, sync a completion) runs in C on a
thread of its own, outside the interpreter; see the comment at the top of `native/dataplane.c`
for what it does and why. Everything it works on is owned here, as numpy arrays the C side
keeps pointers to: the page table of each device (guest page -> pool page, references, LRU
stamps), each queue's positions and in-flight heads, the counters, and the DMA dirty bitmap.
Python reads or changes any of it only inside `Dataplane.locked()`.

The library is built at first use and cached (`ptmig.nativelib`), exactly like the guest
firmware.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import bitmap
from ..devices.virtio.constants import VIRTQ_DESC_F_NEXT as DESC_F_NEXT
from ..devices.virtio.constants import VIRTQ_DESC_F_WRITE as DESC_F_WRITE
from ..devices.virtio.queue import QueueState
from ..errors import PtmigError
from ..memory import GuestMemory
from ..nativelib import NativeLibraryError, load_library
from .pool import ShadowPool

# Counters per device (enum ST_* in dataplane.c).
ST_FORWARDED, ST_COMPLETED, ST_BYTES_TO_DEVICE, ST_BYTES_TO_GUEST = 0, 1, 2, 3
ST_DOORBELLS, ST_INTERRUPTS, ST_ACTIVE, ST_IDLE, ST_REUSED, ST_PEAK, ST_STALLS = range(4, 11)
ST_CLOCK = 11
ST_MARKED = 12  # intercept: page pieces marked dirty for the device's direct writes
ST_FETCHED = 13  # post-copy: guest pages the device's requests or rings found missing
ST_FETCH_WAITS = 14  # post-copy: waits for such pages
ST_WAKEUPS = 15  # passes of the thread the device's doorbells or interrupts started
ST_KICKS = 16  # doorbells rung on the device
ST_GUEST_IRQS = 17  # guest interrupts raised for the device's completions
ST_COUNT = 18
# Positions per queue (enum Q_* in dataplane.c).
Q_NEXT_AVAIL, Q_NEXT_USED, Q_STALLED, Q_INFLIGHT = range(4)
Q_COUNT = 4
# The private record of forwarded descriptors, one per descriptor index (struct rec in
# dataplane.c): the descriptor as forwarded (flags: WRITE | NEXT), the head of the in-flight
# chain it belongs to (-1: none), and at a head the chain's device-writable bytes.
REC_DTYPE = np.dtype(
    [
        ("addr", "<u8"),
        ("len", "<u4"),
        ("flags", "<u2"),
        ("next", "<u2"),
        ("owner", "<i4"),
        ("wlen", "<u4"),
    ]
)
ERROR_LEN = 256
SOURCE = "dataplane.c"


class DataplaneError(PtmigError, RuntimeError):
    """The native data plane could not be built, loaded or set up."""


_P = ctypes.c_void_p
_U64, _I32, _U32, _INT = ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_int
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "dp_engine_new": (_P, [_P, _U64, _P, _INT, _P, _U64, _P, _INT, _INT, _U32]),
    "dp_engine_free": (None, [_P]),
    "dp_dev_add": (_P, [_P, _P, _P, _P, _P, _P, _INT, _INT]),
    "dp_queue_add": (_INT, [_P, _INT, _U32, _U64, _U64, _U64, _P, _P, _P, _INT, _INT]),
    "dp_rec_layout": (_INT, [_INT]),
    "dp_forward": (_INT, [_P, _INT]),
    "dp_complete": (_INT, [_P]),
    "dp_fail": (None, [_P, ctypes.c_char_p]),
    "dp_lock": (None, [_P]),
    "dp_unlock": (None, [_P]),
    "dp_poke": (None, [_P]),
    "dp_set_presence": (None, [_P, _P, _P, ctypes.c_int64]),
    "dp_start": (_INT, [_P]),
    "dp_stop": (None, [_P]),
}


def library() -> ctypes.CDLL:
    """The loaded data plane (built on first use). ctypes releases the GIL around each call."""
    try:
        lib = load_library((SOURCE, "virtq.c"), _SIGNATURES, ("chain.h", "virtq.h", "worker.h"))
    except NativeLibraryError as e:
        raise DataplaneError(f"the shadow data plane is unavailable: {e}") from e
    check_layout(lib)
    return lib


def check_layout(lib: ctypes.CDLL) -> None:
    """Refuse a library whose forwarding record is laid out unlike REC_DTYPE."""
    fields: Mapping[str, tuple[Any, ...]] = REC_DTYPE.fields or {}
    ours = (REC_DTYPE.itemsize, int(fields["owner"][1]), int(fields["wlen"][1]))
    theirs = tuple(int(lib.dp_rec_layout(i)) for i in range(3))
    if theirs != ours:
        raise DataplaneError(
            f"native/{SOURCE}: record layout (size, owner, wlen) {theirs} "
            f"does not match ptmig's {ours}; rebuild the library"
        )


def _addr(a: npt.NDArray[np.generic]) -> int:
    return int(a.ctypes.data)


def ram_region_array(memory: GuestMemory) -> npt.NDArray[np.uint64]:
    """The RAM regions as (start, end) GPA pairs (struct dp_region): the data plane refuses any
    guest address outside them, the gaps between regions included."""
    return np.array([v for r in memory.regions for v in (r.gpa, r.end)], dtype=np.uint64)


class DataplaneQueue:
    """One queue as the data plane sees it: positions, in-flight heads and the private record
    of every forwarded chain (shared arrays, never device-reachable)."""

    def __init__(self, index: int, st: QueueState) -> None:
        self.index = index
        self.size = size = st.size
        self.pos = np.zeros(Q_COUNT, dtype=np.int64)
        self.pos[Q_NEXT_AVAIL], self.pos[Q_NEXT_USED] = st.next_avail, st.next_used
        self.head_avail = np.full(size, -1, dtype=np.int32)
        self.rec = np.zeros(size, dtype=REC_DTYPE)
        self.rec["owner"] = -1

    @property
    def next_avail(self) -> int:
        return int(self.pos[Q_NEXT_AVAIL])

    @property
    def next_used(self) -> int:
        return int(self.pos[Q_NEXT_USED])

    @property
    def stalled(self) -> bool:
        return bool(self.pos[Q_STALLED])

    @property
    def inflight_count(self) -> int:
        return int(self.pos[Q_INFLIGHT])

    def inflight(self) -> list[tuple[int, int]]:
        """(avail index, head) of every forwarded, uncompleted request, oldest first."""
        heads = np.flatnonzero(self.head_avail >= 0)
        nxt = self.next_avail
        reqs = [(int(self.head_avail[h]), int(h)) for h in heads]
        reqs.sort(key=lambda r: (nxt - r[0]) & 0xFFFF, reverse=True)
        return reqs

    def recorded_chain(self, head: int) -> list[tuple[int, int, bool]]:
        """(addr, len, device-writable) of the in-flight chain at `head`, from the record."""
        out: list[tuple[int, int, bool]] = []
        index = head
        for _ in range(self.size):
            r = self.rec[index]
            out.append((int(r["addr"]), int(r["len"]), bool(r["flags"] & DESC_F_WRITE)))
            if not r["flags"] & DESC_F_NEXT or r["next"] >= self.size:
                break  # (the links were validated at forwarding; this is only a guard)
            index = int(r["next"])
        return out

    def forget(self) -> None:
        """Drop every in-flight request (the device buffers are being released)."""
        self.head_avail[:] = -1
        self.rec["owner"] = -1
        self.pos[Q_INFLIGHT] = 0


def device_tables(npages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A device's shared arrays, fresh: its page table (the pool slot of each guest page, -1
    unmapped), the slots' reference counts, their reuse stamps, and its counters."""
    return (
        np.full(npages, -1, dtype=np.int32),
        np.zeros(npages, dtype=np.int32),
        np.zeros(npages, dtype=np.uint32),
        np.zeros(ST_COUNT, dtype=np.uint64),
    )


class DataplaneDevice:
    """One device's page table, counters and error text (shared arrays)."""

    def __init__(self, dp: Dataplane, npages: int, irq_fd: int, intercept: bool) -> None:
        self.dp = dp
        self.intercept = intercept
        self.slot, self.refs, self.stamp, self.stats = device_tables(npages)
        self._error = ctypes.create_string_buffer(ERROR_LEN)
        self.queues: dict[int, DataplaneQueue] = {}
        with dp.locked():  # the thread may be running already (`ShadowEngine.enter`)
            handle = dp.lib.dp_dev_add(
                dp.handle,
                _addr(self.slot),
                _addr(self.refs),
                _addr(self.stamp),
                _addr(self.stats),
                ctypes.addressof(self._error),
                irq_fd,
                int(intercept),
            )
        if not handle:
            raise DataplaneError("the data plane cannot take another device")
        self.handle: int = handle

    def add_queue(
        self, index: int, st: QueueState, doorbell_fd: int = -1, kick_fd: int = -1
    ) -> DataplaneQueue:
        """Queue `index` with the guest's ring addresses and positions `st`; the data plane
        thread waits on `doorbell_fd` and rings `kick_fd` (-1: none)."""
        q = DataplaneQueue(index, st)
        err = self.dp.lib.dp_queue_add(
            self.handle,
            index,
            st.size,
            st.desc_addr,
            st.avail_addr,
            st.used_addr,
            _addr(q.pos),
            _addr(q.head_avail),
            _addr(q.rec),
            doorbell_fd,
            kick_fd,
        )
        if err:
            raise DataplaneError(f"queue {index}: {os.strerror(-err)}")
        self.queues[index] = q
        return q

    @property
    def error(self) -> str | None:
        text = self._error.value.decode(errors="replace")
        return text or None

    # The three calls below need the data plane locked.
    def forward(self, index: int) -> int:
        """Forward queue `index`'s new requests; how many, or -1 if the device broke."""
        return int(self.dp.lib.dp_forward(self.handle, index))

    def complete(self) -> int:
        """Sync every completion of every queue; how many, or -1 if the device broke."""
        return int(self.dp.lib.dp_complete(self.handle))

    def fail(self, reason: str) -> None:
        self.dp.lib.dp_fail(self.handle, reason.encode()[: ERROR_LEN - 1])


class Dataplane:
    """The native data plane of one VM's shadowed devices, and its thread.

    `guest_wake_fd` is signalled after completions were synced (the guest's interrupt);
    `slow_fd` is signalled when Python must act: a queue stalled on an unshadowed page, a device
    broke, or too many idle device buffers piled up."""

    def __init__(
        self,
        memory: GuestMemory,
        pool: ShadowPool,
        *,
        guest_wake_fd: int = -1,
        idle_limit: int = 1024,
    ) -> None:
        self.lib = library()
        self.memory = memory
        self.dirty = bitmap.empty(memory.npages)
        self.slow_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pool_base = ctypes.c_char.from_buffer(pool.mmap)
        self._regions = ram_region_array(memory)
        handle = self.lib.dp_engine_new(
            memory.host_address,
            memory.size,
            _addr(self._regions),
            len(self._regions) // 2,
            ctypes.addressof(self._pool_base),
            pool.pages,
            _addr(self.dirty),
            guest_wake_fd,
            self.slow_fd,
            idle_limit,
        )
        if not handle:
            os.close(self.slow_fd)
            raise DataplaneError("could not create the data plane (out of memory or fds)")
        self.handle: int = handle
        self.devices: list[DataplaneDevice] = []
        self.running = False

    def add_device(self, irq_fd: int = -1, *, intercept: bool = False) -> DataplaneDevice:
        """A device to shadow; `intercept`: only its rings (its data buffers stay in guest RAM,
        and a completion marks their pages dirty instead of copying them back)."""
        dev = DataplaneDevice(self, self.memory.npages, irq_fd, intercept)
        self.devices.append(dev)
        return dev

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.lib.dp_lock(self.handle)
        try:
            yield
        finally:
            self.lib.dp_unlock(self.handle)

    def take_dirty(self) -> bitmap.Bitmap:
        """Guest pages the data plane wrote since the last call (and forget them)."""
        with self.locked():
            out = self.dirty.copy()
            self.dirty[:] = 0
        return out

    def start(self) -> None:
        err = self.lib.dp_start(self.handle)
        if err:
            raise DataplaneError(f"could not start the data plane thread: {os.strerror(-err)}")
        self.running = True

    def stop(self) -> None:
        """Stop the thread (it finishes the batch it is on). Idempotent."""
        self.lib.dp_stop(self.handle)
        self.running = False

    def poke(self) -> None:
        """Make the thread look at every queue again (after stalled pages were shadowed)."""
        self.lib.dp_poke(self.handle)

    def fetch_pages_with(self, fetch: tuple[int, int] | None, timeout_ms: int = 0) -> None:
        """Post-copy: before the thread touches a guest page, it makes it present through
        `fetch` -- (address of the fault server's native `uffd_fetch`, its server) -- waiting at
        most `timeout_ms` per range; None: every page of guest RAM is here."""
        fn, ctx = fetch if fetch is not None else (None, None)
        with self.locked():
            self.lib.dp_set_presence(self.handle, fn, ctx, timeout_ms)

    def close(self) -> None:
        if self.handle:
            self.lib.dp_engine_free(self.handle)
            self.handle = 0
            os.close(self.slow_fd)
            del self._pool_base  # the pool's mmap may be closed again
