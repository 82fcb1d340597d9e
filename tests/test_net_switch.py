"""The learning switch with real UDP sockets on loopback: learning, flooding, moving a MAC,
aging, hellos, probes, and starting one (race-safe) in its own process. The switch tests run
on both paths: pure Python (the reference) and the native fast path for known unicast."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ptmig import nativelib
from ptmig.net import switchnative, switchproto
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


@pytest.fixture(params=[False, True], ids=["python", "native"])
def native(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def sw(clock: Clock, native: bool) -> Iterator[UdpSwitch]:
    s = UdpSwitch("127.0.0.1", 0, age_s=300.0, clock=clock, native=native)
    assert (s.fast is not None) == native
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
    threads = [
        threading.Thread(target=lambda: results.append(ensure_switch("127.0.0.1", port)))
        for _ in range(2)
    ]
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


def test_a_started_switch_ends_itself_once_nothing_is_heard() -> None:
    """`switch = "auto"` starts a detached switch: it must stay while any backend says hello
    and go away on its own once all of them are gone, not idle forever."""
    port = _free_udp_port()
    proc = ensure_switch("127.0.0.1", port, idle_exit_s=1.0)
    assert proc is not None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as backend:
            for _ in range(10):  # a live backend: hellos every 0.3 s for 3 s
                backend.sendto(
                    switchproto.hello(bytes.fromhex("525400000001")), ("127.0.0.1", port)
                )
                time.sleep(0.3)
                assert proc.poll() is None
        assert proc.wait(15) == 0  # silence: it ends itself
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)


# ---- the native fast path ------------------------------------------------------------------


def _fast(sw: UdpSwitch) -> int:
    return sw.counters()["fast_forwarded"]


@contextmanager
def serving(sw: UdpSwitch) -> Iterator[None]:
    """Run the switch's own loop (aging, syncs) on a thread, as the switch process does."""
    stop = threading.Event()
    thread = threading.Thread(target=sw.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def test_fast_path_forwards_known_unicast_and_counts_it(sw: UdpSwitch, native: bool) -> None:
    a, b = Port(sw), Port(sw)
    a.send(BROADCAST_MAC, MAC_A)
    b.send(BROADCAST_MAC, MAC_B)
    a.received(), b.received()
    sent = [a.send(MAC_B, MAC_A, b"%d" % i) for i in range(50)]
    assert b.received() == sent and a.received() == []
    stats = sw.counters()
    assert stats["fast_forwarded"] == (50 if native else 0)
    assert stats["frames_in"] == 52 and stats["frames_out"] == 52 and stats["unicast"] == 50
    if native:  # the slow path saw the two hellos and the two broadcasts only
        assert stats["handed_to_python"] == 4


def test_a_moved_mac_goes_through_python_and_later_frames_follow_it(
    sw: UdpSwitch, native: bool
) -> None:
    a, b, a_new = Port(sw), Port(sw), Port(sw)
    a.send(BROADCAST_MAC, MAC_A)
    b.send(BROADCAST_MAC, MAC_B)
    for port in (a, b, a_new):
        port.received()
    before = b.send(MAC_A, MAC_B)
    assert a.received() == [before]
    fast = _fast(sw)
    moved = a_new.send(MAC_B, MAC_A)  # known unicast, but its source moved: Python's business
    assert b.received() == [moved] and _fast(sw) == fast
    assert sw.fdb.counters.moved == 1
    after = [b.send(MAC_A, MAC_B, b"%d" % i) for i in range(3)]
    assert a_new.received() == after and a.received() == []
    assert _fast(sw) == fast + (3 if native else 0)


def test_frames_in_arrival_order_across_both_paths(sw: UdpSwitch) -> None:
    """A broadcast (slow) between unicasts (fast) reaches the receiver in the order sent."""
    a, b = Port(sw), Port(sw)
    a.send(BROADCAST_MAC, MAC_A)
    b.send(BROADCAST_MAC, MAC_B)
    a.received(), b.received()
    b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sent = []
    for i in range(300):
        dst = BROADCAST_MAC if i % 7 == 0 else MAC_B
        frame = EthernetFrame(dst, MAC_A, ETH_P_IPV4, b"%d" % i).to_bytes()
        a.sock.sendto(frame, sw.address)
        sent.append(frame)
    sw.poll(2.0)
    got = b.received()
    assert got == sent


def _scenario(native: bool) -> list[list[bytes]]:
    """Every kind of frame through a switch; what each of four ports received, in order."""
    clock = Clock()
    sw = UdpSwitch("127.0.0.1", 0, clock=clock, native=native)
    try:
        ports = [Port(sw), Port(sw), Port(sw), Port(sw, mac=bytes([2, 0, 0, 0, 0, 0xD]))]
        a, b, c, d = ports
        mac_d = bytes([2, 0, 0, 0, 0, 0xD])
        script = [
            (a, BROADCAST_MAC, MAC_A),
            (b, MAC_A, MAC_B),
            (c, MAC_A, MAC_C),
            (a, MAC_B, MAC_A),
            (a, MAC_C, MAC_A),
            (a, mac_d, MAC_A),
            (d, MAC_A, mac_d),
            (b, bytes([2, 9, 9, 9, 9, 9]), MAC_B),
            (b, bytes([1, 0, 0x5E, 0, 0, 1]), MAC_B),
            (a, MAC_A, bytes([2, 0, 0, 0, 1, 1])),
            (c, MAC_B, MAC_A),  # MAC_A moves to c
            (b, MAC_A, MAC_B),
            (a, MAC_A, MAC_B),
            (b, MAC_A, MAC_B),  # ...and MAC_B to a
            (d, MAC_B, bytes([1, 2, 3, 4, 5, 6])),  # a multicast source is never learned
        ]
        for i in range(3):
            for port, dst, src in script:
                port.send(dst, src, b"round %d" % i)
        return [port.received() for port in ports]
    finally:
        sw.close()


def test_both_paths_deliver_the_same_frames_to_every_port() -> None:
    python, native = _scenario(native=False), _scenario(native=True)
    assert python == native
    assert sum(map(len, python)) > 40


def test_a_fast_path_mac_is_aged_out_when_it_goes_quiet() -> None:
    """Real clock, short age: MACs that talk only through the fast path stay; a MAC that stops
    sending is aged out of the table and the cache, and frames to it are flooded again."""
    sw = UdpSwitch("127.0.0.1", 0, age_s=0.6, native=True)
    try:
        a, b, c = Port(sw), Port(sw), Port(sw)
        a.send(BROADCAST_MAC, MAC_A)
        b.send(BROADCAST_MAC, MAC_B)
        with serving(sw):
            deadline = time.monotonic() + 1.5  # 2.5 ages of traffic, mostly on the fast path
            sent = 0
            while time.monotonic() < deadline:
                c.sock.sendto(switchproto.hello(None), sw.address)  # c stays alive, silent
                time.sleep(0.01)
                for sender, dst, src in ((a, MAC_B, MAC_A), (b, MAC_A, MAC_B)):
                    sender.sock.sendto(
                        EthernetFrame(dst, src, ETH_P_IPV4, b"x").to_bytes(), sw.address
                    )
                    sent += 1
                time.sleep(0.04)
            assert MAC_A in sw.fdb.macs and MAC_B in sw.fdb.macs
            assert sw.fdb.counters.aged_macs == 0 and _fast(sw) > sent // 2
            assert sw.fdb.counters.learned == 2 and sw.fdb.counters.flooded == 2
            for port in (a, b, c):
                port.received()
            quiet_since = time.monotonic()
            while MAC_A in sw.fdb.macs and time.monotonic() - quiet_since < 5:
                b.sock.sendto(
                    EthernetFrame(BROADCAST_MAC, MAC_B, ETH_P_IPV4, b"b").to_bytes(), sw.address
                )
                c.sock.sendto(switchproto.hello(None), sw.address)
                time.sleep(0.05)
            assert MAC_A not in sw.fdb.macs and MAC_A not in sw.fast.cached  # type: ignore[union-attr]
            assert time.monotonic() - quiet_since > 0.6
            c.received()
            fast = _fast(sw)
            to_a = EthernetFrame(MAC_A, MAC_B, ETH_P_IPV4, b"anyone?").to_bytes()
            b.sock.sendto(to_a, sw.address)
            time.sleep(0.2)
            assert to_a in c.received() and _fast(sw) == fast  # unknown again: flooded
    finally:
        sw.close()


def test_the_fast_path_forwards_only_while_python_keeps_it_valid(clock: Clock) -> None:
    """When the Python side stops renewing (stalled), every frame goes through Python."""
    sw = UdpSwitch("127.0.0.1", 0, age_s=0.4, clock=clock, native=True)
    try:
        a, b = Port(sw), Port(sw)
        a.send(BROADCAST_MAC, MAC_A)
        b.send(BROADCAST_MAC, MAC_B)
        a.received()
        fast = _fast(sw)
        a.send(MAC_B, MAC_A)
        assert _fast(sw) == fast + 1
        time.sleep(0.3)  # past the horizon (2 syncs of 0.1 s): only Python may decide now
        frame = EthernetFrame(MAC_B, MAC_A, ETH_P_IPV4, b"late").to_bytes()
        a.sock.sendto(frame, sw.address)
        time.sleep(0.1)
        assert _fast(sw) == fast + 1 and frame not in b.received()  # waits for Python
        sw.poll(1.0)
        assert b.received() == [frame] and _fast(sw) == fast + 1
        assert sw.counters()["unicast"] == 2
    finally:
        sw.close()


def test_a_burst_of_thousands_loses_no_frame(native: bool) -> None:
    """20,000 frames in back-to-back bursts of 250, with at most 500 in flight: the switch's
    own queues lose none of them. The cap on frames in flight keeps the test about the switch:
    without it a slow host (or a sanitizer build) overflows the kernel's socket buffers, whose
    size a container may cap at 208 KiB, and the kernel's drops are not the switch's."""
    sw = UdpSwitch("127.0.0.1", 0, native=native)
    count = 20000
    try:
        a, b = Port(sw), Port(sw)
        a.send(BROADCAST_MAC, MAC_A)
        b.send(BROADCAST_MAC, MAC_B)
        a.received(), b.received()
        b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        frames = [
            EthernetFrame(MAC_B, MAC_A, ETH_P_IPV4, i.to_bytes(4, "big") * 16).to_bytes()
            for i in range(count)
        ]
        got: list[bytes] = []
        receiver = threading.Thread(target=_drain, args=(b.sock, count, got))
        receiver.start()
        with serving(sw):
            for i in range(0, count, 250):
                deadline = time.monotonic() + 10
                while len(got) < i - 250 and receiver.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.001)
                for frame in frames[i : i + 250]:
                    a.sock.sendto(frame, sw.address)
            receiver.join(30)
        assert len(got) == count and got == frames
        stats = sw.counters()
        assert stats["frames_out"] == count + 2 and stats["send_errors"] == 0
        if native:
            assert stats["fast_forwarded"] == count
    finally:
        sw.close()


