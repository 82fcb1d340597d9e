"""Hostile guests against the device runtime, in-process (no subprocess, no KVM): whatever the
ring memory holds, the runtime never raises, and memory the IOMMU does not let the device write
is never written."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptmig.devices import eventfd
from ptmig.devices.blk import BlkConfig, BlkDevice
from ptmig.devices.control import Request
from ptmig.devices.nativepath import BlkPath, NativePath, NetPath
from ptmig.devices.net import NetConfig, NetDevice
from ptmig.devices.process import DeviceModel, DeviceRuntime
from ptmig.devices.virtio import constants as c
from ptmig.iommu import PAGE_SIZE, TARGET_RAM, DmaView, IommuTable

PAGES = 32  # guest RAM: pages 0-15 writable, 16-23 read-only, 24-31 unmapped
QSIZE = 8
DESC, AVAIL, USED = 0x0000, 0x0100, 0x0200


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        yield os.path.join(d, "fuzz.img")


def make_runtime(kind: str, image: str, mem: bytearray) -> tuple[DeviceRuntime, list[int]]:
    table = IommuTable.create(PAGES + 8)
    table.map(0, 16, TARGET_RAM, 0, read=True, write=True)
    table.map(16, 8, TARGET_RAM, 16, read=True, write=False)
    dma = DmaView(table, mem, name=kind)
    model: DeviceModel
    if kind == "blk":
        model = BlkDevice(BlkConfig(image, 64 * 1024), dma)
    else:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for n in range(3):
            a.send(bytes(14 + 40 * n))
        model = NetDevice(NetConfig(b"\x52\x54\0\0\0\1", "fd:-1"), dma, backend=_SockBackend(b, a))
    ctl, peer = socket.socketpair()
    irq = eventfd.create()
    rt = DeviceRuntime(kind, kind, model, dma, ctl, {}, irq)
    rt._peer = peer  # type: ignore[attr-defined]  # keep the control peer open
    return rt, [irq]


class _SockBackend:
    def __init__(self, sock: socket.socket, peer: socket.socket) -> None:
        self.sock, self.peer = sock, peer
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> None:
        try:  # to the peer, where a test can read what the device sent
            self.sock.send(frame)
        except OSError:
            pass

    def recv(self) -> bytes | None:
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            return None

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


def mmio(rt: DeviceRuntime, offset: int, value: int) -> None:
    resp = rt.handle(Request(1, "mmio_write", {"offset": offset, "size": 4, "value": value}))
    assert resp.ok, resp.error


def rings(q: int, placement: str = "normal") -> tuple[int, int, int]:
    """(descriptor table, avail ring, used ring) of queue q. Besides the normal layout (page 0,
    writable), rings a hostile driver may choose: a used ring the device may not write (read
    only, unmapped, or running from a writable page into a read-only one) and an avail ring
    running into an unmapped page (only its first heads readable)."""
    base = q * 0x400
    desc, avail, used = base + DESC, base + AVAIL, base + USED
    if placement == "used_readonly":
        used = 16 * PAGE_SIZE + q * 0x100
    elif placement == "used_unmapped":
        used = 24 * PAGE_SIZE + q * 0x100
    elif placement == "used_straddles":
        used = 16 * PAGE_SIZE - 0x10  # idx, element 0 writable; element 1 on the read-only page
    elif placement == "avail_straddles":
        avail = 24 * PAGE_SIZE - 8 - 2 * q  # idx and the first heads readable, then unmapped
    return desc, avail, used


PLACEMENTS = ["normal", "used_readonly", "used_unmapped", "used_straddles", "avail_straddles"]


def setup_driver(rt: DeviceRuntime, nq: int, placement: str = "normal") -> None:
    mmio(rt, c.REG_STATUS, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    mmio(rt, c.REG_DRIVER_FEATURES_SEL, 1)
    mmio(rt, c.REG_DRIVER_FEATURES, 1)
    mmio(rt, c.REG_STATUS, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK)
    for q in range(nq):
        desc, avail, used = rings(q, placement)
        mmio(rt, c.REG_QUEUE_SEL, q)
        mmio(rt, c.REG_QUEUE_NUM, QSIZE)
        mmio(rt, c.REG_QUEUE_DESC_LOW, desc)
        mmio(rt, c.REG_QUEUE_DRIVER_LOW, avail)
        mmio(rt, c.REG_QUEUE_DEVICE_LOW, used)
        mmio(rt, c.REG_QUEUE_READY, 1)
    mmio(
        rt,
        c.REG_STATUS,
        c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK | c.STATUS_DRIVER_OK,
    )


ADDRS = [
    0x1000,
    0x2000,
    0x3000,
    0x8000,
    0xFFF8,
    16 * PAGE_SIZE + 100,
    24 * PAGE_SIZE,
    PAGES * PAGE_SIZE - 4,
]
LENGTHS = [1, 12, 16, 100, 512, 1024, 4096]
readable = st.tuples(st.sampled_from(ADDRS), st.sampled_from([16, 28, *LENGTHS]), st.just(False))
writable = st.tuples(st.sampled_from(ADDRS), st.sampled_from(LENGTHS), st.just(True))
# readable buffers before writable ones, as a driver must; mutations break that sometimes
chain = st.builds(
    lambda r, w: r + w, st.lists(readable, max_size=2), st.lists(writable, max_size=2)
).filter(bool)
mutation = st.tuples(st.integers(0, QSIZE - 1), st.integers(0, 3), st.integers(0, 2**64 - 1))

# A device's hostile ring: the kind, the guest's chains, stores that corrupt them, a forged
# avail index (now and then), and a block request header.
HOSTILE_RING = dict(
    kind=st.sampled_from(["blk", "net"]),
    chains=st.lists(chain, min_size=1, max_size=4),
    mutations=st.lists(mutation, max_size=2),
    avail_idx=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF)),
    blk_hdr=st.tuples(st.sampled_from([0, 1, 4, 8, 99]), st.integers(0, 300)),
)


def lay_out(
    mem: bytearray,
    base: int,
    chains: list[list[tuple[int, int, bool]]],
    mutations: list[tuple[int, int, int]],
    avail_idx: int | None,
    avail: int | None = None,
) -> None:
    """Write the chains as a well-formed driver would, then corrupt what `mutations` say.
    The descriptor table is at base + DESC, the avail ring at `avail` (base + AVAIL)."""
    table = [[0, 0, 0, 0] for _ in range(QSIZE)]
    heads: list[int] = []
    n = 0
    for ch in chains:
        if n + len(ch) > QSIZE:
            break
        heads.append(n)
        for i, (addr, length, writable) in enumerate(ch):
            last = i == len(ch) - 1
            flags = (0 if last else c.VIRTQ_DESC_F_NEXT) | (c.VIRTQ_DESC_F_WRITE if writable else 0)
            table[n] = [addr, length, flags, 0 if last else n + 1]
            n += 1
    for index, field, value in mutations:
        table[index][field] = value & ((1 << (64, 32, 16, 16)[field]) - 1)
    for i, (addr, length, flags, nxt) in enumerate(table):
        struct.pack_into("<QIHH", mem, base + DESC + 16 * i, addr, length, flags, nxt)
    idx = len(heads) if avail_idx is None else avail_idx
    struct.pack_into(
        f"<HH{QSIZE}H",
        mem,
        base + AVAIL if avail is None else avail,
        0,
        idx,
        *(heads + [0] * (QSIZE - len(heads))),
    )


def _close(rt: DeviceRuntime, fds: list[int]) -> None:
    rt.model.close()
    rt.control.close()
    rt._peer.close()  # type: ignore[attr-defined]
    for fd in fds:
        os.close(fd)
    rt.dma.table.close()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(**HOSTILE_RING)
def test_hostile_rings_never_escape(
    image: str,
    kind: str,
    chains: list[list[tuple[int, int, bool]]],
    mutations: list[tuple[int, int, int]],
    avail_idx: int | None,
    blk_hdr: tuple[int, int],
) -> None:
    mem = bytearray(PAGES * PAGE_SIZE)
    protected = bytes(range(256)) * (16 * PAGE_SIZE // 256)
    mem[16 * PAGE_SIZE :] = protected
    rt, fds = make_runtime(kind, image, mem)
    try:
        setup_driver(rt, rt.model.num_queues)
        for q in range(rt.model.num_queues):
            lay_out(mem, q * 0x400, chains, mutations, avail_idx)
        struct.pack_into("<IIQ", mem, 0x1000, blk_hdr[0], 0, blk_hdr[1])  # a plausible header
        if kind == "net":
            rt.model.on_fd_readable(rt.model.extra_fds()[0])
        rt.pending.update(range(rt.model.num_queues))
        for _ in range(4):
            rt.run_pending()
        assert bytes(mem[16 * PAGE_SIZE :]) == protected
        assert rt.broken is None or rt.regs.status & c.STATUS_DEVICE_NEEDS_RESET
    finally:
        _close(rt, fds)


def _sent(rt: DeviceRuntime) -> list[bytes]:
    """The frames the device wrote to its backend (read at the backend's peer)."""
    peer = rt.model.backend.peer  # type: ignore[attr-defined]
    peer.setblocking(False)
    out = []
    while True:
        try:
            out.append(peer.recv(65536))
        except BlockingIOError:
            return out


def _native(rt: DeviceRuntime, mem: bytearray, irq: int) -> NativePath:
    iommu = rt.dma.table.entries
    model = rt.model
    if isinstance(model, BlkDevice):
        return BlkPath(
            guest=mem,
            pool=None,
            iommu=iommu,
            doorbells={},
            irq_fd=irq,
            image_fd=model.fd,
            capacity=model.capacity,
            readonly=model.cfg.readonly,
            serial=model.cfg.serial.encode(),
        )
    assert isinstance(model, NetDevice)
    return NetPath(
        guest=mem, pool=None, iommu=iommu, doorbells={}, irq_fd=irq, backend=model.backend
    )


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(**HOSTILE_RING, placement=st.sampled_from(PLACEMENTS))
def test_native_paths_do_what_the_python_ones_do(
    image: str,
    kind: str,
    chains: list[list[tuple[int, int, bool]]],
    mutations: list[tuple[int, int, int]],
    avail_idx: int | None,
    blk_hdr: tuple[int, int],
    placement: str,
) -> None:
    """The same hostile rings through both data paths of a device: the same guest memory
    afterwards (buffers, statuses, used rings), the same frames on the wire or bytes in the
    image, the same verdict (broken or not), and never a byte outside what the IOMMU lets the
    device write."""
    results = []
    for native in (False, True):
        mem = bytearray(PAGES * PAGE_SIZE)
        mem[16 * PAGE_SIZE :] = bytes(range(256)) * (16 * PAGE_SIZE // 256)
        with open(image, "wb") as f:  # the same image contents for both runs
            f.truncate(64 * 1024)
        rt, fds = make_runtime(kind, image, mem)
        path = None
        try:
            nq = rt.model.num_queues
            setup_driver(rt, nq, placement)
            for q in range(nq):
                lay_out(mem, q * 0x400, chains, mutations, avail_idx, rings(q, placement)[1])
            struct.pack_into("<IIQ", mem, 0x1000, blk_hdr[0], 0, blk_hdr[1])
            protected = bytes(mem[16 * PAGE_SIZE :])  # the device may not write any of it
            if native:
                path = _native(rt, mem, fds[0])
                with path.locked():
                    path.push(rt.queues, enabled=rt.active, log=None)
                    for _ in range(4):
                        path.run_once()
                    broken = path.take_fault() is not None
            else:
                if kind == "net":
                    rt.model.on_fd_readable(rt.model.extra_fds()[0])
                rt.pending.update(range(nq))
                for _ in range(4):
                    rt.run_pending()
                broken = rt.broken is not None
            with open(image, "rb") as f:
                disk = f.read()
            assert bytes(mem[16 * PAGE_SIZE :]) == protected
            results.append((bytes(mem), _sent(rt) if kind == "net" else [], disk, broken))
        finally:
            if path is not None:
                path.close()
            _close(rt, fds)
    (py_mem, py_sent, py_disk, py_broken), (c_mem, c_sent, c_disk, c_broken) = results
    assert c_broken == py_broken
    assert c_sent == py_sent
    assert c_disk == py_disk
    assert c_mem == py_mem


def test_a_native_library_with_another_shared_layout_is_refused() -> None:
    """Python and C index one shared array: a library compiled with a different layout is
    refused (the device then runs its Python path) instead of mixing up flags and counters."""
    from ptmig.nativelib import NativeLibraryError

    class Skewed(NetPath):
        COUNTERS = (*NetPath.COUNTERS, "one_more")

    NetPath.library()  # the real one loads
    with pytest.raises(NativeLibraryError, match="layout"):
        Skewed.library()
