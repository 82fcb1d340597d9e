"""The migration transport: TCP, mutual TLS or a pre-shared-key handshake, scatter/gather I/O.

This is the only module of `ptmig.migration` that touches sockets. It carries bytes; the protocol
(`protocol.Connection`) decides what they mean. `recv_event` / `send_event` / `send_pages` glue
the two together for an engine.

Security by default: `listen` and `connect` refuse a non-loopback address unless the stream is
authenticated (TLS with mutual certificates, or a PSK), or the caller says `insecure=True`.

PSK handshake (runs before any migration byte is accepted, over TLS too if both are given):
    server → client   b"PTMIG-PSK1" + nonce_s (32 random bytes)
    client → server   nonce_c (32) + HMAC-SHA256(key, b"client" + nonce_s + nonce_c)
    server → client   b"\\x01" + HMAC-SHA256(key, b"server" + nonce_c + nonce_s)
                      (or b"\\x00" + 32 zero bytes if the client's proof is wrong)
    client → server   b"\\x01" if the server's proof is right, else b"\\x00"
Both proofs are compared with `hmac.compare_digest`. It authenticates; it does not encrypt.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ptmig.migration.events import NEED_DATA, Event, PageRunsHeader
from ptmig.migration.protocol import Connection, ConnectionClosed

PSK_GREETING = b"PTMIG-PSK1"
_NONCE = 32
_MAC = 32
try:
    IOV_MAX = min(int(os.sysconf("SC_IOV_MAX")), 1024)
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024
KEEPALIVE_IDLE_S = 10
RECEIVE_BUFFER = 1 << 20  # bytes: the destination's socket receive buffer (see listen)
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


class TransportError(Exception):
    """The connection failed: closed, reset, timed out, or refused."""


class AuthenticationError(TransportError):
    """The peer could not be authenticated (TLS or PSK); no migration data was exchanged."""


@dataclass(frozen=True)
class TlsConfig:
    """PEM paths: this side's certificate and key, and the CA that signs the peer's.

    `server_hostname` (client only) is the name checked against the server certificate;
    by default the host passed to `connect`."""

    cert: str
    key: str
    ca: str
    server_hostname: str | None = None


def is_loopback(host: str) -> bool:
    """True if `host` names only loopback addresses (resolving names)."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _require_secure(
    host: str, tls: TlsConfig | None, psk: bytes | None, insecure: bool, what: str
) -> None:
    if tls is None and psk is None and not insecure and not is_loopback(host):
        raise TransportError(
            f"refusing to {what} {host!r} without TLS or a pre-shared key: a migration stream "
            "carries guest memory and vCPU state; pass tls=..., psk=..., or insecure=True"
        )
    if psk is not None and len(psk) < 16:
        raise ValueError(f"pre-shared key is {len(psk)} bytes; use at least 16")


def _tune(sock: socket.socket, inactivity_timeout: float) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    sock.settimeout(inactivity_timeout)


class SharedActivity:
    """When any stream of one migration last received bytes: the streams' common watchdog.

    A migration with data channels is one conversation over several streams, and a silent stream
    does not mean a silent peer: while a round's pages flow on the data channels the main stream
    carries nothing, and a data channel whose stripes are done idles until the others finish the
    round. So the streams share this clock, and a receive gives up only once *no* stream of the
    migration has made progress for its inactivity timeout. (The alternative, keep-alive frames
    on every idle stream, would put timers into the sender and a new frame into the protocol to
    say what the receiving side can already see.)"""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def quiet_for(self) -> float:
        return time.monotonic() - self.last