def _drain(sock: socket.socket, count: int, out: list[bytes] | None = None) -> list[bytes]:
    """Receive up to `count` datagrams (into `out`, as they come); stop after 5 s of silence."""
    out = [] if out is None else out
    sock.settimeout(5)
    while len(out) < count:
        try:
            out.append(sock.recv(65536))
        except TimeoutError:
            break
    return out


def test_python_draining_late_stalls_the_loop_without_losing_frames() -> None:
    """Slow-path datagrams beyond the native queue's size wait in the socket, not dropped."""
    sw = UdpSwitch("127.0.0.1", 0, native=True)
    try:
        a, b = Port(sw), Port(sw)
        b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        body = bytes(60000)
        frames = [
            EthernetFrame(
                BROADCAST_MAC, MAC_A, ETH_P_IPV4, body[:-4] + i.to_bytes(4, "big")
            ).to_bytes()
            for i in range(100)
        ]  # 6 MB: more than the 4 MB queue
        got: list[bytes] = []
        receiver = threading.Thread(target=lambda: got.extend(_drain(b.sock, len(frames))))
        receiver.start()
        for i, frame in enumerate(frames):
            a.sock.sendto(frame, sw.address)
            if i % 20 == 19:
                time.sleep(0.02)  # the loop queues them; nobody on the Python side drains
        with serving(sw):
            receiver.join(30)
        assert got == frames
        stats = sw.counters()
        assert stats["fast_stalls"] >= 1 and stats["frames_out"] == len(frames)
    finally:
        sw.close()


