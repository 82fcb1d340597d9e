"""Post-copy recovery's pure parts: the phase machine, the received bitmap, the resumed
conversation on the wire, hostile resumes. No sockets, no KVM (those: test_postcopy_recover_kvm).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptmig.migration import (
    NEED_DATA,
    Connection,
    HelloAck,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    State,
    frames,
    hello,
)
from ptmig.migration.events import (
    Hello,
    PageRequest,
    PostcopyDone,
    PostcopyEnd,
    PostcopyPages,
    PostcopyReceived,
)
from ptmig.migration.recovery import (
    Phase,
    Recovery,
    RecoveryError,
    Step,
    pages_to_resend,
    parse_received_bitmap,
    received_bitmap,
    requested_pages,
    session_capability,
    session_token,
)
from ptmig.migration.uffd import PageState

PAGES = 130  # not a multiple of 64: the bitmap's last word has bits past guest RAM
PS = 4096
TOKEN = "0123456789abcdef" * 2


def deliver(frm: Connection, to: Connection, event: object) -> object:
    to.receive_data(frm.send(event))  # type: ignore[arg-type]
    ev = to.next_event()
    assert ev is not NEED_DATA
    return ev


def resumed_pair() -> tuple[Connection, Connection]:
    s = Connection(Role.SOURCE, guest_pages=PAGES, resume=True)
    d = Connection(Role.DESTINATION, guest_pages=PAGES, resume=True)
    assert s.state is d.state is State.RESUME_START
    got = deliver(s, d, hello({"m": 1}, (session_capability(TOKEN),)))
    assert isinstance(got, Hello) and session_token(got) == TOKEN
    deliver(d, s, HelloAck(True, ""))
    assert s.state is d.state is State.RESUME_ACKED
    return s, d


# --- the phase machine --------------------------------------------------------------------


def test_a_break_a_recovery_a_second_break_and_another_recovery() -> None:
    r = Recovery()
    assert r.phase is Phase.ACTIVE
    assert r.handle(Step.LINK_LOST) is Phase.PAUSED
    assert r.handle(Step.RECOVER) is Phase.RECOVER
    assert r.handle(Step.LINK_LOST) is Phase.PAUSED  # broken again while recovering
    assert r.handle(Step.RECOVER) is Phase.RECOVER
    assert r.handle(Step.RESUMED) is Phase.ACTIVE
    assert r.handle(Step.PAUSE) is Phase.PAUSED  # migrate-pause
    assert r.handle(Step.RECOVER) is Phase.RECOVER
    assert r.handle(Step.PAUSE) is Phase.PAUSED  # migrate-pause stops a recovery's listening
    r.handle(Step.RECOVER)
    r.handle(Step.RESUMED)
    assert r.handle(Step.DONE) is Phase.COMPLETED


@pytest.mark.parametrize(
    ("steps", "refused", "message"),
    [
        ((), Step.RECOVER, "recover: post-copy is postcopy-active"),  # a resume before a pause
        ((), Step.RESUMED, "resumed: post-copy is postcopy-active"),
        ((Step.LINK_LOST,), Step.RESUMED, "resumed: post-copy is postcopy-paused"),
        ((Step.LINK_LOST,), Step.PAUSE, "migrate-pause: post-copy is postcopy-paused"),
        ((Step.LINK_LOST,), Step.DONE, "every page installed: post-copy is postcopy-paused"),
        ((Step.LINK_LOST, Step.RECOVER), Step.RECOVER, "recover: post-copy is postcopy-recover"),
        ((Step.DONE,), Step.PAUSE, "migrate-pause: post-copy is completed"),
        ((Step.DONE,), Step.LINK_LOST, "link lost: post-copy is completed"),
    ],
)
def test_steps_out_of_place_are_refused_and_change_nothing(
    steps: tuple[Step, ...], refused: Step, message: str
) -> None:
    r = Recovery()
    for step in steps:
        r.handle(step)
    before = r.phase
    assert not r.allowed(refused)
    with pytest.raises(RecoveryError, match=message):
        r.handle(refused)
    assert r.phase is before


@given(st.lists(st.sampled_from(list(Step)), max_size=30))
def test_any_sequence_runs_the_guest_on_the_destination_only_after_a_resume(
    steps: list[Step],
) -> None:
    """Whatever arrives in whatever order: from a pause, only a recover then a resume make the
    phase active again, and nothing leaves `completed`."""
    r = Recovery()
    last_moves: list[Step] = []
    for step in steps:
        before = r.phase
        try:
            after = r.handle(step)
        except RecoveryError:
            assert r.phase is before
            continue
        last_moves.append(step)
        assert before is not Phase.COMPLETED
        if after is Phase.ACTIVE and before is not Phase.ACTIVE:
            assert last_moves[-2:] == [Step.RECOVER, Step.RESUMED]


# --- the received bitmap ------------------------------------------------------------------


@given(st.lists(st.sampled_from(list(PageState)), min_size=1, max_size=300))
def test_the_received_bitmap_holds_exactly_the_present_and_zero_pages(states: list[int]) -> None:
    arr = np.array(states, dtype=np.uint8)
    blob = received_bitmap(arr)
    assert len(blob) == 8 * ((len(arr) + 63) // 64)
    got = parse_received_bitmap(blob, len(arr))
    held = (arr == PageState.PRESENT) | (arr == PageState.ZERO)
    assert (got == held).all()
    ram = np.ones(len(arr), dtype=bool)
    resend = pages_to_resend(got, ram)
    # in flight when the link broke (requested) or never sent (missing): resent, nothing else
    assert (resend == ((arr == PageState.MISSING) | (arr == PageState.REQUESTED))).all()
    assert (requested_pages(arr) == np.flatnonzero(arr == PageState.REQUESTED)).all()


def test_pages_outside_ram_are_never_resent() -> None:
    received = np.zeros(PAGES, dtype=bool)
    ram = np.ones(PAGES, dtype=bool)
    ram[100:110] = False  # the MMIO gap
    assert np.flatnonzero(pages_to_resend(received, ram)).tolist() == [
        *range(100),
        *range(110, PAGES),
    ]
    with pytest.raises(RecoveryError, match=r"received \(130,\) and RAM \(129,\) bitmaps differ"):
        pages_to_resend(received, ram[:-1])


def test_a_received_bitmap_of_the_wrong_size_is_refused() -> None:
    good = received_bitmap(np.full(PAGES, PageState.PRESENT, dtype=np.uint8))
    with pytest.raises(RecoveryError, match="received bitmap of 16 bytes for 130 pages"):
        parse_received_bitmap(good[:16], PAGES)
    with pytest.raises(RecoveryError, match="received bitmap of 32 bytes for 130 pages"):
        parse_received_bitmap(good + bytes(8), PAGES)


def test_a_received_bitmap_naming_pages_past_guest_ram_is_refused() -> None:
    blob = bytearray(received_bitmap(np.zeros(PAGES, dtype=np.uint8)))
    blob[-1] |= 0x80  # page 191: past the 130 pages
    with pytest.raises(RecoveryError, match=r"names page 191, past guest RAM \(130 pages\)"):
        parse_received_bitmap(bytes(blob), PAGES)


# --- the resumed conversation ---------------------------------------------------------------


def test_a_resumed_conversation_bitmap_pages_requests_then_the_end() -> None:
    s, d = resumed_pair()
    states = np.full(PAGES, PageState.PRESENT, dtype=np.uint8)
    states[[5, 6, 129]] = PageState.MISSING
    states[7] = PageState.REQUESTED
    got = deliver(d, s, PostcopyReceived(received_bitmap(states)))
    assert isinstance(got, PostcopyReceived)
    assert s.state is d.state is State.POSTCOPY
    received = parse_received_bitmap(got.received, PAGES)
    assert np.flatnonzero(~received).tolist() == [5, 6, 7, 129]
    assert deliver(d, s, PageRequest(7, 1)) == PageRequest(7, 1)
    assert deliver(s, d, PostcopyPages(5, 3, bytes(3 * PS))) == PostcopyPages(5, 3, bytes(3 * PS))
    deliver(s, d, PostcopyPages(129, 1))
    deliver(s, d, PostcopyEnd())
    deliver(d, s, PostcopyDone())
    assert s.state is d.state is State.SWITCHED_OVER


def test_a_resumed_stream_refuses_what_does_not_fit_it() -> None:
    s, d = resumed_pair()
    # pages before the bitmap: the source would not know what to send yet
    with pytest.raises(LocalProtocolError, match="may not send PostcopyPages in state resume"):
        s.send(PostcopyPages(0, 1))
    bitmap = received_bitmap(np.zeros(PAGES, dtype=np.uint8))
    deliver(d, s, PostcopyReceived(bitmap))
    # one bitmap per resume: a second one is a hostile (or confused) peer
    s.receive_data(frames.encode_event(PostcopyReceived(bitmap)))
    with pytest.raises(
        RemoteProtocolError, match="may not send PostcopyReceived in state postcopy"
    ):
        s.next_event()


def test_a_received_bitmap_of_the_wrong_size_on_the_wire_is_refused() -> None:
    s, d = resumed_pair()
    with pytest.raises(LocalProtocolError, match="PostcopyReceived bitmap of 8 bytes for 130"):
        d.send(PostcopyReceived(bytes(8)))
    # the same from a hostile peer, encoded by hand
    s.receive_data(frames.encode_event(PostcopyReceived(bytes(8))))
    with pytest.raises(RemoteProtocolError, match="PostcopyReceived bitmap of 8 bytes for 130"):
        s.next_event()


def test_a_resumed_request_for_pages_out_of_range_is_refused() -> None:
    s, d = resumed_pair()
    deliver(d, s, PostcopyReceived(received_bitmap(np.zeros(PAGES, dtype=np.uint8))))
    s.receive_data(frames.encode_event(PageRequest(129, 2)))
    with pytest.raises(RemoteProtocolError, match=r"PageRequest for pages \[129, 131\) outside"):
        s.next_event()


def test_a_received_bitmap_outside_a_resume_is_refused() -> None:
    """A first connection never carries one: a peer that sends it there is refused."""
    s = Connection(Role.SOURCE, guest_pages=PAGES)
    d = Connection(Role.DESTINATION, guest_pages=PAGES)
    deliver(s, d, hello({"m": 1}))
    deliver(d, s, HelloAck(True, ""))
    s.receive_data(frames.encode_event(PostcopyReceived(bytes(24))))
    with pytest.raises(RemoteProtocolError, match="may not send PostcopyReceived in state precopy"):
        s.next_event()


def test_a_resume_the_destination_refuses_ends_the_stream() -> None:
    s = Connection(Role.SOURCE, guest_pages=PAGES, resume=True)
    d = Connection(Role.DESTINATION, guest_pages=PAGES, resume=True)
    deliver(s, d, hello({"m": 1}, (session_capability(TOKEN),)))
    deliver(d, s, HelloAck(False, "this is not the source of the paused post-copy migration"))
    assert s.state is d.state is State.REFUSED


def test_a_received_bitmap_frame_of_partial_words_is_refused() -> None:
    raw = frames.encode_frame(frames.FrameType.POSTCOPY_RECEIVED, bytes(12))
    header = frames.parse_header(raw[: frames.HEADER_SIZE])
    with pytest.raises(RemoteProtocolError, match="POSTCOPY_RECEIVED: a bitmap of 12 bytes"):
        frames.decode_event(header.type, raw[frames.HEADER_SIZE :])


@pytest.mark.parametrize(
    "cap",
    [
        "x-postcopy-session=0:short",
        "x-postcopy-session=0:" + "G" * 32,
        "x-postcopy-session=" + TOKEN,
    ],
)
def test_a_malformed_session_token_is_refused(cap: str) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed x-postcopy-session capability"):
        session_token(hello({"m": 1}, (cap,)))


def test_a_hello_without_a_session_token_has_none() -> None:
    assert session_token(hello({"m": 1}, ("postcopy-ram",))) is None
