"""The guest state that crosses the wire at the switchover: typed snapshots, packed and unpacked
in one place.

- vCPUs: each `VcpuState` (`ptmig.vcpu_state`: versioned, checksummed) in a list of
  length-prefixed blobs (`pack_vcpus` / `unpack_vcpus`).
- Devices: one `DeviceSnapshot` per device, in the VM's device order, inside a versioned JSON
  document (`pack_devices` / `unpack_devices`). A snapshot holds the device's register file and
  queue positions (`DeviceState`, the device control protocol's own typed form, whose queues are
  `QueueState`s), where they came from (`device`: the device's own report after it quiesced;
  `shadow`: the shadow engine's interception log) and, for a shadowed device, the requests each
  queue had forwarded but not completed (`InflightRequest`), which the destination's device
  executes again.

Everything unpacked here comes from the peer and is untrusted: `from_wire` checks the version and
every field's type and range, and any fault is a `StateWireError` (a `ValueError`) naming the
device and the field, never a `TypeError` or `KeyError`. What a device itself must refuse (a
register file its model cannot take) is still checked by the device when it is programmed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .devices.control import DeviceState, expect_int, expect_object
from .errors import PtmigError
from .migration.events import RemoteProtocolError
from .migration.frames import load_json
from .vcpu_state import MAX_STATE_BYTES, VcpuState, VcpuStateError

WIRE_VERSION = 1
MAX_DEVICE_STATE_BYTES = 4 << 20
SOURCES = ("device", "shadow")
KINDS = ("net", "disk")
_ENTRY_KEYS = {"id", "kind", "source", "state", "inflight"}
_LENGTH = struct.Struct("<I")


class StateWireError(PtmigError, ValueError):
    """The peer's vCPU or device state cannot be used: what is wrong, with which value."""


@dataclass(frozen=True)
class InflightRequest:
    """A request forwarded to the source's device and not completed: the avail-ring position the
    guest made it available at and the head of its descriptor chain."""

    avail_index: int
    head: int

    def to_wire(self) -> dict[str, Any]:
        return {"avail_index": self.avail_index, "head": self.head}

    @classmethod
    def from_wire(cls, raw: Any, where: str, queue_size: int) -> InflightRequest:
        obj = _object(raw, where, {"avail_index", "head"})
        return cls(
            _int(obj, "avail_index", 0xFFFF, where), _int(obj, "head", queue_size - 1, where)
        )


@dataclass(frozen=True)
class DeviceSnapshot:
    """One device's state as the destination needs it to continue where the source stopped."""

    id: str
    kind: str  # the config slot's kind: "net" or "disk"
    source: str  # "device" (its own report) or "shadow" (the interception log)
    state: DeviceState
    inflight: Mapping[int, tuple[InflightRequest, ...]] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "source": self.source,
            "state": self.state.to_json(),
        }
        if self.source == "shadow":
            out["inflight"] = {
                str(q): [r.to_wire() for r in reqs] for q, reqs in sorted(self.inflight.items())
            }
        return out

    @classmethod
    def from_wire(cls, raw: Any) -> DeviceSnapshot:
        ident = raw.get("id") if isinstance(raw, dict) else None
        if not isinstance(ident, str) or not ident:
            raise StateWireError(f"device entry needs an 'id' (a non-empty string): {raw!r:.80}")
        where = f"device {ident}"
        obj = _object(raw, where, _ENTRY_KEYS)
        kind, source = obj.get("kind"), obj.get("source")
        if kind not in KINDS:
            raise StateWireError(f"{where}: 'kind' must be one of {KINDS}, got {kind!r:.60}")
        if source not in SOURCES:
            raise StateWireError(f"{where}: 'source' must be one of {SOURCES}, got {source!r:.60}")
        try:
            state = DeviceState.from_json(obj.get("state"))
        except ValueError as e:
            raise StateWireError(f"{where}: {e}") from None
        if source == "device" and "inflight" in obj:
            raise StateWireError(f"{where}: a device's own report carries no in-flight list")
        inflight = _inflight(obj.get("inflight", {}), state, where) if source == "shadow" else {}
        return cls(ident, kind, source, state, inflight)


