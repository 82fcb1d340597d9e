"""`x-dma-tracking = shadow`: the seed's technique as the migration engine sees it.

Nothing is added to the dirty set: while shadowing, device writes reach guest RAM only as VMM
writes, which the VMM's own bitmap records. The device state sent to the destination is the
interception log, not a readout of device internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import bitmap
from ..devices.control import DeviceState
from ..guest_state import DeviceSnapshot, InflightRequest
from .engine import ShadowEngine

if TYPE_CHECKING:
    from ..vmparts import ShadowHost


class ShadowTracking:
    name = "shadow"

    def __init__(self) -> None:
        self.engine: ShadowEngine | None = None
        self._final_stats: dict[str, Any] | None = None

    def begin(self, m: ShadowHost) -> None:
        unsupported = [d.id for d in m.devices if not d.shadowable]
        if unsupported:
            raise ValueError(
                f"shadow DMA tracking does not support vhost-user devices yet "
                f"({', '.join(unsupported)}): use device-log or all-dirty"
            )
        self.engine = ShadowEngine(m)
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
            log = self.engine.devices[dev.id].interception_log()
            queues = [{k: v for k, v in q.items() if k != "inflight"} for q in log["queues"]]
            state = DeviceState.from_json(
                {"version": 1, "kind": dev.handle.kind, "mmio": log["mmio"], "queues": queues}
            )
            inflight = {
                q["index"]: tuple(InflightRequest(**r) for r in q["inflight"])
                for q in log["queues"]
            }
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
