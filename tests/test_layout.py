"""The guest ABI numbers agree between ptmig/layout.py and guest/abi.h; ioctl numbers derive
from the _IOC encoding to the values read off a real x86_64 host."""

from __future__ import annotations

import ctypes

from ptmig import layout
from ptmig.firmware import read_abi_header
from ptmig.kvm import structs as s
from ptmig.kvm.ioctls import Ioctl

SHARED = [
    "ABI_PML4_GPA",
    "ABI_BOOT_INFO_GPA",
    "ABI_MAILBOX_GPA",
    "ABI_MAILBOX_SIZE",
    "ABI_STATS_GPA",
    "ABI_STATS_SLOT_SIZE",
    "ABI_WORKLOAD_STATS_GPA",
    "ABI_FW_LOAD_GPA",
    "ABI_FW_MAX_SIZE",
    "ABI_STACK_BASE_GPA",
    "ABI_STACK_SIZE",
    "ABI_HEAP_START_GPA",
    "ABI_MMIO_BASE_GPA",
    "ABI_MMIO_STRIDE",
    "ABI_MAX_VCPUS",
    "ABI_MAX_DEVICES",
    "ABI_MAX_RAM_REGIONS",
    "ABI_LOW_RAM_MAX",
    "ABI_HIGH_RAM_GPA",
    "ABI_PD_HIGH_GPA",
    "BOOT_INFO_VERSION",
    "ABI_PORT_CONSOLE",
    "ABI_PORT_HYPERCALL",
    "HC_EXIT",
    "HC_HALT",
    "HC_CONSOLE",
    "HC_HEARTBEAT",
    "BOOT_INFO_MAGIC",
    "FW_HEADER_MAGIC",
    "VCPU_STATS_MAGIC",
    "KV_REPORT_MAGIC",
]


def test_abi_constants_agree() -> None:
    header = read_abi_header()
    diffs = {
        n: (getattr(layout, n), header.get(n))
        for n in SHARED
        if getattr(layout, n) != header.get(n)
    }
    assert not diffs, f"layout.py and guest/abi.h disagree: {diffs}"


def test_boot_info_cmdline_offset_matches_the_c_struct() -> None:
    # struct boot_info: 48-byte head, 8 devices of 16 bytes, then the command line.
    assert layout.BOOT_INFO_CMDLINE_OFFSET == 48 + 8 * 16
    dev = layout.BootDevice(0xD0000000, 0x1000, 1)
    page = layout.pack_boot_info(2, 64 << 20, 1000, "hello", [dev])
    assert page[layout.BOOT_INFO_CMDLINE_OFFSET :][:6] == b"hello\0"


KNOWN = {
    "CREATE_VM": 0xAE01,
    "GET_MSR_INDEX_LIST": 0xC004AE02,
    "CHECK_EXTENSION": 0xAE03,
    "GET_VCPU_MMAP_SIZE": 0xAE04,
    "GET_SUPPORTED_CPUID": 0xC008AE05,
    "CREATE_VCPU": 0xAE41,
    "GET_DIRTY_LOG": 0x4010AE42,
    "SET_USER_MEMORY_REGION": 0x4020AE46,
    "IOEVENTFD": 0x4040AE79,
    "IRQFD": 0x4020AE76,
    "ENABLE_CAP": 0x4068AEA3,
    "CLEAR_DIRTY_LOG": 0xC018AEC0,
    "RUN": 0xAE80,
    "GET_REGS": 0x8090AE81,
    "SET_REGS": 0x4090AE82,
    "GET_SREGS": 0x8138AE83,
    "SET_SREGS": 0x4138AE84,
    "GET_MSRS": 0xC008AE88,
    "SET_MSRS": 0x4008AE89,
    "GET_FPU": 0x81A0AE8C,
    "SET_FPU": 0x41A0AE8D,
    "SET_CPUID2": 0x4008AE90,
    "GET_MP_STATE": 0x8004AE98,
    "SET_MP_STATE": 0x4004AE99,
    "GET_VCPU_EVENTS": 0x8040AE9F,
    "SET_VCPU_EVENTS": 0x4040AEA0,
    "GET_DEBUGREGS": 0x8080AEA1,
    "SET_DEBUGREGS": 0x4080AEA2,
    "GET_XSAVE": 0x9000AEA4,
    "SET_XSAVE": 0x5000AEA5,
    "GET_XCRS": 0x8188AEA6,
    "SET_XCRS": 0x4188AEA7,
    "GET_XSAVE2": 0x9000AECF,
}


def test_ioctl_numbers_derive_to_the_known_table() -> None:
    wrong = {k: hex(Ioctl[k]) for k, v in KNOWN.items() if Ioctl[k] != v}
    assert not wrong


def test_struct_sizes() -> None:
    assert ctypes.sizeof(s.KvmRegs) == 144
    assert ctypes.sizeof(s.KvmSregs) == 312
    assert s.KvmSregs.gdt.offset == 192 and s.KvmSregs.idt.offset == 208
    assert s.KvmSregs.cr0.offset == 224 and s.KvmSregs.efer.offset == 264
    assert ctypes.sizeof(s.KvmUserspaceMemoryRegion) == 32
    assert ctypes.sizeof(s.KvmIoeventfd) == 64
    assert ctypes.sizeof(s.KvmDirtyLog) == 16
    assert ctypes.sizeof(s.KvmClearDirtyLog) == 24
    assert s.KvmRun.exit.offset == 32
