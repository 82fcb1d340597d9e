"""vCPU threads: one thread per vCPU running KVM_RUN, exit dispatch, and the pause handshake.

Pausing is race-free by construction: `RunControl.pause()` sets `immediate_exit` in every
vCPU's `kvm_run` page under the same lock the vCPU thread holds while it clears it, then sends
the thread a signal. Whatever the thread was doing — about to enter KVM_RUN, inside it, or
handling an exit in Python — it comes out of the guest and parks before `pause()` returns. An
I/O or MMIO exit that was being handled is completed first (KVM finishes the instruction on the
next KVM_RUN, which returns at once because `immediate_exit` is set), so a paused vCPU's state
is always consistent and can be saved.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .kvm import Exit, KvmError, VcpuFd
from .kvm.ioctls import KVM_EXIT_IO_OUT
from .vcpuloop import KICKED, NativeRunLoop

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
THROTTLE_PERIOD_S = 0.01


def install_kick_handler() -> None:
    """Make the kick signal non-fatal; it only needs to interrupt KVM_RUN (EINTR).

    Python only lets the main thread install handlers, so the VMM calls this at start-up.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    elif signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        raise RuntimeError(
            f"{KICK_SIGNAL.name} has no handler and this is not the main thread: create the "
            "first VM from the main thread (or call install_kick_handler() there)"
        )


class ExitBus(Protocol):
    """Where a vCPU sends the exits it cannot handle itself (the VM implements it)."""

    def port_out(self, vcpu: Vcpu, port: int, size: int, value: int) -> None: ...
    def port_in(self, vcpu: Vcpu, port: int, size: int) -> int: ...
    def mmio_read(self, vcpu: Vcpu, gpa: int, size: int) -> int: ...
    def mmio_write(self, vcpu: Vcpu, gpa: int, size: int, value: int) -> None: ...
    def vcpu_failed(self, vcpu: Vcpu, reason: str) -> None: ...


@dataclass
class ExitCounters:
    io: int = 0
    mmio: int = 0
    intr: int = 0
    halts: int = 0


