"""The guest ABI on the VMM side: guest-physical layout, ports, hypercalls, boot structures.

The same numbers live in `guest/abi.h`; `tests/test_layout.py` checks that the two agree.
See docs/GUEST_ABI.md for the meaning of each.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE_SIZE = 4096
PAGE_SHIFT = 12

ABI_PML4_GPA = 0x1000
ABI_PDPT_GPA = 0x2000
ABI_PD_GPA = 0x3000
ABI_PD_COUNT = 4  # identity map of the low 4 GiB
ABI_PD_HIGH_GPA = 0x104000  # page directories of GiB 4 and up, one page per GiB, below the image
ABI_GDT_GPA = 0x7000
ABI_TSS_GPA = 0x100000  # 64-bit TSS with an all-zero I/O permission bitmap
ABI_BOOT_INFO_GPA = 0x8000
ABI_MAILBOX_GPA = 0x9000
ABI_MAILBOX_SIZE = 256
ABI_STATS_GPA = 0xA000
ABI_STATS_SLOT_SIZE = 128
ABI_WORKLOAD_STATS_GPA = 0xA800
ABI_FW_LOAD_GPA = 0x200000
ABI_FW_MAX_SIZE = 0x200000
ABI_STACK_BASE_GPA = 0x400000
ABI_STACK_SIZE = 0x10000
ABI_HEAP_START_GPA = 0x600000
ABI_MMIO_BASE_GPA = 0xD0000000
ABI_MMIO_STRIDE = 0x1000
ABI_MAX_VCPUS = 16
ABI_MAX_DEVICES = 8
ABI_MAX_RAM_REGIONS = 4
ABI_LOW_RAM_MAX = 0xC0000000  # RAM below the MMIO windows ends here at most
ABI_HIGH_RAM_GPA = 0x100000000  # the rest of RAM continues from 4 GiB
ABI_PORT_CONSOLE = 0x3F8
ABI_PORT_HYPERCALL = 0x500

HC_EXIT = 1
HC_HALT = 2
HC_CONSOLE = 3
HC_HEARTBEAT = 4

BOOT_INFO_MAGIC = 0x31494247494D5450  # "PTMIGBI1"
FW_HEADER_MAGIC = 0x31574647494D5450  # "PTMIGFW1"
VCPU_STATS_MAGIC = 0x5354415453555043
KV_REPORT_MAGIC = 0x31504552564B4D50  # "PMKVREP1": struct kv_report at ABI_WORKLOAD_STATS_GPA

MIN_MEMORY = 16 << 20
# The firmware's page tables map up to RAM_TOP_MAX: the low 4 GiB through the PDs at ABI_PD_GPA,
# every further GiB through one PD at ABI_PD_HIGH_GPA, whose room ends at the firmware image.
RAM_TOP_MAX = (4 + (ABI_FW_LOAD_GPA - ABI_PD_HIGH_GPA) // PAGE_SIZE) << 30
MAX_MEMORY = RAM_TOP_MAX - (ABI_HIGH_RAM_GPA - ABI_LOW_RAM_MAX)
CMDLINE_MAX = 1024

# GDT selectors (index << 3 | RPL)
SEL_KERNEL_CODE = 1 << 3
SEL_KERNEL_DATA = 2 << 3
SEL_USER_DATA = (3 << 3) | 3
SEL_USER_CODE = (4 << 3) | 3
SEL_TSS = 5 << 3

_BOOT_INFO_HEAD = struct.Struct("<QIIQQQII")
_BOOT_DEVICE = struct.Struct("<QII")
_RAM_REGION = struct.Struct("<QQ")
BOOT_INFO_VERSION = 2


@dataclass(frozen=True)
class RamRegion:
    """Guest RAM at GPAs [gpa, gpa + size): one KVM memory slot, one dirty log."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def first_page(self) -> int:
        return self.gpa >> PAGE_SHIFT

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT


def ram_regions(memory: int) -> tuple[RamRegion, ...]:
    """Where `memory` bytes of RAM live, as PC-style VMMs lay it out: from GPA 0 up to
    ABI_LOW_RAM_MAX (below the MMIO windows), the rest from 4 GiB up."""
    if memory <= 0 or memory % PAGE_SIZE:
        raise ValueError(f"guest memory size {memory:#x} is not a positive page multiple")
    if memory <= ABI_LOW_RAM_MAX:
        return (RamRegion(0, memory),)
    return (RamRegion(0, ABI_LOW_RAM_MAX), RamRegion(ABI_HIGH_RAM_GPA, memory - ABI_LOW_RAM_MAX))


def ram_top(memory: int) -> int:
    """The GPA just past the last byte of RAM (the size of the guest-physical RAM span)."""
    return ram_regions(memory)[-1].end


@dataclass(frozen=True)
class BootDevice:
    mmio_gpa: int
    mmio_size: int
    virtio_device_id: int


