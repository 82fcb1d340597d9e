"""Split virtqueues (virtio 1.x spec 2.7), device side: the one parser of guest rings.

Owns the layout of the three ring areas, the validation of every guest-controlled value in
them, and the device's view of a queue (next avail index, next used index). It does no I/O of
its own: every access goes through a `RingMemory` accessor, which is a device's `DmaView` in a
device process and the VMM's guest-memory accessor in the shadow engine, so both parse rings
with exactly this code.

Layouts (little-endian)::

    descriptor table  size x {addr u64, len u32, flags u16, next u16}     16-byte aligned
    avail ring        flags u16, idx u16, ring[size] u16, used_event u16    2-byte aligned
    used ring         flags u16, idx u16, ring[size] {id u32, len u32},
                      avail_event u16                                      4-byte aligned

The guest is an adversary. Everything it controls -- avail idx, heads, next links, flags,
lengths, addresses, and any saved queue state -- is checked here, and a violation raises
`QueueError` saying what and where. Chain walks are bounded by the queue size (a loop cannot
make the device spin) and by a byte budget (a chain cannot make it allocate without bound).
The only other exception that escapes is the accessor's own fault (`DmaFault`), which callers
treat the same way: mark the device DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, NamedTuple, Protocol

from ptmig.devices.virtio.constants import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    DESC_SIZE,
    USED_ALIGN,
    USED_ELEM_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_KNOWN_FLAGS,
    VIRTQ_MAX_SIZE,
)
from ptmig.iommu import DmaFault

from ...errors import PtmigError

#: Default cap on the bytes one chain may describe (readable + writable).
DEFAULT_MAX_TOTAL_LEN: Final = 64 << 20
_ADDR_LIMIT: Final = 1 << 64
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")


class QueueError(PtmigError):
    """The guest broke the virtqueue rules; the device must be marked DEVICE_NEEDS_RESET."""

    def __init__(self, reason: str, *, head: int | None = None, index: int | None = None) -> None:
        self.reason = reason
        self.head = head
        self.index = index
        super().__init__(reason)


class RingMemory(Protocol):
    """Byte access to the memory the rings live in (addresses as the device sees them)."""

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


# -- ring geometry -----------------------------------------------------------------------------
def desc_table_size(size: int) -> int:
    """Bytes of a descriptor table of `size` entries."""
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of an avail ring of `size` entries, used_event included."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """Bytes of a used ring of `size` entries, avail_event included."""
    return 6 + USED_ELEM_SIZE * size


@dataclass(frozen=True)
class QueueState:
    """Everything a device knows about one queue. Saved state is untrusted: `validate()`."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    next_avail: int = 0
    next_used: int = 0
    ready: bool = True

    def validate(self) -> QueueState:
        """Check the state could have come from a correct driver and device; return it."""
        size = self.size
        if not isinstance(size, int) or not 0 < size <= VIRTQ_MAX_SIZE or size & (size - 1):
            raise QueueError(f"queue size {size!r} is not a power of 2 in 1..{VIRTQ_MAX_SIZE}")
        areas = (
            ("descriptor table", self.desc_addr, DESC_ALIGN, desc_table_size(size)),
            ("avail ring", self.avail_addr, AVAIL_ALIGN, avail_ring_size(size)),
            ("used ring", self.used_addr, USED_ALIGN, used_ring_size(size)),
        )
        for name, addr, align, length in areas:
            if not isinstance(addr, int) or addr < 0 or addr + length > _ADDR_LIMIT:
                raise QueueError(
                    f"{name} address {addr!r} (+{length} bytes) is outside the 64-bit address space"
                )
            if addr % align:
                raise QueueError(f"{name} address {addr:#x} is not {align}-byte aligned")
        for name, idx in (("next_avail", self.next_avail), ("next_used", self.next_used)):
            if not isinstance(idx, int) or not 0 <= idx <= 0xFFFF:
                raise QueueError(f"{name} {idx!r} is not a 16-bit ring index")
        return self


class Descriptor(NamedTuple):
    """One buffer of a chain: guest address, byte length, and whether the device writes it.

    (Immutable records built for every chain a device pops: named tuples, which cost a third
    of a frozen dataclass to create.)"""

    addr: int
    length: int
    writable: bool


class DescriptorChain(NamedTuple):
    """A validated chain: device-readable buffers first, then device-writable ones."""

    head: int
    descriptors: tuple[Descriptor, ...]
    indices: tuple[int, ...] = ()

    @property
    def readable(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.descriptors if not d.writable)

    @property
    def writable(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.descriptors if d.writable)

    @property
    def total_readable(self) -> int:
        return sum(d.length for d in self.descriptors if not d.writable)

    @property
    def total_writable(self) -> int:
        return sum(d.length for d in self.descriptors if d.writable)


