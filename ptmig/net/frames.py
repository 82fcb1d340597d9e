"""Build and parse Ethernet II, ARP, IPv4, UDP and ICMP echo: pure functions over bytes.

Owns the byte layout of every frame the switch, the backends, the load client and the tests
look into. Parsing is strict: anything truncated, inconsistent or unsupported (IPv4 fragments,
bad checksums, ARP for anything but IPv4 over Ethernet) raises `FrameError` saying what was
wrong and with which value. MAC addresses are 6-byte `bytes`, IPv4 addresses 4-byte `bytes`.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from ..errors import PtmigError

ETH_P_IPV4 = 0x0800
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_HEADER_LEN = 14
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6

IPPROTO_ICMP = 1
IPPROTO_UDP = 17
IPV4_HEADER_LEN = 20
UDP_HEADER_LEN = 8

ARP_REQUEST = 1
ARP_REPLY = 2
RARP_REQUEST = 3
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_ICMP_ECHO = struct.Struct("!BBHHH")

_IP_FLAG_DF = 0x4000
_IP_FLAG_MF = 0x2000
_IP_OFFSET_MASK = 0x1FFF


class FrameError(PtmigError, ValueError):
    """A frame or packet that cannot be parsed or built as asked."""


# --------------------------------------------------------------------------- addresses


def mac_str(mac: bytes) -> str:
    """`aa:bb:cc:dd:ee:ff` for a 6-byte MAC."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """Parse `aa:bb:cc:dd:ee:ff` (or `-` separated) into 6 bytes."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6:
        raise FrameError(f"MAC address must have 6 octets, got {text!r}")
    try:
        octets = bytes(int(p, 16) for p in parts)
    except ValueError as exc:
        raise FrameError(f"MAC address has a non-hex octet: {text!r}") from exc
    if any(len(p) not in (1, 2) for p in parts):
        raise FrameError(f"MAC address octets must be 1-2 hex digits: {text!r}")
    return octets


def random_local_mac() -> bytes:
    """A random unicast, locally administered MAC (first octet: bit1 set, bit0 clear)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


def is_multicast_mac(mac: bytes) -> bool:
    """True for broadcast and multicast destinations (the I/G bit)."""
    return bool(mac[0] & 1)


def ip_aton(text: str) -> bytes:
    """Dotted-quad IPv4 address to 4 bytes."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise FrameError(f"not a dotted-quad IPv4 address: {text!r}")
    return bytes(int(p) for p in parts)


def ip_ntoa(addr: bytes) -> str:
    """4 bytes to dotted-quad."""
    if len(addr) != 4:
        raise FrameError(f"IPv4 address must be 4 bytes, got {len(addr)}")
    return socket.inet_ntoa(addr)


def _check_len(what: str, value: bytes, length: int) -> None:
    if len(value) != length:
        raise FrameError(f"{what} must be {length} bytes, got {len(value)}: {value!r}")


