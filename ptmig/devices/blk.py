"""virtio-blk device model (virtio 1.x spec 5.2): one request queue over a raw image file.

Owns the block request format and its execution: the 16-byte header {type u32, reserved u32,
sector u64} at the start of the device-readable bytes, the data (device-readable for OUT,
device-writable for IN), and the 1-byte status at the very end of the device-writable bytes.
Requests are parsed by byte offset across the chain, never by descriptor boundaries (the spec
forbids relying on framing).

Data moves with os.preadv/os.pwritev straight between the image file and the translated DMA
segments of guest memory: zero copies, and every page goes through the IOMMU first. The whole
request is translated before any byte moves, so an IOMMU fault leaves memory untouched.

This is the reference data path. By default a device process runs the same request path in C
(`native/blkpath.c`, see `ptmig.devices.nativepath`); `datapath = "python"` selects this one.

Errors the guest can cause by asking for something legitimate but impossible (a sector range
past the end, a write to a read-only disk, a length that is not a whole number of sectors) get
status IOERR; requests that break the virtio-blk framing (header shorter than 16 bytes, no
status byte) raise QueueError, which the device process turns into DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Final

from ptmig.devices.nativepath import check_datapath
from ptmig.devices.virtio.constants import (
    BLK_REQ_HDR_FORMAT,
    BLK_REQ_HDR_SIZE,
    BLK_SECTOR_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    blk_config,
    feature_mask,
)
from ptmig.devices.virtio.queue import DescriptorChain, QueueError, SplitQueue, byte_range
from ptmig.iommu import DmaView

QUEUE_NUM_MAX: Final = 256
SEG_MAX: Final = 126  # data descriptors per request (queue size minus header and status)
SIZE_MAX: Final = 1 << 20  # bytes per data descriptor
_IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_HDR = struct.Struct(BLK_REQ_HDR_FORMAT)


@dataclass(frozen=True)
class BlkConfig:
    """Device configuration: image path, size (used to create a missing image), options."""

    path: str
    size: int | None = None
    readonly: bool = False
    serial: str = "ptmig-blk"
    datapath: str = "native"  # or "python": this module's request path (the reference)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BlkConfig:
        unknown = set(raw) - {"path", "size", "readonly", "serial", "datapath"}
        if unknown:
            raise ValueError(f"unknown virtio-blk config keys {sorted(unknown)}")
        path, size = raw.get("path"), raw.get("size")
        if not isinstance(path, str) or not path:
            raise ValueError(f"virtio-blk config 'path' must be a non-empty string, got {path!r}")
        if size is not None and (not isinstance(size, int) or size <= 0 or size % BLK_SECTOR_SIZE):
            raise ValueError(
                f"virtio-blk 'size' must be a positive multiple of {BLK_SECTOR_SIZE}, got {size!r}"
            )
        serial = raw.get("serial")
        serial = "ptmig-blk" if serial is None else serial
        if not isinstance(serial, str) or len(serial.encode()) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(
                f"virtio-blk 'serial' must be at most {VIRTIO_BLK_ID_BYTES} bytes, got {serial!r}"
            )
        datapath = check_datapath(raw.get("datapath", "native"), "virtio-blk")
        return cls(path, size, bool(raw.get("readonly", False)), serial, datapath)


def open_image(cfg: BlkConfig) -> tuple[int, int]:
    """Open (creating at cfg.size if missing) the raw image; return (fd, capacity in bytes)."""
    flags = os.O_RDONLY if cfg.readonly else os.O_RDWR
    if not os.path.exists(cfg.path):
        if cfg.size is None:
            raise ValueError(f"image {cfg.path!r} does not exist and no size was given")
        # Created full-size under a private name, then linked into place: two VMMs starting on
        # the same shared image (a migration's source and destination) never see it half-made,
        # and the one that loses the race simply opens the winner's.
        tmp = f"{cfg.path}.{os.getpid()}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, cfg.size)
        finally:
            os.close(fd)
        try:
            os.link(tmp, cfg.path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    fd = os.open(cfg.path, flags | os.O_CLOEXEC)
    size = os.fstat(fd).st_size
    if size < BLK_SECTOR_SIZE:
        os.close(fd)
        raise ValueError(f"image {cfg.path!r} is {size} bytes, smaller than one sector")
    return fd, size - size % BLK_SECTOR_SIZE


class BlkDevice:
    """The virtio-blk device model; the device process drives it (see DeviceModel)."""

    device_id: Final = VIRTIO_ID_BLOCK
    num_queues: Final = 1
    queue_num_max: Final = QUEUE_NUM_MAX

    def __init__(self, cfg: BlkConfig, dma: DmaView) -> None:
        self.cfg = cfg
        self.dma = dma
        self.fd, self.capacity = open_image(cfg)
        bits = [VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX]
        if cfg.readonly:
            bits.append(VIRTIO_BLK_F_RO)
        self.device_features = feature_mask(*bits)
        self.counters: dict[str, int] = {
            "reads": 0,
            "writes": 0,
            "flushes": 0,
            "get_ids": 0,
            "unsupported": 0,
            "ioerrs": 0,
            "bytes_read": 0,
            "bytes_written": 0,
        }

    def config_space(self) -> bytearray:
        return blk_config(self.capacity // BLK_SECTOR_SIZE, size_max=SIZE_MAX, seg_max=SEG_MAX)

    def extra_fds(self) -> list[int]:
        return []

    def on_fd_readable(self, fd: int) -> list[int]:
        return []

    def tick(self) -> None:
        """Nothing periodic for a disk."""

    def reset(self) -> None:
        """Nothing to drop: every request completes before the next is started."""

    def stats(self) -> dict[str, int]:
        c = self.counters
        return dict(c, bytes=c["bytes_read"] + c["bytes_written"])

    def close(self) -> None:
        os.close(self.fd)

    # -- the data path -----------------------------------------------------------------------
    def process_queue(self, index: int, queue: SplitQueue, budget: int) -> bool:
        """Complete up to `budget` requests; True if the budget ran out (more may wait)."""
        if index != 0:
            raise QueueError(f"virtio-blk has one queue, got a kick for queue {index}")
        done: list[tuple[int, int]] = []
        try:
            for _ in range(budget):
                chain = queue.pop()
                if chain is None:
                    return False
                done.append((chain.head, self.execute(chain)))
            return True
        finally:  # one used idx update for the pass; requests finished before a fault too
            queue.push_used_many(done)

    def execute(self, chain: DescriptorChain) -> int:
        """Run one request; return used.len (bytes written into guest memory)."""
        readable, writable = chain.readable, chain.writable
        if chain.total_readable < BLK_REQ_HDR_SIZE:
            raise QueueError(
                f"virtio-blk request header needs {BLK_REQ_HDR_SIZE} readable "
                f"bytes, chain {chain.head} has {chain.total_readable}",
                head=chain.head,
            )
        if chain.total_writable < 1:
            raise QueueError(
                f"virtio-blk request {chain.head} has no writable status byte", head=chain.head
            )
        header = b"".join(self.dma.read(a, n) for a, n in byte_range(readable, 0, BLK_REQ_HDR_SIZE))
        rtype, _, sector = _HDR.unpack(header)
        status_addr, _ = byte_range(writable, chain.total_writable - 1, 1)[0]
        self.dma.check(status_addr, 1, write=True)
        out_len = chain.total_readable - BLK_REQ_HDR_SIZE
        in_len = chain.total_writable - 1
        written = 0
        if rtype == VIRTIO_BLK_T_IN:
            status = self._check_range(sector, in_len)
            if status == VIRTIO_BLK_S_OK:
                segs = self._segments(byte_range(writable, 0, in_len), write=True)
                status = self._io(segs, sector * BLK_SECTOR_SIZE, write=False)
                if status == VIRTIO_BLK_S_OK:
                    written = in_len
                    self.counters["reads"] += 1
                    self.counters["bytes_read"] += in_len
        elif rtype == VIRTIO_BLK_T_OUT:
            status = VIRTIO_BLK_S_IOERR if self.cfg.readonly else self._check_range(sector, out_len)
            if status == VIRTIO_BLK_S_OK:
                pieces = byte_range(readable, BLK_REQ_HDR_SIZE, out_len)
                status = self._io(
                    self._segments(pieces, write=False), sector * BLK_SECTOR_SIZE, write=True
                )
                if status == VIRTIO_BLK_S_OK:
                    self.counters["writes"] += 1
                    self.counters["bytes_written"] += out_len
        elif rtype == VIRTIO_BLK_T_FLUSH:
            status = self._flush()
        elif rtype == VIRTIO_BLK_T_GET_ID:
            ident = self.cfg.serial.encode().ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:in_len]
            pos = 0
            for addr, n in byte_range(writable, 0, len(ident)):
                self.dma.write(addr, ident[pos : pos + n])
                pos += n
            written = len(ident)
            status = VIRTIO_BLK_S_OK
            self.counters["get_ids"] += 1
        else:
            status = VIRTIO_BLK_S_UNSUPP
            self.counters["unsupported"] += 1
        if status == VIRTIO_BLK_S_IOERR:
            self.counters["ioerrs"] += 1
        self.dma.write(status_addr, bytes([status]))
        return written + 1

    def _check_range(self, sector: int, length: int) -> int:
        if length % BLK_SECTOR_SIZE:
            return VIRTIO_BLK_S_IOERR
        if sector * BLK_SECTOR_SIZE + length > self.capacity:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _segments(self, pieces: list[tuple[int, int]], write: bool) -> list[memoryview]:
        segs: list[memoryview] = []
        for addr, n in pieces:  # translate everything before moving a byte
            segs.extend(self.dma.segments(addr, n, write=write))
        return segs

    def _io(self, segs: list[memoryview], offset: int, write: bool) -> int:
        try:
            while segs:
                batch = segs[:_IOV_MAX]
                n = (
                    os.pwritev(self.fd, batch, offset)
                    if write
                    else os.preadv(self.fd, batch, offset)
                )
                if n <= 0:
                    return VIRTIO_BLK_S_IOERR
                offset += n
                segs = _advance(segs, n)
        except OSError:
            return VIRTIO_BLK_S_IOERR
        finally:
            for s in segs:
                s.release()
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        try:
            os.fdatasync(self.fd)
        except OSError:
            return VIRTIO_BLK_S_IOERR
        self.counters["flushes"] += 1
        return VIRTIO_BLK_S_OK


def _advance(segs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first n bytes from a list of segments (after a short read/write)."""
    while segs and n >= len(segs[0]):
        n -= len(segs[0])
        segs = segs[1:]
    if segs and n:
        segs = [segs[0][n:], *segs[1:]]
    return segs
