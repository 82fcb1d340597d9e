"""virtio-net device model (virtio 1.x spec 5.1): RX queue 0, TX queue 1, no offloads.

Owns the frame path between a guest's virtqueues and a network backend: TX gathers the frame
that follows the 12-byte virtio_net_hdr_v1 from the device-readable descriptors and hands it to
the backend; RX writes a header (num_buffers = 1, everything else zero: no offloads were
offered) followed by the frame into the device-writable descriptors of one posted buffer.

Received frames wait in a small bounded backlog until the driver posts RX buffers; beyond it
they are dropped and counted, as a NIC drops when its ring is empty. A frame larger than the
buffer it would land in is dropped too, and the buffer is returned with used.len 0.

This is the reference data path. By default a device process runs the same frame path in C
(`native/netpath.c`, see `ptmig.devices.nativepath`); `datapath = "python"` selects this one.

Backends: anything with fileno()/send(frame)/recv() -> bytes | None/close() (see
`ptmig.net.backend`). Specs: ``udp:HOST:PORT`` and ``tap:IFNAME`` (opened by
`ptmig.net.backend.open_backend`) and ``fd:N``, an already-open datagram or seqpacket socket
inherited from the VMM (a TAP fd opened with privileges, or a socketpair in tests).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ptmig.devices.nativepath import check_datapath
from ptmig.devices.virtio.constants import (
    NET_HDR_FORMAT,
    NET_HDR_SIZE,
    NET_QUEUE_RX,
    NET_QUEUE_TX,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    VIRTIO_NET_F_MAC,
    feature_mask,
    net_config,
)
from ptmig.devices.virtio.queue import QueueError, SplitQueue, byte_range
from ptmig.iommu import DmaView

log = logging.getLogger("ptmig.devices.net")

QUEUE_NUM_MAX: Final = 256
RX_BACKLOG: Final = 256
MAX_FRAME: Final = 65535
_RX_HDR: Final = struct.pack(NET_HDR_FORMAT, 0, 0, 0, 0, 0, 0, 1)  # num_buffers = 1


class Backend(Protocol):
    def fileno(self) -> int: ...
    def send(self, frame: bytes) -> None: ...
    def recv(self) -> bytes | None: ...
    def close(self) -> None: ...


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes (unicast required)."""
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r} is not six hex bytes separated by ':'") from None
    if len(parts) != 6 or any(len(p) != 2 for p in parts):
        raise ValueError(f"MAC address {text!r} is not six hex bytes separated by ':'")
    if mac[0] & 1:
        raise ValueError(f"MAC address {text!r} is a multicast address")
    return mac


@dataclass(frozen=True)
class NetConfig:
    """Device configuration: MAC address and backend spec."""

    mac: bytes
    backend: str
    datapath: str = "native"  # or "python": this module's frame path (the reference)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> NetConfig:
        unknown = set(raw) - {"mac", "backend", "datapath"}
        if unknown:
            raise ValueError(f"unknown virtio-net config keys {sorted(unknown)}")
        mac, backend = raw.get("mac", "52:54:00:12:34:56"), raw.get("backend")
        datapath = check_datapath(raw.get("datapath", "native"), "virtio-net")
        if not isinstance(mac, str):
            raise ValueError(f"virtio-net 'mac' must be a string, got {mac!r}")
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"virtio-net 'backend' must be a spec string, got {backend!r}")
        return cls(parse_mac(mac), backend, datapath)


