"""The control channel between the VMM and a device process: framing and messages, without I/O.

This module owns the wire format of the unix stream socket that carries everything between the
VMM and a device process except doorbells and interrupts (those are eventfds): register accesses
the VMM forwards from ``KVM_EXIT_MMIO``, admin commands (reset, quiesce, IOTLB invalidate, state,
needs-reset, DMA write log) and asynchronous events from the device (faults, needs-reset, log
lines).

Wire format, one frame per message (all integers little-endian)::

    magic   4 bytes  b"PTDC"
    jlen    u32      length of the JSON body            (<= MAX_JSON_BYTES)
    plen    u32      length of the raw binary payload   (<= MAX_PAYLOAD_BYTES)
    json    jlen bytes, a UTF-8 JSON object
    payload plen bytes (e.g. a DMA write-log bitmap), uninterpreted here

The JSON object has a type tag ``t``:

* ``{"t": "req", "id": N, "cmd": NAME, "args": {...}}`` — VMM to device; ``NAME`` in COMMANDS.
* ``{"t": "resp", "id": N, "ok": bool, "result": {...}, "error": str|null}`` — device to VMM,
  exactly one per request, matched by ``id``.
* ``{"t": "event", "name": NAME, "data": {...}}`` — device to VMM, unsolicited; ``NAME`` in
  EVENTS.

The decoder is sans-I/O (h11-style): feed it bytes, take messages out. It never buffers more than
one frame's worth past the caps, so a hostile or broken peer cannot make it allocate without
bound; any violation raises ControlProtocolError and the connection must be dropped.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ptmig.devices.virtio.mmio import MmioState, QueueRegisters
from ptmig.devices.virtio.queue import QueueError, QueueState

from ..errors import PtmigError

MAGIC = b"PTDC"
HEADER = struct.Struct("<4sII")
MAX_JSON_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 64 << 20

COMMANDS = frozenset(
    {
        "mmio_read",
        "mmio_write",
        "reset",
        "quiesce",
        "resume",
        "iotlb_invalidate",
        "get_state",
        "set_state",
        "needs_reset",
        "dma_log_start",
        "dma_log_stop",
        "dma_log_harvest",
        "stats",
        "shutdown",
        "announce",
    }
)

EVENTS = frozenset({"ready", "startup_failed", "fault", "needs_reset", "log"})


class ControlProtocolError(PtmigError):
    """The peer sent something that is not a valid control frame; drop the connection."""


@dataclass(frozen=True)
class Request:
    """A command from the VMM; ``id`` is chosen by the VMM and echoed in the response."""

    id: int
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


@dataclass(frozen=True)
class Response:
    """The device's answer to request ``id``: ``ok`` with a result, or an error message."""

    id: int
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    payload: bytes = b""


