"""The shadow engine: enter and leave shadow mode, and the thread that services trapped
doorbells and device interrupts for every device of a VM.

Entering (before round 0; each device keeps running except for a short quiesce):
  1. trap the doorbells: the device's ioeventfds are unbound from QueueNotify and the VMM's own
     are bound in their place; route the device's interrupt eventfd to this engine;
  2. quiesce the device and read its queue positions;
  3. shadow the rings, point the IOMMU domain at device buffers only, forward the requests the
     guest made available meanwhile, invalidate the IOTLB, mark in-flight device-writable pages
     dirty, resume.
Leaving (a cancelled or failed migration): quiesce, sync every completion, restore the identity
map, invalidate, set the device's queue positions to match the guest's rings (so requests that
were forwarded but not completed are redone from the guest's own ring), restore direct doorbells
and interrupts, resume. Outside shadow mode nothing here runs: zero steady-state overhead.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any

from ..devices.attach import bind_doorbells
from ..devices.virtio.constants import (
    REG_CONFIG,
    REG_INTERRUPT_ACK,
    REG_QUEUE_NOTIFY,
    REG_STATUS,
)
from .device import ShadowedDevice

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)

POLL_S = 0.05  # safety net: look at the used rings even without an interrupt


class ShadowEngine:
    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.devices: dict[str, ShadowedDevice] = {}
        self._doorbells: dict[int, tuple[ShadowedDevice, int]] = {}  # our eventfd -> (dev, q)
        self._irqs: dict[int, ShadowedDevice] = {}
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.active = False
        self.entered_at: float | None = None

    # --- entering ------------------------------------------------------------------------------

    def enter(self) -> None:
        vm = self.m.vm
        with self._lock:
            for dev in self.m.devices:
                sd = ShadowedDevice(dev, self.m.shadow_pool, vm.memory)
                self.devices[dev.id] = sd
                self._trap(sd)
                dev.handle.quiesce()
                sd.build(dev.handle.get_state())
                for qi in list(sd.queues):
                    sd.submit(qi)
                dev.handle.iotlb_invalidate()
                sd.map.invalidated()
                sd.stats.iotlb_invalidations += 1
                for gpfn in sd.inflight_writable_pages():
                    vm.memory.mark_dirty(gpfn << 12, 4096)
                dev.handle.resume()
                for qi in sd.queues:
                    dev.handle.kick(qi)
            self.active = True
            self.entered_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="shadow-engine", daemon=True)
        self._thread.start()
        self._check_broken()

    def _trap(self, sd: ShadowedDevice) -> None:
        dev = sd.dev
        vm = self.m.vm
        dev.mmio_hook = lambda off, size, value: self._on_mmio_write(sd, off, size, value)
        bind_doorbells(self.m, dev, deassign=True)
        sd.vmm_doorbells = {}
        addr = dev.mmio_base + REG_QUEUE_NOTIFY
        for q in dev.handle.doorbell_eventfds:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            vm.vmfd.ioeventfd(fd, addr, 4, datamatch=q)
            sd.vmm_doorbells[q] = fd
            self._doorbells[fd] = (sd, q)
        irq = dev.handle.irq_eventfd
        if irq in vm.wake_fds:
            vm.wake_fds.remove(irq)
        self._irqs[irq] = sd
        for v in vm.vcpus:  # a vCPU halted on the old list must not swallow the interrupt
            v.kick_halt()

    def _on_mmio_write(self, sd: ShadowedDevice, offset: int, size: int, value: int) -> bool:
        """A register write trapped while shadowing. Returns True if it was consumed here."""
        if offset == REG_QUEUE_NOTIFY:
            fd = sd.vmm_doorbells.get(value)
            if fd is not None:
                os.eventfd_write(fd, 1)
            return True
        if offset == REG_STATUS and value != 0 and sd.mmio is not None:
            sd.mmio["status"] = value
            return False
        if offset == REG_INTERRUPT_ACK or offset >= REG_CONFIG:
            return False
        # Feature, queue or reset writes would change what the device buffers describe.
        sd.fail(f"the driver reconfigured the device while shadowed (register {offset:#x} "
                f"<- {value:#x})")
        return False

    # --- the service thread -------------------------------------------------------------------

    def _loop(self) -> None:
        vm = self.m.vm
        while True:
            fds = [self._stop_r, *self._doorbells, *self._irqs]
            try:
                ready, _, _ = select.select(fds, [], [], POLL_S)
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            with self._lock:
                if not self.active:
                    return
                kicks: dict[ShadowedDevice, set[int]] = {}
                for fd in ready:
                    _drain(fd)
                    if fd in self._doorbells:
                        sd, q = self._doorbells[fd]
                        if sd.submit(q):
                            kicks.setdefault(sd, set()).add(q)
                synced = 0
                for sd in self.devices.values():  # every wakeup: cheap, and nothing is missed
                    synced += sd.complete()
                for sd, queues in kicks.items():
                    self._publish(sd, queues)
            if synced:
                vm.wake_guest()

    def _publish(self, sd: ShadowedDevice, queues: set[int]) -> None:
        """Make new device buffers visible to the device, then ring its doorbells."""
        try:
            if sd.map.dirty_mappings:
                sd.dev.handle.iotlb_invalidate()
                sd.map.invalidated()
                sd.stats.iotlb_invalidations += 1
            for q in queues:
                sd.dev.handle.kick(q)
        except Exception as e:
            sd.fail(f"device did not take the forwarded requests: {e}")

    def _stop_thread(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=5)
            self._thread = None

    def _check_broken(self) -> None:
        broken = [f"{sd.dev.id}: {sd.broken}" for sd in self.devices.values() if sd.broken]
        if broken:
            raise ShadowFailed("; ".join(broken))

    def check(self) -> None:
        """Raise if shadowing failed for any device (the migration must then fail)."""
        self._check_broken()

    # --- switchover and leaving ---------------------------------------------------------------

    def stop_and_sync(self) -> None:
        """vCPUs are paused: stop forwarding, let each device finish, sync every completion."""
        self._stop_thread()
        with self._lock:
            for sd in self.devices.values():
                sd.dev.handle.quiesce()
                sd.complete()
        self._check_broken()

    def leave(self) -> None:
        """Back to direct DMA (after a cancelled or failed migration)."""
        self._stop_thread()
        vm = self.m.vm
        with self._lock:
            for sd in self.devices.values():
                dev = sd.dev
                if not dev.handle.alive:
                    continue
                try:
                    dev.handle.quiesce()
                    sd.complete()
                    state = dev.handle.get_state()
                    positions = {sq.index: sq.snapshot() for sq in sd.queues.values()}
                    for q in state["queues"]:
                        if q["index"] in positions:
                            p = positions[q["index"]]
                            q["next_avail"], q["next_used"] = p.next_avail, p.next_used
                    sd.release()
                    dev.iommu.map_identity(vm.memory.npages, writable=True)
                    dev.handle.iotlb_invalidate()
                    sd.map.invalidated()
                    dev.handle.set_state(state)
                finally:
                    self._untrap(sd)
                dev.handle.resume()
            self.active = False

    def finish(self) -> None:
        """The destination runs the guest: this side stops servicing (devices stay quiesced)."""
        self._stop_thread()
        with self._lock:
            self.active = False

    def _untrap(self, sd: ShadowedDevice) -> None:
        dev = sd.dev
        vm = self.m.vm
        addr = dev.mmio_base + REG_QUEUE_NOTIFY
        for q, fd in sd.vmm_doorbells.items():
            try:
                vm.vmfd.ioeventfd(fd, addr, 4, datamatch=q, deassign=True)
            finally:
                self._doorbells.pop(fd, None)
                os.close(fd)
        sd.vmm_doorbells = {}
        bind_doorbells(self.m, dev)
        dev.mmio_hook = None
        irq = dev.handle.irq_eventfd
        self._irqs.pop(irq, None)
        if irq not in vm.wake_fds:
            vm.wake_fds.append(irq)

    # --- visibility -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        per = {sd.dev.id: sd for sd in self.devices.values()}
        total: dict[str, Any] = {
            "shadowed-pages": sum(len(sd.map.pages) for sd in per.values()),
            "idle-device-buffers": sum(len(sd.map.idle) for sd in per.values()),
            "device-buffers-reused": sum(sd.map.reused for sd in per.values()),
            "shadowed-pages-peak": sum(sd.map.peak for sd in per.values()),
            "requests-forwarded": sum(sd.stats.requests_forwarded for sd in per.values()),
            "completions-synced": sum(sd.stats.completions_synced for sd in per.values()),
            "bytes-to-device": sum(sd.stats.bytes_to_device for sd in per.values()),
            "bytes-to-guest": sum(sd.stats.bytes_to_guest for sd in per.values()),
            "iotlb-invalidations": sum(sd.stats.iotlb_invalidations for sd in per.values()),
            "pool-pages-in-use": self.m.shadow_pool.in_use,
        }
        total["devices"] = {
            name: {"shadowed-pages": len(sd.map.pages),
                   "requests-forwarded": sd.stats.requests_forwarded,
                   "completions-synced": sd.stats.completions_synced,
                   "bytes-to-device": sd.stats.bytes_to_device,
                   "bytes-to-guest": sd.stats.bytes_to_guest,
                   "inflight": sum(len(q.inflight) for q in sd.queues.values()),
                   "broken": sd.broken}
            for name, sd in per.items()
        }
        return total

    def close(self) -> None:
        self._stop_thread()
        os.close(self._stop_r)
        os.close(self._stop_w)


class ShadowFailed(RuntimeError):
    """Shadowing could not be kept up; the migration fails and the source resumes."""


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass

