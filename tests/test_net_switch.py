"""The learning switch with real UDP sockets on loopback: learning, flooding, moving a MAC,
aging, hellos, probes, and starting one (race-safe) in its own process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from ptmig.net import switchproto
from ptmig.net.frames import BROADCAST_MAC, ETH_P_IPV4, EthernetFrame
from ptmig.net.switch import (
    EXIT_ADDRESS_IN_USE,
    UdpSwitch,
    ensure_switch,
    probe_switch,
    query_stats,
    switch_main,
)
from ptmig.net.switchproto import Msg

MAC_A, MAC_B, MAC_C = (bytes([2, 0, 0, 0, 0, n]) for n in (0xA, 0xB, 0xC))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Port:
    """A switch port: a UDP socket that says hello and sends/receives frames."""

    def __init__(self, sw: UdpSwitch, mac: bytes | None = None) -> None:
        self.sw = sw
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.sock.sendto(switchproto.hello(mac), sw.address)
        sw.poll(1.0)
        assert self.sock.recv(100) == switchproto.encode(Msg.HELLO_ACK)

    def send(self, dst: bytes, src: bytes, body: bytes = b"payload") -> bytes:
        frame = EthernetFrame(dst, src, ETH_P_IPV4, body).to_bytes()
        self.sock.sendto(frame, self.sw.address)
        self.sw.poll(1.0)
        return frame

    def received(self) -> list[bytes]:
        out = []
        self.sock.settimeout(0.05)
        while True:
            try:
                out.append(self.sock.recv(65536))
            except TimeoutError:
                return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sw(clock: Clock) -> Iterator[UdpSwitch]:
    s = UdpSwitch("127.0.0.1", 0, age_s=300.0, clock=clock)
    yield s
    s.close()


def test_flood_then_learn_then_unicast(sw: UdpSwitch) -> None:
    a, b, c = Port(sw), Port(sw), Port(sw)
    frame = a.send(BROADCAST_MAC, MAC_A)
    assert b.received() == [frame] and c.received() == [frame] and a.received() == []
    reply = b.send(MAC_A, MAC_B)  # A was learned from its broadcast
    assert a.received() == [reply] and c.received() == []
    unknown = c.send(bytes([2, 9, 9, 9, 9, 9]), MAC_C)  # unknown unicast floods
    assert a.received() == [unknown] and b.received() == [unknown]
    multicast = a.send(bytes([0x01, 0, 0x5E, 0, 0, 1]), MAC_A)
    assert b.received() == [multicast] and c.received() == [multicast]
    assert sw.fdb.counters.learned == 3


def test_frame_to_a_mac_behind_the_sender_is_not_hairpinned(sw: UdpSwitch) -> None:
    a, b = Port(sw), Port(sw)
    a.send(BROADCAST_MAC, MAC_A)
    b.received()
    a.send(MAC_A, bytes([2, 0, 0, 0, 1, 0xA]))
    assert a.received() == [] and b.received() == []
    assert sw.fdb.counters.hairpin_dropped == 1


def test_mac_moves_to_the_endpoint_it_shows_up_behind(sw: UdpSwitch) -> None:
    a, b, a_new = Port(sw), Port(sw), Port(sw)
    a.send(BROADCAST_MAC, MAC_A)
    b.received(), a_new.received()
    b.send(MAC_A, MAC_B)
    assert len(a.received()) == 1
    announce = a_new.send(BROADCAST_MAC, MAC_A)  # the migrated VM's announcement
    assert b.received() == [announce]
    after = b.send(MAC_A, MAC_B)
    assert a_new.received() == [after] and a.received() == [announce]
    assert sw.fdb.counters.moved == 1


def test_hellos_register_silent_endpoints_and_are_never_forwarded(sw: UdpSwitch) -> None:
    a = Port(sw)
    silent = Port(sw, mac=MAC_C)  # says hello, never sends a frame
    assert a.received() == []  # its hello was not forwarded
    frame = a.send(BROADCAST_MAC, MAC_A)
    assert silent.received() == [frame]
    to_c = a.send(MAC_C, MAC_A)  # a hello teaches an unknown MAC
    assert silent.received() == [to_c]


def test_a_hello_does_not_move_a_known_mac(sw: UdpSwitch) -> None:
    a, b = Port(sw), Port(sw)
    a.send(BROADCAST_MAC, MAC_A)
    b.received()
    dest = Port(sw, mac=MAC_A)  # a migration destination saying hello before switchover
    to_a = b.send(MAC_A, MAC_B)
    assert a.received() == [to_a] and dest.received() == []


def test_entries_age_out(sw: UdpSwitch, clock: Clock) -> None:
    a, b, c = Port(sw), Port(sw), Port(sw)
    a.send(BROADCAST_MAC, MAC_A)
    b.received(), c.received()
    clock.now += 200
    b.send(BROADCAST_MAC, MAC_B)  # b and c stay fresh, a goes quiet
    c.sock.sendto(switchproto.hello(None), sw.address)
    sw.poll(1.0)
    a.received(), c.received()
    clock.now += 150  # a last heard 350 s ago, b and c 150 s ago
    sw.fdb.expire(clock.now)
    assert MAC_A not in sw.fdb.macs and MAC_B in sw.fdb.macs
    to_a = b.send(MAC_A, MAC_B)  # unknown again: flooded to the live endpoints only
    assert c.received() == [to_a] and a.received() == []
    assert sw.fdb.counters.aged_macs == 1 and sw.fdb.counters.aged_endpoints == 1


def test_lookup_ages_lazily_between_sweeps(sw: UdpSwitch, clock: Clock) -> None:
    a, b, c = Port(sw), Port(sw), Port(sw)
    a.send(BROADCAST_MAC, MAC_A)
    b.received(), c.received()
    clock.now += 301
    for port in (a, b, c):
        port.sock.sendto(switchproto.hello(None), sw.address)
        sw.poll(1.0)
        port.received()
    to_a = b.send(MAC_A, MAC_B)
    assert a.received() == [to_a] and c.received() == [to_a]  # flooded, not unicast


def test_garbage_and_probes(sw: UdpSwitch) -> None:
    a, b = Port(sw), Port(sw)
    a.sock.sendto(b"tiny", sw.address)
    a.sock.sendto(b"PTSW\x09\x01", sw.address)  # unknown control type
    sw.poll(1.0)
    assert b.received() == [] and a.received() == []
    assert sw.malformed == 2
    a.sock.sendto(switchproto.encode(Msg.PROBE), sw.address)
    sw.poll(1.0)
    reply = switchproto.decode(a.sock.recv(100))
    assert reply.type == Msg.PROBE_REPLY and switchproto.probe_reply_pid(reply) == os.getpid()


def test_probe_and_stats_over_the_network(clock: Clock) -> None:
    sw = UdpSwitch("127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=sw.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        host, port = sw.address
        assert probe_switch(host, port) == os.getpid()
        stats = query_stats(host, port)
        assert stats["endpoints"] == 0 and stats["frames_in"] == 0
    finally:
        stop.set()
        thread.join(5)
        sw.close()
    assert probe_switch(host, port, timeout=0.05, tries=1) is None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_switch_main_refuses_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert switch_main(f"127.0.0.1:{port}") == EXIT_ADDRESS_IN_USE
    assert "already in use" in capsys.readouterr().err
    assert switch_main("127.0.0.1") == 2


def test_ensure_switch_is_race_safe() -> None:
    port = _free_udp_port()
    results: list[subprocess.Popen[bytes] | None] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_switch("127.0.0.1", port)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    started = [p for p in results if p is not None]
    try:
        assert len(results) == 2 and len(started) == 1
        assert probe_switch("127.0.0.1", port) == started[0].pid
        assert ensure_switch("127.0.0.1", port) is None  # already there
    finally:
        for p in started:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
