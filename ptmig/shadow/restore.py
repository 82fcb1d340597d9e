"""The destination side of shadowing: program a fresh device from the source's interception log.

The log names, per queue, the guest's ring addresses, the used index the guest has seen, and the
ordered DMA work requests that were forwarded to the source's device but not completed. The
fresh device is told to resume reading the guest's avail ring at the first of those, so each is
executed again here exactly as the guest submitted it (RX buffers reposted; block requests
re-issued against the shared image) — after checking against the guest's own ring, just
received, that the log describes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..devices.virtio.queue import QueueError, QueueState, read_avail_entries
from ..errors import PtmigError
from .mapping import VcpuBufferView

if TYPE_CHECKING:
    from ..devices.attach import AttachedDevice
    from ..vmparts import Guest


class ShadowRestoreError(PtmigError, ValueError):
    pass


def restore_shadowed_device(machine: Guest, dev: AttachedDevice, entry: dict[str, Any]) -> None:
    state = entry["state"]
    inflight = entry.get("inflight", {})
    if not isinstance(inflight, dict):
        raise ShadowRestoreError(f"device {dev.id}: in-flight list is not an object")
    ring = VcpuBufferView(machine.vm.memory)
    for q in state.get("queues", []):
        reqs = inflight.get(str(q.get("index")), [])
        if not isinstance(reqs, list) or len(reqs) > q.get("size", 0):
            raise ShadowRestoreError(f"device {dev.id} queue {q.get('index')}: bad in-flight list")
        if not reqs:
            continue
        try:
            st = QueueState(
                q["size"],
                q["desc_addr"],
                q["avail_addr"],
                q["used_addr"],
                q["next_avail"],
                q["next_used"],
                True,
            ).validate()
            heads = read_avail_entries(ring, st, len(reqs))
        except (QueueError, KeyError, TypeError, ValueError) as e:
            raise ShadowRestoreError(f"device {dev.id}: {e}") from None
        for n, (req, head) in enumerate(zip(reqs, heads, strict=True)):
            want = (st.next_avail + n) & 0xFFFF
            if req.get("avail_index") != want or req.get("head") != head:
                raise ShadowRestoreError(
                    f"device {dev.id} queue {q['index']}: in-flight request {n} is "
                    f"{req!r}, the guest's ring has head {head} at avail index {want}"
                )
    dev.handle.set_state(state)
