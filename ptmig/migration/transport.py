"""The migration transport: TCP or unix sockets; mutual TLS, a sealed PSK channel, or nothing.

This is the only module of `ptmig.migration` that touches sockets. It carries bytes; the protocol
(`protocol.Connection`) decides what they mean. `recv_event` / `send_event` / `send_pages` glue
the two together for an engine.

Authenticated by default: `listen` and `connect` refuse to carry a migration unless the stream
is authenticated, loopback included. The modes, and what each protects:

- TLS (mutual certificates): the stream is encrypted and integrity-protected by TLS; each side
  proves it holds a certificate signed by the other's CA.
- PSK: every stream runs the handshake of `seal` (both sides prove they know the key), and every
  byte after it travels in AES-GCM records with per-stream, per-direction keys and sequence
  numbers (`SealedChannel`): secret, and any change, replay, reordering, drop or move between
  streams is detected. Data channels join the main stream's session with a proof derived from
  its key. (With TLS as well, the PSK handshake runs inside TLS and TLS protects the bytes.)
- `unix:PATH` in a directory only this user can enter (mode 0700 or stricter, owned by us):
  the file system decides who can connect; the listener also checks the peer's uid.
- `insecure=True`: nothing; anyone who can reach the port can feed or read the migration.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import stat
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ptmig.migration import seal
from ptmig.migration.events import NEED_DATA, Event, PageRunsHeader
from ptmig.migration.pages import expand_runs
from ptmig.migration.protocol import Connection, ConnectionClosed

from ..errors import PtmigError
from ..lazyimport import lazy_module

if TYPE_CHECKING:
    import ssl
else:
    # loaded on first use (a TLS context, an SSL error to match): a VMM that never runs a TLS
    # channel does not carry the ssl module (about 1.5 MiB of its private memory)
    ssl = lazy_module("ssl")

try:
    IOV_MAX = min(int(os.sysconf("SC_IOV_MAX")), 1024)
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024
KEEPALIVE_IDLE_S = 10
RECEIVE_BUFFER = 1 << 20  # bytes: the destination's socket receive buffer (see listen)
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


def _is_tls(sock: socket.socket) -> bool:
    """Whether `sock` is an SSLSocket, asked without loading ssl: its class comes from there."""
    return any(cls.__module__ == "ssl" for cls in type(sock).__mro__)


class TransportError(PtmigError):
    """The connection failed: closed, reset, timed out, or refused."""


class AuthenticationError(TransportError):
    """The peer could not be authenticated (TLS or PSK); no migration data was exchanged."""


class IntegrityError(TransportError):
    """A sealed record failed its check: the stream was tampered with (or is corrupt)."""


@dataclass(frozen=True)
class TlsConfig:
    """PEM paths: this side's certificate and key, and the CA that signs the peer's.

    `server_hostname` (client only) is the name checked against the server certificate;
    by default the host passed to `connect`."""

    cert: str
    key: str
    ca: str
    server_hostname: str | None = None


@dataclass(frozen=True)
class Address:
    """Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`."""

    host: str = ""
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"tcp:{self.host}:{self.port}"


def parse_address(uri: str) -> Address:
    """`tcp:HOST:PORT` (IPv6 hosts in brackets) or `unix:PATH` (QEMU's migration URIs)."""
    if uri.startswith("unix:"):
        path = uri[5:]
        if not path or "\0" in path:
            raise ValueError(f"migration URI must be unix:PATH with a non-empty PATH, got {uri!r}")
        return Address(path=os.path.abspath(path))
    if not uri.startswith("tcp:"):
        raise ValueError(f"migration URI must be tcp:HOST:PORT or unix:PATH, got {uri!r}")
    host, sep, port = uri[4:].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"migration URI must be tcp:HOST:PORT, got {uri!r}")
    return Address(host=host.strip("[]"), port=int(port))


def check_private_directory(path: str) -> None:
    """A unix: socket is authenticated by its directory: refuse one that another user could
    enter (group or other permission bits) or that is not ours."""
    directory = os.path.dirname(os.path.abspath(path)) or "/"
    try:
        st = os.stat(directory)
    except OSError as e:
        raise TransportError(f"unix socket directory {directory!r}: {e}") from e
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise TransportError(
            f"refusing unix:{path}: its directory {directory!r} has mode "
            f"{st.st_mode & 0o777:#o} and owner uid {st.st_uid}; a migration socket must be in "
            f"a directory only its owner (uid {os.getuid()}) can enter (chmod 700), or be "
            "authenticated otherwise (--psk-file, TLS) or explicitly --insecure"
        )


def _require_secure(
    where: str, tls: TlsConfig | None, psk: bytes | None, insecure: bool, what: str
) -> None:
    if tls is None and psk is None and not insecure:
        raise TransportError(
            f"refusing to {what} {where} without authentication: a migration stream carries "
            "guest memory and vCPU state, and any local process can reach a loopback port; "
            "give a pre-shared key (--psk-file) or TLS, use a unix: socket in a private "
            "directory, or pass --insecure"
        )
    if psk is not None:
        seal.check_psk(psk)


def _tune(sock: socket.socket, inactivity_timeout: float) -> None:
    sock.settimeout(inactivity_timeout)
    if sock.family == socket.AF_UNIX:
        return
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
        self.is_tls = _is_tls(sock)
        # what a non-blocking read raises when nothing is there (named without loading ssl)
        self._would_block: tuple[type[OSError], ...] = (
            (BlockingIOError, ssl.SSLWantReadError) if self.is_tls else (BlockingIOError,)
        )
        self.bytes_sent = 0
        self.bytes_received = 0
        self.activity: SharedActivity | None = None
        self._waiting_longer = False  # the socket's timeout is shortened (see `_wait_longer`)
        self.session: seal.Session | None = None  # the PSK session (under a PSK, TLS or not)
        self.stream = 0  # this stream's index in its session (0: main, i + 1: data channel i)
        self.sealed = False
        self._scratch = bytearray()  # `recv`'s buffer, grown to the largest read asked for

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

    # ---- the one send loop and the one receive loop, plain or sealed -----------------------

    def send_buffers(self, buffers: Sequence[bytes | bytearray | memoryview]) -> int:
        """Send all buffers in order (sendmsg scatter lists of ≤ IOV_MAX; sendall under TLS),
        through `_outgoing` (sealing, on a sealed channel); returns the caller's byte count."""
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
        total = sum(v.nbytes for v in views)
        try:
            for batch in self._outgoing(views):
                self._send_all(batch)
        except OSError as e:  # ssl.SSLError is an OSError
            raise self._fail(e, f"sending {total} bytes") from e
        return total

    def _outgoing(self, views: list[memoryview]) -> Iterable[list[memoryview]]:
        """The pluggable step between the caller's buffers and the wire: the batches to send,
        in order (each is sent before the next is asked for). Plain: the buffers as they are."""
        return (views,)

    def _send_all(self, views: list[memoryview]) -> None:
        """Every byte of `views` onto the socket, in order (OSError / SSLError on failure)."""
        if self.is_tls:
            for v in views:
                self.sock.sendall(v)
                self.bytes_sent += v.nbytes
            return
        i = 0
        while i < len(views):
            n = self.sock.sendmsg(views[i : i + IOV_MAX])
            self.bytes_sent += n
            while n:  # drop what went out; keep the tail of a partly sent buffer
                if n >= views[i].nbytes:
                    n -= views[i].nbytes
                    i += 1
                else:
                    views[i] = views[i][n:]
                    n = 0

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self.send_buffers([data])

    def _read(self, out: memoryview, wait: bool) -> int | None:
        """One read of raw bytes from the socket into `out`, the only place a Channel reads it:
        the count (0 at the peer's end), or None if `wait` is False and nothing is there. A
        wait that times out is extended while another stream of the migration makes
        progress (`patience`)."""
        if not wait:
            self.sock.settimeout(0)
        try:
            while True:
                try:
                    n = self.sock.recv_into(out)
                    break
                except self._would_block:
                    if wait:
                        raise
                    return None
                except OSError as e:  # ssl.SSLError is an OSError
                    if not wait or not self._wait_longer(e):
                        raise self._fail(e, "receiving") from e
        finally:
            if not wait:
                self.sock.settimeout(self.inactivity_timeout)
        self.note_received(n)
        return n

    def _fill(self, out: memoryview, wait: bool) -> int | None:
        """The pluggable step between the wire and the caller: up to `out.nbytes` bytes of
        the stream into `out`, as `_read` counts them. Plain: the socket's bytes."""
        return self._read(out, wait)

    def _recv_bytes(self, max_bytes: int, wait: bool) -> bytes | None:
        if len(self._scratch) < max_bytes:
            self._scratch = bytearray(max_bytes)
        with memoryview(self._scratch) as scratch:
            n = self._fill(scratch[:max_bytes], wait)
            return None if n is None else bytes(scratch[:n])

    def recv(self, max_bytes: int = 1 << 20) -> bytes:
        """Up to max_bytes; b"" when the peer closed its end cleanly."""
        data = self._recv_bytes(max_bytes, True)
        assert data is not None  # a waiting read returns bytes or the end
        return data

    def recv_beside_sender(
        self, lock: threading.Lock | threading.RLock, max_bytes: int = 1 << 20
    ) -> bytes:
        """`recv` on a stream that another thread sends on, holding `lock` for each send.

        A TLS connection must never be inside two threads at once: OpenSSL's connection
        object is not thread-safe (a read may process a post-handshake message and write),
        and Python's ssl module adds no lock. So the wait for bytes happens outside `lock`
        (select, or what TLS already decrypted) and the read itself under it, without
        waiting. The inactivity timeout and its extension (`patience`) apply as to `recv`.
        A plain stream's two directions share no state: this is `recv`. (A sealed stream
        keeps per-direction state, its socket is plain: `recv` too.)"""
        if not self.is_tls:
            return self.recv(max_bytes)
        deadline = time.monotonic() + self.inactivity_timeout
        while True:
            with lock:
                buffered = self.sock.pending()  # type: ignore[attr-defined]
            if not buffered:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    if (left := self.patience()) > 0:  # another stream moved meanwhile
                        deadline = time.monotonic() + left
                        continue
                    raise self._fail(TimeoutError(), "receiving")
            with lock:
                data = self._recv_bytes(max_bytes, False)
            if data is not None:
                return data
            # readable, but not a whole TLS record yet (or only TLS's own messages)

    def recv_nowait(self, max_bytes: int = 1 << 16) -> bytes | None:
        """What the peer has sent so far, without waiting: None if nothing (b"" once it closed).
        For watching a stream this side otherwise only sends on; not while another thread
        uses the stream."""
        return self._recv_bytes(max_bytes, False)

    def recv_into_exact(self, view: memoryview | bytearray) -> None:
        """Fill `view` completely (e.g. a slice of guest memory), or raise TransportError."""
        mv = memoryview(view).cast("B")
        pos, total = 0, mv.nbytes
        while pos < total:
            n = self._fill(mv[pos:], True)
            if not n:
                raise TransportError(
                    f"peer {self.peer} closed the connection after {pos} of {total} bytes"
                )
            pos += n

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
        """Orderly close: tell the peer we are done sending, then release the socket.

        Bytes the peer sent that nobody read are discarded first: closing a TCP socket with
        unread data makes the kernel send a reset instead of the end of the stream, and a
        reset discards what of our stream is still in flight to the peer."""
        try:
            if self.is_tls:
                self._tls_goodbye()
            self._discard_unread()
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        self.sock.close()
        # The receive buffer goes with the stream: a finished migration's channels stay
        # referenced (query-migrate's), and theirs held 3 MiB of a source's private memory.
        self._scratch = bytearray()

    def _discard_unread(self, limit: int = 1 << 20) -> None:
        """Read and drop what the socket holds now, at most `limit` bytes, without waiting (the
        plain socket's recv: under TLS these are records after our goodbye, or tickets)."""
        self.sock.settimeout(0)  # (with a timeout, Python's recv would wait out an EAGAIN)
        left = limit
        while left > 0:
            try:
                got = socket.socket.recv(self.sock, min(left, 1 << 16))
            except OSError:  # (BlockingIOError: nothing more now)
                return
            if not got:
                return
            left -= len(got)

    def _tls_goodbye(self) -> None:
        """Send TLS's close_notify (waiting while the send buffer is full, up to the inactivity
        timeout) without waiting for the peer's: a peer that only reads, like a destination's
        data channel, sends its own when its migration attempt ends, and a blocking `unwrap`
        would wait for it that long (the source's data channels stalled for 30 s so)."""
        self.sock.settimeout(0)
        deadline = time.monotonic() + self.inactivity_timeout
        while True:
            try:
                self.sock.unwrap()  # type: ignore[attr-defined]
                return
            except ssl.SSLWantReadError:
                return  # ours is sent; the peer's would come with its own close
            except ssl.SSLWantWriteError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self.sock], [], left)[1]:
                    return

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_COALESCE = 64 << 10  # buffers smaller than this are gathered into one record


class SealedChannel(Channel):
    """A Channel whose bytes travel in AES-GCM records (`seal`): the same loops, with sealing
    plugged in as the step between the caller's bytes and the wire (`_outgoing`, `_fill`).

    Sending: buffers of at least `_COALESCE` bytes (page runs) are sealed straight from where
    they are (guest memory), in records of up to `seal.MAX_RECORD`; smaller ones are gathered
    first, so a frame header and its metadata share one record. Receiving: a record whose
    plaintext fits the caller's buffer is opened straight into it (guest memory), anything else
    through a buffer of one record. One thread sends and one receives at a time."""

    def __init__(
        self, sock: socket.socket, inactivity_timeout: float, peer: str, keys: seal.StreamKeys
    ) -> None:
        super().__init__(sock, inactivity_timeout, peer)
        self.keys = keys
        self.session = keys.session
        self.stream = keys.stream
        self.sealed = True
        self._out = bytearray(seal.RECORD_HEADER.size + seal.MAX_RECORD + seal.TAG)
        self._stage = bytearray(seal.MAX_RECORD)  # small buffers gathered into one record
        self._hdr = bytearray(seal.RECORD_HEADER.size)
        self._hdr_got = 0
        # a record's ciphertext and tag, then up to a header's worth of the next record (read
        # with the body's last bytes when it is already here: one read fewer per record)
        self._body = bytearray(seal.MAX_RECORD + seal.TAG + seal.RECORD_HEADER.size)
        self._body_need: int | None = None  # ciphertext bytes of the record being received
        self._body_got = 0  # (may exceed _body_need by the next record's first header bytes)
        self._plain_buf = bytearray(seal.MAX_RECORD)
        self._plain = memoryview(self._plain_buf)[:0]  # opened, not yet consumed
        self._eof = False

    def close(self) -> None:
        """Close as a plain channel does, and give back the record buffers too (each about a
        record, `seal.MAX_RECORD`: a finished migration's channels stay referenced)."""
        super().close()
        self._out = bytearray()
        self._stage = bytearray()
        self._body = bytearray()
        self._plain_buf = bytearray()
        self._plain = memoryview(self._plain_buf)

    # ---- sending --------------------------------------------------------------------------

    def _outgoing(self, views: list[memoryview]) -> Iterator[list[memoryview]]:
        """One sealed record per batch (in `_out`, reused: each is sent before the next)."""
        staged = 0
        for v in views:
            if v.nbytes >= _COALESCE:
                if staged:
                    yield self._sealed(memoryview(self._stage)[:staged])
                    staged = 0
                for pos in range(0, v.nbytes, seal.MAX_RECORD):
                    yield self._sealed(v[pos : pos + seal.MAX_RECORD])
                continue
            if staged + v.nbytes > seal.MAX_RECORD:
                yield self._sealed(memoryview(self._stage)[:staged])
                staged = 0
            self._stage[staged : staged + v.nbytes] = v
            staged += v.nbytes
        if staged:
            yield self._sealed(memoryview(self._stage)[:staged])

    def send_page_runs(self, head: bytes, data: np.ndarray, mem: memoryview, page_size: int) -> int:
        """A PAGE_RUNS frame's `head`, then the bytes of its DATA runs `data` (checked runs of
        `mem`, pages of `page_size`, from `Connection.send_pages_header`), sealed; returns the
        bytes given.

        `_outgoing` copies every run shorter than `_COALESCE` into the staging buffer one by
        one, a Python-level copy per run: a loaded guest's batches are thousands of one-page
        runs. Here consecutive short runs are gathered by numpy, up to a record's worth of
        pages per call, straight into the staging buffer; long runs are sealed from guest
        memory as `_outgoing` does."""
        counts = data["npages"].astype(np.int64)
        total = len(head) + int(counts.sum()) * page_size
        rows = np.frombuffer(mem, dtype=np.uint64).reshape(-1, page_size // 8)
        per_record = seal.MAX_RECORD // page_size
        long = counts * page_size >= _COALESCE
        # groups of consecutive runs that are all long or all short, in run order
        edges = np.flatnonzero(np.diff(long.astype(np.int8))) + 1
        bounds = [0, *edges.tolist(), data.size] if data.size else []
        try:
            self._send_all(self._sealed(memoryview(head)))
            for a, b in zip(bounds, bounds[1:], strict=False):
                group = data[a:b]
                if long[a]:
                    for start, n in zip(
                        group["start"].tolist(), group["npages"].tolist(), strict=True
                    ):
                        run = mem[start * page_size : (start + n) * page_size]
                        for pos in range(0, run.nbytes, seal.MAX_RECORD):
                            self._send_all(self._sealed(run[pos : pos + seal.MAX_RECORD]))
                    continue
                pages = expand_runs(group)
                stage = np.frombuffer(self._stage, dtype=np.uint64).reshape(-1, page_size // 8)
                for pos in range(0, pages.size, per_record):
                    k = min(per_record, pages.size - pos)
                    # (the runs are checked: "clip" spares numpy a bounds check that buffers)
                    np.take(rows, pages[pos : pos + k], axis=0, out=stage[:k], mode="clip")
                    self._send_all(self._sealed(memoryview(self._stage)[: k * page_size]))
                del stage  # (the staging buffer is replaced, not resized, at close)
        except OSError as e:
            raise self._fail(e, f"sending {total} bytes") from e
        return total

    def _sealed(self, plaintext: memoryview) -> list[memoryview]:
        n = seal.RECORD_HEADER.size + plaintext.nbytes + seal.TAG
        out = memoryview(self._out)[:n]
        self.keys.send.seal_into(plaintext, out)
        return [out]

    # ---- receiving ------------------------------------------------------------------------

    def _fill(self, out: memoryview, wait: bool) -> int | None:
        """Opened bytes into `out`: what is left of the last record, else the next record,
        straight into `out` if it fits. 0 at the peer's end between records."""
        while not self._plain:
            if self._eof:
                return 0
            if not self._next_record(wait):
                return None
            if self._eof:
                return 0
            n = self._record_plaintext
            if n and n <= out.nbytes:
                # Straight into the caller's buffer, which may be guest RAM. AES-GCM writes the
                # plaintext before it checks the tag, so a record that fails leaves bytes nobody
                # authenticated there. That is safe only because (1) a failed tag raises
                # IntegrityError, which fails the whole migration attempt, and (2) payloads are
                # received into guest RAM only before the destination's guest ever runs: page
                # runs exist in pre-copy rounds and the stop-and-copy alone (post-copy pages
                # come in frames, opened into a buffer, installed once authenticated), and the
                # destination marks a run's pages before its payload lands, so the next
                # attempt's round 0 rewrites them. Keep it so if either changes.
                self._open_into(out[:n])
                return n
            self._buffer_record()  # (an empty record opens to nothing: on to the next)
        k = min(len(self._plain), out.nbytes)
        out[:k] = self._plain[:k]
        self._plain = self._plain[k:]
        return k

    def _next_record(self, wait: bool) -> bool:
        """Receive the rest of the next record (not opened yet); False if `wait` is False and
        it is not all here. At the peer's end between records, sets `_eof` and returns True."""
        size = seal.RECORD_HEADER.size
        with memoryview(self._hdr) as hdr, memoryview(self._body) as body:
            while self._hdr_got < size:
                n = self._read(hdr[self._hdr_got :], wait)
                if n is None:
                    return False
                if n == 0:
                    if self._hdr_got:
                        raise TransportError(
                            f"peer {self.peer} closed the connection inside a sealed record header"
                        )
                    self._eof = True
                    return True
                self._hdr_got += n
            if self._body_need is None:
                try:
                    self._body_need = seal.record_length(bytes(self._hdr))
                except seal.SealError as e:
                    raise IntegrityError(f"from {self.peer}: {e}") from None
            while self._body_got < self._body_need:
                n = self._read(body[self._body_got : self._body_need + size], wait)
                if n is None:
                    return False
                if n == 0:
                    raise TransportError(
                        f"peer {self.peer} closed the connection inside a sealed record "
                        f"({self._body_got} of {self._body_need} bytes)"
                    )
                self._body_got += n
        return True

    @property
    def _record_plaintext(self) -> int:
        assert self._body_need is not None
        return self._body_need - seal.TAG

    def _open_into(self, out: memoryview) -> None:
        """Check and decrypt the received record into `out` (its plaintext size)."""
        need = self._body_need
        assert need is not None
        with memoryview(self._body) as body:
            try:
                self.keys.recv.open_into(bytes(self._hdr), body[:need], out)
            except seal.SealError as e:
                raise IntegrityError(f"from {self.peer}: {e}") from None
            finally:  # the next record's header bytes read with this body become its start
                carried = self._body_got - need
                self._hdr[:carried] = body[need : need + carried]
                self._hdr_got, self._body_need, self._body_got = carried, None, 0

    def _buffer_record(self) -> None:
        n = self._record_plaintext
        self._open_into(memoryview(self._plain_buf)[:n])
        self._plain = memoryview(self._plain_buf)[:n]


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
    except OSError as e:  # ssl.SSLError is an OSError
        raise AuthenticationError(f"connection failed during {what}: {e}") from e
    return bytes(buf)


def _psk_handshake(
    sock: socket.socket, run: Callable[..., seal.StreamKeys], *args: Any
) -> seal.StreamKeys:
    """Run one side of the PSK handshake on `sock` (see `seal`); failures → AuthenticationError."""

    def send(data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError as e:  # ssl.SSLError is an OSError
            raise AuthenticationError(f"connection failed during the PSK handshake: {e}") from e

    def recv(n: int, what: str) -> bytes:
        return _recv_exact(sock, n, what)

    try:
        return run(send, recv, *args)
    except seal.SealError as e:
        raise AuthenticationError(str(e)) from None


def _server_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the client must present a CA-signed cert
    # No TLS 1.3 session tickets: nothing resumes a session (every connection is a full mutual
    # handshake), and a ticket the client never reads -- a source's data channel only sends --
    # sits unread in its socket when it closes, which makes the kernel reset the connection
    # instead of finishing it, dropping whatever of the stream the peer had not received yet.
    ctx.num_tickets = 0
    return ctx


def _client_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    return ctx


def _secure_stream(
    sock: socket.socket,
    peer: str,
    server: bool,
    tls_ctx: ssl.SSLContext | None,
    psk: bytes | None,
    handshake: Callable[[socket.socket], seal.StreamKeys],
    inactivity_timeout: float,
    server_hostname: str | None = None,
) -> Channel:
    """TLS (if configured), then the PSK handshake (if a key is given) on a connected socket;
    the Channel it returns is sealed under the PSK unless TLS already protects it."""
    try:
        if tls_ctx is not None:
            try:
                sock = tls_ctx.wrap_socket(
                    sock, server_side=server, server_hostname=None if server else server_hostname
                )
            except OSError as e:  # ssl.SSLError is an OSError
                raise AuthenticationError(f"TLS handshake with {peer} failed: {e}") from e
        keys = handshake(sock) if psk is not None else None
    except BaseException:
        sock.close()
        raise
    if keys is not None and tls_ctx is None:
        return SealedChannel(sock, inactivity_timeout, peer, keys)
    ch = Channel(sock, inactivity_timeout, peer)
    if keys is not None:  # PSK inside TLS: TLS protects the bytes, the session binds streams
        ch.session, ch.stream = keys.session, keys.stream
    return ch


class Listener:
    """A listening socket; `accept` returns an authenticated Channel.

    Under a PSK the listener remembers the sessions its main streams started, so that a data
    channel can join one (`Channel.session` names it; the destination checks it is its own)."""

    def __init__(
        self,
        sock: socket.socket,
        tls: TlsConfig | None,
        psk: bytes | None,
        inactivity_timeout: float,
        path: str | None = None,
    ) -> None:
        self.sock = sock
        self._ctx = _server_context(tls) if tls else None
        self._psk = psk
        self.inactivity_timeout = inactivity_timeout
        self.handshake_timeout = min(inactivity_timeout, 10.0)
        self.path = path
        self.sessions: dict[bytes, seal.Session] = {}

    @property
    def address(self) -> tuple[str, int]:
        if self.path is not None:
            return self.path, 0
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    def accept(self, timeout: float | None = None) -> Channel:
        """Wait for one source, authenticate it, and return the channel. A peer that fails
        authentication raises AuthenticationError; the listener stays usable."""
        self.sock.settimeout(timeout)
        try:
            raw, addr = self.sock.accept()
        except TimeoutError as e:
            raise TransportError(f"no incoming migration within {timeout:.1f} s") from e
        except OSError as e:
            raise TransportError(f"accepting a connection failed: {e}") from e
        peer = f"unix:{self.path}" if self.path is not None else f"{addr[0]}:{addr[1]}"
        _tune(raw, self.handshake_timeout)  # a silent peer holds the listener this long at most
        if self.path is not None:
            self._check_peer_uid(raw, peer)

        def handshake(sock: socket.socket) -> seal.StreamKeys:
            return _psk_handshake(sock, seal.server_handshake, self._psk, self.sessions)

        ch = _secure_stream(
            raw, peer, True, self._ctx, self._psk, handshake, self.inactivity_timeout
        )
        ch.sock.settimeout(self.inactivity_timeout)
        return ch

    def _check_peer_uid(self, raw: socket.socket, peer: str) -> None:
        cred = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", cred)
        if uid != os.getuid():
            raw.close()
            raise AuthenticationError(
                f"{peer}: connection from uid {uid} (pid {pid}), not ours ({os.getuid()})"
            )

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None

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
    """Listen for an incoming migration on TCP (port 0 picks a free port: see `Listener.port`)."""
    _require_secure(f"{host}:{port}", tls, psk, insecure, "listen on")
    try:
        sock = socket.create_server((host, port))
        # Set before any connection: accepted sockets inherit it, and a bounded receive buffer
        # keeps the bytes the destination has not processed on the source's side, where the
        # source can see them (`Channel.unacknowledged`) before it stops the guest.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError as e:
        raise TransportError(f"cannot listen on {host}:{port}: {e}") from e
    return Listener(sock, tls, psk, inactivity_timeout)


def listen_unix(
    path: str,
    tls: TlsConfig | None = None,
    psk: bytes | None = None,
    insecure: bool = False,
    *,
    inactivity_timeout: float = 30.0,
) -> Listener:
    """Listen on a unix socket. Without other credentials its directory must be private
    (`check_private_directory`); a stale socket at `path` is replaced."""
    if tls is None and psk is None and not insecure:
        check_private_directory(path)
    _require_secure(f"unix:{path}", tls, psk, True, "listen on")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
        sock.bind(path)
        sock.listen(16)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot listen on unix:{path}: {e}") from e
    return Listener(sock, tls, psk, inactivity_timeout, path=path)


def listen_at(
    address: Address,
    tls: TlsConfig | None = None,
    psk: bytes | None = None,
    insecure: bool = False,
    *,
    inactivity_timeout: float = 30.0,
) -> Listener:
    if address.path is not None:
        return listen_unix(address.path, tls, psk, insecure, inactivity_timeout=inactivity_timeout)
    return listen(
        address.host, address.port, tls, psk, insecure, inactivity_timeout=inactivity_timeout
    )


def connect(
    host: str,
    port: int,
    tls: TlsConfig | None = None,
    psk: bytes | None = None,
    insecure: bool = False,
    *,
    timeout: float = 10.0,
    inactivity_timeout: float = 30.0,
    join: tuple[seal.Session, int] | None = None,
) -> Channel:
    """Connect to a destination and authenticate both ends. `join=(session, index)`: under a
    PSK, open data channel `index` of the migration whose main stream has `session`."""
    return connect_to(
        Address(host=host, port=port),
        tls,
        psk,
        insecure,
        timeout=timeout,
        inactivity_timeout=inactivity_timeout,
        join=join,
    )


def connect_to(
    address: Address,
    tls: TlsConfig | None = None,
    psk: bytes | None = None,
    insecure: bool = False,
    *,
    timeout: float = 10.0,
    inactivity_timeout: float = 30.0,
    join: tuple[seal.Session, int] | None = None,
) -> Channel:
    """`connect` to a tcp: or unix: address."""
    peer = str(address)
    if address.path is not None:
        if tls is None and psk is None and not insecure:
            check_private_directory(address.path)
        insecure = True  # the private directory authenticates it
    _require_secure(peer, tls, psk, insecure, "connect to")
    try:
        if address.path is not None:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(timeout)
            try:
                raw.connect(address.path)
            except OSError:
                raw.close()
                raise
        else:
            raw = socket.create_connection((address.host, address.port), timeout=timeout)
    except OSError as e:
        raise TransportError(f"cannot connect to {peer}: {e}") from e
    _tune(raw, inactivity_timeout)
    ctx = _client_context(tls) if tls is not None else None
    hostname = (tls.server_hostname if tls is not None else None) or address.host or None

    def handshake(sock: socket.socket) -> seal.StreamKeys:
        return _psk_handshake(sock, seal.client_handshake, psk, join)

    return _secure_stream(
        raw, peer, False, ctx, psk, handshake, inactivity_timeout, server_hostname=hostname
    )


# ---- glue between a Channel and a protocol Connection --------------------------------------


def send_event(channel: Channel, conn: Connection, event: Event) -> int:
    """Encode one event with `conn` and send it; returns bytes sent."""
    return channel.send_buffers([conn.send(event)])


def send_pages(
    channel: Channel, conn: Connection, runs: Any, guest_mem: memoryview, checksum: bool = False
) -> int:
    """Send one page-run batch straight from guest memory; returns bytes sent."""
    if isinstance(channel, SealedChannel) and not checksum:
        return channel.send_page_runs(*conn.send_pages_header(runs, guest_mem), conn.page_size)
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