def stack_top(cpu: int) -> int:
    return ABI_STACK_BASE_GPA + (cpu + 1) * ABI_STACK_SIZE


def mailbox_gpa(cpu: int) -> int:
    return ABI_MAILBOX_GPA + cpu * ABI_MAILBOX_SIZE


def stats_gpa(cpu: int) -> int:
    return ABI_STATS_GPA + cpu * ABI_STATS_SLOT_SIZE


def mmio_gpa(device_index: int) -> int:
    return ABI_MMIO_BASE_GPA + device_index * ABI_MMIO_STRIDE


def pack_boot_info(
    nr_vcpus: int, memory: int, tsc_khz: int, cmdline: str, devices: list[BootDevice]
) -> bytes:
    """The boot-info page as the firmware reads it (`struct boot_info` in guest/abi.h).

    `mem_size` is the RAM from GPA 0 (the low region); `regions` lists every RAM region."""
    raw_cmd = cmdline.encode("ascii")
    if len(raw_cmd) >= CMDLINE_MAX:
        raise ValueError(f"guest command line is {len(raw_cmd)} bytes, at most {CMDLINE_MAX - 1}")
    if len(devices) > ABI_MAX_DEVICES:
        raise ValueError(f"{len(devices)} devices, at most {ABI_MAX_DEVICES}")
    regions = ram_regions(memory)
    out = bytearray(PAGE_SIZE)
    _BOOT_INFO_HEAD.pack_into(
        out,
        0,
        BOOT_INFO_MAGIC,
        BOOT_INFO_VERSION,
        nr_vcpus,
        regions[0].size,
        tsc_khz,
        ABI_HEAP_START_GPA,
        len(devices),
        len(regions),
    )
    off = _BOOT_INFO_HEAD.size
    for i in range(ABI_MAX_DEVICES):
        if i < len(devices):
            d = devices[i]
            _BOOT_DEVICE.pack_into(out, off, d.mmio_gpa, d.mmio_size, d.virtio_device_id)
        off += _BOOT_DEVICE.size
    out[off : off + len(raw_cmd)] = raw_cmd
    for i, r in enumerate(regions):
        _RAM_REGION.pack_into(out, BOOT_INFO_REGIONS_OFFSET + i * _RAM_REGION.size, r.gpa, r.size)
    return bytes(out)


BOOT_INFO_CMDLINE_OFFSET = _BOOT_INFO_HEAD.size + ABI_MAX_DEVICES * _BOOT_DEVICE.size
BOOT_INFO_REGIONS_OFFSET = BOOT_INFO_CMDLINE_OFFSET + CMDLINE_MAX

_VCPU_STATS = struct.Struct("<16Q")


@dataclass(frozen=True)
class VcpuStats:
    """One vCPU's statistics slot, as the guest workload maintains it."""

    cpu: int
    valid: bool
    iterations: int
    max_gap_tsc: int
    last_tsc: int
    pages_written: int
    heartbeat: int
    workload: tuple[int, ...]

    @classmethod
    def unpack(cls, cpu: int, raw: bytes) -> VcpuStats:
        v = _VCPU_STATS.unpack_from(raw)
        return cls(cpu, v[0] == VCPU_STATS_MAGIC, v[1], v[2], v[3], v[4], v[5], tuple(v[6:]))


_KV_REPORT = struct.Struct("<20Q")
KV_REPORT_BYTES = _KV_REPORT.size


@dataclass(frozen=True)
class KvLogReport:
    """The kv workload's log, from its report (`struct kv_report` in guest/abi.h): how much it
    appended and the checkpoints that compacted it. A checkpoint is the guest's own pause: its
    loop serves nothing while it rewrites the live keys into the other log area."""

    entries: int
    log_bytes: int
    area_bytes: int
    checkpoints: int
    checkpoint_bytes: int
    checkpoint_us: int
    checkpoint_max_us: int

    @classmethod
    def unpack(cls, raw: bytes) -> KvLogReport | None:
        """None unless the kv workload wrote its report there (its magic, after replay)."""
        if len(raw) < _KV_REPORT.size:
            return None
        v = _KV_REPORT.unpack_from(raw)
        if v[0] != KV_REPORT_MAGIC:
            return None
        return cls(v[10], v[9], v[13], v[16], v[17], v[18], v[19])

    def to_json(self) -> dict[str, int | float]:
        return {
            "entries": self.entries,
            "log-bytes": self.log_bytes,
            "log-area-bytes": self.area_bytes,
            "checkpoints": self.checkpoints,
            "checkpoint-bytes": self.checkpoint_bytes,
            "checkpoint-ms": round(self.checkpoint_us / 1000, 3),
            "checkpoint-max-ms": round(self.checkpoint_max_us / 1000, 3),
        }
