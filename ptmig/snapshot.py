"""A paused VM's complete state in a file: RAM plus every vCPU's state.

Used to hand a guest to a fresh VM in another process (and by the tests that prove such a
restore continues the guest exactly). Format: magic, version, memory size, vCPU count, then each
vCPU state (length-prefixed, itself checksummed), then RAM.
"""

from __future__ import annotations

import struct
from pathlib import Path

from .vcpu_state import MAX_STATE_BYTES, VcpuState
from .vm import Vm

MAGIC = b"PTSNAP01"
_HEAD = struct.Struct("<8sQI")


class SnapshotError(ValueError):
    pass


def save_snapshot(vm: Vm, path: Path) -> None:
    """Write a paused VM's state to `path`."""
    states = vm.save_vcpus()
    with open(path, "wb") as f:
        f.write(_HEAD.pack(MAGIC, vm.memory.size, len(states)))
        for st in states:
            blob = st.to_bytes()
            f.write(struct.pack("<I", len(blob)) + blob)
        f.write(vm.memory.view)


def load_snapshot(vm: Vm, path: Path) -> None:
    """Load a snapshot into a freshly created VM of the same shape (not started)."""
    with open(path, "rb") as f:
        head = f.read(_HEAD.size)
        if len(head) != _HEAD.size:
            raise SnapshotError(f"{path}: truncated header")
        magic, mem_size, nvcpus = _HEAD.unpack(head)
        if magic != MAGIC:
            raise SnapshotError(f"{path}: not a ptmig snapshot")
        if mem_size != vm.memory.size or nvcpus != len(vm.vcpus):
            raise SnapshotError(
                f"{path}: snapshot is {mem_size >> 20} MiB / {nvcpus} vCPUs, VM is "
                f"{vm.memory.size >> 20} MiB / {len(vm.vcpus)} vCPUs"
            )
        states = []
        for _ in range(nvcpus):
            (n,) = struct.unpack("<I", f.read(4))
            if n > MAX_STATE_BYTES:
                raise SnapshotError(f"{path}: vCPU state of {n} bytes")
            states.append(VcpuState.from_bytes(f.read(n)))
        got = f.readinto(vm.memory.view)
        if got != mem_size:
            raise SnapshotError(f"{path}: RAM is {got} bytes, expected {mem_size}")
    vm.restore_vcpus(states)