# -- the parser: one function per guest-controlled structure --------------------------------
def read_avail_idx(mem: RingMemory, state: QueueState) -> int:
    """The driver's avail idx (free-running u16)."""
    return int(_U16.unpack(_read(mem, state.avail_addr + 2, 2))[0])


def read_avail_flags(mem: RingMemory, state: QueueState) -> int:
    """The driver's avail flags (bit 0: VIRTQ_AVAIL_F_NO_INTERRUPT)."""
    return int(_U16.unpack(_read(mem, state.avail_addr, 2))[0])


def avail_pending(mem: RingMemory, state: QueueState) -> int:
    """New avail entries past `state.next_avail`; QueueError if the driver ran too far ahead.

    A driver can never have more than `size` buffers outstanding, so a larger distance is a
    hostile or broken avail idx (accepting it would make the device re-read old heads).
    """
    idx = read_avail_idx(mem, state)
    pending = (idx - state.next_avail) & 0xFFFF
    if pending > state.size:
        raise QueueError(
            f"avail idx {idx} is {pending} entries ahead of next_avail "
            f"{state.next_avail}, more than the queue size {state.size}"
        )
    return pending


def read_avail_entries(mem: RingMemory, state: QueueState, count: int) -> list[int]:
    """The `count` heads at avail ring positions next_avail, next_avail+1, ... (validated).

    The caller gets `count` from `avail_pending`; each head is checked against the size.
    """
    size = state.size
    if not 0 <= count <= size:
        raise QueueError(f"asked for {count} avail entries from a queue of size {size}")
    first = state.next_avail % size
    wrap = min(count, size - first)
    raw = _read(mem, state.avail_addr + 4 + 2 * first, 2 * wrap)
    if count > wrap:
        raw += _read(mem, state.avail_addr + 4, 2 * (count - wrap))
    heads = list(struct.unpack(f"<{count}H", raw))
    for n, head in enumerate(heads):
        if head >= size:
            pos = (state.next_avail + n) & 0xFFFF
            raise QueueError(
                f"avail ring entry {pos % size} (avail index {pos}) has head "
                f"{head}, out of range for queue size {size}",
                head=head,
            )
    return heads


def read_descriptor(mem: RingMemory, desc_addr: int, index: int) -> tuple[int, int, int, int]:
    """Raw (addr, len, flags, next) of descriptor `index`; the caller checks `index`."""
    addr, length, flags, nxt = _DESC.unpack(_read(mem, desc_addr + DESC_SIZE * index, DESC_SIZE))
    return int(addr), int(length), int(flags), int(nxt)


def walk_chain(
    mem: RingMemory,
    table: QueueState | int,
    size: int | None,
    head: int,
    *,
    max_chain_len: int | None = None,
    max_total_len: int = DEFAULT_MAX_TOTAL_LEN,
) -> DescriptorChain:
    """Walk and validate the chain starting at descriptor `head`.

    `table` is a QueueState or the descriptor table address (then `size` is required).
    Checks: head and every next < size; at most min(size, max_chain_len) descriptors (a loop
    fails here); no reserved flag bits; no INDIRECT (VIRTIO_F_INDIRECT_DESC is not offered);
    non-zero lengths; buffers inside the 64-bit space; total bytes <= max_total_len; no
    device-readable descriptor after a device-writable one.
    """
    if isinstance(table, QueueState):
        if size is not None and size != table.size:
            raise QueueError(f"walk_chain size {size} disagrees with the queue size {table.size}")
        desc_addr, size = table.desc_addr, table.size
    else:
        if size is None:
            raise QueueError("walk_chain needs the queue size with a bare table address")
        desc_addr = table
    limit = size if max_chain_len is None else max(1, min(size, max_chain_len))
    if not 0 <= head < size:
        raise QueueError(f"chain head {head} out of range for queue size {size}", head=head)
    descs: list[Descriptor] = []
    indices: list[int] = []
    total = 0
    seen_writable = False
    index = head
    while True:
        if len(descs) >= limit:
            raise QueueError(
                f"chain at head {head} is longer than {limit} descriptors "
                f"(a loop in the next links?)",
                head=head,
                index=index,
            )
        addr, length, flags, nxt = read_descriptor(mem, desc_addr, index)
        if flags & ~VIRTQ_DESC_KNOWN_FLAGS:
            raise QueueError(
                f"{_where(index, head)} flags={flags:#x} has reserved bits set",
                head=head,
                index=index,
            )
        if flags & VIRTQ_DESC_F_INDIRECT:
            raise QueueError(
                f"{_where(index, head)} is INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated",
                head=head,
                index=index,
            )
        if length == 0:
            raise QueueError(f"{_where(index, head)} has length 0", head=head, index=index)
        if addr + length > _ADDR_LIMIT:
            raise QueueError(
                f"{_where(index, head)} buffer {addr:#x}+{length} wraps the address space",
                head=head,
                index=index,
            )
        total += length
        if total > max_total_len:
            raise QueueError(
                f"chain at head {head} describes more than {max_total_len} bytes "
                f"(at {_where(index, head)})",
                head=head,
                index=index,
            )
        writable = bool(flags & VIRTQ_DESC_F_WRITE)
        if seen_writable and not writable:
            raise QueueError(
                f"{_where(index, head)} is device-readable after a device-writable descriptor",
                head=head,
                index=index,
            )
        seen_writable |= writable
        descs.append(Descriptor(addr, length, writable))
        indices.append(index)
        if not flags & VIRTQ_DESC_F_NEXT:
            return DescriptorChain(head, tuple(descs), tuple(indices))
        if nxt >= size:
            raise QueueError(
                f"descriptor {index} next={nxt} out of range for queue size "
                f"{size} (chain head {head})",
                head=head,
                index=index,
            )
        index = nxt


