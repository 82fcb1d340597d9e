"""The learning switch's native fast path: building `native/switchpath.c` and driving it.

A thread runs the C loop on the switch's socket (see the comment at the top of
`native/switchpath.c`): it forwards known unicast frames itself and hands every other datagram,
unchanged and in order, to the Python switch through a queue. `FastPath` is that loop's Python
side. It is also the forwarding database's mirror (`ptmig.net.fdb.Mirror`): the database tells
it what it learns and forgets, so the native cache never holds an entry the database does not.

The library is built at first use and cached (`ptmig.nativelib`), like the other native
paths.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading

import numpy as np

from ..errors import PtmigError
from ..nativelib import NativeLibraryError, load_library
from .fdb import Endpoint

SOURCE = "switchpath.c"

# Counters (enum C_* in switchpath.c).
C_FORWARDED, C_SENT, C_SEND_ERRORS, C_HANDED, C_RECV_ERRORS, C_BATCHES, C_STALLS = range(7)
C_COUNT = 7
SLOW_BYTES = 4 << 20  # the C side's slow queue: one take always empties it
SLOW_HEADER = struct.Struct("=IHHII16s")  # struct slow_header: len, family, port, flow, scope, addr
_LENGTH, _SOURCE = struct.Struct("=I"), struct.Struct("=HHII16s")  # its two parts
HEARD_BATCH = 256
# sp_wait results.
TIMEOUT, SLOW_READY, DRAINED = 0, 1, 2


class FastPathUnavailable(PtmigError, RuntimeError):
    """The native fast path could not be built, loaded or set up."""


_P, _INT, _U32, _U64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "sp_new": (_P, [_INT]),
    "sp_free": (None, [_P]),
    "sp_run": (_INT, [_P]),
    "sp_stop": (None, [_P]),
    "sp_wait": (_INT, [_P, _INT, _U64, _INT]),
    "sp_take": (ctypes.c_size_t, [_P, _P, ctypes.c_size_t]),
    "sp_done": (None, [_P, _U32]),
    "sp_put": (_INT, [_P, ctypes.c_char_p, _INT, _INT, ctypes.c_char_p, _U32, _U32]),
    "sp_drop": (_INT, [_P, ctypes.c_char_p]),
    "sp_take_heard": (_INT, [_P, _P, _INT]),
    "sp_renew": (None, [_P, _U64]),
    "sp_counters": (None, [_P, _P]),
}


def library() -> ctypes.CDLL:
    """The loaded fast path (built on first use). ctypes releases the GIL around each call."""
    try:
        return load_library((SOURCE,), _SIGNATURES)
    except NativeLibraryError as e:
        raise FastPathUnavailable(f"the switch's fast path is unavailable: {e}") from e


def endpoint_fields(endpoint: Endpoint) -> tuple[int, int, bytes, int, int] | None:
    """(family, port, 16-byte address, flowinfo, scope_id) of a socket address tuple as
    recvfrom() returns it, or None for anything else (such an endpoint is simply not cached)."""
    if not isinstance(endpoint, tuple) or len(endpoint) not in (2, 4):
        return None
    try:
        if len(endpoint) == 2:
            host, port = endpoint
            return socket.AF_INET, int(port), socket.inet_pton(socket.AF_INET, host), 0, 0
        host, port, flowinfo, scope_id = endpoint
        address = socket.inet_pton(socket.AF_INET6, str(host).partition("%")[0])
        return socket.AF_INET6, int(port), address, int(flowinfo), int(scope_id)
    except (OSError, TypeError, ValueError):
        return None


def endpoint_from_fields(
    family: int, port: int, address: bytes, flowinfo: int, scope_id: int
) -> Endpoint:
    """The address tuple recvfrom() would have returned for this source."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, address[:4]), port
    host = socket.inet_ntop(socket.AF_INET6, address)
    sockaddr = (host, port, flowinfo, scope_id)
    if scope_id:  # a link-local host carries its zone, as Python's own sockaddr conversion does
        host = socket.getnameinfo(sockaddr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
    return host, port, flowinfo, scope_id


class FastPath:
    """The native loop on one switch socket, its thread, and its MAC cache.

    `start()` runs the loop on a new thread, which inherits the caller's scheduling policy.
    Only the thread that serves the switch calls `wait`, `take` and `done`."""

    def __init__(self, sock: socket.socket) -> None:
        self.lib = library()
        self.sock = sock
        handle = self.lib.sp_new(sock.fileno())
        if not handle:
            raise FastPathUnavailable("could not create the switch's fast path (out of memory)")
        self.handle: int = handle
        self.cached: dict[bytes, Endpoint] = {}  # what the native cache holds
        self._counters = np.zeros(C_COUNT, dtype=np.uint64)
        self._take_buf = bytearray(SLOW_BYTES)
        self._take_ptr = ctypes.addressof((ctypes.c_char * SLOW_BYTES).from_buffer(self._take_buf))
        self._heard_buf = ctypes.create_string_buffer(HEARD_BATCH * 6)
        self._addresses: dict[bytes, Endpoint] = {}
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the loop's thread if it is not running yet."""
        if self.thread is None and self.handle:
            self.thread = threading.Thread(
                target=self.lib.sp_run, args=(self.handle,), name="switch-fast-path", daemon=True
            )
            self.thread.start()

    # ---- the slow queue (the serving thread only) --------------------------------------------
    def wait(self, timeout: float, *, progress: bool, seen: int) -> int:
        """Block (without the GIL) until slow datagrams are queued (SLOW_READY) or, with
        `progress`, until the loop made a pass after `seen` passes and left nothing unread on
        the socket (DRAINED); TIMEOUT otherwise."""
        if not self.handle:
            return TIMEOUT
        return int(self.lib.sp_wait(self.handle, int(progress), seen, max(0, int(timeout * 1000))))

    def take(self) -> list[tuple[bytes, Endpoint]]:
        """The queued datagrams with their sources, oldest first. Call `done` after handling
        them: until then the loop hands every new datagram over too, which keeps the order."""
        n = self.lib.sp_take(self.handle, self._take_ptr, SLOW_BYTES)
        view = memoryview(self._take_buf)[:n]
        out = []
        pos = 0
        while pos < n:
            (length,) = _LENGTH.unpack_from(view, pos)
            source = bytes(view[pos + _LENGTH.size : pos + SLOW_HEADER.size])
            pos += SLOW_HEADER.size
            out.append((bytes(view[pos : pos + length]), self._address(source)))
            pos += length
        return out

    def _address(self, source: bytes) -> Endpoint:
        """The address tuple of a slow record's source fields (converted once per source)."""
        addr = self._addresses.get(source)
        if addr is None:
            family, port, flowinfo, scope_id, address = _SOURCE.unpack(source)
            addr = endpoint_from_fields(family, port, address, flowinfo, scope_id)
            if len(self._addresses) >= 4096:  # a bound against a spray of source addresses
                self._addresses.clear()
            self._addresses[source] = addr
        return addr

    def done(self, count: int) -> None:
        self.lib.sp_done(self.handle, count)

    # ---- the cache: ptmig.net.fdb.Mirror -----------------------------------------------------
    def put(self, mac: bytes, endpoint: Endpoint) -> None:
        if self.cached.get(mac) == endpoint or not self.handle:
            return
        fields = endpoint_fields(endpoint)
        if fields is not None and self.lib.sp_put(self.handle, mac, *fields) == 0:
            self.cached[mac] = endpoint
        else:
            self.drop(mac)

    def drop(self, mac: bytes) -> None:
        if self.cached.pop(mac, None) is not None:
            self.lib.sp_drop(self.handle, mac)

    def heard(self) -> list[bytes]:
        """The cached MACs frames came from on the fast path since the last call."""
        out: list[bytes] = []
        while self.handle:
            n = self.lib.sp_take_heard(self.handle, self._heard_buf, HEARD_BATCH)
            raw = self._heard_buf.raw
            out.extend(raw[i * 6 : i * 6 + 6] for i in range(n))
            if n < HEARD_BATCH:
                break
        return out

    def renew(self, horizon_s: float) -> None:
        """Let the loop forward for `horizon_s` more seconds (it hands everything to Python
        after that): the caller has just evicted every entry that could age out sooner."""
        self.lib.sp_renew(self.handle, int(horizon_s * 1e9))

    def counters(self) -> dict[str, int]:
        if self.handle:
            self.lib.sp_counters(self.handle, int(self._counters.ctypes.data))
        c = self._counters
        return {
            "forwarded": int(c[C_FORWARDED]),
            "sent": int(c[C_SENT]),
            "send_errors": int(c[C_SEND_ERRORS]),
            "handed": int(c[C_HANDED]),
            "recv_errors": int(c[C_RECV_ERRORS]),
            "passes": int(c[C_BATCHES]),
            "stalls": int(c[C_STALLS]),
        }

    def close(self) -> None:
        """Stop the loop and free it. Call after the serving thread stopped calling `wait`."""
        if not self.handle:
            return
        self.lib.sp_stop(self.handle)
        if self.thread is not None:
            self.thread.join()
        self.counters()  # keep the final values readable after close
        self.lib.sp_free(self.handle)
        self.handle = 0
        self.cached.clear()
