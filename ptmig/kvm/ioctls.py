"""Every KVM ioctl number ptmig uses, derived from the Linux `_IOC` encoding in one table.

The numbers are computed from (direction, type 0xAE, nr, argument size) exactly as
`include/uapi/asm-generic/ioctl.h` does, with the sizes taken from the ctypes structures in
`structs`, so a wrong structure shows up as a wrong ioctl number (tested against the values
read off a real x86_64 host).
"""

from __future__ import annotations

import ctypes
from enum import IntEnum

from . import structs as s

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

KVMIO = 0xAE


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """The `_IOC(dir, type, nr, size)` macro."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(nr: int) -> int:
    return ioc(IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, ctype: type) -> int:
    return ioc(IOC_READ, KVMIO, nr, ctypes.sizeof(ctype))


def _iow(nr: int, ctype: type) -> int:
    return ioc(IOC_WRITE, KVMIO, nr, ctypes.sizeof(ctype))


def _iowr(nr: int, ctype: type) -> int:
    return ioc(IOC_READ | IOC_WRITE, KVMIO, nr, ctypes.sizeof(ctype))


class Ioctl(IntEnum):
    """KVM ioctl request numbers (x86_64)."""

    # /dev/kvm
    GET_API_VERSION = _io(0x00)
    CREATE_VM = _io(0x01)
    GET_MSR_INDEX_LIST = _iowr(0x02, s.KvmMsrList)
    CHECK_EXTENSION = _io(0x03)
    GET_VCPU_MMAP_SIZE = _io(0x04)
    GET_SUPPORTED_CPUID = _iowr(0x05, s.KvmCpuid2)
    # VM fd
    CREATE_VCPU = _io(0x41)
    GET_DIRTY_LOG = _iow(0x42, s.KvmDirtyLog)
    SET_USER_MEMORY_REGION = _iow(0x46, s.KvmUserspaceMemoryRegion)
    SET_TSS_ADDR = _io(0x47)
    IRQFD = _iow(0x76, s.KvmIrqfd)
    IOEVENTFD = _iow(0x79, s.KvmIoeventfd)
    ENABLE_CAP = _iow(0xA3, s.KvmEnableCap)
    CLEAR_DIRTY_LOG = _iowr(0xC0, s.KvmClearDirtyLog)
    # vCPU fd
    RUN = _io(0x80)
    GET_REGS = _ior(0x81, s.KvmRegs)
    SET_REGS = _iow(0x82, s.KvmRegs)
    GET_SREGS = _ior(0x83, s.KvmSregs)
    SET_SREGS = _iow(0x84, s.KvmSregs)
    GET_MSRS = _iowr(0x88, s.KvmMsrs)
    SET_MSRS = _iow(0x89, s.KvmMsrs)
    GET_FPU = _ior(0x8C, s.KvmFpu)
    SET_FPU = _iow(0x8D, s.KvmFpu)
    SET_CPUID2 = _iow(0x90, s.KvmCpuid2)
    GET_CPUID2 = _iowr(0x91, s.KvmCpuid2)
    GET_MP_STATE = _ior(0x98, s.KvmMpState)
    SET_MP_STATE = _iow(0x99, s.KvmMpState)
    GET_VCPU_EVENTS = _ior(0x9F, s.KvmVcpuEvents)
    SET_VCPU_EVENTS = _iow(0xA0, s.KvmVcpuEvents)
    GET_DEBUGREGS = _ior(0xA1, s.KvmDebugregs)
    SET_DEBUGREGS = _iow(0xA2, s.KvmDebugregs)
    GET_TSC_KHZ = _io(0xA3)
    GET_XSAVE = _ior(0xA4, s.KvmXsave)
    SET_XSAVE = _iow(0xA5, s.KvmXsave)
    GET_XCRS = _ior(0xA6, s.KvmXcrs)
    SET_XCRS = _iow(0xA7, s.KvmXcrs)
    GET_XSAVE2 = _ior(0xCF, s.KvmXsave)


class Cap(IntEnum):
    """KVM_CAP_* numbers checked by ptmig."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_MEMSLOTS = 10
    SYNC_MMU = 16
    IOEVENTFD = 36
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    GET_TSC_KHZ = 61
    IMMEDIATE_EXIT = 136
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    XSAVE2 = 208
    MP_STATE = 14


class Exit(IntEnum):
    """KVM_EXIT_* reasons ptmig dispatches on."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24


KVM_API_VERSION = 12
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_MP_STATE_RUNNABLE = 0
