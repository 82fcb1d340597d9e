"""A disk resized on the real qemu-storage-daemon (KVM): the config change reaches the guest.

The test runs the daemon itself, with a QMP monitor, and gives ptmig its vhost-user socket
(`socket = PATH`). `block_resize` on the daemon makes its vhost-user-blk export send
CONFIG_CHANGE_MSG on the backend channel; the frontend reads the config again (GET_CONFIG),
bumps the config generation and raises the config-change interrupt. The blkverify guest looks
for that interrupt at the start of every round, reads the capacity again and aims its "read
past the end" probe at the new end (a guest that kept the old capacity would see that probe
succeed and count a wrong completion). Shown directly, and again with the disk's DMA shadowed
(x-shadow-start: the daemon's memory table holds only the shadow pool, the backend channel is
untouched).

qemu-storage-daemon 7.2 (Debian 12's) resizes the image but tells nobody: its vhost-user-blk
export has no resize callback, sends no CONFIG_CHANGE_MSG (traced: nothing on the backend
channel after block_resize) and keeps answering GET_CONFIG with the capacity it started with,
so the guest goes on probing the old end and counts wrong completions. The test runs on a
daemon that notifies (a later QEMU) and says so where it cannot.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_blkverify_kvm import CHECKED, ERR_CHECKED, ERR_WRONG, FAILED, MISMATCH, wait_rounds
from vmmrig import Monitor, Vmm, needs_storage_daemon

from ptmig.devices.vhost_user.daemon import command_line, find_program

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.timeout(180),
    needs_storage_daemon,
]

#: the first QEMU whose vhost-user-blk export sends CONFIG_CHANGE_MSG on a resize
RESIZE_NOTIFIED_FROM = (8, 0)
SECTOR = 512
MIB = 1 << 20
CAPACITY, CONFIG_CHANGES = 6, 7  # blkverify's w[6], w[7]


def daemon_version() -> tuple[int, int]:
    program = find_program()
    assert program is not None
    text = subprocess.run([program, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)\.(\d+)", text)
    assert found is not None, f"no version in {text!r}"
    return int(found[1]), int(found[2])


@contextmanager
def storage_daemon(tmp: Path, image: Path) -> Iterator[tuple[Path, Monitor]]:
    """qemu-storage-daemon exporting `image` over vhost-user, with a QMP monitor:
    (its vhost-user socket, its monitor)."""
    sock, qmp = tmp / "qsd-vhost.sock", tmp / "qsd-qmp.sock"
    program = find_program()
    assert program is not None
    argv = command_line(program, image, sock, readonly=False) + [
        "--chardev",
        f"socket,id=mon0,path={qmp},server=on,wait=off",
        "--monitor",
        "chardev=mon0",
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    monitor = Monitor(qmp, "qemu-storage-daemon")
    try:
        monitor.connect(proc, timeout=30.0)  # the monitor is up once the export is
        assert sock.exists(), f"the daemon listens on no {sock}"
        yield sock, monitor
    finally:
        if monitor.connected:
            monitor.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def resize_config(tmp: Path, image: Path, sock: Path, size_mib: int) -> Path:
    path = tmp / "resize.toml"
    path.write_text(
        '[vm]\nmemory = "64M"\nvcpus = 1\n\n'
        '[workload]\nname = "blkverify"\nargs = { blocks = 1024, bufs = 64 }\n\n'
        f'[[disk]]\nid = "disk0"\npath = "{image}"\nsize = "{size_mib}M"\n'
        f'backend = "vhost-user"\nsocket = "{sock}"\n'
    )
    return path


def workload(vmm: Vmm) -> tuple[int, list[int]]:
    s = vmm.cmd("x-query-guest-stats")["vcpus"][0]
    return int(s["iterations"]), [int(x) for x in s["workload"][:8]]


def wait_capacity(vmm: Vmm, sectors: int, changes: int, timeout: float = 60.0) -> list[int]:
    """The guest's counters once it has read `sectors` as its capacity after `changes`
    config changes, and finished a whole round more (so the end probe aimed at it)."""
    deadline = time.monotonic() + timeout
    while True:
        rounds, w = workload(vmm)
        if w[CAPACITY] == sectors and w[CONFIG_CHANGES] == changes:
            wait_rounds(vmm, rounds + 2, timeout)
            return workload(vmm)[1]
        assert time.monotonic() < deadline, (
            f"the guest reads capacity {w[CAPACITY]} after {w[CONFIG_CHANGES]} config changes, "
            f"not {sectors} after {changes}, {timeout} s on; console:\n{vmm.output()}"
        )
        time.sleep(0.05)


def assert_clean(w: list[int], vmm: Vmm) -> None:
    assert w[CHECKED] > 0 and w[ERR_CHECKED] > 0, w
    assert w[MISMATCH] == 0 and w[ERR_WRONG] == 0 and w[FAILED] == 0, (w, vmm.output())


def test_block_resize_on_the_daemon_reaches_the_guest_directly_and_while_shadowed(
    tmp_path: Path,
) -> None:
    version = daemon_version()
    if version < RESIZE_NOTIFIED_FROM:
        pytest.skip(
            f"qemu-storage-daemon {version[0]}.{version[1]} does not notify a resize "
            "(no CONFIG_CHANGE_MSG after block_resize; see the module docstring)"
        )
    image = tmp_path / "resize.img"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    with storage_daemon(tmp_path, image) as (sock, qsd):
        vmm = Vmm(tmp_path, "bv", resize_config(tmp_path, image, sock, 16))
        try:
            vmm.wait_running()
            w = wait_capacity(vmm, 16 * MIB // SECTOR, 0)
            assert_clean(w, vmm)

            qsd.cmd("block_resize", {"node-name": "disk0", "size": 32 * MIB})
            w = wait_capacity(vmm, 32 * MIB // SECTOR, 1)
            assert_clean(w, vmm)

            vmm.cmd("x-shadow-start")
            forwarded = vmm.cmd("x-query-shadow")["requests-forwarded"]
            qsd.cmd("block_resize", {"node-name": "disk0", "size": 48 * MIB})
            w = wait_capacity(vmm, 48 * MIB // SECTOR, 2)
            shadow = vmm.cmd("x-shadow-stop")
            assert shadow["requests-forwarded"] > forwarded, shadow  # it ran shadowed
            assert_clean(w, vmm)
            assert "capacity now 98304 sectors" in vmm.output()
            assert image.stat().st_size == 48 * MIB
        finally:
            vmm.stop()
