"""The transport over real loopback sockets: PSK, mutual TLS, refusals, vanishing peers, and a
full protocol session with pages received straight into guest memory."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pkirig import make_pki

from ptmig.migration import (
    Complete,
    Connection,
    DeviceStates,
    Role,
    RoundEnd,
    RoundStart,
    State,
    SwitchoverAck,
    VcpuStates,
    check_hello,
    hello,
    seal,
)
from ptmig.migration.pages import bitmap_to_runs, split_zero_runs
from ptmig.migration.transport import (
    AuthenticationError,
    Channel,
    SharedActivity,
    TlsConfig,
    TransportError,
    connect,
    listen,
    measure_loopback_stream,
    recv_event,
    send_event,
    send_pages,
)

KEY = b"k" * 32


def serve(
    listener: Any, fn: Callable[[Channel], Any] | None = None
) -> tuple[threading.Thread, dict]:
    """Accept one connection in a thread; record the result or the exception."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            ch = listener.accept(timeout=10)
            out["result"] = fn(ch) if fn else None
            ch.close()
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def echo_100(ch: Channel) -> bytes:
    buf = bytearray(100)
    ch.recv_into_exact(buf)
    ch.sendall(bytes(buf[::-1]))
    return bytes(buf)


def test_plain_loopback_scatter_gather_roundtrip() -> None:
    with listen("127.0.0.1", 0, insecure=True) as lst:
        t, out = serve(lst, echo_100)
        with connect("127.0.0.1", lst.port, insecure=True) as ch:
            data = bytes(range(100))
            ch.send_buffers([data[:10], memoryview(data)[10:60], bytearray(data[60:])])
            back = bytearray(100)
            ch.recv_into_exact(back)
        t.join(10)
    assert out == {"result": data} and bytes(back) == data[::-1]


def test_send_buffers_handles_more_than_iov_max_and_partial_sends() -> None:
    """5000 buffers of 1 KiB: several sendmsg calls, with partial sends on a full socket."""
    bufs = [np.full(1024, i % 251, np.uint8).tobytes() for i in range(5000)]
    want = b"".join(bufs)

    def read_all(ch: Channel) -> bytes:
        got = bytearray(len(want))
        ch.recv_into_exact(got)
        return bytes(got)

    with listen("127.0.0.1", 0, insecure=True) as lst:
        t, out = serve(lst, read_all)
        with connect("127.0.0.1", lst.port, insecure=True) as ch:
            ch.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            assert ch.send_buffers(bufs) == len(want)
        t.join(10)
    assert out["result"] == want


def test_psk_right_key() -> None:
    with listen("127.0.0.1", 0, psk=KEY) as lst:
        t, out = serve(lst, echo_100)
        with connect("127.0.0.1", lst.port, psk=KEY) as ch:
            ch.sendall(b"x" * 100)
            back = bytearray(100)
            ch.recv_into_exact(back)
        t.join(10)
    assert out == {"result": b"x" * 100}


def test_psk_wrong_key_fails_on_both_sides_before_any_data() -> None:
    with listen("127.0.0.1", 0, psk=KEY) as lst:
        t, out = serve(lst, echo_100)
        with pytest.raises(AuthenticationError, match="server rejected our proof"):
            connect("127.0.0.1", lst.port, psk=b"w" * 32)
        t.join(10)
    assert isinstance(out["error"], AuthenticationError)
    assert "client's proof does not match" in str(out["error"])
    assert "result" not in out


def test_plain_client_against_psk_server_gets_no_data_through() -> None:
    with listen("127.0.0.1", 0, psk=KEY) as lst:
        t, out = serve(lst, echo_100)
        with connect("127.0.0.1", lst.port, insecure=True) as ch:  # no PSK: sends bytes directly
            ch.sendall(b"\x00" * 64)
            assert ch.recv(100).startswith(b"PTMIG-PSK2")  # the server's challenge, not data
        t.join(10)
    assert isinstance(out["error"], AuthenticationError)


