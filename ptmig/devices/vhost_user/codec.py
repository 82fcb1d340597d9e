"""The vhost-user message codec, without I/O (QEMU docs/interop/vhost-user.rst).

Owns the wire format of every message ptmig exchanges with a vhost-user backend: the 12-byte
header {u32 request, u32 flags, u32 size}, the payload layouts (u64, vring state, vring address,
memory table, single memory region, log description, config space, IOTLB message, vring area),
which payload and how many file descriptors each request carries, and what its reply looks
like. Everything is little-endian (the spec says "machine native"; ptmig runs on x86-64 only).

The backend is untrusted input. `FrameReader` splits a byte stream into frames and refuses a
size above `MAX_PAYLOAD` before buffering it; `decode_reply` accepts a frame only if it answers
the request that is outstanding (same request code, version 1, the REPLY flag, no unknown flag
bits, exactly the payload size that request's reply has, and no file descriptors). Every refusal
is a `VhostUserProtocolError` whose text names the field and value; nothing here raises anything
else on backend data. Received file descriptors that a frame may not carry are the caller's to
close (see `connection`).

Messages the frontend sends are encoded with `encode_request`, which checks that the payload type
and the number of fds fit the request; `decode_request` is its inverse (what a backend does), used
to test round trips and by test backends. Backend-initiated requests (the backend channel, after
SET_BACKEND_REQ_FD) are decoded by `decode_backend_request`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import ClassVar, Final, Self

from ...errors import PtmigError

HEADER: Final = struct.Struct("<III")
VERSION: Final = 0x1
FLAG_VERSION_MASK: Final = 0x3
FLAG_REPLY: Final = 1 << 2
FLAG_NEED_REPLY: Final = 1 << 3
KNOWN_FLAGS: Final = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
#: The largest payload ptmig sends or accepts: a full memory table (8 + 8 * 32 bytes) or a
#: config space of 256 bytes with its 12-byte header both fit.
MAX_PAYLOAD: Final = 4096
#: A SET_MEM_TABLE carries at most this many regions (and as many fds).
MAX_REGIONS: Final = 8
MAX_FDS: Final = MAX_REGIONS
#: The most config-space bytes one GET_CONFIG may ask for (virtio-mmio's window is 256 bytes).
MAX_CONFIG: Final = 256
#: SET_VRING_KICK/CALL/ERR payload: bits 0-7 the vring index, bit 8 "no fd in this message".
VRING_INDEX_MASK: Final = 0xFF
VRING_NOFD: Final = 1 << 8
#: VHOST_VRING_F_LOG in a vring address's flags: log writes to the used ring.
VRING_F_LOG: Final = 1
LOG_PAGE: Final = 0x1000

# -- feature bits -----------------------------------------------------------------------------
F_LOG_ALL: Final = 26  # VHOST_F_LOG_ALL
F_PROTOCOL_FEATURES: Final = 30  # VHOST_USER_F_PROTOCOL_FEATURES


class ProtocolFeature(IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class Request(IntEnum):
    """Front-end requests (the ones ptmig can send)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SET_BACKEND_REQ_FD = 21
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38


class BackendRequest(IntEnum):
    """Back-end requests on the backend channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class VhostUserProtocolError(PtmigError):
    """A message that breaks the vhost-user protocol (from the backend: it misbehaves)."""


# -- payloads ---------------------------------------------------------------------------------


class Payload:
    """A payload layout: `pack()` and `unpack(data)` (exact size, or raises)."""

    FORMAT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def unpack(cls, data: bytes, what: str) -> Self:
        raise NotImplementedError

    @classmethod
    def _fixed(cls, data: bytes, what: str) -> tuple[int, ...]:
        if len(data) != cls.FORMAT.size:
            raise VhostUserProtocolError(
                f"{what}: payload of {len(data)} bytes, a {cls.__name__} has {cls.FORMAT.size}"
            )
        return cls.FORMAT.unpack(data)


@dataclass(frozen=True)
class _Fixed(Payload):
    """A payload of fixed size whose dataclass fields are FORMAT's fields, in order."""

    def pack(self) -> bytes:
        return self.FORMAT.pack(*(getattr(self, f.name) for f in fields(self)))

    @classmethod
    def unpack(cls, data: bytes, what: str) -> Self:
        return cls(*cls._fixed(data, what))


