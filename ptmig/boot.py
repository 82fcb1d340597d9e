"""Everything the VMM writes into a fresh guest before its first instruction.

The firmware runs in 64-bit long mode at CPL 3 (on the hosts ptmig is developed on, only
ring-3 guest code runs at native speed), so the VMM builds the page tables, the GDT and a TSS,
loads the firmware image, fills the boot-info page, and gives every vCPU long-mode segment
state with RFLAGS.IOPL = 3 so that port I/O (console, hypercalls) works from ring 3.
"""

from __future__ import annotations

import struct

from .kvm import structs as s
from .layout import (
    ABI_BOOT_INFO_GPA,
    ABI_GDT_GPA,
    ABI_PD_COUNT,
    ABI_PD_GPA,
    ABI_PD_HIGH_GPA,
    ABI_PDPT_GPA,
    ABI_PML4_GPA,
    ABI_TSS_GPA,
    PAGE_SIZE,
    RAM_TOP_MAX,
    SEL_TSS,
    SEL_USER_CODE,
    SEL_USER_DATA,
    BootDevice,
    pack_boot_info,
    stack_top,
)
from .memory import GuestMemory

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PS = 1 << 7

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_IOPL3 = 3 << 12

# GDT: null, kernel code, kernel data, user data (DPL 3), user code 64-bit (DPL 3), TSS (16 B)
_GDT = [
    0x0000000000000000,
    0x00AF9A000000FFFF,
    0x00CF92000000FFFF,
    0x00CFF2000000FFFF,
    0x00AFFA000000FFFF,
]
TSS_IOMAP_BASE = 0x68
# The I/O permission bitmap covers all 65536 ports (all zero: every port allowed) plus the
# terminating 0xff byte. With IOPL 3 a CPU would not consult it, but on nested, software-assisted
# KVM (kvm_pvm) ring-3 port I/O is checked against it, so it must allow the console and
# hypercall ports.
TSS_LIMIT = TSS_IOMAP_BASE + 65536 // 8


def _tss_descriptor(base: int, limit: int) -> tuple[int, int]:
    low = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40)
    low |= ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56
    return low, base >> 32


def write_page_tables(mem: GuestMemory) -> None:
    """Identity-map the low 4 GiB and all RAM above it with 2 MiB user-accessible pages.

    PDPT entry i points to the page directory of GiB i: the first four at ABI_PD_GPA, the
    others (RAM from 4 GiB up) at ABI_PD_HIGH_GPA + (i - 4) pages."""
    gib = max(ABI_PD_COUNT, -(-mem.size >> 30))
    if gib > RAM_TOP_MAX >> 30:
        raise ValueError(
            f"guest RAM ends at {mem.size:#x}, past the {RAM_TOP_MAX:#x} the page tables can map"
        )
    mem.write_u64(ABI_PML4_GPA, ABI_PDPT_GPA | PTE_P | PTE_RW | PTE_US)
    pdpt = b"".join(struct.pack("<Q", _pd_gpa(i) | PTE_P | PTE_RW | PTE_US) for i in range(gib))
    mem.write(ABI_PDPT_GPA, pdpt)
    flags = PTE_P | PTE_RW | PTE_US | PTE_PS
    for first, count in ((0, ABI_PD_COUNT), (ABI_PD_COUNT, gib - ABI_PD_COUNT)):
        if count:
            n = 512 * count
            pds = struct.pack(f"<{n}Q", *(((first * 512 + i) << 21) | flags for i in range(n)))
            mem.write(_pd_gpa(first), pds)


def _pd_gpa(gib: int) -> int:
    if gib < ABI_PD_COUNT:
        return ABI_PD_GPA + gib * PAGE_SIZE
    return ABI_PD_HIGH_GPA + (gib - ABI_PD_COUNT) * PAGE_SIZE


def write_gdt(mem: GuestMemory) -> None:
    lo, hi = _tss_descriptor(ABI_TSS_GPA, TSS_LIMIT)
    mem.write(ABI_GDT_GPA, struct.pack(f"<{len(_GDT) + 2}Q", *_GDT, lo, hi))
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<H", tss, 0x66, TSS_IOMAP_BASE)
    tss[-1] = 0xFF
    mem.write(ABI_TSS_GPA, bytes(tss))


def write_boot_info(
    mem: GuestMemory, nr_vcpus: int, tsc_khz: int, cmdline: str, devices: list[BootDevice]
) -> None:
    mem.write(ABI_BOOT_INFO_GPA, pack_boot_info(nr_vcpus, mem.ram, tsc_khz, cmdline, devices))


def _segment(selector: int, *, code: bool, dpl: int) -> s.KvmSegment:
    seg = s.KvmSegment()
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3
    seg.present = 1
    seg.dpl = dpl
    seg.db = 0 if code else 1
    seg.s = 1
    seg.l = 1 if code else 0
    seg.g = 1
    return seg


def initial_sregs(sregs: s.KvmSregs) -> s.KvmSregs:
    """Long mode, paging on, CPL 3 code and data segments, a busy 64-bit TSS."""
    sregs.cs = _segment(SEL_USER_CODE, code=True, dpl=3)
    data = _segment(SEL_USER_DATA, code=False, dpl=3)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    tr = s.KvmSegment()
    tr.base = ABI_TSS_GPA
    tr.limit = TSS_LIMIT
    tr.selector = SEL_TSS
    tr.type = 0xB
    tr.present = 1
    sregs.tr = tr
    ldt = s.KvmSegment()
    ldt.type = 0x2
    ldt.unusable = 1
    sregs.ldt = ldt
    sregs.gdt.base = ABI_GDT_GPA
    sregs.gdt.limit = (len(_GDT) + 2) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = ABI_PML4_GPA
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA
    return sregs


def initial_regs(cpu: int, entry: int) -> s.KvmRegs:
    regs = s.KvmRegs()
    regs.rip = entry
    regs.rsp = stack_top(cpu) - 8  # as if `call` had pushed a return address
    regs.rdi = cpu
    regs.rsi = ABI_BOOT_INFO_GPA
    regs.rflags = RFLAGS_RESERVED | RFLAGS_IOPL3
    return regs
