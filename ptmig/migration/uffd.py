"""The destination's post-copy fault server: guest RAM under userfaultfd, in native code.

`FaultServer` registers the guest RAM mapping with userfaultfd (MISSING mode, not
`UFFD_USER_MODE_ONLY`: KVM's own accesses to guest page tables must fault too) and runs one
native thread (`native/uffd.c`) that reads the faults. It owns the state of every page —
missing, requested, known zero, present — and answers faults on its own wherever it can: a
known zero page is installed with UFFDIO_ZEROPAGE, a page already present is woken. Only a
missing page needs the source: its number goes on the request queue (`take_requests`, with
`request_fd` to poll), once, however many vCPUs wait on it. On a plain stream a second native
thread (`start_sender`) writes the queued requests onto the return path as PageRequest frames
the moment they are queued; otherwise the fetcher (Python) takes them and asks the source.
The receiver hands the data to `install` (UFFDIO_COPY, which wakes the waiters). A server
opened before the source's last dirty pages are known takes them back with `mark_missing`.

Why it cannot deadlock on the GIL: the native threads never enter Python, and `install` and
`wait_present` are ctypes calls that release the GIL. vCPUs fault inside KVM_RUN, also with the
GIL released. The receiver (and the fetcher) are Python, so VMM code must never touch a
missing page through the mapping with the GIL held (that thread would wait for them):
`ensure` first (it waits with the GIL released). `os.pread` on the memfd is no way around it:
a missing page reads as zeros there, silently.

Device processes mapping the same memfd are not covered by this registration (their access to
a missing page allocates a zero page the real one can no longer replace), which is why the
destination's devices stay shadowed until `missing` is 0.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from ..layout import PAGE_SHIFT, PAGE_SIZE
from ..nativelib import NativeLibraryError, load_library

SOURCE = "uffd.c"
LATENCY_SAMPLES = 1 << 20  # remote fault latencies kept for percentiles (4 MiB)


class PageState(IntEnum):
    MISSING = 0
    REQUESTED = 1
    ZERO = 2
    PRESENT = 3


class FaultServerError(RuntimeError):
    """The fault server could not start, or an install failed."""


_STAT_NAMES = (
    "faults",
    "requests",
    "zero_served",
    "installed",
    "eexist",
    "missing",
    "blocktime_us",
    "samples",
)


class _Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in _STAT_NAMES]


@dataclass(frozen=True)
class FaultStats:
    """The server's counters (`postcopy-requests` is `requests`; `blocktime_us` sums the
    time each remote fault waited, from its read to the install that served it)."""

    faults: int
    requests: int
    zero_served: int
    installed: int
    eexist: int
    missing: int
    blocktime_us: int
    samples: int


_P, _U64, _INT = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "uffd_open": (_P, [_U64, _U64, _P, _U64, ctypes.POINTER(_INT)]),
    "uffd_install": (_INT, [_P, _U64, _U64, _P]),
    "uffd_take_requests": (_U64, [_P, _P, _U64]),
    "uffd_mark_missing": (ctypes.c_int64, [_P, _U64, _U64]),
    "uffd_wait_present": (_INT, [_P, _U64, _U64, ctypes.c_int64]),
    "uffd_fetch": (ctypes.c_int64, [_P, _U64, _U64, ctypes.c_int64]),
    "uffd_states": (None, [_P, _P]),
    "uffd_get_stats": (_INT, [_P, ctypes.POINTER(_Stats)]),
    "uffd_latencies": (_U64, [_P, _P, _U64]),
    "uffd_request_fd": (_INT, [_P]),
    "uffd_start_sender": (_INT, [_P, _INT, _U64]),
    "uffd_stop_sender": (None, [_P]),
    "uffd_sender_error": (_INT, [_P, ctypes.POINTER(_U64)]),
    "uffd_close": (None, [_P]),
}


def library() -> ctypes.CDLL:
    try:
        return load_library((SOURCE,), _SIGNATURES, ("worker.h",))
    except NativeLibraryError as e:
        raise FaultServerError(f"the post-copy fault server is unavailable: {e}") from e


def initial_states(
    received: npt.NDArray[np.bool_], allocated: npt.NDArray[np.bool_]
) -> npt.NDArray[np.uint8]:
    """Page states at the start of post-copy: a page received and allocated in the memfd is
    PRESENT; received but a hole (the source sent it as zero, or it was punched) is ZERO;
    never received (or stale: sent again later) is MISSING."""
    if received.shape != allocated.shape:
        raise ValueError(f"received {received.shape} and allocated {allocated.shape} differ")
    states = np.full(received.shape, PageState.MISSING, dtype=np.uint8)
    states[received & allocated] = PageState.PRESENT
    states[received & ~allocated] = PageState.ZERO
    return states


class FaultServer:
    """Guest RAM at `base` (`npages` pages of a shared memfd mapping) served by userfaultfd."""

    def __init__(self, base: int, states: npt.NDArray[np.uint8]) -> None:
        if base % PAGE_SIZE:
            raise ValueError(f"guest RAM mapping at {base:#x} is not page aligned")
        states = np.ascontiguousarray(states, dtype=np.uint8)
        if np.any(states == PageState.REQUESTED) or np.any(states > PageState.PRESENT):
            raise ValueError("initial page states must be MISSING, ZERO or PRESENT")
        self._lib = library()
        self.npages = len(states)
        self.base = base
        err = ctypes.c_int(0)
        handle = self._lib.uffd_open(
            base, self.npages, states.ctypes.data, LATENCY_SAMPLES, ctypes.byref(err)
        )
        if not handle:
            code = err.value
            hint = (
                " (userfaultfd needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1 for "
                "faults from the kernel, which KVM's are)"
                if code == errno.EPERM
                else ""
            )
            raise FaultServerError(
                f"registering {self.npages} pages at {base:#x} with userfaultfd failed: "
                f"{os.strerror(code)}{hint}"
            )
        self._h: int | None = handle
        # `close` frees the native state: the short queries (a QMP thread's stats while the
        # receiver finishes) hold this lock so they never run on a freed server
        self._close_lock = threading.Lock()

    def _handle(self) -> int:
        if self._h is None:
            raise FaultServerError("the fault server is closed")
        return self._h

    def _check_range(self, pfn: int, npages: int) -> None:
        if pfn < 0 or npages < 0 or pfn + npages > self.npages:
            raise ValueError(
                f"pages [{pfn}, {pfn + npages}) are outside guest RAM ({self.npages} pages)"
            )

    @property
    def request_fd(self) -> int:
        """Readable (an eventfd) while requests are queued."""
        return int(self._lib.uffd_request_fd(self._handle()))

    def take_requests(self, max_pages: int = 4096) -> npt.NDArray[np.uint64]:
        """The queued page numbers (each once, oldest first), at most `max_pages`."""
        out = np.empty(max_pages, dtype=np.uint64)
        with self._close_lock:
            n = int(self._lib.uffd_take_requests(self._handle(), out.ctypes.data, max_pages))
        return out[:n]

    def install(self, pfn: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Install whole pages at `pfn` (UFFDIO_COPY) and wake whoever waits on them."""
        buf = np.frombuffer(data, dtype=np.uint8)
        if len(buf) % PAGE_SIZE:
            raise ValueError(f"{len(buf)} bytes are not whole pages")
        self._check_range(pfn, len(buf) // PAGE_SIZE)
        rc = self._lib.uffd_install(self._handle(), pfn, len(buf) // PAGE_SIZE, buf.ctypes.data)
        if rc < 0:
            raise FaultServerError(
                f"UFFDIO_COPY of {len(buf) // PAGE_SIZE} pages at page {pfn}: {os.strerror(-rc)}"
            )

    def mark_missing(self, pfn: int, npages: int) -> int:
        """Pages [pfn, pfn + npages) are to come from the source after all (a server opened
        before the source's last dirty pages were known). Present and known zero pages become
        missing; returns how many did. The caller punches them out of the memfd right after,
        before anything touches them (a page still in the memfd would fault no more)."""
        self._check_range(pfn, npages)
        with self._close_lock:
            return int(self._lib.uffd_mark_missing(self._handle(), pfn, npages))

    def start_sender(self, fd: int, max_pages: int) -> None:
        """Write the requests onto the socket `fd` (a plain stream: PageRequest frames of at
        most `max_pages` pages) from a native thread, as soon as a fault queues them: no
        fetcher, and no GIL, on the way. It writes on its own duplicate of `fd` until
        `stop_sender` (so the stream stays open until then)."""
        with self._close_lock:
            rc = self._lib.uffd_start_sender(self._handle(), fd, max_pages)
        if rc < 0:
            raise FaultServerError(
                f"starting the request sender on fd {fd} ({max_pages} pages a frame): "
                f"{os.strerror(-rc)}"
            )

    def stop_sender(self) -> None:
        """Stop the request sender (if it runs): requests queue for a fetcher again."""
        with self._close_lock:
            if self._h is not None:
                self._lib.uffd_stop_sender(self._h)

    def sender_state(self) -> tuple[int, str | None]:
        """(request frames the sender wrote, why it stopped writing: None while it works)."""
        frames = _U64(0)
        with self._close_lock:
            error = self._lib.uffd_sender_error(self._handle(), ctypes.byref(frames))
        return int(frames.value), (os.strerror(error) if error else None)

    def wait_present(self, pfn: int, npages: int, timeout_s: float) -> bool:
        """Request what is missing of the pages and wait (GIL released) until all are present;
        False if they are not within `timeout_s`."""
        self._check_range(pfn, npages)
        rc = self._lib.uffd_wait_present(self._handle(), pfn, npages, int(timeout_s * 1000))
        return bool(rc == 1)

    def ensure(self, gpa: int, length: int, timeout_s: float) -> bool:
        """`wait_present` for the pages a VMM access to [gpa, gpa + length) touches."""
        first = gpa >> PAGE_SHIFT
        last = (gpa + max(length, 1) - 1) >> PAGE_SHIFT
        return self.wait_present(first, last - first + 1, timeout_s)

    def native_fetch(self) -> tuple[int, int]:
        """(address of `uffd_fetch`, this server) for native code that must make pages present
        before it touches them (the shadow data plane: `Dataplane.fetch_pages_with`). Valid
        until `close`: the caller stops using it first."""
        fn = ctypes.cast(self._lib.uffd_fetch, ctypes.c_void_p).value
        assert fn is not None
        return int(fn), self._handle()

    def states(self) -> npt.NDArray[np.uint8]:
        out = np.empty(self.npages, dtype=np.uint8)
        with self._close_lock:
            self._lib.uffd_states(self._handle(), out.ctypes.data)
        return out

    def stats(self) -> FaultStats:
        raw = _Stats()
        with self._close_lock:
            error = self._lib.uffd_get_stats(self._handle(), ctypes.byref(raw))
        if error:
            raise FaultServerError(f"the fault thread stopped: {os.strerror(error)}")
        return FaultStats(**{name: int(getattr(raw, name)) for name in _STAT_NAMES})

    @property
    def missing(self) -> int:
        """Pages only the source has (known zero pages do not count); post-copy is over when
        this is 0."""
        return self.stats().missing

    def latencies_us(self) -> npt.NDArray[np.uint32]:
        """Each remote fault's wait in µs (from its read to its install), oldest first."""
        out = np.empty(LATENCY_SAMPLES, dtype=np.uint32)
        with self._close_lock:
            n = int(self._lib.uffd_latencies(self._handle(), out.ctypes.data, LATENCY_SAMPLES))
        return out[:n].copy()

    def close(self) -> None:
        """Stop the fault thread and unregister the range (later accesses fault as usual)."""
        with self._close_lock:
            handle, self._h = self._h, None
            if handle is not None:
                self._lib.uffd_close(handle)

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