def test_unauthenticated_refused_everywhere_loopback_included() -> None:
    for host in ("0.0.0.0", "127.0.0.1", "::1", "localhost"):
        with pytest.raises(TransportError, match=f"refusing to listen on {host}:0 without auth"):
            listen(host, 0)
        with pytest.raises(TransportError, match="refusing to connect to .* without auth"):
            connect(host, 4444)
    listen("0.0.0.0", 0, insecure=True).close()
    listen("0.0.0.0", 0, psk=KEY).close()


def test_peer_disappears_mid_stream() -> None:
    def half_then_vanish(ch: Channel) -> None:
        ch.sendall(b"y" * 1000)
        ch.sock.close()  # no orderly goodbye

    with listen("127.0.0.1", 0, insecure=True) as lst:
        t, _ = serve(lst, half_then_vanish)
        with connect("127.0.0.1", lst.port, insecure=True) as ch:
            with pytest.raises(TransportError, match="closed the connection after 1000 of 4096"):
                ch.recv_into_exact(bytearray(4096))
        t.join(10)


def test_silent_peer_hits_the_inactivity_timeout() -> None:
    stop = threading.Event()
    with listen("127.0.0.1", 0, insecure=True) as lst:
        t, _ = serve(lst, lambda ch: stop.wait(10))
        with connect("127.0.0.1", lst.port, insecure=True, inactivity_timeout=0.3) as ch:
            with pytest.raises(TransportError, match="no progress .* for 0.3 s"):
                ch.recv_into_exact(bytearray(10))
        stop.set()
        t.join(10)


def test_streams_sharing_an_activity_clock_time_out_only_when_all_are_quiet() -> None:
    """A data-channel migration leaves the main stream idle while the pages flow elsewhere:
    with a shared clock the idle stream waits as long as a sibling makes progress, then gives
    up one inactivity timeout after the last byte on any of them (alone it would after 0.3 s)."""
    busy_for = 1.0
    with listen("127.0.0.1", 0, insecure=True, inactivity_timeout=0.3) as lst:
        activity = SharedActivity()
        with (
            connect("127.0.0.1", lst.port, insecure=True) as _,
            connect("127.0.0.1", lst.port, insecure=True) as busy_src,
        ):
            quiet, busy = lst.accept(timeout=10), lst.accept(timeout=10)
            quiet.activity = busy.activity = activity

            def trickle() -> None:
                end = time.monotonic() + busy_for
                while time.monotonic() < end:
                    busy_src.sendall(b"x")
                    time.sleep(0.05)

            progress: list[float] = []  # when the busy stream delivered bytes

            def drain() -> None:
                try:
                    while busy.recv(100):
                        progress.append(time.monotonic())
                except TransportError:
                    pass

            threads = [threading.Thread(target=f, daemon=True) for f in (trickle, drain)]
            for t in threads:
                t.start()
            with pytest.raises(TransportError, match="no progress .* for 0.3 s"):
                quiet.recv_into_exact(bytearray(10))
            gave_up = time.monotonic()
            # judged by events, not by the wall clock (a loaded host may stretch the trickle):
            # the quiet stream outlived several of its sibling's deliveries, and gave up only
            # one inactivity timeout after the last delivery before it
            before = [t for t in progress if t <= gave_up]
            assert len(before) >= 3, f"gave up after {len(before)} deliveries of its sibling"
            assert gave_up - before[-1] >= 0.3 - 0.02, (gave_up, before[-1])
            for t in threads:
                t.join(10)
            quiet.close()
            busy.close()


