"""A vhost-user disk (qemu-storage-daemon as the backend, ptmig as the frontend) on real KVM.

The kv guest keeps its write-ahead log on the vhost-user disk; its unmodified virtio-blk driver
talks to the register file in the VMM, its QueueNotify reaches the daemon through KVM_IOEVENTFD
and the daemon's call eventfd wakes it. Shown: the passthrough property on third-party code (pages
the daemon wrote are absent from KVM's dirty log and present in the daemon's own vhost log);
`device-log`, `shadow` and `intercept` lose nothing over back-to-back migrations under load,
verified page by page; `none` loses the daemon's writes and the loss is detected; a killed
daemon is reported over QMP while the VMM stays up. While shadowed the daemon maps the shadow
pool and not guest RAM (read from its /proc maps), while intercepted both; a cancel gives it
guest RAM alone back; a daemon killed while shadowed fails the migration and the source runs on.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_vhost_user_backend import _bring_up, _GuestView, _request
from vmmrig import Load, Vmm, free_port, kv_config, needs_storage_daemon, switch

from ptmig import bitmap
from ptmig.config import load_config
from ptmig.devices.vhost_user.frontend import VhostUserBlk
from ptmig.devices.virtio.testing import DriverQueue
from ptmig.machine import Machine

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.timeout(180),
    needs_storage_daemon,
]

PAGE = 4096
MARKER = b"VHOST-USER-PASSTHROUGH-MARKER-"
ROUND0_BANDWIDTH = 64 << 10
ROUND0_DOWNTIME_LIMIT_MS = 10_000


def test_daemon_writes_escape_kvms_dirty_log_but_not_the_vhost_log(tmp_path: Path) -> None:
    """A VM built (guest RAM in a KVM memory slot with dirty logging) whose vCPUs do not run:
    the test is the driver, and every byte it writes goes through the VMM's marking path. The
    daemon's READ lands in a buffer nobody else wrote: the harvested dirty set (KVM's log and
    the VMM's bitmap) lacks its pages, the daemon's own log has them."""
    cfg = tmp_path / "vm.toml"
    cfg.write_text(
        '[vm]\nmemory = "128M"\nvcpus = 1\n\n[workload]\nname = "hello"\n\n'
        f'[[disk]]\nid = "disk0"\npath = "{tmp_path / "d.img"}"\nsize = "16M"\n'
        'backend = "vhost-user"\nspawn = "qemu-storage-daemon"\n'
    )
    machine = Machine(load_config(cfg))
    try:
        machine.boot()
        disk = next(d for d in machine.devices if d.kind == "disk")
        assert isinstance(disk.handle, VhostUserBlk)
        mem = machine.vm.memory
        q = DriverQueue(
            _GuestView(mem), 64, base=96 << 20, data_start=100 << 20, data_end=128 << 20
        )
        _bring_up(disk.handle, q)
        payload = (MARKER * (8192 // len(MARKER) + 1))[:8192]
        assert _request(disk.handle, q, 1, 0, payload)[0] == 0
        mem.write(100 << 20, bytes(4 << 20))  # the driver's copy of the marker is gone
        machine.vm.dirty.harvest()
        disk.handle.dma_log_start()
        status, data = _request(disk.handle, q, 0, 0, len(payload))
        assert status == 0 and data == payload
        dirty = bitmap.to_bool(machine.vm.dirty.harvest(), mem.npages)
        vhost_log = np.unpackbits(disk.handle.dma_log_harvest(), bitorder="little")
        pages = {m // PAGE for m in _find_all(mem.read(100 << 20, 28 << 20), MARKER)}
        pages = {p + ((100 << 20) // PAGE) for p in pages}
        assert pages, "the daemon's data never reached guest RAM"
        for page in sorted(pages):
            assert vhost_log[page], f"page {page:#x} (daemon-written) not in the vhost log"
            assert not dirty[page], f"page {page:#x} (daemon-written) is in the dirty set"
        assert vhost_log[q.used_addr // PAGE] and disk.handle.alive
    finally:
        machine.close()


def _migrate_chain(
    tmp_path: Path, tracking: str, hops: int, *, read_back: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """kv under load, migrated `hops` times back to back (src -> d1 -> d2 ...), each with its
    own daemon on the shared image; returns each migration's final query-migrate and the load
    client's result."""
    sw = free_port(socket.SOCK_DGRAM)
    cfg = kv_config(tmp_path, sw, vhost_user=True)
    infos: list[dict[str, Any]] = []
    with switch(sw):
        vmms = [Vmm(tmp_path, "src", cfg)]
        try:
            vmms[0].wait_running()
            load = Load(cfg, 4.0 + 3.0 * hops, tmp_path / "load.json").start()
            time.sleep(1.0)
            for hop in range(hops):
                port = free_port()
                dst = Vmm(tmp_path, f"dst{hop}", cfg, incoming_port=port)
                vmms.append(dst)
                dst.wait_incoming()
                src = vmms[-2]
                src.migrate(
                    port,
                    tracking=tracking,
                    verify=True,
                    max_bandwidth=ROUND0_BANDWIDTH,
                    downtime_limit=ROUND0_DOWNTIME_LIMIT_MS,
                )
                time.sleep(1.5)  # round 0 crawls while the daemon keeps writing guest RAM
                src.cmd("migrate-set-parameters", {"max-bandwidth": 0})
                info = src.wait_migration()
                infos.append(info)
                assert info["status"] == "completed", info
                assert dst.status() == "running"
                src.stop()
            if not read_back:  # a guest that lost its device's writes may never answer again
                assert load.proc is not None
                load.proc.kill()
                load.proc.wait()
                return infos, {}
            return infos, load.result()
        finally:
            for v in vmms:
                v.stop()


