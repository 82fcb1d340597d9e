"""One shadowed device: the interception of its DMA work requests.

Submission (on a trapped doorbell): new avail entries are read from the guest's ring (vCPU
buffer) and each chain is walked and validated by the same rules the device applies
(`walk_chain`). Every page a request touches has a device buffer; the chain is recorded in the
VMM's private record (`DataplaneQueue.rec`, never device-reachable), the validated descriptors
are re-encoded into the shadow descriptor table, every byte of the chain is copied into the
device buffers (readable bytes for the device to read, writable ones so the device starts from
the guest's bytes), the head is published on the shadow avail ring, and only then is the device
kicked.

Completion (on the device's interrupt): each new element of the shadow used ring is checked
against the record (a head in flight, used.len no larger than the chain's writable bytes; else
the device is broken), the chain's whole device-writable area is copied back -- only the page
pieces whose bytes differ, each marked in the DMA dirty bitmap -- then the used element with the
device's len unchanged, then the used index. Then the guest is woken. Bytes the device did not
write were the guest's own at forwarding, so the guest sees what direct DMA would have left.

That per-request work runs natively (`native/dataplane.c`, bound in `native.py`). This class
owns what is decided once or rarely: building the shadow rings at entry, shadowing the pages of
a request the data plane stalled on (a guest page with no device buffer yet: map it, flush the
device's IOTLB, let the data plane go on), reclaiming idle buffers, and the interception log.

Queue numbering is shared: the k-th request the guest made available is the k-th request
published to the device, and the k-th used element of the device is the k-th the guest sees,
so avail and used indices mean the same thing on both rings.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..devices.control import DeviceState
from ..devices.virtio.constants import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_KNOWN_FLAGS,
)
from ..devices.virtio.queue import (
    DEFAULT_MAX_TOTAL_LEN,
    QueueError,
    QueueState,
    avail_pending,
    read_avail_entries,
    ring_regions,
    walk_chain,
    write_avail_idx,
)
from ..guest_state import InflightRequest
from ..layout import PAGE_SHIFT
from .mapping import IDLE_MAX, DeviceBufferView, ShadowError, ShadowMap, VcpuBufferView
from .native import (
    Q_STALLED,
    ST_BYTES_TO_DEVICE,
    ST_BYTES_TO_GUEST,
    ST_COMPLETED,
    ST_DOORBELLS,
    ST_FETCH_WAITS,
    ST_FETCHED,
    ST_FORWARDED,
    ST_GUEST_IRQS,
    ST_INTERRUPTS,
    ST_KICKS,
    ST_MARKED,
    ST_STALLS,
    ST_WAKEUPS,
    Dataplane,
    DataplaneDevice,
    DataplaneQueue,
)
from .reference import ReferenceDataplane, ReferenceDevice

if TYPE_CHECKING:
    from ..devices.attach import AttachedDevice
    from ..devices.virtio.mmio import MmioState
    from ..memory import GuestMemory
    from .pool import ShadowPool

log = logging.getLogger(__name__)


@dataclass
class ShadowQueue:
    index: int
    state: QueueState  # the guest's ring addresses; next_avail/next_used as at entry
    native: DataplaneQueue  # positions and in-flight heads, shared with the data plane

    @property
    def next_avail(self) -> int:
        """Next guest avail index to forward (= the shadow avail idx)."""
        return self.native.next_avail

    @property
    def next_used(self) -> int:
        """Next used index to sync (the same on both rings)."""
        return self.native.next_used

    def first_inflight(self) -> int:
        """Where a device must resume reading the guest's avail ring to redo every request
        that was forwarded but not completed (requests complete in order per queue)."""
        reqs = self.native.inflight()
        return reqs[0][0] if reqs else self.next_avail

    def snapshot(self) -> QueueState:
        s = self.state
        return QueueState(
            s.size,
            s.desc_addr,
            s.avail_addr,
            s.used_addr,
            self.first_inflight(),
            self.next_used,
            True,
        )


class ShadowStats:
    """The device's counters, read from the data plane's shared array."""

    def __init__(self, counters: Any) -> None:
        self._c = counters
        self.iotlb_invalidations = 0

    def _get(self, i: int) -> int:
        return int(self._c[i])

    requests_forwarded = property(lambda self: self._get(ST_FORWARDED))
    completions_synced = property(lambda self: self._get(ST_COMPLETED))
    bytes_to_device = property(lambda self: self._get(ST_BYTES_TO_DEVICE))
    bytes_to_guest = property(lambda self: self._get(ST_BYTES_TO_GUEST))
    doorbells = property(lambda self: self._get(ST_DOORBELLS))
    interrupts = property(lambda self: self._get(ST_INTERRUPTS))
    stalls = property(lambda self: self._get(ST_STALLS))
    pages_marked = property(lambda self: self._get(ST_MARKED))
    pages_fetched = property(lambda self: self._get(ST_FETCHED))
    fetch_waits = property(lambda self: self._get(ST_FETCH_WAITS))
    wakeups = property(lambda self: self._get(ST_WAKEUPS))
    device_kicks = property(lambda self: self._get(ST_KICKS))
    guest_interrupts = property(lambda self: self._get(ST_GUEST_IRQS))


class ShadowedDevice:
    """Shadow state of one attached device while a migration runs.

    `dataplane` is the VM's (the shadow engine runs its thread); without one the device gets a
    private data plane, driven only by `submit` and `complete` (tests, tools). A
    `ReferenceDataplane` (the Python reference of the same per-request work) may stand in for
    the native one: the differential tests run both. `intercept`: only the rings get device
    buffers; the data buffers stay mapped to guest RAM (x-dma-tracking intercept)."""

    def __init__(
        self,
        dev: AttachedDevice,
        pool: ShadowPool,
        memory: GuestMemory,
        dataplane: Dataplane | ReferenceDataplane | None = None,
        *,
        irq_fd: int = -1,
        view_base: int | None = None,
        intercept: bool = False,
    ) -> None:
        self.dev = dev
        self.memory = memory
        self.intercept = intercept
        self._own_dataplane = dataplane is None
        self.dataplane = dataplane if dataplane is not None else Dataplane(memory, pool)
        self.native: DataplaneDevice | ReferenceDevice = self.dataplane.add_device(
            irq_fd, intercept=intercept
        )
        self.map = ShadowMap(
            pool, dev.iommu, memory, self.native, invalidate=self._invalidate, view_base=view_base
        )
        self.vcpu_buf = VcpuBufferView(memory)
        self.dev_buf = DeviceBufferView(self.map)
        self.queues: dict[int, ShadowQueue] = {}
        self.stats = ShadowStats(self.native.stats)
        self._broken: str | None = None
        self.kind = ""  # the device model ("net" or "blk"), from the state it was built from
        self.mmio: MmioState | None = None  # the register file as the VMM knows it
        self.vmm_doorbells: dict[int, int] = {}  # queue -> the VMM's trapping eventfd
        self.inflight_pages_marked = 0  # intercept: in-flight writable pages at the switchover
        self.enter_ms = 0.0  # entering: how long the device was quiesced (quiesce to resume)
        # post-copy destination: the driver reconfigured the device while pages were missing;
        # held quiesced and shadowed, its rings are the driver's new ones when it leaves
        self.reconfigured = False

    @property
    def broken(self) -> str | None:
        """Why shadowing stopped for this device (here or in the data plane), or None."""
        return self._broken or self.native.error

    def _invalidate(self) -> None:
        handle = getattr(self.dev, "handle", None)
        if handle is None:
            raise ShadowError("no device to invalidate the IOTLB of")
        handle.iotlb_invalidate()
        self.stats.iotlb_invalidations += 1

    def flush_mappings(self) -> None:
        """Flush the device's IOTLB if new device buffers were mapped (before it may use them)."""
        if self.map.dirty_mappings and getattr(self.dev, "handle", None) is not None:
            self._invalidate()
            self.map.invalidated()

    # --- building the device buffers -------------------------------------------------------

    def build(
        self,
        state: DeviceState,
        doorbells: dict[int, int] | None = None,
        kicks: dict[int, int] | None = None,
    ) -> None:
        """After the device quiesced: shadow its rings, point its IOMMU domain at the device
        buffers only. `state` is the device's own report of its registers and queue positions;
        `doorbells` and `kicks` are, per queue, the VMM's trapping eventfd and the device's
        doorbell, which the data plane thread waits on and rings."""
        self.kind, self.mmio = state.kind, state.mmio
        if not self.intercept:  # intercept keeps the identity map; the ring pages are remapped
            self.map.iommu.unmap(0, self.map.iommu.iova_pages)
        with self.dataplane.locked():
            for index, queue in sorted(state.queues.items()):
                if not queue.ready:
                    continue
                st = queue.validate()
                for addr, length in ring_regions(st):
                    for gpfn in range(addr >> PAGE_SHIFT, (addr + length - 1 >> PAGE_SHIFT) + 1):
                        self.map.acquire(gpfn, copy=True)
                # The device buffer's avail ring starts where the device stopped reading;
                # requests the guest made available since are forwarded by the first submit.
                write_avail_idx(self.dev_buf, st, st.next_avail)
                self.dev_buf.write(st.avail_addr, b"\0\0")  # see below: always interrupt us
                native = self.native.add_queue(
                    index,
                    st,
                    (doorbells or {}).get(index, -1),
                    (kicks or {}).get(index, -1),
                )
                self.queues[index] = ShadowQueue(index, st, native)
        # The guest's VIRTQ_AVAIL_F_NO_INTERRUPT is never copied to the shadow avail ring: the
        # device must always interrupt the VMM, which then decides what the guest sees.

    def release(self) -> None:
        """Drop every device buffer (the caller restores the identity map)."""
        with self.dataplane.locked():
            for sq in self.queues.values():
                sq.native.forget()
            self.map.release_all()

    def close(self) -> None:
        if self._own_dataplane:
            self.dataplane.close()

    # --- submission ---------------------------------------------------------------------------

    def submit(self, qi: int, *, flush: bool = True) -> bool:
        """Forward the guest's new requests on queue `qi`, shadowing pages as needed. Returns
        True if any were forwarded (the caller then flushes mappings and kicks the device).
        `flush=False`: the device is quiesced and the caller invalidates its IOTLB before it
        resumes (entering shadow mode), so new device buffers need no flush of their own."""
        with self.dataplane.locked():
            return self.submit_locked(qi, flush=flush)

    def submit_locked(self, qi: int, *, flush: bool = True) -> bool:
        if self.broken is not None or qi not in self.queues:
            return False
        forwarded = 0
        while True:
            n = self.native.forward(qi)
            if n < 0:
                return False
            forwarded += n
            if not self.queues[qi].native.stalled:
                return forwarded > 0
            if not self.shadow_stalled(qi, flush=flush):
                return False

    def shadow_stalled(self, qi: int, *, flush: bool = True) -> bool:
        """Give device buffers to the pages of the request queue `qi` stalled on -- and of the
        requests behind it, so a burst costs one IOTLB flush -- then let the queue go on.
        Returns False if the device broke (a hostile ring, the pool exhausted). `flush=False`
        leaves the flush to the caller (see `submit`)."""
        sq = self.queues[qi]
        st = sq.state
        try:
            view = QueueState(
                st.size,
                st.desc_addr,
                st.avail_addr,
                st.used_addr,
                sq.next_avail,
                sq.next_used,
                True,
            )
            heads = read_avail_entries(self.vcpu_buf, view, avail_pending(self.vcpu_buf, view))
            held = self._acquire_chains(st, heads)
            self.map.release_many(held)  # unreferenced again: the data plane takes them over
            if flush:
                self.flush_mappings()
        except (QueueError, ShadowError) as e:
            self.fail(f"queue {qi}: {e}")
            return False
        sq.native.pos[Q_STALLED] = 0
        return True

    def _acquire_chains(self, st: QueueState, heads: list[int]) -> list[int]:
        """Reference the device buffer of every page of the chains at `heads`, in order, and
        return the pages referenced (one entry per reference). A chain that fails (a hostile
        ring, a page outside RAM, the pool exhausted) keeps none of its pages and ends the
        burst; if it is the first, the error is raised (the device cannot go on).

        The chains are walked first -- from one read of the descriptor table, with every check
        of `walk_chain` -- and their pages then acquired in one pass (`acquire_many`): the same
        buffers, references and errors as acquiring chain by chain, page by page."""
        mem = DescriptorTableSnapshot.of(self.vcpu_buf, st)
        walk_error: QueueError | None = None
        if isinstance(mem, DescriptorTableSnapshot):
            pages, ends, good = walk_chains(mem.data, st.size, heads)
            if good < len(heads):  # the first bad chain: its error, from `walk_chain` itself
                try:
                    walk_chain(mem, st, None, heads[good])
                except QueueError as e:
                    walk_error = e
                else:
                    raise ShadowError(f"chain at head {heads[good]}: the two walks disagree")
        else:
            plist: list[int] = []
            ends = []
            for head in heads:
                try:
                    chain = walk_chain(mem, st, None, head)
                except QueueError as e:
                    walk_error = e
                    break
                for d in chain.descriptors:
                    first, last = d.addr >> PAGE_SHIFT, (d.addr + d.length - 1) >> PAGE_SHIFT
                    plist.extend(range(first, last + 1))
                ends.append(len(plist))
            pages = np.asarray(plist, dtype=np.int64)
        try:
            self.map.acquire_many(pages)
        except ShadowError as e:
            got: int = getattr(e, "acquired", 0)
            n = bisect_right(ends, got)  # the chain the failing page belongs to
            start = ends[n - 1] if n else 0
            for gpfn in pages[start:got].tolist():  # that chain's pages acquired so far
                self.map.release(gpfn)
            if n == 0:
                raise
            return pages[:start].tolist()
        if walk_error is not None and not ends:
            raise walk_error
        return pages.tolist()

    def reclaim_idle(self) -> None:
        """Unmap the oldest idle device buffers once there are more than IDLE_MAX."""
        if self.map.idle_count > IDLE_MAX:
            self.map.reclaim()

    # --- completion ---------------------------------------------------------------------------

    def complete(self) -> int:
        """Sync every new completion of every queue into guest RAM. Returns how many."""
        with self.dataplane.locked():
            return self.complete_locked()

    def complete_locked(self) -> int:
        if self.broken is not None:
            return 0
        return max(self.native.complete(), 0)

    # --- state -------------------------------------------------------------------------------

    def inflight_writable_pages(self, taken: Mapping[int, int] | None = None) -> list[int]:
        """Guest pages the device may write for a request in flight (from the VMM's record of
        the forwarded chains, never from the shadow rings the device can write).

        `taken`: per queue, the avail index the quiesced device reports it will read next
        (its quiesce reply). A request published at or after it was never taken off the shadow
        ring, so the device cannot have written its buffers: it is left out. Without a report,
        or with one outside the forwarded range, every request in flight counts."""
        pages: set[int] = set()
        for qi, sq in self.queues.items():
            reqs = sq.native.inflight()
            if taken is not None:
                reqs = requests_taken(reqs, sq.next_avail, taken.get(qi))
            for _, head in reqs:
                for addr, length, writable in sq.native.recorded_chain(head):
                    if writable:
                        pages.update(
                            range(addr >> PAGE_SHIFT, ((addr + length - 1) >> PAGE_SHIFT) + 1)
                        )
        return sorted(pages)

    @property
    def pages_marked(self) -> int:
        """Intercept: dirty marks for the device's direct writes (page pieces of completed
        requests, and the pages of requests in flight at the switchover)."""
        return self.stats.pages_marked + self.inflight_pages_marked

    def fail(self, reason: str) -> None:
        """Stop shadowing this device (the migration then fails). Needs the data plane lock."""
        if self.broken is None:
            self._broken = reason
            self.native.fail(reason)
            log.error("shadowing %s stopped: %s", self.dev.id, reason)

    def interception_log(self) -> tuple[DeviceState, dict[int, tuple[InflightRequest, ...]]]:
        """What the destination needs, from what the VMM itself saw: registers and ring
        positions, and per queue the ordered requests that were forwarded but not completed."""
        if self.mmio is None:
            raise ShadowError(f"device {self.dev.id} was never built: no interception log")
        queues = {sq.index: replace(sq.snapshot(), ready=True) for sq in self.queues.values()}
        inflight = {
            sq.index: tuple(InflightRequest(a, h) for a, h in sq.native.inflight())
            for sq in self.queues.values()
        }
        return DeviceState(self.kind, self.mmio, queues), inflight