@dataclass(frozen=True)
class Empty(_Fixed):
    FORMAT: ClassVar[struct.Struct] = struct.Struct("")


@dataclass(frozen=True)
class U64(_Fixed):
    value: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<Q")


@dataclass(frozen=True)
class VringState(_Fixed):
    index: int
    num: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<II")


@dataclass(frozen=True)
class VringAddr(_Fixed):
    """Ring addresses in the frontend's user address space; `log` is the used ring's GPA."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    user_addr: int
    mmap_offset: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.gpa, self.size, self.user_addr, self.mmap_offset)


@dataclass(frozen=True)
class MemTable(Payload):
    regions: tuple[MemRegion, ...]
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        return self.FORMAT.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes, what: str) -> MemTable:
        if len(data) < cls.FORMAT.size:
            raise VhostUserProtocolError(f"{what}: memory table of {len(data)} bytes")
        n, _pad = cls.FORMAT.unpack_from(data)
        if n > MAX_REGIONS:
            raise VhostUserProtocolError(f"{what}: {n} memory regions, at most {MAX_REGIONS}")
        if len(data) != cls.FORMAT.size + n * MemRegion.FORMAT.size:
            raise VhostUserProtocolError(f"{what}: {len(data)} bytes for {n} memory regions")
        regions = tuple(
            MemRegion(
                *MemRegion.FORMAT.unpack_from(data, cls.FORMAT.size + i * MemRegion.FORMAT.size)
            )
            for i in range(n)
        )
        return cls(regions)


@dataclass(frozen=True)
class SingleRegion(Payload):
    region: MemRegion
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQQQ")

    def pack(self) -> bytes:
        return b"\0" * 8 + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes, what: str) -> SingleRegion:
        return cls(MemRegion(*cls._fixed(data, what)[1:]))


@dataclass(frozen=True)
class LogBase(_Fixed):
    size: int
    offset: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQ")


@dataclass(frozen=True)
class Config(Payload):
    """{u32 offset, u32 size, u32 flags, size bytes}; a reply with size 0 means "error"."""

    offset: int
    size: int
    flags: int
    data: bytes
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<III")

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes, what: str) -> Config:
        if len(data) < cls.FORMAT.size:
            raise VhostUserProtocolError(f"{what}: config payload of {len(data)} bytes")
        offset, size, flags = cls.FORMAT.unpack_from(data)
        if size > MAX_CONFIG or len(data) != cls.FORMAT.size + size:
            raise VhostUserProtocolError(
                f"{what}: config size {size} with {len(data) - cls.FORMAT.size} bytes of data"
            )
        return cls(offset, size, flags, bytes(data[cls.FORMAT.size :]))


@dataclass(frozen=True)
class IotlbMsg(_Fixed):
    iova: int
    size: int
    user_addr: int
    perm: int
    type: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQBB6x")


@dataclass(frozen=True)
class VringArea(_Fixed):
    u64: int
    size: int
    offset: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQ")


# -- what each request carries ----------------------------------------------------------------

#: fd rules: an int is an exact count; "regions" = one per memory region; "vring" = one unless
#: the payload sets VRING_NOFD; "optional" = 0 or 1.
FdRule = int | str


@dataclass(frozen=True)
class Spec:
    payload: type[Payload]
    reply: type[Payload] | None  # the request's own reply, if it has one
    fds: FdRule = 0


REQUESTS: Final[dict[Request, Spec]] = {
    Request.GET_FEATURES: Spec(Empty, U64),
    Request.SET_FEATURES: Spec(U64, None),
    Request.SET_OWNER: Spec(Empty, None),
    Request.RESET_OWNER: Spec(Empty, None),
    Request.SET_MEM_TABLE: Spec(MemTable, None, "regions"),
    Request.SET_LOG_BASE: Spec(LogBase, U64, 1),
    Request.SET_LOG_FD: Spec(Empty, None, 1),
    Request.SET_VRING_NUM: Spec(VringState, None),
    Request.SET_VRING_ADDR: Spec(VringAddr, None),
    Request.SET_VRING_BASE: Spec(VringState, None),
    Request.GET_VRING_BASE: Spec(VringState, VringState),
    Request.SET_VRING_KICK: Spec(U64, None, "vring"),
    Request.SET_VRING_CALL: Spec(U64, None, "vring"),
    Request.SET_VRING_ERR: Spec(U64, None, "vring"),
    Request.GET_PROTOCOL_FEATURES: Spec(Empty, U64),
    Request.SET_PROTOCOL_FEATURES: Spec(U64, None),
    Request.GET_QUEUE_NUM: Spec(Empty, U64),
    Request.SET_VRING_ENABLE: Spec(VringState, None),
    Request.SET_BACKEND_REQ_FD: Spec(Empty, None, 1),
    Request.GET_CONFIG: Spec(Config, Config),
    Request.SET_CONFIG: Spec(Config, None),
    Request.GET_MAX_MEM_SLOTS: Spec(Empty, U64),
    Request.ADD_MEM_REG: Spec(SingleRegion, None, 1),
    Request.REM_MEM_REG: Spec(SingleRegion, None, "optional"),
}

BACKEND_REQUESTS: Final[dict[BackendRequest, Spec]] = {
    BackendRequest.IOTLB_MSG: Spec(IotlbMsg, U64),
    BackendRequest.CONFIG_CHANGE_MSG: Spec(Empty, U64),
    BackendRequest.VRING_HOST_NOTIFIER_MSG: Spec(VringArea, U64, "vring"),
}


def _expected_fds(spec: Spec, payload: Payload) -> tuple[int, int]:
    """(fewest, most) fds a message with this payload carries."""
    rule = spec.fds
    if isinstance(rule, int):
        return rule, rule
    if rule == "regions":
        assert isinstance(payload, MemTable)
        return len(payload.regions), len(payload.regions)
    if rule == "vring":
        word = (
            payload.value
            if isinstance(payload, U64)
            else payload.u64
            if isinstance(payload, VringArea)
            else 0
        )
        return (0, 0) if word & VRING_NOFD else (1, 1)
    return 0, 1


@dataclass(frozen=True)
class Message:
    """One decoded message: its request code, flags, payload and the fds that came with it."""

    request: int
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


def encode_request(
    request: Request, payload: Payload | None = None, nfds: int = 0, *, need_reply: bool = False
) -> bytes:
    """The bytes of one front-end request carrying `nfds` fds (sent alongside by the caller)."""
    spec = REQUESTS[request]
    payload = Empty() if payload is None else payload
    if not isinstance(payload, spec.payload):
        raise TypeError(
            f"{request.name} takes a {spec.payload.__name__} payload, got {type(payload).__name__}"
        )
    _check_outgoing(request.name, spec, payload, nfds)
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return _frame(request, flags, payload.pack())


def encode_reply(request: int, payload: Payload, *, need_reply_echo: bool = False) -> bytes:
    """A reply as a backend sends it (for test backends and round-trip tests)."""
    flags = VERSION | FLAG_REPLY | (FLAG_NEED_REPLY if need_reply_echo else 0)
    return _frame(request, flags, payload.pack())


def encode_backend_request(
    request: BackendRequest, payload: Payload, nfds: int = 0, *, need_reply: bool = False
) -> bytes:
    spec = BACKEND_REQUESTS[request]
    if not isinstance(payload, spec.payload):
        raise TypeError(
            f"{request.name} takes a {spec.payload.__name__} payload, got {type(payload).__name__}"
        )
    _check_outgoing(request.name, spec, payload, nfds)
    return _frame(request, VERSION | (FLAG_NEED_REPLY if need_reply else 0), payload.pack())


def _check_outgoing(name: str, spec: Spec, payload: Payload, nfds: int) -> None:
    lo, hi = _expected_fds(spec, payload)
    if not lo <= nfds <= hi:
        raise ValueError(f"{name} with this payload carries {lo}..{hi} fds, not {nfds}")
    if isinstance(payload, MemTable) and len(payload.regions) > MAX_REGIONS:
        raise ValueError(f"{name}: {len(payload.regions)} regions, at most {MAX_REGIONS}")


def _frame(request: int, flags: int, body: bytes) -> bytes:
    if len(body) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(body)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(request, flags, len(body)) + body


# -- decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A header and its payload bytes, as split off a stream (not yet interpreted)."""

    request: int
    flags: int
    body: bytes


