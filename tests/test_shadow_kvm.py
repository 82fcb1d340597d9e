"""Shadow mode on real KVM with real device processes and the kv guest under load."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from vmmrig import Load, Vmm, free_port, kv_config, migration_key, switch

from ptmig import bitmap
from ptmig.config import load_config
from ptmig.devices.handle import DeviceCommandError
from ptmig.devices.virtio import constants as c
from ptmig.layout import ABI_WORKLOAD_STATS_GPA, PAGE_SIZE
from ptmig.load import LoadOptions, run_load
from ptmig.machine import Machine
from ptmig.shadow.tracking import ShadowTracking, make_tracking
from ptmig.vm import Vm

pytestmark = pytest.mark.kvm


def _boot(tmp_path: Path) -> tuple[Machine, Path]:
    cfg_path = kv_config(tmp_path, memory="64M")
    m = Machine(load_config(cfg_path))
    m.boot()
    m.vm.start()
    # warm up: ARP resolved, log formatted, the guest serving
    run_load(LoadOptions(config=cfg_path, duration_s=0.5, rate=200, verify=False))
    return m, cfg_path


def _unacknowledged_load(cfg_path: Path) -> LoadOptions:
    """A short load whose PUTs the guest takes but cannot acknowledge (its disk waits for a
    reset): the client stops waiting for them after a second, not its 30 s default."""
    return LoadOptions(config=cfg_path, duration_s=0.5, rate=200, verify=False, drain_timeout_s=1.0)


def _changed_pages(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    rows_b = before.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    rows_a = after.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    return np.flatnonzero((rows_b != rows_a).any(axis=1))


def _kv_requests(vm: Vm) -> int:
    """Requests the kv guest has taken (struct kv_report.requests, guest/abi.h)."""
    return int.from_bytes(vm.memory.read(ABI_WORKLOAD_STATS_GPA + 6 * 8, 8), "little")


def _wait_for_requests(vm: Vm, n: int, timeout: float = 30.0) -> None:
    """Until the guest has taken n more requests (not a guess at how long that takes)."""
    start, deadline = _kv_requests(vm), time.monotonic() + timeout
    while _kv_requests(vm) < start + n:
        assert time.monotonic() < deadline, f"the guest took {_kv_requests(vm) - start} requests"
        time.sleep(0.02)


def _wait_for_served_requests(vmm: Vmm, n: int, timeout: float = 30.0) -> None:
    """Until the kv guest has taken n requests (vCPU 0's workload counter 0)."""
    deadline = time.monotonic() + timeout
    while (got := vmm.cmd("x-query-guest-stats")["vcpus"][0]["workload"][0]) < n:
        assert time.monotonic() < deadline, f"the guest took {got} requests, not {n}"
        time.sleep(0.05)


def _escaped_pages(
    tmp_path: Path, tracking: str | None
) -> tuple[np.ndarray, np.ndarray, Machine, ShadowTracking]:
    """Pages that changed in guest RAM while the kv guest served load, minus the harvested
    dirty set, with `tracking` ("shadow", "intercept") or direct DMA (None). Returns
    (changed, escaped, machine, strategy)."""
    m, cfg_path = _boot(tmp_path)
    vm = m.vm
    shadow = tracking is not None
    strategy = make_tracking(tracking or "shadow")
    if shadow:
        strategy.begin(m)
    stop = threading.Event()
    results = []

    def load() -> None:
        results.append(run_load(LoadOptions(config=cfg_path, duration_s=3, rate=300, verify=False)))
        stop.set()

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.5)
    vm.pause()
    # The shadow data plane may still sync a completion now: it marks the page in the dirty
    # set it harvests next, so a page written during the copy is never counted as escaped.
    vm.dirty.harvest()
    before = vm.memory.array.copy()
    vm.resume()
    _wait_for_requests(vm, 50)  # the devices write guest RAM for them
    vm.pause()
    if shadow:
        strategy.stop_and_copy(m)
    else:
        for d in m.devices:
            d.handle.quiesce()
    dirty = bitmap.to_bool(vm.dirty.harvest(), vm.memory.npages)
    after = vm.memory.array.copy()
    changed = _changed_pages(before, after)
    escaped = changed[~dirty[changed]]
    if shadow:
        strategy.abort(m)
    else:
        for d in m.devices:
            d.handle.resume()
    vm.resume()
    t.join()
    return changed, escaped, m, strategy