_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])


def walk_chains(table: bytes, size: int, heads: list[int]) -> tuple[np.ndarray, list[int], int]:
    """`walk_chain` for each of `heads` in turn, all at once: a step of every chain per pass
    over the descriptor table (`table`: its `size` descriptors), by the same checks. Returns
    the pages of the chains that pass, in order (a page per descriptor page, descriptors in
    chain order), where each chain's pages end, and how many chains pass before the first
    that does not (its error is `walk_chain`'s to tell)."""
    t = np.frombuffer(table, dtype=_DESC_DTYPE, count=size)
    h = np.asarray(heads, dtype=np.int64)
    n = h.size
    bad = (h < 0) | (h >= size)
    cur = np.where(bad, 0, h)
    active = ~bad
    seen_writable = np.zeros(n, dtype=bool)
    total = np.zeros(n, dtype=np.int64)
    recs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    step = 0
    while True:
        first_bad = int(np.argmax(bad)) if bad.any() else n
        active[first_bad:] = False  # chains behind a bad one do not matter
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        if step >= size:  # longer than the queue: a loop in the next links
            bad[idx] = True
            continue
        d = t[cur[idx]]
        addr, length = d["addr"], d["len"].astype(np.uint64)
        flags, nxt = d["flags"].astype(np.int64), d["next"].astype(np.int64)
        writable = (flags & VIRTQ_DESC_F_WRITE) != 0
        more = (flags & VIRTQ_DESC_F_NEXT) != 0
        tot = total[idx] + length.astype(np.int64)
        err = (
            ((flags & ~VIRTQ_DESC_KNOWN_FLAGS) != 0)
            | ((flags & VIRTQ_DESC_F_INDIRECT) != 0)
            | (length == 0)
            | (addr > np.uint64(0) - length)  # addr + length > 2**64 (u64 arithmetic)
            | (tot > DEFAULT_MAX_TOTAL_LEN)
            | (seen_writable[idx] & ~writable)
            | (more & (nxt >= size))
        )
        bad[idx[err]] = True
        ok = ~err
        with np.errstate(over="ignore"):
            last = (addr + length - np.uint64(1)) >> np.uint64(PAGE_SHIFT)
        recs.append(
            (
                idx[ok],
                np.full(int(ok.sum()), step, dtype=np.int64),
                (addr[ok] >> np.uint64(PAGE_SHIFT)).astype(np.int64),
                last[ok].astype(np.int64),
            )
        )
        total[idx] = tot
        seen_writable[idx] |= writable
        go = ok & more
        cur[idx[go]] = nxt[go]
        active[idx] = False
        active[idx[go]] = True
        step += 1
    good = int(np.argmax(bad)) if bad.any() else n
    if not recs or good == 0:
        return np.zeros(0, dtype=np.int64), [], good
    chain, steps, first, last = (np.concatenate(x) for x in zip(*recs, strict=True))
    keep = chain < good
    chain, steps, first, last = chain[keep], steps[keep], first[keep], last[keep]
    order = np.lexsort((steps, chain))
    chain, first, last = chain[order], first[order], last[order]
    count = last - first + 1
    starts = np.cumsum(count) - count
    pages = np.repeat(first, count) + (np.arange(int(count.sum())) - np.repeat(starts, count))
    ends = np.cumsum(np.bincount(chain, weights=count, minlength=good)).astype(np.int64)
    return pages, ends.tolist(), good


