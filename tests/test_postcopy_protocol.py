"""Post-copy on the wire and in the source's send order: pure, no sockets, no KVM."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptmig.migration import (
    NEED_DATA,
    Complete,
    Connection,
    DeviceStates,
    HelloAck,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    RoundEnd,
    RoundStart,
    State,
    SwitchoverAck,
    VcpuStates,
    frames,
    hello,
    transport,
)
from ptmig.migration.events import (
    PageRequest,
    PostcopyDone,
    PostcopyEnd,
    PostcopyPages,
    PostcopyStart,
)
from ptmig.migration.postcopy import (
    BACKGROUND_PAGES,
    PostcopySender,
    SendOrder,
    page_ranges,
    pending_bytes,
    pending_pages,
    shorten_receive_queue,
)

PAGES = 128
PS = 4096


def deliver(frm: Connection, to: Connection, event: object) -> object:
    to.receive_data(frm.send(event))  # type: ignore[arg-type]
    ev = to.next_event()
    assert ev is not NEED_DATA
    return ev


def postcopy_pair(
    holes: tuple[tuple[int, int], ...] = (), pages: int = PAGES
) -> tuple[Connection, Connection]:
    """Two connections walked to the post-copy state."""
    s = Connection(Role.SOURCE, guest_pages=pages, ram_holes=holes)
    d = Connection(Role.DESTINATION, guest_pages=pages, ram_holes=holes)
    deliver(s, d, hello({"m": 1}))
    deliver(d, s, HelloAck(True, ""))
    deliver(s, d, RoundStart(0, 0))
    deliver(s, d, RoundEnd(0))
    deliver(s, d, VcpuStates(b"v"))
    deliver(s, d, DeviceStates(b"d"))
    pending = np.zeros((pages + 63) // 64, dtype=np.uint64)
    pending[0] = 0b1011
    got = deliver(s, d, PostcopyStart(pending_bytes(pending)))
    assert isinstance(got, PostcopyStart)
    assert np.flatnonzero(pending_pages(got.pending, pages)).tolist() == [0, 1, 3]
    assert s.state is State.POSTCOPY_ARMED
    deliver(s, d, Complete())
    deliver(d, s, SwitchoverAck(True, ""))
    assert s.state is d.state is State.POSTCOPY
    return s, d


def test_a_postcopy_conversation_both_ways_then_the_end() -> None:
    s, d = postcopy_pair()
    assert deliver(d, s, PageRequest(3, 1)) == PageRequest(3, 1)
    page = bytes([7]) * PS
    assert deliver(s, d, PostcopyPages(3, 1, page)) == PostcopyPages(3, 1, page)
    assert deliver(s, d, PostcopyPages(0, 2)) == PostcopyPages(0, 2)  # zero pages
    deliver(s, d, PostcopyEnd())
    assert s.state is d.state is State.POSTCOPY_ENDED
    # a request that crossed PostcopyEnd is allowed (and ignored by the source)
    assert deliver(d, s, PageRequest(1, 1)) == PageRequest(1, 1)
    assert deliver(d, s, PostcopyDone()) == PostcopyDone()
    assert s.state is d.state is State.SWITCHED_OVER


def test_the_source_may_close_only_after_the_destination_confirmed_the_end() -> None:
    """Until PostcopyDone the source must read on: the end of the stream there is an error
    on both sides, and only the destination confirms."""
    s, d = postcopy_pair()
    deliver(s, d, PostcopyEnd())
    with pytest.raises(LocalProtocolError, match="may not send PostcopyDone"):
        s.send(PostcopyDone())
    s.receive_data(b"")  # the destination went away before confirming
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    s2, d2 = postcopy_pair()
    with pytest.raises(LocalProtocolError):
        d2.send(PostcopyDone())  # not before PostcopyEnd
    deliver(s2, d2, PostcopyEnd())
    deliver(d2, s2, PostcopyDone())
    s2.receive_data(b"")
    assert s2.next_event() is not NEED_DATA  # the peer's end is fine now


def test_postcopy_frames_out_of_place_or_out_of_range_are_refused() -> None:
    s, d = postcopy_pair(holes=((100, 10),))
    with pytest.raises(LocalProtocolError, match="may not send PageRequest"):
        s.send(PageRequest(0, 1))  # the source does not ask
    with pytest.raises(LocalProtocolError, match=r"pages \[127, 129\) outside 128 pages"):
        s.send(PostcopyPages(127, 2, bytes(2 * PS)))
    # a hostile source: pages in the MMIO hole
    raw = frames.encode_event(PostcopyPages(105, 1, bytes(PS)))
    d.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match="touches a hole of guest RAM"):
        d.next_event()


@pytest.mark.parametrize(
    ("meta", "error"),
    [
        ((3).to_bytes(8, "little") + (0).to_bytes(4, "little"), "0 pages, allowed 1..64"),
        ((3).to_bytes(8, "little") + (65).to_bytes(4, "little"), "65 pages, allowed 1..64"),
        ((3).to_bytes(8, "little") + (2).to_bytes(4, "little") + b"x" * 100, "100 bytes for 2"),
    ],
)
def test_a_hostile_postcopy_pages_frame_is_refused(meta: bytes, error: str) -> None:
    with pytest.raises(RemoteProtocolError, match=error):
        frames.decode_event(frames.FrameType.POSTCOPY_PAGES, meta)


def test_a_pending_bitmap_of_the_wrong_size_is_refused() -> None:
    s = Connection(Role.SOURCE, guest_pages=PAGES)
    d = Connection(Role.DESTINATION, guest_pages=PAGES)
    deliver(s, d, hello({"m": 1}))
    deliver(d, s, HelloAck(True, ""))
    deliver(s, d, VcpuStates(b"v"))
    deliver(s, d, DeviceStates(b"d"))
    d.receive_data(frames.encode_event(PostcopyStart(bytes(8))))
    with pytest.raises(RemoteProtocolError, match="bitmap of 8 bytes for 128 pages"):
        d.next_event()
    with pytest.raises(RemoteProtocolError, match="not whole uint64 words"):
        frames.decode_event(frames.FrameType.POSTCOPY_START, bytes(12))


def test_page_ranges_merge_consecutive_pages_up_to_the_limit() -> None:
    pfns = np.array([9, 1, 2, 3, 7, 8], dtype=np.uint64)
    assert page_ranges(pfns, 2) == [(1, 2), (3, 1), (7, 2), (9, 1)]
    assert page_ranges(pfns, 64) == [(1, 3), (7, 3)]


@given(
    st.sets(st.integers(min_value=0, max_value=511), min_size=1, max_size=200),
    st.lists(st.tuples(st.integers(0, 511), st.integers(1, 64)), max_size=20),
    st.integers(min_value=0, max_value=40),
)
def test_send_order_sends_every_pending_page_once_and_requests_first(
    pending: set[int], requests: list[tuple[int, int]], ask_after: int
) -> None:
    order = SendOrder(sorted(pending))
    sent: list[int] = []
    frames_sent = 0
    while (nxt := order.next_range()) is not None:
        first, n, requested = nxt
        assert 1 <= n <= 64
        run = list(range(first, first + n))
        assert all(p in pending for p in run)
        if requested:
            # a requested frame carries only pages of a request that had not gone yet
            assert any(r[0] <= first and first + n <= r[0] + r[1] for r in requests)
        sent += run
        frames_sent += 1
        if frames_sent == ask_after:
            for r in requests:
                order.request(*r)
            # the next frame serves the first request that still has unsent pages
            still = [
                r for r in requests if any(p in pending and p not in sent for p in range(*_span(r)))
            ]
            nxt2 = order.next_range()
            if still:
                assert nxt2 is not None and nxt2[2]
                assert still[0][0] <= nxt2[0] < still[0][0] + still[0][1]
            if nxt2 is not None:
                sent += list(range(nxt2[0], nxt2[0] + nxt2[1]))
    assert sorted(sent) == sorted(pending)  # each once, none missing
    assert order.left == 0


def _span(r: tuple[int, int]) -> tuple[int, int]:
    return r[0], r[0] + r[1]


def test_a_postcopy_start_the_hello_did_not_offer_is_refused() -> None:
    """A source (with the key) that switches to post-copy without offering it in its Hello:
    the destination refuses before anything is armed, says why, and waits on."""
    import json

    from test_migration_incoming_hostile import (
        TO_DEVICE_STATES,
        Destination,
        FakeMachine,
        abort_reason,
        blk_state,
    )

    d = Destination(FakeMachine())
    try:
        entry = {"id": "d0", "kind": "disk", "source": "device", "state": blk_state()}
        body = json.dumps({"version": 1, "devices": [entry]}).encode()
        stream = (
            frames.MAGIC
            + TO_DEVICE_STATES
            + frames.encode_event(DeviceStates(body))
            + frames.encode_event(PostcopyStart(bytes(8)))
        )
        replies = d.attempt(stream)
        assert "did not offer postcopy-ram" in abort_reason(replies)
        assert "did not offer postcopy-ram" in d.incoming.rejected[-1]
        assert d.incoming.postcopy is None
    finally:
        d.stop()


class _Stopped(Exception):
    pass


class RunningSender:
    """A source's PostcopySender in a thread over a socketpair, with `d_ch`/`d` the
    destination's end; `stop()` ends it and returns what it raised (None: stopped)."""

    def __init__(self, pace: Callable[[int], float], tcp: bool = False, pages: int = PAGES) -> None:
        s, self.d = postcopy_pair(pages=pages)
        self.a, self.b = tcp_pair() if tcp else socket.socketpair()
        s_ch = transport.Channel(self.a, 30, "dst")
        self.d_ch = transport.Channel(self.b, 30, "src")
        self.ram = (np.arange(pages * PS) % 251).astype(np.uint8)
        self._stop = threading.Event()
        self.raised: BaseException | None = None
        self.sender = PostcopySender(
            s_ch,
            s,
            self.ram.data,
            np.ones(pages, dtype=bool),
            lambda f, n: True,
            check=self._check,
            pace=pace,
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _check(self) -> None:
        if self._stop.is_set():
            raise _Stopped

    def _run(self) -> None:
        try:
            self.sender.run()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.raised = e

    def stop(self) -> BaseException | None:
        """Stop the sender: the destination's end is drained meanwhile, so a send blocked on
        a full stream completes and the sender reaches its stop check."""
        self._stop.set()
        self.b.settimeout(0.05)
        deadline = time.monotonic() + 30
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:
                self.b.recv(1 << 16)
            except OSError:  # (a timeout: nothing queued)
                pass
        self.thread.join(1)
        assert not self.thread.is_alive()
        self.a.close()
        self.b.close()
        return self.raised


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over loopback (the sender's TCP_NOTSENT_LOWAT path)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def owing_after_one_frame(sent: list[int]) -> Callable[[int], float]:
    """A `max-bandwidth` pace that lets one frame go and then owes for ever (`sent`: the
    byte counts it was given)."""

    def pace(nbytes: int) -> float:
        sent.extend([nbytes] if nbytes else [])
        return 1e6 if sent else 0.0

    return pace


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_a_request_during_the_links_pacing_wait_goes_out_at_once(tcp: bool) -> None:
    """The background push waits for `max-bandwidth`'s cap (here it owes for ever after the
    first frame); a PageRequest that arrives meanwhile wakes the sender and its pages go out
    at once: the cap delays the background, a request jumps it."""
    sent: list[int] = []
    run = RunningSender(owing_after_one_frame(sent), tcp)
    try:
        first = transport.recv_event(run.d_ch, run.d)
        assert isinstance(first, PostcopyPages)
        assert (first.first_page, first.npages) == (0, BACKGROUND_PAGES)
        run.d_ch.sendall(run.d.send(PageRequest(100, 1)))
        reply = transport.recv_event(run.d_ch, run.d)
        assert isinstance(reply, PostcopyPages)
        # the requested page alone: nothing it does not need is ahead of its install
        assert (reply.first_page, reply.npages) == (100, 1)
        assert reply.data == run.ram[100 * PS : 101 * PS].tobytes()
    finally:
        raised = run.stop()
    assert raised is None
    assert run.sender.requests == 1 and len(sent) == 2  # the request's bytes count too


@pytest.mark.parametrize(
    ("request_meta", "error"),
    [
        ((500).to_bytes(8, "little") + (1).to_bytes(4, "little"), r"pages \[500, 501\) outside"),
        ((3).to_bytes(8, "little") + (65).to_bytes(4, "little"), "65 pages, allowed 1..64"),
    ],
)
def test_a_malformed_page_request_ends_the_sender_with_the_reason(
    request_meta: bytes, error: str
) -> None:
    """A destination that asks for pages outside guest RAM, or too many at once: the source's
    sender stops with an error that says what was wrong (the source then keeps its pages
    and pauses, as for a broken link); it never sends past guest RAM."""
    run = RunningSender(owing_after_one_frame([]))
    try:
        transport.recv_event(run.d_ch, run.d)
        run.d_ch.sendall(frames.encode_frame(frames.FrameType.PAGE_REQUEST, request_meta))
        deadline = time.monotonic() + 30
        while run.thread.is_alive():
            assert time.monotonic() < deadline, "the sender took the malformed request"
            time.sleep(0.005)
    finally:
        raised = run.stop()
    assert isinstance(raised, RemoteProtocolError)
    assert re.search(error, str(raised)), raised


def test_on_tcp_the_push_waits_for_the_peers_window_and_a_request_still_goes_first() -> None:
    """No cap, on TCP (the sender's TCP_NOTSENT_LOWAT wait): the background push stops while
    the destination reads nothing, and a request sent meanwhile is answered, with its page
    alone, as soon as the destination has read what was queued before it."""
    run = RunningSender(lambda n: 0.0, tcp=True)
    try:
        run.b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        deadline = time.monotonic() + 30
        # the push stalls: what it sent stops growing while nobody reads
        last, still = -1, 0
        while still < 20:
            assert time.monotonic() < deadline, "the push never waited for the reader"
            now = run.sender.bytes_sent
            still = still + 1 if now == last else 0
            last = now
            time.sleep(0.01)
        assert run.sender.order.left > 0  # it stopped before the end, not because it was done
        run.d_ch.sendall(run.d.send(PageRequest(127, 1)))
        while True:
            ev = transport.recv_event(run.d_ch, run.d)
            assert isinstance(ev, PostcopyPages), ev
            if ev.first_page == 127:
                break
        assert ev.npages == 1 and ev.data == run.ram[127 * PS :].tobytes()
    finally:
        raised = run.stop()
    assert raised is None


def test_a_requested_page_waits_behind_at_most_256_kib_of_background_pages() -> None:
    """No cap, on TCP, the destination reading nothing until the push stalls (its receive
    queue as post-copy shortens it): a request then waits for every background byte already
    queued between the two ends. A requested page must not wait behind more than 256 KiB
    (2.5 ms at 100 MiB/s): 64-page background frames and a 256 KiB receive buffer queued
    several hundred KiB ahead of it; 16-page frames and 64 KiB keep it well under."""
    pages = 2048  # 8 MiB: far more than the stream can hold
    run = RunningSender(lambda n: 0.0, tcp=True, pages=pages)
    try:
        shorten_receive_queue(run.b)
        deadline = time.monotonic() + 30
        last, still = -1, 0
        while still < 20:  # the push stalls: what it sent stops growing while nobody reads
            assert time.monotonic() < deadline, "the push never waited for the reader"
            now = run.sender.bytes_sent
            still = still + 1 if now == last else 0
            last = now
            time.sleep(0.01)
        assert run.sender.order.left > 0
        run.d_ch.sendall(run.d.send(PageRequest(pages - 1, 1)))
        ahead = 0
        while True:
            ev = transport.recv_event(run.d_ch, run.d)
            assert isinstance(ev, PostcopyPages), ev
            if ev.first_page == pages - 1:
                break
            assert ev.npages <= BACKGROUND_PAGES
            ahead += len(ev.data)
        assert ev.npages == 1
        assert ahead <= 256 << 10, f"{ahead >> 10} KiB ahead of the requested page"
    finally:
        raised = run.stop()
    assert raised is None


def test_a_request_brings_its_pages_only_or_a_whole_frame_where_asked() -> None:
    """Plain and sealed streams: the requested pages alone, the walk right after them; TLS
    (`reply_pages` 64): a whole frame from the first unsent requested page."""
    alone = SendOrder(list(range(200)))
    alone.request(100, 2)
    assert alone.next_range() == (100, 2, True)
    assert alone.next_range() == (102, 64, False)
    whole = SendOrder(list(range(200)), reply_pages=64)
    whole.request(100, 2)
    assert whole.next_range() == (100, 64, True)
    assert whole.next_range() == (164, 36, False)
