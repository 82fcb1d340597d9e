"""Shadow and intercept modes against direct DMA, byte for byte, on both data paths (no KVM).

Two worlds get identical guest RAM, identical devices (the real `BlkDevice` / `NetDevice`) and
identical backing images. In the *direct* world the device DMAs into guest RAM through an
identity IOMMU map; in the *shadow* world the same requests go through `ShadowedDevice` (the
native data plane or the Python reference): in `shadow` mode the device only ever sees device
buffers, in `intercept` mode only its rings are device buffers and it DMAs into the guest's
data buffers directly. A generated mix of requests is played in both, and after every step the
whole guest RAM (buffers, rings, used elements) and the disk image must be equal, and every
guest page that changed during the step (by the data plane or, under intercept, by the device)
must be in the data plane's dirty bitmap.

The hostile variant lets the device scribble on its shadow descriptor table and avail ring,
complete heads that are not in flight, complete one twice, or claim a used.len larger than the
request's writable bytes: the device is marked broken where the completion is invalid, and guest
RAM outside the affected requests' writable bytes and the used ring equals the direct run's.

The number of examples is modest by default; `make fuzz` (PTMIG_FUZZ_EXAMPLES) runs many more.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shadowrig import device_state

from ptmig import bitmap
from ptmig.devices.blk import BlkConfig, BlkDevice
from ptmig.devices.net import NetConfig, NetDevice
from ptmig.devices.virtio import constants as c
from ptmig.devices.virtio.queue import QueueError, SplitQueue
from ptmig.devices.virtio.testing import Buffer, DriverQueue
from ptmig.iommu import DmaFault, DmaView, IommuTable
from ptmig.layout import PAGE_SIZE
from ptmig.memory import GuestMemory
from ptmig.shadow.device import ShadowedDevice

if TYPE_CHECKING:
    from ptmig.devices.attach import AttachedDevice
from ptmig.shadow.pool import ShadowPool
from ptmig.shadow.reference import ReferenceDataplane

EXAMPLES = int(os.environ.get("PTMIG_FUZZ_EXAMPLES", "30"))
PATHS = ["native", "reference"]
MODES = ["shadow", "intercept"]
MEM = 96 * PAGE_SIZE
QSIZE = 64
RINGS = 0x1000  # queue q's rings at RINGS + q * 0x1000
DATA = 0x8000  # data buffers from here to the end of RAM
DISK = 64 * 1024  # 128 sectors
SECTORS = DISK // c.BLK_SECTOR_SIZE
POOL_PAGES = 48  # fewer than the data pages: idle buffers get reclaimed under pressure
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- the two worlds ------------------------------------------------------------------------


class Mirror:
    """The guest driver's stores, made in both worlds' RAM (reads come from the direct one)."""

    def __init__(self, direct: GuestMemory, shadow: GuestMemory) -> None:
        self.mems = (direct, shadow)
        self.base = 0
        self.buf = direct.mmap

    def read(self, addr: int, length: int) -> bytes:
        return self.mems[0].mmap[addr : addr + length]

    def write(self, addr: int, data: bytes) -> None:
        for m in self.mems:
            m.mmap[addr : addr + len(data)] = data


class ListBackend:
    """A network backend in memory: frames to receive, frames sent."""

    def __init__(self) -> None:
        self.incoming: deque[bytes] = deque()
        self.sent: list[bytes] = []

    def fileno(self) -> int:
        return -1

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def recv(self) -> bytes | None:
        return self.incoming.popleft() if self.incoming else None

    def close(self) -> None:
        pass


class IotlbHandle:
    """The device's IOTLB as the shadow engine flushes it (a device process would ack)."""

    def __init__(self, dma: DmaView) -> None:
        self.dma = dma

    def iotlb_invalidate(self) -> None:
        self.dma.invalidate_iotlb()


@dataclass
class Attached:
    id: str
    iommu: IommuTable
    handle: IotlbHandle


