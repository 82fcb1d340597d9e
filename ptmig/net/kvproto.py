"""Wire format of the guest's UDP key-value service `kv` (see docs/KV_PROTOCOL.md).

Owns encoding and strict decoding of requests and replies; shared by the load client, the
tests' fake server and anything else that talks to the guest. All integers little-endian.

    request: u32 magic "KVQ1" (0x3151564b) | u32 req_id | u8 op | u8 flags | u16 klen
             | u16 vlen | u16 reserved (0) | key[klen] | value[vlen]
    reply:   u32 magic "KVR1" (0x3152564b) | u32 req_id | u8 status | u8 reserved (0)
             | u16 vlen | value[vlen]

A UDP datagram carries exactly one message: trailing bytes are an error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ..errors import PtmigError

REQUEST_MAGIC = 0x3151564B
REPLY_MAGIC = 0x3152564B
DEFAULT_PORT = 7000
MAX_KEY = 128
MAX_VALUE = 512
FLAG_DURABLE = 0x01
KNOWN_FLAGS = FLAG_DURABLE

REQUEST_HEADER = struct.Struct("<IIBBHHH")
REPLY_HEADER = struct.Struct("<IIBBH")
MAX_REQUEST = REQUEST_HEADER.size + MAX_KEY + MAX_VALUE
MAX_REPLY = REPLY_HEADER.size + MAX_VALUE


class Op(IntEnum):
    PUT = 1
    GET = 2
    STATS = 3


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_REQUEST = 2
    IO_ERROR = 3


class KvProtocolError(PtmigError, ValueError):
    """A kv message that is malformed or cannot be encoded."""


@dataclass(frozen=True)
class KvRequest:
    req_id: int
    op: Op
    key: bytes = b""
    value: bytes = b""
    flags: int = 0


@dataclass(frozen=True)
class KvReply:
    req_id: int
    status: Status
    value: bytes = b""


def _check_u32(what: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise KvProtocolError(f"{what} must fit in u32, got {value}")


def encode_request(req: KvRequest) -> bytes:
    _check_u32("req_id", req.req_id)
    if len(req.key) > MAX_KEY:
        raise KvProtocolError(f"key is {len(req.key)} bytes, max {MAX_KEY}")
    if len(req.value) > MAX_VALUE:
        raise KvProtocolError(f"value is {len(req.value)} bytes, max {MAX_VALUE}")
    if not 0 <= req.flags <= 0xFF or req.flags & ~KNOWN_FLAGS:
        raise KvProtocolError(f"unknown request flags {req.flags:#x}")
    return (
        REQUEST_HEADER.pack(
            REQUEST_MAGIC, req.req_id, int(req.op), req.flags, len(req.key), len(req.value), 0
        )
        + req.key
        + req.value
    )


def decode_request(data: bytes | bytearray | memoryview) -> KvRequest:
    raw = bytes(data)
    if len(raw) < REQUEST_HEADER.size:
        raise KvProtocolError(
            f"request shorter than its {REQUEST_HEADER.size}-byte header: {len(raw)} bytes"
        )
    magic, req_id, op, flags, klen, vlen, reserved = REQUEST_HEADER.unpack_from(raw)
    if magic != REQUEST_MAGIC:
        raise KvProtocolError(f"request magic {magic:#010x}, expected {REQUEST_MAGIC:#010x}")
    try:
        op_enum = Op(op)
    except ValueError:
        raise KvProtocolError(f"unknown op {op}") from None
    if flags & ~KNOWN_FLAGS:
        raise KvProtocolError(f"unknown request flags {flags:#x}")
    if reserved:
        raise KvProtocolError(f"reserved field must be 0, got {reserved:#x}")
    if klen > MAX_KEY:
        raise KvProtocolError(f"klen {klen} exceeds {MAX_KEY}")
    if vlen > MAX_VALUE:
        raise KvProtocolError(f"vlen {vlen} exceeds {MAX_VALUE}")
    expected = REQUEST_HEADER.size + klen + vlen
    if len(raw) != expected:
        raise KvProtocolError(f"request is {len(raw)} bytes, header says {expected}")
    key_end = REQUEST_HEADER.size + klen
    return KvRequest(req_id, op_enum, raw[REQUEST_HEADER.size : key_end], raw[key_end:], flags)


def encode_reply(reply: KvReply) -> bytes:
    _check_u32("req_id", reply.req_id)
    if len(reply.value) > MAX_VALUE:
        raise KvProtocolError(f"reply value is {len(reply.value)} bytes, max {MAX_VALUE}")
    return (
        REPLY_HEADER.pack(REPLY_MAGIC, reply.req_id, int(reply.status), 0, len(reply.value))
        + reply.value
    )


def decode_reply(data: bytes | bytearray | memoryview) -> KvReply:
    raw = bytes(data)
    if len(raw) < REPLY_HEADER.size:
        raise KvProtocolError(
            f"reply shorter than its {REPLY_HEADER.size}-byte header: {len(raw)} bytes"
        )
    magic, req_id, status, reserved, vlen = REPLY_HEADER.unpack_from(raw)
    if magic != REPLY_MAGIC:
        raise KvProtocolError(f"reply magic {magic:#010x}, expected {REPLY_MAGIC:#010x}")
    try:
        status_enum = Status(status)
    except ValueError:
        raise KvProtocolError(f"unknown reply status {status}") from None
    if reserved:
        raise KvProtocolError(f"reply reserved byte must be 0, got {reserved:#x}")
    if vlen > MAX_VALUE:
        raise KvProtocolError(f"reply vlen {vlen} exceeds {MAX_VALUE}")
    if len(raw) != REPLY_HEADER.size + vlen:
        raise KvProtocolError(f"reply is {len(raw)} bytes, header says {REPLY_HEADER.size + vlen}")
    return KvReply(req_id, status_enum, raw[REPLY_HEADER.size :])
