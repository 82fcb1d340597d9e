"""The state of every device of a running VM and of the guest's own rings (`x-query-devices`).

Owns the report that pins a stalled data path: for each device, its process's counters (the
frame path's doorbells, frames, drops and RX backlog, quiesced/broken) and its queue positions,
next to the indices the driver and the device last published in guest RAM. Read together they
say where a request stopped:

- avail-idx ahead of the device's next_avail while its doorbell count stays put: a notification
  was lost between the driver and the device;
- on RX, used-idx equal to avail-idx with frames in the device's backlog: the guest stopped
  reposting buffers (it is not polling);
- on RX, avail-idx a full ring ahead of used-idx and no frame counted: no frame reached the
  device (look at the switch);
- quiesced or broken: the device was told to stop, or stopped itself.

A device that cannot answer (gone, or its process stuck) is reported with the error instead of
failing the whole report: a stuck device is exactly what the report is for.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .devices.attach import AttachedDevice

_U16 = struct.Struct("<H")

ReadGuest = Callable[[int, int], bytes]


def ring_indices(read: ReadGuest, avail_addr: int, used_addr: int) -> dict[str, int]:
    """The driver's avail->idx and the device's used->idx of one split ring in guest RAM, and
    how many requests sit between them (made available, not yet returned)."""
    (avail_idx,) = _U16.unpack(read(avail_addr + 2, 2))
    (used_idx,) = _U16.unpack(read(used_addr + 2, 2))
    return {
        "avail-idx": avail_idx,
        "used-idx": used_idx,
        "outstanding": (avail_idx - used_idx) & 0xFFFF,
    }


def queue_report(read: ReadGuest, queue: dict[str, Any]) -> dict[str, Any]:
    """One queue of a device's `stats` answer, with the guest ring's indices added (or why
    they could not be read)."""
    out = dict(queue)
    try:
        avail, used = int(queue["avail_addr"]), int(queue["used_addr"])
    except (KeyError, TypeError, ValueError) as e:
        out["guest-error"] = f"the device gave no ring addresses ({e!r}) in {queue!r:.200}"
        return out
    try:
        out["guest"] = ring_indices(read, avail, used)
    except ValueError as e:  # GuestMemoryError: the driver wrote addresses outside RAM
        out["guest-error"] = f"cannot read the ring (avail {avail:#x}, used {used:#x}): {e}"
    return out


def device_report(dev: AttachedDevice, read: ReadGuest) -> dict[str, Any]:
    """What one device and its rings say now."""
    out: dict[str, Any] = {
        "id": dev.id,
        "kind": dev.kind,
        "alive": dev.handle.alive,
        "direct-doorbells": dev.direct_doorbells,
    }
    try:
        stats = dict(dev.handle.stats())
    except Exception as e:  # gone or stuck: that is the finding
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    queues = stats.pop("queues", None)
    out["stats"] = stats
    if isinstance(queues, dict):
        out["queues"] = {str(i): queue_report(read, q) for i, q in queues.items()}
    return out


def devices_report(devices: list[AttachedDevice], read: ReadGuest) -> list[dict[str, Any]]:
    """`device_report` of every device, in attach order."""
    return [device_report(dev, read) for dev in devices]
