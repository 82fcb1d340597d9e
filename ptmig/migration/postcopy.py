"""Post-copy: the guest runs on the destination before all of its pages are there.

The source switches over early (`policy.postcopy_trigger`: on `migrate-start-postcopy`, after
N pre-copy rounds, or once pre-copy stopped converging). At that round end, with the guest
still running, it sends `PostcopyDiscard`, the pages dirty so far; the destination punches them
out of its memfd, registers guest RAM with userfaultfd (`uffd.FaultServer`, those pages
missing) and acknowledges: that work stays out of the downtime. With the vCPUs stopped
the source then sends the vCPU and device state and `PostcopyStart`, the bitmap of the pages
the destination lacks (those dirtied since they were last sent: the discarded ones and what
the last moments dirtied), then Complete, as in a plain switchover. The destination marks the
pages not discarded yet missing and punches them (`FaultServer.mark_missing`), acknowledges,
resumes the guest and starts its fetcher. Then:

- `PostcopySender` (source) pushes every pending page once, in page order, as PostcopyPages
  frames of at most 16 pages (`BACKGROUND_PAGES`: a frame is written whole, so a requested
  page may queue behind the rest of one); a `PageRequest` from the destination goes first,
  in a frame of its own pages only (a bigger one would delay the fault by what the
  destination takes to process the rest), and the background push continues right after it
  (the guest's next accesses are likely near its last fault). Zero pages travel as empty
  frames.
  `max-bandwidth` caps all of it (a request jumps the queue, not the link). The end is
  `PostcopyEnd`, and the source closes only after the destination's `PostcopyDone` (every
  page installed): closing with requests unread would make its kernel reset the connection
  and drop the last frames still in flight (`await_done`).
- `PostcopyReceiver` (destination) installs each frame with UFFDIO_COPY (or ZEROPAGE) and
  keeps the verification digests of what it installed. The fault server's requests become
  PageRequest frames on the same stream (the return path): on a plain stream its native
  request sender writes them as soon as a fault queues them (no GIL on the way: a Python
  thread waiting for it took up to 60 ms on a loaded host); on a TLS or sealed stream the
  fetcher thread does.

Each page crosses the link once: a requested page that is already on its way is sent again
only if the request arrives before the source reached it (the source sends each page once).

Failure semantics (what the user meets when the link breaks during post-copy). The guest's
state is split: the source holds the pages not yet sent, the destination the vCPUs and the
rest. Neither side may run the guest alone, and nothing is dropped:
- the source stays paused with its whole RAM (status `postcopy-paused`, error-desc says why);
- the destination pauses its vCPUs (a vCPU waiting on a missing page is kicked out of its
  wait; `query-status` says `paused`) and keeps its fault server and pages
  (`x-query-postcopy` says `postcopy-paused`).
`recovery` takes it up again (QEMU's `migrate-pause`, `migrate-recover`, `migrate` with
`resume: true`): until then the guest stays paused on both sides, and is lost only when one of
the two processes is ended. The destination never runs a guest with a page missing and
unreachable, and never zero-fills one.

Passthrough devices: the destination's device processes map guest RAM themselves, outside the
userfaultfd registration; a device touching a missing page would allocate a zero page the real
one can no longer replace. So they never touch guest RAM during post-copy: programmed
quiesced at the switchover, then shadowed, with the data plane fetching every page of a
request (and of the rings) through the fault server before it copies it into device buffers,
and back to direct DMA once every page is here (`postcopy_devices`); vhost-user devices too
(their backend's rings start only once it sees the shadow pool).
"""

from __future__ import annotations

import bisect
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import bitmap
from ..layout import PAGE_SIZE
from ..memory import GuestMemoryError
from . import transport
from .events import (
    NEED_DATA,
    Abort,
    PageRequest,
    PostcopyDone,
    PostcopyEnd,
    PostcopyPages,
    PostcopyStart,
)
from .frames import MAX_POSTCOPY_PAGES
from .protocol import Connection, ConnectionClosed
from .uffd import FaultServer, FaultServerError, FaultStats, initial_states

log = logging.getLogger(__name__)

