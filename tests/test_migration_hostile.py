"""A hostile or broken source stream: every defect ends in RemoteProtocolError, and the
destination never writes guest RAM outside the runs it validated."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptmig.migration import (
    NEED_DATA,
    Connection,
    HelloAck,
    PageRunsHeader,
    RemoteProtocolError,
    Role,
    RoundEnd,
    RoundStart,
    RunKind,
    frames,
    hello,
    make_runs,
)

PAGES = 32
PS = 4096
FILL = 0xA5
FP = {"mem_size": PAGES * PS}


def ready_destination() -> Connection:
    dst = Connection(Role.DESTINATION, guest_pages=PAGES)
    dst.receive_data(frames.MAGIC + frames.encode_event(hello(FP)))
    dst.next_event()
    dst.send(HelloAck(True))
    return dst


def feed(dst: Connection, data: bytes, ram: bytearray) -> list[object]:
    dst.receive_data(data)
    out: list[object] = []
    while (ev := dst.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, PageRunsHeader):
            dst.payload_targets(ram)
    return out


def page_frame(runs: np.ndarray, payload: bytes, crc: int | None = None) -> bytes:
    return frames.encode_page_runs(runs, crc) + payload


def untouched_outside(ram: bytearray, written_pages: set[int]) -> bool:
    view = np.frombuffer(ram, np.uint8).reshape(PAGES, PS)
    mask = np.ones(PAGES, bool)
    mask[list(written_pages)] = False
    return bool((view[mask] == FILL).all())


@pytest.mark.parametrize(
    ("starts", "counts", "kinds", "message"),
    [
        ([PAGES], [1], [0], "outside guest RAM of 32 pages"),
        ([PAGES - 2], [3], [0], "outside guest RAM"),
        ([2**63], [1], [0], "outside guest RAM"),
        ([2**64 - 1], [2], [1], "outside guest RAM"),
        ([4, 6], [3, 1], [0, 0], "overlap or are out of order"),
        ([8, 2], [1, 1], [0, 0], "overlap or are out of order"),
        ([3], [0], [0], "has 0 pages"),
        ([3], [1], [7], "unknown kind 7"),
    ],
)
def test_bad_runs_rejected_before_any_write(starts, counts, kinds, message) -> None:
    dst = ready_destination()
    ram = bytearray([FILL]) * (PAGES * PS)
    runs = make_runs(starts, counts, kinds)
    total = sum(c for c, k in zip(counts, kinds, strict=True) if k == 0)
    data = frames.encode_event(RoundStart(0, PAGES)) + page_frame(runs, b"\0" * PS * min(total, 4))
    with pytest.raises(RemoteProtocolError, match=message):
        feed(dst, data, ram)
    assert untouched_outside(ram, set())


def test_more_pages_than_the_round_announced() -> None:
    dst = ready_destination()
    ram = bytearray([FILL]) * (PAGES * PS)
    data = frames.encode_event(RoundStart(0, 2)) + page_frame(make_runs([0], [3], [1]), b"")
    with pytest.raises(RemoteProtocolError, match="announced 2 pages, page runs now carry 3"):
        feed(dst, data, ram)
    assert untouched_outside(ram, set())


def test_round_announcing_more_pages_than_ram() -> None:
    dst = ready_destination()
    with pytest.raises(RemoteProtocolError, match="announces 33 dirty pages, guest has 32"):
        feed(dst, frames.encode_event(RoundStart(0, PAGES + 1)), bytearray(PAGES * PS))


@pytest.mark.parametrize(
    ("ftype", "length", "message"),
    [
        (frames.FrameType.VCPU_STATES, frames.MAX_VCPU_STATE + 1, "metadata length 1048577"),
        (frames.FrameType.DEVICE_STATES, 4 * frames.MiB + 1, "outside the allowed"),
        (frames.FrameType.PAGE_RUNS, 0xFFFFFFFF, "metadata length 4294967295"),
        (frames.FrameType.ROUND_START, 15, "outside the allowed 16..16"),
        (frames.FrameType.COMPLETE, 1, "outside the allowed 0..0"),
    ],
)
def test_oversized_or_wrong_lengths_rejected_from_the_header(ftype, length, message) -> None:
    dst = ready_destination()
    header = struct.pack("<BBHII", ftype, 0, 0, length, 0)
    with pytest.raises(RemoteProtocolError, match=message):
        feed(dst, header, bytearray(PAGES * PS))  # rejected without waiting for the body


def test_unknown_frame_type_and_flags() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown frame type 200"):
        feed(ready_destination(), struct.pack("<BBHII", 200, 0, 0, 0, 0), bytearray())
    with pytest.raises(RemoteProtocolError, match="unknown flags 0x02"):
        feed(ready_destination(), struct.pack("<BBHII", 9, 2, 0, 0, 0), bytearray())


def test_payload_over_batch_cap_rejected() -> None:
    dst = Connection(Role.DESTINATION, guest_pages=1 << 20)
    dst.receive_data(frames.MAGIC + frames.encode_event(hello(FP)))
    dst.next_event()
    dst.send(HelloAck(True))
    runs = make_runs([0], [frames.MAX_BATCH_PAYLOAD // PS + 1])
    dst.receive_data(frames.encode_event(RoundStart(0, 1 << 20)) + page_frame(runs, b""))
    dst.next_event()
    with pytest.raises(RemoteProtocolError, match="exceeds the 67108864-byte batch cap"):
        dst.next_event()


def test_corrupted_header_crc() -> None:
    frame = bytearray(frames.encode_event(RoundStart(0, 4)))
    frame[12] ^= 0x01  # flip a bit of the metadata
    with pytest.raises(RemoteProtocolError, match="crc32 mismatch"):
        feed(ready_destination(), bytes(frame), bytearray(PAGES * PS))


def test_corrupted_payload_crc_detected_and_writes_stay_in_the_run() -> None:
    dst = ready_destination()
    ram = bytearray([FILL]) * (PAGES * PS)
    payload = bytes(range(256)) * 16 * 2
    bad = bytearray(payload)
    bad[5000] ^= 0x10
    runs = make_runs([7], [2], [RunKind.DATA])
    data = frames.encode_event(RoundStart(0, 2)) + page_frame(runs, bytes(bad), zlib.crc32(payload))
    with pytest.raises(RemoteProtocolError, match="page payload crc32 mismatch"):
        feed(dst, data, ram)
    assert untouched_outside(ram, {7, 8})


def test_runs_count_inconsistent_with_metadata_length() -> None:
    meta = struct.pack("<II", 5, 0) + make_runs([0], [1]).tobytes()
    frame = frames.encode_frame(frames.FrameType.PAGE_RUNS, meta)
    with pytest.raises(RemoteProtocolError, match="5 runs need 88 metadata bytes, got 24"):
        feed(ready_destination(), frames.encode_event(RoundStart(0, 1)) + frame, bytearray())


def valid_stream() -> bytes:
    """A short valid post-handshake stream with data and zero runs."""
    runs = make_runs([1, 4, 10], [2, 3, 1], [RunKind.DATA, RunKind.ZERO, RunKind.DATA])
    payload = bytes(np.arange(3 * PS, dtype=np.uint8) | 1)
    return (
        frames.encode_event(RoundStart(0, 6))
        + page_frame(runs, payload, zlib.crc32(payload))
        + frames.encode_event(RoundEnd(0))
    )


WRITABLE = {1, 2, 4, 5, 6, 10}


def run_hostile(data: bytes) -> None:
    """Random bytes cannot forge a frame crc32, so guest RAM must stay exactly as it was."""
    dst = ready_destination()
    ram = bytearray([FILL]) * (PAGES * PS)
    try:
        feed(dst, data, ram)
        dst.receive_data(b"")
        dst.next_event()
    except RemoteProtocolError:
        pass
    assert ram == bytearray([FILL]) * (PAGES * PS)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    run_hostile(data)
    run_hostile(frames.MAGIC + data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_mutated_valid_stream_only_raises_remote_protocol_error(data: st.DataObject) -> None:
    stream = bytearray(valid_stream())
    n = data.draw(st.integers(1, 8))
    for _ in range(n):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(stream) - 1, 0)))
        if op == "flip" and stream:
            stream[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and stream:
            stream[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del stream[pos:]
        else:
            stream[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    dst = ready_destination()
    ram = bytearray([FILL]) * (PAGES * PS)
    written: set[int] = set()
    try:
        dst.receive_data(bytes(stream))
        while (ev := dst.next_event()) is not NEED_DATA:
            if isinstance(ev, PageRunsHeader):
                starts = ev.runs["start"].astype(int)
                for s, c in zip(starts, ev.runs["npages"].astype(int), strict=True):
                    assert 0 <= s and s + c <= PAGES
                    written.update(range(s, s + c))
                dst.payload_targets(ram)
        dst.receive_data(b"")
        dst.next_event()
    except RemoteProtocolError:
        pass
    assert len(ram) == PAGES * PS
    assert untouched_outside(ram, written)