def test_protocol_session_over_tcp_into_guest_memory() -> None:
    pages, ps = 256, 4096
    rng = np.random.default_rng(7)
    src_ram = bytearray(rng.integers(0, 256, pages * ps, dtype=np.uint8).tobytes())
    np.frombuffer(src_ram, np.uint8).reshape(pages, ps)[::3] = 0
    dst_ram = bytearray(b"\x55" * pages * ps)
    fp = {"mem_size": pages * ps, "vcpus": 1}

    def destination(ch: Channel) -> list[str]:
        conn = Connection(Role.DESTINATION, guest_pages=pages)
        seen = []
        while True:
            ev = recv_event(ch, conn, dst_ram)
            seen.append(type(ev).__name__)
            if type(ev).__name__ == "Hello":
                send_event(ch, conn, check_hello(ev, fp))  # type: ignore[arg-type]
            if isinstance(ev, Complete):
                send_event(ch, conn, SwitchoverAck(True))
                return seen

    with listen("127.0.0.1", 0, psk=KEY) as lst:
        t, out = serve(lst, destination)
        with connect("127.0.0.1", lst.port, psk=KEY) as ch:
            conn = Connection(Role.SOURCE, guest_pages=pages)
            send_event(ch, conn, hello(fp))
            assert recv_event(ch, conn).accepted  # type: ignore[union-attr]
            bitmap = np.full(pages // 64, np.uint64(2**64 - 1))
            send_event(ch, conn, RoundStart(0, pages))
            for runs in bitmap_to_runs(bitmap, 100):
                send_pages(ch, conn, split_zero_runs(src_ram, runs), memoryview(src_ram))
            send_event(ch, conn, RoundEnd(0))
            send_event(ch, conn, VcpuStates(b"regs"))
            send_event(ch, conn, DeviceStates(b"devs"))
            send_event(ch, conn, Complete())
            assert recv_event(ch, conn) == SwitchoverAck(True)
            assert conn.state is State.SWITCHED_OVER
        t.join(10)
    assert "error" not in out, out
    assert out["result"].count("PageRunsHeader") >= 3
    assert dst_ram == src_ram


def _mixed_runs(pages: int) -> np.ndarray:
    """One batch of every kind of run a sealed sender treats differently: long runs (sealed
    from guest memory, one over a record), more one-page runs than a record holds (gathered in
    several records), ZERO runs between them, and short and long runs alternating."""
    from ptmig.migration.events import RunKind, make_runs

    runs = [(0, 300, RunKind.DATA), (300, 2, RunKind.ZERO)]  # 300 pages: over a 1 MiB record
    runs += [(p, 1, RunKind.DATA) for p in range(302, 302 + 2 * 300, 2)]  # 300 short runs
    runs += [(902, 20, RunKind.DATA), (922, 3, RunKind.DATA)]  # long, then short ...
    runs += [(930, 16, RunKind.DATA), (950, 15, RunKind.DATA), (970, 17, RunKind.ZERO)]
    runs += [(1000, 24, RunKind.DATA)]  # ... and a long run last
    assert runs[-1][0] + runs[-1][1] <= pages
    start, n, kind = (np.array(x) for x in zip(*runs, strict=True))
    return make_runs(start, n, kind.astype(np.int8))


@pytest.mark.parametrize("psk", [KEY, None], ids=["sealed", "plain"])
def test_a_batch_of_long_short_and_zero_runs_arrives_byte_exact(psk: bytes | None) -> None:
    pages, ps = 1024, 4096
    rng = np.random.default_rng(11)
    src_ram = bytearray(rng.integers(1, 256, pages * ps, dtype=np.uint8).tobytes())
    dst_ram = bytearray(b"\x55" * pages * ps)
    runs = _mixed_runs(pages)
    want = bytearray(dst_ram)
    for start, n, kind in zip(runs["start"], runs["npages"], runs["kind"], strict=True):
        a, b = int(start) * ps, (int(start) + int(n)) * ps
        want[a:b] = src_ram[a:b] if kind == 0 else bytes(b - a)
    fp = {"mem_size": pages * ps, "vcpus": 1}

    def destination(ch: Channel) -> None:
        conn = Connection(Role.DESTINATION, guest_pages=pages)
        while True:
            ev = recv_event(ch, conn, dst_ram)
            if type(ev).__name__ == "Hello":
                send_event(ch, conn, check_hello(ev, fp))  # type: ignore[arg-type]
            if isinstance(ev, RoundEnd):
                return

    with listen("127.0.0.1", 0, psk=psk, insecure=psk is None) as lst:
        t, out = serve(lst, destination)
        with connect("127.0.0.1", lst.port, psk=psk, insecure=psk is None) as ch:
            conn = Connection(Role.SOURCE, guest_pages=pages)
            send_event(ch, conn, hello(fp))
            assert recv_event(ch, conn).accepted  # type: ignore[union-attr]
            send_event(ch, conn, RoundStart(0, int(runs["npages"].sum())))
            sent = send_pages(ch, conn, runs, memoryview(src_ram))
            send_event(ch, conn, RoundEnd(0))
        t.join(10)
    assert "error" not in out, out
    data = int(runs["npages"][runs["kind"] == 0].sum())
    assert sent > data * ps and conn.bytes_sent >= data * ps
    assert dst_ram == want


def test_measure_loopback_stream_reports_a_rate() -> None:
    assert measure_loopback_stream(64 << 20) > 10e6


# ---- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls(d: Path, name: str, ca: str = "ca", host: str | None = None) -> TlsConfig:
    return TlsConfig(str(d / f"{name}.pem"), str(d / f"{name}.key"), str(d / f"{ca}.pem"), host)


def test_tls_mutual_auth_works(pki: Path) -> None:
    with listen("127.0.0.1", 0, tls=tls(pki, "server")) as lst:
        t, out = serve(lst, echo_100)
        with connect("127.0.0.1", lst.port, tls=tls(pki, "client")) as ch:
            assert ch.is_tls
            ch.send_buffers([b"a" * 50, memoryview(b"b" * 50)])
            back = bytearray(100)
            ch.recv_into_exact(back)
        t.join(10)
    assert out == {"result": b"a" * 50 + b"b" * 50}
    assert bytes(back) == b"b" * 50 + b"a" * 50


def test_psk_inside_tls_data_channels_join_the_main_streams_session(pki: Path) -> None:
    """PSK and TLS together: TLS protects the bytes (no second sealing), and the PSK session
    still names the migration, so a data channel joins it with its proof and a guessed
    session key is refused (before the fix the TLS channel carried no session: data
    channels started sessions of their own and the destination could not tie them)."""
    with listen("127.0.0.1", 0, tls=tls(pki, "server"), psk=KEY) as lst:
        accepted: list[object] = []

        def serve_three() -> None:
            for _ in range(3):
                try:
                    accepted.append(lst.accept(timeout=10))
                except AuthenticationError as e:
                    accepted.append(e)

        t = threading.Thread(target=serve_three, daemon=True)
        t.start()
        client = tls(pki, "client")
        main = connect("127.0.0.1", lst.port, tls=client, psk=KEY)
        assert main.is_tls and not main.sealed and main.session is not None
        good = connect("127.0.0.1", lst.port, tls=client, psk=KEY, join=(main.session, 1))
        forged = seal.Session(os.urandom(32), main.session.id)
        with pytest.raises(AuthenticationError, match="server rejected our proof"):
            connect("127.0.0.1", lst.port, tls=client, psk=KEY, join=(forged, 0))
        t.join(10)
        srv_main, srv_good, refused = accepted
        assert isinstance(srv_main, Channel) and isinstance(srv_good, Channel)
        assert srv_main.is_tls and not srv_good.sealed
        assert srv_main.session == main.session and srv_main.stream == 0
        assert srv_good.session == srv_main.session and srv_good.stream == 2
        assert isinstance(refused, AuthenticationError)
        good.send_buffers([b"p" * 4096])
        got = bytearray(4096)
        srv_good.recv_into_exact(got)
        assert bytes(got) == b"p" * 4096
        for ch in (main, good, srv_main, srv_good):
            ch.close()  # type: ignore[union-attr]


def _unread_bytes(sock: socket.socket) -> int:
    import array
    import fcntl
    import termios

    n = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, n)
    return n[0]


