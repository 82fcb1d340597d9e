"""The post-copy fault server on a plain memfd mapping (no KVM needed): faults on missing pages
become requests, installs wake the faulting thread, known zero pages and present pages are
served without the fetcher, and the server never needs the GIL."""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptmig.layout import PAGE_SIZE
from ptmig.migration.uffd import (
    FaultServer,
    FaultServerError,
    PageState,
    initial_states,
)

WAIT_S = 30.0  # generous: a loaded 2-core host may take a while to schedule the threads


def _uffd_unavailable() -> str | None:
    mm = mmap.mmap(-1, PAGE_SIZE)
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    try:
        FaultServer(base, np.zeros(1, dtype=np.uint8)).close()
    except FaultServerError as e:
        return str(e)
    return None


_WHY = _uffd_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"userfaultfd unavailable: {_WHY}")


def pattern(pfn: int) -> bytes:
    return bytes([pfn % 251 + 1]) * PAGE_SIZE


class Ram:
    """A memfd of `npages` mapped shared, as guest RAM is."""

    def __init__(self, npages: int) -> None:
        self.fd = os.memfd_create("uffd-test", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, npages * PAGE_SIZE)
        self.mm = mmap.mmap(self.fd, npages * PAGE_SIZE, mmap.MAP_SHARED)
        self.base = np.frombuffer(self.mm, dtype=np.uint8).ctypes.data

    def put(self, pfn: int) -> None:
        os.pwrite(self.fd, pattern(pfn), pfn * PAGE_SIZE)

    def punch(self, pfn: int, npages: int) -> None:
        """Make pages holes, as the destination punches the pages post-copy will fetch."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        punch_hole_keep_size = 0x02 | 0x01
        if libc.fallocate(self.fd, punch_hole_keep_size, pfn * PAGE_SIZE, npages * PAGE_SIZE):
            raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)")

    def read_released(self, pfn: int) -> bytes:
        """Read one page through the mapping with the GIL released (as KVM_RUN runs)."""
        buf = ctypes.create_string_buffer(PAGE_SIZE)
        ctypes.memmove(buf, self.base + pfn * PAGE_SIZE, PAGE_SIZE)
        return buf.raw


@contextmanager
def fetcher(server: FaultServer, seen: list[int]) -> Iterator[None]:
    """Stands in for the source: serves every request with the page's pattern."""
    stop = threading.Event()

    def run() -> None:
        poller = select.poll()
        poller.register(server.request_fd, select.POLLIN)
        while not stop.is_set():
            if not poller.poll(50):
                continue
            for pfn in server.take_requests():
                seen.append(int(pfn))
                server.install(int(pfn), pattern(int(pfn)))

    t = threading.Thread(target=run, name="test-fetcher")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(WAIT_S)


def test_a_fault_on_a_missing_page_is_requested_once_and_installed() -> None:
    ram = Ram(8)
    states = np.full(8, PageState.MISSING, dtype=np.uint8)
    with FaultServer(ram.base, states) as server:
        got: list[bytes] = []
        readers = [
            threading.Thread(target=lambda: got.append(ram.read_released(5))) for _ in range(2)
        ]
        for r in readers:
            r.start()
        assert select.select([server.request_fd], [], [], WAIT_S)[0], "no request came"
        requested = list(server.take_requests())
        # both readers wait on the page; it is asked for once
        assert requested == [5]
        assert all(r.is_alive() for r in readers)
        server.install(5, pattern(5))
        for r in readers:
            r.join(WAIT_S)
        assert got == [pattern(5), pattern(5)]
        stats = server.stats()
        assert stats.requests == 1
        assert stats.samples == 1 and len(server.latencies_us()) == 1
        assert stats.missing == 7
        assert server.states()[5] == PageState.PRESENT