def _inflight(raw: Any, state: DeviceState, where: str) -> dict[int, tuple[InflightRequest, ...]]:
    if not isinstance(raw, dict):
        raise StateWireError(f"{where}: 'inflight' must be an object, got {type(raw).__name__}")
    out: dict[int, tuple[InflightRequest, ...]] = {}
    for key, reqs in raw.items():
        index = int(key) if key.isascii() and key.isdigit() and len(key) <= 3 else -1
        queue = state.queues.get(index)
        if queue is None:
            raise StateWireError(f"{where}: in-flight list for queue {key!r:.20}, not in its state")
        what = f"{where} queue {index}"
        if not isinstance(reqs, list) or len(reqs) > queue.size:
            raise StateWireError(
                f"{what}: in-flight list must be a list of at most {queue.size} requests"
            )
        out[index] = tuple(
            InflightRequest.from_wire(r, f"{what} in-flight request {n}", queue.size)
            for n, r in enumerate(reqs)
        )
    return out


def _object(raw: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    try:
        return expect_object(raw, where, allowed)
    except ValueError as e:
        raise StateWireError(str(e)) from None


def _int(obj: dict[str, Any], key: str, maximum: int, where: str) -> int:
    try:
        return expect_int(obj, key, maximum)
    except ValueError as e:
        raise StateWireError(f"{where}: {e}") from None


# --- the device-state document --------------------------------------------------------------


def pack_devices(snapshots: list[DeviceSnapshot]) -> bytes:
    doc = {"version": WIRE_VERSION, "devices": [s.to_wire() for s in snapshots]}
    return json.dumps(doc, separators=(",", ":")).encode()


def unpack_devices(blob: bytes, expected_ids: list[str]) -> list[DeviceSnapshot]:
    """The peer's device states, one per device of this VM in the same order."""
    if len(blob) > MAX_DEVICE_STATE_BYTES:
        raise StateWireError(f"device state of {len(blob)} bytes exceeds {MAX_DEVICE_STATE_BYTES}")
    doc = _json(blob)
    if not isinstance(doc, dict) or set(doc) != {"version", "devices"}:
        raise StateWireError("device state must be an object of 'version' and 'devices'")
    if doc["version"] != WIRE_VERSION or isinstance(doc["version"], bool):
        raise StateWireError(f"device state version {doc['version']!r:.30} is not {WIRE_VERSION}")
    entries = doc["devices"]
    if not isinstance(entries, list):
        raise StateWireError(f"device state 'devices' must be a list, got {type(entries).__name__}")
    ids = [e.get("id") if isinstance(e, dict) else None for e in entries]
    if ids != expected_ids:
        raise StateWireError(
            f"device state is for devices {ids!r:.200}, this VM has {expected_ids}"
        )
    return [DeviceSnapshot.from_wire(e) for e in entries]


def _json(blob: bytes) -> Any:
    try:
        return load_json(bytes(blob), "device state")
    except RemoteProtocolError as e:
        raise StateWireError(str(e)) from None


# --- the vCPU list ----------------------------------------------------------------------------


def pack_vcpus(states: list[VcpuState]) -> bytes:
    return b"".join(_LENGTH.pack(len(b)) + b for b in (s.to_bytes() for s in states))


def unpack_vcpus(blob: bytes, nvcpus: int) -> list[VcpuState]:
    """The peer's vCPU states, one for each of this VM's `nvcpus`, in index order."""
    states: list[VcpuState] = []
    off = 0
    while off < len(blob):
        if off + _LENGTH.size > len(blob):
            raise StateWireError("truncated vCPU state list")
        (n,) = _LENGTH.unpack_from(blob, off)
        off += _LENGTH.size
        if n > MAX_STATE_BYTES or off + n > len(blob):
            raise StateWireError(f"vCPU state of {n} bytes does not fit the list")
        try:
            states.append(VcpuState.from_bytes(bytes(blob[off : off + n])))
        except VcpuStateError as e:
            raise StateWireError(f"vCPU state {len(states)}: {e}") from None
        off += n
    if len(states) != nvcpus:
        raise StateWireError(f"{len(states)} vCPU states for a VM with {nvcpus} vCPUs")
    if sorted(s.index for s in states) != list(range(nvcpus)):
        raise StateWireError(f"vCPU states for indices {[s.index for s in states]}")
    return sorted(states, key=lambda s: s.index)