class DescriptorTableSnapshot:
    """A `RingMemory` serving reads inside one queue's descriptor table from a copy read in
    one go (the chains of a burst are walked from it); other reads go to `mem`."""

    def __init__(self, mem: Any, base: int, data: bytes) -> None:
        self.mem = mem
        self.base = base
        self.data = data

    @classmethod
    def of(cls, mem: Any, st: QueueState) -> Any:
        """The snapshot of `st`'s table, or `mem` itself if the table cannot be read whole
        (each descriptor read then fails or not as it would have)."""
        try:
            data = mem.read(st.desc_addr, 16 * st.size)
        except QueueError:
            return mem
        return cls(mem, st.desc_addr, data)

    def read(self, addr: int, length: int) -> bytes:
        off = addr - self.base
        if 0 <= off and off + length <= len(self.data):
            return self.data[off : off + length]
        return bytes(self.mem.read(addr, length))

    def write(self, addr: int, data: bytes) -> None:
        raise QueueError(f"the descriptor table copy is read-only ({addr:#x})")


def requests_taken(
    inflight: list[tuple[int, int]], forwarded: int, device_next: int | None
) -> list[tuple[int, int]]:
    """The in-flight (avail index, head) requests, oldest first, that a device whose next avail
    index is `device_next` has taken off the ring; `forwarded` is the next index the VMM would
    publish. A position outside [oldest in flight, forwarded] (16-bit ring arithmetic) is not
    believed: every request counts then, as it does with no position at all."""
    if device_next is None or not inflight:
        return inflight
    first = inflight[0][0]
    took = (device_next - first) & 0xFFFF
    if took > (forwarded - first) & 0xFFFF:
        return inflight
    return [r for r in inflight if (r[0] - first) & 0xFFFF < took]


def quiesced_positions(reply: Mapping[str, Any] | None) -> dict[int, int] | None:
    """Per queue, the next avail index a device's quiesce reply reports (None if it reports
    none, or not in the shape `{"queues": {"0": {"next_avail": N}, ...}}`)."""
    queues = reply.get("queues") if isinstance(reply, Mapping) else None
    if not isinstance(queues, Mapping):
        return None
    out: dict[int, int] = {}
    for key, pos in queues.items():
        nxt = pos.get("next_avail") if isinstance(pos, Mapping) else None
        if not (isinstance(key, str) and key.isdigit()) or type(nxt) is not int:
            return None
        out[int(key)] = nxt & 0xFFFF
    return out