def test_a_tls_server_sends_no_session_tickets(pki: Path) -> None:
    """A ticket the client never reads (a data channel only sends) would sit in its socket at
    close and turn the close into a reset, dropping the end of the stream."""
    done = threading.Event()

    def read_one_then_hold(ch: Channel) -> int:
        n = len(ch.recv(16))
        done.wait(10)  # (its own close sends a close_notify: not before the check)
        return n

    with listen("127.0.0.1", 0, tls=tls(pki, "server")) as lst:
        t, out = serve(lst, read_one_then_hold)
        ch = connect("127.0.0.1", lst.port, tls=tls(pki, "client"))
        ch.sendall(b"x")
        time.sleep(0.3)  # whatever the server sent after the handshake is here by now
        unread = _unread_bytes(ch.sock)
        done.set()
        t.join(10)
        ch.close()
    assert out == {"result": 1}
    assert unread == 0


def test_closing_with_unread_bytes_still_ends_the_stream_cleanly() -> None:
    """The peer said something the closing side never read: the close discards it first, so
    the peer gets the whole stream and a clean end, not a reset."""

    def talk_then_read_all(ch: Channel) -> tuple[int, int]:
        ch.sendall(b"unread" * 100)
        time.sleep(0.3)  # the client has sent and closed by now
        reset = ch.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # ECONNRESET: a reset
        got = 0
        while data := ch.recv(1 << 16):
            got += len(data)
        return got, reset

    with listen("127.0.0.1", 0, insecure=True) as lst:
        t, out = serve(lst, talk_then_read_all)
        ch = connect("127.0.0.1", lst.port, insecure=True)
        time.sleep(0.1)  # the peer's bytes arrive; nobody reads them
        assert _unread_bytes(ch.sock) == 600
        ch.send_buffers([b"d" * (1 << 20)])
        ch.close()
        t.join(10)
    assert out == {"result": (1 << 20, 0)}, out


