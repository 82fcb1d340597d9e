"""The destination programs its devices from the migrated state (no KVM, no processes): all at
once, each named in the refusal when its state is rejected."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from ptmig.devices.handle import DeviceCommandError
from ptmig.migration.destination import IncomingError, program_devices


class FakeHandle:
    def __init__(self, on_set: Any = None) -> None:
        self.states: list[dict[str, Any]] = []
        self.on_set = on_set

    def set_state(self, state: dict[str, Any]) -> None:
        if self.on_set is not None:
            self.on_set()
        self.states.append(state)


def machine(*handles: FakeHandle) -> tuple[Any, list[Any]]:
    devices = [SimpleNamespace(id=f"d{i}", handle=h) for i, h in enumerate(handles)]
    snaps = [
        SimpleNamespace(source="device", state=SimpleNamespace(to_json=lambda i=i: {"n": i}))
        for i in range(len(handles))
    ]
    return SimpleNamespace(devices=devices), snaps


def test_every_device_is_programmed_while_the_others_are() -> None:
    """Each set_state waits (boundedly) until every device's has begun: programmed one after
    the other, the first would wait alone and the barrier would break."""
    barrier = threading.Barrier(3, timeout=30.0)
    handles = [FakeHandle(barrier.wait) for _ in range(3)]
    m, snaps = machine(*handles)
    program_devices(m, snaps)
    assert [h.states for h in handles] == [[{"n": 0}], [{"n": 1}], [{"n": 2}]]


def test_a_rejected_state_refuses_the_migration_naming_the_device() -> None:
    def refuse() -> None:
        raise DeviceCommandError("queue 0 state disagrees with its registers")

    ok, bad = FakeHandle(), FakeHandle(refuse)
    m, snaps = machine(ok, bad)
    with pytest.raises(IncomingError, match="device d1 rejected the migrated state: Device"):
        program_devices(m, snaps)
    assert ok.states == [{"n": 0}]


def test_an_unexpected_failure_of_a_helper_thread_reaches_the_caller() -> None:
    def crash() -> None:
        raise RuntimeError("the control socket broke")

    m, snaps = machine(FakeHandle(), FakeHandle(crash))
    with pytest.raises(RuntimeError, match="the control socket broke"):
        program_devices(m, snaps)


def test_no_devices_is_nothing_to_do() -> None:
    m, snaps = machine()
    program_devices(m, snaps)
