"""The sans-I/O migration protocol: full sessions back to back, and every rejection."""

from __future__ import annotations

import numpy as np
import pytest

from ptmig.migration import (
    NEED_DATA,
    Abort,
    Complete,
    Connection,
    ConnectionClosed,
    DeviceStates,
    Hello,
    HelloAck,
    LocalProtocolError,
    PageRuns,
    PageRunsHeader,
    RemoteProtocolError,
    Role,
    RoundEnd,
    RoundStart,
    RunKind,
    State,
    SwitchoverAck,
    VcpuStates,
    VerifyDigests,
    check_hello,
    frames,
    hello,
    make_runs,
)
from ptmig.migration.pages import bitmap_to_runs, count_dirty, split_zero_runs
from ptmig.migration.verify import (
    compare_digests,
    digests_from_bytes,
    digests_to_bytes,
    page_digests,
)

PAGES = 64
PS = 4096
FP = {"mem_size": PAGES * PS, "vcpus": 2, "devices": ["virtio-net", "virtio-blk"]}


def src_dst() -> tuple[Connection, Connection]:
    return Connection(Role.SOURCE, guest_pages=PAGES), Connection(
        Role.DESTINATION, guest_pages=PAGES
    )


def gather(bufs: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def drain(
    conn: Connection, data: bytes, mem: bytearray | None = None, chunk: int = 1 << 30
) -> list:
    """Feed `data` to `conn` in chunks, receiving page payloads into `mem`; return the events."""
    events = []
    for off in range(0, max(len(data), 1), chunk):
        conn.receive_data(data[off : off + chunk])
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, PageRunsHeader):
                assert mem is not None
                conn.payload_targets(mem)
    return events


