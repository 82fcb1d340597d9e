"""The backend channel of a vhost-user connection (SET_BACKEND_REQ_FD; BACKEND_REQ, which QEMU
7.2 still calls SLAVE_REQ): requests the backend sends to the frontend.

Owns the frontend's end of a socket pair whose other end went to the backend with
SET_BACKEND_REQ_FD, and the thread that reads it. What the spec (docs/interop/vhost-user.rst,
"Back-end message types") asks of a frontend, and what ptmig answers:

* CONFIG_CHANGE_MSG: the device's config space changed. The handler re-reads it (GET_CONFIG on
  the main channel) and tells the guest; then, if the backend set NEED_REPLY and REPLY_ACK was
  negotiated, the reply is u64 0 on success and 1 if the re-read failed (QEMU's order: handle,
  then answer).
* any other request -- IOTLB_MSG needs IOMMU_PLATFORM, VRING_HOST_NOTIFIER_MSG needs
  HOST_NOTIFIER, neither of which ptmig negotiates, and codes this frontend does not know --
  is refused: u64 1 when a reply is asked for, nothing otherwise. fds that came with it are
  closed.

The backend is untrusted: a frame that breaks the codec's rules (oversized, bad flags, a payload
of the wrong size, fds where none may be) ends the channel and is reported through `on_broken`
like any other misbehaviour; the VMM stays up.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import threading
from collections.abc import Callable

from . import codec
from .codec import BackendRequest

log = logging.getLogger(__name__)

ACK_OK = 0
ACK_REFUSED = 1
_RECV_BYTES = 8192
_CMSG_SPACE = socket.CMSG_SPACE(codec.MAX_FDS * array.array("i").itemsize)


class BackendChannel:
    """The frontend's end of the backend channel. Create with `pair`, send `backend_fd` with
    SET_BACKEND_REQ_FD, close it here with `sent`, then `start`."""

    def __init__(
        self,
        sock: socket.socket,
        backend_end: socket.socket,
        name: str,
        *,
        on_config_change: Callable[[], bool],
        on_broken: Callable[[str], None],
        reply_ack: bool,
    ) -> None:
        self.name = name
        self.reply_ack = reply_ack
        self.counters = {"config_changes": 0, "refused": 0}
        self._sock, self._backend_end = sock, backend_end
        self._on_config_change, self._on_broken = on_config_change, on_broken
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-backend-req", daemon=True)

    @classmethod
    def pair(
        cls,
        name: str,
        *,
        on_config_change: Callable[[], bool],
        on_broken: Callable[[str], None],
        reply_ack: bool,
    ) -> BackendChannel:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(
            ours,
            theirs,
            name,
            on_config_change=on_config_change,
            on_broken=on_broken,
            reply_ack=reply_ack,
        )

    @property
    def backend_fd(self) -> int:
        return self._backend_end.fileno()

    def start(self) -> None:
        """The backend holds its end now: drop ours and start reading."""
        self._backend_end.close()
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        self._backend_end.close()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self._sock.close()

    # -- the reader ----------------------------------------------------------------------------
    def _run(self) -> None:
        reader = codec.FrameReader()
        try:
            while True:
                data, fds = self._recv()
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return  # the backend closed it (the main channel reports a dead backend)
                reader.feed(data)
                while (frame := reader.next_frame()) is not None:
                    self._handle(frame, fds)
                    fds = []
                for fd in fds:  # fds with a partial message: never kept
                    os.close(fd)
                if fds:
                    raise codec.VhostUserProtocolError(
                        f"{len(fds)} file descriptors arrived with a partial message"
                    )
        except codec.VhostUserProtocolError as exc:
            if not self._closing:
                self._on_broken(f"backend channel: {exc}")
        except OSError as exc:
            if not self._closing:
                self._on_broken(f"backend channel failed: {exc}")

    def _recv(self) -> tuple[bytes, list[int]]:
        data, ancdata, _flags, _addr = self._sock.recvmsg(_RECV_BYTES, _CMSG_SPACE)
        fds: list[int] = []
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(raw[: len(raw) - len(raw) % got.itemsize])
                fds.extend(got)
        return data, fds

    def _handle(self, frame: codec.Frame, fds: list[int]) -> None:
        """Answer one request (fds are closed here whatever it was)."""
        try:
            known = frame.request in BackendRequest.__members__.values()
            if known:
                msg = codec.decode_backend_request(frame, tuple(fds))
                wants_reply = msg.need_reply
            else:
                codec.check_request_flags(frame.flags, f"backend request {frame.request}")
                wants_reply = bool(frame.flags & codec.FLAG_NEED_REPLY)
        finally:
            for fd in fds:
                os.close(fd)
        if known and frame.request == BackendRequest.CONFIG_CHANGE_MSG:
            self.counters["config_changes"] += 1
            ack = ACK_OK if self._on_config_change() else ACK_REFUSED
        else:
            self.counters["refused"] += 1
            log.warning(
                "vhost-user backend %s: request %s refused (not negotiated)",
                self.name,
                BackendRequest(frame.request).name if known else frame.request,
            )
            ack = ACK_REFUSED
        if wants_reply and self.reply_ack:
            self._sock.sendall(codec.encode_reply(frame.request, codec.U64(ack)))
