"""The migration wire format: preamble, frame header, per-event metadata, hard size caps.

Stream = PREAMBLE, then frames. Each side sends the 8-byte PREAMBLE (`MAGIC`) before its first
frame. A frame is

    header   12 bytes  <B type, B flags, H reserved (0), I metadata_len, I crc32>
    metadata metadata_len bytes (layout per type, below)
    payload  PAGE_RUNS only: the bytes of the DATA runs, in run order (length implied by runs)

`crc32` is zlib.crc32 over the first 8 header bytes followed by the metadata. Page payloads are
covered only if the frame has FLAG_PAYLOAD_CRC; then metadata carries the payload's crc32.

Metadata layouts (all little-endian):
    HELLO           <I version> + UTF-8 JSON {"fingerprint": {...}, "capabilities": [...]}
    HELLO_ACK       <B accepted> + UTF-8 reason
    ROUND_START     <Q round, Q dirty_pages>
    PAGE_RUNS       <I nruns, I payload_crc32> + nruns × 16-byte run records (events.RUN_DTYPE)
    ROUND_END       <Q round>
    VCPU_STATES     blob
    DEVICE_STATES   blob
    VERIFY_DIGESTS  <Q start_page> + n × <Q digest>
    COMPLETE        (empty)
    SWITCHOVER_ACK  <B ok> + UTF-8 reason
    ABORT           UTF-8 reason
    POSTCOPY_START  the pending-page bitmap (uint64 words)
    POSTCOPY_PAGES  <Q first_page, I npages> + the pages' bytes (none: zero pages)
    PAGE_REQUEST    <Q first_page, I npages>
    POSTCOPY_END    (empty)
    POSTCOPY_RECEIVED  the destination's received-page bitmap (uint64 words), on a resume
    POSTCOPY_DISCARD   the pages post-copy will fetch (uint64 words), before the stop
    POSTCOPY_DISCARDED (empty)

Everything the peer sends is checked against the caps below before a byte more is buffered.
This module parses; `pages.validate_runs` and `protocol` check the numbers against guest RAM.
"""

from __future__ import annotations

import enum
import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ptmig.migration.events import (
    RUN_DTYPE,
    Abort,
    Complete,
    DeviceStates,
    Event,
    Hello,
    HelloAck,
    PageRequest,
    PostcopyDiscard,
    PostcopyDiscarded,
    PostcopyDone,
    PostcopyEnd,
    PostcopyPages,
    PostcopyReceived,
    PostcopyStart,
    RemoteProtocolError,
    RoundEnd,
    RoundStart,
    SwitchoverAck,
    VcpuStates,
    VerifyDigests,
    VerifyReport,
)

MAGIC: Final = b"PTMIG\r\n\x1a"
PROTOCOL_VERSION: Final = 2  # 2: PostcopyDone

KiB: Final = 1024
MiB: Final = 1024 * KiB

MAX_METADATA: Final = 1 * MiB + 8  # the generic cap (a full run list plus its 8-byte prefix)
MAX_BATCH_PAYLOAD: Final = 64 * MiB
MAX_VCPU_STATE: Final = 1 * MiB
MAX_DEVICE_STATE: Final = 4 * MiB
MAX_REASON: Final = 4 * KiB
MAX_HELLO: Final = 64 * KiB
MAX_RUNS_PER_BATCH: Final = (1 * MiB) // RUN_DTYPE.itemsize  # 65536
MAX_DIGESTS_PER_FRAME: Final = 1 << 20  # 8 MiB of digests (4 GiB of RAM)
MAX_PENDING_BITMAP: Final = 2 * MiB  # one bit per page: 64 GiB of RAM
MAX_POSTCOPY_PAGES: Final = 64  # pages per POSTCOPY_PAGES frame (256 KiB)

