"""The vhost-user codec and connection without a real backend: every message round-trips, and
what a hostile backend sends (malformed, oversized, unsolicited, fd-carrying replies) is refused
with a clear error and ends the connection, never the process."""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptmig.devices.vhost_user import codec
from ptmig.devices.vhost_user.codec import (
    BackendRequest,
    Expected,
    FrameReader,
    Request,
    VhostUserProtocolError,
)
from ptmig.devices.vhost_user.connection import (
    VhostUserCommandError,
    VhostUserConnection,
    VhostUserGoneError,
)

pytestmark = pytest.mark.timeout(60)

u8, u16 = st.integers(0, 0xFF), st.integers(0, 0xFFFF)
u32, u64 = st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 64) - 1)
regions = st.builds(codec.MemRegion, u64, u64, u64, u64)
config = st.binary(max_size=codec.MAX_CONFIG).flatmap(
    lambda d: st.builds(codec.Config, u32, st.just(len(d)), u32, st.just(d))
)
PAYLOADS: dict[type[codec.Payload], st.SearchStrategy[codec.Payload]] = {
    codec.Empty: st.just(codec.Empty()),
    codec.U64: st.builds(codec.U64, u64),
    codec.VringState: st.builds(codec.VringState, u32, u32),
    codec.VringAddr: st.builds(codec.VringAddr, u32, u32, u64, u64, u64, u64),
    codec.MemTable: st.lists(regions, max_size=codec.MAX_REGIONS).map(
        lambda r: codec.MemTable(tuple(r))
    ),
    codec.SingleRegion: st.builds(codec.SingleRegion, regions),
    codec.LogBase: st.builds(codec.LogBase, u64, u64),
    codec.Config: config,
    codec.IotlbMsg: st.builds(codec.IotlbMsg, u64, u64, u64, u8, u8),
    codec.VringArea: st.builds(codec.VringArea, u64, u64, u64),
}


def _fds_for(spec: codec.Spec, payload: codec.Payload) -> int:
    lo, _hi = codec._expected_fds(spec, payload)
    return lo


def _one_frame(data: bytes) -> codec.Frame:
    reader = FrameReader()
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None and reader.pending == 0
    return frame


@given(
    st.sampled_from(sorted(codec.REQUESTS)).flatmap(
        lambda r: st.tuples(st.just(r), PAYLOADS[codec.REQUESTS[r].payload], st.booleans())
    )
)
def test_every_frontend_request_round_trips(case: tuple[Request, codec.Payload, bool]) -> None:
    request, payload, need_reply = case
    nfds = _fds_for(codec.REQUESTS[request], payload)
    data = codec.encode_request(request, payload, nfds, need_reply=need_reply)
    msg = codec.decode_request(_one_frame(data), tuple(range(nfds)))
    assert (msg.request, msg.payload, msg.need_reply) == (request, payload, need_reply)


@given(
    st.sampled_from(sorted(codec.REQUESTS)).flatmap(
        lambda r: st.tuples(st.just(r), PAYLOADS[codec.REQUESTS[r].payload])
    )
)
def test_every_reply_round_trips(case: tuple[Request, codec.Payload]) -> None:
    request, payload = case
    for need_reply in (False, True):
        expected = Expected.for_request(request, payload, need_reply)
        if expected is None:
            continue
        reply: codec.Payload = codec.U64(0)
        if expected.reply is codec.Config:
            assert isinstance(payload, codec.Config)
            reply = payload
        elif expected.reply is codec.VringState:
            reply = codec.VringState(3, 7)
        data = codec.encode_reply(request, reply, need_reply_echo=need_reply)
        assert codec.decode_reply(_one_frame(data), 0, expected) == reply


@given(
    st.sampled_from(sorted(codec.BACKEND_REQUESTS)).flatmap(
        lambda r: st.tuples(st.just(r), PAYLOADS[codec.BACKEND_REQUESTS[r].payload])
    )
)
def test_every_backend_request_round_trips(case: tuple[BackendRequest, codec.Payload]) -> None:
    request, payload = case
    nfds = _fds_for(codec.BACKEND_REQUESTS[request], payload)
    data = codec.encode_backend_request(request, payload, nfds)
    msg = codec.decode_backend_request(_one_frame(data), tuple(range(nfds)))
    assert (msg.request, msg.payload) == (request, payload)


@given(st.binary(max_size=300), st.integers(0, 3))
def test_arbitrary_bytes_never_raise_anything_but_a_protocol_error(data: bytes, nfds: int) -> None:
    reader = FrameReader()
    reader.feed(data)
    for expected in (
        Expected(Request.GET_FEATURES, codec.U64),
        Expected(Request.GET_CONFIG, codec.Config, 60),
        Expected(Request.GET_VRING_BASE, codec.VringState),
    ):
        try:
            frame = reader.next_frame()
            if frame is not None:
                codec.decode_reply(frame, nfds, expected)
                codec.decode_request(frame, tuple(range(nfds)))
        except VhostUserProtocolError:
            pass