#: Hello capability: the source may switch over to post-copy.
POSTCOPY_CAPABILITY = "postcopy-ram"
REQUEST_POLL_S = 0.05  # how often the fetcher looks at its stop flag
# The background push keeps at most this much unacknowledged in the socket, so that a requested
# page queues behind little data (its latency is the backlog / the link's rate).
BACKLOG_BYTES = 512 << 10
BACKLOG_POLL_S = 0.0005
# On TCP: the socket counts as writable only while less than this is queued unsent (Linux's
# TCP_NOTSENT_LOWAT), so the push waits for the peer's window without polling, and what a
# requested page queues behind is the peer's receive queue plus this.
NOTSENT_LOWAT_BYTES = 16 << 10
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
PACE_SLICE_S = 0.02  # a wait for the link's cap looks at a cancel and a new cap this often
# What a requested page can queue behind on its way: the destination's receive queue (the
# kernel doubles this), the source's unsent bytes (NOTSENT_LOWAT_BYTES) and the rest of the
# background frame being written. With 256 KiB and 64-page frames that was up to 512 KiB, 5 ms
# at 100 MiB/s (fault p99 8.4 ms, median of 4 runs at load 3-4.6); with these, 128-192 KiB.
# Halving both (32 KiB, 8 pages) was worse: one fault a run waited ~207 ms (a stalled window)
# and the post-copy phase took twice as long (4 runs each, alternating, at 100 MiB/s).
RECEIVE_QUEUE_BYTES = 64 << 10
BACKGROUND_PAGES = 16  # pages per background frame (a request's frame may hold up to 64)
INSTALL_WAIT_S = 60.0
PRESENCE_SLICE_S = 0.1  # a VMM access waiting for a page looks at the link this often


class PostcopyError(RuntimeError):
    """Post-copy cannot start, or cannot go on."""


def pending_bytes(pending: bitmap.Bitmap) -> bytes:
    return np.ascontiguousarray(pending, dtype=np.uint64).tobytes()


def pending_pages(blob: bytes, npages: int) -> npt.NDArray[np.bool_]:
    """PostcopyStart's bitmap as one bool per page (bits past `npages` ignored)."""
    words = np.frombuffer(blob, dtype="<u8")
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
    return bits[:npages]


