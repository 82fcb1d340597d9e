"""The firmware's workloads on real KVM: console lines, exit codes, stats slots, ground truth."""

from __future__ import annotations

import resource
import struct
import time

import numpy as np
import pytest

from ptmig.firmware import FirmwareImage, read_abi_header
from ptmig.layout import (
    ABI_BOOT_INFO_GPA,
    ABI_HEAP_START_GPA,
    ABI_WORKLOAD_STATS_GPA,
    PAGE_SIZE,
)
from ptmig.vm import Vm, VmSpec

pytestmark = pytest.mark.kvm

ABI = read_abi_header()
_DIRTY_REPORT = struct.Struct("<6Q")  # magic, bitmap_gpa, bitmap_bytes, ws_gpa, ws_pages, pass
_STOREBW_REPORT = struct.Struct("<6Q")  # magic, size, passes, bytes, ticks, tsc_khz


def run(
    firmware: FirmwareImage,
    cmdline: str,
    *,
    memory: int = 64 << 20,
    vcpus: int = 1,
    timeout: float = 30,
) -> tuple[Vm, int | None]:
    """Boot and run until the guest exits; the caller closes the VM."""
    vm = Vm(VmSpec(memory=memory, vcpus=vcpus, cmdline=cmdline))
    vm.boot(firmware.data, firmware.entry, firmware.entry_ap)
    vm.start()
    return vm, vm.wait(timeout)


def console(vm: Vm) -> str:
    return "\n".join(vm.console.lines)


def test_hello_reports_vcpus_and_memory(firmware: FirmwareImage) -> None:
    vm, rc = run(firmware, "hello", memory=128 << 20, vcpus=3)
    try:
        assert rc == 0, console(vm)
        assert "hello from ptmig guest: 3 vCPUs, 128 MiB" in console(vm)
        assert all(s.valid for s in vm.vcpu_stats())  # every vCPU initialised its slot
    finally:
        vm.close()


def test_dirty_paced_by_halting_leaves_the_cpu(firmware: FirmwareImage) -> None:
    """rate=1 MiB/s is one page per 4 ms: spinning between pages burns the whole second,
    halting between them costs almost nothing, and both write the same pages."""
    cpu = {}
    for halt in (0, 1):
        before = resource.getrusage(resource.RUSAGE_SELF)
        vm, rc = run(firmware, f"dirty ws=64K rate=1 seconds=1 halt={halt}")
        after = resource.getrusage(resource.RUSAGE_SELF)
        try:
            assert rc == 0, console(vm)
            assert "pages written" in console(vm)
        finally:
            vm.close()
        cpu[halt] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu[1] < 0.5 * cpu[0], cpu


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("nosuch", 'unknown workload "nosuch"; known: hello dirty storebw kv'),
        ("dirty colour=blue", 'dirty: unknown key "colour"'),
        ("dirty ws=lots", "dirty: ws=lots is not valid"),
        ("dirty halt=2", "dirty: halt=2 is not valid"),
        ("dirty scatter=2", "dirty: scatter=2 is not valid"),
        ("dirty ws=1G", "dirty: ws=1073741824 bytes does not fit"),
        ("hello x", 'bad command line: argument is not key=value at "x"'),
        ("storebw size=0", "storebw: size=0 must be in [8,"),
    ],
)
def test_bad_command_line_exits_2_with_a_reason(
    firmware: FirmwareImage, cmdline: str, message: str
) -> None:
    vm, rc = run(firmware, cmdline)
    try:
        assert rc == 2
        assert message in console(vm)
    finally:
        vm.close()


def test_bad_boot_info_exits_3(firmware: FirmwareImage) -> None:
    vm = Vm(VmSpec(memory=64 << 20, vcpus=1, cmdline="hello"))
    try:
        vm.boot(firmware.data, firmware.entry, firmware.entry_ap)
        vm.memory.write_u64(ABI_BOOT_INFO_GPA, 0x1234)
        vm.start()
        assert vm.wait(20) == 3
        assert "boot_info magic is 0x1234" in console(vm)
    finally:
        vm.close()