def test_every_page_changed_during_shadowing_is_in_the_dirty_set(tmp_path: Path) -> None:
    changed, escaped, m, _ = _escaped_pages(tmp_path, "shadow")
    try:
        assert changed.size > 0
        assert escaped.size == 0, f"pages changed behind the dirty log: {escaped[:16]}"
    finally:
        m.close()


def test_every_page_changed_during_intercept_is_in_the_dirty_set(tmp_path: Path) -> None:
    """The same RAM snapshot check with only the rings shadowed: the NIC and the disk write
    guest RAM themselves, and the completions' marks cover every page they changed. (The kv
    firmware keeps small buffers -- the disk's status bytes among them -- on its ring pages:
    those are copied, as under shadow.)"""
    changed, escaped, m, strategy = _escaped_pages(tmp_path, "intercept")
    try:
        assert changed.size > 0
        assert escaped.size == 0, f"pages changed behind the dirty log: {escaped[:16]}"
        stats = strategy.stats()
        assert stats is not None and stats["dma-tracking"] == "intercept"
        assert stats["pages-marked"] > 0, stats  # some device wrote guest RAM directly
        for name, dev in stats["devices"].items():  # the NIC and the disk, both under load
            # each completion's writable bytes were marked (in guest RAM) or copied (on a
            # ring page: the kv firmware keeps its disk status bytes there)
            assert dev["completions-synced"] > 0, (name, dev)
            assert dev["pages-marked"] + dev["bytes-to-guest"] > 0, (name, dev)
            assert dev["enter-ms"] > 0, (name, dev)  # the quiesced window at entry, measured
    finally:
        m.close()


def test_without_shadowing_device_writes_escape_the_dirty_set(tmp_path: Path) -> None:
    # The negative control: the same check fails in direct mode, so the test above can fail.
    changed, escaped, m, _ = _escaped_pages(tmp_path, None)
    try:
        assert escaped.size > 0, "device DMA should be invisible to KVM's log in direct mode"
    finally:
        m.close()


def test_twenty_migrations_back_and_forth_lose_nothing(tmp_path: Path) -> None:
    results = _back_to_back(tmp_path, "shadow", 20)
    forwarded = sum(r["x-shadow"]["requests-forwarded"] for r in results)
    synced = sum(r["x-shadow"]["completions-synced"] for r in results)
    assert forwarded > 0 and synced > 0, "the load never went through the shadow rings"
    for r in results:  # every device's quiesced window at entry is reported
        assert all(d["enter-ms"] > 0 for d in r["x-shadow"]["devices"].values()), r["x-shadow"]


def test_ten_intercept_migrations_under_load_lose_nothing(tmp_path: Path) -> None:
    results = _back_to_back(tmp_path, "intercept", 10)
    assert all(r["x-shadow"]["dma-tracking"] == "intercept" for r in results)
    assert sum(r["x-shadow"]["requests-forwarded"] for r in results) > 0
    assert sum(r["x-shadow"]["pages-marked"] for r in results) > 0