def byte_range(descs: Sequence[Descriptor], offset: int, length: int) -> list[tuple[int, int]]:
    """(address, length) pieces covering bytes [offset, offset+length) of a descriptor list
    (requests are parsed by byte offset across a chain, never by descriptor boundaries)."""
    out: list[tuple[int, int]] = []
    pos = 0
    end = offset + length
    for d in descs:
        lo, hi = max(pos, offset), min(pos + d.length, end)
        if lo < hi:
            out.append((d.addr + lo - pos, hi - lo))
        pos += d.length
        if pos >= end:
            break
    return out


def _where(index: int, head: int) -> str:
    return f"descriptor {index} (chain head {head})"


def read_used_idx(mem: RingMemory, state: QueueState) -> int:
    """The used idx in the used ring (free-running u16)."""
    return int(_U16.unpack(_read(mem, state.used_addr + 2, 2))[0])


def read_used_entries(
    mem: RingMemory, state: QueueState, start: int, count: int
) -> list[tuple[int, int]]:
    """(id, len) of used elements at used indices start, start+1, ... (ids validated)."""
    size = state.size
    if not 0 <= count <= size:
        raise QueueError(f"asked for {count} used entries from a queue of size {size}")
    out: list[tuple[int, int]] = []
    for n in range(count):
        slot = ((start + n) & 0xFFFF) % size
        head, length = _USED_ELEM.unpack(
            _read(mem, state.used_addr + 4 + USED_ELEM_SIZE * slot, USED_ELEM_SIZE)
        )
        if head >= size:
            raise QueueError(
                f"used ring slot {slot} has id {head}, out of range for queue size {size}",
                head=head,
            )
        out.append((int(head), int(length)))
    return out


def write_used_elem(
    mem: RingMemory, state: QueueState, used_index: int, head: int, written_len: int
) -> None:
    """Write used element {head, written_len} at used index `used_index` (idx not touched)."""
    if not 0 <= head < state.size:
        raise QueueError(f"used element id {head} out of range for queue size {state.size}")
    if not 0 <= written_len <= 0xFFFFFFFF:
        raise QueueError(f"used element len {written_len} does not fit in 32 bits", head=head)
    slot = (used_index & 0xFFFF) % state.size
    mem.write(state.used_addr + 4 + USED_ELEM_SIZE * slot, _USED_ELEM.pack(head, written_len))


def write_used_idx(mem: RingMemory, state: QueueState, idx: int) -> None:
    """Publish used idx (write it only after the elements it covers)."""
    mem.write(state.used_addr + 2, _U16.pack(idx & 0xFFFF))


