"""Live migration end to end on real KVM: two `ptmig run` processes, driven over QMP.

Each test migrates over loopback TCP and checks what a user would: the destination runs the
guest (its own counters keep increasing), the source ends in `postmigrate`, the page-by-page
verification finds no difference, and the QMP events/`query-migrate` say what happened.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from vmmrig import Vmm, dirty_config, free_port, iterations_increase

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]


def _pair(tmp_path: Path, config: Path, **kw: Any) -> tuple[Vmm, Vmm, int]:
    port = free_port()
    src = Vmm(tmp_path, "src", config)
    dst = Vmm(tmp_path, "dst", config, incoming_port=port, **kw)
    src.wait_running()  # its QMP socket comes up before the guest runs
    dst.wait_incoming()
    return src, dst, port


def test_dirty_guest_migrates_verified_and_keeps_running(tmp_path: Path) -> None:
    src, dst, port = _pair(tmp_path, dirty_config(tmp_path))
    try:
        assert dst.status() == "inmigrate"
        assert iterations_increase(src)
        before = src.iterations()
        src.migrate(port, tracking="none", verify=True)
        info = src.wait_migration()
        assert info["status"] == "completed", info
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
        assert info["x-verify"]["pages"] == 128 * 256
        assert info["ram"]["remaining"] == 0 and info["ram"]["transferred"] > 0
        assert info["ram"]["dirty-sync-count"] >= 2
        assert 0 <= info["downtime"] <= info["total-time"]
        parts = info["x-setup-ms"]  # where setup went, which setup-time sums up
        assert set(parts) == {"load", "connect", "handshake", "dma-tracking"}, parts
        assert all(v >= 0 for v in parts.values())
        assert sum(parts.values()) <= info["setup-time"] + 1
        # each side metered its own CPU to the switchover (the destination's came in its ack)
        assert set(info["x-cpu-s"]) == {"source", "destination"}, info.get("x-cpu-s")
        assert info["x-cpu-s"]["source"] > 0 and info["x-cpu-s"]["destination"] > 0
        assert src.status() == "postmigrate"
        assert dst.status() == "running"
        # The guest continues where it stopped: counters carry over and keep increasing.
        after = dst.iterations()
        assert all(a >= b for a, b in zip(after, before, strict=True))
        assert iterations_increase(dst)
        frozen = src.iterations()
        time.sleep(0.2)
        assert src.iterations() == frozen
    finally:
        src.stop()
        dst.stop()


def test_migration_events_seen_by_a_qmp_client(tmp_path: Path) -> None:
    """The source's events, in order: the migration's states, with the guest's STOP between
    `active` and `device` (the vCPUs stop before the device state is taken), and no RESUME."""
    src, dst, port = _pair(tmp_path, dirty_config(tmp_path, memory="64M", ws="8M"))

    async def drive() -> tuple[list[str], dict[str, Any]]:
        qmp = QMPClient("e2e")
        await qmp.connect(str(src.qmp_path))
        seen: list[str] = []
        finished = asyncio.Event()

        async def listen() -> None:
            async for ev in qmp.events:
                if ev["event"] == "MIGRATION":
                    data = ev["data"]
                    assert isinstance(data, dict), ev
                    seen.append(f"MIGRATION {data['status']}")
                    if data["status"] in ("completed", "failed", "cancelled"):
                        finished.set()
                elif ev["event"] in ("STOP", "RESUME"):
                    seen.append(ev["event"])

        task = asyncio.create_task(listen())
        await qmp.execute("migrate-set-parameters", {"x-dma-tracking": "none"})
        await qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await asyncio.wait_for(finished.wait(), timeout=90)  # the last event, not a guess
        info = await qmp.execute("query-migrate")
        assert isinstance(info, dict)
        task.cancel()
        await qmp.disconnect()
        return seen, info

    try:
        seen, info = asyncio.run(drive())
        assert info["status"] == "completed", info
        assert seen == [
            "MIGRATION setup",
            "MIGRATION active",
            "STOP",
            "MIGRATION device",
            "MIGRATION completed",
        ], seen
    finally:
        src.stop()
        dst.stop()