def _back_to_back(tmp_path: Path, tracking: str, n: int) -> list[dict]:
    """`n` migrations of the kv guest under `ptmig load`, each to a fresh VMM, with
    `tracking` and x-verify: every one completes with 0 mismatched pages, the load loses and
    gets wrong nothing, and a fresh boot replays every acknowledged PUT. Returns each
    migration's final query-migrate."""
    cfg = kv_config(tmp_path, memory="64M")
    vmms = [Vmm(tmp_path, "vmm0", cfg)]
    load_json = tmp_path / "load.json"
    try:
        vmms[0].wait_running()
        load = Load(cfg, 60, load_json, rate=300, window=None).start()
        _wait_for_served_requests(vmms[0], 100)
        results = []
        for i in range(n):
            port = free_port(kind=1)
            dst = Vmm(tmp_path, f"vmm{i + 1}", cfg, incoming_port=port)
            vmms.append(dst)
            dst.wait_incoming()  # its listener is up (its QMP socket comes up before it)
            vmms[-2].migrate(port, tracking=tracking, verify=True, downtime_limit=100)
            st = vmms[-2].wait_migration(timeout=120)
            results.append(st)
            assert st["status"] == "completed", st.get("error-desc")
            assert st["x-verify"]["mismatched"] == 0, st["x-verify"]
            assert dst.status() == "running"
            vmms[-2].stop()
        summary = load.result(timeout=120)
        assert summary["acked"] > 0, summary["output"]
        assert summary["lost"] == 0 and summary["wrong"] == 0, summary["output"]
        # The guest's own write-ahead log, replayed by a fresh boot on the shared image,
        # holds at least every acknowledged PUT.
        vmms[-1].stop()
        fresh = Vmm(tmp_path, "replay", cfg)
        vmms.append(fresh)
        fresh.wait_ready()
        deadline = time.monotonic() + 30  # a fresh boot, on a host that may be busy
        console = ""
        while "replayed" not in console and time.monotonic() < deadline:
            time.sleep(0.2)
            path = tmp_path / "replay.console"
            console = path.read_text() if path.exists() else ""
        assert "replayed" in console, console
        replayed = int(console.split("replayed")[1].split()[0])
        assert replayed >= summary["acked"], console
        return results
    finally:
        for v in vmms:
            v.kill()


@pytest.mark.parametrize("tracking", ["shadow", "intercept"])
def test_cancel_while_shadowing_returns_to_direct_mode(tmp_path: Path, tracking: str) -> None:
    cfg = kv_config(tmp_path, memory="64M")
    src = Vmm(tmp_path, "src", cfg)
    port = free_port(kind=1)
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
    dst.wait_incoming()  # its listener is up
    load_json = tmp_path / "load.json"
    try:
        src.wait_running()
        load = Load(cfg, 8, load_json, rate=300, window=None).start()
        # the guest serves before shadowing begins: its driver has configured the NIC, so the
        # shadow is built over live rings rather than over queues still being set up
        _wait_for_served_requests(src, 20)
        # 4 KiB/s, one page a second: round 0 (tens of non-zero pages at the least) lasts far
        # longer than it takes the load's requests to go through the shadow rings; cancel as
        # soon as they do
        src.cmd("migrate-set-parameters", {"x-dma-tracking": tracking, "max-bandwidth": 4096})
        src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + 30
        while True:
            info = src.cmd("query-migrate")
            assert info["status"] in ("setup", "active"), info
            shadow = info.get("x-shadow") or {}  # absent until the strategy has begun
            if info["status"] == "active" and shadow.get("requests-forwarded", 0) > 0:
                break
            assert time.monotonic() < deadline, f"no request went through the shadow: {info}"
            time.sleep(0.05)
        src.cmd("migrate_cancel")
        st = src.wait_migration(timeout=120)
        assert st["status"] == "cancelled"
        assert st["x-shadow"]["requests-forwarded"] > 0, "nothing went through the shadow rings"
        assert src.status() == "running"
        summary = load.result(timeout=60)
        assert summary["lost"] == 0 and summary["wrong"] == 0, summary["output"]
        # the workload keeps running in direct mode: a second load after the cancel succeeds
        again = Load(cfg, 2, tmp_path / "again.json", rate=200, window=None).start()
        after = again.result(timeout=60)
        assert after["acked"] > 0 and after["lost"] == 0, after["output"]
    finally:
        src.kill()
        dst.kill()