@pytest.mark.parametrize(
    ("args", "ws"),
    [
        ("", 8 << 20),
        # a scattered order over shares of 768 pages (not a power of two: the walk skips)
        (" scatter=1", 6 << 20),
    ],
)
def test_dirty_ground_truth_matches_memory(firmware: FirmwareImage, args: str, ws: int) -> None:
    memory, vcpus = 64 << 20, 2
    vm, rc = run(firmware, f"dirty ws={ws >> 20}M seconds=1{args}", memory=memory, vcpus=vcpus)
    try:
        assert rc == 0, console(vm)
        magic, bitmap_gpa, bitmap_bytes, ws_gpa, ws_pages, passes = _DIRTY_REPORT.unpack(
            vm.memory.read(ABI_WORKLOAD_STATS_GPA, _DIRTY_REPORT.size)
        )
        assert magic == ABI["DIRTY_REPORT_MAGIC"]
        assert bitmap_gpa == ABI_HEAP_START_GPA
        assert bitmap_bytes == memory // PAGE_SIZE // 8
        assert ws_gpa % PAGE_SIZE == 0 and ws_gpa >= bitmap_gpa + bitmap_bytes
        assert ws_pages == ws // PAGE_SIZE
        assert passes >= 1

        # The bitmap holds exactly the working-set pages.
        bits = np.unpackbits(
            np.frombuffer(vm.memory.read(bitmap_gpa, bitmap_bytes), np.uint8), bitorder="little"
        )
        first = ws_gpa // PAGE_SIZE
        assert np.flatnonzero(bits).tolist() == list(range(first, first + ws_pages))

        # Every page holds pass + page index for the writing vCPU's last or current pass.
        stats = vm.vcpu_stats()
        words = np.frombuffer(vm.memory.read(ws_gpa, ws_pages * PAGE_SIZE), np.uint64)[::512]
        total = 0
        for s in stats:
            share_first, share_len = s.workload[1], s.workload[2]
            done = s.workload[0]
            assert share_len > 0 and s.pages_written == s.iterations
            total += s.pages_written
            rel = words[share_first : share_first + share_len].astype(np.int64) - np.arange(
                share_first, share_first + share_len
            )
            assert set(np.unique(rel).tolist()) <= {done - 1, done}, (s.cpu, done)
        assert sum(s.workload[2] for s in stats) == ws_pages
        assert f"dirty: {total} pages written" in console(vm)
    finally:
        vm.close()


def test_dirty_rate_is_paced(firmware: FirmwareImage) -> None:
    # 8 MiB/s for 2 s = 4096 pages at most: pacing caps the rate (unpaced, the same loop writes
    # hundreds of thousands of pages in 2 s). How far below the cap a loaded host leaves it
    # says nothing about pacing, so only "some, and never more than the cap" is checked.
    vm, rc = run(firmware, "dirty ws=4M rate=8 seconds=2", vcpus=2)
    try:
        assert rc == 0, console(vm)
        written = sum(s.pages_written for s in vm.vcpu_stats())
        assert 0 < written <= 4096 + 64, written
    finally:
        vm.close()


def test_dirty_max_gap_sees_a_pause(firmware: FirmwareImage) -> None:
    vm = Vm(VmSpec(memory=64 << 20, vcpus=1, cmdline="dirty ws=4M"))
    try:
        vm.boot(firmware.data, firmware.entry, firmware.entry_ap)
        vm.start()
        time.sleep(0.3)
        vm.pause()
        time.sleep(0.3)
        vm.resume()
        time.sleep(0.2)
        vm.pause()
        (s,) = vm.vcpu_stats()
        assert s.valid and s.pages_written > 0
        assert s.max_gap_tsc >= vm.tsc_khz * 250  # at least 250 ms of the 300 ms pause
    finally:
        vm.close()


def test_storebw_reports_bytes_and_ticks(firmware: FirmwareImage) -> None:
    vm, rc = run(firmware, "storebw size=4M passes=3")
    try:
        assert rc == 0, console(vm)
        magic, size, passes, nbytes, ticks, tsc_khz = _STOREBW_REPORT.unpack(
            vm.memory.read(ABI_WORKLOAD_STATS_GPA, _STOREBW_REPORT.size)
        )
        assert magic == ABI["STOREBW_REPORT_MAGIC"]
        assert (size, passes, nbytes) == (4 << 20, 3, 12 << 20)
        assert ticks > 0 and tsc_khz == vm.tsc_khz
        assert f"storebw: {12 << 20} bytes in {ticks} ticks" in console(vm)
        last = np.frombuffer(vm.memory.read(ABI_HEAP_START_GPA, 4 << 20), np.uint64)
        assert (last == (3 << 32) + np.arange(len(last), dtype=np.uint64)).all()
    finally:
        vm.close()
