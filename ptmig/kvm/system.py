"""Thin typed wrappers over the three kinds of KVM file descriptors: system, VM and vCPU.

Each method is one ioctl. Failures raise `KvmError` naming the ioctl and the errno; nothing here
knows about guests, devices or migration.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import mmap
import os
import struct
from typing import Any

from . import structs as s
from .errors import KvmError, KvmUnavailable
from .ioctls import KVM_API_VERSION, Cap, Ioctl

KVM_DEVICE = "/dev/kvm"
CPUID_ENTRY_SIZE = ctypes.sizeof(s.KvmCpuidEntry2)
_ARRAY_HEADER = struct.Struct("<II")  # kvm_msrs' nmsrs and kvm_cpuid2's nent, then a pad

#: Capabilities the VMM cannot work without, with what they are needed for.
REQUIRED_CAPS: dict[Cap, str] = {
    Cap.USER_MEMORY: "guest RAM in a user mapping",
    Cap.IOEVENTFD: "doorbells that reach device processes without a VMM exit",
    Cap.IMMEDIATE_EXIT: "pausing vCPUs without races",
    Cap.VCPU_EVENTS: "complete vCPU state for migration",
    Cap.XSAVE: "complete FPU state for migration",
    Cap.XCRS: "complete FPU state for migration",
    Cap.DEBUGREGS: "complete vCPU state for migration",
    Cap.GET_TSC_KHZ: "converting guest TSC ticks to time",
}


def _ioctl(fd: int, req: Ioctl, arg: Any = 0) -> int:
    try:
        return fcntl.ioctl(fd, req, arg)  # type: ignore[no-any-return]
    except OSError as e:
        raise KvmError(req.name, e.errno or 0) from None


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, or run "
                "on a machine or VM with nested virtualisation enabled)"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path} is not accessible by uid {os.getuid()}: add the user to the 'kvm' "
                "group or run as root"
            ) from None
        version = _ioctl(self.fd, Ioctl.GET_API_VERSION)
        if version != KVM_API_VERSION:
            raise KvmUnavailable(f"KVM API version {version}, ptmig needs {KVM_API_VERSION}")
        self.vcpu_mmap_size = _ioctl(self.fd, Ioctl.GET_VCPU_MMAP_SIZE)
        self._cpuid: bytes | None = None
        self._msr_indices: list[int] | None = None

    def check_extension(self, cap: Cap) -> int:
        return _ioctl(self.fd, Ioctl.CHECK_EXTENSION, int(cap))

    def require_capabilities(self) -> None:
        missing = [
            f"{cap.name} ({why})"
            for cap, why in REQUIRED_CAPS.items()
            if self.check_extension(cap) <= 0
        ]
        if missing:
            raise KvmUnavailable("KVM lacks capabilities ptmig needs: " + ", ".join(missing))

    def supported_cpuid(self) -> list[s.KvmCpuidEntry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer on E2BIG."""
        n = 64
        while True:
            buf = s.array_with_header(s.KvmCpuid2, s.KvmCpuidEntry2, n)()
            buf.hdr.nent = n
            try:
                _ioctl(self.fd, Ioctl.GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [buf.entries[i] for i in range(buf.hdr.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM can save and restore."""
        if self._msr_indices is None:
            n = 256
            while True:
                buf = s.array_with_header(s.KvmMsrList, ctypes.c_uint32, n)()
                buf.hdr.nmsrs = n
                try:
                    _ioctl(self.fd, Ioctl.GET_MSR_INDEX_LIST, buf)
                except KvmError as e:
                    if e.errno == errno.E2BIG and n < 65536:
                        n = max(n * 2, buf.hdr.nmsrs)
                        continue
                    raise
                self._msr_indices = [buf.entries[i] for i in range(buf.hdr.nmsrs)]
                break
        return list(self._msr_indices)

    def create_vm(self) -> VmFd:
        return VmFd(self, _ioctl(self.fd, Ioctl.CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VmFd:
    """A KVM VM file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: Cap) -> int:
        return _ioctl(self.fd, Ioctl.CHECK_EXTENSION, int(cap))

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        region = s.KvmUserspaceMemoryRegion(slot, flags, gpa, size, host_addr)
        _ioctl(self.fd, Ioctl.SET_USER_MEMORY_REGION, region)

    def enable_cap(self, cap: Cap, *args: int) -> None:
        ec = s.KvmEnableCap()
        ec.cap = int(cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        _ioctl(self.fd, Ioctl.ENABLE_CAP, ec)

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        _ioctl(self.fd, Ioctl.GET_DIRTY_LOG, s.KvmDirtyLog(slot, 0, bitmap_addr))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap_addr: int) -> None:
        _ioctl(
            self.fd,
            Ioctl.CLEAR_DIRTY_LOG,
            s.KvmClearDirtyLog(slot, num_pages, first_page, bitmap_addr),
        )

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        *,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        from .ioctls import (
            KVM_IOEVENTFD_FLAG_DATAMATCH,
            KVM_IOEVENTFD_FLAG_DEASSIGN,
            KVM_IOEVENTFD_FLAG_PIO,
        )

        flags = 0
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
        req = s.KvmIoeventfd()
        req.datamatch = datamatch or 0
        req.addr = addr
        req.len = length
        req.fd = fd
        req.flags = flags
        _ioctl(self.fd, Ioctl.IOEVENTFD, req)

    def create_vcpu(self, index: int) -> VcpuFd:
        return VcpuFd(self, index, _ioctl(self.fd, Ioctl.CREATE_VCPU, index))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuFd:
    """A KVM vCPU file descriptor and its mmap'd `struct kvm_run`."""

    def __init__(self, vm: VmFd, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self._map = mmap.mmap(
            fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.run_struct = s.KvmRun.from_buffer(self._map)
        self.run_map = self._map
        # The vCPU's CPUID entries as KVM reports them after our last SET_CPUID2 (which KVM
        # does not keep verbatim: it drops leaves and adjusts bits), None before the first.
        self.cpuid: bytes | None = None

    def run(self) -> None:
        """KVM_RUN. Raises KvmError(EINTR) when interrupted by a signal or immediate_exit."""
        _ioctl(self.fd, Ioctl.RUN, 0)

    def get(self, req: Ioctl, ctype: type) -> Any:
        obj = ctype()
        _ioctl(self.fd, req, obj)
        return obj

    def set(self, req: Ioctl, obj: Any) -> None:
        _ioctl(self.fd, req, obj)

    def get_regs(self) -> s.KvmRegs:
        return self.get(Ioctl.GET_REGS, s.KvmRegs)  # type: ignore[no-any-return]

    def set_regs(self, regs: s.KvmRegs) -> None:
        self.set(Ioctl.SET_REGS, regs)

    def get_sregs(self) -> s.KvmSregs:
        return self.get(Ioctl.GET_SREGS, s.KvmSregs)  # type: ignore[no-any-return]

    def set_sregs(self, sregs: s.KvmSregs) -> None:
        self.set(Ioctl.SET_SREGS, sregs)

    # The variable-length arguments (CPUID entries, MSR lists) are built and read as bytes in
    # one call each, not field by field through ctypes: on the switchover's clock, a vCPU's
    # CPUID and MSRs took ~0.2 ms of Python for ~0.03 ms in the kernel.

    def set_cpuid(self, entries: list[s.KvmCpuidEntry2]) -> None:
        self.set_cpuid_raw(b"".join(bytes(e) for e in entries))

    def set_cpuid_raw(self, entries: bytes) -> None:
        """KVM_SET_CPUID2 of `struct kvm_cpuid_entry2`s as bytes; what KVM made of them is
        read back into `cpuid`."""
        if len(entries) % CPUID_ENTRY_SIZE:
            raise ValueError(f"{len(entries)} bytes of CPUID entries: not whole entries")
        buf = bytearray(_ARRAY_HEADER.pack(len(entries) // CPUID_ENTRY_SIZE, 0))
        buf += entries
        self.cpuid = None
        _ioctl(self.fd, Ioctl.SET_CPUID2, buf)
        self.cpuid = self.get_cpuid_raw()

    def get_cpuid(self, max_entries: int = 256) -> list[s.KvmCpuidEntry2]:
        raw = self.get_cpuid_raw(max_entries)
        return [
            s.KvmCpuidEntry2.from_buffer_copy(raw, off)
            for off in range(0, len(raw), CPUID_ENTRY_SIZE)
        ]

    def get_cpuid_raw(self, max_entries: int = 256) -> bytes:
        """KVM_GET_CPUID2: the vCPU's `struct kvm_cpuid_entry2`s as bytes."""
        buf = bytearray(_ARRAY_HEADER.size + max_entries * CPUID_ENTRY_SIZE)
        _ARRAY_HEADER.pack_into(buf, 0, max_entries, 0)
        _ioctl(self.fd, Ioctl.GET_CPUID2, buf)
        (nent,) = struct.unpack_from("<I", buf)
        return bytes(buf[_ARRAY_HEADER.size : _ARRAY_HEADER.size + nent * CPUID_ENTRY_SIZE])

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """Read MSRs; returns the (index, value) pairs KVM could read, in order, stopping at the
        first one it could not (KVM's own semantics)."""
        # `struct kvm_msr_entry` is {u32 index; u32 reserved; u64 data}: two 64-bit words
        entries = array.array("Q", bytes(16 * len(indices)))
        entries[0::2] = array.array("Q", indices)
        buf = bytearray(_ARRAY_HEADER.pack(len(indices), 0)) + entries.tobytes()
        n = _ioctl(self.fd, Ioctl.GET_MSRS, buf)
        values = array.array("Q", buf[_ARRAY_HEADER.size : _ARRAY_HEADER.size + 16 * n])[1::2]
        return list(zip(indices[:n], values, strict=True))

    def set_msrs(self, pairs: list[tuple[int, int]]) -> int:
        """Write MSRs; returns how many KVM wrote (it stops at the first it refuses)."""
        entries = array.array("Q", [word for pair in pairs for word in pair])
        buf = bytearray(_ARRAY_HEADER.pack(len(pairs), 0)) + entries.tobytes()
        return _ioctl(self.fd, Ioctl.SET_MSRS, buf)

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, Ioctl.GET_TSC_KHZ, 0)

    def get_blob(self, req: Ioctl, size: int) -> bytes:
        """An ioctl whose argument is an opaque buffer of `size` bytes (xsave, events, ...)."""
        buf = bytearray(size)
        _ioctl(self.fd, req, buf)
        return bytes(buf)

    def set_blob(self, req: Ioctl, data: bytes) -> None:
        _ioctl(self.fd, req, bytearray(data))

    def close(self) -> None:
        if self.fd < 0:
            return
        del self.run_struct
        try:
            self._map.close()
        except BufferError:
            pass  # a view of kvm_run is still alive; the mapping goes with it
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