def test_malformed_replies_are_refused_with_the_reason() -> None:
    get_features = Expected(Request.GET_FEATURES, codec.U64)
    cases = [
        (codec.HEADER.pack(Request.GET_FEATURES, 0x5, 4) + b"\0" * 4, "4 bytes"),
        (codec.HEADER.pack(Request.GET_FEATURES, 0x1, 8) + b"\0" * 8, "lack the REPLY"),
        (codec.HEADER.pack(Request.GET_FEATURES, 0x6, 8) + b"\0" * 8, "version 2"),
        (codec.HEADER.pack(Request.GET_FEATURES, 0x25, 8) + b"\0" * 8, "unknown flag"),
        (codec.HEADER.pack(Request.SET_OWNER, 0x5, 8) + b"\0" * 8, "instead"),
    ]
    for data, why in cases:
        with pytest.raises(VhostUserProtocolError, match=why):
            codec.decode_reply(_one_frame(data), 0, get_features)
    ok = codec.HEADER.pack(Request.GET_FEATURES, 0x5, 8) + b"\0" * 8
    with pytest.raises(VhostUserProtocolError, match="file descriptors"):
        codec.decode_reply(_one_frame(ok), 1, get_features)
    config = codec.encode_reply(Request.GET_CONFIG, codec.Config(0, 8, 0, b"12345678"))
    with pytest.raises(VhostUserProtocolError, match="asked for 60"):
        codec.decode_reply(_one_frame(config), 0, Expected(Request.GET_CONFIG, codec.Config, 60))
    table = codec.HEADER.pack(Request.SET_MEM_TABLE, 1, 8) + struct_pack_regions(9)
    with pytest.raises(VhostUserProtocolError, match="at most 8"):
        codec.decode_request(_one_frame(table), ())


def struct_pack_regions(n: int) -> bytes:
    return codec.MemTable.FORMAT.pack(n, 0)


def test_an_oversized_frame_is_refused_before_it_is_buffered() -> None:
    reader = FrameReader()
    reader.feed(codec.HEADER.pack(Request.GET_FEATURES, 0x5, codec.MAX_PAYLOAD + 1))
    with pytest.raises(VhostUserProtocolError, match="more than 4096"):
        reader.next_frame()


def test_requests_refuse_wrong_payloads_and_fd_counts() -> None:
    with pytest.raises(TypeError, match="U64"):
        codec.encode_request(Request.SET_FEATURES, codec.VringState(0, 0))
    with pytest.raises(ValueError, match="1..1 fds, not 0"):
        codec.encode_request(Request.SET_VRING_KICK, codec.U64(0), 0)
    codec.encode_request(Request.SET_VRING_KICK, codec.U64(codec.VRING_NOFD), 0)
    with pytest.raises(ValueError, match="2..2 fds"):
        codec.encode_request(
            Request.SET_MEM_TABLE, codec.MemTable((codec.MemRegion(0, 1, 2, 0),) * 2), 1
        )


# -- the connection against a scripted hostile backend ------------------------------------------


def _pair() -> tuple[VhostUserConnection, socket.socket, list[str]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = VhostUserConnection(a, "test", timeout=5.0)
    gone: list[str] = []
    conn.on_gone = gone.append
    return conn, b, gone


def _answer(peer: socket.socket, data: bytes, fds: tuple[int, ...] = ()) -> threading.Thread:
    def run() -> None:
        peer.recv(4096)
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        peer.sendmsg([data], anc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _fds_naming(fd: int) -> int:
    """How many of this process's descriptors name what `fd` names (a pipe: "pipe:[inode]")."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == target
        except OSError:
            pass  # closed meanwhile (listdir's own descriptor, another thread's file)
    return count


def test_a_reply_with_fds_ends_the_connection_and_the_fds_are_closed() -> None:
    conn, peer, gone = _pair()
    r, w = os.pipe()
    try:
        reply = codec.encode_reply(Request.GET_FEATURES, codec.U64(1))
        _answer(peer, reply, (r, w))
        with pytest.raises(VhostUserGoneError, match="2 file descriptors"):
            conn.call(Request.GET_FEATURES)
        # the received copies are closed: only our two ends still name the pipe (counted by
        # what they name, not in all: another test's thread may open or close a file meanwhile)
        assert _fds_naming(r) == 2
        # the reader thread wakes the caller before it runs on_gone: wait for the callback
        _wait_for(lambda: bool(gone))
        assert "file descriptors" in gone[0]
        with pytest.raises(VhostUserGoneError):
            conn.call(Request.GET_FEATURES)
    finally:
        os.close(r)
        os.close(w)
        conn.close()
        peer.close()


def test_unsolicited_truncated_and_eof_replies_end_the_connection_cleanly() -> None:
    conn, peer, gone = _pair()
    peer.sendall(codec.encode_reply(Request.GET_FEATURES, codec.U64(1)))
    with pytest.raises(VhostUserGoneError, match="unsolicited"):
        for _ in range(100):  # the reader needs a moment to see it
            conn.call(Request.SET_OWNER)
            threading.Event().wait(0.01)
    conn.close()
    peer.close()

    conn, peer, gone = _pair()

    def half() -> None:
        peer.recv(4096)
        peer.sendall(codec.encode_reply(Request.GET_FEATURES, codec.U64(1))[:10])
        peer.close()

    threading.Thread(target=half, daemon=True).start()
    with pytest.raises(VhostUserGoneError, match="mid-message"):
        conn.call(Request.GET_FEATURES)
    conn.close()


def test_reply_ack_waits_for_the_ack_and_a_nonzero_ack_is_a_refusal() -> None:
    conn, peer, _gone = _pair()
    conn.reply_ack = True
    try:
        _answer(peer, codec.encode_reply(Request.SET_OWNER, codec.U64(0)))
        assert conn.call(Request.SET_OWNER) == codec.U64(0)
        _answer(peer, codec.encode_reply(Request.SET_OWNER, codec.U64(22)))
        with pytest.raises(VhostUserCommandError, match="ack 0x16"):
            conn.call(Request.SET_OWNER)
        assert conn.alive
    finally:
        conn.close()
        peer.close()