class FdBackend:
    """An inherited fd carrying one frame per read/write: a datagram or seqpacket socket, or a
    TAP device opened (with privileges) by the VMM with IFF_TAP | IFF_NO_PI."""

    def __init__(self, fd: int) -> None:
        mode = os.fstat(fd).st_mode
        self._fd = fd
        self.closed = False  # the peer hung up: the link is down for good
        self._sock: socket.socket | None = None
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=fd)
            if self._sock.type not in (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
                kind = self._sock.type
                self._sock.detach()
                raise ValueError(
                    f"backend fd {fd} is a {kind!r} socket; it must be "
                    f"datagram or seqpacket (one frame per message)"
                )
            self._sock.setblocking(False)
        elif stat.S_ISCHR(mode):
            os.set_blocking(fd, False)
        else:
            raise ValueError(
                f"backend fd {fd} is neither a socket nor a TAP character "
                f"device (st_mode={mode:#o})"
            )

    def fileno(self) -> int:
        return self._fd

    def send(self, frame: bytes) -> None:
        try:
            if self._sock is not None:
                self._sock.send(frame)
            else:
                os.write(self._fd, frame)
        except (BlockingIOError, ConnectionError):
            pass  # a full or dead link drops the frame, as a NIC would

    def recv(self) -> bytes | None:
        try:
            if self._sock is not None:
                data = self._sock.recv(MAX_FRAME + 1)
            else:
                data = os.read(self._fd, MAX_FRAME + 1)
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionError:
            data = b""
        if not data and (self._sock is None or self._sock.type == socket.SOCK_SEQPACKET):
            self.closed = True  # end of file, not an empty frame
        return data or None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self._fd)


def open_net_backend(spec: str, mac: bytes) -> Backend:
    """Open a backend from its spec (see the module docstring)."""
    if spec.startswith("fd:"):
        try:
            fd = int(spec[3:])
        except ValueError:
            raise ValueError(f"backend spec {spec!r}: fd: needs a number") from None
        return FdBackend(fd)
    from ptmig.net.backend import open_backend

    return open_backend(spec, mac=mac)


