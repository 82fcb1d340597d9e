"""One vhost-user connection: the frontend's end of the backend's unix socket.

Owns the socket, the SCM_RIGHTS plumbing, and the request/reply discipline: one request is
outstanding at a time (a lock), its expected reply is registered before it is sent, and a reader
thread decodes everything the backend sends against that expectation (`codec.decode_reply`). With
REPLY_ACK negotiated every request without a reply of its own is sent with NEED_REPLY and waits
for its u64 ack; a non-zero ack is a refusal (`VhostUserCommandError`).

A backend that closes the socket, sends a frame nobody asked for, or breaks the codec's rules is
*gone*: the reason is recorded, the waiting call and every later call raise `VhostUserGoneError`,
and the `on_gone` callback runs once (the frontend turns it into a device event). fds that arrive
with a frame are always closed here: no reply ptmig reads may carry any. The VMM never crashes on
what a backend sends; it loses the device.

qemu-storage-daemon acks with 0 even when the message made it panic; the panic shows as EOF right
after (measured on QEMU 7.2), which this class reports as gone.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

from ...errors import PtmigError
from ..handle import Liveness
from . import codec
from .codec import Expected, Payload, Request

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
_RECV_BYTES = 8192
_CMSG_SPACE = socket.CMSG_SPACE(codec.MAX_FDS * array.array("i").itemsize)


class VhostUserError(PtmigError):
    """Base of what a vhost-user connection raises."""


class VhostUserGoneError(VhostUserError):
    """The backend closed the connection or was dropped for breaking the protocol."""


class VhostUserTimeoutError(VhostUserError):
    """The backend did not answer in time (the connection is then dropped)."""


class VhostUserCommandError(VhostUserError):
    """The backend refused a request (non-zero ack, or an error-shaped reply)."""


class _Pending:
    __slots__ = ("expected", "done", "reply")

    def __init__(self, expected: Expected) -> None:
        self.expected = expected
        self.done = threading.Event()
        self.reply: Payload | None = None


class VhostUserConnection(Liveness):
    """Requests to one backend over a connected unix stream socket."""

    def __init__(self, sock: socket.socket, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.name = name
        self.timeout = timeout
        self.reply_ack = False  # set once REPLY_ACK is negotiated
        self.on_gone: Callable[[str], None] | None = None
        self.messages_sent = 0
        self._sock = sock
        self._call_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pending: _Pending | None = None
        self._gone: str | None = None
        self._closing = False
        self._reader = threading.Thread(
            target=self._read_loop, name=f"{name}-vhost-user", daemon=True
        )
        self._reader.start()

    @classmethod
    def connect(
        cls, path: str, name: str, *, timeout: float = DEFAULT_TIMEOUT, wait: float = 0.0
    ) -> VhostUserConnection:
        """Connect to the backend listening on `path`, retrying for up to `wait` s while the
        socket does not exist yet or refuses (a backend that is still starting)."""
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock, name, timeout=timeout)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise VhostUserGoneError(
                        f"cannot connect to the vhost-user backend at {path}: {exc}"
                    ) from exc
                time.sleep(0.02)
            except OSError as exc:
                sock.close()
                raise VhostUserGoneError(
                    f"cannot connect to the vhost-user backend at {path}: {exc}"
                ) from exc

    # -- state ---------------------------------------------------------------------------------

    # -- requests ------------------------------------------------------------------------------
    def call(
        self,
        request: Request,
        payload: Payload | None = None,
        fds: Sequence[int] = (),
        *,
        timeout: float | None = None,
    ) -> Payload | None:
        """Send one request; return its reply payload (None for a request without one).

        With REPLY_ACK negotiated, a request without its own reply waits for the ack."""
        need_reply = self.reply_ack and codec.REQUESTS[request].reply is None
        data = codec.encode_request(request, payload, len(fds), need_reply=need_reply)
        expected = Expected.for_request(request, payload, need_reply)
        with self._call_lock:
            pending = _Pending(expected) if expected is not None else None
            with self._state_lock:
                if self._gone is not None:
                    raise VhostUserGoneError(
                        f"vhost-user backend {self.name} is gone: {self._gone}"
                    )
                self._pending = pending
            self._send(data, fds, request)
            if pending is None:
                return None
            return self._wait(pending, request, timeout)

    def _send(self, data: bytes, fds: Sequence[int], request: Request) -> None:
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        try:
            sent = self._sock.sendmsg([data], ancillary)
            if sent < len(data):
                self._sock.sendall(data[sent:])
        except OSError as exc:
            self._mark_gone(f"sending {request.name} failed: {exc}")
            raise VhostUserGoneError(
                f"vhost-user backend {self.name} is gone: {self._gone}"
            ) from exc
        self.messages_sent += 1

    def _wait(self, pending: _Pending, request: Request, timeout: float | None) -> Payload:
        wait = self.timeout if timeout is None else timeout
        if not pending.done.wait(wait):
            self._mark_gone(f"no reply to {request.name} in {wait} s")
            raise VhostUserTimeoutError(
                f"vhost-user backend {self.name} did not answer {request.name} in {wait} s"
            )
        if pending.reply is None:
            raise VhostUserGoneError(f"vhost-user backend {self.name} is gone: {self._gone}")
        reply = pending.reply
        if pending.expected.reply is codec.U64 and codec.REQUESTS[request].reply is None:
            assert isinstance(reply, codec.U64)
            if reply.value != 0:
                raise VhostUserCommandError(
                    f"vhost-user backend {self.name} refused {request.name}: ack {reply.value:#x}"
                )
        return reply

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        with self._state_lock:
            self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(2.0)
        self._sock.close()

    # -- the reader ----------------------------------------------------------------------------
    def _read_loop(self) -> None:
        reader = codec.FrameReader()
        reason = "the backend closed the connection"
        try:
            while True:
                data, nfds = self._recv()
                if not data:
                    if reader.pending:
                        reason = (
                            f"the backend closed the connection mid-message "
                            f"({reader.pending} bytes buffered)"
                        )
                    break
                reader.feed(data)
                while (frame := reader.next_frame()) is not None:
                    self._deliver(frame, nfds)
                    nfds = 0
                if nfds:
                    raise codec.VhostUserProtocolError(
                        f"{nfds} file descriptors arrived with a partial message"
                    )
        except codec.VhostUserProtocolError as exc:
            reason = f"protocol error: {exc}"
        except OSError as exc:
            reason = f"connection failed: {exc}"
        with self._state_lock:
            closing = self._closing
        self._mark_gone("closed by the VMM" if closing else reason)

    def _recv(self) -> tuple[bytes, int]:
        data, ancdata, _flags, _addr = self._sock.recvmsg(_RECV_BYTES, _CMSG_SPACE)
        nfds = 0
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                for fd in fds:  # no reply ptmig reads carries fds: never keep them
                    os.close(fd)
                nfds += len(fds)
        return data, nfds

    def _deliver(self, frame: codec.Frame, nfds: int) -> None:
        with self._state_lock:
            pending = self._pending
        if pending is None:
            raise codec.VhostUserProtocolError(
                f"unsolicited message {frame.request} (flags {frame.flags:#x}, "
                f"{len(frame.body)} bytes) while no request was outstanding"
            )
        # a reply that does not decode leaves the request pending: _mark_gone wakes it
        reply = codec.decode_reply(frame, nfds, pending.expected)
        with self._state_lock:
            self._pending = None
        pending.reply = reply
        pending.done.set()

    def _mark_gone(self, reason: str) -> None:
        with self._state_lock:
            if self._gone is not None:
                return
            self._gone = reason
            pending, self._pending = self._pending, None
            closing = self._closing
        if pending is not None:
            pending.done.set()
        if not closing:
            log.warning("vhost-user backend %s is gone: %s", self.name, reason)
        callback = self.on_gone
        if callback is not None:
            callback(reason)