@pytest.mark.parametrize("tracking", ["shadow", "intercept"])
def test_a_device_that_cannot_enter_returns_every_device_to_direct_dma(
    tmp_path: Path, tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk (entered second) refuses to report its state: the NIC, already shadowed and
    served by the data plane, goes back to direct DMA with the disk, the entry fails (the
    migration would), and the guest serves a checked load on both devices afterwards."""
    m, cfg_path = _boot(tmp_path)
    vm = m.vm
    try:
        net, disk = m.devices
        assert (net.id, disk.id) == ("net0", "disk0")
        real_get_state = disk.handle.get_state
        calls = []

        def refuse_once() -> object:
            calls.append(1)
            if len(calls) == 1:
                raise DeviceCommandError("disk0: get_state refused (injected)")
            return real_get_state()

        monkeypatch.setattr(disk.handle, "get_state", refuse_once)
        strategy = make_tracking(tracking)
        with pytest.raises(DeviceCommandError, match="injected"):
            strategy.begin(m)
        engine = strategy.engine
        assert engine is not None and not engine.active
        assert len(calls) == 2  # the failed entry, then the disk's own leave
        for dev in (net, disk):
            assert dev.mmio_hook is None, f"{dev.id} still trapped"
            assert dev.iommu.lookup(0x1000 // PAGE_SIZE) is not None, f"{dev.id}: identity map"
            assert dev.handle.alive
        assert vm.state.value == "running"
        engine.close()
        r = run_load(LoadOptions(config=cfg_path, duration_s=1.0, rate=300))
        assert r.acked > 0 and r.lost == 0 and r.wrong == 0
    finally:
        m.close()


@pytest.mark.parametrize("step", ["get_state", "set_state"])
@pytest.mark.parametrize("tracking", ["shadow", "intercept"])
def test_a_device_that_cannot_leave_is_marked_for_reset_not_left_quiesced(
    tmp_path: Path, tracking: str, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leaving shadow mode (a cancelled or failed migration) fails for the disk, before its
    identity map is back (`get_state`) or after it (`set_state`): the NIC (left first) is back
    to direct DMA and carries requests; the disk is no longer trapped, is on the identity map,
    and is DEVICE_NEEDS_RESET with the reason (its driver's reset is the way back) instead of
    quiesced for ever; the leave raises the device's error, and the guest keeps running."""
    m, cfg_path = _boot(tmp_path)
    vm = m.vm
    try:
        net, disk = m.devices
        assert (net.id, disk.id) == ("net0", "disk0")
        strategy = make_tracking(tracking)
        strategy.begin(m)
        run_load(LoadOptions(config=cfg_path, duration_s=0.5, rate=200))  # through the shadow

        def refuse(*args: object) -> None:
            raise DeviceCommandError(f"disk0: {step} refused (injected)")

        monkeypatch.setattr(disk.handle, step, refuse)
        with pytest.raises(DeviceCommandError, match="injected"):
            strategy.abort(m)
        assert strategy.engine is None  # closed: nothing of shadow mode is left running
        for dev in (net, disk):
            assert dev.mmio_hook is None, f"{dev.id} still trapped"
            assert dev.direct_doorbells, f"{dev.id}: doorbells not back on the device"
            assert dev.iommu.lookup(0x1000 // PAGE_SIZE) is not None, f"{dev.id}: identity map"
            assert dev.handle.alive
        assert disk.handle.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
        assert "leaving shadow mode failed" in disk.handle.stats()["broken"]
        assert "injected" in disk.handle.stats()["broken"]
        assert not net.handle.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
        assert vm.state.value == "running"
        # the NIC carries requests in direct mode (the guest takes them; it cannot commit its
        # PUTs to a disk that waits for its reset, so they are not acknowledged)
        taken = _kv_requests(vm)
        run_load(_unacknowledged_load(cfg_path))
        assert _kv_requests(vm) > taken
    finally:
        m.close()


@pytest.mark.timeout(120)
def test_a_failed_migration_whose_devices_cannot_leave_shadow_mode_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end through a real migration: shadowed pre-copy to a destination VMM, which is
    killed; the source's recovery cannot bring the disk out of shadow mode (get_state refused).
    query-migrate says both what failed the migration and that restoring the devices failed
    (not only the log); the guest runs on the source alone, the disk waits for its driver's
    reset (DEVICE_NEEDS_RESET), the NIC carries requests in direct mode."""
    sw = free_port(socket.SOCK_DGRAM)
    cfg_path = kv_config(tmp_path, sw, memory="64M")
    with switch(sw):
        m = Machine(load_config(cfg_path), psk_file=migration_key(tmp_path))
        port = free_port()
        dst = Vmm(tmp_path, "dst", cfg_path, incoming_port=port)
        try:
            m.boot()
            m.vm.start()
            run_load(LoadOptions(config=cfg_path, duration_s=0.5, rate=200, verify=False))
            dst.wait_incoming()
            net, disk = m.devices
            m.migration.params.x_dma_tracking = "shadow"
            m.migration.params.max_bandwidth = 64 << 10  # the kv pages (~1 MiB): ~16 s
            mig = m.migration.migrate(f"tcp:127.0.0.1:{port}")
            deadline = time.monotonic() + 30
            while not (mig.strategy.engine is not None and mig.info.ram.transferred > 64 << 10):
                assert not mig.info.status.finished, mig.info.to_qmp()
                assert time.monotonic() < deadline, mig.info.to_qmp()
                time.sleep(0.02)
            assert disk.mmio_hook is not None  # shadowed: its doorbells are the VMM's

            def refuse(*args: object) -> None:
                raise DeviceCommandError("disk0: get_state refused (injected)")

            monkeypatch.setattr(disk.handle, "get_state", refuse)
            dst.kill()
            mig.join(30)
            info = m.migration._qmp_query()
            assert info["status"] == "failed", info
            error = info["error-desc"]
            assert "; restoring the devices: " in error and "injected" in error, error
            assert error.index("; restoring the devices") > 0  # the migration's own error first
            assert m.vm.state.value == "running"
            for dev in (net, disk):
                assert dev.mmio_hook is None and dev.direct_doorbells, dev.id
            assert disk.handle.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
            assert "injected" in disk.handle.stats()["broken"]
            # the NIC carries requests in direct mode (the guest takes them; its PUTs wait for
            # the disk's reset, so they are not acknowledged)
            taken = _kv_requests(m.vm)
            run_load(_unacknowledged_load(cfg_path))
            assert _kv_requests(m.vm) > taken
        finally:
            dst.kill()
            m.close()


@pytest.mark.parametrize("tracking", ["shadow", "intercept"])
def test_hostile_ring_rewrite_while_shadowed_is_contained(tmp_path: Path, tracking: str) -> None:
    m, cfg_path = _boot(tmp_path)
    vm = m.vm
    try:
        strategy = make_tracking(tracking)
        strategy.begin(m)
        assert strategy.engine is not None
        net = strategy.engine.devices["net0"]
        rx = net.queues[0].state
        # A hostile guest store: the RX avail index leaps far ahead of what it may post.
        vm.memory.mmap[rx.avail_addr + 2 : rx.avail_addr + 4] = (0x7FFF).to_bytes(2, "little")
        net.dev.mmio_write(0x50, 4, 0)  # and it rings the doorbell (as an MMIO exit would)
        deadline = time.monotonic() + 5
        while net.broken is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert net.broken is not None and "avail" in net.broken
        with pytest.raises(Exception, match="net0"):
            strategy.round_dirty(m)  # the migration engine's next check fails the migration
        strategy.abort(m)  # ... and the source leaves shadow mode, still running
        assert vm.state.value == "running"
        assert m.devices[0].iommu.lookup(0x1000 // PAGE_SIZE) is not None, "identity map back"
        # the other device was never affected
        blk = m.devices[1]
        assert blk.handle.alive and m.devices[0].handle.alive
    finally:
        m.close()


@pytest.mark.parametrize(
    "device,writes",
    [
        ("disk0", [(c.REG_STATUS, 0)]),  # reset
        ("net0", [(c.REG_DRIVER_FEATURES_SEL, 1), (c.REG_DRIVER_FEATURES, 1)]),  # renegotiation
        ("net0", [(c.REG_QUEUE_SEL, 0), (c.REG_QUEUE_READY, 0)]),  # re-creating a queue
    ],
)
def test_reconfiguring_a_shadowed_device_returns_to_direct_dma_first(
    tmp_path: Path, device: str, writes: list[tuple[int, int]]
) -> None:
    """The driver resets, renegotiates or re-creates queues while its device is shadowed:
    every device goes back to direct DMA before the write reaches the device (no device
    buffer, no pool page, no trapped doorbell left), the write then takes effect, and the
    migration fails."""
    m, _ = _boot(tmp_path)
    vm = m.vm
    try:
        strategy = ShadowTracking()
        strategy.begin(m)
        engine = strategy.engine
        assert engine is not None and m.shadow_pool.in_use > 0
        sd = engine.devices[device]
        reg, value = writes[0]
        sd.dev.mmio_write(reg, 4, value)  # as the vCPU's MMIO exit would
        assert not engine.active
        assert sd.broken is not None and "reconfigured" in sd.broken
        assert m.shadow_pool.in_use == 0, "pool pages still taken after leaving shadow mode"
        for dev in m.devices:
            assert dev.mmio_hook is None and dev.direct_doorbells
            assert dev.iommu.lookup(0x1000 // PAGE_SIZE) is not None, "identity map back"
            assert engine.devices[dev.id].map.pages == set()
        for reg, value in writes[1:]:
            sd.dev.mmio_write(reg, 4, value)  # the driver goes on, directly
        if reg == c.REG_STATUS:
            assert sd.dev.handle.mmio_read(c.REG_STATUS, 4) == 0, "the reset reached the device"
        with pytest.raises(Exception, match="reconfigured"):
            strategy.round_dirty(m)  # the migration engine's next check fails the migration
        with pytest.raises(Exception, match="reconfigured"):
            strategy.stop_and_copy(m)  # ... and there is no switchover
        strategy.abort(m)
        assert vm.state.value == "running"
        assert all(dev.handle.alive for dev in m.devices)
    finally:
        m.close()


@pytest.mark.parametrize("tracking", ["shadow", "intercept"])
def test_shadow_mode_without_a_migration_over_qmp(tmp_path: Path, tracking: str) -> None:
    """x-shadow-start / x-shadow-stop: the data path alone, under load, loses nothing; a
    migration is refused while it is on.

    Shadowing starts once the guest serves and before the load, so the load's requests go
    through the shadow however slowly the client starts on a loaded host (a load started
    first could end before the shadow began, and then nothing was synced); the stop waits
    for a synced completion. The load runs on after the stop (direct DMA again) and reads
    every value back. Starting to shadow under load is what every migration with `shadow`
    or `intercept` does."""
    cfg = kv_config(tmp_path, memory="64M")
    vmm = Vmm(tmp_path, "vmm", cfg)
    try:
        vmm.wait_running()
        # the guest serves (its drivers have configured the devices): shadowing may start
        first = Load(cfg, 0.5, tmp_path / "first.json", rate=500, window=None).start()
        assert first.wait(timeout=60) == 0, first.output
        vmm.cmd("x-shadow-start", {"x-dma-tracking": tracking})
        with pytest.raises(Exception, match="already shadowed"):
            vmm.cmd("x-shadow-start")
        with pytest.raises(Exception, match="x-shadow-stop first"):
            vmm.cmd("migrate", {"uri": f"tcp:127.0.0.1:{free_port(socket.SOCK_STREAM)}"})
        out = tmp_path / "load.json"
        load = Load(cfg, 4, out, rate=2000, window=None).start()
        deadline = time.monotonic() + 60  # until a request's completion is synced back
        while (live := vmm.cmd("x-query-shadow"))["completions-synced"] == 0:
            assert live["active"] and time.monotonic() < deadline, live
            time.sleep(0.05)
        assert live["active"] and live["dma-tracking"] == tracking
        stats = vmm.cmd("x-shadow-stop")
        assert stats["completions-synced"] > 0
        assert (stats["pages-marked"] > 0) == (tracking == "intercept"), stats
        assert vmm.cmd("x-query-shadow") == {"active": False}
        with pytest.raises(Exception, match="not shadowed"):
            vmm.cmd("x-shadow-stop")
        assert load.wait(timeout=60) == 0, load.output
        res = load.result()
        assert res["acked"] > 0 and res["lost"] == 0 and res["wrong"] == 0
    finally:
        vmm.stop()


def test_an_idle_guest_answers_after_shadow_mode_ends(tmp_path: Path) -> None:
    """Leaving shadow mode while the guest is halted: its vCPU must wait on the device's
    interrupt again (a new client's ARP request gets an answer), every time."""
    cfg = kv_config(tmp_path, memory="64M")
    vmm = Vmm(tmp_path, "vmm", cfg)
    vmm.wait_ready()
    try:
        for n in range(4):
            out = tmp_path / f"load{n}.json"
            load = Load(cfg, 0.5, out, rate=500, window=None).start()
            assert load.wait(timeout=60) == 0, load.output
            if n == 3:
                break
            vmm.cmd("x-shadow-start")
            shadowed = Load(cfg, 0.5, tmp_path / f"shadowed{n}.json", rate=500, window=None).start()
            assert shadowed.wait(timeout=60) == 0
            time.sleep(0.3)  # the guest goes idle (halts) before the stop
            vmm.cmd("x-shadow-stop")
            time.sleep(0.3)
    finally:
        vmm.stop()
