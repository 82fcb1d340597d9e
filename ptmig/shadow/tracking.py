"""`x-dma-tracking = shadow` and `intercept`: the two software answers as the migration engine
sees them.

`shadow` (the seed's technique) adds nothing to the dirty set: device writes reach guest RAM
only as VMM writes (copies from the device buffers), which the VMM's own bitmap records.

`intercept` shadows only the rings and leaves every data buffer where the guest put it: the
device DMAs into guest RAM directly, and the data plane marks dirty every page of a request's
device-writable buffers when the request completes -- before the guest sees the used element,
and for the whole writable area, never by used.len (virtio 1.x, 2.7.8: used.len is a lower
bound of what the device wrote, and a driver may not rely on anything past it). Why nothing
escapes:

  * the device can only learn of a buffer from the shadow rings, which the VMM fills: every
    buffer it may write is in a request the VMM recorded (its private record, never device
    memory);
  * a write the device made before completing is either marked at completion (the page is then
    sent again, after its last change) or, for a request still in flight at the switchover,
    marked by `stop_and_copy` after the device was quiesced: stop forwarding, quiesce, sync
    every completion, mark the writable pages of every request left in flight that the device
    had taken off the shadow ring, then the final harvest. A request it never took (its
    quiesce reply says which avail index it would read next: typically the posted receive
    buffers no frame reached yet) cannot have been written and is executed afresh by the
    destination's device, so its pages stay out of the downtime's round;
  * after quiescing nothing is written any more (ptmig's devices finish or park every request
    before `quiesce` returns, and they are never resumed on this side once the destination
    runs).

Where it could escape on real hardware: a device that keeps writing after it was told to stop
(a quiesce that is not a DMA barrier, posted writes still in the fabric), a device that writes
outside the buffers of the request it completes (firmware bugs; the identity IOMMU map lets
it reach any guest page, where `shadow` maps only device buffers), and a write to a buffer of
a request the device completed and the guest has not yet reposted, and a device that reports
a ring position behind the requests it really took (a prefetching device must count what it
prefetched, as vhost's GET_VRING_BASE does). `shadow` trusts the device with nothing but the
device buffers; `intercept` trusts it to write only the writable buffers of the requests it
was given, to stop when quiesced, and to say truly where it stopped reading.

The device state sent to the destination is the interception log either way, not a readout of
device internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import bitmap
from ..guest_state import DeviceSnapshot
from .engine import ShadowEngine

if TYPE_CHECKING:
    from ..vmparts import ShadowHost


class ShadowTracking:
    name = "shadow"
    intercept = False  # shadow only the rings (see InterceptTracking)

    def __init__(self) -> None:
        self.engine: ShadowEngine | None = None
        self._final_stats: dict[str, Any] | None = None

    def begin(self, m: ShadowHost) -> None:
        self.engine = ShadowEngine(m, intercept=self.intercept)
        self.engine.enter()

    def round_dirty(self, m: ShadowHost) -> bitmap.Bitmap | None:
        assert self.engine is not None
        self.engine.check()
        return None

    def stop_and_copy(self, m: ShadowHost) -> bitmap.Bitmap | None:
        assert self.engine is not None
        self.engine.stop_and_sync()
        return None

    def device_states(self, m: ShadowHost) -> list[DeviceSnapshot]:
        assert self.engine is not None
        out = []
        for dev in m.devices:
            state, inflight = self.engine.devices[dev.id].interception_log()
            out.append(DeviceSnapshot(dev.id, dev.kind, "shadow", state, inflight))
        return out

    def abort(self, m: ShadowHost) -> None:
        if self.engine is not None:
            self._final_stats = self.engine.stats()
            try:
                self.engine.leave()
            finally:
                self.engine.close()
                self.engine = None

    def complete(self, m: ShadowHost) -> None:
        if self.engine is not None:
            self._final_stats = self.engine.stats()
            self.engine.finish()

    def stats(self) -> dict[str, Any] | None:
        if self.engine is not None and self.engine.active:
            return self.engine.stats()
        return self._final_stats


class InterceptTracking(ShadowTracking):
    """`x-dma-tracking = intercept`: the rings shadowed, the data buffers left in guest RAM, and
    each completion's device-writable pages marked dirty (see the module docstring)."""

    name = "intercept"
    intercept = True


def make_tracking(name: str) -> ShadowTracking:
    """The software strategy called `name` ("shadow" or "intercept")."""
    table: dict[str, type[ShadowTracking]] = {
        "shadow": ShadowTracking,
        "intercept": InterceptTracking,
    }
    if name not in table:
        raise ValueError(f"{name!r} is not a software DMA tracking strategy (shadow, intercept)")
    return table[name]()
