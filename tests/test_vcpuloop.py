"""The guest's halt served in C (`ptmig.vcpuloop`): without the GIL, replies marked dirty,
and a halted vCPU still pauses."""

from __future__ import annotations

import ctypes
import time

import pytest

from ptmig import bitmap
from ptmig.layout import PAGE_SIZE, mailbox_gpa
from ptmig.vm import Vm, VmSpec

pytestmark = pytest.mark.kvm

ENTRY = 0x200000
COUNTER_GPA = 0x300000
MAILBOX = mailbox_gpa(0)
RET_GPA = MAILBOX + 7 * 8  # nr, args[6], ret
NO_REPLY = (1 << 64) - 1

# halt(1 ms) then count, forever
HALT_AND_COUNT = bytes.fromhex(
    "48C7042508900000E8030000"  # mov qword [0x9008], 1000   (args[0]: timeout, us)
    "BA00050000B802000000EF"  # mov edx, 0x500; mov eax, HC_HALT; out dx, eax
    "48FF042500003000"  # inc qword [0x300000]
    "EBDF"  # jmp to the top
)

# ret = -1, halt with no timeout, then spin without writing anything
HALT_ONCE = bytes.fromhex(
    "48C7042538900000FFFFFFFF"  # mov qword [0x9038], -1  (ret: no reply yet)
    "48C704250890000000000000"  # mov qword [0x9008], 0   (args[0]: no timeout)
    "BA00050000B802000000EF"  # mov edx, 0x500; mov eax, HC_HALT; out dx, eax
    "EBFE"  # jmp $
)

# the same with the largest timeout a guest can ask for (args[0] = 2**64 - 1 us)
HALT_FOREVER = bytes.fromhex(
    "48C7042538900000FFFFFFFF"  # mov qword [0x9038], -1  (ret: no reply yet)
    "48C7042508900000FFFFFFFF"  # mov qword [0x9008], -1  (args[0]: 2**64 - 1 us)
    "BA00050000B802000000EF"  # mov edx, 0x500; mov eax, HC_HALT; out dx, eax
    "EBFE"  # jmp $
)


def start_vm(code: bytes) -> Vm:
    vm = Vm(VmSpec(memory=16 << 20, vcpus=1, cmdline="x"))
    vm.boot(code, ENTRY, ENTRY)
    assert vm.vcpus[0].native is not None, "the native vCPU loop is not in use"
    vm.start()
    return vm


def wait_until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


def dirty(bm: bitmap.Bitmap, page: int) -> bool:
    return bool(int(bm[page >> 6]) >> (page & 63) & 1)


def hold_gil(seconds: float) -> None:
    """Sleep in C with the GIL held (a PyDLL call does not release it)."""
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))


def test_halts_are_served_while_python_holds_the_gil() -> None:
    vm = start_vm(HALT_AND_COUNT)
    try:
        wait_until(lambda: vm.memory.read_u64(COUNTER_GPA) > 3, "the guest halts and counts")
        before = vm.memory.read_u64(COUNTER_GPA)
        hold_gil(0.3)  # ~270 halts of 1 ms fit; served in Python, not one could finish
        during = vm.memory.read_u64(COUNTER_GPA) - before
        assert during > 10, f"{during} halts ended while the GIL was held"
        assert vm.state.value == "running" and vm.error is None
    finally:
        vm.close()
    assert vm.vcpus[0].counters.halts >= during


def test_a_halt_reply_is_in_the_next_dirty_harvest() -> None:
    # KVM's log does not see the reply the VMM writes into the mailbox; the harvest must.
    vm = start_vm(HALT_ONCE)
    page = MAILBOX // PAGE_SIZE
    try:
        wait_until(lambda: vm.memory.read_u64(RET_GPA) == NO_REPLY, "the guest wrote its mailbox")
        time.sleep(0.2)  # the OUT follows at once
        vm.dirty.harvest()
        quiet = vm.dirty.harvest()
        assert not dirty(quiet, page), "the guest is not halted yet (its mailbox changed)"
        assert vm.memory.read_u64(RET_GPA) == NO_REPLY
        vm.wake_guest()
        wait_until(lambda: vm.memory.read_u64(RET_GPA) == 0, "the halt's reply (woken)")
        assert dirty(vm.dirty.harvest(), page), "the reply's page was not harvested"
    finally:
        vm.close()


def _pause_resume_and_wake(vm: Vm) -> None:
    """Pause a halted guest (its kick ends the wait), resume it, wake it with an interrupt,
    and see the halt's reply with no VMM error."""
    vm.pause()
    assert vm.control.paused
    vm.resume()
    vm.wake_guest()
    wait_until(lambda: vm.memory.read_u64(RET_GPA) == 0, "the halt's reply after a wake")
    assert vm.error is None


def test_a_vcpu_halted_without_timeout_pauses_and_resumes() -> None:
    vm = start_vm(HALT_ONCE)
    try:
        wait_until(lambda: vm.memory.read_u64(RET_GPA) == NO_REPLY, "the guest wrote its mailbox")
        time.sleep(0.2)
        _pause_resume_and_wake(vm)  # the kick must end the wait in C, or this times out
    finally:
        vm.close()


def test_a_halt_with_the_largest_timeout_a_guest_can_give_waits_and_stays_controllable() -> None:
    """Guest-controlled: any timeout is accepted; the halt waits (no reply, no VMM error), a
    pause still ends it, and a device interrupt still wakes the guest."""
    vm = start_vm(HALT_FOREVER)
    try:
        wait_until(lambda: vm.memory.read_u64(RET_GPA) == NO_REPLY, "the guest wrote its mailbox")
        time.sleep(0.3)
        assert vm.memory.read_u64(RET_GPA) == NO_REPLY  # still halted: not an error return
        assert vm.error is None
        _pause_resume_and_wake(vm)
    finally:
        vm.close()


def test_without_the_native_loop_python_serves_the_halts() -> None:
    # (where native/vcpuloop.c cannot be built the VM leaves `native` unset)
    vm = Vm(VmSpec(memory=16 << 20, vcpus=1, cmdline="x"))
    vm.boot(HALT_AND_COUNT, ENTRY, ENTRY)
    vm.vcpus[0].native = None
    vm.start()
    try:
        wait_until(lambda: vm.memory.read_u64(COUNTER_GPA) > 20, "the guest halts and counts")
        assert vm.vcpus[0].counters.halts > 20
    finally:
        vm.close()
