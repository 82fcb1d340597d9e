"""Control datagrams between UDP backends and the learning switch.

On the switch's UDP port every datagram is either one Ethernet frame (>= 14 bytes) or one
control message. Control messages are told apart without ambiguity: a control message that a
backend may send or receive is shorter than an Ethernet header (at most 13 bytes), so it can
never be mistaken for a frame.

    control message: b"PTSW" | u8 type | u8 version (1) | optional payload

    HELLO       (1) payload: the sender's MAC (6 bytes) or nothing. Registers the sender's
                    endpoint (it receives floods from now on) and is a keepalive against aging.
                    The MAC is learned only if the switch does not know it yet: a hello never
                    moves a MAC (a migration destination says hello long before it owns the
                    MAC; it takes the MAC over by sending a frame, e.g. a RARP announcement).
                    Never forwarded. Answered with HELLO_ACK.
    HELLO_ACK   (2) no payload.
    PROBE       (3) no payload: "is a switch listening here?" Answered with PROBE_REPLY.
                    Does not register the sender.
    PROBE_REPLY (4) payload: u32 pid of the switch process (little-endian).
    STATS       (5) no payload: answered with STATS_REPLY to the asker only.
    STATS_REPLY (6) payload: JSON object of counters (may exceed 13 bytes: only a stats client
                    that asked for it receives it).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum

from ..errors import PtmigError

MAGIC = b"PTSW"
VERSION = 1
MAX_CONTROL_LEN = 13  # strictly shorter than an Ethernet header
_HEADER = struct.Struct("<4sBB")


class Msg(IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    PROBE = 3
    PROBE_REPLY = 4
    STATS = 5
    STATS_REPLY = 6


class ControlError(PtmigError, ValueError):
    """A datagram that claims to be a switch control message but is malformed."""


@dataclass(frozen=True)
class Control:
    type: Msg
    payload: bytes = b""


def is_control(datagram: bytes | bytearray | memoryview) -> bool:
    """True when the datagram is a control message rather than an Ethernet frame.

    A STATS_REPLY is longer and is recognised only by a client that asked for it."""
    return len(datagram) <= MAX_CONTROL_LEN and bytes(datagram[:4]) == MAGIC


def encode(msg: Msg, payload: bytes = b"") -> bytes:
    data = _HEADER.pack(MAGIC, int(msg), VERSION) + payload
    if len(data) > MAX_CONTROL_LEN and msg != Msg.STATS_REPLY:
        raise ControlError(
            f"control message {msg.name} is {len(data)} bytes, max {MAX_CONTROL_LEN}"
        )
    return data


def decode(datagram: bytes | bytearray | memoryview) -> Control:
    raw = bytes(datagram)
    if len(raw) < _HEADER.size:
        raise ControlError(f"control message shorter than {_HEADER.size} bytes: {raw!r}")
    magic, typ, version = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ControlError(f"control magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ControlError(f"control version {version}, expected {VERSION}")
    try:
        msg = Msg(typ)
    except ValueError:
        raise ControlError(f"unknown control message type {typ}") from None
    payload = raw[_HEADER.size :]
    if msg == Msg.HELLO and len(payload) not in (0, 6):
        raise ControlError(f"HELLO payload must be empty or a 6-byte MAC, got {len(payload)}")
    if msg == Msg.PROBE_REPLY and len(payload) != 4:
        raise ControlError(f"PROBE_REPLY payload must be a 4-byte pid, got {len(payload)}")
    if msg in (Msg.HELLO_ACK, Msg.PROBE, Msg.STATS) and payload:
        raise ControlError(f"{msg.name} carries no payload, got {len(payload)} bytes")
    return Control(msg, payload)


def hello(mac: bytes | None) -> bytes:
    if mac is not None and len(mac) != 6:
        raise ControlError(f"HELLO MAC must be 6 bytes, got {len(mac)}")
    return encode(Msg.HELLO, mac or b"")


def probe_reply(pid: int) -> bytes:
    return encode(Msg.PROBE_REPLY, struct.pack("<I", pid & 0xFFFFFFFF))


def probe_reply_pid(control: Control) -> int:
    return int(struct.unpack("<I", control.payload)[0])


def stats_reply(counters: dict[str, int]) -> bytes:
    return encode(Msg.STATS_REPLY, json.dumps(counters, sort_keys=True).encode())


def stats_from_reply(control: Control) -> dict[str, int]:
    try:
        data = json.loads(control.payload)
    except ValueError as exc:
        raise ControlError(f"STATS_REPLY payload is not JSON: {control.payload[:64]!r}") from exc
    if not isinstance(data, dict):
        raise ControlError(f"STATS_REPLY payload is not an object: {data!r}")
    return {str(k): int(v) for k, v in data.items()}
