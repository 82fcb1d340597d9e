"""The control-channel wire format, without processes: framing, caps, hostile input, state."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptmig.devices.control import (
    HEADER,
    MAGIC,
    MAX_JSON_BYTES,
    MAX_PAYLOAD_BYTES,
    ControlProtocolError,
    DeviceState,
    Event,
    FrameDecoder,
    Message,
    Request,
    Response,
    encode,
)
from ptmig.devices.virtio.mmio import MmioState, QueueRegisters
from ptmig.devices.virtio.queue import QueueState

MESSAGES: list[Message] = [
    Request(1, "mmio_read", {"offset": 0x70, "size": 4}),
    Response(1, True, {"value": 15}),
    Response(2, False, error="quiesce: nope"),
    Response(3, True, {"pages": 1}, payload=b"\x01\x80" * 100),
    Event("fault", {"device": "blk0", "queue": 0, "reason": "x", "iova": None}),
]


def decode_all(data: bytes, chunk: int) -> list[Message]:
    dec = FrameDecoder()
    out: list[Message] = []
    for i in range(0, len(data), chunk):
        dec.feed(data[i : i + chunk])
        while (m := dec.next_message()) is not None:
            out.append(m)
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_round_trip_in_any_fragmentation(chunk: int) -> None:
    wire = b"".join(encode(m) for m in MESSAGES)
    assert decode_all(wire, chunk) == MESSAGES


def test_bad_magic_is_rejected() -> None:
    with pytest.raises(ControlProtocolError, match="magic"):
        FrameDecoder().feed(b"XXXX" + bytes(8))


def test_oversized_lengths_rejected_before_buffering() -> None:
    dec = FrameDecoder()
    with pytest.raises(ControlProtocolError, match="JSON length"):
        dec.feed(HEADER.pack(MAGIC, MAX_JSON_BYTES + 1, 0))
    with pytest.raises(ControlProtocolError, match="payload length"):
        FrameDecoder().feed(HEADER.pack(MAGIC, 2, MAX_PAYLOAD_BYTES + 1))


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"{}",
        b'{"t":"req","id":1,"cmd":"format_disk","args":{}}',
        b'{"t":"req","id":true,"cmd":"reset","args":{}}',
        b'{"t":"event","name":"x","data":{}}',
        b"\xff\xfe",
        b'{"t":"resp","id":1,"ok":1,"result":{}}',
    ],
)
def test_malformed_bodies_are_protocol_errors(body: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(HEADER.pack(MAGIC, len(body), 0) + body)
    with pytest.raises(ControlProtocolError):
        dec.next_message()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_only_raises_protocol_errors(data: bytes) -> None:
    dec = FrameDecoder()
    try:
        dec.feed(MAGIC + data)
        while dec.next_message() is not None:
            pass
    except ControlProtocolError:
        pass


def sample_state() -> DeviceState:
    mmio = MmioState(
        2,
        1 << 32,
        driver_features=1 << 32,
        status=15,
        queues=[QueueRegisters(64, 0x1000, 0x2000, 0x3000, True)],
    )
    return DeviceState("blk", mmio, {0: QueueState(64, 0x1000, 0x2000, 0x3000, 5, 4)})


def test_device_state_round_trip() -> None:
    import json

    state = sample_state()
    assert DeviceState.from_json(json.loads(json.dumps(state.to_json()))) == state


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(version=2),
        lambda s: s.update(kind="gpu"),
        lambda s: s["queues"][0].update(size=3),
        lambda s: s["queues"][0].update(next_avail=70000),
        lambda s: s["queues"][0].update(desc_addr=-16),
        lambda s: s["queues"][0].update(index=5),
        lambda s: s["queues"][0].update(ready="yes"),
        lambda s: s["mmio"].update(status="15"),
        lambda s: s["mmio"].update(extra=1),
        lambda s: s["mmio"]["queues"][0].update(num=2**40),
        lambda s: s["queues"].append(dict(s["queues"][0])),
    ],
)
def test_device_state_rejects_invalid(mutate: object) -> None:
    raw = sample_state().to_json()
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(ValueError):
        DeviceState.from_json(raw)


def test_header_layout() -> None:
    assert HEADER.size == 12
    body = b'{"t":"event","name":"log","data":{}}'
    frame = encode(Event("log", {}, payload=b"\x01\x02"))
    assert frame == struct.pack("<4sII", MAGIC, len(body), 2) + body + b"\x01\x02"
