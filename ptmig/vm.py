"""A virtual machine: KVM VM fd, guest RAM, vCPU threads, hypercalls, console, devices.

`Vm` assembles the pieces and is the exit bus of its vCPUs: port I/O for the console and
hypercalls, MMIO for device register windows (forwarded to the device process that owns them).
It knows nothing about migration beyond what any VMM offers: pause/resume, save/restore of vCPU
state, and the dirty set.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, TextIO

from . import boot
from .dirty import DirtyTracker, KvmDirtyLog
from .errors import PtmigError
from .kvm import Kvm
from .kvm.ioctls import KVM_MEM_LOG_DIRTY_PAGES
from .layout import (
    ABI_FW_LOAD_GPA,
    ABI_MAX_VCPUS,
    ABI_MMIO_BASE_GPA,
    ABI_MMIO_STRIDE,
    ABI_PORT_CONSOLE,
    ABI_PORT_HYPERCALL,
    ABI_STATS_SLOT_SIZE,
    ABI_WORKLOAD_STATS_GPA,
    HC_CONSOLE,
    HC_EXIT,
    HC_HALT,
    HC_HEARTBEAT,
    MAX_MEMORY,
    MIN_MEMORY,
    BootDevice,
    VcpuStats,
    mailbox_gpa,
    stats_gpa,
)
from .memory import GuestMemory, GuestMemoryError, check_host_memory
from .vcpu import RunControl, Vcpu, install_kick_handler
from .vcpu_state import VcpuState, saveable_msrs
from .vcpuloop import NativeLoopUnavailable, NativeRunLoop

log = logging.getLogger(__name__)

_MAILBOX = struct.Struct("<8Q")  # nr, args[6], ret


class RunState(Enum):
    """QEMU's run states, the subset ptmig uses (names match `query-status`)."""

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    POSTMIGRATE = "postmigrate"
    FINISH_MIGRATE = "finish-migrate"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"


class MmioDevice(Protocol):
    """What the VM needs from a device attached at a virtio-mmio window."""

    def mmio_read(self, offset: int, size: int) -> int: ...
    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


@dataclass
class VmSpec:
    memory: int
    vcpus: int
    cmdline: str
    name: str = "ptmig"


@dataclass
class ConsoleSink:
    """Where guest console output goes: a stream, plus the last lines kept for inspection."""

    stream: TextIO | None = None
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=1000))
    _partial: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, text: str) -> None:
        with self._lock:
            if self.stream is not None:
                self.stream.write(text)
                self.stream.flush()
            text = self._partial + text
            *done, self._partial = text.split("\n")
            self.lines.extend(done)


class VmError(PtmigError, RuntimeError):
    pass


