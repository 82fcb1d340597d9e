"""QEMU's migration names and replies through a real QMP client (`qemu.qmp`) on real VMMs:
`query-migrate` is `{}` before any migration, and parallel streams are QEMU's `multifd`
capability and `multifd-channels` parameter, which decide how many streams a migration uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmmrig import Vmm, dirty_config, free_port

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]


def _set_multifd(vmm: Vmm, on: bool, channels: int | None = None) -> None:
    vmm.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": on}]})
    if channels is not None:
        vmm.cmd("migrate-set-parameters", {"multifd-channels": channels})


def test_names_and_replies_before_any_migration(tmp_path: Path) -> None:
    vmm = Vmm(tmp_path, "vm", dirty_config(tmp_path, memory="64M", vcpus=1, ws="4M"))
    try:
        vmm.wait_running()
        assert vmm.cmd("query-migrate") == {}
        caps = {c["capability"]: c["state"] for c in vmm.cmd("query-migrate-capabilities")}
        assert caps == {
            "auto-converge": False,
            "multifd": True,
            "x-verify": False,
            "postcopy-ram": False,
        }
        assert vmm.cmd("query-migrate-parameters")["multifd-channels"] == 2
        vmm.cmd("migrate-set-parameters", {"multifd-channels": 5})
        assert vmm.cmd("query-migrate-parameters")["multifd-channels"] == 5
        with pytest.raises(RuntimeError, match=r"multifd-channels must be in \[1, 16\], got 0"):
            vmm.cmd("migrate-set-parameters", {"multifd-channels": 0})
        with pytest.raises(RuntimeError, match="x-data-channels"):
            vmm.cmd("migrate-set-parameters", {"x-data-channels": 2})
        assert vmm.cmd("query-migrate-parameters")["multifd-channels"] == 5
        assert vmm.status() == "running"
    finally:
        vmm.stop()


def test_multifd_decides_the_streams_of_each_migration(tmp_path: Path) -> None:
    """multifd off: every round on the migration stream; on with 3 channels: 3 streams (the
    guest moves twice, so both settings carry real pages)."""
    cfg = dirty_config(tmp_path, memory="64M", vcpus=1, ws="4M")
    first, second = free_port(), free_port()
    a = Vmm(tmp_path, "a", cfg)
    b = Vmm(tmp_path, "b", cfg, incoming_port=first)
    c = Vmm(tmp_path, "c", cfg, incoming_port=second)
    try:
        b.wait_incoming()
        c.wait_incoming()
        a.wait_running()
        _set_multifd(a, False)
        a.migrate(first)
        info = a.wait_migration()
        assert info["status"] == "completed", info
        rounds = [r for r in info["x-rounds"] if "channels" in r]
        assert rounds and all(r["channels"] == 0 for r in rounds), info["x-rounds"]

        b.wait_running()
        _set_multifd(b, True, channels=3)
        b.migrate(second)
        info = b.wait_migration()
        assert info["status"] == "completed", info
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
        rounds = [r for r in info["x-rounds"] if "channels" in r]
        assert rounds and all(r["channels"] == 3 for r in rounds), info["x-rounds"]
        c.wait_running()
    finally:
        for v in (a, b, c):
            v.stop()
