"""One writer per disk image: an exclusive OFD lock, held by the VMM that runs the guest.

Owns the locking of a VM's writable disk images and the naming of whoever holds one.

Which process holds the lock. The VMM, on an open file description of its own for each image,
not the device process that does the I/O. The VMM is the process that decides whether the guest
runs here (boot, a migration's commit point, a resume), so the lock follows that decision
without a round trip to another process. A disk backend writes only on behalf of the guest's
requests, and those exist only while the guest's vCPUs run in the VMM that holds the lock; a
device process also stops when its VMM's control channel closes. So the rule is the same for
every backend: the Python and native request paths of `ptmig.devices.blk` today, and a future
vhost-user daemon (the VMM still locks the image it hands the daemon; the vhost-user spec has the
back-end stop its rings when the front-end's socket closes).

The lock. `fcntl(F_OFD_SETLK)` with a write lock on one byte at offset 2**62 (`LOCK_BYTE`), far
past any image's data and apart from the bytes QEMU's image locking takes (100-299): a
qemu-storage-daemon serving the image as a vhost-user backend takes QEMU's own shared locks there,
and the two kinds must not refuse each other. Every ptmig takes the same byte. The lock belongs
to the open file description (not the process), conflicts between two descriptions in one
process too, works on local files and NFS, and is dropped by the kernel when the VMM dies,
however it dies. The fd is
close-on-exec, so device processes never inherit it.

Naming the holder. F_OFD_GETLK reports pid -1 for an OFD lock, so the holder also writes a small
record beside the image (`IMAGE.owner`, JSON: pid, host, VM name, QMP socket). It is only read
when the lock is found taken, to say who took it; a stale record is never trusted on its own.
Writing it costs a file write and a rename (about 1 ms on a local disk, more on NFS), so a
migration's destination takes its locks inside the downtime and writes the records once the
guest runs (`acquire(record=False)`, then `record()`).

A migration's source and destination open the same image before the migration (shared storage):
the destination opens it unlocked and takes the lock at its commit point; the source releases
its lock once its guest is stopped and its devices are quiesced, and takes it back before it
ever resumes (see `ptmig.migration.protocol.GuestOwnership`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import PtmigError

log = logging.getLogger(__name__)

# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid, padding.
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
OWNER_SUFFIX = ".owner"
LOCK_BYTE = 1 << 62  # the one byte ptmig locks (QEMU's image locks live at bytes 100-299)


class DiskLockError(PtmigError, RuntimeError):
    """A disk image is locked by another process (the text names it where it can)."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) an image's lock: written beside the image."""

    pid: int
    host: str
    vm: str
    qmp: str | None = None

    @classmethod
    def this_process(cls, vm: str, qmp: str | None) -> Holder:
        return cls(os.getpid(), socket.gethostname(), vm, qmp)

    def describe(self) -> str:
        where = f", QMP {self.qmp}" if self.qmp else ""
        return f"ptmig pid {self.pid} on host {self.host} (VM {self.vm!r}{where})"


def _flock(fd: int, cmd: int, ltype: int) -> int:
    """One OFD lock command on `LOCK_BYTE`; returns the lock type the kernel reports."""
    raw = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, LOCK_BYTE, 1, 0))
    return int(_FLOCK.unpack(raw)[0])


def owner_path(image: Path) -> Path:
    return image.with_name(image.name + OWNER_SUFFIX)


def read_holder(image: Path) -> Holder | None:
    """The holder record beside `image`, None if there is none or it is not one."""
    try:
        doc = json.loads(owner_path(image).read_text())
        return Holder(
            int(doc["pid"]),
            str(doc["host"]),
            str(doc["vm"]),
            None if doc.get("qmp") is None else str(doc["qmp"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lock_holder(image: Path) -> str | None:
    """Who holds the write lock of `image` (a description), None if nobody does."""
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        if _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK) == fcntl.F_UNLCK:
            return None
    finally:
        os.close(fd)
    return describe_holder(image)


def describe_holder(image: Path, asker: Holder | None = None) -> str:
    """Who holds the lock of `image`, by its owner record where that can be trusted. `asker`:
    the holder that just failed to take the lock, so a record naming it is stale (it handed
    the lock on, and the new holder has not written its record yet)."""
    record = read_holder(image)
    if record is None:
        return "another process (no owner record beside the image)"
    if record == asker:
        return (
            f"another process (the owner record still names this VMM, {record.describe()}, "
            "which handed the lock on; a migration's destination writes its record once its "
            "guest runs)"
        )
    if record.host == socket.gethostname() and not _alive(record.pid):
        return f"another process (the owner record names {record.describe()}, which has exited)"
    return record.describe()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskLock:
    """The exclusive lock of one image, taken and released as the guest's owner changes."""

    def __init__(self, image: Path, holder: Holder) -> None:
        self.image = image
        self.holder = holder
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, record: bool = True) -> None:
        """Take the lock (nothing if held already); DiskLockError naming the holder if taken.
        `record`: also write the owner record (else call `record()` later)."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DiskLockError(f"cannot open disk image {self.image} to lock it: {e}") from e
        try:
            _flock(fd, _F_OFD_SETLK, fcntl.F_WRLCK)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise DiskLockError(f"cannot lock disk image {self.image}: {e}") from e
            raise DiskLockError(
                f"disk image {self.image} is in use: it is locked by "
                f"{describe_holder(self.image, self.holder)}"
            ) from None
        self._fd = fd
        if record:
            self.record()

    def release(self) -> None:
        """Drop the lock (nothing if not held). The record stays: only read under a lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _flock(fd, _F_OFD_SETLK, fcntl.F_UNLCK)
        finally:
            os.close(fd)

    def record(self) -> None:
        """Write the owner record beside the image (nothing if the lock is not held)."""
        if self._fd is None:
            return
        path = owner_path(self.image)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}")
        try:
            tmp.write_text(json.dumps(asdict(self.holder)))
            os.replace(tmp, path)
        except OSError as e:  # the lock holds anyway; only the holder's name is lost
            log.warning("cannot write the lock owner record %s: %s", path, e)
            tmp.unlink(missing_ok=True)


class DiskLocks:
    """The locks of a VM's writable images, taken and released together."""

    def __init__(self, images: Iterable[Path], holder: Holder) -> None:
        self.locks = [DiskLock(Path(p), holder) for p in images]

    @property
    def held(self) -> bool:
        """Every lock is held (true for a VM without disks)."""
        return all(lock.held for lock in self.locks)

    def acquire(self, *, record: bool = True) -> None:
        """All or none: DiskLockError (and nothing held) if one image is locked elsewhere.
        `record`: also write the owner records (else call `record()` later)."""
        taken = [lock for lock in self.locks if not lock.held]
        try:
            for lock in self.locks:
                lock.acquire(record=record)
        except DiskLockError:
            for lock in taken:
                lock.release()
            raise

    def record(self) -> None:
        for lock in self.locks:
            lock.record()

    def release(self) -> None:
        for lock in self.locks:
            lock.release()


__all__ = ["DiskLock", "DiskLockError", "DiskLocks", "Holder", "lock_holder", "read_holder"]
