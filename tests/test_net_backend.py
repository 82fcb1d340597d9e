"""Backends: spec parsing, the UDP backend through a real switch, and TAP (root only)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptmig.net.backend import (
    BackendSpec,
    NetBackendError,
    UdpNetBackend,
    coerce_spec,
    open_backend,
    parse_backend_spec,
)
from ptmig.net.frames import BROADCAST_MAC, ETH_P_IPV4, EthernetFrame
from ptmig.net.switch import UdpSwitch

MAC_1, MAC_2 = bytes([2, 0, 0, 0, 1, 1]), bytes([2, 0, 0, 0, 2, 2])


def test_parse_backend_specs() -> None:
    assert parse_backend_spec("udp:127.0.0.1:5555") == BackendSpec("udp", "127.0.0.1", 5555)
    assert parse_backend_spec("udp:[::1]:7") == BackendSpec("udp", "::1", 7)
    assert str(parse_backend_spec("udp:[::1]:7")) == "udp:[::1]:7"
    assert parse_backend_spec("tap:tap0") == BackendSpec("tap", ifname="tap0")
    for bad, why in (
        ("udp:host", "HOST:PORT"),
        ("udp:h:0", "1..65535"),
        ("udp:h:x", "number"),
        ("tap:", "1..15"),
        ("tap:a/b", "forbidden"),
        ("tap:" + "x" * 16, "1..15"),
        ("eth:x", "udp:HOST:PORT or tap:IFNAME"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_backend_spec(bad)


def test_coerce_accepts_config_style_objects() -> None:
    class Udp:
        host, port = "localhost", 9

    class Tap:
        ifname = "tap7"

    assert coerce_spec(Udp()) == BackendSpec("udp", "localhost", 9)
    assert coerce_spec(Tap()) == BackendSpec("tap", ifname="tap7")
    with pytest.raises(ValueError, match="not a network backend"):
        coerce_spec(42)


@pytest.fixture
def switch() -> Iterator[UdpSwitch]:
    sw = UdpSwitch("127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=sw.serve, args=(stop,), daemon=True)
    thread.start()
    yield sw
    stop.set()
    thread.join(5)
    sw.close()


def recv_wait(backend: UdpNetBackend, timeout: float = 2.0) -> bytes | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = backend.recv()
        if frame is not None:
            return frame
        time.sleep(0.005)
    return None


def test_udp_backends_talk_through_the_switch(switch: UdpSwitch) -> None:
    host, port = switch.address
    with (
        open_backend(f"udp:{host}:{port}", mac=MAC_1) as b1,
        open_backend(f"udp:{host}:{port}", mac=MAC_2) as b2,
    ):
        assert isinstance(b1, UdpNetBackend) and isinstance(b2, UdpNetBackend)
        deadline = time.monotonic() + 2
        while len(switch.fdb.endpoints) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        frame = EthernetFrame(MAC_2, MAC_1, ETH_P_IPV4, b"x" * 100).to_bytes()
        b1.send(frame)  # MAC_2 is known from b2's hello: unicast
        assert recv_wait(b2) == frame
        assert b1.counters.tx_frames == 1 and b2.counters.rx_frames == 1
        assert b2.counters.hello_acks == 1 and b1.counters.hellos_sent == 1
        assert b1.recv() is None  # non-blocking, and the hello ack was not a frame


def test_udp_backend_never_sends_a_datagram_that_looks_like_control(switch: UdpSwitch) -> None:
    host, port = switch.address
    with open_backend(f"udp:{host}:{port}", mac=MAC_1) as b:
        b.send(b"PTSW\x03\x01")  # would be a PROBE if it went out
        b.send(b"x" * 70000)  # larger than a UDP datagram
        assert b.counters.tx_dropped == 2 and b.counters.tx_frames == 0


def test_udp_backend_without_a_switch_drops_and_counts() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = open_backend(f"udp:127.0.0.1:{port}", mac=MAC_1)  # nobody listens there
    frame = EthernetFrame(BROADCAST_MAC, MAC_1, ETH_P_IPV4, b"y" * 50).to_bytes()
    start = time.monotonic()
    for _ in range(20):
        b.send(frame)
        assert b.recv() is None
    assert time.monotonic() - start < 1.0
    c = b.counters
    assert c.tx_frames + c.tx_dropped == 20 and c.tx_dropped > 0 and c.peer_unreachable > 0
    b.close()


def test_hello_is_periodic_and_announce_moves_the_mac(switch: UdpSwitch) -> None:
    host, port = switch.address
    spec = parse_backend_spec(f"udp:{host}:{port}")
    src = UdpNetBackend(spec, MAC_1, hello_interval=0.05)
    peer = UdpNetBackend(spec, MAC_2)
    dst = UdpNetBackend(spec, MAC_1)  # the migration destination, same MAC
    time.sleep(0.1)
    src.maintain()
    assert src.counters.hellos_sent == 2
    to_vm = EthernetFrame(MAC_1, MAC_2, ETH_P_IPV4, b"z" * 20).to_bytes()
    peer.send(to_vm)
    assert recv_wait(src) == to_vm and recv_wait(dst, 0.2) is None
    dst.announce()  # switchover: the destination takes the MAC over
    assert recv_wait(peer) is not None  # the RARP announcement is broadcast
    assert recv_wait(src) is not None  # ... to the source too
    peer.send(to_vm)
    assert recv_wait(dst) == to_vm and recv_wait(src, 0.2) is None
    for b in (src, peer, dst):
        b.close()


def test_open_backend_rejects_bad_specs() -> None:
    with pytest.raises(ValueError):
        open_backend("udp:nowhere")
    with pytest.raises(NetBackendError, match="cannot resolve"):
        open_backend("udp:no-such-host.invalid:5000")


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="TAP needs root (CAP_NET_ADMIN)")


@pytest.mark.root
@root_only
def test_tap_backend_exchanges_whole_frames_with_the_interface() -> None:
    if not Path("/dev/net/tun").exists():
        pytest.skip("no /dev/net/tun on this machine")
    name = f"ptt{os.getpid() % 100000}"
    tap = open_backend(f"tap:{name}", mac=MAC_1)
    try:
        flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
        assert flags & 0x1, "interface is not up"
        with pytest.raises(NetBackendError, match="already attached"):
            open_backend(f"tap:{name}")
        # The host side of the link: a packet socket on the interface.
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as wire:
            wire.bind((name, 0))
            wire.settimeout(2)
            out = EthernetFrame(BROADCAST_MAC, MAC_1, 0x88B5, b"from the vm" * 9).to_bytes()
            tap.send(out)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                seen = wire.recv(65536)
                if seen[12:14] == b"\x88\xb5":
                    break
            assert seen == out
            inbound = EthernetFrame(MAC_1, MAC_2, 0x88B5, b"to the vm" * 7).to_bytes()
            wire.send(inbound)
            got = None
            while time.monotonic() < deadline and got is None:
                frame = tap.recv()
                if frame is None:
                    time.sleep(0.005)
                elif frame[12:14] == b"\x88\xb5":
                    got = frame
            assert got == inbound
        assert tap.counters.tx_frames == 1 and tap.counters.rx_frames >= 1
    finally:
        tap.close()
    assert not Path(f"/sys/class/net/{name}").exists()  # not persistent: gone with the fd