class RunControl:
    """The pause/resume/stop state shared by all vCPUs of one VM."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pause_requested = True  # vCPUs start parked until the VM is started
        self.stopping = False
        self.parked = 0
        self.vcpus: list[Vcpu] = []
        self.throttle_pct = 0
        self._throttle_thread: threading.Thread | None = None

    def pause(self, timeout: float = 5.0) -> float:
        """Bring every vCPU out of the guest; returns the seconds it took."""
        t0 = time.perf_counter()
        with self.cond:
            self.pause_requested = True
            for v in self.vcpus:
                v.fd.run_struct.immediate_exit = 1
        for v in self.vcpus:
            v.kick()
        with self.cond:
            ok = self.cond.wait_for(
                lambda: self.parked == len([v for v in self.vcpus if v.alive]), timeout
            )
        if not ok:
            raise TimeoutError(f"vCPUs did not leave the guest within {timeout}s")
        return time.perf_counter() - t0

    def resume(self) -> None:
        with self.cond:
            self.pause_requested = False
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.pause_requested = True
            for v in self.vcpus:
                v.fd.run_struct.immediate_exit = 1
            self.cond.notify_all()
        for v in self.vcpus:
            v.kick()

    def set_throttle(self, pct: int) -> None:
        """Throttle the vCPUs to (100 - pct)% of their time; 0 turns throttling off."""
        if not 0 <= pct <= 99:
            raise ValueError(f"throttle percentage must be in [0, 99], got {pct}")
        with self.cond:
            self.throttle_pct = pct
            start = pct > 0 and self._throttle_thread is None
            if start:
                self._throttle_thread = threading.Thread(
                    target=self._throttle_loop, name="cpu-throttle", daemon=True
                )
        if start and self._throttle_thread is not None:
            self._throttle_thread.start()

    def _throttle_loop(self) -> None:
        while True:
            with self.cond:
                if self.throttle_pct == 0 or self.stopping:
                    self._throttle_thread = None
                    return
            for v in self.vcpus:
                if v.thread.ident is not None and v.alive:
                    try:
                        signal.pthread_kill(v.thread.ident, KICK_SIGNAL)
                    except ProcessLookupError:
                        pass
            time.sleep(THROTTLE_PERIOD_S)

    @property
    def paused(self) -> bool:
        with self.cond:
            return self.pause_requested and self.parked == len([v for v in self.vcpus if v.alive])


class Vcpu:
    """One vCPU: its KVM fd, its thread, and the exit loop."""

    def __init__(self, fd: VcpuFd, control: RunControl, bus: ExitBus) -> None:
        self.fd = fd
        self.index = fd.index
        self.control = control
        self.bus = bus
        self.counters = ExitCounters()
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self.alive = True
        self._pending_completion = False
        # Set by the VM where the native loop is available: halts are then served in C.
        self.native: NativeRunLoop | None = None

    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        """Interrupt KVM_RUN (signal) or a halt wait (eventfd)."""
        os.eventfd_write(self.kick_fd, 1)
        if self.thread.ident is not None and self.thread.is_alive():
            try:
                signal.pthread_kill(self.thread.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def kick_halt(self) -> None:
        """Make a halt wait return (and re-read the VM's wake sources); no signal."""
        os.eventfd_write(self.kick_fd, 1)

    def drain_kick(self) -> None:
        try:
            os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            pass

    # --- the thread ------------------------------------------------------------------------

    def _park_if_requested(self) -> bool:
        """Wait while paused. Returns False when the VM is stopping."""
        ctl = self.control
        if (
            not ctl.pause_requested
            and not ctl.stopping
            and not self._pending_completion
            and not self.fd.run_struct.immediate_exit
        ):
            # Fast path, no lock: pause() sets immediate_exit under the lock before kicking, so
            # a stale read here costs one KVM_RUN that returns at once.
            return True
        with ctl.cond:
            if ctl.pause_requested and not self._pending_completion:
                ctl.parked += 1
                ctl.cond.notify_all()
                while ctl.pause_requested and not ctl.stopping:
                    ctl.cond.wait()
                ctl.parked -= 1
            if ctl.stopping:
                return False
            if not ctl.pause_requested:
                self.fd.run_struct.immediate_exit = 0
        return True

    def _main(self) -> None:
        try:
            self._loop()
        except Exception as e:  # the VMM must survive a vCPU's death and say why
            log.exception("vCPU %d died", self.index)
            self.bus.vcpu_failed(self, f"vCPU {self.index} thread crashed: {e!r}")
        finally:
            with self.control.cond:
                self.alive = False
                self.control.cond.notify_all()

    def _loop(self) -> None:
        run = self.fd.run_struct
        while True:
            if not self._park_if_requested():
                return
            try:
                if self._run_native():
                    # a halt ended by a kick: its OUT completes on the next KVM_RUN, after
                    # the pause request and the wake sources have been looked at again
                    self._pending_completion = True
                    continue
            except KvmError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN):
                    self.counters.intr += 1
                    self._pending_completion = False
                    self._throttle_sleep()
                    continue
                raise
            self._pending_completion = False
            reason = run.exit_reason
            if reason == Exit.IO:
                self._pending_completion = True
                self._handle_io(run)
            elif reason == Exit.MMIO:
                self._pending_completion = True
                self._handle_mmio(run)
            elif reason == Exit.INTR:
                continue
            else:
                self.bus.vcpu_failed(self, self._describe_exit(reason))
                with self.control.cond:
                    self.control.pause_requested = True
                return

    def _run_native(self) -> bool:
        """KVM_RUN, with the guest's halts served in C where the native loop is set up (GIL
        released from one exit for Python to the next). True: a halt was ended by a kick
        (nothing for `_loop` to dispatch); False: kvm_run holds an exit. Raises KvmError."""
        native = self.native
        rc = None if native is None else native.run()
        if rc is None:
            self.fd.run()
            return False
        assert native is not None
        halts = native.take_halts()
        if halts:
            self.counters.halts += halts
        if rc < 0:
            raise KvmError("RUN", -rc)
        return rc == KICKED

    def _throttle_sleep(self) -> None:
        """Auto-converge: give up a share of each throttle period (QEMU's cpu-throttle)."""
        pct = self.control.throttle_pct
        if pct > 0 and not self.control.pause_requested:
            self.kick_wait(THROTTLE_PERIOD_S * pct / (100 - pct))

    def kick_wait(self, seconds: float) -> None:
        """Sleep, but wake early when kicked (a pause must not wait for a throttle slice)."""
        r, _, _ = select.select([self.kick_fd], [], [], seconds)
        if r:
            self.drain_kick()

    def _handle_io(self, run: object) -> None:
        io = self.fd.run_struct.exit.io
        self.counters.io += 1
        off = io.data_offset
        size = io.size
        buf = self.fd.run_map
        if io.count != 1:
            self.bus.vcpu_failed(self, f"string port I/O (count={io.count}) on port {io.port:#x}")
            return
        if io.direction == KVM_EXIT_IO_OUT:
            value = int.from_bytes(buf[off : off + size], "little")
            self.bus.port_out(self, io.port, size, value)
        else:
            value = self.bus.port_in(self, io.port, size)
            buf[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _handle_mmio(self, run: object) -> None:
        mmio = self.fd.run_struct.exit.mmio
        self.counters.mmio += 1
        size = mmio.len
        if size not in (1, 2, 4, 8):
            self.bus.vcpu_failed(self, f"MMIO access of {size} bytes at {mmio.phys_addr:#x}")
            return
        if mmio.is_write:
            value = int.from_bytes(bytes(mmio.data)[:size], "little")
            self.bus.mmio_write(self, mmio.phys_addr, size, value)
        else:
            value = self.bus.mmio_read(self, mmio.phys_addr, size)
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(8, "little")
            for i in range(8):
                mmio.data[i] = data[i]

    def _describe_exit(self, reason: int) -> str:
        run = self.fd.run_struct
        try:
            regs = self.fd.get_regs()
            where = f"rip={regs.rip:#x} rsp={regs.rsp:#x} rflags={regs.rflags:#x}"
        except KvmError as e:
            where = f"(registers unavailable: {e})"
        try:
            name = Exit(reason).name
        except ValueError:
            name = f"exit reason {reason}"
        detail = ""
        if reason == Exit.FAIL_ENTRY:
            fe = run.exit.fail_entry
            detail = f" hardware_entry_failure_reason={fe.hardware_entry_failure_reason:#x}"
        elif reason == Exit.INTERNAL_ERROR:
            ie = run.exit.internal
            data = ", ".join(f"{run.exit.internal.data[i]:#x}" for i in range(min(ie.ndata, 16)))
            detail = f" suberror={ie.suberror} data=[{data}]"
        elif reason == Exit.SHUTDOWN:
            detail = " (triple fault: the guest faulted with no IDT)"
        return f"vCPU {self.index}: KVM_EXIT_{name}{detail} at {where}"

    # --- halting (called by the VM's hypercall handler, on this thread) --------------------

    def wait_for_wake(self, fds: list[int], timeout: float | None) -> bool:
        """Block until one of `fds` (device interrupts) fires, a kick, or the timeout.

        Returns True when woken (interrupt or kick), False on timeout.
        """
        self.counters.halts += 1
        if self.control.pause_requested:
            return True
        r, _, _ = select.select([*fds, self.kick_fd], [], [], timeout)
        for fd in r:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        return bool(r)


WakeSource = Callable[[], list[int]]