class Channel:
    """An authenticated, connected byte stream with scatter/gather send and exact receives.

    Every blocking call fails with TransportError after `inactivity_timeout` seconds without
    progress (of any stream sharing its `activity` clock, for a receive); TCP keepalive detects
    a peer host that vanished while we wait for nothing."""

    def __init__(self, sock: socket.socket, inactivity_timeout: float, peer: str) -> None:
        self.sock = sock
        self.inactivity_timeout = inactivity_timeout
        self.peer = peer
        self.is_tls = isinstance(sock, ssl.SSLSocket)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.activity: SharedActivity | None = None
        self._waiting_longer = False  # the socket's timeout is shortened (see `_wait_longer`)

    def unacknowledged(self) -> int:
        """Bytes sent that the peer's TCP has not acknowledged yet (SIOCOUTQ); 0 if unknown.
        With the receiver's buffer bounded (`RECEIVE_BUFFER`), what is still here is what the
        receiving process has not caught up with."""
        try:
            raw = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, ValueError):
            return 0
        return int(struct.unpack("i", raw)[0])

    def note_received(self, nbytes: int) -> None:
        """Count bytes received (also by a caller reading the socket itself, e.g. splice)."""
        self.bytes_received += nbytes
        if self.activity is not None:
            self.activity.touch()
        if self._waiting_longer:  # progress: the whole timeout applies again, to sends too
            self._waiting_longer = False
            self.sock.settimeout(self.inactivity_timeout)

    def patience(self) -> float:
        """After a receive timed out: seconds it may still wait, because another stream of the
        same migration made progress within the inactivity timeout (≤ 0: give up)."""
        if self.activity is None:
            return 0.0
        return self.inactivity_timeout - self.activity.quiet_for()

    def _wait_longer(self, e: BaseException) -> bool:
        """True if the receive that raised `e` should be retried (see `patience`); the socket
        then times out when the migration's shared clock says it has been quiet long enough."""
        if not isinstance(e, TimeoutError) or (left := self.patience()) <= 0:
            return False
        self.sock.settimeout(left)
        self._waiting_longer = True
        return True

    def _fail(self, e: BaseException, doing: str) -> TransportError:
        if isinstance(e, TimeoutError | socket.timeout):
            return TransportError(
                f"{doing}: no progress from {self.peer} for {self.inactivity_timeout} s "
                "(peer unresponsive)"
            )
        return TransportError(f"{doing}: connection to {self.peer} failed: {e}")

    def send_buffers(self, buffers: Sequence[bytes | bytearray | memoryview]) -> int:
        """Send all buffers in order (sendmsg scatter lists of ≤ IOV_MAX; sendall under TLS)."""
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
        total = sum(v.nbytes for v in views)
        try:
            if self.is_tls:
                for v in views:
                    self.sock.sendall(v)
            else:
                i = 0
                while i < len(views):
                    n = self.sock.sendmsg(views[i : i + IOV_MAX])
                    while n:  # drop what went out; keep the tail of a partly sent buffer
                        if n >= views[i].nbytes:
                            n -= views[i].nbytes
                            i += 1
                        else:
                            views[i] = views[i][n:]
                            n = 0
        except (OSError, ssl.SSLError) as e:
            raise self._fail(e, f"sending {total} bytes") from e
        self.bytes_sent += total
        return total

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self.send_buffers([data])

    def recv(self, max_bytes: int = 1 << 20) -> bytes:
        """Up to max_bytes; b"" when the peer closed its end cleanly."""
        while True:
            try:
                data = self.sock.recv(max_bytes)
                break
            except (OSError, ssl.SSLError) as e:
                if not self._wait_longer(e):
                    raise self._fail(e, "receiving") from e
        self.note_received(len(data))
        return data

    def recv_nowait(self, max_bytes: int = 1 << 16) -> bytes | None:
        """What the peer has sent so far, without waiting: None if nothing (b"" once it closed).
        For watching a stream this side otherwise only sends on; not while another thread
        uses the stream."""
        self.sock.settimeout(0)
        try:
            data = self.sock.recv(max_bytes)
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except (OSError, ssl.SSLError) as e:
            raise self._fail(e, "receiving") from e
        finally:
            self.sock.settimeout(self.inactivity_timeout)
        self.note_received(len(data))
        return data

    def recv_into_exact(self, view: memoryview | bytearray) -> None:
        """Fill `view` completely (e.g. a slice of guest memory), or raise TransportError."""
        mv = memoryview(view).cast("B")
        pos, total = 0, mv.nbytes
        while pos < total:
            try:
                n = self.sock.recv_into(mv[pos:], total - pos)
            except (OSError, ssl.SSLError) as e:
                if self._wait_longer(e):
                    continue
                raise self._fail(e, f"receiving {total} bytes (got {pos})") from e
            if n == 0:
                raise TransportError(
                    f"peer {self.peer} closed the connection after {pos} of {total} bytes"
                )
            pos += n
            self.note_received(n)

    def abort(self) -> None:
        """Unblock every send and receive in progress on this stream, from any thread, and
        drop the connection (the peer sees it end). The TLS layer is left alone: another
        thread may be inside it; `close` releases everything later."""
        self._shutdown(socket.SHUT_RDWR)

    def interrupt_receive(self) -> None:
        """Make a receive in progress (and every later one) return end-of-stream at once,
        while this side can still send, e.g. the reason it gives up."""
        self._shutdown(socket.SHUT_RD)

    def _shutdown(self, how: int) -> None:
        # The plain socket's shutdown: `SSLSocket.shutdown` would also drop the TLS state, and
        # a later send would then go out unencrypted.
        try:
            socket.socket.shutdown(self.sock, how)
        except OSError:
            pass

    def close(self) -> None:
        """Orderly close: tell the peer we are done sending, then release the socket."""
        try:
            if self.is_tls:
                self.sock = self.sock.unwrap()  # type: ignore[attr-defined]
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ssl.SSLError, ValueError):
            pass
        self.sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray()
    try:
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise AuthenticationError(f"peer closed the connection during {what}")
            buf += chunk
    except TimeoutError as e:
        raise AuthenticationError(f"timed out waiting for {what}") from e
    except (OSError, ssl.SSLError) as e:
        raise AuthenticationError(f"connection failed during {what}: {e}") from e
    return bytes(buf)


