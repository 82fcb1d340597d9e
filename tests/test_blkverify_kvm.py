"""The blkverify guest under live migration (KVM): a guest that reads its disk all the time and
checks every block against what it wrote, and the status bytes of error completions, migrated
back to back. With `shadow` every check holds and `x-verify` finds no mismatched page; with
`none` the device writes that migration loses are found. The same guest on a vhost-user disk
(qemu-storage-daemon, a device nobody here wrote) keeps every check with `shadow` and with the
daemon's own dirty log (`device-log`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from vmmrig import Vmm, free_port, needs_storage_daemon

pytestmark = pytest.mark.kvm

# Back-to-back migrations per run; PTMIG_BLKVERIFY_MIGRATIONS=10 for the long run.
MIGRATIONS = int(os.environ.get("PTMIG_BLKVERIFY_MIGRATIONS", "3"))
CHECKED, MISMATCH, ERR_CHECKED, ERR_WRONG, REWRITTEN, FAILED = range(6)


def blkverify_config(tmp: Path, backend: str = "builtin") -> Path:
    """The blkverify guest on ptmig's own disk, or (`vhost-user`) on a qemu-storage-daemon."""
    path = tmp / "blkverify.toml"
    disk = (
        'serial = "ptmig-disk0"\n'
        if backend == "builtin"
        else 'backend = "vhost-user"\nspawn = "qemu-storage-daemon"\n'
    )
    path.write_text(
        '[vm]\nmemory = "64M"\nvcpus = 1\n\n'
        '[workload]\nname = "blkverify"\nargs = { blocks = 1024, bufs = 256 }\n\n'
        f'[[disk]]\nid = "disk0"\npath = "{tmp / "blkverify.img"}"\nsize = "16M"\n{disk}'
    )
    return path


def counters(vmm: Vmm) -> tuple[int, list[int]]:
    """(rounds, w[0..5]) of the guest's vCPU 0."""
    s = vmm.cmd("x-query-guest-stats")["vcpus"][0]
    return int(s["iterations"]), [int(x) for x in s["workload"][:6]]


def wait_rounds(vmm: Vmm, rounds: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        done, w = counters(vmm)
        if done >= rounds:
            return w
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{vmm.name}: the guest did {done} rounds, not {rounds}, in "
                f"{timeout} s; counters {w}"
            )
        time.sleep(0.1)


def migrate_back_to_back(
    tmp: Path, tracking: str, n: int, backend: str = "builtin"
) -> tuple[list[dict[str, Any]], list[int], Vmm]:
    """Boot, then migrate n times in a row (each destination becomes the next source).
    Returns the migrations' query-migrate, the guest's counters at the end, and the VMM that
    runs it."""
    cfg = blkverify_config(tmp, backend)
    vmms = [Vmm(tmp, "bv0", cfg)]
    results = []
    try:
        vmms[0].wait_running()
        wait_rounds(vmms[0], 2)
        for i in range(n):
            port = free_port(kind=1)
            dst = Vmm(tmp, f"bv{i + 1}", cfg, incoming_port=port)
            vmms.append(dst)
            dst.wait_incoming()
            # 32 MiB/s: about two seconds of pre-copy, the guest's requests shadowed meanwhile
            vmms[-2].migrate(
                port, tracking=tracking, verify=True, downtime_limit=100, max_bandwidth=32 << 20
            )
            st = vmms[-2].wait_migration(timeout=120)
            results.append(st)
            assert st["status"] == "completed", st.get("error-desc")
            vmms[-2].stop()
            rounds, _ = counters(dst)
            if tracking != "none":  # the guest goes on checking on the destination
                wait_rounds(dst, rounds + 1)
            else:
                time.sleep(0.5)
        return results, counters(vmms[-1])[1], vmms.pop()
    finally:
        for v in vmms:
            v.kill()


def test_shadow_keeps_every_block_and_status_byte_the_guest_checks(tmp_path: Path) -> None:
    results, w, vmm = migrate_back_to_back(tmp_path, "shadow", MIGRATIONS)
    try:
        mismatched = [r["x-verify"]["mismatched"] for r in results]
        assert mismatched == [0] * MIGRATIONS, mismatched
        assert sum(r["x-shadow"]["completions-synced"] for r in results) > 0
        assert w[CHECKED] > 0 and w[ERR_CHECKED] > 0, w
        assert w[MISMATCH] == 0 and w[ERR_WRONG] == 0 and w[FAILED] == 0, (w, vmm.output())
    finally:
        vmm.kill()


def test_without_tracking_the_lost_device_writes_are_found(tmp_path: Path) -> None:
    # The negative control: the same run with `none` loses device writes (x-verify finds the
    # stale pages, or the guest's own checks fail), so the test above can fail.
    results, w, vmm = migrate_back_to_back(tmp_path, "none", max(2, MIGRATIONS))
    try:
        mismatched = sum(r["x-verify"]["mismatched"] for r in results)
        assert mismatched > 0 or w[MISMATCH] + w[ERR_WRONG] + w[FAILED] > 0, (results, w)
    finally:
        vmm.kill()


@needs_storage_daemon
@pytest.mark.parametrize("tracking", ["shadow", "device-log"])
def test_a_vhost_user_disk_keeps_every_block_and_status_byte_the_guest_checks(
    tmp_path: Path, tracking: str
) -> None:
    """The daemon reads into guest RAM all the time: shadowed (its memory table holds only the
    shadow pool) or with its own dirty log harvested, nothing the guest checks is lost."""
    results, w, vmm = migrate_back_to_back(tmp_path, tracking, MIGRATIONS, "vhost-user")
    try:
        mismatched = [r["x-verify"]["mismatched"] for r in results]
        assert mismatched == [0] * MIGRATIONS, mismatched
        if tracking == "shadow":
            assert all(r["x-shadow"]["completions-synced"] > 0 for r in results), results
        assert w[CHECKED] > 0 and w[ERR_CHECKED] > 0, w
        assert w[MISMATCH] == 0 and w[ERR_WRONG] == 0 and w[FAILED] == 0, (w, vmm.output())
    finally:
        vmm.kill()
