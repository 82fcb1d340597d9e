"""A paused VM's complete state in a file: RAM plus every vCPU's state.

Used to hand a guest to a fresh VM in another process (and by the tests that prove such a
restore continues the guest exactly). Format: magic, version, memory size, vCPU count, then each
vCPU state (length-prefixed, itself checksummed), then RAM, region after region (the MMIO gap
between them is not stored).
"""

from __future__ import annotations

import struct
from pathlib import Path

from .errors import PtmigError
from .vcpu_state import MAX_STATE_BYTES, VcpuState
from .vm import Vm

MAGIC = b"PTSNAP01"
_HEAD = struct.Struct("<8sQI")


class SnapshotError(PtmigError, ValueError):
    pass


def save_snapshot(vm: Vm, path: Path) -> None:
    """Write a paused VM's state to `path`."""
    states = vm.save_vcpus()
    with open(path, "wb") as f:
        f.write(_HEAD.pack(MAGIC, vm.memory.ram, len(states)))
        for st in states:
            blob = st.to_bytes()
            f.write(struct.pack("<I", len(blob)) + blob)
        for r in vm.memory.regions:  # RAM only, region after region: never the MMIO gap
            f.write(vm.memory.view[r.gpa : r.end])


def load_snapshot(vm: Vm, path: Path) -> None:
    """Load a snapshot into a freshly created VM of the same shape (not started)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD.size)
        if len(head) != _HEAD.size:
            raise SnapshotError(f"{path}: truncated header")
        magic, mem_size, nvcpus = _HEAD.unpack(head)
        if magic != MAGIC:
            raise SnapshotError(f"{path}: not a ptmig snapshot")
        if mem_size != vm.memory.ram or nvcpus != len(vm.vcpus):
            raise SnapshotError(
                f"{path}: snapshot is {mem_size >> 20} MiB / {nvcpus} vCPUs, VM is "
                f"{vm.memory.ram >> 20} MiB / {len(vm.vcpus)} vCPUs"
            )
        states = []
        for _ in range(nvcpus):
            (n,) = struct.unpack("<I", f.read(4))
            if n > MAX_STATE_BYTES:
                raise SnapshotError(f"{path}: vCPU state of {n} bytes")
            states.append(VcpuState.from_bytes(f.read(n)))
        got = sum(f.readinto(vm.memory.view[r.gpa : r.end]) for r in vm.memory.regions)
        if got != mem_size:
            raise SnapshotError(f"{path}: RAM is {got} bytes, expected {mem_size}")
    vm.restore_vcpus(states)