def _mac(key: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, label + a + b, hashlib.sha256).digest()


def _psk_server(sock: socket.socket, key: bytes) -> None:
    nonce_s = secrets.token_bytes(_NONCE)
    sock.sendall(PSK_GREETING + nonce_s)
    reply = _recv_exact(sock, _NONCE + _MAC, "the client's PSK proof")
    nonce_c, proof = reply[:_NONCE], reply[_NONCE:]
    if not hmac.compare_digest(proof, _mac(key, b"client", nonce_s, nonce_c)):
        sock.sendall(b"\x00" + bytes(_MAC))
        raise AuthenticationError(
            "PSK authentication failed: the client's proof does not match our key "
            "(the two sides have different pre-shared keys)"
        )
    sock.sendall(b"\x01" + _mac(key, b"server", nonce_c, nonce_s))
    if _recv_exact(sock, 1, "the client's PSK verdict") != b"\x01":
        raise AuthenticationError("PSK authentication failed: the client rejected our proof")


def _psk_client(sock: socket.socket, key: bytes) -> None:
    hello = _recv_exact(
        sock, len(PSK_GREETING) + _NONCE, "the server's PSK challenge (does it use a PSK?)"
    )
    if not hello.startswith(PSK_GREETING):
        raise AuthenticationError(
            f"expected a PSK challenge, got {hello[: len(PSK_GREETING)]!r}: "
            "the server is not using a pre-shared key"
        )
    nonce_s = hello[len(PSK_GREETING) :]
    nonce_c = secrets.token_bytes(_NONCE)
    sock.sendall(nonce_c + _mac(key, b"client", nonce_s, nonce_c))
    verdict = _recv_exact(sock, 1 + _MAC, "the server's PSK verdict")
    if verdict[0] != 1:
        raise AuthenticationError(
            "PSK authentication failed: the server rejected our proof "
            "(the two sides have different pre-shared keys)"
        )
    if not hmac.compare_digest(verdict[1:], _mac(key, b"server", nonce_c, nonce_s)):
        sock.sendall(b"\x00")
        raise AuthenticationError(
            "PSK authentication failed: the server's proof does not match our key"
        )
    sock.sendall(b"\x01")


def _server_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the client must present a CA-signed cert
    return ctx


def _client_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    return ctx


class Listener:
    """A listening socket; `accept` returns an authenticated Channel."""

    def __init__(
        self,
        sock: socket.socket,
        tls: TlsConfig | None,
        psk: bytes | None,
        inactivity_timeout: float,
    ) -> None:
        self.sock = sock
        self._ctx = _server_context(tls) if tls else None
        self._psk = psk
        self.inactivity_timeout = inactivity_timeout

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    def accept(self, timeout: float | None = None) -> Channel:
        """Wait for one source, authenticate it, and return the channel."""
        self.sock.settimeout(timeout)
        try:
            raw, addr = self.sock.accept()
        except TimeoutError as e:
            raise TransportError(f"no incoming migration within {timeout} s") from e
        peer = f"{addr[0]}:{addr[1]}"
        _tune(raw, self.inactivity_timeout)
        sock: socket.socket = raw
        try:
            if self._ctx is not None:
                try:
                    sock = self._ctx.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    raise AuthenticationError(f"TLS handshake with {peer} failed: {e}") from e
            if self._psk is not None:
                _psk_server(sock, self._psk)
        except BaseException:
            sock.close()
            raise
        return Channel(sock, self.inactivity_timeout, peer)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def listen(
    host: str,
    port: int,
    tls: TlsConfig | None = None,
    psk: bytes | None = None,
    insecure: bool = False,
    *,
    inactivity_timeout: float = 30.0,
) -> Listener:
    """Listen for an incoming migration (port 0 picks a free port: see `Listener.port`)."""
    _require_secure(host, tls, psk, insecure, "listen on")
    try:
        sock = socket.create_server((host, port))
        # Set before any connection: accepted sockets inherit it, and a bounded receive buffer
        # keeps the bytes the destination has not processed on the source's side, where the
        # source can see them (`Channel.unacknowledged`) before it stops the guest.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError as e:
        raise TransportError(f"cannot listen on {host}:{port}: {e}") from e
    return Listener(sock, tls, psk, inactivity_timeout)


