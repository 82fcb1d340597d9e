"""The sealed PSK channel: an on-path attacker who changes, swaps, replays, drops or moves a
record between streams is detected; the key schedule separates streams and directions; the
bytes on the wire are not the plaintext; data channels join only a session they can prove."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptmig.migration import seal, transport
from ptmig.migration.transport import AuthenticationError, IntegrityError, SealedChannel

KEY = b"k" * 32


def session_pair(stream: int = 0) -> tuple[seal.StreamKeys, seal.StreamKeys]:
    """(client keys, server keys) of one stream of a fresh session."""
    session = seal.Session.start(KEY, b"s" * 32, b"c" * 32)
    nonces = b"n" * 64
    return (
        seal._stream_keys(session, stream, nonces, server=False),
        seal._stream_keys(session, stream, nonces, server=True),
    )


def records(keys: seal.StreamKeys, messages: list[bytes]) -> list[bytes]:
    """Each message sealed as one record, as `keys` sends them."""
    out = []
    for m in messages:
        buf = bytearray(seal.RECORD_HEADER.size + len(m) + seal.TAG)
        keys.send.seal_into(memoryview(m), memoryview(buf))
        out.append(bytes(buf))
    return out


def receive(server: seal.StreamKeys, wire: bytes, want: int) -> bytes:
    """What a SealedChannel with `server`'s keys delivers from `wire` (want bytes at most)."""
    a, b = socket.socketpair()
    with a, b:
        ch = SealedChannel(b, 5.0, "test", server)
        a.sendall(wire)
        a.shutdown(socket.SHUT_WR)
        got = bytearray()
        while len(got) < want and (data := ch.recv(want - len(got))):
            got += data
        return bytes(got)


MESSAGES = [b"frame-%d " % i * 50 for i in range(4)]


def test_untouched_records_arrive_in_order() -> None:
    client, server = session_pair()
    wire = b"".join(records(client, MESSAGES))
    assert receive(server, wire, 10_000) == b"".join(MESSAGES)


@pytest.mark.parametrize("attack", ["flip", "swap", "replay", "drop", "reflect", "other-stream"])
def test_an_on_path_attacker_is_detected(attack: str) -> None:
    client, server = session_pair()
    recs = records(client, MESSAGES)
    if attack == "flip":
        r = bytearray(recs[2])
        r[40] ^= 0x04
        recs[2] = bytes(r)
    elif attack == "swap":
        recs[1], recs[2] = recs[2], recs[1]
    elif attack == "replay":
        recs.insert(2, recs[1])
    elif attack == "drop":
        del recs[1]
    elif attack == "reflect":  # the server's own direction sent back to it
        recs[1] = records(session_pair()[1], [b"x"] * 2)[1]
    else:  # the same position of data channel 0 of the same session
        recs[1] = records(session_pair(stream=1)[0], MESSAGES)[1]
    with pytest.raises(IntegrityError, match="failed authentication"):
        receive(server, b"".join(recs), 10_000)