@dataclass
class World:
    mem: GuestMemory
    iommu: IommuTable
    dma: DmaView
    model: BlkDevice | NetDevice
    image: str | None
    backend: ListBackend | None
    queues: dict[int, SplitQueue] = field(default_factory=dict)
    fault: str | None = None  # the device model raised (it would need a reset)

    def run(self, index: int) -> None:
        """The device services queue `index` until it has nothing more to do."""
        if self.fault is not None:
            return
        try:
            while self.model.process_queue(index, self.queues[index], 64):
                pass
        except (QueueError, DmaFault) as e:
            self.fault = str(e)


class Rig:
    """A direct world and a shadow world, a mirrored driver per queue."""

    def __init__(
        self,
        kind: str,
        path: str,
        workdir: str,
        pool_pages: int = POOL_PAGES,
        mode: str = "shadow",
    ) -> None:
        self.kind = kind
        self.pool = ShadowPool(pool_pages)
        direct_mem, shadow_mem = GuestMemory(MEM), GuestMemory(MEM)
        self.mirror = Mirror(direct_mem, shadow_mem)
        nq = 1 if kind == "blk" else 2
        self.drivers = [
            DriverQueue(self.mirror, QSIZE, base=RINGS + q * 0x1000, data_start=DATA)
            for q in range(nq)
        ]
        self.direct = self._world(direct_mem, workdir, "direct", None)
        self.shadow = self._world(shadow_mem, workdir, "shadow", self.pool)
        dp = ReferenceDataplane(shadow_mem, self.pool) if path == "reference" else None
        self.reference = dp
        device = Attached(kind, self.shadow.iommu, IotlbHandle(self.shadow.dma))
        self.sd = ShadowedDevice(
            cast("AttachedDevice", device),  # (the parts the shadow code reads, no process)
            self.pool,
            shadow_mem,
            dp,
            intercept=mode == "intercept",
        )
        self.sd.build(device_state(*self.drivers))
        self.sd.flush_mappings()
        self.shadow.dma.invalidate_iotlb()
        for q, d in enumerate(self.drivers):
            self.direct.queues[q] = SplitQueue(d.state(), self.direct.dma)
            self.shadow.queues[q] = SplitQueue(d.state(), self.shadow.dma)

    def _world(self, mem: GuestMemory, workdir: str, name: str, pool: ShadowPool | None) -> World:
        iommu = IommuTable.create(mem.npages)
        iommu.map_identity(mem.npages)
        dma = DmaView(iommu, mem.mmap, pool=None if pool is None else pool.mmap, name=name)
        if self.kind == "blk":
            image = os.path.join(workdir, f"{name}.img")
            with open(image, "wb") as f:
                f.write(random.Random(7).randbytes(DISK))
            return World(mem, iommu, dma, BlkDevice(BlkConfig(image, DISK), dma), image, None)
        backend = ListBackend()
        model = NetDevice(NetConfig(b"\x52\x54\0\0\0\1", "fd:-1"), dma, backend=backend)
        return World(mem, iommu, dma, model, None, backend)

    def close(self) -> None:
        self.sd.close()
        if self.reference is not None:
            self.reference.close()
        for w in (self.direct, self.shadow):
            w.model.close()
            w.dma.close()
            w.iommu.close()
            w.mem.close()  # (its memfd: a module of examples would run out of fds)
        self.pool.close()

    # --- one step ------------------------------------------------------------------------

    def step(self, queues: list[int], hostile: Hostile | None = None) -> tuple[bytes, bytes]:
        """The device services `queues` in both worlds; in the shadow world the VMM forwards
        first and syncs after (a hostile device acts around its run). Returns the shadow
        guest RAM before the step (after the driver's own stores) and after the sync."""
        for q in queues:
            self.direct.run(q)
        before = bytes(self.shadow.mem.mmap)
        self.sd.dataplane.take_dirty()  # start clean: the driver's stores are not DMA
        for q in queues:
            self.sd.submit(q)
        if hostile is not None:
            hostile.before_run(self)
        for q in queues:
            self.shadow.run(q)
        if hostile is not None:
            hostile.after_run(self)
        self.sd.complete()
        return before, bytes(self.shadow.mem.mmap)

    def release(self) -> None:
        """Leave shadow mode: every device buffer goes back to the pool."""
        self.sd.release()
        self.sd.map.invalidated()
        assert self.pool.in_use == 0, f"{self.pool.in_use} pool pages leaked"

    def check_equal(self, before: bytes, after: bytes) -> None:
        """Guest RAM, disk and sent frames equal in both worlds; every guest page the data
        plane changed is marked dirty."""
        assert self.sd.broken is None, self.sd.broken
        assert self.direct.fault == self.shadow.fault
        direct = bytes(self.direct.mem.mmap)
        if direct != after:
            at = next(i for i in range(MEM) if direct[i] != after[i])
            raise AssertionError(
                f"guest RAM differs first at {at:#x} (page {at // PAGE_SIZE}): "
                f"direct {direct[at : at + 8].hex()} shadow "
                f"{after[at : at + 8].hex()}"
            )
        if self.kind == "blk":
            assert self.direct.image is not None and self.shadow.image is not None
            with open(self.direct.image, "rb") as a, open(self.shadow.image, "rb") as b:
                assert a.read() == b.read(), "disk images differ"
        else:
            assert self.direct.backend is not None and self.shadow.backend is not None
            assert self.direct.backend.sent == self.shadow.backend.sent
        changed = changed_pages(before, after)
        dirty = set(bitmap.pages(self.sd.dataplane.take_dirty(), MEM // PAGE_SIZE).tolist())
        assert changed <= dirty, f"pages changed but not marked dirty: {changed - dirty}"
        for d in self.drivers:
            d.take_used()


def changed_pages(before: bytes, after: bytes) -> set[int]:
    a = np.frombuffer(before, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    b = np.frombuffer(after, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return set(np.flatnonzero((a != b).any(axis=1)).tolist())


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        yield d


# --- laying out requests -------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """How a run of bytes is laid out: cut into descriptors at `cuts` (fractions), each piece
    placed `gaps` bytes after the previous one (so pieces straddle page boundaries)."""

    cuts: tuple[int, ...]
    gaps: tuple[int, ...]


def layout(
    drv: DriverQueue,
    cursor: list[int],
    data: bytes | int,
    writable: bool,
    how: Piece,
    rng: random.Random,
) -> list[Buffer]:
    """Buffers holding `data` (readable) or `data` writable bytes, cut and placed per `how`.
    Writable buffers start with random bytes (what the guest's memory held)."""
    n = len(data) if isinstance(data, bytes) else data
    if n == 0:
        return []
    cuts = sorted({cut % n for cut in how.cuts if cut % n})
    bounds = [0, *cuts, n]
    out = []
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        addr = cursor[0] + how.gaps[i % len(how.gaps)]
        cursor[0] = addr + (hi - lo)
        fill = data[lo:hi] if isinstance(data, bytes) else rng.randbytes(hi - lo)
        drv.mem.write(addr, fill)
        out.append(Buffer(addr, hi - lo, writable))
    return out


pieces = st.builds(
    Piece,
    st.lists(st.integers(1, 9000), max_size=4).map(tuple),
    st.lists(st.integers(0, PAGE_SIZE), min_size=1, max_size=3).map(tuple),
)

# --- virtio-blk ----------------------------------------------------------------------------

BLK_TYPES = [
    c.VIRTIO_BLK_T_IN,
    c.VIRTIO_BLK_T_OUT,
    c.VIRTIO_BLK_T_FLUSH,
    c.VIRTIO_BLK_T_GET_ID,
    5,
    99,
]  # 5 (DISCARD) and 99 were not offered: unsupported


@dataclass(frozen=True)
class BlkRequest:
    rtype: int
    sector: int
    data_len: int
    header: Piece
    data: Piece
    status_alone: bool  # the status byte in a descriptor of its own
    seed: int


blk_request = st.builds(
    BlkRequest,
    st.sampled_from(BLK_TYPES),
    st.one_of(st.integers(0, SECTORS - 1), st.integers(SECTORS - 4, SECTORS + 8)),
    st.one_of(
        st.sampled_from([0, 512, 1024, 4096, 8192]),
        st.integers(1, 9000),
        st.sampled_from([1, 19, 20, 21, 40]),
    ),
    pieces,
    pieces,
    st.booleans(),
    st.integers(0, 2**32),
)


blk_steps = st.lists(st.lists(blk_request, min_size=1, max_size=3), min_size=1, max_size=5)


def post_blk(rig: Rig, req: BlkRequest, cursor: list[int]) -> None:
    rng = random.Random(req.seed)
    drv = rig.drivers[0]
    header = struct.pack(c.BLK_REQ_HDR_FORMAT, req.rtype, 0, req.sector)
    readable = header + (rng.randbytes(req.data_len) if req.rtype == c.VIRTIO_BLK_T_OUT else b"")
    wlen = 0 if req.rtype == c.VIRTIO_BLK_T_OUT else req.data_len
    bufs = layout(drv, cursor, readable, False, req.header, rng)
    if req.status_alone:
        bufs += layout(drv, cursor, wlen, True, req.data, rng)
        bufs += layout(drv, cursor, 1, True, Piece((), (rng.randrange(64),)), rng)
    else:
        bufs += layout(drv, cursor, wlen + 1, True, req.data, rng)
    drv.add_chain(bufs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", PATHS)
@fuzz
@given(steps=blk_steps)
def test_blk_through_shadow_mode_equals_direct_dma(
    workdir: str, path: str, mode: str, steps: list[list[BlkRequest]]
) -> None:
    rig = Rig("blk", path, workdir, mode=mode)
    try:
        for batch in steps:
            cursor = [DATA]
            for req in batch:
                post_blk(rig, req, cursor)
            rig.check_equal(*rig.step([0]))
        rig.release()
    finally:
        rig.close()


def test_blk_error_completions_leave_the_status_byte_at_the_end(workdir: str) -> None:
    """The issue's two cases, on both paths: an IN past the end (status IOERR, data bytes
    untouched) and a GET_ID into a 512-byte buffer (id, then status at byte 512)."""
    for path, mode in itertools.product(PATHS, MODES):
        rig = Rig("blk", path, workdir, mode=mode)
        try:
            drv = rig.drivers[0]
            past = struct.pack(c.BLK_REQ_HDR_FORMAT, c.VIRTIO_BLK_T_IN, 0, SECTORS)
            hdr = drv.alloc(16, past)
            data = drv.alloc(513, b"\xaa" * 513)
            drv.add_chain([Buffer(hdr, 16), Buffer(data, 513, True)])
            gid = drv.alloc(16, struct.pack(c.BLK_REQ_HDR_FORMAT, c.VIRTIO_BLK_T_GET_ID, 0, 0))
            ident = drv.alloc(513, b"\xbb" * 513)
            drv.add_chain([Buffer(gid, 16), Buffer(ident, 513, True)])
            rig.check_equal(*rig.step([0]))
            mem = rig.shadow.mem
            assert mem.read(data, 513) == b"\xaa" * 512 + bytes([c.VIRTIO_BLK_S_IOERR])
            assert mem.read(ident + 512, 1) == bytes([c.VIRTIO_BLK_S_OK])
            assert mem.read(ident, 20) == b"ptmig-blk".ljust(20, b"\0")
            assert mem.read(ident + 20, 492) == b"\xbb" * 492
        finally:
            rig.close()


# --- virtio-net ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NetOp:
    op: str  # "rx_post", "rx_frames", "tx"
    size: int  # the RX buffer's bytes, or the frame's
    count: int
    how: Piece
    seed: int


net_op = st.builds(
    NetOp,
    st.sampled_from(["rx_post", "rx_frames", "tx"]),
    st.one_of(st.integers(1, 3000), st.sampled_from([12, 13, 60, 1514, 1526])),
    st.integers(1, 3),
    pieces,
    st.integers(0, 2**32),
)


def play_net(rig: Rig, op: NetOp, cursor: list[int]) -> list[int]:
    """Post or deliver what `op` says; the queues the device must look at."""
    rng = random.Random(op.seed)
    if op.op == "rx_post":
        rx = rig.drivers[c.NET_QUEUE_RX]
        for _ in range(op.count):
            if len(rx._free) < 8:
                break
            rx.add_chain(layout(rx, cursor, op.size, True, op.how, rng))
        return [c.NET_QUEUE_RX]
    if op.op == "rx_frames":
        for _ in range(op.count):
            frame = rng.randbytes(op.size)
            for w in (rig.direct, rig.shadow):
                assert w.backend is not None
                w.backend.incoming.append(frame)
                w.model.on_fd_readable(-1)
        return [c.NET_QUEUE_RX]
    tx = rig.drivers[c.NET_QUEUE_TX]
    frame = bytes(c.NET_HDR_SIZE) + rng.randbytes(op.size)
    tx.add_chain(layout(tx, cursor, frame, False, op.how, rng))
    return [c.NET_QUEUE_TX]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", PATHS)
@fuzz
@given(ops=st.lists(net_op, min_size=1, max_size=8))
def test_net_through_shadow_mode_equals_direct_dma(
    workdir: str, path: str, mode: str, ops: list[NetOp]
) -> None:
    rig = Rig("net", path, workdir, pool_pages=MEM // PAGE_SIZE, mode=mode)
    cursor = [DATA]  # RX buffers stay posted across steps: never reuse their bytes
    try:
        for op in ops:
            if cursor[0] > MEM - 3 * (3000 + 4 * PAGE_SIZE) - c.NET_HDR_SIZE:
                break  # the data area is used up
            queues = play_net(rig, op, cursor)
            rig.check_equal(*rig.step(queues))
        rig.release()
    finally:
        rig.close()


# --- a hostile device ----------------------------------------------------------------------


class Hostile:
    """What a buggy or hostile device does around its run, and whether the VMM must then mark
    it broken."""

    def __init__(self, mode: str, seed: int) -> None:
        self.mode = mode
        self.rng = random.Random(seed)

    @property
    def must_break(self) -> bool:
        return self.mode in ("wrong_id", "double", "long_len", "too_many")

    def before_run(self, rig: Rig) -> None:
        drv, dma = rig.drivers[0], rig.shadow.dma
        if self.mode == "scribble_desc":  # the shadow descriptor table, as the device sees it
            for _ in range(self.rng.randrange(1, 8)):
                i = self.rng.randrange(QSIZE)
                desc = struct.pack(
                    "<QIHH",
                    self.rng.choice([DATA, RINGS, drv.used_addr, self.rng.randrange(MEM)]),
                    self.rng.choice([1, 17, 512, PAGE_SIZE, 1 << 20]),
                    self.rng.randrange(4),
                    self.rng.randrange(QSIZE),
                )
                dma.write(drv.desc_addr + 16 * i, desc)
        elif self.mode == "scribble_avail":
            for slot in range(4):
                dma.write(
                    drv.avail_addr + 4 + 2 * slot, struct.pack("<H", self.rng.randrange(QSIZE))
                )

    def after_run(self, rig: Rig) -> None:
        drv, dma = rig.drivers[0], rig.shadow.dma
        used_idx = struct.unpack("<H", dma.read(drv.used_addr + 2, 2))[0]
        first = drv.last_used
        elem = drv.used_addr + 4 + 8 * (first % QSIZE)
        if self.mode == "wrong_id":
            busy = set(drv._chains)
            dma.write(
                elem,
                struct.pack(
                    "<I",
                    self.rng.choice(
                        [i for i in range(QSIZE) if i not in busy] + [QSIZE, 0xFFFF_FFFF]
                    ),
                ),
            )
        elif self.mode == "long_len":
            head = struct.unpack("<I", dma.read(elem, 4))[0]
            wlen = sum(b.length for b in drv.chain_buffers(head) if b.writable)
            dma.write(elem + 4, struct.pack("<I", wlen + 1 + self.rng.randrange(1 << 20)))
        elif self.mode in ("double", "too_many"):
            dup = dma.read(elem, 8) if self.mode == "double" else self.rng.randbytes(8)
            dma.write(drv.used_addr + 4 + 8 * (used_idx % QSIZE), dup)
            dma.write(drv.used_addr + 2, struct.pack("<H", (used_idx + 1) & 0xFFFF))


HOSTILE = ["scribble_desc", "scribble_avail", "wrong_id", "double", "long_len", "too_many"]
# Under intercept the device reaches guest RAM through the identity map: a device that follows
# descriptors it scribbled itself writes where it likes (what intercept trusts it not to do,
# see test_intercept_trusts_the_device_with_guest_ram); the completion checks still hold.
HOSTILE_COMPLETIONS = ["wrong_id", "double", "long_len", "too_many"]


def affected(drv: DriverQueue) -> list[tuple[int, int]]:
    """What the requests in flight may legitimately change: their writable bytes, the used
    ring."""
    out = [(drv.used_addr, 4 + 8 * QSIZE)]
    for head in drv._chains:
        out += [(b.addr, b.length) for b in drv.chain_buffers(head) if b.writable]
    return out


@pytest.mark.parametrize("tracking", MODES)
@pytest.mark.parametrize("path", PATHS)
@fuzz
@given(
    data=st.data(),
    batch=st.lists(blk_request, min_size=1, max_size=3),
    seed=st.integers(0, 2**32),
)
def test_a_hostile_device_is_contained(
    workdir: str, path: str, tracking: str, data: st.DataObject, batch: list[BlkRequest], seed: int
) -> None:
    mode = data.draw(st.sampled_from(HOSTILE if tracking == "shadow" else HOSTILE_COMPLETIONS))
    rig = Rig("blk", path, workdir, mode=tracking)
    try:
        cursor = [DATA]
        for req in batch:
            post_blk(rig, req, cursor)
        allowed = affected(rig.drivers[0])
        hostile = Hostile(mode, seed)
        _, after = rig.step([0], hostile)
        if hostile.must_break:
            assert rig.sd.broken is not None, f"{mode}: the device was not marked broken"
        mask = np.ones(MEM, dtype=bool)
        for addr, n in allowed:
            mask[addr : addr + n] = False
        direct = np.frombuffer(bytes(rig.direct.mem.mmap), dtype=np.uint8)
        shadow = np.frombuffer(after, dtype=np.uint8)
        bad = np.flatnonzero((direct != shadow) & mask)
        assert bad.size == 0, f"{mode}: guest RAM outside the requests differs at {bad[:4]}"
        rig.release()  # what leaving shadow mode does: no pool page stays taken
    finally:
        rig.close()


@pytest.mark.parametrize("path", PATHS)
def test_intercept_trusts_the_device_with_guest_ram(workdir: str, path: str) -> None:
    """The difference in trust, shown: a device writing a guest page no request gave it is
    stopped by `shadow` (the page is not mapped for the device) and reaches guest RAM under
    `intercept` (identity map), where no completion marks it dirty -- the exposure the
    intercept docstring names (a device writing outside the buffers it was given)."""
    stray = DATA + 40 * PAGE_SIZE
    for mode in MODES:
        rig = Rig("blk", path, workdir, mode=mode)
        try:
            cursor = [DATA]
            post_blk(
                rig,
                BlkRequest(c.VIRTIO_BLK_T_IN, 0, 512, Piece((), (0,)), Piece((), (0,)), False, 1),
                cursor,
            )
            rig.sd.submit(0)
            rig.sd.dataplane.take_dirty()
            if mode == "shadow":
                with pytest.raises(DmaFault):
                    rig.shadow.dma.write(stray, b"stray")
            else:
                rig.shadow.dma.write(stray, b"stray")
            rig.shadow.run(0)
            assert rig.sd.complete() == 1
            escaped = rig.shadow.mem.read(stray, 5) == b"stray"
            dirty = bitmap.pages(rig.sd.dataplane.take_dirty(), MEM // PAGE_SIZE).tolist()
            assert escaped == (mode == "intercept")
            assert stray // PAGE_SIZE not in dirty
            rig.release()
        finally:
            rig.close()


@pytest.mark.parametrize("path", PATHS)
def test_intercept_marks_every_writable_page_whatever_used_len_says(
    workdir: str, path: str
) -> None:
    """used.len is a lower bound (virtio 1.x, 2.7.8): a device reporting 1 byte may have
    written the whole buffer, so a completion marks every page of every writable buffer --
    and nothing is copied (the device wrote guest RAM itself)."""
    rig = Rig("net", path, workdir, mode="intercept")
    try:
        rx = rig.drivers[c.NET_QUEUE_RX]
        buf = rx.alloc(3 * PAGE_SIZE, b"G" * 3 * PAGE_SIZE, align=PAGE_SIZE)
        head = rx.add_chain([Buffer(buf, 3 * PAGE_SIZE, True)])
        rig.sd.submit(c.NET_QUEUE_RX)
        rig.sd.dataplane.take_dirty()
        dq = rig.shadow.queues[c.NET_QUEUE_RX]
        chain = dq.pop()
        assert chain is not None and chain.head == head
        rig.shadow.dma.write(buf + 2 * PAGE_SIZE + 100, b"late")  # past the len it reports
        dq.push_used(head, 1)
        assert rig.sd.complete() == 1
        assert rig.shadow.mem.read(buf + 2 * PAGE_SIZE + 100, 4) == b"late"
        used = rig.shadow.mem.read(rx.used_addr + 2, 10)  # (the driver reads the direct world)
        assert struct.unpack("<HII", used) == (1, head, 1)
        dirty = set(bitmap.pages(rig.sd.dataplane.take_dirty(), MEM // PAGE_SIZE).tolist())
        assert {buf // PAGE_SIZE + k for k in range(3)} <= dirty
        assert rig.sd.stats.bytes_to_guest == 0 and rig.sd.stats.pages_marked == 3
        rig.release()
    finally:
        rig.close()


# --- the native data plane against its Python reference ------------------------------------


@pytest.mark.parametrize("mode", MODES)
@fuzz
@given(steps=blk_steps)
def test_native_and_reference_data_paths_keep_the_same_books(
    workdir: str, mode: str, steps: list[list[BlkRequest]]
) -> None:
    """Beyond the same guest RAM: after every step both data paths hold the same page table,
    reference counts, LRU stamps, counters, positions, private records and dirty pages."""
    rigs = [Rig("blk", path, workdir, mode=mode) for path in PATHS]
    try:
        for batch in steps:
            for rig in rigs:
                cursor = [DATA]
                for req in batch:
                    post_blk(rig, req, cursor)
                rig.step([0])
            native, reference = (r.sd.native for r in rigs)
            for name in ("slot", "refs", "stamp", "stats"):
                a, b = getattr(native, name), getattr(reference, name)
                assert (a == b).all(), f"{name}: native {a} reference {b}"
            qa, qb = native.queues[0], reference.queues[0]
            assert (qa.pos == qb.pos).all() and (qa.head_avail == qb.head_avail).all()
            assert (qa.rec == qb.rec).all()
            dirty = [r.sd.dataplane.take_dirty() for r in rigs]
            assert (dirty[0] == dirty[1]).all()
            assert bytes(rigs[0].shadow.mem.mmap) == bytes(rigs[1].shadow.mem.mmap)
            for rig in rigs:
                rig.drivers[0].take_used()
    finally:
        for rig in rigs:
            rig.close()