class Vm:
    """One guest: create → (boot | restore) → start → ... → shutdown."""

    def __init__(
        self, spec: VmSpec, *, console: TextIO | None = None, kvm: Kvm | None = None
    ) -> None:
        if not MIN_MEMORY <= spec.memory <= MAX_MEMORY or spec.memory % (2 << 20):
            raise VmError(
                f"memory {spec.memory:#x} must be a multiple of 2 MiB in "
                f"[{MIN_MEMORY >> 20} MiB, {MAX_MEMORY >> 20} MiB]"
            )
        try:
            check_host_memory(spec.memory)
        except ValueError as e:
            raise VmError(str(e)) from None
        if not 1 <= spec.vcpus <= ABI_MAX_VCPUS:
            raise VmError(f"vcpus={spec.vcpus} must be in [1, {ABI_MAX_VCPUS}]")
        install_kick_handler()
        self.spec = spec
        self.kvm = kvm or Kvm()
        self.kvm.require_capabilities()
        self.vmfd = self.kvm.create_vm()
        self.memory = GuestMemory(spec.memory, name=f"{spec.name}-ram")
        slots = []
        for slot, r in enumerate(self.memory.regions):  # one memslot and dirty log per region
            self.vmfd.set_user_memory_region(
                slot, r.gpa, r.size, self.memory.host_address + r.gpa, KVM_MEM_LOG_DIRTY_PAGES
            )
            slots.append((slot, r.first_page, r.npages))
        self.dirty = DirtyTracker(KvmDirtyLog(self.vmfd, slots, self.memory.npages), self.memory)
        self.console = ConsoleSink(console)
        self.control = RunControl()
        self.vcpus: list[Vcpu] = []
        cpuid = self.kvm.supported_cpuid()
        for i in range(spec.vcpus):
            fd = self.vmfd.create_vcpu(i)
            fd.set_cpuid(_cpuid_for(cpuid, i))
            v = Vcpu(fd, self.control, self)
            self.vcpus.append(v)
        self.control.vcpus = self.vcpus
        self.tsc_khz = self.vcpus[0].fd.get_tsc_khz()
        self._msr_indices = saveable_msrs(self.vcpus[0].fd, self.kvm.msr_index_list())
        self.devices: dict[int, MmioDevice] = {}
        self.guest_wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wake_fds: list[int] = [self.guest_wake_fd]
        self.state = RunState.PRELAUNCH
        self.exit_code: int | None = None
        self.error: str | None = None
        self._finished = threading.Event()
        self._state_listeners: list[Callable[[RunState, RunState], None]] = []
        self._lock = threading.RLock()
        self.heartbeats = [0] * spec.vcpus
        self.unhandled_io = 0
        self._setup_native_halts()

    def _setup_native_halts(self) -> None:
        """Serve the vCPUs' halts in C (`ptmig.vcpuloop`) where the loop can be built, and
        mark the mailboxes it answers in dirty harvests; otherwise they stay in Python."""
        try:
            loops = [
                NativeRunLoop(
                    v.fd.fd,
                    v.kick_fd,
                    ctypes.addressof(v.fd.run_struct),
                    self.memory.host_address + mailbox_gpa(v.index),
                    ABI_PORT_HYPERCALL,
                    HC_HALT,
                    self.wake_fds,
                )
                for v in self.vcpus
            ]
        except NativeLoopUnavailable as e:
            log.warning("vCPU halts are served in Python: %s", e)
            return
        for v, loop in zip(self.vcpus, loops, strict=True):
            v.native = loop

        def mark_replies() -> None:
            for v, loop in zip(self.vcpus, loops, strict=True):
                if loop.replies_since_last():
                    self.memory.mark_dirty(mailbox_gpa(v.index), _MAILBOX.size)

        self.dirty.add_marker(mark_replies)

    # --- building the guest -------------------------------------------------------------

    def boot(
        self, firmware: bytes, entry: int, entry_ap: int, devices: list[BootDevice] | None = None
    ) -> None:
        """Lay out a fresh guest: page tables, GDT, boot info, firmware, vCPU registers."""
        boot.write_page_tables(self.memory)
        boot.write_gdt(self.memory)
        boot.write_boot_info(
            self.memory, self.spec.vcpus, self.tsc_khz, self.spec.cmdline, devices or []
        )
        self.memory.write(ABI_FW_LOAD_GPA, firmware)
        for v in self.vcpus:
            v.fd.set_sregs(boot.initial_sregs(v.fd.get_sregs()))
            v.fd.set_regs(boot.initial_regs(v.index, entry if v.index == 0 else entry_ap))

    def vcpu_thread_ids(self) -> list[int]:
        """The OS thread ids of the started vCPU threads (their CPU is the guest's)."""
        return [t for t in (v.thread.native_id for v in self.vcpus) if t is not None]

    def attach_device(self, index: int, device: MmioDevice) -> int:
        """Route the MMIO window of device `index` to `device`; returns the window's GPA."""
        self.devices[index] = device
        return ABI_MMIO_BASE_GPA + index * ABI_MMIO_STRIDE

    # --- run state ------------------------------------------------------------------------

    def on_state_change(self, listener: Callable[[RunState, RunState], None]) -> None:
        self._state_listeners.append(listener)

    def _set_state(self, new: RunState) -> None:
        with self._lock:
            old, self.state = self.state, new
        if old != new:
            for fn in self._state_listeners:
                try:
                    fn(old, new)
                except Exception:
                    log.exception("run-state listener failed")

    def start(self) -> None:
        """Start the vCPU threads and let the guest run."""
        for v in self.vcpus:
            if not v.thread.is_alive() and v.thread.ident is None:
                v.start()
        self.resume()

    def pause(self, new_state: RunState = RunState.PAUSED) -> float:
        """Stop all vCPUs; returns when none is in the guest. Returns seconds taken."""
        took = self.control.pause(timeout=5.0)
        if self.state not in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
            self._set_state(new_state)
        return took

    def resume(self) -> None:
        if self.state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
            raise VmError(f"cannot resume a guest in state {self.state.value}")
        self._set_state(RunState.RUNNING)
        self.control.resume()

    def set_throttle(self, pct: int) -> None:
        """Auto-converge: let the vCPUs run only (100 - pct)% of the time."""
        self.control.set_throttle(pct)

    @property
    def running(self) -> bool:
        return self.state == RunState.RUNNING

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the guest to exit; returns its exit code (None on timeout)."""
        if not self._finished.wait(timeout):
            return None
        return self.exit_code

    def shutdown(self, code: int = 0, reason: str = "host request") -> None:
        """Stop the guest for good."""
        with self._lock:
            if self._finished.is_set():
                return
            if self.exit_code is None:
                self.exit_code = code
        log.info("guest shutdown (%s), exit code %s", reason, self.exit_code)
        self.control.stop()
        self._set_state(RunState.SHUTDOWN)
        self._finished.set()

    def close(self) -> None:
        self.shutdown(reason="close")
        for v in self.vcpus:
            if v.thread.ident is not None:
                v.thread.join(timeout=2)
        for v in self.vcpus:
            v.fd.close()
        self.vmfd.close()
        try:
            self.memory.close()
        except BufferError:
            pass  # a view is still held somewhere; the mapping goes with the process

    # --- vCPU state -----------------------------------------------------------------------

    def save_vcpus(self) -> list[VcpuState]:
        if not self.control.paused:
            raise VmError("save_vcpus needs the vCPUs paused")
        return [VcpuState.save(v.fd, self._msr_indices, self.tsc_khz) for v in self.vcpus]

    def restore_vcpus(self, states: list[VcpuState]) -> None:
        if len(states) != len(self.vcpus):
            raise VmError(f"{len(states)} vCPU states for a VM with {len(self.vcpus)} vCPUs")
        for v, st in zip(self.vcpus, states, strict=True):
            st.restore(v.fd)

    # --- statistics the guest keeps --------------------------------------------------------

    def vcpu_stats(self) -> list[VcpuStats]:
        return [
            VcpuStats.unpack(i, self.memory.read(stats_gpa(i), ABI_STATS_SLOT_SIZE))
            for i in range(self.spec.vcpus)
        ]

    def workload_area(self, length: int = 2048) -> bytes:
        return self.memory.read(ABI_WORKLOAD_STATS_GPA, length)

    # --- the exit bus -----------------------------------------------------------------------

    def port_out(self, vcpu: Vcpu, port: int, size: int, value: int) -> None:
        if port == ABI_PORT_HYPERCALL:
            self._hypercall(vcpu, value)
        elif port == ABI_PORT_CONSOLE:
            self.console.write(chr(value & 0xFF))
        else:
            self.unhandled_io += 1

    def port_in(self, vcpu: Vcpu, port: int, size: int) -> int:
        self.unhandled_io += 1
        return (1 << (8 * size)) - 1

    def _device_at(self, gpa: int) -> tuple[MmioDevice | None, int]:
        index, offset = divmod(gpa - ABI_MMIO_BASE_GPA, ABI_MMIO_STRIDE)
        if gpa < ABI_MMIO_BASE_GPA:
            return None, 0
        return self.devices.get(index), offset

    def mmio_read(self, vcpu: Vcpu, gpa: int, size: int) -> int:
        dev, off = self._device_at(gpa)
        if dev is None:
            self.unhandled_io += 1
            return (1 << (8 * size)) - 1
        try:
            return dev.mmio_read(off, size)
        except Exception as e:  # a dead device must not take the VMM down
            log.warning("MMIO read %#x on a failed device: %s", gpa, e)
            return (1 << (8 * size)) - 1

    def mmio_write(self, vcpu: Vcpu, gpa: int, size: int, value: int) -> None:
        dev, off = self._device_at(gpa)
        if dev is None:
            self.unhandled_io += 1
            return
        try:
            dev.mmio_write(off, size, value)
        except Exception as e:
            log.warning("MMIO write %#x on a failed device: %s", gpa, e)

    def vcpu_failed(self, vcpu: Vcpu, reason: str) -> None:
        log.error("%s", reason)
        self.error = reason
        with self._lock:
            if self.exit_code is None:
                self.exit_code = 128
        self._set_state(RunState.INTERNAL_ERROR)
        self.control.stop()
        self._finished.set()

    # --- hypercalls -----------------------------------------------------------------------

    def _hypercall(self, vcpu: Vcpu, nr: int) -> None:
        mb = mailbox_gpa(vcpu.index)
        _, a0, a1, *_ = _MAILBOX.unpack(self.memory.read(mb, _MAILBOX.size))
        ret = 0
        if nr == HC_EXIT:
            self.exit_code = a0 & 0xFF
            self.shutdown(a0 & 0xFF, f"guest exit({a0})")
            return
        if nr == HC_HALT:
            timeout = a0 / 1e6 if a0 else None
            ret = 0 if vcpu.wait_for_wake(self.wake_fds, timeout) else 1
        elif nr == HC_CONSOLE:
            try:
                text = self.memory.read(a0, min(a1, 64 * 1024))
            except GuestMemoryError:
                ret = (1 << 64) - 1
            else:
                self.console.write(text.decode("ascii", "replace"))
                ret = len(text)
        elif nr == HC_HEARTBEAT:
            self.heartbeats[vcpu.index] = a0
        else:
            ret = (1 << 64) - 1
        self.memory.write_u64(mb + 7 * 8, ret)

    def wake_guest(self) -> None:
        """Wake halted vCPUs: a device interrupt, as the shadow engine delivers it."""
        os.eventfd_write(self.guest_wake_fd, 1)


def _cpuid_for(entries: list[Any], cpu: int) -> list[Any]:
    """KVM's supported CPUID with this vCPU's APIC id in leaves 1 and 0xB."""
    out = []
    for e in entries:
        e = type(e).from_buffer_copy(e)
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (cpu << 24)
        elif e.function == 0xB:
            e.edx = cpu
        out.append(e)
    return out
