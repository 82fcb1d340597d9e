"""The destination's devices during post-copy: shadowed until every page of guest RAM is here.

A device process maps guest RAM itself, outside the destination's userfaultfd registration: a
device touching a page still on the source would allocate a zero page there, which the real
page could then no longer replace (see `uffd`). So on a post-copy destination no device ever
touches guest RAM until every page has arrived:

1. At the switchover (before the acknowledgement) each device is quiesced *before* it is
   programmed with the migrated state: it knows its rings but processes nothing.
2. Once the guest runs and pages can be fetched (the fetcher and the page receiver are up),
   a thread of this module enters shadow mode (`ShadowEngine` with the fault server's native
   fetch): the device's IOMMU domain points at device buffers only, and the data plane makes
   every page of a queue's rings and of a request's buffers present -- fetched from the source
   with priority, like a vCPU fault -- before it copies them into device buffers. Completions
   are copied back into guest pages that are present by then. The rings the shadow engine
   itself reads in Python go through `GuestMemory.presence` (waits with the GIL released).
   Requests the guest made available meanwhile are forwarded by the entry, in order.
3. Once every page has arrived, the devices leave shadow mode (direct DMA again), and only
   then does the destination report `completed` (and unregister guest RAM).

Step 2 first makes the ring pages of every migrated queue present; that is where it may wait
for the link. A shadowed device's in-flight requests (its snapshot from a shadowing source) are
then checked against the guest's avail ring; a mismatch (or a device refusing to be shadowed)
keeps that migration's devices quiesced until every page is here (they never touch guest RAM
meanwhile), and is reported on QMP: the X_POSTCOPY_DEVICES_FAILED event and `x-devices` in
x-query-postcopy (`report`), besides the log.

Why step 2 runs after the vCPUs start, not in the downtime: the kv guest's NIC and disk take
21-94 ms to enter shadow mode (median 36 ms over 5 runs of `ptmig bench --only postcopy`'s
devices rows, `shadow_entry`; their ring pages another 3-8 ms), against a post-copy downtime
of 12-15 ms without it and a 20 ms goal. Requests the guest makes meanwhile wait in its rings
(the devices are quiesced) and are forwarded by the entry: delayed, not lost (`report` gives
the timings, the bench records them per run). This module, and the shadow engine with it, is
loaded before the downtime too, when the destination acknowledges PostcopyDiscard: loading it
at the switchover took 27-29 ms of a 37-41 ms downtime (`x-switchover-ms` postcopy-arm).

A driver that resets or reconfigures a device meanwhile does not send it back to direct DMA
(as it would on a source): that device is quiesced behind its IOMMU domain of device buffers
until every page is here, then leaves shadow mode on the rings the driver set up by then
(`ShadowEngine._hold_reconfigured`).

If the link breaks during post-copy the devices stay shadowed and the guest paused: nothing
is forwarded that needs a page the source still holds (the data plane waits, bounded, and
retries), and nothing is zero-filled. A break while step 2 waits for ring pages ends that wait
within `postcopy.PRESENCE_SLICE_S`: the devices stay quiesced ("waiting-for-link") and the
resume (`retry`) starts step 2 again.

vhost-user devices take the same path. Their backend may take avail entries without a kick, so
the rings must not start on guest RAM: programmed quiesced (step 1), `VhostUserBlk.set_state`
only records where each ring starts; the shadow engine's entry gives the backend its view of
the shadow pool as memory table (`set_backend_view`) and only then starts the rings, so the
backend reads and writes device buffers the data plane filled after fetching their pages. At
step 3 the engine moves the backend back to guest RAM (the two-step SET_MEM_TABLE) and
restarts the rings there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..devices.handle import DeviceError
from ..devices.virtio.queue import ring_regions
from ..errors import PtmigError
from ..shadow.engine import ShadowEngine
from ..shadow.restore import check_inflight

if TYPE_CHECKING:
    from ..guest_state import DeviceSnapshot
    from ..vmparts import MigratingVm
    from .uffd import FaultServer

log = logging.getLogger(__name__)

ENTER_WAIT_S = 60.0  # leaving waits this long for an entry still fetching its ring pages


class PostcopyDevices:
    """The destination's devices from the post-copy switchover until every page is here."""

    def __init__(self, machine: MigratingVm) -> None:
        self.m = machine
        self.engine: ShadowEngine | None = None
        self.error: str | None = None
        self._snapshots: list[DeviceSnapshot] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._left = False
        self._link_up: Callable[[], bool] = lambda: True
        self.waiting_for_link = False
        self._resumes = 0  # post-copy resumes so far (`retry`)
        # how long the entry took once the guest ran: fetching the ring pages, then entering
        # (what shadowing before the vCPUs start would add to the downtime)
        self.timings: dict[str, float] = {}
        self.final_stats: dict[str, Any] | None = None

    def program(self, snapshots: list[DeviceSnapshot]) -> None:
        """At the switchover: every device quiesced, then given the migrated state (it then
        knows its rings and touches nothing). DeviceError/ValueError: refused, as in a plain
        switchover (the source resumes)."""
        for dev in self.m.devices:
            dev.handle.quiesce()
        for dev, snap in zip(self.m.devices, snapshots, strict=True):
            dev.handle.set_state(snap.state.to_json())
        self._snapshots = snapshots

    def reset(self) -> None:
        """The attempt failed before the guest ran here: the devices forget the migrated state
        (reset, then no longer quiesced), as fresh ones for the next attempt."""
        for dev in self.m.devices:
            if dev.handle.alive:
                dev.handle.reset()
                dev.handle.resume()

    def start(self, server: FaultServer, link_up: Callable[[], bool]) -> None:
        """The guest runs and pages can be fetched: enter shadow mode on a thread (its ring
        reads may wait for pages, which the caller's thread receives). `link_up`: whether
        pages can come now (False once the link to the source broke)."""
        self._link_up = link_up
        self._thread = threading.Thread(
            target=self._enter, args=(server, self._resumes), name="postcopy-devices", daemon=True
        )
        self._thread.start()

    def retry(self, server: FaultServer) -> None:
        """The link is back (a post-copy resume): enter shadow mode again if the broken link
        stopped the entry while it waited for ring pages."""
        with self._lock:
            self._resumes += 1
            if not self.waiting_for_link or self._left:
                return  # (an entry still waiting sees the new resume count and starts over)
            self.waiting_for_link = False
        log.info("post-copy: the link is back, shadowing the devices")
        self.start(server, self._link_up)

    def _enter(self, server: FaultServer, resumes: int) -> None:
        if not self.m.devices:
            return
        t0 = time.monotonic()
        try:
            self._fetch_rings()
        except (PtmigError, OSError) as e:
            if self._link_up() and self._resumes == resumes:
                self._failed(e)  # not the link: the pages did not come within the wait
            elif self._wait_for_link(e, resumes):
                self._enter(server, self._resumes)  # the link came back meanwhile
            return
        t1 = time.monotonic()
        try:
            self._check_inflight()
            engine = ShadowEngine(self.m, fetch=server.native_fetch())
            with self._lock:
                if self._left:
                    return
                self.engine = engine
                engine.enter()
            self.timings = {
                "ring-fetch-ms": round((t1 - t0) * 1000, 3),
                "enter-ms": round((time.monotonic() - t1) * 1000, 3),
            }
            log.info("post-copy: %d devices shadowed until every page is here", len(self.devices))
        except (PtmigError, DeviceError, OSError, ValueError) as e:
            self._failed(e)

    def _fetch_rings(self) -> None:
        """Make every ring page of the migrated queues present (the only wait for the link
        before the devices are shadowed: the checks and the entry then read present pages)."""
        presence = self.m.vm.memory.presence
        if presence is None:
            return
        for snap in self._snapshots:
            for q in snap.state.queues.values():
                for addr, length in ring_regions(q):
                    presence(addr, length)

    def _check_inflight(self) -> None:
        for dev, snap in zip(self.m.devices, self._snapshots, strict=True):
            if snap.source == "shadow":
                check_inflight(self.m, dev, snap)

    def _wait_for_link(self, e: BaseException, resumes: int) -> bool:
        """The link broke while the entry waited for ring pages: the devices stay quiesced
        (nothing is lost: the guest is paused, its requests wait in the rings) and `retry`
        enters shadow mode once the link is back. True: it is back already (try again now)."""
        with self._lock:
            if self._left:
                return False
            if self._resumes > resumes:
                return True
            self.waiting_for_link = True
        log.warning(
            "post-copy: the link broke before the devices were shadowed (%s); they stay "
            "quiesced and are shadowed when the link is back",
            e,
        )
        return False

    def _failed(self, e: BaseException) -> None:
        """The devices cannot be shadowed (an in-flight check failed, a device refused): they
        stay quiesced until every page is here; QMP is told (X_POSTCOPY_DEVICES_FAILED and
        x-query-postcopy's x-devices)."""
        self.error = f"{type(e).__name__}: {e}"
        log.error(
            "post-copy: the devices could not be shadowed (%s); they stay quiesced until "
            "every page is here",
            self.error,
        )
        if self.m.qmp is not None:
            self.m.qmp.emit(
                "X_POSTCOPY_DEVICES_FAILED", {"devices": self.devices, "error": self.error}
            )

    def report(self) -> dict[str, Any]:
        """For x-query-postcopy: where the devices are (quiesced, shadowed, direct) and why."""
        if self._left:
            state = "direct"
        elif self.engine is not None and self.engine.active:
            state = "shadowed"
        elif self.waiting_for_link:
            state = "waiting-for-link"
        else:
            state = "quiesced"
        out: dict[str, Any] = {"devices": self.devices, "state": state, **self.timings}
        if self.error is not None:
            out["error"] = self.error
        return out

    @property
    def devices(self) -> list[str]:
        return [d.id for d in self.m.devices]

    def finish(self) -> None:
        """Every page is here: back to direct DMA (before the fault server goes away). Devices
        whose entry failed are resumed as they were programmed (nothing is missing now)."""
        if self._thread is not None:
            self._thread.join(ENTER_WAIT_S)
        with self._lock:
            self._left = True
            engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.leave()
            finally:
                self.final_stats = engine.stats()
                engine.close()
        for dev in self.m.devices:  # (a device left shadow mode resumed already: harmless)
            if dev.handle.alive:
                dev.handle.resume()
        log.info("post-copy: the devices use direct DMA again")

    def stats(self) -> dict[str, Any] | None:
        """The shadow engine's counters once it has entered (while it enters, it may be
        waiting for ring pages: not waited for here), or its last ones after it left."""
        engine = self.engine
        if engine is not None and engine.active:
            return engine.stats()
        return self.final_stats

    def close(self) -> None:
        """The VMM stops: stop the data plane before guest RAM goes away."""
        with self._lock:
            self._left = True
            engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()
