"""Frames and kv messages: round trips, known vectors, and rejection of garbage."""

from __future__ import annotations

import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ptmig.net import frames as f
from ptmig.net import kvproto as kv

macs = st.binary(min_size=6, max_size=6)
ips = st.binary(min_size=4, max_size=4)
ports = st.integers(0, 0xFFFF)


def test_checksum_known_vector() -> None:
    # The usual textbook IPv4 header (checksum 0xb861 in place) verifies to 0.
    header = bytes.fromhex("45000073000040004011b861c0a80001c0a800c7")
    assert f.internet_checksum(header) == 0
    zeroed = header[:10] + b"\x00\x00" + header[12:]
    assert f.internet_checksum(zeroed) == 0xB861


@given(st.binary(max_size=300))
def test_checksum_matches_reference(data: bytes) -> None:
    padded = data + b"\x00" * (len(data) & 1)
    total = sum(struct.unpack(f"!{len(padded) // 2}H", padded))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    assert f.internet_checksum(data) == ~total & 0xFFFF


@given(
    macs, macs, st.integers(0x0600, 0xFFFF).filter(lambda t: t != 0x8100), st.binary(max_size=200)
)
def test_ethernet_round_trip(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> None:
    frame = f.EthernetFrame(dst, src, ethertype, payload)
    assert f.parse_ethernet(frame.to_bytes()) == frame


@given(
    macs,
    macs,
    ips,
    ips,
    ports,
    ports,
    st.binary(max_size=1400),
    st.booleans(),
    st.integers(0, 0xFFFF),
)
def test_udp_frame_round_trip(
    smac: bytes,
    dmac: bytes,
    sip: bytes,
    dip: bytes,
    sport: int,
    dport: int,
    payload: bytes,
    csum: bool,
    ident: int,
) -> None:
    raw = f.udp_frame(smac, dmac, sip, dip, sport, dport, payload, checksum=csum, ident=ident)
    eth = f.parse_ethernet(raw + b"\x00" * 10)  # Ethernet padding past the IPv4 length is ok
    assert (eth.src, eth.dst, eth.ethertype) == (smac, dmac, f.ETH_P_IPV4)
    ip = f.parse_ipv4(eth.payload)
    assert (ip.src, ip.dst, ip.proto, ip.ident) == (sip, dip, f.IPPROTO_UDP, ident)
    udp = f.parse_udp(ip.payload, ip.src, ip.dst)
    assert (udp.src_port, udp.dst_port, udp.payload) == (sport, dport, payload)
    assert (struct.unpack_from("!H", ip.payload, 6)[0] != 0) == csum


@given(st.binary(max_size=80), st.integers(0, 28 * 8 - 1))
def test_corrupted_udp_frame_is_rejected(payload: bytes, bit: int) -> None:
    raw = bytearray(
        f.udp_frame(
            b"\x02" * 6, b"\x04" * 6, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 1000, 7000, payload
        )
    )
    raw[14 + bit // 8] ^= 1 << (bit % 8)  # flip one bit of the IPv4 or UDP header
    assume(raw[40:42] != b"\x00\x00")  # a checksum flipped to 0 legitimately means "none"
    with pytest.raises(f.FrameError):
        ip = f.parse_ipv4(f.parse_ethernet(bytes(raw)).payload)
        f.parse_udp(ip.payload, ip.src, ip.dst)
        if len(ip.payload) != 8 + len(payload):
            raise f.FrameError("lengths changed")  # a flipped length bit may still parse


@given(st.binary(max_size=120))
def test_parsers_never_fail_with_anything_but_frame_error(data: bytes) -> None:
    for parse in (
        f.parse_ethernet,
        f.parse_arp,
        f.parse_ipv4,
        f.parse_icmp_echo,
        lambda d: f.parse_udp(d, b"\x00" * 4, b"\x00" * 4),
    ):
        try:
            parse(data)
        except f.FrameError:
            pass


def test_ipv4_rejections() -> None:
    good = f.Ipv4Packet(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 17, b"x" * 8).to_bytes()
    with pytest.raises(f.FrameError, match="version is 6"):
        f.parse_ipv4(b"\x65" + good[1:])
    with pytest.raises(f.FrameError, match="total length"):
        f.parse_ipv4(good[:-1])
    with pytest.raises(f.FrameError, match="checksum"):
        f.parse_ipv4(good[:8] + b"\x3f" + good[9:])
    frag = bytearray(good)
    struct.pack_into("!HH", frag, 6, 0x2000, 0)  # MF set
    struct.pack_into("!H", frag, 10, f.internet_checksum(bytes(frag[:10]) + bytes(frag[12:20])))
    with pytest.raises(f.FrameError, match="fragments"):
        f.parse_ipv4(bytes(frag))
    with pytest.raises(f.FrameError, match="shorter than 20"):
        f.parse_ipv4(good[:19])


def test_ethernet_rejections() -> None:
    with pytest.raises(f.FrameError, match="14-byte header"):
        f.parse_ethernet(b"\x00" * 13)
    with pytest.raises(f.FrameError, match="802.3"):
        f.parse_ethernet(b"\x00" * 12 + b"\x00\x40" + b"\x00" * 64)
    with pytest.raises(f.FrameError, match="VLAN"):
        f.parse_ethernet(b"\x00" * 12 + b"\x81\x00" + b"\x00" * 4)
    with pytest.raises(f.FrameError, match="6 bytes"):
        f.EthernetFrame(b"\x00" * 5, b"\x00" * 6, 0x800, b"").to_bytes()


def test_arp_request_reply_and_gratuitous() -> None:
    mac, ip, peer = f.parse_mac("52:54:00:12:34:56"), f.ip_aton("10.0.0.2"), f.ip_aton("10.0.0.1")
    req = f.parse_ethernet(f.arp_request_frame(mac, ip, peer))
    assert req.dst == f.BROADCAST_MAC and req.ethertype == f.ETH_P_ARP
    arp = f.parse_arp(req.payload)
    assert (arp.op, arp.sha, arp.spa, arp.tpa) == (f.ARP_REQUEST, mac, ip, peer)
    assert not arp.is_gratuitous
    rep = f.parse_arp(f.parse_ethernet(f.arp_reply_frame(mac, ip, b"\x02" * 6, peer)).payload)
    assert (rep.op, rep.tha, rep.tpa) == (f.ARP_REPLY, b"\x02" * 6, peer)
    gra = f.parse_arp(f.parse_ethernet(f.gratuitous_arp_frame(mac, ip)).payload)
    assert gra.is_gratuitous and gra.spa == ip
    rarp = f.parse_ethernet(f.rarp_announce_frame(mac))
    assert rarp.ethertype == f.ETH_P_RARP and rarp.src == mac
    with pytest.raises(f.FrameError, match="not IPv4 over Ethernet"):
        f.parse_arp(b"\x00\x06" + req.payload[2:])
    with pytest.raises(f.FrameError, match="op must be 1..4"):
        f.parse_arp(req.payload[:6] + b"\x00\x09" + req.payload[8:])


@given(
    st.sampled_from([0, 8]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=100)
)
def test_icmp_echo_round_trip(typ: int, ident: int, seq: int, payload: bytes) -> None:
    echo = f.IcmpEcho(typ, ident, seq, payload)
    raw = echo.to_bytes()
    assert f.parse_icmp_echo(raw) == echo
    assert f.parse_icmp_echo(echo.reply().to_bytes()).type == f.ICMP_ECHO_REPLY
    with pytest.raises(f.FrameError):
        f.parse_icmp_echo(raw[:4] + bytes([raw[4] ^ 0x10]) + raw[5:])


def test_addresses() -> None:
    assert f.mac_str(f.parse_mac("52-54-00-AB-cd-0f")) == "52:54:00:ab:cd:0f"
    for bad in ("52:54:00:ab:cd", "52:54:00:ab:cd:zz", "052:54:00:ab:cd:01"):
        with pytest.raises(f.FrameError):
            f.parse_mac(bad)
    for _ in range(50):
        mac = f.random_local_mac()
        assert mac[0] & 0x03 == 0x02 and not f.is_multicast_mac(mac)
    assert f.ip_ntoa(f.ip_aton("10.0.0.200")) == "10.0.0.200"
    for bad in ("10.0.0", "10.0.0.256", "a.b.c.d", "1.2.3.4.5"):
        with pytest.raises(f.FrameError):
            f.ip_aton(bad)


# --------------------------------------------------------------------------- kv protocol

keys = st.binary(max_size=kv.MAX_KEY)
values = st.binary(max_size=kv.MAX_VALUE)


@given(
    st.integers(0, 0xFFFFFFFF),
    st.sampled_from(list(kv.Op)),
    keys,
    values,
    st.sampled_from([0, kv.FLAG_DURABLE]),
)
def test_kv_request_round_trip(rid: int, op: kv.Op, key: bytes, value: bytes, flags: int) -> None:
    req = kv.KvRequest(rid, op, key, value, flags)
    raw = kv.encode_request(req)
    assert raw[:4] == b"KVQ1"
    assert kv.decode_request(raw) == req


@given(st.integers(0, 0xFFFFFFFF), st.sampled_from(list(kv.Status)), values)
def test_kv_reply_round_trip(rid: int, status: kv.Status, value: bytes) -> None:
    reply = kv.KvReply(rid, status, value)
    raw = kv.encode_reply(reply)
    assert raw[:4] == b"KVR1"
    assert kv.decode_reply(raw) == reply


@given(st.binary(max_size=700))
def test_kv_decoders_reject_garbage_cleanly(data: bytes) -> None:
    for decode in (kv.decode_request, kv.decode_reply):
        try:
            decode(data)
        except kv.KvProtocolError:
            pass


def test_kv_layout_and_rejections() -> None:
    raw = kv.encode_request(kv.KvRequest(7, kv.Op.PUT, b"ab", b"xyz", kv.FLAG_DURABLE))
    assert raw == struct.pack("<IIBBHHH", 0x3151564B, 7, 1, 1, 2, 3, 0) + b"abxyz"
    with pytest.raises(kv.KvProtocolError, match="header says"):
        kv.decode_request(raw + b"!")
    with pytest.raises(kv.KvProtocolError, match="unknown op 9"):
        kv.decode_request(raw[:8] + b"\x09" + raw[9:])
    with pytest.raises(kv.KvProtocolError, match="klen 129"):
        kv.decode_request(struct.pack("<IIBBHHH", 0x3151564B, 1, 2, 0, 129, 0, 0) + b"k" * 129)
    with pytest.raises(kv.KvProtocolError, match="magic"):
        kv.decode_request(b"XXXX" + raw[4:])
    with pytest.raises(kv.KvProtocolError, match="max 512"):
        kv.encode_request(kv.KvRequest(1, kv.Op.PUT, b"k", b"v" * 513))
    rep = kv.encode_reply(kv.KvReply(9, kv.Status.NOT_FOUND))
    assert rep == struct.pack("<IIBBH", 0x3152564B, 9, 1, 0, 0)
    with pytest.raises(kv.KvProtocolError, match="unknown reply status 4"):
        kv.decode_reply(rep[:8] + b"\x04" + rep[9:])