HEADER: Final = struct.Struct("<BBHII")
HEADER_SIZE: Final = HEADER.size
_RUNS_PREFIX: Final = struct.Struct("<II")
_ROUND_START: Final = struct.Struct("<QQ")
_U64: Final = struct.Struct("<Q")
_U32: Final = struct.Struct("<I")
_PAGE_RANGE: Final = struct.Struct("<QI")

_VERIFY_REPORT: Final = struct.Struct("<QQI")
MAX_REPORTED_PAGES: Final = 16

FLAG_PAYLOAD_CRC: Final = 0x01
MAX_JSON_DEPTH: Final = 32  # nesting of arrays and objects in a peer's JSON (HELLO, DEVICE_STATES)
_JSON_ESCAPE: Final = re.compile(rb"\\.", re.DOTALL)
_JSON_STRING: Final = re.compile(rb'"[^"]*"')  # once escapes are gone: linear on any input
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    ROUND_START = 3
    PAGE_RUNS = 4
    ROUND_END = 5
    VCPU_STATES = 6
    DEVICE_STATES = 7
    VERIFY_DIGESTS = 8
    COMPLETE = 9
    SWITCHOVER_ACK = 10
    ABORT = 11
    VERIFY_REPORT = 12
    POSTCOPY_START = 13
    POSTCOPY_PAGES = 14
    PAGE_REQUEST = 15
    POSTCOPY_END = 16
    POSTCOPY_RECEIVED = 17
    POSTCOPY_DISCARD = 18
    POSTCOPY_DISCARDED = 19
    POSTCOPY_DONE = 20


# (minimum, maximum) metadata length per frame type.
METADATA_LIMITS: Final[dict[FrameType, tuple[int, int]]] = {
    FrameType.HELLO: (4, MAX_HELLO),
    FrameType.HELLO_ACK: (1, 1 + MAX_REASON),
    FrameType.ROUND_START: (_ROUND_START.size, _ROUND_START.size),
    FrameType.PAGE_RUNS: (_RUNS_PREFIX.size, _RUNS_PREFIX.size + MAX_RUNS_PER_BATCH * 16),
    FrameType.ROUND_END: (8, 8),
    FrameType.VCPU_STATES: (0, MAX_VCPU_STATE),
    FrameType.DEVICE_STATES: (0, MAX_DEVICE_STATE),
    FrameType.VERIFY_DIGESTS: (8, 8 + 8 * MAX_DIGESTS_PER_FRAME),
    FrameType.COMPLETE: (0, 0),
    FrameType.SWITCHOVER_ACK: (1, 1 + MAX_REASON),
    FrameType.VERIFY_REPORT: (_VERIFY_REPORT.size, _VERIFY_REPORT.size + 8 * MAX_REPORTED_PAGES),
    FrameType.ABORT: (0, MAX_REASON),
    FrameType.POSTCOPY_START: (8, MAX_PENDING_BITMAP),
    FrameType.POSTCOPY_PAGES: (_PAGE_RANGE.size, _PAGE_RANGE.size + MAX_POSTCOPY_PAGES * 4 * KiB),
    FrameType.PAGE_REQUEST: (_PAGE_RANGE.size, _PAGE_RANGE.size),
    FrameType.POSTCOPY_END: (0, 0),
    FrameType.POSTCOPY_RECEIVED: (8, MAX_PENDING_BITMAP),
    FrameType.POSTCOPY_DISCARD: (8, MAX_PENDING_BITMAP),
    FrameType.POSTCOPY_DISCARDED: (0, 0),
    FrameType.POSTCOPY_DONE: (0, 0),
}


@dataclass(frozen=True)
class FrameHeader:
    type: FrameType
    flags: int
    metadata_len: int
    crc: int


def encode_frame(ftype: FrameType, metadata: bytes, flags: int = 0) -> bytes:
    """Header + metadata for one frame (the payload, if any, follows separately)."""
    lo, hi = METADATA_LIMITS[ftype]
    if not lo <= len(metadata) <= hi:
        raise ValueError(f"{ftype.name} metadata is {len(metadata)} bytes, allowed {lo}..{hi}")
    head = HEADER.pack(ftype, flags, 0, len(metadata), 0)[:8]
    crc = zlib.crc32(metadata, zlib.crc32(head))
    return head + _U32.pack(crc) + metadata