class FrameReader:
    """Splits a byte stream into frames; refuses a declared size above MAX_PAYLOAD at once."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        return len(self._buf)

    def next_frame(self) -> Frame | None:
        if len(self._buf) < HEADER.size:
            return None
        request, flags, size = HEADER.unpack_from(self._buf)
        if size > MAX_PAYLOAD:
            raise VhostUserProtocolError(
                f"message {request} declares a payload of {size} bytes, more than {MAX_PAYLOAD}"
            )
        if len(self._buf) < HEADER.size + size:
            return None
        body = bytes(self._buf[HEADER.size : HEADER.size + size])
        del self._buf[: HEADER.size + size]
        return Frame(request, flags, body)


def _check_flags(flags: int, what: str, *, reply: bool) -> None:
    if flags & FLAG_VERSION_MASK != VERSION:
        raise VhostUserProtocolError(
            f"{what}: version {flags & FLAG_VERSION_MASK} in flags {flags:#x}, expected {VERSION}"
        )
    if flags & ~KNOWN_FLAGS:
        raise VhostUserProtocolError(f"{what}: unknown flag bits in {flags:#x}")
    if bool(flags & FLAG_REPLY) != reply:
        raise VhostUserProtocolError(
            f"{what}: flags {flags:#x} {'lack' if reply else 'carry'} the REPLY bit"
        )


def check_request_flags(flags: int, what: str) -> None:
    """Refuse a request's flags (version, unknown bits, REPLY set) without decoding it (a
    backend request whose code this frontend does not know is still answered)."""
    _check_flags(flags, what, reply=False)


@dataclass(frozen=True)
class Expected:
    """The reply the outstanding request waits for: its own reply type, or a u64 ack."""

    request: Request
    reply: type[Payload]
    config_size: int = 0  # GET_CONFIG: the size asked for

    @classmethod
    def for_request(
        cls, request: Request, payload: Payload | None = None, need_reply: bool = False
    ) -> Expected | None:
        """What `request` (sent with `payload`) will be answered with, or None (no reply)."""
        own = REQUESTS[request].reply
        if own is None:
            return cls(request, U64) if need_reply else None
        size = payload.size if isinstance(payload, Config) else 0
        return cls(request, own, size)


def decode_reply(frame: Frame, nfds: int, expected: Expected) -> Payload:
    """Interpret `frame` (which came with `nfds` fds) as the reply to `expected.request`."""
    what = f"reply to {expected.request.name}"
    if frame.request != expected.request:
        name = _name(frame.request)
        raise VhostUserProtocolError(f"{what}: got message {name} instead")
    _check_flags(frame.flags, what, reply=True)
    if nfds:
        raise VhostUserProtocolError(f"{what}: carries {nfds} file descriptors, expected none")
    payload = _unpack(expected.reply, frame.body, what)
    if isinstance(payload, Config) and payload.size not in (0, expected.config_size):
        raise VhostUserProtocolError(
            f"{what}: {payload.size} config bytes, asked for {expected.config_size}"
        )
    return payload


def decode_request(frame: Frame, fds: tuple[int, ...]) -> Message:
    """A front-end request as a backend reads it (round trips and test backends)."""
    try:
        request = Request(frame.request)
    except ValueError:
        raise VhostUserProtocolError(f"unknown front-end request {frame.request}") from None
    return _decode_with(REQUESTS[request], request, frame, fds)


def decode_backend_request(frame: Frame, fds: tuple[int, ...]) -> Message:
    """A backend-initiated request read from the backend channel."""
    try:
        request = BackendRequest(frame.request)
    except ValueError:
        raise VhostUserProtocolError(f"unknown backend request {frame.request}") from None
    return _decode_with(BACKEND_REQUESTS[request], request, frame, fds)


def _decode_with(spec: Spec, request: IntEnum, frame: Frame, fds: tuple[int, ...]) -> Message:
    what = f"request {request.name}"
    _check_flags(frame.flags, what, reply=False)
    payload = _unpack(spec.payload, frame.body, what)
    lo, hi = _expected_fds(spec, payload)
    if not lo <= len(fds) <= hi:
        raise VhostUserProtocolError(f"{what}: carries {len(fds)} fds, expected {lo}..{hi}")
    return Message(int(request), frame.flags, payload, fds)


def _unpack(cls: type[Payload], body: bytes, what: str) -> Payload:
    return cls.unpack(body, what)


def _name(code: int) -> str:
    try:
        return f"{Request(code).name} ({code})"
    except ValueError:
        return str(code)