@dataclass(frozen=True)
class Event:
    """An unsolicited notification from the device (fault, needs_reset, log, ready, ...)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


Message = Request | Response | Event


def encode(msg: Message) -> bytes:
    """Serialize one message into one frame."""
    body: dict[str, Any]
    if isinstance(msg, Request):
        body = {"t": "req", "id": msg.id, "cmd": msg.cmd, "args": msg.args}
    elif isinstance(msg, Response):
        body = {"t": "resp", "id": msg.id, "ok": msg.ok, "result": msg.result, "error": msg.error}
    else:
        body = {"t": "event", "name": msg.name, "data": msg.data}
    raw = json.dumps(body, separators=(",", ":")).encode()
    if len(raw) > MAX_JSON_BYTES:
        raise ControlProtocolError(f"JSON body of {len(raw)} bytes exceeds {MAX_JSON_BYTES}")
    if len(msg.payload) > MAX_PAYLOAD_BYTES:
        raise ControlProtocolError(
            f"payload of {len(msg.payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
        )
    return HEADER.pack(MAGIC, len(raw), len(msg.payload)) + raw + bytes(msg.payload)


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ControlProtocolError(f"field {name!r} has invalid value {value!r}")
    return value


def _parse(raw: bytes, payload: bytes) -> Message:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlProtocolError(f"JSON body does not parse: {exc}") from None
    if not isinstance(body, dict):
        raise ControlProtocolError(f"JSON body is a {type(body).__name__}, not an object")
    tag = body.get("t")
    if tag == "req":
        cmd = _field(body, "cmd", str)
        if cmd not in COMMANDS:
            raise ControlProtocolError(f"unknown command {cmd!r}")
        return Request(_field(body, "id", int), cmd, _field(body, "args", dict), payload)
    if tag == "resp":
        error = body.get("error")
        if error is not None and not isinstance(error, str):
            raise ControlProtocolError(f"field 'error' has invalid value {error!r}")
        return Response(
            _field(body, "id", int),
            _field(body, "ok", bool),
            _field(body, "result", dict),
            error,
            payload,
        )
    if tag == "event":
        name = _field(body, "name", str)
        if name not in EVENTS:
            raise ControlProtocolError(f"unknown event {name!r}")
        return Event(name, _field(body, "data", dict), payload)
    raise ControlProtocolError(f"unknown message type {tag!r}")


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` then ``next_message()`` until it returns None."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._check_header()

    def _check_header(self) -> tuple[int, int] | None:
        if len(self._buf) < HEADER.size:
            return None
        magic, jlen, plen = HEADER.unpack_from(self._buf)
        if magic != MAGIC:
            raise ControlProtocolError(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r}")
        if jlen > MAX_JSON_BYTES:
            raise ControlProtocolError(f"frame JSON length {jlen} exceeds {MAX_JSON_BYTES}")
        if plen > MAX_PAYLOAD_BYTES:
            raise ControlProtocolError(f"frame payload length {plen} exceeds {MAX_PAYLOAD_BYTES}")
        return jlen, plen

    def next_message(self) -> Message | None:
        lengths = self._check_header()
        if lengths is None:
            return None
        jlen, plen = lengths
        end = HEADER.size + jlen + plen
        if len(self._buf) < end:
            return None
        raw = bytes(self._buf[HEADER.size : HEADER.size + jlen])
        payload = bytes(self._buf[HEADER.size + jlen : end])
        del self._buf[:end]
        return _parse(raw, payload)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf)


def send_message(sock: socket.socket, msg: Message) -> None:
    """Blocking send of one message (callers serialize concurrent senders themselves)."""
    sock.sendall(encode(msg))


def recv_message(sock: socket.socket, decoder: FrameDecoder) -> Message | None:
    """Blocking receive of the next message; None on orderly EOF between frames."""
    while True:
        msg = decoder.next_message()
        if msg is not None:
            return msg
        data = sock.recv(1 << 16)
        if not data:
            if decoder.buffered:
                raise ControlProtocolError(
                    f"connection closed in the middle of a frame ({decoder.buffered} bytes)"
                )
            return None
        decoder.feed(data)


# -- device state (get_state / set_state) ------------------------------------------------------
STATE_VERSION = 1
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class DeviceState:
    """What a fresh device needs to continue where another left off: its register file and
    the device's position in each live queue (next avail, next used)."""

    kind: str
    mmio: MmioState
    queues: dict[int, QueueState]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "mmio": asdict(self.mmio),
            "queues": [dict(asdict(q), index=i) for i, q in sorted(self.queues.items())],
        }

    @classmethod
    def from_json(cls, raw: Any) -> DeviceState:
        """Parse untrusted state: every field type-checked, every queue validated."""
        obj = expect_object(raw, "device state", {"version", "kind", "mmio", "queues"})
        if obj.get("version") != STATE_VERSION:
            raise ValueError(f"device state version {obj.get('version')!r} is not {STATE_VERSION}")
        kind = obj.get("kind")
        if kind not in ("net", "blk"):
            raise ValueError(f"device state kind {kind!r} is not 'net' or 'blk'")
        mmio = _mmio_state(obj.get("mmio"))
        qlist = obj.get("queues")
        if not isinstance(qlist, list) or len(qlist) > len(mmio.queues):
            raise ValueError(
                f"device state 'queues' must be a list of at most "
                f"{len(mmio.queues)} queues, got {qlist!r:.200}"
            )
        queues: dict[int, QueueState] = {}
        for q in qlist:
            qo = expect_object(q, "queue state", {f.name for f in fields(QueueState)} | {"index"})
            index = expect_int(qo, "index", len(mmio.queues) - 1)
            if index in queues:
                raise ValueError(f"queue {index} appears twice in the device state")
            ready = qo.get("ready", True)
            if not isinstance(ready, bool):
                raise ValueError(f"queue {index} 'ready' must be a bool, got {ready!r}")
            try:
                queues[index] = QueueState(
                    expect_int(qo, "size", 0xFFFF),
                    expect_int(qo, "desc_addr", _U64),
                    expect_int(qo, "avail_addr", _U64),
                    expect_int(qo, "used_addr", _U64),
                    expect_int(qo, "next_avail", 0xFFFF),
                    expect_int(qo, "next_used", 0xFFFF),
                    ready,
                ).validate()
            except QueueError as exc:
                raise ValueError(f"queue {index} state is invalid: {exc}") from None
        return cls(kind, mmio, queues)


def expect_object(raw: Any, what: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must be an object, got {type(raw).__name__}")
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"{what} has unknown keys {sorted(unknown)}")
    return raw


def expect_int(obj: dict[str, Any], key: str, maximum: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise ValueError(f"{key!r} must be an integer in 0..{maximum:#x}, got {value!r:.60}")
    return value


def _mmio_state(raw: Any) -> MmioState:
    names = {f.name for f in fields(MmioState)}
    obj = expect_object(raw, "register state", names)
    missing = names - set(obj)
    if missing:
        raise ValueError(f"register state lacks {sorted(missing)}")
    reason = obj["needs_reset_reason"]
    if reason is not None and not isinstance(reason, str):
        raise ValueError(f"'needs_reset_reason' must be a string or null, got {reason!r:.60}")
    qraw = obj["queues"]
    if not isinstance(qraw, list) or len(qraw) > 64:
        raise ValueError("register state 'queues' must be a list of at most 64 queues")
    queues = []
    for q in qraw:
        qo = expect_object(q, "queue registers", {f.name for f in fields(QueueRegisters)})
        ready = qo.get("ready", False)
        if not isinstance(ready, bool):
            raise ValueError(f"queue register 'ready' must be a bool, got {ready!r:.60}")
        queues.append(
            QueueRegisters(
                expect_int(qo, "num", 0xFFFFFFFF),
                expect_int(qo, "desc", _U64),
                expect_int(qo, "driver", _U64),
                expect_int(qo, "device", _U64),
                ready,
            )
        )
    ints = {n: expect_int(obj, n, _U64) for n in names - {"needs_reset_reason", "queues"}}
    return MmioState(**ints, needs_reset_reason=reason, queues=queues)
