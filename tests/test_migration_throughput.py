"""The throughput path: zero-page prefilter, prefaulted destination RAM, parallel data channels."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptmig import bitmap
from ptmig.memory import GuestMemory
from ptmig.migration.channels import stripe_masks
from ptmig.migration.events import (
    Hello,
    HelloAck,
    RemoteProtocolError,
    Role,
    RoundEnd,
    RoundStart,
    RunKind,
    VcpuStates,
    make_runs,
)
from ptmig.migration.pages import (
    data_pages,
    expand_runs,
    nonzero_pages,
    page_rows,
    split_by_data,
    split_zero_runs,
)
from ptmig.migration.protocol import (
    DATA_CHANNEL_JOIN_CAPABILITY,
    DATA_CHANNELS_OFFER_CAPABILITY,
    MAX_DATA_CHANNELS,
    NEED_DATA,
    STRIPE_PAGES,
    Connection,
    ConnectionClosed,
    channel_capability,
    hello,
    parse_channel_capability,
)

PAGE = 4096
FP = {"memory": 64 * PAGE, "vcpus": 1}


# ---- zero-page detection: first word first, then the doubtful pages in full ----------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["zero", "first", "last", "full"]), min_size=1, max_size=80),
    st.booleans(),
)
def test_nonzero_pages_matches_a_full_scan(kinds: list[str], scattered: bool) -> None:
    """Pages whose first word is zero but which hold data further on are data, not zero."""
    ram = np.zeros(len(kinds) * PAGE, dtype=np.uint8)
    for i, kind in enumerate(kinds):
        if kind == "first":
            ram[i * PAGE] = 1
        elif kind == "last":
            ram[(i + 1) * PAGE - 1] = 7
        elif kind == "full":
            ram[i * PAGE : (i + 1) * PAGE] = 0xA5
    n = len(kinds)
    starts = np.arange(0, n, 2) if scattered else np.array([0])
    counts = np.ones(starts.size, np.int64) if scattered else np.array([n])
    runs = make_runs(starts, counts, RunKind.DATA)
    rows = page_rows(ram)
    expected = (
        [kinds[p] != "zero" for p in starts.tolist()] if scattered else [k != "zero" for k in kinds]
    )
    assert nonzero_pages(rows, runs).tolist() == expected


def test_split_zero_runs_keeps_a_page_whose_data_is_past_its_first_word() -> None:
    ram = np.zeros(4 * PAGE, dtype=np.uint8)
    ram[PAGE + 100] = 1  # page 1: zero first word, data later
    out = split_zero_runs(ram, make_runs([0], [4], RunKind.DATA))
    assert out["kind"].tolist() == [RunKind.ZERO, RunKind.DATA, RunKind.ZERO]
    assert out["start"].tolist() == [0, 1, 2]
    assert out["npages"].tolist() == [1, 1, 2]


# ---- prefaulting -----------------------------------------------------------------------------


def test_prefault_allocates_every_page_and_keeps_the_contents() -> None:
    mem = GuestMemory(64 * PAGE)
    try:
        mem.write(5 * PAGE, b"kept")
        assert not mem.allocated().all()
        mapped = mem.prefault()
        assert mem.allocated().all()
        assert mem.read(5 * PAGE, 4) == b"kept"
        assert mem.read(6 * PAGE, 8) == bytes(8)
        assert mapped  # Linux 5.14+ (MADV_POPULATE_WRITE), as on every supported host
    finally:
        mem.close()


# ---- pacing under max-bandwidth: pieces of bounded payload -----------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.booleans(), st.integers(0, 3)), min_size=1, max_size=30
    ),
    st.integers(1, 50),
)
def test_split_by_data_bounds_each_piece_and_keeps_every_page(
    spec: list[tuple[int, bool, int]], limit: int
) -> None:
    starts, counts, kinds, page = [], [], [], 0
    for npages, is_data, gap in spec:
        starts.append(page + gap)
        counts.append(npages)
        kinds.append(RunKind.DATA if is_data else RunKind.ZERO)
        page += gap + npages
    runs = make_runs(starts, counts, kinds)
    pieces = split_by_data(runs, limit)
    joined = np.concatenate(pieces)
    per_page = np.repeat(joined["kind"], joined["npages"].astype(np.int64))
    assert np.array_equal(expand_runs(joined), expand_runs(runs))
    assert np.array_equal(per_page, np.repeat(runs["kind"], runs["npages"].astype(np.int64)))
    loads = [data_pages(p) for p in pieces]
    assert all(0 < n <= limit for n in loads[:-1]) and loads[-1] <= limit, loads
    assert len(pieces) <= -(-data_pages(runs) // limit) + 1


# ---- data channels: capabilities, striping, the rounds-only protocol ------------------------


def test_channel_capability_round_trip_and_rejections() -> None:
    token = secrets.token_hex(16)
    cap = channel_capability(DATA_CHANNELS_OFFER_CAPABILITY, 3, token)
    assert parse_channel_capability(
        hello(FP, ("x-verify-after-switchover", cap)), DATA_CHANNELS_OFFER_CAPABILITY
    ) == (3, token)
    assert parse_channel_capability(hello(FP, ()), DATA_CHANNELS_OFFER_CAPABILITY) is None
    bad = [
        f"{DATA_CHANNELS_OFFER_CAPABILITY}={MAX_DATA_CHANNELS + 1}:{token}",
        f"{DATA_CHANNELS_OFFER_CAPABILITY}=2:{token[:-1]}",
        f"{DATA_CHANNELS_OFFER_CAPABILITY}=2:{token.upper()}",
        f"{DATA_CHANNELS_OFFER_CAPABILITY}=-1:{token}",
        f"{DATA_CHANNELS_OFFER_CAPABILITY}=2",
        f"{DATA_CHANNELS_OFFER_CAPABILITY}=" + "9" * 500 + f":{token}",
    ]
    for c in bad:
        with pytest.raises(RemoteProtocolError, match="malformed"):
            parse_channel_capability(hello(FP, (c,)), DATA_CHANNELS_OFFER_CAPABILITY)
    twice = (cap, channel_capability(DATA_CHANNELS_OFFER_CAPABILITY, 2, token))
    with pytest.raises(RemoteProtocolError, match="once"):
        parse_channel_capability(hello(FP, twice), DATA_CHANNELS_OFFER_CAPABILITY)


@pytest.mark.parametrize("nchannels", [1, 2, 3, 5])
def test_stripe_masks_partition_guest_ram_by_stripe(nchannels: int) -> None:
    npages = 7 * STRIPE_PAGES + 100
    masks = stripe_masks(npages, nchannels)
    owners = np.stack([bitmap.to_bool(m, npages) for m in masks])
    assert (owners.sum(axis=0) == 1).all()  # every page on exactly one channel
    page = np.arange(npages)
    assert (owners.argmax(axis=0) == page // STRIPE_PAGES % nchannels).all()


def _channel_pair() -> tuple[Connection, Connection]:
    src = Connection(Role.SOURCE, guest_pages=64, data_channel=True)
    dst = Connection(Role.DESTINATION, guest_pages=64, data_channel=True)
    token = secrets.token_hex(16)
    dst.receive_data(
        src.send(hello(FP, (channel_capability(DATA_CHANNEL_JOIN_CAPABILITY, 0, token),)))
    )
    assert isinstance(dst.next_event(), Hello)
    src.receive_data(dst.send(HelloAck(True)))
    assert isinstance(src.next_event(), HelloAck)
    return src, dst


def _events(conn: Connection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return out


def test_a_data_channel_carries_rounds_and_may_end_after_one() -> None:
    src, dst = _channel_pair()
    ram = np.zeros(64 * PAGE, dtype=np.uint8)
    ram[3 * PAGE : 5 * PAGE] = 9
    stream = src.send(RoundStart(0, 2))
    stream += b"".join(
        bytes(b) for b in src.send_pages(make_runs([3], [2], RunKind.DATA), ram.data)
    )
    stream += src.send(RoundEnd(0))
    dst.receive_data(stream)
    dest = bytearray(64 * PAGE)
    got = []
    while (ev := dst.next_event()) is not NEED_DATA:
        got.append(type(ev).__name__)
        if got[-1] == "PageRunsHeader":
            assert dst.payload_targets(memoryview(dest)) == []  # all of it was buffered
    assert got == ["RoundStart", "PageRunsHeader", "RoundEnd"]
    assert dest == ram.tobytes()
    dst.receive_data(b"")  # the source closed the channel after a complete round
    assert isinstance(dst.next_event(), ConnectionClosed)


def _main_pair() -> tuple[Connection, Connection]:
    src = Connection(Role.SOURCE, guest_pages=64)
    dst = Connection(Role.DESTINATION, guest_pages=64)
    dst.receive_data(src.send(hello(FP)))
    assert isinstance(dst.next_event(), Hello)
    src.receive_data(dst.send(HelloAck(True)))
    assert isinstance(src.next_event(), HelloAck)
    return src, dst


def test_a_data_channel_refuses_state_and_a_cut_inside_a_round() -> None:
    _, dst = _channel_pair()
    main_src, _ = _main_pair()
    dst.receive_data(main_src.send(VcpuStates(b"x")))  # a frame only the main stream may carry
    with pytest.raises(RemoteProtocolError, match="on a data channel"):
        dst.next_event()

    src, dst = _channel_pair()
    dst.receive_data(src.send(RoundStart(0, 2)))
    assert isinstance(dst.next_event(), RoundStart)
    dst.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        dst.next_event()


def test_the_main_stream_still_may_not_end_between_rounds() -> None:
    src, dst = _main_pair()
    dst.receive_data(src.send(RoundStart(0, 0)) + src.send(RoundEnd(0)))
    assert [type(e).__name__ for e in _events(dst)] == ["RoundStart", "RoundEnd"]
    dst.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        dst.next_event()
