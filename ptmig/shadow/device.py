"""One shadowed device: the interception of its DMA work requests.

Submission (`submit`, on a trapped doorbell): new avail entries are read from the guest's ring
(vCPU buffer) and each chain is walked with the same validation the device uses
(`walk_chain`). Every page a request touches gets a device buffer; the validated descriptors are
re-encoded into the shadow descriptor table, driver-written (device-readable) bytes are copied
into the device buffer, the head is published on the shadow avail ring, and only then is the
device kicked.

Completion (`complete`, on the device's interrupt): new entries of the shadow used ring are
synced back: exactly `used.len` bytes across the device-writable descriptors — never whole
pages, the guest may be writing the rest of them — then the used element, then the used index,
all through the VMM's marking write path. Then the guest is woken.

Queue numbering is shared: the k-th request the guest made available is the k-th request
published to the device, and the k-th used element of the device is the k-th the guest sees,
so avail and used indices mean the same thing on both rings.
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..devices.virtio.queue import (
    DescriptorChain,
    QueueError,
    QueueState,
    avail_pending,
    read_avail_entries,
    read_used_entries,
    read_used_idx,
    ring_regions,
    walk_chain,
    write_avail_entry,
    write_avail_idx,
    write_used_elem,
    write_used_idx,
)
from ..layout import PAGE_SHIFT
from .mapping import DeviceBufferView, ShadowError, ShadowMap, VcpuBufferView

if TYPE_CHECKING:
    from ..devices.attach import AttachedDevice
    from ..memory import GuestMemory
    from .pool import ShadowPool

log = logging.getLogger(__name__)

_DESC = struct.Struct("<QIHH")
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2


@dataclass
class DmaWorkRequest:
    """A request the guest submitted and the VMM forwarded to the device."""

    avail_index: int
    chain: DescriptorChain
    pages: list[int]


@dataclass
class ShadowQueue:
    index: int
    state: QueueState  # the guest's ring addresses; next_avail/next_used as at entry
    next_avail: int  # next guest avail index to forward (= shadow avail idx)
    next_used: int  # next used index to sync (same on both rings)
    inflight: OrderedDict[int, DmaWorkRequest] = field(default_factory=OrderedDict)
    heads: dict[int, int] = field(default_factory=dict)  # in-flight head -> avail index

    def snapshot(self) -> QueueState:
        s = self.state
        return QueueState(s.size, s.desc_addr, s.avail_addr, s.used_addr,
                          self.first_inflight(), self.next_used, True)

    def first_inflight(self) -> int:
        """Where a device must resume reading the guest's avail ring to redo every request
        that was forwarded but not completed (requests complete in order per queue)."""
        if not self.inflight:
            return self.next_avail
        return next(iter(self.inflight.values())).avail_index


@dataclass
class ShadowStats:
    requests_forwarded: int = 0
    completions_synced: int = 0
    bytes_to_device: int = 0
    bytes_to_guest: int = 0
    doorbells: int = 0
    interrupts: int = 0
    iotlb_invalidations: int = 0


class ShadowedDevice:
    """Shadow state of one attached device while a migration runs."""

    def __init__(self, dev: AttachedDevice, pool: ShadowPool, memory: GuestMemory) -> None:
        self.dev = dev
        self.memory = memory
        self.map = ShadowMap(pool, dev.iommu, memory, invalidate=self._invalidate)
        self.vcpu_buf = VcpuBufferView(memory)
        self.dev_buf = DeviceBufferView(self.map)
        self.queues: dict[int, ShadowQueue] = {}
        self.stats = ShadowStats()
        self.broken: str | None = None
        self.mmio: dict[str, Any] | None = None  # the register file as the VMM knows it
        self.vmm_doorbells: dict[int, int] = {}  # queue -> the VMM's trapping eventfd

    def _invalidate(self) -> None:
        handle = getattr(self.dev, "handle", None)
        if handle is None:
            raise ShadowError("no device to invalidate the IOTLB of")
        handle.iotlb_invalidate()
        self.stats.iotlb_invalidations += 1

    # --- building the device buffers -------------------------------------------------------

    def build(self, device_state: dict[str, Any]) -> None:
        """After the device quiesced: shadow its rings, point its IOMMU domain at the device
        buffers only. `device_state` is the device's own report of its queue positions."""
        self.mmio = device_state["mmio"]
        self.map.iommu.unmap(0, self.map.iommu.iova_pages)
        for q in device_state["queues"]:
            if not q.get("ready", True):
                continue
            st = QueueState(q["size"], q["desc_addr"], q["avail_addr"], q["used_addr"],
                            q["next_avail"], q["next_used"], True).validate()
            sq = ShadowQueue(q["index"], st, st.next_avail, st.next_used)
            for addr, length in ring_regions(st):
                for gpfn in range(addr >> PAGE_SHIFT, (addr + length - 1 >> PAGE_SHIFT) + 1):
                    self.map.acquire(gpfn, copy=True)
            # The device buffer's avail ring starts where the device stopped reading; requests
            # the guest made available since are forwarded by the first submit().
            write_avail_idx(self.dev_buf, st, sq.next_avail)
            write_avail_flags_zero(self.dev_buf, st)
            self.queues[sq.index] = sq

    def release(self) -> None:
        """Drop every device buffer (the caller restores the identity map)."""
        for sq in self.queues.values():
            sq.inflight.clear()
            sq.heads.clear()
        self.map.release_all()

    # --- submission ---------------------------------------------------------------------------

    def submit(self, qi: int) -> bool:
        """Forward the guest's new requests on queue `qi`. Returns True if any were forwarded
        (the caller then invalidates the IOTLB if needed and kicks the device)."""
        if self.broken is not None:
            return False
        sq = self.queues.get(qi)
        if sq is None:
            return False
        self.stats.doorbells += 1
        try:
            view = QueueState(sq.state.size, sq.state.desc_addr, sq.state.avail_addr,
                              sq.state.used_addr, sq.next_avail, sq.next_used, True)
            count = avail_pending(self.vcpu_buf, view)
            if count == 0:
                return False
            heads = read_avail_entries(self.vcpu_buf, view, count)
            for head in heads:
                self._forward(sq, head)
            write_avail_idx(self.dev_buf, sq.state, sq.next_avail)
        except (QueueError, ShadowError) as e:
            self.fail(f"queue {qi}: {e}")
            return False
        return True

    def _forward(self, sq: ShadowQueue, head: int) -> None:
        st = sq.state
        if head in sq.heads:
            raise QueueError(f"head {head} made available again while still in flight", head=head)
        chain = walk_chain(self.vcpu_buf, st.desc_addr, st.size, head)
        pages: list[int] = []
        try:
            for d in chain.descriptors:
                last = (d.addr + d.length - 1) >> PAGE_SHIFT
                for gpfn in range(d.addr >> PAGE_SHIFT, last + 1):
                    self.map.acquire(gpfn, copy=False)
                    pages.append(gpfn)
        except ShadowError:
            for gpfn in pages:
                self.map.release(gpfn)
            raise
        # The validated chain, re-encoded: the device never sees a descriptor we did not check.
        idx = chain.indices
        for n, d in enumerate(chain.descriptors):
            last = n == len(chain.descriptors) - 1
            flags = (0 if last else VRING_DESC_F_NEXT) | (VRING_DESC_F_WRITE if d.writable else 0)
            raw = _DESC.pack(d.addr, d.length, flags, 0 if last else idx[n + 1])
            self.dev_buf.write(st.desc_addr + 16 * idx[n], raw)
        for d in chain.readable:
            self.map.write(d.addr, self.memory.slice(d.addr, d.length))
            self.stats.bytes_to_device += d.length
        write_avail_entry(self.dev_buf, st, sq.next_avail, head)
        sq.inflight[sq.next_avail] = DmaWorkRequest(sq.next_avail, chain, pages)
        sq.heads[head] = sq.next_avail
        sq.next_avail = (sq.next_avail + 1) & 0xFFFF
        self.stats.requests_forwarded += 1

    # --- completion ---------------------------------------------------------------------------

    def complete(self) -> int:
        """Sync every new completion of every queue into guest RAM. Returns how many."""
        if self.broken is not None:
            return 0
        self.stats.interrupts += 1
        done = 0
        try:
            for sq in self.queues.values():
                done += self._complete_queue(sq)
        except (QueueError, ShadowError) as e:
            self.fail(f"completion: {e}")
        return done

    def _complete_queue(self, sq: ShadowQueue) -> int:
        st = sq.state
        used_idx = read_used_idx(self.dev_buf, st)
        count = (used_idx - sq.next_used) & 0xFFFF
        if count == 0:
            return 0
        if count > len(sq.inflight):
            raise ShadowError(f"device reports {count} completions on queue {sq.index} with "
                              f"{len(sq.inflight)} requests in flight")
        entries = read_used_entries(self.dev_buf, st, sq.next_used, count)
        for n, (head, length) in enumerate(entries):
            key = sq.heads.pop(head, None)
            if key is None:
                raise ShadowError(f"device completed head {head} on queue {sq.index}, which is "
                                  "not in flight")
            req = sq.inflight.pop(key)
            written = self._copy_back(req.chain, length)
            write_used_elem(self.vcpu_buf, st, sq.next_used + n, head, written)
            for gpfn in req.pages:
                self.map.release(gpfn)
        sq.next_used = (sq.next_used + count) & 0xFFFF
        write_used_idx(self.vcpu_buf, st, sq.next_used)
        self.stats.completions_synced += count
        return count

    def _copy_back(self, chain: DescriptorChain, length: int) -> int:
        """Copy exactly the bytes the device wrote (used.len across the writable descriptors)."""
        left = min(length, chain.total_writable)
        total = left
        for d in chain.writable:
            if left <= 0:
                break
            n = min(left, d.length)
            self.memory.write(d.addr, self.map.read(d.addr, n))
            left -= n
        self.stats.bytes_to_guest += total
        return total

    # --- state -------------------------------------------------------------------------------

    def inflight_writable_pages(self) -> list[int]:
        return sorted({gpfn for sq in self.queues.values() for r in sq.inflight.values()
                       for d in r.chain.writable
                       for gpfn in range(d.addr >> PAGE_SHIFT,
                                         ((d.addr + d.length - 1) >> PAGE_SHIFT) + 1)})

    def fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.error("shadowing %s stopped: %s", self.dev.id, reason)

    def interception_log(self) -> dict[str, Any]:
        """What the destination needs, from what the VMM itself saw: registers, ring
        addresses, and the ordered list of requests that were forwarded but not completed."""
        return {
            "mmio": self.mmio,
            "queues": [
                {**_queue_json(sq.snapshot()), "index": sq.index,
                 "inflight": [{"avail_index": r.avail_index, "head": r.chain.head}
                              for r in sq.inflight.values()]}
                for sq in self.queues.values()
            ],
        }


def _queue_json(st: QueueState) -> dict[str, Any]:
    return {"size": st.size, "desc_addr": st.desc_addr, "avail_addr": st.avail_addr,
            "used_addr": st.used_addr, "next_avail": st.next_avail, "next_used": st.next_used,
            "ready": True}


def write_avail_flags_zero(mem: DeviceBufferView, st: QueueState) -> None:
    """The device must always interrupt the VMM: the guest's NO_INTERRUPT flag is not copied."""
    mem.write(st.avail_addr, b"\0\0")
