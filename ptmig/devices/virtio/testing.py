"""The driver side of a split virtqueue, for tests: what a guest driver does, in Python.

Owns `FlatMemory` (a bytearray posing as guest memory, with the `RingMemory` interface and
DMA-fault behaviour out of range) and `DriverQueue` (lays a ring out in memory, allocates
descriptors and data buffers, publishes chains in the avail ring, collects used elements).
Shipped in the package so every device's tests can play the guest with the same code.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Protocol

from ptmig.devices.virtio.constants import (
    DESC_SIZE,
    USED_ELEM_SIZE,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from ptmig.devices.virtio.queue import (
    QueueState,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from ptmig.iommu import DmaFault


class FlatMemory:
    """`size` bytes of zeroed memory at addresses [base, base + size); RingMemory-compatible.

    Accesses outside the range raise `DmaFault`, exactly like an unmapped IOVA.
    """

    def __init__(self, size: int, base: int = 0, name: str = "flat-memory") -> None:
        self.buf = bytearray(size)
        self.base = base
        self.name = name
        self.writes: list[tuple[int, int]] = []  # (addr, length) of every write, in order

    def _offset(self, addr: int, length: int, write: bool) -> int:
        off = addr - self.base
        if length < 0 or off < 0 or off + length > len(self.buf):
            raise DmaFault(
                self.name,
                addr,
                length,
                write,
                f"outside [{self.base:#x}, {self.base + len(self.buf):#x})",
            )
        return off

    def read(self, addr: int, length: int) -> bytes:
        off = self._offset(addr, length, False)
        return bytes(self.buf[off : off + length])

    def write(self, addr: int, data: bytes) -> None:
        off = self._offset(addr, len(data), True)
        self.buf[off : off + len(data)] = data
        self.writes.append((addr, len(data)))


class DriverMemory(Protocol):
    """What a DriverQueue needs of guest memory: `FlatMemory`, or a test's own mapping."""

    @property
    def base(self) -> int: ...

    @property
    def buf(self) -> Sized: ...  # the memory itself; only its length is used

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Buffer:
    """A buffer the driver offers: address, length, device-writable or not."""

    addr: int
    length: int
    writable: bool = False


class DriverQueue:
    """A guest driver's half of one split virtqueue, laid out in a `DriverMemory`.

    Rings are placed at `base` (descriptor table, then avail ring, then used ring, each
    aligned); data buffers come from a bump allocator over [data_start, data_end).
    """

    def __init__(
        self,
        mem: DriverMemory,
        size: int,
        base: int | None = None,
        data_start: int | None = None,
        data_end: int | None = None,
        start_index: int = 0,
    ) -> None:
        self.mem = mem
        self.size = size
        base = mem.base if base is None else base
        self.desc_addr = _align(base, 16)
        self.avail_addr = _align(self.desc_addr + desc_table_size(size), 2)
        self.used_addr = _align(self.avail_addr + avail_ring_size(size), 4)
        rings_end = self.used_addr + used_ring_size(size)
        self._data_next = _align(rings_end, 16) if data_start is None else data_start
        self._data_end = mem.base + len(mem.buf) if data_end is None else data_end
        self.start_index = start_index & 0xFFFF
        self.avail_idx = start_index & 0xFFFF  # free-running indices may start anywhere
        self.last_used = start_index & 0xFFFF
        self.write_avail_idx(self.avail_idx)
        mem.write(self.used_addr + 2, struct.pack("<H", self.last_used))
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}

    # -- layout ------------------------------------------------------------------------------
    def state(self, next_avail: int | None = None, next_used: int | None = None) -> QueueState:
        """The QueueState of a device that has caught up with this driver (by default)."""
        return QueueState(
            self.size,
            self.desc_addr,
            self.avail_addr,
            self.used_addr,
            self.start_index if next_avail is None else next_avail,
            self.start_index if next_used is None else next_used,
            True,
        )

    def alloc(self, length: int, fill: bytes | None = None, align: int = 16) -> int:
        """Allocate a data buffer (optionally filled) and return its address."""
        addr = _align(self._data_next, align)
        if addr + length > self._data_end:
            raise MemoryError(
                f"driver data area exhausted: need {length} bytes at {addr:#x}, "
                f"end {self._data_end:#x}"
            )
        self._data_next = addr + length
        if fill is not None:
            self.mem.write(addr, bytes(fill).ljust(length, b"\0")[:length])
        return addr

    # -- raw writes, for building hostile rings ----------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(
            self.desc_addr + DESC_SIZE * index, struct.pack("<QIHH", addr, length, flags, nxt)
        )

    def write_avail_entry(self, slot: int, head: int) -> None:
        self.mem.write(self.avail_addr + 4 + 2 * slot, struct.pack("<H", head))

    def write_avail_idx(self, idx: int) -> None:
        self.mem.write(self.avail_addr + 2, struct.pack("<H", idx & 0xFFFF))

    def write_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail_addr, struct.pack("<H", flags))

    # -- the driver protocol -----------------------------------------------------------------
    def add_chain(self, buffers: Sequence[Buffer], publish: bool = True) -> int:
        """Put a chain in free descriptors and (by default) publish its head; return the head."""
        if not buffers:
            raise ValueError("a chain needs at least one buffer")
        if len(buffers) > len(self._free):
            raise MemoryError(f"{len(buffers)} descriptors needed, {len(self._free)} free")
        indices = [self._free.pop(0) for _ in buffers]
        for n, (index, buf) in enumerate(zip(indices, buffers, strict=True)):
            last = n == len(buffers) - 1
            flags = (0 if last else VIRTQ_DESC_F_NEXT) | (VIRTQ_DESC_F_WRITE if buf.writable else 0)
            self.write_desc(index, buf.addr, buf.length, flags, 0 if last else indices[n + 1])
        head = indices[0]
        self._chains[head] = indices
        if publish:
            self.publish(head)
        return head

    def add_buffers(self, readable: Sequence[bytes] = (), writable: Sequence[int] = ()) -> int:
        """Allocate data buffers (readable ones filled with the given bytes, writable ones of
        the given lengths), chain them and publish the chain. Returns the head."""
        bufs = [Buffer(self.alloc(len(d), d), len(d), False) for d in readable]
        bufs += [Buffer(self.alloc(n), n, True) for n in writable]
        return self.add_chain(bufs)

    def publish(self, head: int) -> None:
        """Write `head` into the next avail slot, then bump avail idx (entry before idx)."""
        self.write_avail_entry(self.avail_idx % self.size, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write_avail_idx(self.avail_idx)

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used_addr + 2, 2))[0])

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call; their descriptors become free."""
        out: list[tuple[int, int]] = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            head, length = struct.unpack(
                "<II", self.mem.read(self.used_addr + 4 + USED_ELEM_SIZE * slot, 8)
            )
            out.append((head, length))
            self._free.extend(self._chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def chain_buffers(self, head: int) -> list[Buffer]:
        """The buffers of an outstanding chain (as the driver built it)."""
        out = []
        for index in self._chains[head]:
            addr, length, flags, _ = struct.unpack(
                "<QIHH", self.mem.read(self.desc_addr + DESC_SIZE * index, DESC_SIZE)
            )
            out.append(Buffer(addr, length, bool(flags & VIRTQ_DESC_F_WRITE)))
        return out


def _align(value: int, align: int) -> int:
    return (value + align - 1) // align * align
