"""A small blocking QMP client for the demo: one unix socket, commands in order, events kept.

The demo drives two `ptmig run` processes the way a management layer drives QEMU; this client
speaks just enough QMP for that (greeting, `qmp_capabilities`, `execute`, asynchronous events
collected on the side). ptmig's own QMP server lives in `ptmig.qmp`.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from ..errors import PtmigError


class QmpClientError(PtmigError, RuntimeError):
    """A QMP command failed, or the socket closed or sent something that is not QMP."""


class QmpClient:
    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpClientError(f"{path}: expected a QMP greeting, got {greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            data = self._sock.recv(1 << 16)
            if not data:
                raise QmpClientError(f"{self.path}: the QMP server closed the connection")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QmpClientError(f"{self.path}: not JSON: {line[:200]!r} ({e})") from None
        if not isinstance(msg, dict):
            raise QmpClientError(f"{self.path}: a QMP message must be an object, got {msg!r}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run `command`; its `return` value, or QmpClientError with the server's description."""
        self._id += 1
        request: dict[str, Any] = {"execute": command, "id": self._id}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                msg["x-received"] = time.monotonic()
                self.events.append(msg)
                continue
            if msg.get("id") != self._id:
                continue
            if "error" in msg:
                err = msg["error"]
                raise QmpClientError(f"{command}: {err.get('class')}: {err.get('desc')}")
            return msg.get("return")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