def test_malformed_and_short_datagrams_never_break_the_switch(sw: UdpSwitch) -> None:
    a, b = Port(sw), Port(sw)
    a.send(BROADCAST_MAC, MAC_A)
    b.send(BROADCAST_MAC, MAC_B)
    a.received(), b.received()
    junk = [
        b"",
        b"\x00",
        b"PTSW",
        b"PTSW\x01",
        b"PTSW\x01\x09",
        b"PTSW\x05\x01" + b"x" * 7,
        bytes(13),
        bytes(14),
        b"\xff" * 14,
        MAC_B + MAC_A,
        MAC_C + MAC_C + b"\x08\x00",
        bytes(range(256)) * 6,
        bytes(65507),
    ]
    for datagram in junk:
        a.sock.sendto(datagram, sw.address)
    sw.poll(1.0)
    b.received()
    a.received()
    assert sw.malformed == 8  # every datagram under 14 bytes: none is a valid control message
    frame = a.send(MAC_B, MAC_A)
    assert b.received() == [frame]


def test_ipv6_endpoints_take_the_fast_path() -> None:
    sw = UdpSwitch("::1", 0, native=True)
    try:
        ports = []
        for _ in range(2):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.bind(("::1", 0))
            sock.settimeout(1.0)
            ports.append(sock)
        a, b = ports
        for sock, mac in ((a, MAC_A), (b, MAC_B)):
            sock.sendto(EthernetFrame(BROADCAST_MAC, mac, ETH_P_IPV4, b"hi").to_bytes(), sw.address)
            sw.poll(1.0)
        a.recv(100)
        frame = EthernetFrame(MAC_B, MAC_A, ETH_P_IPV4, b"six").to_bytes()
        a.sendto(frame, sw.address)
        sw.poll(1.0)
        assert b.recv(100) == frame and _fast(sw) == 1
        for sock in ports:
            sock.close()
    finally:
        sw.close()


