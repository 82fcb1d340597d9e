"""The shadow data plane in Python: the reference the native one (`native/dataplane.c`) is
tested against.

It owns the same per-request work, by the same rules, on the same shared arrays
(`DataplaneQueue`: positions, in-flight heads and the private record of every forwarded chain;
the device's page table and counters):

  forward   walk and validate each chain the guest made available, record it, re-encode it
            into the shadow descriptor table, copy all its bytes (readable and writable) into
            the device buffers, publish the head on the shadow avail ring;
  complete  for each new element of the shadow used ring, check (id, len) against the record,
            copy the chain's whole device-writable area back (only the page pieces whose bytes
            differ, each marked dirty), write the element with the device's len, then the used
            idx.

A device added with `intercept` follows the intercept rules of the native one: only pages
with a device buffer (the rings') are copied, a chain never stalls, no page references are
taken, and a completion marks every page piece of the writable buffers that has no device
buffer dirty (the device wrote it in guest RAM) instead of copying it back. Guest addresses
must lie in one RAM region (`GuestMemory.check`), never in the gap between regions.

It has no thread: `ShadowedDevice.submit` and `complete` drive it. Slow and plain on purpose --
every step is written out so that a reader can check the native code against it, and the
differential tests run both on identical inputs and compare guest memory byte for byte.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from .. import bitmap
from ..devices.virtio.constants import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_KNOWN_FLAGS,
)
from ..devices.virtio.queue import QueueState
from ..errors import PtmigError
from ..layout import PAGE_SHIFT, PAGE_SIZE
from ..memory import GuestMemory, GuestMemoryError
from .native import (
    ERROR_LEN,
    Q_INFLIGHT,
    Q_NEXT_AVAIL,
    Q_NEXT_USED,
    Q_STALLED,
    ST_ACTIVE,
    ST_BYTES_TO_DEVICE,
    ST_BYTES_TO_GUEST,
    ST_CLOCK,
    ST_COMPLETED,
    ST_FORWARDED,
    ST_IDLE,
    ST_MARKED,
    ST_PEAK,
    ST_REUSED,
    ST_STALLS,
    DataplaneError,
    DataplaneQueue,
    device_tables,
)
from .pool import ShadowPool

MAX_CHAIN_BYTES = 64 << 20  # as dataplane.c (queue.py DEFAULT_MAX_TOTAL_LEN)
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_ELEM = struct.Struct("<II")


class Broken(PtmigError):
    """The device can no longer be shadowed (the text says why)."""


class ReferenceDevice:
    """One device's page table, counters and queues, with the per-request work in Python."""

    def __init__(self, dp: ReferenceDataplane, npages: int, intercept: bool = False) -> None:
        self.dp = dp
        self.intercept = intercept
        self.slot, self.refs, self.stamp, self.stats = device_tables(npages)
        self.queues: dict[int, DataplaneQueue] = {}
        self._rings: dict[int, QueueState] = {}  # each queue's ring addresses
        self._error: str | None = None

    def add_queue(
        self, index: int, st: QueueState, doorbell_fd: int = -1, kick_fd: int = -1
    ) -> DataplaneQueue:
        """As `DataplaneDevice.add_queue` (the fds are unused: there is no thread)."""
        if st.size == 0 or st.size & (st.size - 1) or st.size > 32768:
            raise DataplaneError(f"queue {index}: {errno.errorcode[errno.EINVAL]} (size {st.size})")
        q = DataplaneQueue(index, st)
        self.queues[index] = q
        self._rings[index] = st
        return q

    @property
    def error(self) -> str | None:
        return self._error

    def fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason[: ERROR_LEN - 1] or "shadowing failed"

    # --- memory -----------------------------------------------------------------------------

    def _guest(self, gpa: int, length: int, what: str) -> memoryview:
        """Guest RAM [gpa, +length), which must lie in one RAM region (never a gap)."""
        try:
            self.dp.memory.check(gpa, length)
        except GuestMemoryError:
            raise Broken(f"{what} {gpa:#x}+{length} is outside guest RAM") from None
        return self.dp.guest[gpa : gpa + length]

    def _devbuf(self, iova: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(pool byte offset, offset in the data, n) pieces of device buffer [iova, +length)."""
        for off, start, n in self._pieces(iova, length):
            if off < 0:
                raise Broken(f"IOVA {iova + start:#x} has no device buffer")
            yield off, start, n

    def _pieces(self, iova: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(pool byte offset or -1 where the page has no device buffer, offset in the data, n)
        page pieces of [iova, +length)."""
        done = 0
        while done < length:
            addr = iova + done
            gpfn = addr >> PAGE_SHIFT
            n = min(PAGE_SIZE - (addr & (PAGE_SIZE - 1)), length - done)
            pfn = int(self.slot[gpfn]) if 0 <= gpfn < self.slot.size else -1
            ok = 0 <= pfn < self.dp.pool.pages
            yield ((pfn << PAGE_SHIFT) + (addr & (PAGE_SIZE - 1)) if ok else -1), done, n
            done += n

    def _devbuf_write(self, iova: int, data: bytes | memoryview) -> None:
        pool = self.dp.pool.mmap
        for off, start, n in self._devbuf(iova, len(data)):
            pool[off : off + n] = data[start : start + n]

    def _devbuf_read(self, iova: int, length: int) -> bytes:
        pool = self.dp.pool.mmap
        return b"".join(pool[off : off + n] for off, _, n in self._devbuf(iova, length))

    # --- page references (as page_get / page_put) -------------------------------------------

    def _pages(self, chain: list[tuple[int, int, int, bool]]) -> Iterator[int]:
        for _, addr, length, _ in chain:
            yield from range(addr >> PAGE_SHIFT, ((addr + length - 1) >> PAGE_SHIFT) + 1)

    def _get(self, gpfn: int) -> None:
        c = self.stats
        if self.refs[gpfn] == 0:
            c[ST_IDLE] -= 1
            if self.stamp[gpfn]:
                c[ST_REUSED] += 1
            c[ST_ACTIVE] += 1
            c[ST_PEAK] = max(int(c[ST_PEAK]), int(c[ST_ACTIVE]))
        self.refs[gpfn] += 1

    def _put(self, gpfn: int) -> None:
        if self.refs[gpfn] <= 0:
            return
        self.refs[gpfn] -= 1
        if self.refs[gpfn] == 0:
            c = self.stats
            c[ST_ACTIVE] -= 1
            c[ST_IDLE] += 1
            c[ST_CLOCK] += 1
            self.stamp[gpfn] = int(c[ST_CLOCK]) & 0xFFFF_FFFF

    # --- forwarding -------------------------------------------------------------------------

    def forward(self, index: int) -> int:
        """Forward queue `index`'s new requests; how many, or -1 if the device broke."""
        q = self.queues.get(index)
        if q is None:
            return -errno.EINVAL
        if self._error is not None:
            return -1
        if q.stalled:
            return 0
        try:
            return self._forward_queue(q, self._rings[index])
        except Broken as e:
            self.fail(f"queue {index}: {e}")
            return -1

    def _forward_queue(self, q: DataplaneQueue, ring: QueueState) -> int:
        (avail_idx,) = _U16.unpack(self._guest(ring.avail_addr + 2, 2, "avail ring"))
        nxt = q.next_avail
        pending = (avail_idx - nxt) & 0xFFFF
        if pending > ring.size:
            raise Broken(
                f"avail idx {avail_idx} is {pending} entries ahead of next_avail {nxt}, "
                f"more than the queue size {ring.size}"
            )
        done = 0
        for _ in range(pending):
            (head,) = _U16.unpack(
                self._guest(ring.avail_addr + 4 + 2 * (nxt % ring.size), 2, "avail ring entry")
            )
            if head >= ring.size:
                raise Broken(
                    f"avail index {nxt} has head {head}, out of range for queue size {ring.size}"
                )
            if q.head_avail[head] >= 0:
                raise Broken(f"head {head} made available again while still in flight")
            chain = self._walk(q, ring, head)
            if not self.intercept and any(self.slot[p] < 0 for p in self._pages(chain)):
                q.pos[Q_STALLED] = 1
                self.stats[ST_STALLS] += 1
                break
            self._forward_chain(q, ring, head, chain, nxt)
            done += 1
            nxt = (nxt + 1) & 0xFFFF
        if done:
            if (ring.avail_addr + 2) & (PAGE_SIZE - 1) > PAGE_SIZE - 2:
                raise Broken("the shadow avail ring is not in device buffers")
            self._devbuf_write(ring.avail_addr + 2, _U16.pack(nxt))
            q.pos[Q_NEXT_AVAIL] = nxt
        return done

    def _walk(
        self, q: DataplaneQueue, ring: QueueState, head: int
    ) -> list[tuple[int, int, int, bool]]:
        """The guest's chain at `head`, validated: (index, addr, len, writable) per
        descriptor."""
        out: list[tuple[int, int, int, bool]] = []
        total = 0
        seen_writable = False
        index = head
        while True:
            if len(out) >= ring.size:
                raise Broken(
                    f"chain at head {head} is longer than {ring.size} descriptors "
                    "(a loop in the next links?)"
                )
            addr, length, flags, nxt = _DESC.unpack(
                self._guest(ring.desc_addr + 16 * index, 16, f"descriptor {index}")
            )
            where = f"descriptor {index} (chain head {head})"
            if flags & ~VIRTQ_DESC_KNOWN_FLAGS:
                raise Broken(f"{where} flags={flags:#x} has reserved bits set")
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise Broken(f"{where} is INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated")
            if length == 0:
                raise Broken(f"{where} has length 0")
            self._guest(addr, length, f"{where} buffer")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise Broken(f"chain at head {head} describes more than {MAX_CHAIN_BYTES} bytes")
            owner = int(q.rec[index]["owner"])
            if owner >= 0:
                raise Broken(f"{where} belongs to the request at head {owner}, still in flight")
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if seen_writable and not writable:
                raise Broken(f"{where} is device-readable after a device-writable descriptor")
            seen_writable |= writable
            out.append((index, addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                return out
            if nxt >= ring.size:
                raise Broken(
                    f"descriptor {index} next={nxt} out of range for queue size "
                    f"{ring.size} (chain head {head})"
                )
            index = nxt

    def _forward_chain(
        self,
        q: DataplaneQueue,
        ring: QueueState,
        head: int,
        chain: list[tuple[int, int, int, bool]],
        avail_index: int,
    ) -> None:
        if not self.intercept:
            for p in self._pages(chain):
                self._get(p)
        wlen = 0
        for i, (index, addr, length, writable) in enumerate(chain):
            last = i == len(chain) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if writable else 0)
            nxt = 0 if last else chain[i + 1][0]
            self._devbuf_write(ring.desc_addr + 16 * index, _DESC.pack(addr, length, flags, nxt))
            copied = self._copy_in(addr, length)
            if writable:
                wlen += length
            else:
                self.stats[ST_BYTES_TO_DEVICE] += copied
            q.rec[index] = (addr, length, flags, nxt, head, 0)
        q.rec[head]["wlen"] = wlen
        self._devbuf_write(ring.avail_addr + 4 + 2 * (avail_index % ring.size), _U16.pack(head))
        q.head_avail[head] = avail_index
        q.pos[Q_INFLIGHT] += 1
        self.stats[ST_FORWARDED] += 1

    def _copy_in(self, gpa: int, length: int) -> int:
        """Guest bytes [gpa, +length) into the device buffers of their pages; bytes copied.
        Intercept: a page with no device buffer is the device's in guest RAM (nothing to copy)."""
        pool, guest = self.dp.pool.mmap, self.dp.guest
        pieces = self._pieces(gpa, length) if self.intercept else self._devbuf(gpa, length)
        copied = 0
        for off, start, n in pieces:
            if off >= 0:
                pool[off : off + n] = guest[gpa + start : gpa + start + n]
                copied += n
        return copied

    # --- completion -------------------------------------------------------------------------

    def complete(self) -> int:
        """Sync every completion of every queue; how many, or -1 if the device broke."""
        if self._error is not None:
            return -1
        done = 0
        for index, q in self.queues.items():
            try:
                done += self._complete_queue(q, self._rings[index])
            except Broken as e:
                self.fail(str(e))
                return -1
        return done

    def _complete_queue(self, q: DataplaneQueue, ring: QueueState) -> int:
        try:
            (used_idx,) = _U16.unpack(self._devbuf_read(ring.used_addr + 2, 2))
        except Broken:
            raise Broken(
                f"queue {q.index}: the shadow used ring is not in device buffers"
            ) from None
        nxt = q.next_used
        count = (used_idx - nxt) & 0xFFFF
        if count == 0:
            return 0
        if count > q.inflight_count:
            raise Broken(
                f"device reports {count} completions on queue {q.index} with "
                f"{q.inflight_count} requests in flight"
            )
        for i in range(count):
            at = (nxt + i) & 0xFFFF
            head, length = _ELEM.unpack(
                self._devbuf_read(ring.used_addr + 4 + 8 * (at % ring.size), 8)
            )
            self._complete_one(q, ring, at, head, length)
        nxt = (nxt + count) & 0xFFFF
        self._guest(ring.used_addr + 2, 2, "used ring")[:] = _U16.pack(nxt)
        self._mark(ring.used_addr + 2, 2)
        q.pos[Q_NEXT_USED] = nxt
        self.stats[ST_COMPLETED] += count
        return count

    def _complete_one(
        self, q: DataplaneQueue, ring: QueueState, at: int, head: int, length: int
    ) -> None:
        if head >= ring.size or q.head_avail[head] < 0:
            raise Broken(
                f"device completed head {head} on queue {q.index}, which is not in "
                "flight (unknown or completed twice)"
            )
        wlen = int(q.rec[head]["wlen"])
        if length > wlen:
            raise Broken(
                f"device reports used.len {length} for head {head} on queue "
                f"{q.index}, which has only {wlen} device-writable bytes"
            )
        elem_gpa = ring.used_addr + 4 + 8 * (at % ring.size)
        elem = self._guest(elem_gpa, 8, "used ring")
        chain = q.recorded_chain(head)
        for addr, n, writable in chain:
            if writable:
                self.stats[ST_BYTES_TO_GUEST] += self._sync_back(addr, n)
        elem[:] = _ELEM.pack(head, length)
        self._mark(elem_gpa, 8)
        if not self.intercept:
            for addr, n, _ in chain:
                for p in range(addr >> PAGE_SHIFT, ((addr + n - 1) >> PAGE_SHIFT) + 1):
                    self._put(p)
        owners = q.rec["owner"]
        owners[owners == head] = -1
        q.head_avail[head] = -1
        q.pos[Q_INFLIGHT] -= 1

    def _sync_back(self, gpa: int, length: int) -> int:
        """Copy device buffer [gpa, +length) into guest RAM where it differs; bytes copied.
        Intercept: a piece with no device buffer was written by the device in guest RAM, so
        its page is marked dirty (the whole writable area, whatever used.len says)."""
        pool, guest = self.dp.pool.mmap, self.dp.guest
        copied = 0
        pieces = self._pieces(gpa, length) if self.intercept else self._devbuf(gpa, length)
        for off, start, n in pieces:
            at = gpa + start
            if off < 0:
                self._mark(at, n)
                self.stats[ST_MARKED] += 1
                continue
            src = pool[off : off + n]
            if guest[at : at + n] != src:
                guest[at : at + n] = src
                self._mark(at, n)
                copied += n
        return copied

    def _mark(self, gpa: int, length: int) -> None:
        dirty = self.dp.dirty
        for p in range(gpa >> PAGE_SHIFT, ((gpa + length - 1) >> PAGE_SHIFT) + 1):
            dirty[p >> 6] |= np.uint64(1 << (p & 63))


class ReferenceDataplane:
    """The reference data plane of one VM's shadowed devices (no thread; see the module)."""

    def __init__(self, memory: GuestMemory, pool: ShadowPool) -> None:
        self.memory = memory
        self.pool = pool
        self.guest = memoryview(memory.mmap)
        self.dirty = bitmap.empty(memory.npages)
        self.devices: list[ReferenceDevice] = []

    def add_device(self, irq_fd: int = -1, *, intercept: bool = False) -> ReferenceDevice:
        dev = ReferenceDevice(self, self.memory.npages, intercept)
        self.devices.append(dev)
        return dev

    @contextmanager
    def locked(self) -> Iterator[None]:
        yield  # single-threaded: the caller drives every step

    def take_dirty(self) -> bitmap.Bitmap:
        out = self.dirty.copy()
        self.dirty[:] = 0
        return out

    def close(self) -> None:
        self.guest.release()
