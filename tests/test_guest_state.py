"""The switchover's state on the wire (`ptmig.guest_state`): typed snapshots that round-trip,
and hostile input that only ever ends in a `StateWireError` naming what is wrong."""

from __future__ import annotations

import copy
import ctypes
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptmig.devices.control import DeviceState
from ptmig.devices.virtio.mmio import MmioState, QueueRegisters
from ptmig.devices.virtio.queue import QueueState
from ptmig.guest_state import (
    DeviceSnapshot,
    InflightRequest,
    StateWireError,
    pack_devices,
    pack_vcpus,
    unpack_devices,
    unpack_vcpus,
)
from ptmig.kvm import structs as s
from ptmig.vcpu_state import XSAVE_SIZE, VcpuState

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def queue_states(draw: st.DrawFn) -> QueueState:
    size = 1 << draw(st.integers(0, 10))
    base = draw(st.integers(0, 2**40)) * 4096
    return QueueState(
        size,
        base,
        base + 16 * size,
        base + 4096 * 64,
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, 0xFFFF)),
    )


@st.composite
def snapshots(draw: st.DrawFn, ident: str = "d0") -> DeviceSnapshot:
    nqueues = draw(st.integers(1, 3))
    mmio = MmioState(
        device_id=draw(st.sampled_from([1, 2])),
        device_features=draw(st.integers(0, 2**64 - 1)),
        status=draw(st.integers(0, 255)),
        needs_reset_reason=draw(st.none() | st.text(max_size=8)),
        queues=[QueueRegisters(num=8, ready=True) for _ in range(nqueues)],
    )
    queues = {i: draw(queue_states()) for i in range(nqueues) if draw(st.booleans())}
    state = DeviceState(draw(st.sampled_from(["net", "blk"])), mmio, queues)
    source = draw(st.sampled_from(["device", "shadow"]))
    inflight: dict[int, tuple[InflightRequest, ...]] = {}
    if source == "shadow":
        for i, q in queues.items():
            n = draw(st.integers(0, min(q.size, 4)))
            inflight[i] = tuple(
                InflightRequest(draw(st.integers(0, 0xFFFF)), draw(st.integers(0, q.size - 1)))
                for _ in range(n)
            )
    kind = draw(st.sampled_from(["net", "disk"]))
    return DeviceSnapshot(ident, kind, source, state, inflight)


@given(st.lists(snapshots(), min_size=1, max_size=3))
@settings(max_examples=150, deadline=None)
def test_device_snapshots_round_trip(snaps: list[DeviceSnapshot]) -> None:
    snaps = [
        DeviceSnapshot(f"d{i}", s.kind, s.source, s.state, s.inflight) for i, s in enumerate(snaps)
    ]
    assert unpack_devices(pack_devices(snaps), [s.id for s in snaps]) == snaps


@given(json_values)
@settings(max_examples=400, deadline=None)
def test_an_arbitrary_entry_is_refused_with_the_snapshot_error(raw: Any) -> None:
    try:
        DeviceSnapshot.from_wire(raw)
    except StateWireError:
        pass


@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
@settings(max_examples=300, deadline=None)
def test_an_arbitrary_document_is_refused_with_the_snapshot_error(blob: bytes) -> None:
    with pytest.raises(StateWireError):
        unpack_devices(blob, ["d0"])


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON document (to a value, in objects and lists)."""
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _leaves(v, path + (i,))
    return out


@given(snapshots(), st.data())
@settings(max_examples=400, deadline=None)
def test_a_valid_entry_with_one_value_replaced_parses_or_is_refused_cleanly(
    snap: DeviceSnapshot, data: st.DataObject
) -> None:
    """The hostile peer's best shot: a well-formed entry with one field swapped for anything."""
    wire = snap.to_wire()
    path = data.draw(st.sampled_from(_leaves(wire)[1:]))
    mutated = copy.deepcopy(wire)
    target = mutated
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(json_values)
    try:
        parsed = DeviceSnapshot.from_wire(mutated)
    except StateWireError as e:
        assert "d0" in str(e) or "device entry" in str(e)
    else:
        assert DeviceSnapshot.from_wire(parsed.to_wire()) == parsed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w["state"]["queues"][0].update(size="8"), "'size' must be an integer"),
        (lambda w: w["inflight"].update({"0": [{"head": 0}]}), "'avail_index' must be an integer"),
        (lambda w: w["inflight"].update({"7": []}), "in-flight list for queue '7'"),
        (lambda w: w.update(source="elsewhere"), "'source' must be one of"),
        (lambda w: w["state"].update(version=2), "version 2 is not 1"),
        (lambda w: w.update(extra=1), "unknown keys ['extra']"),
    ],
)
def test_each_hostile_field_is_named(change: Any, message: str) -> None:
    q = QueueState(8, 0x1000, 0x2000, 0x3000, 3, 3)
    mmio = MmioState(device_id=2, device_features=1, queues=[QueueRegisters(num=8, ready=True)])
    wire = DeviceSnapshot(
        "d0", "disk", "shadow", DeviceState("blk", mmio, {0: q}), {0: (InflightRequest(3, 1),)}
    ).to_wire()
    change(wire)
    with pytest.raises(StateWireError, match="d0") as e:
        DeviceSnapshot.from_wire(wire)
    assert message in str(e.value)


def test_the_documents_device_ids_must_be_this_vms() -> None:
    mmio = MmioState(device_id=1, device_features=0)
    blob = pack_devices([DeviceSnapshot("net0", "net", "device", DeviceState("net", mmio, {}))])
    assert unpack_devices(blob, ["net0"])[0].id == "net0"
    with pytest.raises(StateWireError, match=r"for devices \['net0'\], this VM has \['disk0'\]"):
        unpack_devices(blob, ["disk0"])


def _vcpu(index: int) -> VcpuState:
    def zeros(t: Any) -> bytes:
        return bytes(ctypes.sizeof(t))

    return VcpuState(
        index,
        zeros(s.KvmRegs),
        zeros(s.KvmSregs),
        bytes(XSAVE_SIZE),
        zeros(s.KvmXcrs),
        zeros(s.KvmDebugregs),
        zeros(s.KvmVcpuEvents),
        zeros(s.KvmMpState),
        b"",
        ((0x10, 5),),
        1000,
        2_000_000,
    )


def test_vcpu_states_round_trip_in_index_order() -> None:
    states = [_vcpu(1), _vcpu(0)]
    assert unpack_vcpus(pack_vcpus(states), 2) == [states[1], states[0]]
    with pytest.raises(StateWireError, match="2 vCPU states for a VM with 3 vCPUs"):
        unpack_vcpus(pack_vcpus(states), 3)


@given(st.binary(max_size=256), st.integers(0, 4))
@settings(max_examples=300, deadline=None)
def test_arbitrary_vcpu_bytes_are_refused_with_the_snapshot_error(blob: bytes, n: int) -> None:
    good = pack_vcpus([_vcpu(0)])
    for candidate in (blob, good[: len(blob) % (len(good) + 1)] + blob, good + blob):
        try:
            unpack_vcpus(candidate, n)
        except StateWireError:
            pass