def test_tls_close_sends_its_goodbye_without_waiting_for_a_peer_that_only_reads(
    pki: Path,
) -> None:
    """A TLS stream closed by the side that sent (a source's data channel after its round)
    while the peer, which only reads, keeps its end open until its attempt ends: the peer
    sees a clean end of stream, and the close does not wait for the peer's own goodbye
    (before: up to the inactivity timeout, which stalled every TLS data channel)."""
    eof, release = threading.Event(), threading.Event()

    def read_to_the_end_then_hold(ch: Channel) -> int:
        got = 0
        while data := ch.recv(1 << 16):
            got += len(data)
        eof.set()
        release.wait(60)
        return got

    with listen("127.0.0.1", 0, tls=tls(pki, "server")) as lst:
        t, out = serve(lst, read_to_the_end_then_hold)
        ch = connect("127.0.0.1", lst.port, tls=tls(pki, "client"), inactivity_timeout=120)
        ch.send_buffers([b"d" * (4 << 20)])
        closer = threading.Thread(target=ch.close, daemon=True)
        closer.start()
        closer.join(30)
        closed = not closer.is_alive()
        assert eof.wait(30), out
        release.set()
        t.join(10)
    assert closed, "close() waited for the peer's close_notify"
    assert out == {"result": 4 << 20}


class _OneThreadInside:
    """Counts the moments two threads are inside one TLS connection at once (the swapped-in
    class of a real SSLSocket: its calls still do what they did)."""

    overlaps = 0
    _inside: set[int] = set()
    _guard = threading.Lock()

    @classmethod
    def watch(cls, sock: socket.socket) -> None:
        import ssl

        class Watched(ssl.SSLSocket):
            def recv_into(self, *a: Any, **kw: Any) -> Any:
                with cls._entered():
                    return super().recv_into(*a, **kw)

            def sendall(self, *a: Any, **kw: Any) -> Any:
                with cls._entered():
                    return super().sendall(*a, **kw)

            def pending(self) -> int:
                with cls._entered():
                    return super().pending()

        sock.__class__ = Watched

    @classmethod
    @contextlib.contextmanager
    def _entered(cls) -> Iterator[None]:
        me = threading.get_ident()
        with cls._guard:
            if cls._inside - {me}:
                cls.overlaps += 1
            cls._inside.add(me)
        try:
            yield
        finally:
            with cls._guard:
                cls._inside.discard(me)