def random_ram(seed: int) -> bytearray:
    rng = np.random.default_rng(seed)
    ram = bytearray(rng.integers(0, 256, PAGES * PS, dtype=np.uint8).tobytes())
    view = np.frombuffer(ram, dtype=np.uint8).reshape(PAGES, PS)
    view[rng.choice(PAGES, PAGES // 4, replace=False)] = 0  # some zero pages
    return ram


def source_stream(
    src: Connection,
    ram: bytearray,
    bitmaps: list[np.ndarray],
    *,
    batch: int = 7,
    verify: bool = False,
) -> bytes:
    """Everything a source sends after the handshake: rounds, state, digests, Complete."""
    out = []
    for rnd, bm in enumerate(bitmaps):
        out.append(src.send(RoundStart(rnd, count_dirty(bm, PAGES))))
        for runs in bitmap_to_runs(bm, batch, PAGES):
            out.append(gather(src.send_pages(split_zero_runs(ram, runs), memoryview(ram))))
        out.append(src.send(RoundEnd(rnd)))
    out.append(src.send(VcpuStates(b"vcpu" * 10)))
    out.append(src.send(DeviceStates(b"dev" * 10)))
    if verify:
        d = digests_to_bytes(page_digests(ram))
        out.append(src.send(VerifyDigests(0, d[: 8 * 10])))
        out.append(src.send(VerifyDigests(10, d[8 * 10 :])))
    out.append(src.send(Complete()))
    return b"".join(out)


def handshake(src: Connection, dst: Connection) -> None:
    [h] = drain(dst, src.send(hello(FP, ("zero-pages",))))
    assert isinstance(h, Hello) and h.vm_fingerprint == FP and h.capabilities == ("zero-pages",)
    ack = check_hello(h, FP)
    assert ack == HelloAck(True, "")
    assert drain(src, dst.send(ack)) == [ack]
    assert src.state is dst.state is State.PRECOPY


@pytest.mark.parametrize("chunk", [1 << 30, 4096, 777, 1])
def test_full_session_copies_ram_exactly(chunk: int) -> None:
    src, dst = src_dst()
    handshake(src, dst)
    ram = random_ram(1)
    all_pages = np.full(PAGES // 8, 0xFF, dtype=np.uint8)
    # round 1 dirties a few pages: change them first, as a running guest would
    dirty = np.zeros(PAGES // 8, dtype=np.uint8)
    dirty[[0, 3, 7]] = [0b1001_0110, 0xFF, 0x80]
    dest_ram = bytearray(b"\xee" * len(ram))  # stale garbage everywhere
    stream = source_stream(src, ram, [all_pages], verify=False)
    events = drain(dst, stream, dest_ram, chunk)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RoundStart" and kinds[-1] == "Complete"
    assert VcpuStates(b"vcpu" * 10) in events and DeviceStates(b"dev" * 10) in events
    assert dest_ram == ram
    assert dst.state is State.COMPLETE_SENT
    assert drain(src, dst.send(SwitchoverAck(True))) == [SwitchoverAck(True)]
    assert src.state is dst.state is State.SWITCHED_OVER
    dst.receive_data(b"")
    assert dst.next_event() == ConnectionClosed()


def test_multi_round_session_with_verify() -> None:
    src, dst = src_dst()
    handshake(src, dst)
    ram = random_ram(2)
    dest_ram = bytearray(len(ram))
    src_rounds = []
    rng = np.random.default_rng(3)
    bitmaps = [np.full(PAGES // 8, 0xFF, dtype=np.uint8)]
    stream = [src.send(RoundStart(0, PAGES))]
    for runs in bitmap_to_runs(bitmaps[0], 16, PAGES):
        stream.append(gather(src.send_pages(split_zero_runs(ram, runs), memoryview(ram))))
    stream.append(src.send(RoundEnd(0)))
    drain(dst, b"".join(stream), dest_ram)
    # the guest dirties pages (some become zero) and round 1 sends exactly those
    view = np.frombuffer(ram, dtype=np.uint8).reshape(PAGES, PS)
    bits = np.zeros(PAGES, dtype=np.uint8)
    touched = rng.choice(PAGES, 20, replace=False)
    bits[touched] = 1
    view[touched[:10]] = rng.integers(0, 256, (10, PS), dtype=np.uint8)
    view[touched[10:]] = 0
    src_rounds.append(bits)
    bm = np.packbits(bits, bitorder="little")
    tail = source_stream_from_round(src, ram, bm, 1)
    events = drain(dst, tail, dest_ram, 1000)
    digests = [e for e in events if isinstance(e, VerifyDigests)]
    got = digests_from_bytes(b"".join(d.digests for d in digests))
    result = compare_digests(got, page_digests(dest_ram))
    assert result.ok and result.pages == PAGES
    assert dest_ram == ram


def source_stream_from_round(src: Connection, ram: bytearray, bm: np.ndarray, rnd: int) -> bytes:
    out = [src.send(RoundStart(rnd, count_dirty(bm, PAGES)))]
    for runs in bitmap_to_runs(bm, 5, PAGES):
        out.append(
            gather(src.send_pages(split_zero_runs(ram, runs), memoryview(ram), checksum=True))
        )
    out.append(src.send(RoundEnd(rnd)))
    out.append(src.send(VcpuStates(b"v")))
    out.append(src.send(DeviceStates(b"d")))
    d = digests_to_bytes(page_digests(ram))
    out.append(src.send(VerifyDigests(0, d[:80])))
    out.append(src.send(VerifyDigests(10, d[80:])))
    out.append(src.send(Complete()))
    return b"".join(out)


def test_zero_copy_receive_with_payload_received() -> None:
    """The destination reads payload straight into guest memory and reports it."""
    src, dst = src_dst()
    handshake(src, dst)
    ram = random_ram(4)
    dest_ram = bytearray(len(ram))
    runs = split_zero_runs(ram, make_runs([0, 20], [10, 30]))
    head = src.send(RoundStart(0, 40))
    bufs = src.send_pages(runs, memoryview(ram))
    head += bytes(bufs[0])
    payload = gather(bufs[1:])
    # the socket delivered the header plus the first 100 payload bytes in one read
    dst.receive_data(head + payload[:100])
    assert isinstance(dst.next_event(), RoundStart)
    ev = dst.next_event()
    assert isinstance(ev, PageRunsHeader) and ev.payload_nbytes == len(payload)
    targets = dst.payload_targets(dest_ram)
    assert sum(len(t) for t in targets) == len(payload) - 100
    pos = 100
    for t in targets:  # what recv_into on each slice would do
        t[:] = payload[pos : pos + len(t)]
        pos += len(t)
        dst.payload_received(len(t))
    assert dst.payload_pending == 0
    dst.receive_data(src.send(RoundEnd(0)))
    assert dst.next_event() == RoundEnd(0)
    sel = np.frombuffer(dest_ram, np.uint8).reshape(PAGES, PS)
    want = np.frombuffer(ram, np.uint8).reshape(PAGES, PS)
    assert np.array_equal(sel[:10], want[:10]) and np.array_equal(sel[20:50], want[20:50])
    assert not sel[10:20].any() and not sel[50:].any()


def test_page_runs_event_round_trip() -> None:
    src, dst = src_dst()
    handshake(src, dst)
    runs = make_runs([1, 5], [2, 3], [RunKind.DATA, RunKind.ZERO])
    payload = bytes(range(256)) * 32
    dest_ram = bytearray(b"\x01" * PAGES * PS)
    events = drain(dst, src.send(RoundStart(0, 5)) + src.send(PageRuns(runs, payload)), dest_ram)
    assert events[1] == PageRunsHeader(runs, 2 * PS)
    assert dest_ram[PS : 3 * PS] == payload
    assert dest_ram[5 * PS : 8 * PS] == bytes(3 * PS)
    assert dest_ram[:PS] == b"\x01" * PS and dest_ram[8 * PS :] == b"\x01" * (PAGES - 8) * PS


# ---- handshake rejections -------------------------------------------------------------------


def test_bad_magic_is_rejected() -> None:
    _, dst = src_dst()
    dst.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        dst.next_event()
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        dst.next_event()


def test_version_mismatch_refused_with_reason_on_both_sides() -> None:
    src, dst = src_dst()
    [h] = drain(dst, src.send(Hello(99, FP, ())))
    ack = check_hello(h, FP)
    assert not ack.accepted and "unsupported protocol version 99" in ack.reason
    [got] = drain(src, dst.send(ack))
    assert got == ack and src.state is State.REFUSED
    with pytest.raises(LocalProtocolError, match="may not send RoundStart in state refused"):
        src.send(RoundStart(0, 1))


def test_fingerprint_mismatch_names_the_differences() -> None:
    src, dst = src_dst()
    [h] = drain(dst, src.send(hello({**FP, "vcpus": 4, "extra": 1})))
    ack = check_hello(h, FP)
    assert not ack.accepted
    assert "vcpus: source=4 destination=2" in ack.reason
    assert "extra: source=1 destination='<missing>'" in ack.reason


# ---- out-of-order events --------------------------------------------------------------------


def test_source_cannot_send_out_of_order() -> None:
    src, dst = src_dst()
    with pytest.raises(LocalProtocolError, match="source may not send RoundStart in state start"):
        src.send(RoundStart(0, 1))
    handshake(src, dst)
    with pytest.raises(LocalProtocolError, match="may not send Complete in state precopy"):
        src.send(Complete())
    with pytest.raises(LocalProtocolError, match="source may not send SwitchoverAck"):
        src.send(SwitchoverAck(True))
    with pytest.raises(LocalProtocolError, match="expected round 0"):
        src.send(RoundStart(3, 1))


def test_destination_cannot_send_out_of_order() -> None:
    src, dst = src_dst()
    with pytest.raises(
        LocalProtocolError, match="destination may not send HelloAck in state start"
    ):
        dst.send(HelloAck(True))
    handshake(src, dst)
    with pytest.raises(LocalProtocolError, match="destination may not send SwitchoverAck"):
        dst.send(SwitchoverAck(True))
    with pytest.raises(LocalProtocolError, match="destination may not send RoundStart"):
        dst.send(RoundStart(0, 1))


def raw_frame(ev: object) -> bytes:
    return frames.encode_event(ev)  # type: ignore[arg-type]


def test_destination_rejects_out_of_order_frames() -> None:
    _, dst = src_dst()
    dst.receive_data(frames.MAGIC + raw_frame(Complete()))
    with pytest.raises(RemoteProtocolError, match="source may not send Complete in state start"):
        dst.next_event()


def test_source_rejects_out_of_order_frames() -> None:
    src, _ = src_dst()
    src.send(hello(FP))
    src.receive_data(frames.MAGIC + raw_frame(SwitchoverAck(True)))
    with pytest.raises(RemoteProtocolError, match="destination may not send SwitchoverAck"):
        src.next_event()


def test_round_page_count_must_match() -> None:
    src, dst = src_dst()
    handshake(src, dst)
    dst.receive_data(raw_frame(RoundStart(0, 5)) + raw_frame(RoundEnd(0)))
    assert dst.next_event() == RoundStart(0, 5)
    with pytest.raises(RemoteProtocolError, match="announced 5 pages but carried 0"):
        dst.next_event()


def test_abort_from_either_side() -> None:
    src, dst = src_dst()
    handshake(src, dst)
    [ev] = drain(src, dst.send(Abort("disk full")))
    assert ev == Abort("disk full") and src.state is State.ABORTED
    assert dst.next_event() is NEED_DATA


def test_switchover_refused_leaves_source_able_to_resume() -> None:
    src, dst = src_dst()
    handshake(src, dst)
    ram = random_ram(5)
    drain(dst, source_stream(src, ram, [np.full(PAGES // 8, 0xFF, np.uint8)]), bytearray(len(ram)))
    [ev] = drain(src, dst.send(SwitchoverAck(False, "verify: 3 pages differ")))
    assert ev == SwitchoverAck(False, "verify: 3 pages differ")
    assert src.state is State.SWITCHOVER_REFUSED


def test_truncated_stream_is_reported() -> None:
    src, dst = src_dst()
    handshake(src, dst)
    ram = random_ram(6)
    stream = source_stream(src, ram, [np.full(PAGES // 8, 0xFF, np.uint8)])
    for cut in (5, 13, 40, 5000, len(stream) - 3):
        d = Connection(Role.DESTINATION, guest_pages=PAGES)
        d.receive_data(frames.MAGIC + raw_frame(hello(FP)))
        d.next_event()
        d.send(HelloAck(True))
        with pytest.raises(RemoteProtocolError, match="truncated"):
            drain(d, stream[:cut] + b"", bytearray(len(ram)))
            d.receive_data(b"")
            while d.next_event() is not NEED_DATA:
                pass


def test_eof_between_frames_before_the_end_is_an_error() -> None:
    src, dst = src_dst()
    handshake(src, dst)
    dst.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="peer closed in state precopy"):
        dst.next_event()