def test_without_a_compiler_the_switch_forwards_in_python(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(nativelib, "_loaded", {})
    monkeypatch.setattr(nativelib, "NATIVE_DIR", tmp_path)  # no source: the build fails
    monkeypatch.setattr("ptmig.net.switch._fallback_logged", False)
    with pytest.raises(switchnative.FastPathUnavailable):
        UdpSwitch("127.0.0.1", 0, native=True)
    with caplog.at_level(logging.INFO, logger="ptmig.net.switch"):
        switches = [UdpSwitch("127.0.0.1", 0) for _ in range(2)]
    try:
        assert [s.fast for s in switches] == [None, None]
        assert len([r for r in caplog.records if "Python" in r.getMessage()]) == 1
        sw = switches[0]
        a, b = Port(sw), Port(sw)
        a.send(BROADCAST_MAC, MAC_A)
        frame = b.send(MAC_A, MAC_B)
        assert a.received() == [frame]
    finally:
        for s in switches:
            s.close()


def test_the_database_reports_each_mac_learned_or_moved_once() -> None:
    """The switch logs these events: a learn, a move, nothing for a repeat or a hello."""
    from ptmig.net.fdb import ForwardingDatabase

    seen: list[tuple[bytes, object, object]] = []
    fdb = ForwardingDatabase(10.0, on_change=lambda mac, old, new: seen.append((mac, old, new)))
    fdb.learn(MAC_A, "p1", 0.0)
    fdb.learn(MAC_A, "p1", 1.0)  # a repeat
    fdb.learn(MAC_A, "p2", 2.0, move=False)  # a hello elsewhere never moves a MAC
    fdb.learn(MAC_A, "p2", 3.0)  # a frame from elsewhere does
    fdb.learn(MAC_A, "p1", 20.0)  # after aging: learned anew, not moved
    assert seen == [(MAC_A, None, "p1"), (MAC_A, "p1", "p2"), (MAC_A, None, "p1")]
