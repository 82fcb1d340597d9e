"""Post-copy of the kv guest with its NIC and disk, on real KVM: two `ptmig run` processes.

The destination's devices are programmed quiesced, shadowed once pages can be fetched, and go
back to direct DMA when the last page is in; the data plane fetches the pages of a request
that are still on the source before it forwards it (`x-query-shadow`'s `pages-fetched`). A
link cut during post-copy pauses the guest on both sides with the devices still shadowed, and
`cont` on the paused destination is refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_blkverify_kvm import (
    CHECKED,
    ERR_WRONG,
    FAILED,
    MISMATCH,
    blkverify_config,
    counters,
    wait_rounds,
)
from test_postcopy_kvm import _start_postcopy_migration, _wait_status
from test_shadow_kvm import _boot
from vmmrig import Load, TcpProxy, Vmm, free_port, kv_config, needs_storage_daemon

from ptmig.devices.virtio import constants as c
from ptmig.layout import PAGE_SIZE
from ptmig.migration.uffd import FaultServer, initial_states
from ptmig.shadow.engine import ShadowEngine

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(240)]

MiB = 1 << 20


def _served(vmm: Vmm) -> int:
    return int(vmm.cmd("x-query-guest-stats")["vcpus"][0]["workload"][0])


def _wait_served(vmm: Vmm, n: int, timeout: float = 60.0) -> None:
    """Until the kv guest has taken n requests (vCPU 0's workload counter 0)."""
    deadline = time.monotonic() + timeout
    while (got := _served(vmm)) < n:
        assert time.monotonic() < deadline, f"the guest took {got} requests, not {n}"
        time.sleep(0.05)


def _postcopy(src: Vmm, port: int, *, bandwidth: int, after_rounds: int) -> None:
    """Post-copy with the devices shadowed on the source, x-verify, and a downtime limit no
    round fits: the switch is post-copy, however light the load."""
    _start_postcopy_migration(
        src,
        port,
        bandwidth=bandwidth,
        after_rounds=after_rounds,
        stalled_rounds=0 if after_rounds == 0 else 2,
        tracking="shadow",
        downtime_limit=1,
    )


@contextmanager
def _kv_under_load(
    tmp_path: Path,
    seconds: float,
    *,
    rate: float = 200,
    kill: bool = False,
    vhost_user: bool = False,
) -> Iterator[tuple[Vmm, Vmm, int, Load]]:
    """The kv guest (NIC and disk) running under `ptmig load` and a destination waiting for
    it: (source, destination, its port, the load). Both VMMs are stopped at the end of the
    block (`kill`: killed, for a guest split between them). `vhost_user`: the disk (the kv
    log) on a qemu-storage-daemon each VMM spawns."""
    cfg = kv_config(tmp_path, memory="64M", vhost_user=vhost_user)
    port = free_port()
    src = Vmm(tmp_path, "src", cfg)
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
    load: Load | None = None
    try:
        src.wait_running()
        dst.wait_incoming()
        load = Load(cfg, seconds, tmp_path / "load.json", rate=rate, window=None).start()
        _wait_served(src, 100)
        yield src, dst, port, load
    finally:
        if load is not None and load.proc is not None and load.proc.poll() is None:
            load.proc.kill()
        for vmm in (src, dst):
            if kill:
                vmm.kill()
            else:
                vmm.stop()


def _no_loss(load: Load) -> None:
    summary = load.result(timeout=120)
    assert summary["acked"] > 0, summary["output"]
    assert summary["lost"] == 0 and summary["wrong"] == 0, summary["output"]


def test_kv_with_nic_and_disk_under_load_completes_in_postcopy_losing_nothing(
    tmp_path: Path,
) -> None:
    with _kv_under_load(tmp_path, 25, rate=300) as (src, dst, port, load):
        # round 0 carries the 64 MiB; after round 1 the switch is post-copy, whatever the
        # load dirtied since (its NIC's RX buffers, rings, disk buffers) still on the source
        _postcopy(src, port, bandwidth=32 * MiB, after_rounds=1)
        info = _wait_status(src, ("completed",))
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
        assert info["x-postcopy"]["trigger"] == "rounds", info["x-postcopy"]
        assert info["x-postcopy"]["unsent-pages"] == 0
        assert dst.status() == "running"
        report = dst.cmd("x-query-postcopy")
        assert report["status"] == "completed", report
        assert report["missing"] == 0 and report["eexist"] == 0, report
        # the destination's devices were shadowed through post-copy, and are direct again
        shadow = dst.cmd("x-query-shadow")
        assert shadow["active"] is False, shadow
        last = shadow["x-postcopy"]
        assert last["requests-forwarded"] > 0 and last["completions-synced"] > 0, last
        assert all(d["broken"] is None for d in last["devices"].values()), last
        # the guest keeps serving on direct DMA after post-copy
        _wait_served(dst, _served(dst) + 50)
        _no_loss(load)


def test_device_requests_on_pages_not_yet_sent_are_fetched_before_forwarding(
    tmp_path: Path,
) -> None:
    """Switch at the end of round 0 against a slow link (256 KiB/s): the kv guest's RX buffers
    that took frames after round 0 passed them are pages the source still holds, the background
    push needs seconds to reach them, and the guest does not touch a posted RX buffer before
    the device fills it. So the data plane must fetch them itself before it forwards the RX
    requests it re-forwards at entry -- and the guest still gets every reply right.

    How many posted RX buffers are still on the source depends on where round 0's pass was
    when the last frames came (seen: 128, 5, and once 0 pages, when the pass reached the
    buffers just before the round's end). So the scenario is run up to three times, each run
    checked whole, until one has the device path fetch; a data plane that never fetches fails
    every run (and a forward on a missing page would show as a wrong reply or page)."""
    fetched: list[int] = []
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        run.mkdir()
        with _kv_under_load(run, 45) as (src, dst, port, load):
            _postcopy(src, port, bandwidth=256 << 10, after_rounds=0)
            _wait_status(src, ("active",))
            src.cmd("migrate-start-postcopy")
            info = _wait_status(src, ("completed",))
            assert info["x-postcopy"]["trigger"] == "requested", info["x-postcopy"]
            assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
            assert info["ram"]["postcopy-requests"] > 0
            last = dst.cmd("x-query-shadow")["x-postcopy"]
            assert last["requests-forwarded"] > 0, last
            assert last["fetch-waits"] <= last["pages-fetched"], last
            _no_loss(load)
        fetched.append(last["pages-fetched"])
        if last["pages-fetched"] > 0:  # the device path asked for its pages
            break
    assert fetched[-1] > 0, f"no run had a device request on a page not yet sent: {fetched}"


def test_a_link_cut_in_postcopy_with_devices_pauses_both_sides_and_cont_is_refused(
    tmp_path: Path,
) -> None:
    """The same documented outcome as without devices: the source keeps the pages it had not
    sent (postcopy-paused), the destination pauses its vCPUs and keeps its fault server, and
    its devices stay shadowed, broken by nothing. `cont` there is refused."""
    with _kv_under_load(tmp_path, 30, kill=True) as (src, dst, port, _load):
        link = TcpProxy(port)
        try:
            # 256 KiB/s: what the load dirtied while round 0 crawled takes seconds to push,
            # time to cut the link with the devices shadowed
            _postcopy(src, link.port, bandwidth=256 << 10, after_rounds=0)
            _wait_status(src, ("active",))
            src.cmd("migrate-start-postcopy")
            _wait_status(src, ("postcopy-active",))
            deadline = time.monotonic() + 60
            while not dst.cmd("x-query-shadow")["active"]:  # the devices are shadowed
                assert time.monotonic() < deadline, dst.cmd("x-query-postcopy")
                time.sleep(0.05)
        finally:
            link.cut()
        info = _wait_status(src, ("postcopy-paused",))
        assert "pages were not sent" in info["error-desc"], info
        assert info["x-postcopy"]["unsent-pages"] > 0
        assert src.status() == "finish-migrate"
        deadline = time.monotonic() + 60
        while (report := dst.cmd("x-query-postcopy"))["status"] != "postcopy-paused":
            assert report["status"] == "postcopy-active", report
            assert time.monotonic() < deadline, report
            time.sleep(0.05)
        assert report["missing"] > 0 and report["eexist"] == 0, report
        assert dst.status() == "paused"
        shadow = dst.cmd("x-query-shadow")
        assert shadow["active"] is True, shadow
        assert all(d["broken"] is None for d in shadow["devices"].values()), shadow
        with pytest.raises(RuntimeError, match="postcopy-paused.*still on the source"):
            dst.cmd("cont")
        assert dst.status() == "paused"
        assert src.proc.poll() is None and dst.proc.poll() is None


@needs_storage_daemon
def test_kv_with_its_log_on_a_vhost_user_disk_completes_in_postcopy_losing_nothing(
    tmp_path: Path,
) -> None:
    """The kv log on a vhost-user disk (qemu-storage-daemon) and the NIC, under load, switched
    to post-copy after round 1: the destination's backend starts its rings only once its
    memory table is the shadow pool's view, so it never reads a page still on the source (a
    zero page there would show as a wrong value or a mismatched page); at the end it is back
    on guest RAM and keeps serving."""
    with _kv_under_load(tmp_path, 25, rate=300, vhost_user=True) as (src, dst, port, load):
        _postcopy(src, port, bandwidth=32 * MiB, after_rounds=1)
        info = _wait_status(src, ("completed",))
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
        assert info["x-postcopy"]["unsent-pages"] == 0
        report = dst.cmd("x-query-postcopy")
        assert report["status"] == "completed", report
        assert report["missing"] == 0 and report["eexist"] == 0, report
        assert report["x-devices"]["state"] == "direct", report
        assert "error" not in report["x-devices"], report
        last = dst.cmd("x-query-shadow")["x-postcopy"]
        assert last["devices"]["disk0"]["broken"] is None, last
        assert last["requests-forwarded"] > 0 and last["completions-synced"] > 0, last
        # the backend serves on guest RAM again: the kv log keeps taking writes
        _wait_served(dst, _served(dst) + 50)
        _no_loss(load)


def test_a_device_reset_during_postcopy_is_held_shadowed_until_every_page_is_here(
    tmp_path: Path,
) -> None:
    """The driver resets its disk while the destination's devices are shadowed for post-copy:
    unlike on a source (back to direct DMA at once), the device stays behind its IOMMU domain
    of device buffers, quiesced, because direct DMA could touch a page still on the source;
    the reset reaches it, the NIC is unaffected, and both leave shadow mode at the end. (Guest
    RAM is under a fault server with every page present: the engine runs as on a post-copy
    destination.)"""
    m, _ = _boot(tmp_path)
    mem = m.vm.memory
    received = np.ones(mem.npages, dtype=bool)
    server = FaultServer(mem.host_address, initial_states(received, mem.allocated()))
    engine = ShadowEngine(m, fetch=server.native_fetch())
    try:
        engine.enter()
        disk = engine.devices["disk0"]
        disk.dev.mmio_write(c.REG_STATUS, 4, 0)  # as the vCPU's MMIO exit would
        assert engine.active
        assert disk.broken is not None and "during post-copy" in disk.broken, disk.broken
        assert disk.dev.mmio_hook is not None, "still trapped"
        assert disk.dev.iommu.lookup(0x1000 // PAGE_SIZE) is None, "guest RAM unreachable"
        assert disk.dev.handle.mmio_read(c.REG_STATUS, 4) == 0, "the reset reached the device"
        assert engine.devices["net0"].broken is None
        engine.leave()  # every page is here
        assert not engine.active
        for dev in m.devices:
            assert dev.mmio_hook is None and dev.handle.alive
            assert dev.iommu.lookup(0x1000 // PAGE_SIZE) is not None, "identity map back"
        assert m.vm.state.value == "running"
    finally:
        engine.close()
        server.close()
        m.close()


@needs_storage_daemon
def test_blkverify_on_a_vhost_user_disk_keeps_every_check_in_postcopy(tmp_path: Path) -> None:
    """The blkverify guest (reads its vhost-user disk all the time and checks every block and
    error status byte against what it wrote) switched to post-copy after round 1: the guest's
    checks all hold through the switchover and after, x-verify finds nothing, and the
    destination's backend allocated no page before it arrived (eexist 0)."""
    cfg = blkverify_config(tmp_path, "vhost-user")
    port = free_port()
    src = Vmm(tmp_path, "src", cfg)
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
    try:
        src.wait_running()
        dst.wait_incoming()
        rounds = wait_rounds(src, 2)
        assert rounds[CHECKED] > 0, rounds
        _postcopy(src, port, bandwidth=32 * MiB, after_rounds=1)
        info = _wait_status(src, ("completed",))
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
        assert "x-postcopy" in info, info
        report = dst.cmd("x-query-postcopy")
        assert report["status"] == "completed" and report["eexist"] == 0, report
        assert report["x-devices"]["state"] == "direct", report
        done, before = counters(dst)
        after = wait_rounds(dst, done + 2)  # whole rounds after post-copy, on guest RAM again
        assert after[CHECKED] > before[CHECKED], (before, after)
        for name, k in (("mismatched", MISMATCH), ("wrong status", ERR_WRONG), ("failed", FAILED)):
            assert after[k] == 0, f"{name}: {after}"
    finally:
        src.stop()
        dst.stop()