def test_a_record_announcing_more_than_the_cap_is_refused_before_buffering() -> None:
    _, server = session_pair()
    wire = seal.RECORD_HEADER.pack(seal.MAX_RECORD + seal.TAG + 1) + b"x" * 64
    with pytest.raises(IntegrityError, match="announces"):
        receive(server, wire, 10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_change_to_the_wire_yields_a_prefix_or_an_error(data: st.DataObject) -> None:
    """The receiver never delivers a byte the sender did not send, in that place."""
    client, server = session_pair()
    wire = bytearray(b"".join(records(client, MESSAGES)))
    op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    pos = data.draw(st.integers(0, len(wire) - 1))
    if op == "flip":
        wire[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "insert":
        wire[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
    elif op == "delete":
        del wire[pos : pos + data.draw(st.integers(1, 64))]
    else:
        del wire[pos:]
    plain = b"".join(MESSAGES)
    try:
        got = receive(server, bytes(wire), len(plain))
    except transport.TransportError:
        return
    assert plain.startswith(got) and (op == "truncate" or got == plain)


class TrickleSocket:
    """Stands in for a socket: hands out `wire` in reads of `sizes` bytes (cycled), so record
    headers and bodies arrive split at every place a TCP stream may split them."""

    def __init__(self, wire: bytes, sizes: list[int]) -> None:
        self.wire, self.sizes, self.pos, self.reads = wire, sizes, 0, 0

    def recv_into(self, buf: memoryview) -> int:
        k = min(len(buf), self.sizes[self.reads % len(self.sizes)], len(self.wire) - self.pos)
        buf[:k] = self.wire[self.pos : self.pos + k]
        self.pos += k
        self.reads += 1
        return k

    def settimeout(self, timeout: float | None) -> None:
        pass


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    sizes=st.lists(st.integers(1, 3100), min_size=1, max_size=5),
    whole=st.booleans(),
)
def test_records_split_anywhere_by_the_stream_arrive_whole_and_in_order(
    lengths: list[int], sizes: list[int], whole: bool
) -> None:
    """However the reads cut the wire (inside a header, right after one, across two records),
    each message arrives as sent, read into a buffer of its size or in pieces."""
    client, server = session_pair()
    messages = [os.urandom(n) for n in lengths]
    sock = TrickleSocket(b"".join(records(client, messages)), sizes)
    ch = SealedChannel(sock, 5.0, "test", server)  # type: ignore[arg-type]
    for m in messages:
        if whole or not m:
            got = bytearray(len(m))
            ch.recv_into_exact(got)
        else:
            got = bytearray()
            while len(got) < len(m):
                got += ch.recv(min(len(m) - len(got), 700))
        assert got == m
    assert ch.recv(10) == b"" and sock.pos == len(sock.wire)


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_handshake_imports_its_cryptography_before_it_waits_for_the_peer(side: str) -> None:
    """So the two VMMs' imports overlap (checked in a fresh interpreter: nothing loaded yet)."""
    run = (
        "server_handshake(send, recv, b'k' * 32, {})"
        if side == "server"
        else ("client_handshake(send, recv, b'k' * 32)")
    )
    script = (
        "import sys\n"
        "from ptmig.migration.seal import client_handshake, server_handshake\n"
        "def send(data): pass\n"
        "def recv(n, what):\n"
        "    print('aead' if 'cryptography.hazmat.primitives.ciphers.aead' in sys.modules "
        "else 'none')\n"
        "    raise SystemExit(0)\n"
        f"{run}\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["aead"]


def test_the_wire_carries_no_plaintext_and_both_ends_agree() -> None:
    """Over real sockets, through a tap: the pattern sent never appears on the wire."""
    lst = transport.listen("127.0.0.1", 0, psk=KEY)
    tap = socket.create_server(("127.0.0.1", 0))
    seen = bytearray()

    def relay() -> None:
        c, _ = tap.accept()
        u = socket.create_connection(("127.0.0.1", lst.port))

        def pump(a: socket.socket, b: socket.socket, keep: bool) -> None:
            while data := a.recv(1 << 16):
                if keep:
                    seen.extend(data)
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=pump, args=(u, c, False), daemon=True)
        t.start()
        pump(c, u, True)
        t.join(10)

    threading.Thread(target=relay, daemon=True).start()
    secret = os.urandom(16) * 8192  # 128 KiB of a recognisable pattern
    out: dict[str, bytes] = {}

    def server() -> None:
        ch = lst.accept(timeout=10)
        buf = bytearray(len(secret))
        ch.recv_into_exact(buf)
        out["got"] = bytes(buf)
        ch.close()

    t = threading.Thread(target=server, daemon=True)
    t.start()
    with transport.connect("127.0.0.1", tap.getsockname()[1], psk=KEY) as ch:
        assert isinstance(ch, SealedChannel)
        ch.send_buffers([secret[:100], memoryview(secret)[100:]])
        t.join(10)
    lst.close()
    tap.close()
    assert out["got"] == secret
    assert secret[:16] not in seen and len(seen) > len(secret)


def test_a_data_channel_joins_only_a_session_it_can_prove() -> None:
    with transport.listen("127.0.0.1", 0, psk=KEY) as lst:
        accepted: list[object] = []

        def serve(n: int) -> None:
            for _ in range(n):
                try:
                    accepted.append(lst.accept(timeout=10))
                except AuthenticationError as e:
                    accepted.append(e)

        t = threading.Thread(target=serve, args=(3,), daemon=True)
        t.start()
        main = transport.connect("127.0.0.1", lst.port, psk=KEY)
        assert main.session is not None
        good = transport.connect("127.0.0.1", lst.port, psk=KEY, join=(main.session, 2))
        forged = seal.Session(os.urandom(32), main.session.id)  # the public id, a guessed key
        with pytest.raises(AuthenticationError, match="server rejected our proof"):
            transport.connect("127.0.0.1", lst.port, psk=KEY, join=(forged, 0))
        t.join(10)
        srv_main, srv_good, refused = accepted
        assert isinstance(srv_main, SealedChannel) and isinstance(srv_good, SealedChannel)
        assert srv_good.session == srv_main.session and srv_good.stream == 3
        assert isinstance(refused, AuthenticationError)
        for ch in (main, good, srv_main, srv_good):
            ch.close()  # type: ignore[union-attr]


def test_unix_socket_in_a_private_directory_needs_no_other_credential(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = str(private / "mig.sock")
    with transport.listen_at(transport.parse_address(f"unix:{path}")) as lst:
        t = threading.Thread(target=lambda: lst.accept(timeout=10).sendall(b"ok"), daemon=True)
        t.start()
        with transport.connect_to(transport.parse_address(f"unix:{path}")) as ch:
            assert ch.recv(2) == b"ok"
        t.join(10)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(transport.TransportError, match="only its owner"):
        transport.listen_at(transport.parse_address(f"unix:{shared}/mig.sock"))
    with pytest.raises(transport.TransportError, match="only its owner"):
        transport.connect_to(transport.parse_address(f"unix:{shared}/mig.sock"))