def test_vmm_wait_present_fetches_what_is_missing_and_times_out_without_a_fetcher() -> None:
    ram = Ram(16)
    ram.put(3)
    present = np.zeros(16, dtype=bool)
    present[3] = True
    received = present.copy()
    received[4] = True  # sent as a zero page: a hole on this side
    with FaultServer(ram.base, initial_states(received, present)) as server:
        assert not server.wait_present(6, 2, timeout_s=0.2)  # nobody fetches
        seen: list[int] = []
        with fetcher(server, seen):
            assert server.ensure(3 * PAGE_SIZE + 100, 4 * PAGE_SIZE, timeout_s=WAIT_S)
        # page 3 was here, page 4 is a known zero page, 5..7 came from the "source"
        assert sorted(seen) == [5, 6, 7]
        assert ram.mm[3 * PAGE_SIZE : 8 * PAGE_SIZE] == (
            pattern(3) + bytes(PAGE_SIZE) + pattern(5) + pattern(6) + pattern(7)
        )
        assert server.stats().zero_served == 1
        with pytest.raises(ValueError, match=r"pages \[15, 17\) are outside guest RAM"):
            server.wait_present(15, 2, 1.0)


def test_an_install_never_overwrites_a_present_page() -> None:
    ram = Ram(4)
    ram.put(1)
    states = np.array([0, PageState.PRESENT, 0, 0], dtype=np.uint8)
    with FaultServer(ram.base, states) as server:
        server.install(0, bytes([9]) * (3 * PAGE_SIZE))  # pages 0-2, page 1 already here
        assert ram.mm[:PAGE_SIZE] == bytes([9]) * PAGE_SIZE
        assert ram.mm[PAGE_SIZE : 2 * PAGE_SIZE] == pattern(1)
        assert ram.mm[2 * PAGE_SIZE : 3 * PAGE_SIZE] == bytes([9]) * PAGE_SIZE
        stats = server.stats()
        assert stats.eexist == 1 and stats.missing == 1
        server.install(3, pattern(3))
        assert server.missing == 0
        with pytest.raises(ValueError, match="not whole pages"):
            server.install(3, b"x")
    with pytest.raises(ValueError, match="MISSING, ZERO or PRESENT"):
        FaultServer(ram.base, np.array([PageState.REQUESTED], dtype=np.uint8))


def test_the_fault_thread_serves_zero_pages_while_python_holds_the_gil() -> None:
    """mmap slicing holds the GIL while it touches the page: a fault server that needed
    Python would hang this child (bounded by the subprocess timeout)."""
    child = textwrap.dedent(
        """
        import mmap, os, sys
        import numpy as np
        from ptmig.migration.uffd import FaultServer, PageState
        fd = os.memfd_create("gil", 0)
        os.ftruncate(fd, 4 * 4096)
        mm = mmap.mmap(fd, 4 * 4096, mmap.MAP_SHARED)
        os.pwrite(fd, b"\\x07" * 4096, 0)
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        states = np.array([PageState.PRESENT] + [PageState.ZERO] * 3, dtype=np.uint8)
        with FaultServer(base, states) as s:
            data = mm[:]  # GIL held across all four pages
            # (the faulting read may resume before the thread has counted the page)
            assert s.wait_present(0, 4, timeout_s=60)
            st = s.stats()
        ok = data == b"\\x07" * 4096 + bytes(3 * 4096)
        print(ok, st.zero_served, st.requests, st.missing)
        """
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "3", "0", "0"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from([PageState.MISSING, PageState.ZERO, PageState.PRESENT]),
        min_size=1,
        max_size=24,
    ),
    st.randoms(use_true_random=False),
)
def test_every_page_reads_right_whatever_its_state_and_the_order(
    kinds: list[PageState], rnd: object
) -> None:
    npages = len(kinds)
    ram = Ram(npages)
    for pfn, kind in enumerate(kinds):
        if kind is PageState.PRESENT:
            ram.put(pfn)
    order = list(range(npages))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    seen: list[int] = []
    with FaultServer(ram.base, np.array(kinds, dtype=np.uint8)) as server:
        with fetcher(server, seen):
            for pfn in order:
                want = bytes(PAGE_SIZE) if kinds[pfn] is PageState.ZERO else pattern(pfn)
                assert ram.read_released(pfn) == want
        # (the fetcher has returned from its last install: the counters are final)
        assert sorted(seen) == [p for p, k in enumerate(kinds) if k is PageState.MISSING]
        assert server.missing == 0