# --------------------------------------------------------------------------- checksum


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 checksum: ones' complement of the ones' complement sum of 16-bit words.

    Uses 2**16 == 1 (mod 0xffff): the ones' complement sum of the words is the big integer
    formed by the bytes, reduced mod 0xffff (0 stays 0 only for all-zero data). A buffer that
    includes a correct checksum field sums to 0xffff, so its checksum is 0.
    """
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\x00"
    total = int.from_bytes(raw, "big")
    if total == 0:
        return 0xFFFF
    return 0xFFFF - (total % 0xFFFF or 0xFFFF)


def _pseudo_header(src_ip: bytes, dst_ip: bytes, proto: int, length: int) -> bytes:
    return src_ip + dst_ip + struct.pack("!BBH", 0, proto, length)


# --------------------------------------------------------------------------- Ethernet


@dataclass(frozen=True)
class EthernetFrame:
    """An Ethernet II frame without FCS."""

    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes

    def to_bytes(self) -> bytes:
        _check_len("destination MAC", self.dst, 6)
        _check_len("source MAC", self.src, 6)
        if not 0x0600 <= self.ethertype <= 0xFFFF:
            raise FrameError(f"ethertype must be in 0x0600..0xffff, got {self.ethertype:#x}")
        return _ETH.pack(self.dst, self.src, self.ethertype) + bytes(self.payload)


def parse_ethernet(data: bytes | bytearray | memoryview) -> EthernetFrame:
    """Parse an Ethernet II frame (802.3 length fields and VLAN tags are rejected)."""
    raw = bytes(data)
    if len(raw) < ETH_HEADER_LEN:
        raise FrameError(f"Ethernet frame shorter than its 14-byte header: {len(raw)} bytes")
    dst, src, ethertype = _ETH.unpack_from(raw)
    if ethertype < 0x0600:
        raise FrameError(f"802.3 length field {ethertype:#x} instead of an Ethernet II type")
    if ethertype == 0x8100:
        raise FrameError("VLAN-tagged frames (ethertype 0x8100) are not supported")
    return EthernetFrame(dst, src, ethertype, raw[ETH_HEADER_LEN:])


# --------------------------------------------------------------------------- ARP


@dataclass(frozen=True)
class ArpPacket:
    """ARP for IPv4 over Ethernet (htype 1, ptype 0x0800)."""

    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes

    def to_bytes(self) -> bytes:
        if self.op not in (ARP_REQUEST, ARP_REPLY, RARP_REQUEST, 4):
            raise FrameError(f"ARP op must be 1..4, got {self.op}")
        for what, value, n in (
            ("sha", self.sha, 6),
            ("spa", self.spa, 4),
            ("tha", self.tha, 6),
            ("tpa", self.tpa, 4),
        ):
            _check_len(f"ARP {what}", value, n)
        return _ARP.pack(1, ETH_P_IPV4, 6, 4, self.op, self.sha, self.spa, self.tha, self.tpa)

    @property
    def is_gratuitous(self) -> bool:
        """Sender and target protocol addresses equal: an announcement, not a question."""
        return self.spa == self.tpa


def parse_arp(data: bytes | bytearray | memoryview) -> ArpPacket:
    """Parse an ARP packet (the Ethernet payload); trailing padding is ignored."""
    raw = bytes(data)
    if len(raw) < _ARP.size:
        raise FrameError(f"ARP packet shorter than 28 bytes: {len(raw)}")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(raw)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IPV4, 6, 4):
        raise FrameError(
            f"ARP is not IPv4 over Ethernet: htype={htype} ptype={ptype:#x} hlen={hlen} plen={plen}"
        )
    if op not in (ARP_REQUEST, ARP_REPLY, RARP_REQUEST, 4):
        raise FrameError(f"ARP op must be 1..4, got {op}")
    return ArpPacket(op, sha, spa, tha, tpa)


def arp_request_frame(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    """Broadcast 'who has target_ip? tell src_ip'."""
    arp = ArpPacket(ARP_REQUEST, src_mac, src_ip, ZERO_MAC, target_ip)
    return EthernetFrame(BROADCAST_MAC, src_mac, ETH_P_ARP, arp.to_bytes()).to_bytes()


def arp_reply_frame(src_mac: bytes, src_ip: bytes, dst_mac: bytes, dst_ip: bytes) -> bytes:
    """Unicast 'src_ip is at src_mac' to the asker."""
    arp = ArpPacket(ARP_REPLY, src_mac, src_ip, dst_mac, dst_ip)
    return EthernetFrame(dst_mac, src_mac, ETH_P_ARP, arp.to_bytes()).to_bytes()


def gratuitous_arp_frame(mac: bytes, ip: bytes) -> bytes:
    """Broadcast ARP request announcing ip at mac (spa == tpa), as after a migration."""
    arp = ArpPacket(ARP_REQUEST, mac, ip, ZERO_MAC, ip)
    return EthernetFrame(BROADCAST_MAC, mac, ETH_P_ARP, arp.to_bytes()).to_bytes()


def rarp_announce_frame(mac: bytes) -> bytes:
    """Broadcast RARP 'request reverse' for mac: the IP-less announcement hypervisors send
    after a migration so that switches relearn where mac now sits."""
    arp = ArpPacket(RARP_REQUEST, mac, b"\x00" * 4, mac, b"\x00" * 4)
    return EthernetFrame(BROADCAST_MAC, mac, ETH_P_RARP, arp.to_bytes()).to_bytes()


# --------------------------------------------------------------------------- IPv4


@dataclass(frozen=True)
class Ipv4Packet:
    """An unfragmented IPv4 packet; options are kept but not interpreted."""

    src: bytes
    dst: bytes
    proto: int
    payload: bytes
    ttl: int = 64
    ident: int = 0
    tos: int = 0
    dont_fragment: bool = True
    options: bytes = b""

    def to_bytes(self) -> bytes:
        _check_len("IPv4 source", self.src, 4)
        _check_len("IPv4 destination", self.dst, 4)
        if len(self.options) % 4 or len(self.options) > 40:
            raise FrameError(
                f"IPv4 options must be a multiple of 4, <= 40 bytes: {len(self.options)}"
            )
        for what, value, hi in (
            ("proto", self.proto, 0xFF),
            ("ttl", self.ttl, 0xFF),
            ("tos", self.tos, 0xFF),
            ("ident", self.ident, 0xFFFF),
        ):
            if not 0 <= value <= hi:
                raise FrameError(f"IPv4 {what} out of range 0..{hi}: {value}")
        hlen = IPV4_HEADER_LEN + len(self.options)
        total = hlen + len(self.payload)
        if total > 0xFFFF:
            raise FrameError(f"IPv4 packet too long: {total} bytes")
        flags = _IP_FLAG_DF if self.dont_fragment else 0
        header = bytearray(
            _IPV4.pack(
                0x40 | (hlen // 4),
                self.tos,
                total,
                self.ident,
                flags,
                self.ttl,
                self.proto,
                0,
                self.src,
                self.dst,
            )
        )
        header += self.options
        struct.pack_into("!H", header, 10, internet_checksum(header))
        return bytes(header) + bytes(self.payload)


def parse_ipv4(data: bytes | bytearray | memoryview) -> Ipv4Packet:
    """Parse an IPv4 packet (the Ethernet payload); bytes past total length are padding."""
    raw = bytes(data)
    if len(raw) < IPV4_HEADER_LEN:
        raise FrameError(f"IPv4 packet shorter than 20 bytes: {len(raw)}")
    ver_ihl, tos, total, ident, flags_off, ttl, proto, _csum, src, dst = _IPV4.unpack_from(raw)
    if ver_ihl >> 4 != 4:
        raise FrameError(f"IP version is {ver_ihl >> 4}, not 4")
    hlen = (ver_ihl & 0xF) * 4
    if hlen < IPV4_HEADER_LEN:
        raise FrameError(f"IPv4 header length {hlen} below 20")
    if total < hlen or total > len(raw):
        raise FrameError(
            f"IPv4 total length {total} inconsistent with header {hlen} "
            f"and {len(raw)} bytes received"
        )
    if internet_checksum(raw[:hlen]) != 0:
        raise FrameError(f"IPv4 header checksum {_csum:#06x} is wrong")
    if flags_off & (_IP_FLAG_MF | _IP_OFFSET_MASK):
        raise FrameError(f"IPv4 fragments are not supported (flags/offset {flags_off:#06x})")
    return Ipv4Packet(
        src,
        dst,
        proto,
        raw[hlen:total],
        ttl,
        ident,
        tos,
        bool(flags_off & _IP_FLAG_DF),
        raw[IPV4_HEADER_LEN:hlen],
    )


# --------------------------------------------------------------------------- UDP


@dataclass(frozen=True)
class UdpDatagram:
    src_port: int
    dst_port: int
    payload: bytes

    def to_bytes(self, src_ip: bytes, dst_ip: bytes, *, checksum: bool = True) -> bytes:
        """Encode; the checksum (over the IPv4 pseudo header) is optional, 0 meaning none."""
        for what, port in (("source port", self.src_port), ("destination port", self.dst_port)):
            if not 0 <= port <= 0xFFFF:
                raise FrameError(f"UDP {what} out of range: {port}")
        length = UDP_HEADER_LEN + len(self.payload)
        if length > 0xFFFF - IPV4_HEADER_LEN:
            raise FrameError(f"UDP datagram too long: {length} bytes")
        seg = bytearray(_UDP.pack(self.src_port, self.dst_port, length, 0)) + self.payload
        if checksum:
            csum = internet_checksum(_pseudo_header(src_ip, dst_ip, IPPROTO_UDP, length) + seg)
            struct.pack_into("!H", seg, 6, csum or 0xFFFF)
        return bytes(seg)


def parse_udp(data: bytes | bytearray | memoryview, src_ip: bytes, dst_ip: bytes) -> UdpDatagram:
    """Parse a UDP datagram (the IPv4 payload); a non-zero checksum is verified."""
    raw = bytes(data)
    if len(raw) < UDP_HEADER_LEN:
        raise FrameError(f"UDP datagram shorter than 8 bytes: {len(raw)}")
    sport, dport, length, csum = _UDP.unpack_from(raw)
    if length < UDP_HEADER_LEN or length > len(raw):
        raise FrameError(f"UDP length {length} inconsistent with {len(raw)} bytes received")
    seg = raw[:length]
    if csum and internet_checksum(_pseudo_header(src_ip, dst_ip, IPPROTO_UDP, length) + seg):
        raise FrameError(f"UDP checksum {csum:#06x} is wrong")
    return UdpDatagram(sport, dport, seg[UDP_HEADER_LEN:])


def udp_frame(
    src_mac: bytes,
    dst_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    src_port: int,
    dst_port: int,
    payload: bytes,
    *,
    checksum: bool = True,
    ident: int = 0,
) -> bytes:
    """A whole Ethernet/IPv4/UDP frame."""
    udp = UdpDatagram(src_port, dst_port, payload).to_bytes(src_ip, dst_ip, checksum=checksum)
    ip = Ipv4Packet(src_ip, dst_ip, IPPROTO_UDP, udp, ident=ident).to_bytes()
    return EthernetFrame(dst_mac, src_mac, ETH_P_IPV4, ip).to_bytes()


# --------------------------------------------------------------------------- ICMP echo


@dataclass(frozen=True)
class IcmpEcho:
    """ICMP echo request (type 8) or reply (type 0)."""

    type: int
    ident: int
    seq: int
    payload: bytes = b""

    def to_bytes(self) -> bytes:
        if self.type not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
            raise FrameError(f"ICMP echo type must be 0 or 8, got {self.type}")
        for what, value in (("ident", self.ident), ("seq", self.seq)):
            if not 0 <= value <= 0xFFFF:
                raise FrameError(f"ICMP echo {what} out of range: {value}")
        msg = bytearray(_ICMP_ECHO.pack(self.type, 0, 0, self.ident, self.seq)) + self.payload
        struct.pack_into("!H", msg, 2, internet_checksum(msg))
        return bytes(msg)

    def reply(self) -> IcmpEcho:
        return IcmpEcho(ICMP_ECHO_REPLY, self.ident, self.seq, self.payload)


def parse_icmp_echo(data: bytes | bytearray | memoryview) -> IcmpEcho:
    """Parse an ICMP echo request/reply (the IPv4 payload); other ICMP types are rejected."""
    raw = bytes(data)
    if len(raw) < _ICMP_ECHO.size:
        raise FrameError(f"ICMP echo shorter than 8 bytes: {len(raw)}")
    typ, code, _csum, ident, seq = _ICMP_ECHO.unpack_from(raw)
    if typ not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
        raise FrameError(f"ICMP type {typ} is not an echo request/reply")
    if code != 0:
        raise FrameError(f"ICMP echo code must be 0, got {code}")
    if internet_checksum(raw) != 0:
        raise FrameError(f"ICMP checksum {_csum:#06x} is wrong")
    return IcmpEcho(typ, ident, seq, raw[_ICMP_ECHO.size :])
