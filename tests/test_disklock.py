"""One writer per disk image (`ptmig.disklock`): OFD locks and the naming of their holder.

OFD locks conflict between open file descriptions even inside one process, so most of this runs
in the test process; the holder that dies is a real child process, killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptmig.disklock import DiskLock, DiskLockError, DiskLocks, Holder, lock_holder, read_holder


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 4096)
    return path


def test_a_second_lock_fails_naming_the_holder(image: Path) -> None:
    first = DiskLock(image, Holder(os.getpid(), "host-a", "vm-a", "/run/a.qmp"))
    second = DiskLock(image, Holder(os.getpid(), "host-b", "vm-b"))
    first.acquire()
    with pytest.raises(DiskLockError) as err:
        second.acquire()
    assert (
        f"disk image {image} is in use: it is locked by ptmig pid {os.getpid()} on host "
        "host-a (VM 'vm-a', QMP /run/a.qmp)" == str(err.value)
    )
    assert not second.held and first.held
    first.release()
    second.acquire()
    assert read_holder(image) == Holder(os.getpid(), "host-b", "vm-b")
    second.release()
    assert lock_holder(image) is None


def test_acquire_and_release_are_idempotent(image: Path) -> None:
    lock = DiskLock(image, Holder.this_process("vm", None))
    lock.acquire()
    lock.acquire()
    assert lock_holder(image) is not None
    lock.release()
    lock.release()
    assert lock_holder(image) is None


def test_disk_locks_are_all_or_none(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        p.write_bytes(b"\0" * 512)
    other = DiskLock(b, Holder(1, "elsewhere", "other"))
    other.acquire()
    mine = DiskLocks([a, b], Holder.this_process("mine", None))
    with pytest.raises(DiskLockError, match=r"b\.img is in use.*VM 'other'"):
        mine.acquire()
    assert not mine.held and lock_holder(a) is None  # a was given back
    other.release()
    mine.acquire()
    assert mine.held and lock_holder(a) is not None and lock_holder(b) is not None
    mine.release()
    assert lock_holder(a) is None and lock_holder(b) is None


def test_a_vm_without_disks_holds_all_its_locks() -> None:
    locks = DiskLocks([], Holder.this_process("vm", None))
    locks.acquire()
    assert locks.held


def test_the_kernel_drops_the_lock_of_a_killed_holder(image: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from ptmig.disklock import *; "
        "DiskLock(Path(sys.argv[1]), Holder.this_process('child', None)).acquire(); "
        "print('locked', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(image)], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"locked\n"
        assert lock_holder(image) == (
            f"ptmig pid {child.pid} on host {os.uname().nodename} (VM 'child')"
        )
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 5
    while lock_holder(image) is not None:  # the kernel drops it as the process exits
        assert time.monotonic() < deadline
        time.sleep(0.01)
    DiskLock(image, Holder.this_process("next", None)).acquire()


def test_a_stale_or_missing_owner_record_is_not_trusted(image: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = DiskLock(image, Holder(dead.pid, os.uname().nodename, "ghost"))
    holder.acquire()
    with pytest.raises(DiskLockError, match=rf"names ptmig pid {dead.pid} .* which has exited"):
        DiskLock(image, Holder.this_process("me", None)).acquire()
    (image.parent / (image.name + ".owner")).write_text(json.dumps({"pid": "x"}))
    with pytest.raises(DiskLockError, match="another process \\(no owner record"):
        DiskLock(image, Holder.this_process("me", None)).acquire()
    holder.release()


def test_a_record_naming_the_asker_itself_is_called_stale(image: Path) -> None:
    """A migrated source that asks for its lock back before the destination wrote its record
    finds its own record there: it must not name itself as the holder."""
    me = Holder(os.getpid(), os.uname().nodename, "src", "/run/src.qmp")
    source = DiskLock(image, me)
    source.acquire()
    source.release()  # handed on: the destination takes the lock without a record yet
    destination = DiskLock(image, Holder(os.getpid(), os.uname().nodename, "dst"))
    destination.acquire(record=False)
    with pytest.raises(DiskLockError) as err:
        DiskLock(image, me).acquire()
    assert "the owner record still names this VMM" in str(err.value)
    assert "which handed the lock on" in str(err.value)
    destination.record()
    with pytest.raises(DiskLockError, match="locked by ptmig pid .*VM 'dst'"):
        DiskLock(image, me).acquire()
    destination.release()


def test_an_image_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DiskLockError, match=r"cannot open disk image .*missing\.img to lock it"):
        DiskLock(tmp_path / "missing.img", Holder.this_process("vm", None)).acquire()


def test_the_owner_record_can_wait_until_the_guest_runs(image: Path) -> None:
    locks = DiskLocks([image], Holder(os.getpid(), "host-d", "late"))
    locks.acquire(record=False)
    assert read_holder(image) is None and lock_holder(image) is not None
    locks.record()
    assert read_holder(image) == Holder(os.getpid(), "host-d", "late")
    locks.release()
