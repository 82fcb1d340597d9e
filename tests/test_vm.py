"""The VMM core on real KVM: boot, exit codes, pause, dirty tracking, save/restore."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ptmig import bitmap
from ptmig.layout import ABI_WORKLOAD_STATS_GPA, PAGE_SIZE
from ptmig.vm import RunState, Vm, VmSpec

pytestmark = pytest.mark.kvm


def make_vm(firmware, cmdline: str, *, memory: int = 64 << 20, vcpus: int = 1) -> Vm:
    vm = Vm(VmSpec(memory=memory, vcpus=vcpus, cmdline=cmdline))
    vm.boot(firmware.data, firmware.entry, firmware.entry_ap)
    return vm


def test_hello_exits_zero_and_prints(firmware) -> None:
    vm = make_vm(firmware, "hello", vcpus=2)
    try:
        vm.start()
        assert vm.wait(20) == 0
        assert vm.state == RunState.SHUTDOWN
        assert any("hello from ptmig guest: 2 vCPUs, 64 MiB" in line for line in vm.console.lines)
    finally:
        vm.close()


def test_exit_code_is_the_guests(firmware) -> None:
    # A hand-assembled guest: exit(7) through the hypercall mailbox of vCPU 0.
    code = bytes.fromhex(
        "48C704250890000007000000"  # mov qword [0x9008], 7   (mailbox args[0])
        "BA00050000B801000000EF"  # mov edx, 0x500; mov eax, HC_EXIT; out dx, eax
        "EBFE"
    )
    vm = Vm(VmSpec(memory=16 << 20, vcpus=1, cmdline="x"))
    try:
        vm.boot(code, 0x200000, 0x200000)
        vm.start()
        assert vm.wait(10) == 7
    finally:
        vm.close()


def test_guest_fault_is_reported_with_rip(firmware) -> None:
    code = bytes.fromhex("0F0B")  # ud2: no IDT, so the guest triple-faults
    vm = Vm(VmSpec(memory=16 << 20, vcpus=1, cmdline="x"))
    try:
        vm.boot(code, 0x200000, 0x200000)
        vm.start()
        assert vm.wait(10) == 128
        assert vm.state == RunState.INTERNAL_ERROR
        assert vm.error is not None and "SHUTDOWN" in vm.error and "rip=0x200000" in vm.error
    finally:
        vm.close()


def test_pause_brings_every_vcpu_out_and_resume_continues(firmware) -> None:
    vm = make_vm(firmware, "dirty ws=8M", vcpus=2)
    try:
        vm.start()
        time.sleep(0.3)
        took = vm.pause()
        assert vm.control.paused and took < 1.0
        before = [s.iterations for s in vm.vcpu_stats()]
        time.sleep(0.2)
        assert [s.iterations for s in vm.vcpu_stats()] == before, "a paused guest advanced"
        vm.resume()
        time.sleep(0.3)
        after = [s.iterations for s in vm.vcpu_stats()]
        assert all(a > b for a, b in zip(after, before, strict=True))
    finally:
        vm.close()


def _dirty_report(vm: Vm) -> tuple[int, int]:
    raw = vm.memory.read(ABI_WORKLOAD_STATS_GPA, 24)
    magic, bitmap_gpa, bitmap_bytes = struct.unpack_from("<QQQ", raw)
    assert magic == 0x3150525954524944, "dirty workload did not publish its report"
    return bitmap_gpa, bitmap_bytes


def test_dirty_harvest_contains_every_page_the_guest_wrote(firmware) -> None:
    vm = make_vm(firmware, "dirty ws=16M", vcpus=2)
    try:
        vm.start()
        time.sleep(0.3)
        vm.pause()
        gpa, nbytes = _dirty_report(vm)
        vm.memory.write(gpa, bytes(nbytes))  # reset the guest's ground truth
        vm.dirty.harvest()  # and our log
        vm.resume()
        time.sleep(0.3)
        vm.pause()
        harvested = bitmap.to_bool(vm.dirty.harvest(), vm.memory.npages)
        truth_bytes = np.frombuffer(vm.memory.read(gpa, nbytes), dtype=np.uint8)
        truth = np.unpackbits(truth_bytes, bitorder="little")[: vm.memory.npages].astype(bool)
        assert truth.sum() > 1000, "the workload wrote too little to prove anything"
        missing = np.flatnonzero(truth & ~harvested)
        assert missing.size == 0, f"pages written by the guest but not harvested: {missing[:16]}"
    finally:
        vm.close()


def test_device_style_write_is_invisible_to_kvm_but_vmm_writes_are_tracked(firmware) -> None:
    vm = make_vm(firmware, "hello")
    page = 3000
    try:
        vm.dirty.harvest()
        # Another process writes guest RAM through the memfd, as a passthrough device does.
        script = textwrap.dedent(f"""
            import mmap, os
            m = mmap.mmap({vm.memory.fd}, {vm.memory.size}, mmap.MAP_SHARED)
            m[{page * PAGE_SIZE}:{page * PAGE_SIZE + 4}] = b"DMA!"
        """)
        subprocess.run([sys.executable, "-c", script], check=True, pass_fds=[vm.memory.fd])
        assert vm.memory.read(page * PAGE_SIZE, 4) == b"DMA!"
        assert not bitmap.to_bool(vm.dirty.harvest(), vm.memory.npages)[page]
        vm.memory.write(page * PAGE_SIZE, b"VMM!")
        assert bitmap.to_bool(vm.dirty.harvest(), vm.memory.npages)[page]
    finally:
        vm.close()


RESTORE_CHILD = """
import sys, time
from pathlib import Path
from ptmig.snapshot import load_snapshot
from ptmig.vm import Vm, VmSpec
vm = Vm(VmSpec(memory={memory}, vcpus={vcpus}, cmdline="restored"))
load_snapshot(vm, Path(sys.argv[1]))
before = [s.iterations for s in vm.vcpu_stats()]
vm.start()
time.sleep(0.5)
vm.pause()
after = [s.iterations for s in vm.vcpu_stats()]
print("BEFORE", *before)
print("AFTER", *after)
print("STATE", vm.state.value, vm.error)
vm.close()
"""


def test_save_and_restore_in_a_new_process_continues_the_guest(firmware, tmp_path: Path) -> None:
    from ptmig.snapshot import save_snapshot

    memory, vcpus = 64 << 20, 2
    vm = make_vm(firmware, "dirty ws=8M", memory=memory, vcpus=vcpus)
    try:
        vm.start()
        time.sleep(0.3)
        vm.pause()
        saved = [s.iterations for s in vm.vcpu_stats()]
        snap = tmp_path / "vm.snap"
        save_snapshot(vm, snap)
    finally:
        vm.close()
    out = subprocess.run(
        [sys.executable, "-c", RESTORE_CHILD.format(memory=memory, vcpus=vcpus), str(snap)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.stdout.splitlines() if ln}
    assert [int(x) for x in lines["BEFORE"]] == saved
    assert all(int(a) > int(b) for a, b in zip(lines["AFTER"], lines["BEFORE"], strict=True))
    assert lines["STATE"][0] == "paused", out.stdout


def test_msrs_are_written_and_read_back_and_a_read_stops_at_the_first_unknown_msr() -> None:
    vm = Vm(VmSpec(memory=16 << 20, vcpus=1, cmdline="x"))
    try:
        fd = vm.vcpus[0].fd
        sysenter = [(0x174, 0x10), (0x175, 0xFFFF_8000_0000_1000), (0x176, 0xFFFF_8000_0000_2000)]
        assert fd.set_msrs(sysenter) == 3
        assert fd.get_msrs([0x174, 0x175, 0x176]) == sysenter
        # 0xC0000000 is no MSR: KVM reads the ones before it and stops there
        assert fd.get_msrs([0x175, 0xC000_0000, 0x174]) == [sysenter[1]]
    finally:
        vm.close()


def test_the_restore_sets_the_saved_cpuid_where_the_vcpu_has_another(firmware) -> None:
    """The restore skips SET_CPUID2 only when KVM already reports the saved entries: a vCPU
    created with other entries gets the saved ones."""
    src = make_vm(firmware, "dirty ws=4K rate=1 halt=1")
    dst = Vm(VmSpec(memory=64 << 20, vcpus=1, cmdline="x"))
    try:
        src.start()
        time.sleep(0.2)
        src.pause()
        (state,) = src.save_vcpus()
        fd = dst.vcpus[0].fd
        assert fd.cpuid == state.cpuid  # created as the source was: nothing to set
        leaf0 = state.cpuid[:40]  # leaf 0 (vendor, highest leaf) alone: another CPUID
        fd.set_cpuid_raw(leaf0)
        assert fd.get_cpuid_raw() == leaf0 and fd.cpuid == leaf0
        dst.restore_vcpus([state])
        assert fd.get_cpuid_raw() == state.cpuid and fd.cpuid == state.cpuid
    finally:
        src.close()
        dst.close()