def punch_pages(mask: npt.NDArray[np.bool_], punch: Callable[[int, int], None]) -> None:
    """Make the pages set in `mask` holes: one `punch(first, npages)` per run of them."""
    edges = np.diff(mask.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    for first, end in zip(
        np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True
    ):
        punch(first, end - first)


def page_ranges(pfns: npt.NDArray[Any], max_pages: int) -> list[tuple[int, int]]:
    """Page numbers as (first, npages) ranges of consecutive pages, each ≤ max_pages.
    (Without np.unique, whose first call costs tens of ms: the fetcher's first request.)"""
    p = np.sort(np.asarray(pfns, dtype=np.int64))
    out: list[tuple[int, int]] = []
    if not len(p):
        return out
    keep = np.ones(len(p), dtype=bool)
    keep[1:] = np.diff(p) != 0
    p = p[keep]
    breaks = (np.flatnonzero(np.diff(p) != 1) + 1).tolist()
    for a, b in zip([0, *breaks], [*breaks, len(p)], strict=True):
        first, n = int(p[a]), b - a
        out += [(first + k, min(max_pages, n - k)) for k in range(0, n, max_pages)]
    return out


@dataclass
class SendOrder:
    """Which pending pages the source sends next: requested ones first, then the background
    walk in page order from the last request on (wrapping around). Pure bookkeeping."""

    pending: list[int]  # ascending page numbers still to send
    # a request's frame: only its pages (0), or a frame of up to this many from its first
    # unsent page (the pages after it ride along)
    reply_pages: int = 0
    background_pages: int = MAX_POSTCOPY_PAGES  # pages per frame of the background walk
    cursor: int = 0  # index into `pending` of the background walk
    requests: deque[tuple[int, int]] = field(default_factory=deque)
    sent: set[int] = field(default_factory=set)

    def request(self, first: int, npages: int) -> None:
        self.requests.append((first, npages))

    @property
    def left(self) -> int:
        return len(self.pending) - len(self.sent)

    def next_range(self) -> tuple[int, int, bool] | None:
        """(first, npages, requested) of the next frame to send, or None when all is sent."""
        while self.requests:
            first, npages = self.requests.popleft()
            # only the requested pages: the destination processes a frame whole before it
            # installs any of it, so a larger frame would delay the fault by its size at the
            # destination's pace; the walk goes on right after them (the guest's likely next
            # faults, for one that moves forward)
            end = first + npages
            if self.reply_pages:
                start = self._first_unsent(first, end)
                end = start + self.reply_pages if start is not None else end
            got = self._run_from(first, end)
            if got is not None:
                self.cursor = bisect.bisect_left(self.pending, got[0] + got[1])
                return (*got, True)
        if self.left == 0:
            return None
        for _ in range(2):  # from the cursor to the end, then from the start
            while self.cursor < len(self.pending):
                p = self.pending[self.cursor]
                if p not in self.sent:
                    got = self._run_from(p, p + self.background_pages)
                    assert got is not None
                    return (*got, False)
                self.cursor += 1
            self.cursor = 0
        return None

    def _first_unsent(self, first: int, end: int) -> int | None:
        """The first unsent pending page in [first, end), or None."""
        i = bisect.bisect_left(self.pending, first)
        while i < len(self.pending) and self.pending[i] < end and self.pending[i] in self.sent:
            i += 1
        if i >= len(self.pending) or self.pending[i] >= end:
            return None
        return self.pending[i]

    def _run_from(self, first: int, end: int) -> tuple[int, int] | None:
        """The first run of consecutive unsent pending pages in [first, end), marked sent."""
        start = self._first_unsent(first, end)
        if start is None:
            return None
        i = bisect.bisect_left(self.pending, start)
        n = 0
        while (
            i < len(self.pending)
            and self.pending[i] == start + n
            and self.pending[i] < end
            and n < MAX_POSTCOPY_PAGES
            and self.pending[i] not in self.sent
        ):
            self.sent.add(self.pending[i])
            i += 1
            n += 1
        return start, n


class PostcopySender:
    """The source's side of post-copy, after the destination acknowledged the switchover."""

    def __init__(
        self,
        ch: transport.Channel,
        conn: Connection,
        view: memoryview,
        pending: npt.NDArray[np.bool_],
        has_data: Callable[[int, int], bool],
        *,
        check: Callable[[], None],
        pace: Callable[[int], float],
    ) -> None:
        self.ch, self.conn, self.view = ch, conn, view
        # Over TLS a request brings a whole frame: the destination's fetcher writes requests
        # while its receiver reads the same TLS connection from another thread, which breaks
        # the connection when requests come often (they do when each brings one page).
        self.order = SendOrder(
            [int(p) for p in np.flatnonzero(pending)],
            reply_pages=MAX_POSTCOPY_PAGES if ch.is_tls else 0,
            background_pages=BACKGROUND_PAGES,
        )
        # whether a range holds data, asked per frame (a scan of all RAM's allocation at
        # the start would delay the first requested pages by as long)
        self.has_data = has_data
        # `pace(n)`: n bytes sent under `max-bandwidth`; the seconds its cap still owes
        # (0: none, or no cap). `pace(0)` asks without sending.
        self.check, self.pace = check, pace
        self.requests = 0  # PageRequest frames received (query-migrate's postcopy-requests)
        self.requested_pages = 0
        self.bytes_sent = 0
        self._lowat = _notsent_lowat(ch.sock)

    def run(self) -> None:
        """Send every pending page, requested ones first; then PostcopyEnd."""
        while True:
            self.check()
            self._take_requests()
            if self.order.left:
                self._wait_for_link()
            nxt = self.order.next_range()
            if nxt is None:
                break
            # the link's cap holds for requested pages too (QEMU's max-postcopy-bandwidth is
            # one limit for both): their bytes delay the background, a request only jumps
            # the queue
            self.pace(self._send(nxt[0], nxt[1]))
        self.bytes_sent += transport.send_event(self.ch, self.conn, PostcopyEnd())

    def _wait_for_link(self) -> None:
        """Before a background frame: until the link's cap allows it and the socket's backlog
        is short, or a request came; a request that arrives meanwhile wakes this at once and
        goes first (`next_range` serves requests before the walk)."""
        sock = self.ch.sock
        while not self.order.requests:
            self.check()
            owed = self.pace(0)
            if owed > 0:
                select.select([sock], [], [], min(owed, PACE_SLICE_S))
            elif self._lowat:
                if select.select([sock], [sock], [], PACE_SLICE_S)[1]:
                    return
            elif self.ch.unacknowledged() <= BACKLOG_BYTES:
                return
            else:
                select.select([sock], [], [], BACKLOG_POLL_S)
            self._take_requests()

    def _send(self, first: int, npages: int) -> int:
        if not self.has_data(first, npages):
            ev = PostcopyPages(first, npages)  # holes: zero pages, no data
        else:
            data = bytes(self.view[first * PAGE_SIZE : (first + npages) * PAGE_SIZE])
            ev = PostcopyPages(first, npages, data)
        n = transport.send_event(self.ch, self.conn, ev)
        self.bytes_sent += n
        return n

    def _take_requests(self) -> None:
        """Every PageRequest already here (never waits)."""
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                data = self.ch.recv_nowait()
                if data is None:
                    return
                if not data:
                    raise transport.TransportError(
                        f"{self.ch.peer} closed the stream during post-copy "
                        f"({self.order.left} pages not sent)"
                    )
                self.conn.receive_data(data)
                continue
            if isinstance(ev, PageRequest):
                self.requests += 1
                self.requested_pages += ev.npages
                self.order.request(ev.first_page, ev.npages)
            elif isinstance(ev, Abort):
                raise PostcopyError(f"destination gave up during post-copy: {ev.reason}")
            else:
                raise PostcopyError(f"unexpected {type(ev).__name__} during post-copy")


def shorten_receive_queue(sock: socket.socket) -> None:
    """The destination's stream during post-copy: a short receive queue, so that a requested
    page waits behind little background data when this side installs slower than the link
    delivers (the source keeps its own queue short: TCP_NOTSENT_LOWAT, BACKLOG_BYTES)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_QUEUE_BYTES)
    except OSError as e:
        log.warning("post-copy: cannot shorten the receive queue: %s", e)


def _notsent_lowat(sock: socket.socket) -> bool:
    """Make a TCP socket writable only while little is queued unsent; False elsewhere (a unix
    socket, a kernel without it): the push then polls the socket's backlog instead."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
    except OSError:
        return False
    return True


def drop_stray_requests(ch: transport.Channel, conn: Connection) -> Any:
    """The next event after post-copy, past any PageRequest that crossed PostcopyEnd."""
    while True:
        ev = transport.recv_event(ch, conn)
        if not isinstance(ev, PageRequest):
            return ev


def await_done(ch: transport.Channel, conn: Connection) -> None:
    """After PostcopyEnd, until the destination confirms that every page is installed.

    The source must not close before: requests that crossed PostcopyEnd sit unread in its
    socket, and closing a socket with unread data makes the kernel reset the connection and
    drop whatever it had not delivered yet, the last pages and PostcopyEnd included. A link
    that breaks first is a link lost during post-copy (TransportError): the destination may
    miss pages, so the source keeps them for a recovery. (The stream's end before
    PostcopyDone, or any other frame, is refused by the protocol: RemoteProtocolError.)"""
    ev = drop_stray_requests(ch, conn)
    if not isinstance(ev, PostcopyDone):
        raise PostcopyError(f"unexpected {type(ev).__name__} at the end of post-copy")


@dataclass
class PostcopyReport:
    """The destination's post-copy, for `x-query-postcopy` and the bench."""

    status: str = "none"  # postcopy-active, completed, postcopy-paused
    pending_pages: int = 0
    error: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    stats: FaultStats | None = None
    latencies_us: npt.NDArray[np.uint32] | None = None
    guest_started_at: float | None = None  # time.monotonic() when the vCPUs started here
    request_path: str | None = None  # who writes the page requests: "native" or "fetcher"

    def to_qmp(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "pending-pages": self.pending_pages}
        if self.guest_started_at is not None:
            out["guest-started-at-s"] = round(self.guest_started_at, 6)
        if self.error:
            out["error-desc"] = self.error
        if self.request_path is not None:
            out["request-path"] = self.request_path
        if self.started_at is not None:
            end = self.ended_at if self.ended_at is not None else time.monotonic()
            out["time-ms"] = round((end - self.started_at) * 1000, 1)
        s = self.stats
        if s is not None:
            out["postcopy-requests"] = s.requests
            out["faults"] = s.faults
            out["zero-served"] = s.zero_served
            out["eexist"] = s.eexist
            out["missing"] = s.missing
            out["postcopy-blocktime"] = s.blocktime_us // 1000  # ms, as QEMU's
        lat = self.latencies_us
        if lat is not None and len(lat):
            out["fault-latency-us"] = {
                "samples": len(lat),
                "p50": float(np.percentile(lat, 50)),
                "p99": float(np.percentile(lat, 99)),
                "max": int(lat.max()),
            }
        return out


class PostcopyReceiver:
    """The destination's side: guest RAM under the fault server from before the guest runs
    (`arm`), then the pages installed as they come (`run`)."""

    def __init__(self, view: memoryview, host_address: int, npages: int) -> None:
        self.view, self.base, self.npages = view, host_address, npages
        self.server: FaultServer | None = None
        self.report = PostcopyReport()
        self._send_lock = threading.Lock()  # the connection is shared with the fetcher
        self._stop = threading.Event()
        self._fetcher: threading.Thread | None = None
        self._fetch_error: BaseException | None = None
        self._discarded: npt.NDArray[np.bool_] | None = None  # given to `open_early`

    def open_early(
        self, discarded: npt.NDArray[np.bool_], allocated: npt.NDArray[np.bool_]
    ) -> None:
        """At PostcopyDiscard, the guest still running on the source: register guest RAM with
        the discarded pages (punched already) missing, so that the registration (1-5 ms for a
        GiB) stays out of the downtime; `arm` then only marks what the last moments dirtied.
        Nothing may touch a discarded page meanwhile (`presence` refuses it at once: no
        fetcher runs before the switchover)."""
        if self.server is not None:
            raise PostcopyError("the fault server is open already")
        self.server = FaultServer(self.base, initial_states(~discarded, allocated & ~discarded))
        self._discarded = discarded

    def arm(
        self,
        start: PostcopyStart,
        allocated: npt.NDArray[np.bool_],
        punch: Callable[[int, int], None],
        discarded: npt.NDArray[np.bool_] | None = None,
    ) -> npt.NDArray[np.bool_]:
        """Make the pending pages missing and register guest RAM; returns the pending pages.
        Before the vCPUs run: a page they touch from now on is either here or fetched.
        `discarded`: pages made missing already (PostcopyDiscard), all of them pending; after
        `open_early` they are the ones it was given, and only the rest is marked and punched."""
        pending = pending_pages(start.pending, self.npages)
        if self.server is not None:
            discarded = self._discarded
        if discarded is not None and (discarded & ~pending).any():
            raise PostcopyError(
                f"PostcopyStart leaves out page {int(np.flatnonzero(discarded & ~pending)[0])}"
                ", which PostcopyDiscard made missing: it would never arrive"
            )
        late = pending if discarded is None else pending & ~discarded
        server = self.server
        if server is None:
            punch_pages(late, punch)
            allocated = allocated & ~pending
            self.server = FaultServer(self.base, initial_states(~pending, allocated))
        else:

            def mark_and_punch(first: int, n: int) -> None:
                server.mark_missing(first, n)  # first: once punched, a hole must be missing
                punch(first, n)

            punch_pages(late, mark_and_punch)
        self.report.status = "postcopy-active"
        self.report.pending_pages = int(pending.sum())
        return pending

    def presence(self, gpa: int, length: int) -> None:
        """`GuestMemory.presence`: the VMM's own access (a QMP query, an exit handler) waits
        for its pages with the GIL released, so it never blocks the fetcher; once the link is
        broken it fails at once instead of waiting for pages that cannot come."""
        server = self.server
        if server is None or length <= 0 or gpa < 0 or gpa + length > self.npages * PAGE_SIZE:
            return  # over, or out of range (the bounds check says why)
        # in slices: a link that breaks meanwhile ends the wait within one slice
        deadline = time.monotonic() + INSTALL_WAIT_S
        while True:
            active = self.report.status == "postcopy-active"
            left = deadline - time.monotonic()
            try:
                if server.ensure(
                    gpa, length, min(PRESENCE_SLICE_S, max(left, 0.0)) if active else 0.0
                ):
                    return
            except FaultServerError:
                if self.server is not None:
                    raise
            if self.server is None:
                return  # finished meanwhile: every page is here
            if not active or left <= 0:
                raise GuestMemoryError(
                    f"guest access [{gpa:#x}, +{length:#x}): a page is still on the source "
                    f"and post-copy is {self.report.status}"
                )

    def start_fetcher(self, ch: transport.Channel, conn: Connection) -> None:
        if self.report.started_at is None:  # a resumed link keeps the post-copy's start
            self.report.started_at = time.monotonic()
        shorten_receive_queue(ch.sock)
        if self._start_native_sender(ch):
            return
        self.report.request_path = "fetcher"
        self._fetcher = threading.Thread(
            target=self._fetch, args=(ch, conn), name="postcopy-fetcher", daemon=True
        )
        self._fetcher.start()

    def _start_native_sender(self, ch: transport.Channel) -> bool:
        """On a plain stream the fault server writes the requests onto it itself, so a remote
        fault's request waits for no Python thread (an encrypted stream needs the fetcher:
        its records are sealed in Python)."""
        server = self.server
        if server is None or ch.is_tls or ch.sealed:
            return False
        try:
            server.start_sender(ch.sock.fileno(), MAX_POSTCOPY_PAGES)
        except FaultServerError as e:
            log.warning("post-copy: the fetcher sends the requests instead: %s", e)
            return False
        self.report.request_path = "native"
        return True

    def _fetch(self, ch: transport.Channel, conn: Connection) -> None:
        """Requests from the fault server → PageRequest frames (the return path)."""
        server = self.server
        assert server is not None
        try:
            while not self._stop.is_set():
                if not select.select([server.request_fd], [], [], REQUEST_POLL_S)[0]:
                    continue
                for first, n in page_ranges(server.take_requests(), MAX_POSTCOPY_PAGES):
                    with self._send_lock:
                        transport.send_event(ch, conn, PageRequest(first, n))
        except BaseException as e:  # the receiver sees the broken stream too; keep the cause
            self._fetch_error = e

    def receive(
        self,
        ch: transport.Channel,
        conn: Connection,
        on_pages: Callable[[int, int, bytes], None],
    ) -> None:
        """Install pages until PostcopyEnd; raises if the stream breaks first."""
        server = self.server
        assert server is not None
        while True:
            ev = self._next(ch, conn)
            if isinstance(ev, PostcopyPages):
                if ev.data:
                    server.install(ev.first_page, ev.data)
                else:
                    server.install(ev.first_page, bytes(ev.npages * PAGE_SIZE))
                on_pages(ev.first_page, ev.npages, ev.data)
            elif isinstance(ev, PostcopyEnd):
                break
            elif isinstance(ev, ConnectionClosed):
                raise transport.TransportError("the source closed the stream during post-copy")
            else:
                raise PostcopyError(f"unexpected {type(ev).__name__} during post-copy")
        if server.missing:
            raise PostcopyError(f"PostcopyEnd with {server.missing} pages still missing")

    def _next(self, ch: transport.Channel, conn: Connection) -> Any:
        while True:
            with self._send_lock:
                ev = conn.next_event()
            if ev is not NEED_DATA:
                return ev
            data = ch.recv_beside_sender(self._send_lock)  # TLS: one thread in it at a time
            with self._send_lock:
                conn.receive_data(data)

    def finish(self) -> None:
        """Every page is here: stop fetching, unregister guest RAM, keep the numbers."""
        self._stop_fetcher()
        self._snapshot()
        server, self.server = self.server, None  # a QMP query in flight sees it gone first
        if server is not None:
            server.close()
        self.report.status = "completed"
        self.report.ended_at = time.monotonic()

    def paused(self, why: str) -> None:
        """The link broke: pages stay missing; the fault server stays (no zero-fill)."""
        self._stop_fetcher()
        self._snapshot()
        self.report.status = "postcopy-paused"
        self.report.error = why
        self.report.ended_at = time.monotonic()

    def _stop_fetcher(self) -> None:
        if self.server is not None:
            self.server.stop_sender()  # before the stream can be closed
        self._stop.set()
        if self._fetcher is not None:
            self._fetcher.join(INSTALL_WAIT_S)
            self._fetcher = None
        self._stop.clear()

    def resumed(
        self, ch: transport.Channel, conn: Connection, awaited: npt.NDArray[np.uint64]
    ) -> None:
        """A resumed link (see `recovery`): ask again for the `awaited` pages (whose requests
        or answers the broken link may have lost), then fetch on as before."""
        for first, n in page_ranges(awaited, MAX_POSTCOPY_PAGES):
            with self._send_lock:
                transport.send_event(ch, conn, PageRequest(first, n))
        self.report.status = "postcopy-active"
        self.report.error = None
        self.report.ended_at = None
        self.start_fetcher(ch, conn)

    def _snapshot(self) -> None:
        if self.server is not None:
            self.report.stats = self.server.stats()
            self.report.latencies_us = self.server.latencies_us()

    def live_report(self) -> dict[str, Any]:
        server = self.server
        if server is not None and self.report.status == "postcopy-active":
            try:
                self.report.stats = server.stats()
            except FaultServerError:
                if self.server is not None:
                    raise  # the fault thread failed (closed meanwhile: `finish` kept the numbers)
        return self.report.to_qmp()