def test_device_log_loses_nothing_over_back_to_back_migrations(tmp_path: Path) -> None:
    infos, result = _migrate_chain(tmp_path, "device-log", 3)
    for info in infos:
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
    assert result["acked"] > 0 and result["unverified"] == 0, result["output"]
    assert result["lost"] == 0 and result["wrong"] == 0, result["output"]


def test_none_loses_the_daemons_writes_and_the_loss_is_detected(tmp_path: Path) -> None:
    infos, _ = _migrate_chain(tmp_path, "none", 1, read_back=False)
    assert infos[0]["x-verify"]["mismatched"] > 0, infos[0]["x-verify"]


@contextmanager
def _running_vmm(tmp_path: Path) -> Iterator[tuple[Vmm, int]]:
    """The kv guest running on a vhost-user disk: (its VMM, the daemon's pid)."""
    sw = free_port(socket.SOCK_DGRAM)
    cfg = kv_config(tmp_path, sw, vhost_user=True)
    with switch(sw):
        vmm = Vmm(tmp_path, "src", cfg)
        try:
            vmm.wait_running()
            pids = _daemon_pids(vmm.proc.pid)
            assert len(pids) == 1, pids
            yield vmm, pids[0]
        finally:
            vmm.stop()


def test_a_killed_daemon_is_reported_over_qmp_and_the_vmm_stays_up(tmp_path: Path) -> None:
    with _running_vmm(tmp_path) as (vmm, daemon):
        os.kill(daemon, signal.SIGKILL)
        event = vmm.qmp.pull_event(wait=10.0)
        while event is not None and event["event"] != "X_DEVICE_EVENT":
            event = vmm.qmp.pull_event(wait=10.0)
        assert event is not None, "no X_DEVICE_EVENT after the daemon was killed"
        assert event["data"]["device"] == "disk0" and event["data"]["event"] == "gone"
        assert "SIGKILL" in event["data"]["data"]["reason"]
        assert vmm.status() == "running"  # the VMM is up and answers
        assert vmm.proc.poll() is None


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, at = [], data.find(needle)
    while at >= 0:
        out.append(at)
        at = data.find(needle, at + PAGE - at % PAGE)  # one hit per page is enough
    return out