def parse_header(raw: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and bounds-check a 12-byte header; raises RemoteProtocolError."""
    ftype_raw, flags, reserved, mlen, crc = HEADER.unpack(raw)
    try:
        ftype = FrameType(ftype_raw)
    except ValueError:
        raise RemoteProtocolError(f"unknown frame type {ftype_raw}") from None
    if reserved != 0:
        raise RemoteProtocolError(f"{ftype.name} frame: reserved header field is {reserved}, not 0")
    allowed_flags = FLAG_PAYLOAD_CRC if ftype is FrameType.PAGE_RUNS else 0
    if flags & ~allowed_flags:
        raise RemoteProtocolError(f"{ftype.name} frame: unknown flags {flags:#04x}")
    lo, hi = METADATA_LIMITS[ftype]
    if not lo <= mlen <= hi:
        raise RemoteProtocolError(
            f"{ftype.name} frame: metadata length {mlen} outside the allowed {lo}..{hi} bytes"
        )
    return FrameHeader(ftype, flags, mlen, crc)


def check_crc(
    raw_header: bytes | bytearray | memoryview, header: FrameHeader, metadata: bytes
) -> None:
    crc = zlib.crc32(metadata, zlib.crc32(bytes(raw_header[:8])))
    if crc != header.crc:
        raise RemoteProtocolError(
            f"{header.type.name} frame: header/metadata crc32 mismatch "
            f"(frame says {header.crc:#010x}, computed {crc:#010x})"
        )


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data`, read without parsing it (brackets
    inside strings do not count). Linear and iterative: safe on any input."""
    unescaped = _JSON_ESCAPE.sub(b"", data)
    brackets = _JSON_STRING.sub(b"", unescaped).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    arr = np.frombuffer(brackets, np.uint8)
    steps = np.where((arr == ord("[")) | (arr == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def load_json(data: bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The one parser of JSON from the peer: nesting bounded before parsing (Python's parser
    recurses), then UTF-8 and JSON syntax checked; RemoteProtocolError names `what`."""
    depth = json_depth(data)
    if depth > max_depth:
        raise RemoteProtocolError(f"{what} nests {depth} levels deep, more than {max_depth}")
    try:
        return json.loads(_decode_text(data, what))
    except (json.JSONDecodeError, RecursionError) as e:
        raise RemoteProtocolError(f"{what} is not valid JSON: {e}") from None


def _decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RemoteProtocolError(f"{what} is not valid UTF-8: {e}") from None


def _encode_text(text: str, what: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > MAX_REASON:
        raise ValueError(f"{what} is {len(data)} bytes, more than {MAX_REASON}")
    return data


def encode_event(event: Event) -> bytes:
    """Header + metadata for every event except page runs (see `encode_page_runs`)."""
    match event:
        case Hello(version, fingerprint, caps):
            body = json.dumps(
                {"fingerprint": fingerprint, "capabilities": list(caps)}, sort_keys=True
            ).encode()
            return encode_frame(FrameType.HELLO, _U32.pack(version) + body)
        case HelloAck(accepted, reason):
            return encode_frame(
                FrameType.HELLO_ACK, bytes([int(accepted)]) + _encode_text(reason, "reason")
            )
        case RoundStart(rnd, dirty):
            return encode_frame(FrameType.ROUND_START, _ROUND_START.pack(rnd, dirty))
        case RoundEnd(rnd):
            return encode_frame(FrameType.ROUND_END, _U64.pack(rnd))
        case VcpuStates(blob):
            return encode_frame(FrameType.VCPU_STATES, bytes(blob))
        case DeviceStates(blob):
            return encode_frame(FrameType.DEVICE_STATES, bytes(blob))
        case VerifyDigests(start, digests):
            return encode_frame(FrameType.VERIFY_DIGESTS, _U64.pack(start) + bytes(digests))
        case Complete():
            return encode_frame(FrameType.COMPLETE, b"")
        case SwitchoverAck(ok, reason):
            return encode_frame(
                FrameType.SWITCHOVER_ACK, bytes([int(ok)]) + _encode_text(reason, "reason")
            )
        case Abort(reason):
            return encode_frame(FrameType.ABORT, _encode_text(reason, "abort reason"))
        case PostcopyStart(pending):
            return encode_frame(FrameType.POSTCOPY_START, bytes(pending))
        case PostcopyPages(first, npages, data):
            return encode_frame(FrameType.POSTCOPY_PAGES, _PAGE_RANGE.pack(first, npages) + data)
        case PageRequest(first, npages):
            return encode_frame(FrameType.PAGE_REQUEST, _PAGE_RANGE.pack(first, npages))
        case PostcopyEnd():
            return encode_frame(FrameType.POSTCOPY_END, b"")
        case PostcopyReceived(received):
            return encode_frame(FrameType.POSTCOPY_RECEIVED, bytes(received))
        case PostcopyDiscard(pending):
            return encode_frame(FrameType.POSTCOPY_DISCARD, bytes(pending))
        case PostcopyDiscarded():
            return encode_frame(FrameType.POSTCOPY_DISCARDED, b"")
        case PostcopyDone():
            return encode_frame(FrameType.POSTCOPY_DONE, b"")
        case VerifyReport(npages, mismatched, first):
            first = tuple(first)[:MAX_REPORTED_PAGES]
            return encode_frame(
                FrameType.VERIFY_REPORT,
                _VERIFY_REPORT.pack(npages, mismatched, len(first))
                + struct.pack(f"<{len(first)}Q", *first),
            )
    raise TypeError(f"encode_event cannot encode {type(event).__name__}")


def encode_page_runs(runs: np.ndarray, payload_crc: int | None) -> bytes:
    """Header + metadata of a PAGE_RUNS frame (the payload is sent after it)."""
    runs = np.ascontiguousarray(runs, dtype=RUN_DTYPE)
    flags = 0 if payload_crc is None else FLAG_PAYLOAD_CRC
    meta = _RUNS_PREFIX.pack(len(runs), payload_crc or 0) + runs.tobytes()
    return encode_frame(FrameType.PAGE_RUNS, meta, flags)


def decode_page_runs(metadata: bytes) -> tuple[np.ndarray, int]:
    """(runs, payload_crc) from PAGE_RUNS metadata; the runs are not yet checked against RAM."""
    nruns, crc = _RUNS_PREFIX.unpack_from(metadata)
    expect = _RUNS_PREFIX.size + nruns * RUN_DTYPE.itemsize
    if len(metadata) != expect:
        raise RemoteProtocolError(
            f"PAGE_RUNS frame: {nruns} runs need {expect} metadata bytes, got {len(metadata)}"
        )
    runs = np.frombuffer(metadata, dtype=RUN_DTYPE, offset=_RUNS_PREFIX.size).copy()
    return runs, crc


def decode_event(ftype: FrameType, metadata: bytes) -> Event:
    """Metadata → event for every frame type except PAGE_RUNS; raises RemoteProtocolError."""
    match ftype:
        case FrameType.HELLO:
            (version,) = _U32.unpack_from(metadata)
            body: Any = load_json(metadata[4:], "HELLO body")
            if not isinstance(body, dict) or not isinstance(body.get("fingerprint"), dict):
                raise RemoteProtocolError(
                    "HELLO body must be a JSON object with a 'fingerprint' object"
                )
            caps = body.get("capabilities", [])
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise RemoteProtocolError(f"HELLO capabilities must be a list of strings: {caps!r}")
            return Hello(version, body["fingerprint"], tuple(caps))
        case FrameType.HELLO_ACK | FrameType.SWITCHOVER_ACK:
            if metadata[0] not in (0, 1):
                raise RemoteProtocolError(f"{ftype.name}: flag byte is {metadata[0]}, not 0 or 1")
            reason = _decode_text(metadata[1:], f"{ftype.name} reason")
            if ftype is FrameType.HELLO_ACK:
                return HelloAck(bool(metadata[0]), reason)
            return SwitchoverAck(bool(metadata[0]), reason)
        case FrameType.ROUND_START:
            rnd, dirty = _ROUND_START.unpack(metadata)
            return RoundStart(rnd, dirty)
        case FrameType.ROUND_END:
            return RoundEnd(_U64.unpack(metadata)[0])
        case FrameType.VCPU_STATES:
            return VcpuStates(metadata)
        case FrameType.DEVICE_STATES:
            return DeviceStates(metadata)
        case FrameType.VERIFY_DIGESTS:
            if (len(metadata) - 8) % 8:
                raise RemoteProtocolError(
                    f"VERIFY_DIGESTS: {len(metadata) - 8} digest bytes is not a multiple of 8"
                )
            return VerifyDigests(_U64.unpack_from(metadata)[0], metadata[8:])
        case FrameType.COMPLETE:
            return Complete()
        case FrameType.ABORT:
            return Abort(_decode_text(metadata, "ABORT reason"))
        case FrameType.POSTCOPY_START | FrameType.POSTCOPY_RECEIVED | FrameType.POSTCOPY_DISCARD:
            if len(metadata) % 8:
                raise RemoteProtocolError(
                    f"{ftype.name}: a bitmap of {len(metadata)} bytes is not whole uint64 words"
                )
            if ftype is FrameType.POSTCOPY_RECEIVED:
                return PostcopyReceived(metadata)
            if ftype is FrameType.POSTCOPY_DISCARD:
                return PostcopyDiscard(metadata)
            return PostcopyStart(metadata)
        case FrameType.POSTCOPY_DISCARDED:
            return PostcopyDiscarded()
        case FrameType.POSTCOPY_DONE:
            return PostcopyDone()
        case FrameType.POSTCOPY_PAGES | FrameType.PAGE_REQUEST:
            first, npages = _PAGE_RANGE.unpack_from(metadata)
            if not 1 <= npages <= MAX_POSTCOPY_PAGES:
                raise RemoteProtocolError(
                    f"{ftype.name}: {npages} pages, allowed 1..{MAX_POSTCOPY_PAGES}"
                )
            if ftype is FrameType.PAGE_REQUEST:
                return PageRequest(first, npages)
            data = metadata[_PAGE_RANGE.size :]
            if len(data) not in (0, npages * 4 * KiB):
                raise RemoteProtocolError(
                    f"POSTCOPY_PAGES: {len(data)} bytes for {npages} pages (need "
                    f"{npages * 4 * KiB}, or none for zero pages)"
                )
            return PostcopyPages(first, npages, data)
        case FrameType.POSTCOPY_END:
            return PostcopyEnd()
        case FrameType.VERIFY_REPORT:
            npages, mismatched, n = _VERIFY_REPORT.unpack_from(metadata)
            if n > MAX_REPORTED_PAGES or len(metadata) != _VERIFY_REPORT.size + 8 * n:
                raise RemoteProtocolError(
                    f"VERIFY_REPORT lists {n} pages in {len(metadata)} metadata bytes"
                )
            if mismatched > npages or n > mismatched:
                raise RemoteProtocolError(
                    f"VERIFY_REPORT: {mismatched} mismatched of {npages} pages, {n} listed"
                )
            first = struct.unpack_from(f"<{n}Q", metadata, _VERIFY_REPORT.size)
            return VerifyReport(npages, mismatched, tuple(first))
    raise RemoteProtocolError(f"decode_event cannot decode frame type {ftype!r}")