def ring_regions(state: QueueState) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(address, length) of the descriptor table, the avail ring and the used ring."""
    return (
        (state.desc_addr, desc_table_size(state.size)),
        (state.avail_addr, avail_ring_size(state.size)),
        (state.used_addr, used_ring_size(state.size)),
    )


# -- the driver's side of the avail ring (the shadow engine drives the device's copy) ---------
def write_avail_entry(mem: RingMemory, state: QueueState, avail_index: int, head: int) -> None:
    """Put `head` in the avail slot of free-running index `avail_index` (idx not touched)."""
    if not 0 <= head < state.size:
        raise QueueError(f"avail head {head} out of range for queue size {state.size}")
    slot = (avail_index & 0xFFFF) % state.size
    mem.write(state.avail_addr + 4 + 2 * slot, _U16.pack(head))


def write_avail_idx(mem: RingMemory, state: QueueState, idx: int) -> None:
    """Publish avail idx (write it only after the entries it covers)."""
    mem.write(state.avail_addr + 2, _U16.pack(idx & 0xFFFF))


def _read(mem: RingMemory, addr: int, length: int) -> bytes:
    data = mem.read(addr, length)
    if len(data) != length:  # a misbehaving accessor must not desynchronise the parser
        raise QueueError(
            f"ring memory returned {len(data)} bytes for a {length}-byte read at {addr:#x}"
        )
    return data


# -- the device's queue ----------------------------------------------------------------------
class SplitQueue:
    """One split virtqueue as the device runs it: pop chains, push used elements.

    The device's two indices are kept as plain ints (the hot path pops and pushes tens of
    thousands of chains a second); `state()` builds the `QueueState` snapshot on demand. The
    driver's avail idx is re-read only when every entry seen so far has been popped: it only
    moves forward, so entries already published stay published. The heads of all the entries
    seen are read (and validated) in one go and handed out one per `pop()`.
    """

    def __init__(
        self,
        state: QueueState,
        mem: RingMemory,
        max_chain_len: int | None = None,
        max_total_len: int = DEFAULT_MAX_TOTAL_LEN,
    ) -> None:
        self.mem = mem
        self.max_chain_len = max_chain_len
        self.max_total_len = max_total_len
        self._set(state.validate())

    def _set(self, state: QueueState) -> None:
        self._geometry = state
        self._next_avail = state.next_avail
        self._next_used = state.next_used
        self._seen_avail = state.next_avail  # the driver's avail idx as last read
        self._heads: list[int] = []  # heads read from avail entries next_avail, +1, ...

    @property
    def size(self) -> int:
        return self._geometry.size

    @property
    def next_avail(self) -> int:
        return self._next_avail

    @property
    def next_used(self) -> int:
        return self._next_used

    def state(self) -> QueueState:
        """A snapshot of the queue (for get-queue-state and migration)."""
        return replace(self._geometry, next_avail=self._next_avail, next_used=self._next_used)

    def set_state(self, state: QueueState) -> None:
        """Replace the queue state (untrusted: validated first)."""
        self._set(state.validate())

    def pending(self) -> int:
        """Avail entries the driver published that the device has not popped."""
        n = avail_pending(self.mem, self.state())
        self._seen_avail = (self._next_avail + n) & 0xFFFF
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None if there is none.

        The avail entry is consumed even when its chain is invalid (then QueueError is
        raised), so a caller can never spin on the same bad entry.
        """
        heads = self._heads
        if not heads:
            if self._seen_avail == self._next_avail and self.pending() == 0:
                return None
            count = (self._seen_avail - self._next_avail) & 0xFFFF
            state = self.state()
            try:
                heads = read_avail_entries(self.mem, state, count)
            except (QueueError, DmaFault):  # a bad head among them, or a ring running into a
                heads = []  # page the device may not read: one at a time, so that it fails at
                #             its own pop, after the good ones before it
            if not heads:
                self._next_avail = (self._next_avail + 1) & 0xFFFF
                head = read_avail_entries(self.mem, state, 1)[0]
                return walk_chain(
                    self.mem,
                    state,
                    None,
                    head,
                    max_chain_len=self.max_chain_len,
                    max_total_len=self.max_total_len,
                )
            heads.reverse()  # popped from the end
            self._heads = heads
        self._next_avail = (self._next_avail + 1) & 0xFFFF
        head = heads.pop()
        return walk_chain(
            self.mem,
            self._geometry,
            None,
            head,
            max_chain_len=self.max_chain_len,
            max_total_len=self.max_total_len,
        )

    def push_used(self, head: int, written_len: int) -> None:
        """Return a chain to the driver: the used element first, then the used idx."""
        self.push_used_many([(head, written_len)])

    def push_used_many(self, entries: list[tuple[int, int]]) -> None:
        """Return several chains with one used idx update (after all their elements)."""
        if not entries:
            return
        geometry = self._geometry
        if len(entries) > geometry.size:
            raise QueueError(
                f"{len(entries)} used elements at once exceed queue size {geometry.size}"
            )
        idx = self._next_used
        for n, (head, written_len) in enumerate(entries):
            write_used_elem(self.mem, geometry, idx + n, head, written_len)
        idx = (idx + len(entries)) & 0xFFFF
        write_used_idx(self.mem, geometry, idx)
        self._next_used = idx

    def interrupt_suppressed(self) -> bool:
        """True if the driver set VIRTQ_AVAIL_F_NO_INTERRUPT (a hint; it may be ignored)."""
        return bool(read_avail_flags(self.mem, self._geometry) & VIRTQ_AVAIL_F_NO_INTERRUPT)