def connect(
    host: str,
    port: int,
    tls: TlsConfig | None = None,
    psk: bytes | None = None,
    insecure: bool = False,
    *,
    timeout: float = 10.0,
    inactivity_timeout: float = 30.0,
) -> Channel:
    """Connect to a destination and authenticate both ends."""
    _require_secure(host, tls, psk, insecure, "connect to")
    peer = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise TransportError(f"cannot connect to {peer}: {e}") from e
    _tune(raw, inactivity_timeout)
    sock: socket.socket = raw
    try:
        if tls is not None:
            try:
                sock = _client_context(tls).wrap_socket(
                    raw, server_hostname=tls.server_hostname or host
                )
            except (ssl.SSLError, OSError) as e:
                raise AuthenticationError(f"TLS handshake with {peer} failed: {e}") from e
        if psk is not None:
            _psk_client(sock, psk)
    except BaseException:
        sock.close()
        raise
    return Channel(sock, inactivity_timeout, peer)


# ---- glue between a Channel and a protocol Connection --------------------------------------


def send_event(channel: Channel, conn: Connection, event: Event) -> int:
    """Encode one event with `conn` and send it; returns bytes sent."""
    return channel.send_buffers([conn.send(event)])


def send_pages(
    channel: Channel, conn: Connection, runs: Any, guest_mem: memoryview, checksum: bool = False
) -> int:
    """Send one page-run batch straight from guest memory; returns bytes sent."""
    return channel.send_buffers(conn.send_pages(runs, guest_mem, checksum=checksum))


def recv_event(
    channel: Channel,
    conn: Connection,
    guest_mem: memoryview | bytearray | None = None,
    max_read: int = 1 << 20,
) -> Event | ConnectionClosed:
    """Next event from the peer. For a PageRunsHeader the payload is first received straight
    into `guest_mem` (recv_into on validated slices), so the batch is complete on return."""
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            conn.receive_data(channel.recv(max_read))
            continue
        if isinstance(ev, PageRunsHeader):
            if guest_mem is None:
                raise ValueError("a PageRunsHeader arrived but recv_event got no guest_mem")
            for target in conn.payload_targets(guest_mem):
                channel.recv_into_exact(target)
                conn.payload_received(target.nbytes)
        return ev  # type: ignore[return-value]


def measure_loopback_stream(nbytes: int, chunk: int = 4 << 20) -> float:
    """Bytes/s of a plain Python TCP loopback stream (sendall of big memoryview chunks,
    recv_into a buffer): the baseline a migration stream is compared against."""
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, not {nbytes}")
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    result: dict[str, float] = {}

    def receiver() -> None:
        conn, _ = srv.accept()
        buf = memoryview(bytearray(chunk))
        got = 0
        with conn:
            while got < nbytes:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                got += n
        result["end"] = time.perf_counter()
        result["got"] = got

    t = threading.Thread(target=receiver, daemon=True)
    t.start()
    data = memoryview(bytearray(os.urandom(1024)) * (chunk // 1024))
    with socket.create_connection(("127.0.0.1", port)) as c:
        start = time.perf_counter()
        left = nbytes
        while left:
            k = min(left, chunk)
            c.sendall(data[:k])
            left -= k
        c.shutdown(socket.SHUT_WR)
        t.join()
    srv.close()
    if result.get("got") != nbytes:
        raise TransportError(f"loopback stream lost data: {result.get('got')} of {nbytes} bytes")
    return nbytes / (result["end"] - start)
