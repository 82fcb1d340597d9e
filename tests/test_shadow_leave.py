"""The shadow engine's recovery when a device fails half-way out of shadow mode
(`ShadowEngine._leave_broken`), against a device that answers as told: which steps run after
which failure. The whole path on KVM is in test_shadow_kvm.py."""

from __future__ import annotations

from types import SimpleNamespace

from ptmig.devices.handle import DeviceCommandError, DeviceTimeoutError
from ptmig.shadow.engine import ShadowEngine


class Device:
    """A device handle that records the calls it gets and fails the ones it is told to."""

    def __init__(self, fail: dict[str, Exception] | None = None, alive: bool = True) -> None:
        self.fail = fail or {}
        self.alive = alive
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]

    def needs_reset(self, reason: str) -> None:
        self._call("needs_reset")
        assert "leaving shadow mode failed: set_state refused" in reason

    def resume(self) -> None:
        self._call("resume")


def _recover(handle: Device) -> None:
    engine = ShadowEngine.__new__(ShadowEngine)  # nothing of the engine's state is needed
    sd = SimpleNamespace(dev=SimpleNamespace(id="disk0", handle=handle))
    engine._leave_broken(sd, True, DeviceCommandError("set_state refused"))  # type: ignore[arg-type]


def test_a_device_marked_for_reset_is_resumed() -> None:
    handle = Device()
    _recover(handle)
    assert handle.calls == ["needs_reset", "resume"]


def test_a_refused_step_does_not_stop_the_next() -> None:
    handle = Device(fail={"needs_reset": DeviceCommandError("refused")})
    _recover(handle)
    assert handle.calls == ["needs_reset", "resume"]


def test_after_a_timeout_nothing_more_is_asked() -> None:
    handle = Device(fail={"needs_reset": DeviceTimeoutError("no answer in 5 s")})
    _recover(handle)
    assert handle.calls == ["needs_reset"]


def test_a_dead_device_is_asked_nothing() -> None:
    handle = Device(alive=False)
    _recover(handle)
    assert handle.calls == []