def _daemon_pids(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == parent and comm.startswith("qemu-storage"):
            out.append(int(entry))
    return out


def _memfds(pid: int) -> set[str]:
    """The names of the memfds process `pid` maps (guest RAM, the shadow pool)."""
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "/memfd:" in line:
                out.add(line.split("/memfd:", 1)[1].split(" (deleted)")[0].strip())
    return out


def _daemon_maps(vmm: Vmm) -> set[str]:
    pids = _daemon_pids(vmm.proc.pid)
    assert len(pids) == 1, pids
    return _memfds(pids[0])


def _wait_forwarded(vmm: Vmm, timeout: float = 60.0) -> dict[str, Any]:
    """query-migrate once the shadow data plane has forwarded a request of the guest's."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = vmm.cmd("query-migrate")
        if (info.get("x-shadow") or {}).get("requests-forwarded", 0) > 0:
            return info
        assert info["status"] in ("setup", "active"), info
        assert time.monotonic() < deadline, f"nothing forwarded after {timeout} s: {info}"
        time.sleep(0.02)


def test_shadow_loses_nothing_over_back_to_back_migrations(tmp_path: Path) -> None:
    """The daemon sees only the shadow pool while shadowed; the VMM's data plane forwards the
    guest's requests and copies completions back: three migrations under load, every page
    verified, every acknowledged PUT read back from the last destination."""
    infos, result = _migrate_chain(tmp_path, "shadow", 3)
    for info in infos:
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
        assert info["x-shadow"]["requests-forwarded"] > 0, info["x-shadow"]
    # completions copied back: counted over the chain, as intercept's marked pages are (on a
    # loaded host one hop once forwarded requests and synced no completion before its stop;
    # its requests were redone from the guest's rings on the destination, nothing lost)
    synced = [i["x-shadow"]["completions-synced"] for i in infos]
    assert sum(synced) > 0, [i["x-shadow"] for i in infos]
    assert result["acked"] > 0 and result["unverified"] == 0, result["output"]
    assert result["lost"] == 0 and result["wrong"] == 0, result["output"]


def test_intercept_loses_nothing_over_back_to_back_migrations(tmp_path: Path) -> None:
    """Intercept on the daemon: its rings in the pool, the data buffers left in guest RAM
    (the daemon writes them itself, behind KVM's dirty log), every completion's writable pages
    marked by the VMM: three migrations under load, every page verified, every acknowledged
    PUT read back from the last destination."""
    infos, result = _migrate_chain(tmp_path, "intercept", 3)
    for info in infos:
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
        assert info["x-shadow"]["dma-tracking"] == "intercept", info["x-shadow"]
        assert info["x-shadow"]["requests-forwarded"] > 0, info["x-shadow"]
    # the daemon wrote guest RAM directly and the VMM marked it (a hop whose shadowing fell in
    # a lull of the load may have seen no completion: counted over the chain)
    assert sum(i["x-shadow"]["pages-marked"] for i in infos) > 0, [i["x-shadow"] for i in infos]
    assert result["acked"] > 0 and result["unverified"] == 0, result["output"]
    assert result["lost"] == 0 and result["wrong"] == 0, result["output"]
    # the disk's status bytes share a page with its rings: written in the ring's device
    # buffer and copied back, never overwritten by a stale copy (a failed write is an error)
    assert result["errors"] == 0, result["output"]


@contextmanager
def _shadowed_source(
    tmp_path: Path, load_s: float, tracking: str = "shadow"
) -> Iterator[tuple[Vmm, Load, set[str]]]:
    """kv under load on a vhost-user disk, migrating with `tracking` (slowly, so it stays in
    pre-copy), once the data plane has forwarded a request of the guest's: (the source, the
    load, the memfds the daemon mapped before the migration)."""
    sw = free_port(socket.SOCK_DGRAM)
    cfg = kv_config(tmp_path, sw, vhost_user=True)
    with switch(sw):
        src = Vmm(tmp_path, "src", cfg)
        port = free_port()
        dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
        try:
            src.wait_running()
            dst.wait_incoming()
            before = _daemon_maps(src)
            load = Load(cfg, load_s, tmp_path / "load.json").start()
            src.migrate(port, tracking=tracking, verify=True, max_bandwidth=ROUND0_BANDWIDTH)
            _wait_forwarded(src)
            yield src, load, before
        finally:
            src.stop()
            dst.stop()


def test_shadow_cancelled_gives_the_daemon_guest_ram_back(tmp_path: Path) -> None:
    """While shadowed the daemon maps the shadow pool and not guest RAM; a cancel puts guest
    RAM back (the pool unmapped), the guest keeps running on direct DMA and loses nothing."""
    with _shadowed_source(tmp_path, 6.0) as (src, load, direct):
        assert any(n.endswith("-ram") for n in direct), direct
        shadowed = _daemon_maps(src)
        assert any(n.endswith("-shadow-pool") for n in shadowed), shadowed
        assert not any(n.endswith("-ram") for n in shadowed), shadowed
        _cancel_back_to_direct(src, load)


def _cancel_back_to_direct(src: Vmm, load: Any) -> None:
    """migrate_cancel: the source runs on, its daemon maps guest RAM and not the pool, and
    the load lost nothing."""
    src.cmd("migrate_cancel")
    assert src.wait_migration()["status"] == "cancelled"
    assert src.status() == "running"
    after = _daemon_maps(src)
    assert any(n.endswith("-ram") for n in after), after
    assert not any(n.endswith("-shadow-pool") for n in after), after
    result = load.result()
    assert result["acked"] > 0 and result["unverified"] == 0, result["output"]
    assert result["lost"] == 0 and result["wrong"] == 0, result["output"]


def test_intercept_keeps_guest_ram_mapped_and_a_cancel_drops_the_pool(tmp_path: Path) -> None:
    """While intercepting the daemon maps guest RAM (it writes the data buffers there) and the
    pool (the shadow rings) at once; a cancel moves its rings back and unmaps the pool, the
    guest keeps running on direct DMA and loses nothing."""
    with _shadowed_source(tmp_path, 6.0, "intercept") as (src, load, direct):
        assert not any(n.endswith("-shadow-pool") for n in direct), direct
        both = _daemon_maps(src)
        assert any(n.endswith("-shadow-pool") for n in both), both
        assert any(n.endswith("-ram") for n in both), both
        _cancel_back_to_direct(src, load)


def test_a_daemon_killed_while_shadowed_fails_the_migration_and_the_source_runs(
    tmp_path: Path,
) -> None:
    with _shadowed_source(tmp_path, 4.0) as (src, load, _):
        pids = _daemon_pids(src.proc.pid)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        info = src.wait_migration()
        assert info["status"] == "failed", info
        assert "disk0" in info["error-desc"] and "gone" in info["error-desc"], info
        assert src.status() == "running" and src.proc.poll() is None
        assert load.proc is not None
        load.proc.kill()  # the guest's disk is gone: its requests are never answered
        load.proc.wait()


def _gone(pid: int) -> bool:
    """Whether process `pid` has ended (exited, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_spawned_daemon_does_not_outlive_a_sigkilled_vmm(tmp_path: Path) -> None:
    """SIGKILL leaves the VMM no time to stop its daemon: the kernel's parent-death signal
    must end it (within a bounded time: it is delivered at the VMM's exit)."""
    with _running_vmm(tmp_path) as (vmm, daemon):
        vmm.proc.kill()
        vmm.proc.wait()
        deadline = time.monotonic() + 30.0
        while not _gone(daemon):
            assert time.monotonic() < deadline, f"daemon {daemon} outlived its VMM by 30 s"
            time.sleep(0.05)


def test_the_demo_on_a_vhost_user_disk_migrates_under_load_and_verifies(tmp_path: Path) -> None:
    """`ptmig demo --disk vhost-user`: the main job with the kv log on a spawned
    qemu-storage-daemon, shadowed, exits 0 with nothing lost and every page matching."""
    from test_demo_e2e import no_children_left, run_demo

    status, output, doc = run_demo(tmp_path, "--disk", "vhost-user")
    assert status == 0, output
    assert doc["demo"]["options"]["disk"] == "vhost-user"
    mig, load = doc["migration"], doc["load"]
    assert mig["status"] == "completed" and mig["x-dma-tracking"] == "shadow"
    assert mig["x-verify"]["mismatched"] == 0 and mig["x-shadow"]["requests-forwarded"] > 0
    assert load["acked"] > 0 and load["lost"] == 0 and load["wrong"] == 0
    assert no_children_left(tmp_path / "run")
