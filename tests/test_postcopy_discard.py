"""The early discard that keeps punching out of post-copy's downtime: on the wire, and the
destination's arming with pages already made missing. Pure: no sockets, no KVM."""

from __future__ import annotations

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
)
from ptmig.migration.events import PostcopyDiscard, PostcopyDiscarded, PostcopyStart
from ptmig.migration.postcopy import (
    PostcopyError,
    PostcopyReceiver,
    page_ranges,
    pending_bytes,
    punch_pages,
)

PAGES = 128


def deliver(frm: Connection, to: Connection, event: object) -> object:
    to.receive_data(frm.send(event))  # type: ignore[arg-type]
    ev = to.next_event()
    assert ev is not NEED_DATA
    return ev


def bitmap_of(pages: list[int]) -> bytes:
    words = np.zeros((PAGES + 63) // 64, dtype=np.uint64)
    for p in pages:
        words[p // 64] |= np.uint64(1 << (p % 64))
    return pending_bytes(words)


def discarded_pair() -> tuple[Connection, Connection]:
    s = Connection(Role.SOURCE, guest_pages=PAGES)
    d = Connection(Role.DESTINATION, guest_pages=PAGES)
    deliver(s, d, hello({"m": 1}))
    deliver(d, s, HelloAck(True, ""))
    deliver(s, d, RoundStart(0, 0))
    deliver(s, d, RoundEnd(0))
    got = deliver(s, d, PostcopyDiscard(bitmap_of([3, 4, 5])))
    assert got == PostcopyDiscard(bitmap_of([3, 4, 5]))
    assert s.state is d.state is State.DISCARD_SENT
    deliver(d, s, PostcopyDiscarded())
    assert s.state is d.state is State.DISCARDED
    return s, d


def test_a_discard_then_the_postcopy_switchover() -> None:
    s, d = discarded_pair()
    deliver(s, d, VcpuStates(b"v"))
    deliver(s, d, DeviceStates(b"d"))
    deliver(s, d, PostcopyStart(bitmap_of([3, 4, 5, 9])))  # a superset: dirtied since
    deliver(s, d, Complete())
    deliver(d, s, SwitchoverAck(True, ""))
    assert s.state is d.state is State.POSTCOPY


def test_no_round_and_no_plain_switchover_after_a_discard() -> None:
    """The destination no longer has the discarded pages: a round (which would not resend
    them all) or a switchover without post-copy would run the guest without them."""
    s, d = discarded_pair()
    with pytest.raises(LocalProtocolError, match="may not send RoundStart in state discarded"):
        s.send(RoundStart(1, 0))
    deliver(s, d, VcpuStates(b"v"))
    deliver(s, d, DeviceStates(b"d"))
    with pytest.raises(LocalProtocolError, match="Complete in state postcopy-devices-sent"):
        s.send(Complete())
    d.receive_data(frames.encode_event(Complete()))  # the same from a hostile source
    with pytest.raises(RemoteProtocolError, match="Complete in state postcopy-devices-sent"):
        d.next_event()


def test_the_source_waits_for_the_discard_acknowledgement_before_the_state() -> None:
    s = Connection(Role.SOURCE, guest_pages=PAGES)
    d = Connection(Role.DESTINATION, guest_pages=PAGES)
    deliver(s, d, hello({"m": 1}))
    deliver(d, s, HelloAck(True, ""))
    deliver(s, d, PostcopyDiscard(bitmap_of([1])))
    with pytest.raises(LocalProtocolError, match="VcpuStates in state discard-sent"):
        s.send(VcpuStates(b"v"))
    with pytest.raises(LocalProtocolError, match="may not send PostcopyDiscarded"):
        s.send(PostcopyDiscarded())  # only the destination acknowledges


def test_a_discard_bitmap_of_the_wrong_size_is_refused() -> None:
    s = Connection(Role.SOURCE, guest_pages=PAGES)
    d = Connection(Role.DESTINATION, guest_pages=PAGES)
    deliver(s, d, hello({"m": 1}))
    deliver(d, s, HelloAck(True, ""))
    d.receive_data(frames.encode_event(PostcopyDiscard(bytes(8))))
    with pytest.raises(RemoteProtocolError, match="PostcopyDiscard bitmap of 8 bytes for 128"):
        d.next_event()


def test_arming_refuses_a_discarded_page_the_final_bitmap_leaves_out() -> None:
    """It would never arrive: refused before anything is armed (the source resumes)."""
    receiver = PostcopyReceiver(memoryview(bytearray(PAGES * 4096)), 0, PAGES)
    discarded = np.zeros(PAGES, dtype=bool)
    discarded[[3, 70]] = True
    punched: list[tuple[int, int]] = []
    with pytest.raises(PostcopyError, match="leaves out page 70, which PostcopyDiscard made"):
        receiver.arm(
            PostcopyStart(bitmap_of([3])),
            np.ones(PAGES, dtype=bool),
            lambda first, n: punched.append((first, n)),
            discarded,
        )
    assert punched == [] and receiver.server is None


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_punching_covers_exactly_the_marked_pages_one_call_per_run(marks: list[bool]) -> None:
    mask = np.array(marks, dtype=bool)
    calls: list[tuple[int, int]] = []
    punch_pages(mask, lambda first, n: calls.append((first, n)))
    covered = np.zeros(len(mask), dtype=bool)
    for first, n in calls:
        assert n > 0 and not covered[first : first + n].any()
        covered[first : first + n] = True
    assert (covered == mask).all()
    # runs are maximal: no two calls touch
    assert all(a + n < b for (a, n), (b, _) in zip(calls, calls[1:], strict=False))


def test_a_discard_the_hello_did_not_offer_is_refused_before_anything_is_punched() -> None:
    """A source (with the key) that sends PostcopyDiscard without offering post-copy: the
    destination refuses it, punches nothing, says why, and waits on."""
    from test_migration_incoming_hostile import VALID_HELLO, Destination, FakeMachine, abort_reason

    d = Destination(FakeMachine())
    try:
        stream = (
            frames.MAGIC
            + VALID_HELLO
            + frames.encode_event(RoundStart(0, 0))
            + frames.encode_event(RoundEnd(0))
            + frames.encode_event(PostcopyDiscard(bytes(8)))
        )
        replies = d.attempt(stream)
        assert "PostcopyDiscard from a source whose Hello did not offer postcopy-ram" in (
            abort_reason(replies)
        )
        assert d.incoming.discarded is None
    finally:
        d.stop()


@given(st.lists(st.integers(0, 400), max_size=200), st.integers(1, 70))
def test_page_ranges_cover_each_page_once_in_order_within_the_limit(
    pfns: list[int], limit: int
) -> None:
    """The fetcher's requests: unsorted, with repeats, become sorted ranges of at most
    `limit` pages covering each page once."""
    got = page_ranges(np.array(pfns, dtype=np.uint64), limit)
    covered = [p for first, n in got for p in range(first, first + n)]
    assert covered == sorted(set(pfns))
    assert all(1 <= n <= limit for _, n in got)


def test_a_source_lost_after_the_discard_leaves_guest_ram_unregistered() -> None:
    """The destination registers guest RAM with its fault server at PostcopyDiscard (out of the
    downtime). A source that disappears before the switchover: the attempt is refused and
    the registration goes with it, so a discarded page reads as a hole again instead of
    waiting forever for a fetcher that never comes."""
    import ctypes
    import threading
    import time

    from test_migration_incoming_hostile import FP, Destination, FakeMachine, hello_frame

    from ptmig.memory import GuestMemory

    m = FakeMachine()
    mem = GuestMemory(PAGES * 4096)  # a memfd, as the fault server needs
    mem.write(3 * 4096, b"x" * 4096)
    m.vm.memory = mem  # type: ignore[assignment]
    d = Destination(m)
    try:
        stream = (
            frames.MAGIC
            + hello_frame({"fingerprint": FP, "capabilities": ["postcopy-ram"]})
            + frames.encode_event(RoundStart(0, 0))
            + frames.encode_event(RoundEnd(0))
            + frames.encode_event(PostcopyDiscard(bitmap_of([3, 4])))
        )  # then the stream ends: the source is gone
        replies = b"".join(d.attempt(stream))
        assert frames.encode_event(PostcopyDiscarded()) in replies  # it was registered
        assert "closed" in d.incoming.rejected[-1]
        deadline = time.monotonic() + 30  # the attempt is reset right after its rejection
        while d.incoming.postcopy_early is not None:
            assert time.monotonic() < deadline, "the refused attempt kept its fault server"
            time.sleep(0.005)
        assert d.incoming.postcopy is None and mem.presence is None
        got: list[bytes] = []

        def touch() -> None:  # with the GIL released: a registered page would block here
            buf = ctypes.create_string_buffer(4096)
            ctypes.memmove(buf, mem.host_address + 3 * 4096, 4096)
            got.append(buf.raw)

        reader = threading.Thread(target=touch, daemon=True)
        reader.start()
        reader.join(30)
        assert got == [bytes(4096)], "the discarded page is still registered"
    finally:
        d.stop()
        mem.close()


# Run in a fresh interpreter (what another test imported would hide the import): a destination
# whose machine has `devices` devices gets a post-copy Hello, one round and PostcopyDiscard,
# then the source is gone. Prints whether shadowing's post-copy module was loaded before the
# stream and once the discard was acknowledged.
_DISCARD_THEN_GONE = """
import json, sys
sys.path.insert(0, {tests!r})
from test_migration_incoming_hostile import FP, Destination, FakeMachine, hello_frame
from test_postcopy_discard import PAGES, bitmap_of
from ptmig.memory import GuestMemory
from ptmig.migration import RoundEnd, RoundStart, frames
from ptmig.migration.events import PostcopyDiscard, PostcopyDiscarded

MODULE = "ptmig.migration.postcopy_devices"
m = FakeMachine()
m.devices = m.devices[:{devices}]
mem = GuestMemory(PAGES * 4096)
m.vm.memory = mem
d = Destination(m)
before = MODULE in sys.modules
stream = (
    frames.MAGIC
    + hello_frame({{"fingerprint": FP, "capabilities": ["postcopy-ram"]}})
    + frames.encode_event(RoundStart(0, 0))
    + frames.encode_event(RoundEnd(0))
    + frames.encode_event(PostcopyDiscard(bitmap_of([3, 4])))
)
replies = b"".join(d.attempt(stream))
acked = frames.encode_event(PostcopyDiscarded()) in replies
print(json.dumps([before, acked, MODULE in sys.modules]))
"""


@pytest.mark.parametrize("devices", [1, 0])
def test_shadowings_postcopy_module_loads_at_the_discard_only_with_devices(devices: int) -> None:
    """Loading `postcopy_devices` (and the shadow engine with it) took 27-29 ms; at the
    switchover that was most of a 37-41 ms post-copy downtime with devices. It loads when
    the destination acknowledges PostcopyDiscard, the guest still running on the source; a
    VM without devices never loads it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = _DISCARD_THEN_GONE.format(tests=str(Path(__file__).parent), devices=devices)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    before, acked, after = json.loads(out.stdout.splitlines()[-1])
    assert not before and acked
    assert after is bool(devices)
