"""Device-DMA tracking (`x-dma-tracking`): what each strategy adds to the dirty set, and how
devices are handled at the edges of a migration.

A passthrough device writes guest RAM behind KVM's back, so a migration has to learn about
those writes some other way. The engine asks the active strategy at four points:

    begin(m)           before round 0 (the device keeps running)
    round_dirty(m)     at every harvest: pages to add to the dirty set, or None
    stop_and_copy(m)   vCPUs are paused: quiesce devices; final pages to add, or None
    device_states(m)   what the destination needs to program its fresh devices
    abort(m)           the migration failed before switchover: back to normal, devices running
    complete(m)        the destination runs the guest now: this side stays stopped

`none` adds nothing (and loses device writes: kept to show the corruption), `all-dirty` adds
every page the IOMMU maps writable (QEMU's "perpetually dirty" fallback), `device-log` harvests
the device's own DMA write log (hardware dirty tracking), `shadow` (see `ptmig.shadow`)
adds nothing because device writes reach guest RAM only through the VMM's marking write path,
and `intercept` (`ptmig.shadow.tracking`) shadows only the rings and marks the writable pages
of every completed request dirty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .. import bitmap
from ..devices.control import DeviceState
from ..guest_state import DeviceSnapshot

if TYPE_CHECKING:
    from ..shadow.engine import ShadowEngine
    from ..vmparts import Guest, ShadowHost


class DmaTracking(Protocol):
    """A strategy, as the migration engine drives it. `m` offers the shadow pool too: the
    software strategies need it, the baselines read only the VM and its devices (`Guest`)."""

    name: str
    engine: ShadowEngine | None  # the software strategies' engine while they shadow

    def begin(self, m: ShadowHost) -> None: ...
    def round_dirty(self, m: ShadowHost) -> bitmap.Bitmap | None: ...
    def stop_and_copy(self, m: ShadowHost) -> bitmap.Bitmap | None: ...
    def device_states(self, m: ShadowHost) -> list[DeviceSnapshot]: ...
    def abort(self, m: ShadowHost) -> None: ...
    def complete(self, m: ShadowHost) -> None: ...
    def stats(self) -> dict[str, Any] | None: ...


class _QuiesceAtStop:
    """Shared behaviour of the baselines: devices run untouched until the vCPUs stop, then are
    quiesced (in-flight DMA finishes) and their queue state is read through the admin interface."""

    name = "none"
    engine: ShadowEngine | None = None  # nothing is shadowed

    def begin(self, m: Guest) -> None:
        pass

    def round_dirty(self, m: Guest) -> bitmap.Bitmap | None:
        return None

    def stop_and_copy(self, m: Guest) -> bitmap.Bitmap | None:
        for dev in m.devices:
            dev.handle.quiesce()
        return None

    def device_states(self, m: Guest) -> list[DeviceSnapshot]:
        return [
            DeviceSnapshot(d.id, d.kind, "device", DeviceState.from_json(d.handle.get_state()))
            for d in m.devices
        ]

    def abort(self, m: Guest) -> None:
        for dev in m.devices:
            if dev.handle.alive:
                dev.handle.resume()

    def complete(self, m: Guest) -> None:
        pass

    def stats(self) -> dict[str, Any] | None:
        return None


class NoTracking(_QuiesceAtStop):
    name = "none"


class AllDirty(_QuiesceAtStop):
    name = "all-dirty"

    def __init__(self) -> None:
        # The last answer and the tables' generations it was read at: the tables rarely
        # change during a migration, and every change bumps its table's generation.
        self._seen: tuple[tuple[int, ...], bitmap.Bitmap] | None = None

    def _writable(self, m: Guest) -> bitmap.Bitmap:
        npages = m.vm.memory.npages
        # (the generations first: a change made while the entries are read bumps them after
        # it, so the next round reads the entries again)
        key = (npages, *(x for dev in m.devices for x in (id(dev.iommu), dev.iommu.generation)))
        if self._seen is not None and self._seen[0] == key:
            return self._seen[1].copy()
        flags = np.zeros(npages, dtype=bool)
        for dev in m.devices:
            dev.iommu.mark_writable_guest(flags)
        out = bitmap.from_bool(flags)
        self._seen = (key, out)
        return out.copy()

    def round_dirty(self, m: Guest) -> bitmap.Bitmap | None:
        return self._writable(m)

    def stop_and_copy(self, m: Guest) -> bitmap.Bitmap | None:
        super().stop_and_copy(m)
        return self._writable(m)


class DeviceLog(_QuiesceAtStop):
    name = "device-log"

    def begin(self, m: Guest) -> None:
        for dev in m.devices:
            dev.handle.dma_log_start()

    def _harvest(self, m: Guest) -> bitmap.Bitmap:
        out = bitmap.empty(m.vm.memory.npages)
        for dev in m.devices:
            log_bytes = np.asarray(dev.handle.dma_log_harvest(), dtype=np.uint8)
            words = np.zeros(out.size * 8, dtype=np.uint8)
            n = min(words.size, log_bytes.size)
            words[:n] = log_bytes[:n]
            np.bitwise_or(out, words.view(np.uint64), out=out)
        return out

    def round_dirty(self, m: Guest) -> bitmap.Bitmap | None:
        return self._harvest(m)

    def stop_and_copy(self, m: Guest) -> bitmap.Bitmap | None:
        super().stop_and_copy(m)
        return self._harvest(m)

    def abort(self, m: Guest) -> None:
        for dev in m.devices:
            if dev.handle.alive:
                dev.handle.dma_log_stop()
        super().abort(m)


def make_strategy(name: str) -> DmaTracking:
    if name in ("shadow", "intercept"):
        from ..shadow.tracking import make_tracking

        return make_tracking(name)
    table: dict[str, type[_QuiesceAtStop]] = {
        "none": NoTracking,
        "all-dirty": AllDirty,
        "device-log": DeviceLog,
    }
    if name not in table:
        raise ValueError(f"unknown x-dma-tracking strategy {name!r}")
    return table[name]()