class NetDevice:
    """The virtio-net device model; the device process drives it (see DeviceModel)."""

    device_id: Final = VIRTIO_ID_NET
    num_queues: Final = 2
    queue_num_max: Final = QUEUE_NUM_MAX
    tick_interval: Final = 1.0  # seconds between backend keepalive checks

    def __init__(self, cfg: NetConfig, dma: DmaView, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.dma = dma
        self.backend = backend if backend is not None else open_net_backend(cfg.backend, cfg.mac)
        self.device_features = feature_mask(VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC)
        self.backlog: collections.deque[bytes] = collections.deque()
        self.counters: dict[str, int] = {
            "tx_frames": 0,
            "tx_bytes": 0,
            "tx_dropped": 0,
            "rx_frames": 0,
            "rx_bytes": 0,
            "rx_dropped_no_buffer": 0,
            "rx_dropped_too_big": 0,
        }

    def config_space(self) -> bytearray:
        return net_config(self.cfg.mac)

    def extra_fds(self) -> list[int]:
        """The backend fd while the link is up (a hung-up backend would poll readable forever)."""
        if getattr(self.backend, "closed", False):
            return []
        return [self.backend.fileno()]

    def on_fd_readable(self, fd: int) -> list[int]:
        """Drain the backend into the bounded backlog; RX has work if the backlog is not empty."""
        while True:
            frame = self.backend.recv()
            if frame is None:
                if getattr(self.backend, "closed", False):
                    log.warning("%s: network backend hung up; link down", self.dma.name)
                break
            if len(self.backlog) >= RX_BACKLOG:
                self.counters["rx_dropped_no_buffer"] += 1
                continue
            self.backlog.append(frame)
        return [NET_QUEUE_RX] if self.backlog else []

    def tick(self) -> None:
        """Backend keepalives (the UDP backend says hello to the switch periodically)."""
        maintain = getattr(self.backend, "maintain", None)
        if maintain is not None:
            maintain()

    def announce(self) -> None:
        """Tell the network this MAC now lives here (after a migration's switchover)."""
        announce = getattr(self.backend, "announce", None)
        if announce is not None:
            announce()

    def reset(self) -> None:
        self.backlog.clear()

    def stats(self) -> dict[str, int]:
        c = self.counters
        return dict(
            c,
            rx_backlog=len(self.backlog),
            bytes=c["tx_bytes"] + c["rx_bytes"],
            link_up=int(not getattr(self.backend, "closed", False)),
        )

    def close(self) -> None:
        self.backend.close()

    # -- the data path -----------------------------------------------------------------------
    def process_queue(self, index: int, queue: SplitQueue, budget: int) -> bool:
        """Move up to `budget` frames on queue `index`; True if the budget ran out."""
        if index == NET_QUEUE_TX:
            return self._tx(queue, budget)
        if index == NET_QUEUE_RX:
            return self._rx(queue, budget)
        raise QueueError(f"virtio-net has queues 0 and 1, got a kick for queue {index}")

    def _tx(self, queue: SplitQueue, budget: int) -> bool:
        done: list[tuple[int, int]] = []
        try:
            return self._tx_chains(queue, budget, done)
        finally:  # chains finished before a fault are still returned to the driver
            queue.push_used_many(done)

    def _tx_chains(self, queue: SplitQueue, budget: int, done: list[tuple[int, int]]) -> bool:
        counters, read, send = self.counters, self.dma.read, self.backend.send
        for _ in range(budget):
            chain = queue.pop()
            if chain is None:
                return False
            descs = chain.descriptors
            # the common case, one device-readable buffer, without building tuples
            readable = descs if len(descs) == 1 and not descs[0].writable else chain.readable
            total = readable[0].length if len(readable) == 1 else sum(d.length for d in readable)
            if total < NET_HDR_SIZE:
                raise QueueError(
                    f"virtio-net TX chain {chain.head} has {total} readable "
                    f"bytes, less than the {NET_HDR_SIZE}-byte header",
                    head=chain.head,
                )
            if total - NET_HDR_SIZE > MAX_FRAME:
                counters["tx_dropped"] += 1
                done.append((chain.head, 0))
                continue
            if len(readable) == 1:  # the header is not read: no offload was offered
                d = readable[0]
                frame = read(d.addr + NET_HDR_SIZE, d.length - NET_HDR_SIZE)
            else:
                frame = b"".join(
                    read(a, n) for a, n in byte_range(readable, NET_HDR_SIZE, total - NET_HDR_SIZE)
                )
            done.append((chain.head, 0))
            if not frame:
                counters["tx_dropped"] += 1
                continue
            send(frame)
            counters["tx_frames"] += 1
            counters["tx_bytes"] += len(frame)
        return True

    def _rx(self, queue: SplitQueue, budget: int) -> bool:
        """Fill posted buffers from the backlog; True only if the budget ran out with frames
        and buffers left. Out of buffers, the device waits for the driver's next RX notify
        (or the next frame) instead of polling the ring."""
        done: list[tuple[int, int]] = []
        try:
            return self._rx_chains(queue, budget, done)
        finally:  # chains finished before a fault are still returned to the driver
            queue.push_used_many(done)

    def _rx_chains(self, queue: SplitQueue, budget: int, done: list[tuple[int, int]]) -> bool:
        counters, backlog, dma = self.counters, self.backlog, self.dma
        for _ in range(budget):
            if not backlog:
                return False
            chain = queue.pop()
            if chain is None:
                return False
            frame = backlog.popleft()
            packet = _RX_HDR + frame
            descs = chain.descriptors
            # the common case, one device-writable buffer, without building tuples
            writable = descs if len(descs) == 1 and descs[0].writable else chain.writable
            room = writable[0].length if len(writable) == 1 else sum(d.length for d in writable)
            if len(packet) > room:
                counters["rx_dropped_too_big"] += 1
                done.append((chain.head, 0))
                continue
            if len(writable) == 1:  # one buffer: the write itself is all-or-nothing
                dma.write(writable[0].addr, packet)
            else:
                pieces: list[tuple[int, int, int]] = []
                pos = 0
                for d in writable:  # translate everything first: a fault touches nothing
                    if pos >= len(packet):
                        break
                    n = min(d.length, len(packet) - pos)
                    dma.check(d.addr, n, write=True)
                    pieces.append((d.addr, pos, n))
                    pos += n
                for addr, off, n in pieces:
                    dma.write(addr, packet[off : off + n])
            done.append((chain.head, len(packet)))
            counters["rx_frames"] += 1
            counters["rx_bytes"] += len(frame)
        return bool(backlog)
