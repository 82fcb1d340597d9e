"""The shadow engine: enter and leave shadow mode, and keep the data plane going.

Trapped doorbells and device interrupts are serviced by the native data plane's thread
(`native.py`): it forwards requests and syncs completions without the interpreter. The engine's
own thread only answers the data plane's calls for help -- a request touching a guest page with
no device buffer yet, too many idle device buffers, a device that broke.

Entering (before round 0; each device keeps running except for a short quiesce):
  1. trap the doorbells: the device's ioeventfds are unbound from QueueNotify and the VMM's own
     are bound in their place; route the device's interrupt eventfd to this engine;
  2. quiesce the device and read its queue positions;
  3. shadow the rings, point the IOMMU domain at device buffers only, forward the requests the
     guest made available meanwhile, invalidate the IOTLB, mark in-flight device-writable pages
     dirty, resume.
Leaving (a cancelled or failed migration, or the driver resetting or reconfiguring a device
while it is shadowed -- then at once, before the register write reaches the device): quiesce,
sync every completion, restore the identity map, invalidate, set the device's queue positions
to match the guest's rings (so requests that were forwarded but not completed are redone from
the guest's own ring), restore direct doorbells and interrupts, resume. A device that fails
half-way (its state refused, a lost reply) is not left quiesced: it goes back on the identity
map and is marked DEVICE_NEEDS_RESET, which its driver answers with a reset (`_leave_broken`);
the others leave as usual. Outside shadow mode nothing here runs: zero steady-state overhead.

A vhost-user device has no IOMMU and no exact quiesce of its own: its backend may take avail
entries without a kick and completes requests it took after GET_VRING_BASE. Entering and leaving
therefore run with the vCPUs paused for it (a few ms: the rings drain, nothing new is posted),
and the IOMMU remap is its memory table: after the shadow rings are built, the backend is given
the device's view of the pool (`ShadowPool.view_base`) in place of guest RAM; leaving gives it
guest RAM back before its rings restart on the guest's. Under `intercept` the backend keeps
guest RAM and only its ring pages come from the view (`BackendView.beside_ram`).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..devices.attach import AttachedDevice, bind_doorbells
from ..devices.control import DeviceState
from ..devices.handle import DeviceEvent, DeviceTimeoutError
from ..devices.vhost_user.frontend import BackendView, VhostUserBlk
from ..devices.virtio.constants import (
    REG_CONFIG,
    REG_INTERRUPT_ACK,
    REG_QUEUE_NOTIFY,
    REG_STATUS,
)
from ..layout import PAGE_SIZE
from .device import ShadowedDevice, quiesced_positions
from .mapping import IDLE_MAX, ShadowError
from .native import Dataplane

if TYPE_CHECKING:
    from ..vmparts import ShadowHost

log = logging.getLogger(__name__)

POLL_S = 0.05  # safety net: look for stalled queues even without a call for help
# Post-copy: how long the data plane waits for a request's pages before it retries on its next
# pass (holding its lock meanwhile; a broken link must not hold it for long).
FETCH_WAIT_MS = 1000


class ShadowEngine:
    """`intercept`: shadow only the rings (x-dma-tracking intercept); data buffers stay in guest
    RAM and each completion marks the pages of its device-writable buffers dirty."""

    def __init__(
        self,
        machine: ShadowHost,
        *,
        intercept: bool = False,
        fetch: tuple[int, int] | None = None,
    ) -> None:
        self.m = machine
        self.intercept = intercept
        # post-copy destination: the fault server's native fetch (`FaultServer.native_fetch`),
        # through which the data plane makes every page it touches present first
        self.fetch = fetch
        self.devices: dict[str, ShadowedDevice] = {}
        self._lock = threading.Lock()
        # held by a vCPU thread from looking up a trapping doorbell to writing it, and by
        # `_untrap` while it takes the doorbells away: no write reaches a closed (or reused) fd
        self._doorbell_lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.dataplane: Dataplane | None = None
        self.active = False
        self.entered_at: float | None = None

    # --- entering ------------------------------------------------------------------------------

    def enter(self) -> None:
        """Shadow every device, one after the other.

        The data plane thread runs before the first device is quiesced: a device that has
        entered is served from its resume on, not only once the last device has entered (the
        NIC's completions waited for the disk's entry, ~3-4 ms of a kv guest's traffic held
        back at every migration's start). The thread meets each device's queues under its
        lock, once they are built; requests it finds before Python forwarded the pending ones
        stall until that forwarding shadows their pages, as any stalled request does.

        A device that cannot enter (its process died, its rings are unusable) fails the
        entry, and every device is first returned to direct DMA, those entered before it
        included: a failed migration leaves no device shadowed with nobody serving it."""
        vm = self.m.vm
        dp = Dataplane(
            vm.memory, self.m.shadow_pool, guest_wake_fd=vm.guest_wake_fd, idle_limit=IDLE_MAX
        )
        self.dataplane = dp
        if self.fetch is not None:
            dp.fetch_pages_with(self.fetch, FETCH_WAIT_MS)
        vm.dirty.add_source(dp.take_dirty)
        dp.start()
        try:
            with self._lock:
                self.active = True  # from here `leave` has devices to return
                for dev in self.m.devices:
                    view = self._backend_view(dev)
                    sd = ShadowedDevice(
                        dev,
                        self.m.shadow_pool,
                        vm.memory,
                        dp,
                        irq_fd=dev.handle.irq_eventfd,
                        view_base=None
                        if dev.view is None
                        else self.m.shadow_pool.view_base(dev.view),
                        intercept=self.intercept,
                    )
                    if isinstance(dev.handle, VhostUserBlk):  # its events: a thread of its own
                        dev.handle.on_event(self._watch(sd))
                    self.devices[dev.id] = sd
                    with self._vcpus_paused(view is not None):
                        self._enter_device(sd, view)
                self.entered_at = time.monotonic()
        except BaseException as e:
            log.warning("shadowing could not start (%s): every device back to direct DMA", e)
            try:
                self.leave()
            except Exception as left:  # (logged per device; the entry's error is the news)
                log.warning("leaving after the failed entry: %s", left)
            raise
        self._thread = threading.Thread(target=self._loop, name="shadow-engine", daemon=True)
        self._thread.start()
        self._check_broken()

    def _enter_device(self, sd: ShadowedDevice, view: BackendView | None) -> None:
        dev, vm = sd.dev, self.m.vm
        self._trap(sd)
        quiesced = time.monotonic()
        dev.handle.quiesce()
        kicks = dict(dev.handle.doorbell_eventfds)
        sd.build(DeviceState.from_json(dev.handle.get_state()), sd.vmm_doorbells, kicks)
        for qi in list(sd.queues):  # quiesced: the one invalidation below covers them
            sd.submit(qi, flush=False)
        dev.handle.iotlb_invalidate()
        sd.map.invalidated()
        sd.stats.iotlb_invalidations += 1
        if view is not None:
            assert isinstance(dev.handle, VhostUserBlk)
            dev.handle.set_backend_view(view)
        dev.handle.resume()
        sd.enter_ms = (time.monotonic() - quiesced) * 1000.0
        for qi in sd.queues:
            dev.handle.kick(qi)
        # What the device wrote straight into guest RAM for the requests it had in flight is
        # there since the quiesce; from the resume on it writes device buffers. So these pages
        # are marked after the resume: the guest's I/O does not wait for it (~3 ms for the
        # NIC's 256 receive buffers, a third of its window here).
        for gpfn in sd.inflight_writable_pages():
            vm.memory.mark_dirty(gpfn << 12, 4096)

    def _backend_view(self, dev: AttachedDevice) -> BackendView | None:
        """What a vhost-user device's backend sees while shadowed: its view of the pool."""
        if dev.view is None:
            return None
        pool = self.m.shadow_pool
        offset = pool.view_base(dev.view) * PAGE_SIZE
        return BackendView(
            pool.fd,
            offset,
            pool.view_pages * PAGE_SIZE,
            pool.address + offset,
            pool.mmap,
            beside_ram=self.intercept,  # intercept: only the rings move into the pool
        )

    @contextmanager
    def _vcpus_paused(self, needed: bool) -> Iterator[None]:
        """Keep the guest from posting requests while a vhost-user device's rings are moved
        (its backend may take entries without a kick). A no-op if the vCPUs are paused."""
        control = self.m.vm.control
        pause = needed and not control.pause_requested
        if pause:
            control.pause()
        try:
            yield
        finally:
            if pause:
                control.resume()

    def _watch(self, sd: ShadowedDevice) -> Any:
        """A device that dies while shadowed breaks shadowing (the migration fails at once)."""

        def on_event(ev: DeviceEvent) -> None:
            if ev.name != "gone" or ev.data.get("expected"):
                return
            with self._lock:
                dp = self.dataplane
                if not self.active or self.devices.get(sd.dev.id) is not sd or dp is None:
                    return
                with dp.locked():
                    sd.fail(f"the device is gone: {ev.data.get('reason')}")

        return on_event

    def _trap(self, sd: ShadowedDevice) -> None:
        dev = sd.dev
        vm = self.m.vm
        dev.mmio_hook = lambda off, size, value: self._on_mmio_write(sd, off, size, value)
        bind_doorbells(self.m.vm, dev, deassign=True)
        sd.vmm_doorbells = {}
        addr = dev.mmio_base + REG_QUEUE_NOTIFY
        for q in dev.handle.doorbell_eventfds:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            vm.vmfd.ioeventfd(fd, addr, 4, datamatch=q)
            sd.vmm_doorbells[q] = fd
        irq = dev.handle.irq_eventfd
        if irq in vm.wake_fds:
            vm.wake_fds.remove(irq)
        for v in vm.vcpus:  # a vCPU halted on the old list must not swallow the interrupt
            v.kick_halt()

    def _on_mmio_write(self, sd: ShadowedDevice, offset: int, size: int, value: int) -> bool:
        """A register write trapped while shadowing. Returns True if it was consumed here."""
        if offset == REG_QUEUE_NOTIFY:
            with self._doorbell_lock:
                fd = sd.vmm_doorbells.get(value)
                if fd is not None:
                    os.eventfd_write(fd, 1)
            return True  # (none: untrapped meanwhile; leaving kicks every queue)
        if offset == REG_STATUS and value != 0 and sd.mmio is not None:
            sd.mmio = replace(sd.mmio, status=value)
            return False
        if offset == REG_INTERRUPT_ACK or offset >= REG_CONFIG:
            return False
        # A reset (status 0), feature or queue write would change what the shadow rings and
        # device buffers describe. Rebuilding them under a live driver is not attempted: every
        # device goes back to direct DMA *before* the write reaches this one (completions
        # synced, identity map restored, pool pages returned), and the migration fails.
        if self.fetch is not None:
            self._hold_reconfigured(sd, offset, value)
            return False
        with sd.dataplane.locked():
            sd.fail(
                f"the driver reconfigured the device while shadowed (register {offset:#x} "
                f"<- {value:#x}); every device went back to direct DMA"
            )
        self.leave()
        return False

    def _hold_reconfigured(self, sd: ShadowedDevice, offset: int, value: int) -> None:
        """The same on a post-copy destination, where direct DMA could touch a page still on
        the source: this device stops being serviced and is quiesced before the write reaches
        it (its IOMMU domain still reaches device buffers only); it leaves shadow mode with the
        others once every page is here, on the rings the driver has set up by then."""
        with sd.dataplane.locked():
            sd.fail(
                f"the driver reconfigured the device during post-copy (register {offset:#x} "
                f"<- {value:#x}); it stays quiesced until every page has arrived"
            )
        sd.dev.handle.quiesce()
        sd.reconfigured = True

    # --- the service thread -------------------------------------------------------------------

    def _loop(self) -> None:
        """Answer the data plane: shadow the pages of stalled requests, reclaim idle device
        buffers, notice broken devices."""
        dp = self.dataplane
        assert dp is not None
        while True:
            try:
                ready, _, _ = select.select([self._stop_r, dp.slow_fd], [], [], POLL_S)
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            _drain(dp.slow_fd)
            with self._lock:
                if not self.active:
                    return
                resumed = False
                with dp.locked():
                    for sd in self.devices.values():
                        if sd.broken is not None:
                            continue
                        sd.reclaim_idle()  # first: never the pages reserved just below
                        for qi, sq in sd.queues.items():
                            if sq.native.stalled and sd.shadow_stalled(qi):
                                resumed = True
                if resumed:
                    dp.poke()

    def _stop_thread(self) -> None:
        if self.dataplane is not None:
            self.dataplane.stop()
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
            if not self.active:  # left already (the driver reconfigured a device): failed
                self._check_broken()
                raise ShadowFailed("shadow mode ended before the switchover")
            for sd in self.devices.values():
                reply = sd.dev.handle.quiesce()
                sd.complete()
                if self.intercept:
                    self._mark_inflight(sd, quiesced_positions(reply))
        if self.devices:
            self.m.vm.wake_guest()
        self._check_broken()

    def _mark_inflight(self, sd: ShadowedDevice, taken: dict[int, int] | None) -> None:
        """Intercept at the switchover: the device may already have written the buffers of a
        request it took but has not completed (a partly received frame), straight into guest
        RAM, so every device-writable page of such a request is dirty. A request the device
        never took off the shadow ring (its quiesce reply says where it stopped reading: a
        posted receive buffer no frame has reached) cannot have been written, and the
        destination's device executes it afresh: its pages are not added to the downtime."""
        memory = self.m.vm.memory
        pages = sd.inflight_writable_pages(taken)
        for gpfn in pages:
            memory.mark_dirty(gpfn << 12, 4096)
        sd.inflight_pages_marked += len(pages)

    def leave(self) -> None:
        """Back to direct DMA (after a cancelled or failed migration, or at once when the
        driver reconfigures a device). Idempotent. Every device is tried: one that cannot
        leave (its process died meanwhile) does not keep the others shadowed; the first
        error is raised after all were tried."""
        self._stop_thread()
        with self._lock:
            if not self.active:
                return
            first: BaseException | None = None
            for sd in self.devices.values():
                dev = sd.dev
                if not dev.handle.alive:
                    continue
                try:
                    with self._vcpus_paused(dev.view is not None):
                        self._leave_device(sd)
                except Exception as e:
                    log.warning("%s could not leave shadow mode: %s", dev.id, e)
                    first = first or e
            self.active = False
        if first is not None:
            raise first

    def _leave_device(self, sd: ShadowedDevice) -> None:
        dev, vm = sd.dev, self.m.vm
        direct = False  # the identity map is back and the device's IOTLB flushed
        try:
            try:
                dev.handle.quiesce()
                sd.complete()
                vm.wake_guest()
                state = DeviceState.from_json(dev.handle.get_state())
                if not sd.reconfigured:  # (else the rings are the driver's own, positions and all)
                    state = _with_positions(state, sd)
                if isinstance(dev.handle, VhostUserBlk) and dev.handle.backend_view is not None:
                    dev.handle.set_backend_view(None)  # guest RAM again before the rings restart
                sd.release()
                self._map_identity(sd)
                direct = True
                dev.handle.set_state(state.to_json())
            except Exception as e:
                self._leave_broken(sd, direct, e)
                raise
        finally:
            self._untrap(sd)
        dev.handle.resume()
        for qi in sd.queues:  # look at the guest's rings now: no doorbell may come
            dev.handle.kick(qi)

    def _map_identity(self, sd: ShadowedDevice) -> None:
        dev = sd.dev
        dev.iommu.map_identity_ranges(self.m.vm.memory.page_ranges(), writable=True)
        dev.handle.iotlb_invalidate()
        sd.map.invalidated()

    def _leave_broken(self, sd: ShadowedDevice, direct: bool, error: Exception) -> None:
        """Leaving failed half-way: the device's rings may still be the shadow rings, its
        positions anywhere. It must not DMA from them, nor hang the guest in silence: back on
        the identity map (the guest's own addresses again), DEVICE_NEEDS_RESET with a
        configuration change interrupt (virtio 1.x, 2.1.2: the driver resets the device and
        sets it up afresh), resumed so that its reset can bring it back. Each step is tried on
        its own (none after one that timed out: the device answers nothing now); the caller
        raises `error` whatever they do."""
        dev = sd.dev
        steps: list[tuple[str, Callable[[], object]]] = []
        if not direct:
            steps.append(("restore the identity map", lambda: self._map_identity(sd)))
        steps += [
            (
                "mark it DEVICE_NEEDS_RESET",
                lambda: dev.handle.needs_reset(f"leaving shadow mode failed: {error}"),
            ),
            ("resume it", dev.handle.resume),
        ]
        for what, step in steps:
            if not dev.handle.alive:
                return
            try:
                step()
            except DeviceTimeoutError as e:
                log.warning("%s: could not %s after a failed leave: %s", dev.id, what, e)
                return
            except Exception as e:
                log.warning("%s: could not %s after a failed leave: %s", dev.id, what, e)

    def finish(self) -> None:
        """The destination runs the guest: this side stops servicing (devices stay quiesced)."""
        self._stop_thread()
        with self._lock:
            self.active = False

    def _untrap(self, sd: ShadowedDevice) -> None:
        dev = sd.dev
        vm = self.m.vm
        addr = dev.mmio_base + REG_QUEUE_NOTIFY
        with self._doorbell_lock:
            doorbells, sd.vmm_doorbells = sd.vmm_doorbells, {}
        for q, fd in doorbells.items():
            try:
                vm.vmfd.ioeventfd(fd, addr, 4, datamatch=q, deassign=True)
            finally:
                os.close(fd)
        bind_doorbells(self.m.vm, dev)
        dev.mmio_hook = None
        irq = dev.handle.irq_eventfd
        if irq not in vm.wake_fds:
            vm.wake_fds.append(irq)
        for v in vm.vcpus:  # a vCPU halted on the shadowing list would miss the device's MSI
            v.kick_halt()

    # --- visibility -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        per = {sd.dev.id: sd for sd in self.devices.values()}
        total: dict[str, Any] = {
            "shadowed-pages": sum(sd.map.active_count for sd in per.values()),
            "idle-device-buffers": sum(sd.map.idle_count for sd in per.values()),
            "device-buffers-reused": sum(sd.map.reused for sd in per.values()),
            "shadowed-pages-peak": sum(sd.map.peak for sd in per.values()),
            "requests-forwarded": sum(sd.stats.requests_forwarded for sd in per.values()),
            "completions-synced": sum(sd.stats.completions_synced for sd in per.values()),
            "doorbells-trapped": sum(sd.stats.doorbells for sd in per.values()),
            "device-interrupts": sum(sd.stats.interrupts for sd in per.values()),
            "wakeups": sum(sd.stats.wakeups for sd in per.values()),
            "device-kicks": sum(sd.stats.device_kicks for sd in per.values()),
            "guest-interrupts": sum(sd.stats.guest_interrupts for sd in per.values()),
            "bytes-to-device": sum(sd.stats.bytes_to_device for sd in per.values()),
            "bytes-to-guest": sum(sd.stats.bytes_to_guest for sd in per.values()),
            "iotlb-invalidations": sum(sd.stats.iotlb_invalidations for sd in per.values()),
            "stalls": sum(sd.stats.stalls for sd in per.values()),
            "pool-pages-in-use": self.m.shadow_pool.in_use,
            "dma-tracking": "intercept" if self.intercept else "shadow",
            "pages-marked": sum(sd.pages_marked for sd in per.values()),
            "pages-fetched": sum(sd.stats.pages_fetched for sd in per.values()),
            "fetch-waits": sum(sd.stats.fetch_waits for sd in per.values()),
        }
        total["devices"] = {
            name: {
                "shadowed-pages": sd.map.active_count,
                "requests-forwarded": sd.stats.requests_forwarded,
                "completions-synced": sd.stats.completions_synced,
                "bytes-to-device": sd.stats.bytes_to_device,
                "bytes-to-guest": sd.stats.bytes_to_guest,
                "inflight": sum(q.native.inflight_count for q in sd.queues.values()),
                "stalls": sd.stats.stalls,
                "pages-marked": sd.pages_marked,
                "pages-fetched": sd.stats.pages_fetched,
                "switchover-pages-marked": sd.inflight_pages_marked,
                "enter-ms": round(sd.enter_ms, 3),
                "broken": sd.broken,
            }
            for name, sd in per.items()
        }
        return total

    def close(self) -> None:
        """Stop both threads and free the data plane. Idempotent."""
        if self._stop_r < 0:
            return
        self._stop_thread()
        dp, self.dataplane = self.dataplane, None
        if dp is not None:
            self.m.vm.dirty.remove_source(dp.take_dirty)
            dp.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_r = self._stop_w = -1


class ShadowFailed(ShadowError, RuntimeError):
    """The engine's verdict: shadowing could not be kept up (a device's `ShadowError`, or the
    shadow mode ended early), so the migration fails and the source resumes."""


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass


def _with_positions(state: DeviceState, sd: ShadowedDevice) -> DeviceState:
    """The device's state with each shadowed queue's positions as the guest sees them (where
    the device must resume reading the avail ring, the used index the guest was shown)."""
    queues = dict(state.queues)
    for sq in sd.queues.values():
        if sq.index in queues:
            p = sq.snapshot()
            queues[sq.index] = replace(
                queues[sq.index], next_avail=p.next_avail, next_used=p.next_used
            )
    return replace(state, queues=queues)
