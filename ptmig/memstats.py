"""The VMM's own memory: what running (and migrating) a guest costs the host besides its RAM.

Two views, both in `x-query-memory`:

* measured: the private (anonymous) resident memory of the VMM process and of each device
  process (`RssAnon` in /proc/PID/status: Python, numpy arrays, buffers, the native data
  plane's arrays), plus the resident pages of the shared structures that are not guest RAM
  (IOMMU tables, the shadow-page pool; memfds, counted once, by what they hold);
* accounted: the per-page structures whose size grows with guest RAM (dirty bitmaps, IOMMU
  tables), so a user can tell what scales with RAM from what is a fixed cost.

Guest RAM itself is reported per region with its resident bytes (pages the memfd holds).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from typing import TYPE_CHECKING, Any

from .layout import PAGE_SIZE

if TYPE_CHECKING:
    from .memory import GuestMemory
    from .vmparts import ShadowHost


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENA_MAX = 1
MMAP_THRESHOLD = 256 << 10


@functools.cache
def libc() -> ctypes.CDLL:
    """The process's C library, one handle for every caller (errno kept for `ctypes.get_errno`)."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has the malloc tuning calls), else None."""
    lib = libc()
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def tune_malloc() -> bool:
    """Make the C heap give back what a migration borrowed (call once, before threads start).

    glibc's defaults cost a many-threaded VMM megabytes it never returns: each thread that
    allocates gets an arena of its own (up to 8 per core), and the mmap threshold rises to the
    largest block freed so far, so the migration's transient buffers (record buffers, numpy
    temporaries of a round) land in arenas instead of mmaps and stay resident after it. One
    arena, a fixed 256 KiB mmap threshold and trimming at the same size keep the VMM's
    private memory near what it holds. One arena, not two: a source loads numpy and its
    migration modules in its QMP and migration threads, after the start-up's modules filled
    the main heap; a second arena gave them a heap of their own and both heaps kept part-used
    pages (0.2 MiB more of each side's private memory after a 1 GiB migration). The VMM's
    threads allocate under the GIL (the native data plane only when it sets up a device), so
    they seldom wait on the arena's lock.
    False where the C library is not glibc (nothing done).
    """
    glibc = _glibc()
    if glibc is None:
        return False
    ok = glibc.mallopt(_M_ARENA_MAX, ARENA_MAX)
    ok &= glibc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    ok &= glibc.mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD)
    return bool(ok)


def release_free_memory() -> None:
    """Return the C heap's free pages to the host (after a migration ended, either side)."""
    glibc = _glibc()
    if glibc is not None:
        glibc.malloc_trim(0)


def proc_status_kib(pid: int | str, field: str) -> int | None:
    """A `kB` field of /proc/PID/status (e.g. RssAnon), in bytes; None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes(fd: int, start: int = 0, end: int | None = None) -> int:
    """Bytes of [start, end) of a memfd that hold pages (found with SEEK_DATA/SEEK_HOLE, so
    nothing is read or allocated)."""
    if end is None:
        end = os.fstat(fd).st_size
    total, pos = 0, start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        total += hole - data
        pos = hole
    return total


def guest_ram_report(mem: GuestMemory) -> dict[str, Any]:
    return {
        "size": mem.ram,
        "regions": [
            {"gpa": r.gpa, "size": r.size, "resident": resident_bytes(mem.fd, r.gpa, r.end)}
            for r in mem.regions
        ],
    }


def memory_report(machine: ShadowHost) -> dict[str, Any]:
    """`x-query-memory`: guest RAM, and the VMM's own memory measured and accounted."""
    vm = machine.vm
    mem = vm.memory
    kvm_log = vm.dirty.kvm_log
    dirty_bitmaps = kvm_log.nbytes + mem.vmm_dirty_bytes
    iommu_tables = sum(d.iommu.nbytes for d in machine.devices)
    iommu_resident = sum(resident_bytes(d.iommu.fd) for d in machine.devices)
    pool = machine.shadow_pool
    pool_resident = resident_bytes(pool.fd)
    # A vhost-user backend someone else runs has no pid of ours to read.
    device_anon = {
        d.id: (proc_status_kib(d.handle.pid, "RssAnon") or 0) if d.handle.pid is not None else 0
        for d in machine.devices
    }
    devices = [
        {"id": d.id, "pid": d.handle.pid, "rss-anon": device_anon[d.id]} for d in machine.devices
    ]
    vmm_anon = proc_status_kib("self", "RssAnon") or 0
    measured = vmm_anon + sum(device_anon.values()) + iommu_resident + pool_resident
    return {
        "guest-ram": guest_ram_report(mem),
        "vmm": {
            "rss-anon": vmm_anon,
            "devices": devices,
            "iommu-tables-resident": iommu_resident,
            "shadow-pool-resident": pool_resident,
            "total": measured,
            "percent-of-guest-ram": round(100 * measured / mem.ram, 3),
        },
        "per-page-structures": {
            "dirty-bitmaps": dirty_bitmaps,
            "iommu-tables": iommu_tables,
            "shadow-pool": pool.size,
            "bytes-per-guest-gib": round((dirty_bitmaps + iommu_tables) / (mem.ram / (1 << 30))),
        },
        "page-size": PAGE_SIZE,
    }
