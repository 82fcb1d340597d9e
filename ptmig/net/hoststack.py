"""A minimal host that exchanges UDP payloads with one peer: the load client's data path.

Owns two implementations of one small interface (`Datapath`):
- `EthernetHost`: a host of its own on a `NetBackend` (the UDP switch): its own MAC and IP,
  answers ARP for its IP, resolves the peer's MAC by ARP (retried; re-asked when the peer has
  gone quiet, so a migrated peer is found again), builds Ethernet/IPv4/UDP frames from a
  precomputed header per payload length, and pulls UDP payloads out of received frames on a
  fast path that still checks the IPv4 header checksum and a non-zero UDP checksum.
- `SocketDatapath`: a plain connected UDP socket, when the peer is reachable through the
  host's own network (TAP).
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

from ptmig.net.backend import NetBackend
from ptmig.net.frames import (
    ARP_REPLY,
    ARP_REQUEST,
    ETH_P_ARP,
    ETH_P_IPV4,
    IPPROTO_UDP,
    FrameError,
    arp_reply_frame,
    arp_request_frame,
    internet_checksum,
    parse_arp,
)

RECV_BATCH = 512
ARP_RETRY_S = 0.2
_ETH_IPV4 = struct.pack("!H", ETH_P_IPV4)
_ETH_ARP = struct.pack("!H", ETH_P_ARP)


class Datapath(Protocol):
    """Send and receive UDP payloads to/from one peer, never blocking."""

    def fileno(self) -> int: ...

    def ready(self) -> bool:
        """True once payloads can be sent (the peer's MAC is known)."""
        ...

    def send(self, payload: bytes) -> None: ...

    def recv_batch(self) -> list[bytes]:
        """Every payload from the peer received so far (up to a batch limit)."""
        ...

    def tick(self, now: float, quiet_s: float) -> None:
        """Housekeeping; `quiet_s` is how long the peer has not answered anything."""
        ...

    def close(self) -> None: ...


class SocketDatapath:
    """A connected, non-blocking UDP socket to HOST:PORT."""

    def __init__(self, host: str, port: int) -> None:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        self.sock.connect(addr)
        self.sock.setblocking(False)
        self.dropped = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def ready(self) -> bool:
        return True

    def send(self, payload: bytes) -> None:
        try:
            self.sock.send(payload)
        except OSError:  # full buffer, ICMP unreachable: the retransmit policy copes
            self.dropped += 1

    def recv_batch(self) -> list[bytes]:
        out: list[bytes] = []
        recv = self.sock.recv
        for _ in range(RECV_BATCH):
            try:
                out.append(recv(65536))
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
        return out

    def tick(self, now: float, quiet_s: float) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


class EthernetHost:
    """MAC `mac`, IPv4 `ip`, UDP port `port` on `backend`, talking to peer_ip:peer_port."""

    def __init__(
        self,
        backend: NetBackend,
        mac: bytes,
        ip: bytes,
        port: int,
        peer_ip: bytes,
        peer_port: int,
        *,
        udp_checksum: bool = False,
    ) -> None:
        self.backend = backend
        self.mac, self.ip, self.port = mac, ip, port
        self.peer_ip, self.peer_port = peer_ip, peer_port
        self.udp_checksum = udp_checksum
        self.peer_mac: bytes | None = None
        self.arp_sent = 0
        self.arp_answered = 0
        self.rx_bad = 0
        self._next_arp = 0.0
        self._headers: dict[int, bytes] = {}

    # ------------------------------------------------------------------ send path

    def _header(self, payload_len: int) -> bytes:
        assert self.peer_mac is not None
        udp_len = 8 + payload_len
        total = 20 + udp_len
        ip = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s",
                0x45,
                0,
                total,
                0,
                0x4000,
                64,
                IPPROTO_UDP,
                0,
                self.ip,
                self.peer_ip,
            )
        )
        struct.pack_into("!H", ip, 10, internet_checksum(ip))
        udp = struct.pack("!HHHH", self.port, self.peer_port, udp_len, 0)
        return self.peer_mac + self.mac + _ETH_IPV4 + bytes(ip) + udp

    def ready(self) -> bool:
        return self.peer_mac is not None

    def send(self, payload: bytes) -> None:
        if self.peer_mac is None:
            return
        if self.udp_checksum:
            self.backend.send(self._checksummed(payload))
            return
        header = self._headers.get(len(payload))
        if header is None:
            header = self._headers[len(payload)] = self._header(len(payload))
        self.backend.send(header + payload)

    def _checksummed(self, payload: bytes) -> bytes:
        header = bytearray(self._header(len(payload)))
        pseudo = self.ip + self.peer_ip + struct.pack("!BBH", 0, IPPROTO_UDP, 8 + len(payload))
        csum = internet_checksum(pseudo + bytes(header[34:42]) + payload) or 0xFFFF
        struct.pack_into("!H", header, 40, csum)
        return bytes(header) + payload

    def send_arp_request(self) -> None:
        self.backend.send(arp_request_frame(self.mac, self.ip, self.peer_ip))
        self.arp_sent += 1

    # ------------------------------------------------------------------ receive path

    def recv_batch(self) -> list[bytes]:
        out: list[bytes] = []
        recv = self.backend.recv
        my_ip, my_port = self.ip, self.port
        for _ in range(RECV_BATCH):
            frame = recv()
            if frame is None:
                break
            ethertype = frame[12:14]
            if ethertype == _ETH_IPV4:
                if frame[23] != IPPROTO_UDP or frame[30:34] != my_ip:
                    continue
                payload = self._udp_payload(frame, my_port)
                if payload is not None:
                    out.append(payload)
            elif ethertype == _ETH_ARP:
                self._arp(frame)
        return out

    def _udp_payload(self, frame: bytes, my_port: int) -> bytes | None:
        ihl = (frame[14] & 0x0F) * 4
        total = int.from_bytes(frame[16:18], "big")
        end = 14 + total
        if (
            frame[14] >> 4 != 4
            or ihl < 20
            or total < ihl + 8
            or end > len(frame)
            or frame[20:22] not in (b"\x40\x00", b"\x00\x00")
            or internet_checksum(frame[14 : 14 + ihl]) != 0
        ):
            self.rx_bad += 1
            return None
        u = 14 + ihl
        if int.from_bytes(frame[u + 2 : u + 4], "big") != my_port:
            return None
        udp_len = int.from_bytes(frame[u + 4 : u + 6], "big")
        if udp_len < 8 or u + udp_len > end:
            self.rx_bad += 1
            return None
        if frame[u + 6 : u + 8] != b"\x00\x00":
            pseudo = frame[26:34] + struct.pack("!BBH", 0, IPPROTO_UDP, udp_len)
            if internet_checksum(pseudo + frame[u : u + udp_len]) != 0:
                self.rx_bad += 1
                return None
        return frame[u + 8 : u + udp_len]

    def _arp(self, frame: bytes) -> None:
        try:
            arp = parse_arp(frame[14:])
        except FrameError:
            self.rx_bad += 1
            return
        if arp.spa == self.peer_ip and not arp.sha[0] & 1 and arp.op in (ARP_REQUEST, ARP_REPLY):
            if arp.sha != self.peer_mac:
                self._headers.clear()
            self.peer_mac = arp.sha
        if arp.op == ARP_REQUEST and arp.tpa == self.ip and arp.spa != self.ip:
            self.backend.send(arp_reply_frame(self.mac, self.ip, arp.sha, arp.spa))
            self.arp_answered += 1

    # ------------------------------------------------------------------ housekeeping

    def tick(self, now: float, quiet_s: float) -> None:
        self.backend.maintain(now)
        # Unresolved: ask every 200 ms. Peer quiet for a second (it may have moved behind
        # another switch port): ask once a second; its answer re-teaches the switch.
        interval = ARP_RETRY_S if self.peer_mac is None else 1.0
        if (self.peer_mac is None or quiet_s >= 1.0) and now >= self._next_arp:
            self.send_arp_request()
            self._next_arp = now + interval

    def fileno(self) -> int:
        return self.backend.fileno()

    def close(self) -> None:
        self.backend.close()