def test_a_postcopy_session_over_a_socket_serves_every_page_once_while_readers_fault() -> None:
    """Source and destination engines back to back over a socketpair (no KVM): reader threads
    touch the destination's pages in random order while the source pushes the rest; every
    page reads what the source had, and every pending page crosses once."""
    import socket

    from ptmig.memory import GuestMemory
    from ptmig.migration import Complete, Connection, HelloAck, Role, SwitchoverAck, hello
    from ptmig.migration.events import DeviceStates, PostcopyStart, VcpuStates
    from ptmig.migration.postcopy import PostcopyReceiver, PostcopySender, pending_bytes
    from ptmig.migration.transport import Channel

    npages = 256
    src = np.zeros(npages * PAGE_SIZE, dtype=np.uint8)
    allocated = np.ones(npages, dtype=bool)
    for p in range(npages):
        if p % 7 == 3:
            allocated[p] = False  # a hole on the source: travels as a zero page
        else:
            src[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = p % 251 + 1
    pending = np.zeros(npages, dtype=bool)
    pending[16:] = True
    dst = GuestMemory(npages * PAGE_SIZE)
    for p in range(16):  # what pre-copy delivered
        dst.write(p * PAGE_SIZE, bytes(src[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]))

    s_conn = Connection(Role.SOURCE, guest_pages=npages)
    d_conn = Connection(Role.DESTINATION, guest_pages=npages)

    def deliver(frm: Connection, to: Connection, ev: object) -> object:
        to.receive_data(frm.send(ev))  # type: ignore[arg-type]
        return to.next_event()

    deliver(s_conn, d_conn, hello({"m": 1}))
    deliver(d_conn, s_conn, HelloAck(True, ""))
    deliver(s_conn, d_conn, VcpuStates(b"v"))
    deliver(s_conn, d_conn, DeviceStates(b"d"))
    bits = np.packbits(pending, bitorder="little")
    words = np.zeros(-(-npages // 64), dtype=np.uint64)
    words.view(np.uint8)[: len(bits)] = bits
    start = deliver(s_conn, d_conn, PostcopyStart(pending_bytes(words)))
    assert isinstance(start, PostcopyStart)
    receiver = PostcopyReceiver(dst.view, dst.host_address, npages)
    receiver.arm(start, dst.allocated(), dst.punch_zero)
    deliver(s_conn, d_conn, Complete())
    deliver(d_conn, s_conn, SwitchoverAck(True, ""))

    a, b = socket.socketpair()
    s_ch, d_ch = Channel(a, WAIT_S, "dst"), Channel(b, WAIT_S, "src")
    sender = PostcopySender(
        s_ch,
        s_conn,
        src.data,
        pending,
        lambda first, n: bool(allocated[first : first + n].any()),
        check=lambda: None,
        pace=lambda n: 0.0,
    )
    sent = threading.Thread(target=sender.run, name="test-sender")
    rng = np.random.default_rng(5)
    got: dict[int, bytes] = {}
    order = rng.permutation(npages)

    def read() -> None:
        buf = ctypes.create_string_buffer(PAGE_SIZE)
        for p in order:
            ctypes.memmove(buf, dst.host_address + int(p) * PAGE_SIZE, PAGE_SIZE)
            got[int(p)] = buf.raw

    reader = threading.Thread(target=read, name="test-reader")
    receiver.start_fetcher(d_ch, d_conn)
    reader.start()
    # the source starts once the reader waits on a page: its request is then queued first
    deadline = time.monotonic() + WAIT_S
    while receiver.server is not None and receiver.server.stats().requests == 0:
        assert time.monotonic() < deadline, "the reader never faulted"
        time.sleep(0.005)
    sent.start()
    dst.presence = receiver.presence
    vmm_read: list[bytes] = []  # the VMM's own access (a QMP query), GIL held around it
    vmm = threading.Thread(target=lambda: vmm_read.append(dst.read(200 * PAGE_SIZE, 8)))
    vmm.start()
    receiver.receive(d_ch, d_conn, lambda first, n, data: None)
    vmm.join(WAIT_S)
    assert vmm_read == [bytes([200 % 251 + 1]) * 8]
    reader.join(WAIT_S)
    sent.join(WAIT_S)
    dst.presence = None
    receiver.finish()
    for p in range(npages):
        assert got[p] == bytes(src[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]), p
    assert sender.order.left == 0
    assert sender.requests > 0  # the reader's first page was asked for
    report = receiver.report.to_qmp()
    assert report["status"] == "completed" and report["missing"] == 0 and report["eexist"] == 0
    data_pages = int((pending & allocated).sum())
    # each pending page at most once (a hole inside a run of data pages travels as data):
    # payload plus at most one 24-byte header per frame
    assert data_pages * PAGE_SIZE <= sender.bytes_sent
    assert sender.bytes_sent <= int(pending.sum()) * PAGE_SIZE + 24 * npages
    a.close()
    b.close()
    dst.close()


def test_queries_racing_close_get_the_numbers_or_a_closed_server() -> None:
    """A QMP thread asking for the counters while the receiver closes the server (the end of
    post-copy) never reads a freed server: it gets the numbers, or 'closed'."""
    ram = Ram(64)
    for _ in range(30):
        server = FaultServer(ram.base, np.full(64, PageState.PRESENT, dtype=np.uint8))
        errors: list[str] = []
        started = threading.Event()

        def query(
            s: FaultServer = server, out: list[str] = errors, up: threading.Event = started
        ) -> None:
            while True:
                try:
                    assert s.stats().missing == 0
                    s.states()
                    s.latencies_us()
                except FaultServerError as e:
                    out.append(str(e))
                    return
                finally:
                    up.set()

        t = threading.Thread(target=query)
        t.start()
        assert started.wait(WAIT_S)
        server.close()
        t.join(WAIT_S)
        assert errors == ["the fault server is closed"]


def test_marking_pages_missing_takes_present_and_zero_pages_back_and_leaves_requested_ones() -> (
    None
):
    """A server opened before the source's last dirty pages were known: those pages become
    missing (counted), a page asked for already stays asked for, and once punched a marked
    page is fetched again rather than read as its old data."""
    ram = Ram(8)
    ram.put(0)
    ram.put(3)
    states = np.array([PageState.PRESENT, PageState.ZERO, PageState.MISSING, PageState.PRESENT])
    states = np.concatenate([states, np.full(4, PageState.PRESENT)]).astype(np.uint8)
    with FaultServer(ram.base, states) as server:
        assert not server.wait_present(2, 1, timeout_s=0.0)  # page 2: requested, nobody serves
        assert server.take_requests().tolist() == [2]
        assert server.stats().missing == 1
        assert server.mark_missing(0, 4) == 3  # 0 (present), 1 (zero), 3 (present)
        assert list(server.states()[:4]) == [
            PageState.MISSING,
            PageState.MISSING,
            PageState.REQUESTED,
            PageState.MISSING,
        ]
        assert server.stats().missing == 4
        assert server.mark_missing(0, 4) == 0  # twice is once
        ram.punch(0, 4)
        fresh = bytes([0xEE]) * PAGE_SIZE
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(ram.read_released(3)))
        reader.start()
        assert select.select([server.request_fd], [], [], WAIT_S)[0], "page 3 was not asked for"
        assert server.take_requests().tolist() == [3]  # page 2 is not asked for twice
        server.install(3, fresh)  # the source's newer copy, not the one it replaced
        reader.join(WAIT_S)
        assert got == [fresh]
        with pytest.raises(ValueError, match=r"pages \[6, 9\) are outside guest RAM"):
            server.mark_missing(6, 3)


def test_a_server_opened_at_the_discard_fetches_what_the_last_moments_dirtied() -> None:
    """The destination opens its fault server at PostcopyDiscard (out of the downtime): a VMM
    access to a discarded page is refused at once until the switchover (no zero page read);
    arming then makes the pages dirtied since missing too, and every pending page reads the
    source's data; a discarded page the final bitmap leaves out is still refused."""
    from ptmig.memory import GuestMemory, GuestMemoryError
    from ptmig.migration.events import PostcopyStart
    from ptmig.migration.postcopy import (
        PostcopyError,
        PostcopyReceiver,
        pending_bytes,
        punch_pages,
    )

    npages = 64
    dst = GuestMemory(npages * PAGE_SIZE)
    for p in range(npages):  # what pre-copy delivered
        dst.write(p * PAGE_SIZE, b"old" + bytes(PAGE_SIZE - 3))
    discarded = np.zeros(npages, dtype=bool)
    discarded[10:20] = True
    pending = discarded.copy()
    pending[[30, 31, 40]] = True  # dirtied after the discard, before the vCPUs stopped

    def start_of(mask: np.ndarray) -> PostcopyStart:
        words = np.zeros(-(-npages // 64), dtype=np.uint64)
        bits = np.packbits(mask, bitorder="little")
        words.view(np.uint8)[: len(bits)] = bits
        return PostcopyStart(pending_bytes(words))

    refused = PostcopyReceiver(dst.view, dst.host_address, npages)
    refused.open_early(discarded, dst.allocated())
    with pytest.raises(PostcopyError, match="leaves out page 19, which PostcopyDiscard"):
        refused.arm(start_of(discarded & (np.arange(npages) < 19)), dst.allocated(), dst.punch_zero)
    refused.finish()

    punch_pages(discarded, dst.punch_zero)
    receiver = PostcopyReceiver(dst.view, dst.host_address, npages)
    receiver.open_early(discarded, dst.allocated())
    server = receiver.server
    assert server is not None and server.stats().missing == 10
    dst.presence = receiver.presence
    with pytest.raises(GuestMemoryError, match="still on the source and post-copy is none"):
        dst.read(12 * PAGE_SIZE, 8)
    assert dst.read(30 * PAGE_SIZE, 3) == b"old"  # not dirtied yet: here
    receiver.arm(start_of(pending), dst.allocated(), dst.punch_zero)
    assert receiver.report.pending_pages == 13
    assert server.stats().missing == 13
    assert sorted(np.flatnonzero(server.states() < PageState.ZERO).tolist()) == sorted(
        np.flatnonzero(pending).tolist()
    )
    seen: list[int] = []
    with fetcher(server, seen):
        for p in np.flatnonzero(pending).tolist():
            assert dst.read(p * PAGE_SIZE, PAGE_SIZE) == pattern(p), p
    assert 30 in seen and 40 in seen and 12 in seen  # fetched, not the old copy
    assert dst.read(29 * PAGE_SIZE, 3) == b"old"
    dst.presence = None
    receiver.finish()
    dst.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(WAIT_S)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"the stream ended after {len(out)} of {n} bytes"
        out += chunk
    return out


def test_the_native_sender_writes_a_faults_request_as_the_frame_python_would() -> None:
    """On a plain stream the fault server writes the requests itself: a vCPU-like reader's
    fault arrives as the PageRequest frame `frames.encode_event` writes (same CRC), and a
    range asked for at once goes out in consecutive runs of at most the frame limit, while
    the GIL is held by this thread the whole time (no fetcher, no Python on the way)."""
    from ptmig.migration import frames
    from ptmig.migration.events import PageRequest

    ram = Ram(256)
    ours, peer = socket.socketpair()
    ours.setblocking(False)  # as a Python socket with a timeout is
    with FaultServer(ram.base, np.full(256, PageState.MISSING, dtype=np.uint8)) as server:
        server.start_sender(ours.fileno(), 64)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(ram.read_released(200)), daemon=True)
        reader.start()
        assert _recv_exactly(peer, 24) == frames.encode_event(PageRequest(200, 1))
        server.install(200, pattern(200))
        reader.join(WAIT_S)
        assert got == [pattern(200)]
        assert not server.wait_present(10, 100, timeout_s=0.0)  # queued at once
        want = frames.encode_event(PageRequest(10, 64)) + frames.encode_event(PageRequest(74, 36))
        assert _recv_exactly(peer, len(want)) == want
        assert server.sender_state() == (3, None)
        server.stop_sender()
        # stopped: requests queue for a fetcher again
        assert not server.wait_present(250, 1, timeout_s=0.0)
        assert select.select([server.request_fd], [], [], WAIT_S)[0]
        assert server.take_requests().tolist() == [250]
    ours.close()
    peer.close()


def test_a_broken_return_path_stops_the_native_sender_and_keeps_the_pages_requested() -> None:
    """The source's end closes: the sender's write fails, it stops and says why, the page it
    was asking for stays REQUESTED (a resumed link asks for those again), and a sender started
    on a new stream sends what is asked from then on."""
    from ptmig.migration import frames
    from ptmig.migration.events import PageRequest

    ram = Ram(16)
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.close()
    with FaultServer(ram.base, np.full(16, PageState.MISSING, dtype=np.uint8)) as server:
        server.start_sender(ours.fileno(), 64)
        assert not server.wait_present(7, 1, timeout_s=0.0)
        deadline = time.monotonic() + WAIT_S
        while (why := server.sender_state()[1]) is None:
            assert time.monotonic() < deadline, "the sender never noticed the closed stream"
            time.sleep(0.005)
        assert why in (os.strerror(32), os.strerror(104))  # EPIPE, ECONNRESET
        assert server.states()[7] == PageState.REQUESTED
        with pytest.raises(FaultServerError, match="starting the request sender on fd -1"):
            server.start_sender(-1, 64)
        server.stop_sender()
        ours.close()
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        server.start_sender(ours.fileno(), 64)
        assert server.sender_state()[1] is None
        assert not server.wait_present(9, 1, timeout_s=0.0)
        assert _recv_exactly(peer, 24) == frames.encode_event(PageRequest(9, 1))
    ours.close()
    peer.close()


def test_the_native_sender_writes_on_its_own_descriptor_not_on_a_reused_number() -> None:
    """A caller that closes its socket before stopping the sender (an unexpected error path)
    must not have request frames written into whatever opens next under the same number:
    the sender writes on its own duplicate, which still reaches the source."""
    from ptmig.migration import frames
    from ptmig.migration.events import PageRequest

    ram = Ram(16)
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    number = ours.fileno()
    with FaultServer(ram.base, np.full(16, PageState.MISSING, dtype=np.uint8)) as server:
        server.start_sender(number, 64)
        ours.close()
        other, other_peer = socket.socketpair()  # likely under the freed number
        try:
            assert not server.wait_present(4, 1, timeout_s=0.0)
            # it reaches the source although the caller's descriptor is closed
            assert _recv_exactly(peer, 24) == frames.encode_event(PageRequest(4, 1))
            assert not select.select([other_peer], [], [], 0)[0], "a frame went elsewhere"
        finally:
            server.stop_sender()
            other.close()
            other_peer.close()
    peer.close()
