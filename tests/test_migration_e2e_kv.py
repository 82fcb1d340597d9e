"""The kv guest (virtio-net + virtio-blk device processes) migrated under load, on real KVM.

The load client (`ptmig load`) runs across the migration and after it, then reads back every
value the guest acknowledged. With a DMA-tracking strategy that sees device writes
(`device-log`, `all-dirty`) nothing is lost and the page-by-page verification is clean; with
`none` the devices' writes after their pages were sent never reach the destination, and the test
asserts that this loss is detected. The migration is rate-limited so that round 0 lasts about a
second or more while the devices keep DMAing into guest RAM (RX buffers, used rings).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from vmmrig import Load, kv_migration

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

# Round 0 crawls at 64 KiB/s for 1.5 s (the kv guest has ~30-1000 non-zero pages), then the
# limit is lifted; a downtime limit that large lets it switch over right after round 0.
ROUND0_BANDWIDTH = 64 << 10
ROUND0_DOWNTIME_LIMIT_MS = 10_000


def _migrate_under_load(
    tmp_path: Path, tracking: str, max_bandwidth: int, downtime_limit: int = 50
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (the source's final query-migrate, the load client's result); after a completed
    migration, the result of a second, short load against the destination is under "after"."""
    with kv_migration(tmp_path) as (cfg, src, dst, port):
        load = Load(cfg, 5.0, tmp_path / "load.json").start()
        time.sleep(1.0)
        src.migrate(
            port,
            tracking=tracking,
            verify=True,
            max_bandwidth=max_bandwidth,
            downtime_limit=downtime_limit,
        )
        if max_bandwidth:
            # Round 0 crawls while the devices keep writing guest RAM; then let it finish.
            time.sleep(1.5)
            src.cmd("migrate-set-parameters", {"max-bandwidth": 0})
        info = src.wait_migration()
        result = load.result()
        if info["status"] == "completed":
            assert src.status() == "postmigrate"
            assert dst.status() == "running"
        if info["status"] == "completed" and tracking != "none":
            # a client that starts once the switchover is over can only reach the
            # destination (whose devices `none` may have left broken: not asked there)
            result["after"] = (
                Load(cfg, 1.0, tmp_path / "after.json", rate=200, window=None).start().result()
            )
        return info, result


def _served_after_migration(result: dict[str, Any]) -> bool:
    """A load started after the switchover (on the destination) lost nothing."""
    after = result["after"]
    return after["acked"] > 0 and after["lost"] == after["wrong"] == after["unverified"] == 0


def test_device_log_loses_nothing(tmp_path: Path) -> None:
    info, result = _migrate_under_load(
        tmp_path, "device-log", ROUND0_BANDWIDTH, ROUND0_DOWNTIME_LIMIT_MS
    )
    assert info["status"] == "completed", info
    assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
    assert result["acked"] > 0 and result["unverified"] == 0, result["output"]
    assert result["lost"] == 0 and result["wrong"] == 0, result["output"]
    assert _served_after_migration(result), result["series"]


def test_all_dirty_loses_nothing_and_reports_its_downtime(tmp_path: Path) -> None:
    info, result = _migrate_under_load(tmp_path, "all-dirty", 0)
    assert info["status"] == "completed", info
    assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
    assert result["lost"] == 0 and result["wrong"] == 0, result["output"]
    assert result["acked"] > 0 and result["unverified"] == 0, result["output"]
    assert isinstance(info["downtime"], int) and 0 < info["downtime"] <= info["total-time"]
    # total-time ends at the switchover, as QEMU's: pause + downtime (ms, each rounded down),
    # whatever the verification after it took (it reports its own time)
    stop = next(r for r in info["x-rounds"] if r.get("stop-and-copy"))
    assert abs(info["total-time"] - (stop["stop-at-ms"] + info["downtime"])) <= 2, info
    assert info["x-verify"]["time-ms"] > 0
    # Every writable-mapped page is resent in every round: the dirty set never shrinks.
    rounds = info["x-rounds"]
    assert len(rounds) >= 3 and rounds[1]["pages"] == rounds[0]["pages"], rounds


def test_none_loses_device_writes_and_the_loss_is_detected(tmp_path: Path) -> None:
    info, result = _migrate_under_load(tmp_path, "none", ROUND0_BANDWIDTH, ROUND0_DOWNTIME_LIMIT_MS)
    assert info["status"] == "completed", info
    detected = info["x-verify"]["mismatched"] + result["lost"] + result["wrong"]
    assert detected > 0, (info["x-verify"], result["output"])
