"""The destination side of shadowing: program a fresh device from the source's interception log.

The log names, per queue, the guest's ring addresses, the used index the guest has seen, and the
ordered DMA work requests that were forwarded to the source's device but not completed. The
fresh device is told to resume reading the guest's avail ring at the first of those, so each is
executed again here exactly as the guest submitted it (RX buffers reposted; block requests
re-issued against the shared image) — after checking against the guest's own ring, just
received, that the log describes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..devices.virtio.queue import QueueError, read_avail_entries
from ..errors import PtmigError
from .mapping import VcpuBufferView

if TYPE_CHECKING:
    from ..devices.attach import AttachedDevice
    from ..guest_state import DeviceSnapshot
    from ..vmparts import Guest


class ShadowRestoreError(PtmigError, ValueError):
    """The snapshot's in-flight requests do not describe the guest's ring as received."""


def restore_shadowed_device(machine: Guest, dev: AttachedDevice, snap: DeviceSnapshot) -> None:
    """Program `dev` from a shadowed device's snapshot, after checking each queue's in-flight
    requests against the guest's own avail ring (just received): the device will execute them
    again from there."""
    check_inflight(machine, dev, snap)
    dev.handle.set_state(snap.state.to_json())


def check_inflight(machine: Guest, dev: AttachedDevice, snap: DeviceSnapshot) -> None:
    """ShadowRestoreError unless each queue's in-flight requests are the guest's avail entries
    from the queue's next_avail on (on a post-copy destination, once its pages can come)."""
    ring = VcpuBufferView(machine.vm.memory)
    for index, reqs in sorted(snap.inflight.items()):
        if not reqs:
            continue
        st = snap.state.queues[index]
        try:
            heads = read_avail_entries(ring, st, len(reqs))
        except QueueError as e:
            raise ShadowRestoreError(f"device {dev.id}: {e}") from None
        for n, (req, head) in enumerate(zip(reqs, heads, strict=True)):
            want = (st.next_avail + n) & 0xFFFF
            if req.avail_index != want or req.head != head:
                raise ShadowRestoreError(
                    f"device {dev.id} queue {index}: in-flight request {n} is {req}, the "
                    f"guest's ring has head {head} at avail index {want}"
                )