def test_a_tls_stream_read_beside_a_sending_thread_is_never_used_by_both_at_once(
    pki: Path,
) -> None:
    """The destination's post-copy over TLS: its receiver reads pages while its fetcher sends
    requests on the same connection. OpenSSL's connection object is not thread-safe, so the
    receiver waits for bytes outside the sender's lock and reads under it: no moment has both
    threads inside the connection, and every byte of both directions arrives. (A plain `recv`
    waits inside the connection: the sends land in that wait; CI lost a recovery over TLS.)"""
    total, requests = 2 << 20, 300
    lock = threading.Lock()
    got_back: list[int] = []

    with listen("127.0.0.1", 0, tls=tls(pki, "server")) as lst:

        def source(ch: Channel) -> int:  # one thread: bursts, and the requests between them
            n = 0
            for _ in range(total // (64 << 10)):
                ch.send_buffers([b"p" * (64 << 10)])
                while data := ch.recv_nowait():
                    n += len(data)
                time.sleep(0.002)  # the receiver waits between bursts, as post-copy's does
            while n < requests * 16 and (data := ch.recv(1 << 16)):
                n += len(data)
            got_back.append(n)
            return n

        t, _ = serve(lst, source)
        dst = connect("127.0.0.1", lst.port, tls=tls(pki, "client"), inactivity_timeout=60)
        _OneThreadInside.watch(dst.sock)

        def fetcher() -> None:
            for _ in range(requests):
                with lock:
                    dst.send_buffers([b"r" * 16])
                time.sleep(0.0005)

        f = threading.Thread(target=fetcher, daemon=True)
        f.start()
        received = 0
        while received < total:
            received += len(dst.recv_beside_sender(lock))
        f.join(60)
        t.join(60)
        dst.close()
    assert received == total and got_back == [requests * 16]
    assert _OneThreadInside.overlaps == 0


def test_a_tls_read_beside_a_sender_times_out_as_recv_does(pki: Path) -> None:
    """No bytes within the inactivity timeout: the same TransportError as `recv`'s."""
    with listen("127.0.0.1", 0, tls=tls(pki, "server")) as lst:
        release = threading.Event()
        t, _ = serve(lst, lambda ch: release.wait(30))
        dst = connect("127.0.0.1", lst.port, tls=tls(pki, "client"), inactivity_timeout=0.3)
        try:
            with pytest.raises(TransportError, match="no progress .* for 0.3 s"):
                dst.recv_beside_sender(threading.Lock())
        finally:
            release.set()
            t.join(10)
            dst.close()


def test_tls_rejects_client_cert_from_another_ca(pki: Path) -> None:
    with listen("127.0.0.1", 0, tls=tls(pki, "server")) as lst:
        t, out = serve(lst, echo_100)
        with pytest.raises(TransportError):
            ch = connect("127.0.0.1", lst.port, tls=tls(pki, "rogue"))
            ch.sendall(b"z" * 100)  # TLS 1.3 reports the client-cert failure on first use
            ch.recv_into_exact(bytearray(100))
        t.join(10)
    assert isinstance(out["error"], AuthenticationError)
    assert "TLS handshake" in str(out["error"])


def test_tls_client_rejects_server_from_another_ca(pki: Path) -> None:
    with listen("127.0.0.1", 0, tls=tls(pki, "rogue", "ca")) as lst:
        t, out = serve(lst, echo_100)
        with pytest.raises(AuthenticationError, match="certificate verify failed"):
            connect("127.0.0.1", lst.port, tls=tls(pki, "client"))
        t.join(10)
    assert "error" in out


def test_unacknowledged_counts_what_a_slow_receiver_has_not_taken() -> None:
    """The source's view of a destination that is behind: with the listener's bounded receive
    buffer, bytes the receiving process has not read stay unacknowledged at the sender."""
    from ptmig.migration import transport

    listener = transport.listen("127.0.0.1", 0, insecure=True)
    port = listener.port
    accepted: list[transport.Channel] = []
    t = threading.Thread(target=lambda: accepted.append(listener.accept()))
    t.start()
    ch = transport.connect("127.0.0.1", port, insecure=True)
    t.join(10)
    try:
        assert ch.unacknowledged() == 0
        ch.sock.setblocking(False)
        sent = 0
        try:
            while sent < 64 << 20:
                sent += ch.sock.send(b"x" * (1 << 20))
        except (TimeoutError, BlockingIOError):
            pass
        assert ch.unacknowledged() > 0, "a full receive buffer leaves bytes at the sender"
        assert sent < 32 << 20, "the destination's receive buffer is bounded"
    finally:
        ch.close()
        for a in accepted:
            a.close()
        listener.close()
