"""virtio-net through a real device process: TX and RX over a socketpair backend (``fd:N``)
and over the UDP backend with the test playing the switch."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from test_device_support import (
    Guest,
    cpu_ticks,
    driver_init,
    guest,
    kick,
    kick_and_wait,
    wait_for,
)

from ptmig.devices.handle import DeviceHandle
from ptmig.devices.net import RX_BACKLOG
from ptmig.devices.virtio import constants as c
from ptmig.devices.virtio.testing import Buffer, DriverQueue

__all__ = ["guest"]

FEATURES = c.feature_mask(c.VIRTIO_F_VERSION_1, c.VIRTIO_NET_F_MAC)
MAC = "52:54:00:ab:cd:ef"
RX_BUF = 1526


def frame(n: int, tag: int = 0) -> bytes:
    dst, src = b"\xff" * 6, bytes.fromhex("525400abcdef")
    return dst + src + b"\x08\x00" + bytes((tag + i) & 0xFF for i in range(n - 14))


@pytest.fixture(params=["native", "python"])
def datapath(request: pytest.FixtureRequest) -> str:
    """Every test runs on both frame paths: the native one (the default) and the Python one."""
    return str(request.param)


@pytest.fixture
def net(
    guest: Guest, datapath: str
) -> Iterator[tuple[DeviceHandle, socket.socket, DriverQueue, DriverQueue]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    h = guest.spawn(
        "net",
        {"mac": MAC, "backend": f"fd:{theirs.fileno()}", "datapath": datapath},
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    ours.settimeout(5.0)
    rxq, txq = guest.queue(0), guest.queue(1)
    driver_init(h, {0: rxq, 1: txq}, FEATURES)
    yield h, ours, rxq, txq
    ours.close()


BUFFERS: dict[int, int] = {}  # head -> address of its (single) RX buffer


def post_rx(rxq: DriverQueue, count: int, size: int = RX_BUF) -> list[int]:
    heads = []
    for _ in range(count):
        addr = rxq.alloc(size)
        heads.append(rxq.add_chain([Buffer(addr, size, writable=True)]))
        BUFFERS[heads[-1]] = addr
    return heads


def rx_payload(guest: Guest, rxq: DriverQueue, head: int, length: int) -> tuple[bytes, bytes]:
    data = guest.mem.read(BUFFERS[head], length)
    return data[:12], data[12:length]


def test_mac_in_config(net: tuple, guest: Guest, datapath: str) -> None:
    h = net[0]
    assert h.stats()["datapath"] == datapath  # the native path did not silently fall back
    mac = bytes(h.mmio_read(c.REG_CONFIG + i, 1) for i in range(6))
    assert mac == bytes.fromhex(MAC.replace(":", ""))
    assert h.mmio_read(c.REG_DEVICE_ID, 4) == c.VIRTIO_ID_NET


def test_tx_sends_frame_after_header(net: tuple, guest: Guest) -> None:
    h, sock, _, txq = net
    f = frame(200)
    hdr = bytes(12)
    head = txq.add_chain(
        [
            Buffer(txq.alloc(12, hdr), 12),
            Buffer(txq.alloc(50, f[:50]), 50),
            Buffer(txq.alloc(150, f[50:]), 150),
        ]
    )
    assert kick_and_wait(h, txq, 1) == [(head, 0)]
    assert sock.recv(65536) == f
    # header and frame in one descriptor work too
    head = txq.add_buffers(readable=[hdr + f])
    assert kick_and_wait(h, txq, 1) == [(head, 0)]
    assert sock.recv(65536) == f
    assert h.stats()["device"]["tx_frames"] == 2


def test_rx_writes_header_and_frame(net: tuple, guest: Guest) -> None:
    h, sock, rxq, _ = net
    heads = post_rx(rxq, 2)
    kick(h, 0)
    f = frame(300, tag=7)
    sock.send(f)
    assert h.wait_interrupt(5.0)
    used = rxq.take_used()
    assert used == [(heads[0], 12 + len(f))]
    hdr, payload = rx_payload(guest, rxq, heads[0], used[0][1])
    assert struct.unpack("<BBHHHHH", hdr) == (0, 0, 0, 0, 0, 0, 1)
    assert payload == f


def test_rx_backlog_waits_for_buffers_then_drops(net: tuple, guest: Guest) -> None:
    h, sock, rxq, _ = net
    frames = [frame(100, tag=i) for i in range(RX_BACKLOG + 5)]
    for f in frames:
        sock.send(f)
    wait_for(lambda: h.stats()["device"]["rx_dropped_no_buffer"] == 5)
    heads = post_rx(rxq, 3)
    used = kick_and_wait(h, rxq, 0, count=3)
    assert [u[0] for u in used] == heads
    for (head, length), f in zip(used, frames, strict=False):
        assert rx_payload(guest, rxq, head, length)[1] == f  # oldest first


def test_rx_frame_too_big_for_buffer_is_dropped(net: tuple, guest: Guest) -> None:
    h, sock, rxq, _ = net
    (small,) = post_rx(rxq, 1, size=100)
    kick(h, 0)
    sock.send(frame(500))
    assert h.wait_interrupt(5.0)
    assert rxq.take_used() == [(small, 0)]
    assert h.stats()["device"]["rx_dropped_too_big"] == 1
    (big,) = post_rx(rxq, 1)
    f = frame(500, tag=3)
    sock.send(f)
    used = kick_and_wait(h, rxq, 0)
    assert used == [(big, 512)] and rx_payload(guest, rxq, big, 512)[1] == f


def test_tx_chain_shorter_than_header_needs_reset(net: tuple, guest: Guest) -> None:
    h, _, _, txq = net
    txq.add_buffers(readable=[b"short"])
    kick(h, 1)
    wait_for(lambda: any(e.name == "needs_reset" for e in guest.events))
    assert h.alive and h.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET


def test_udp_backend_round_trip(guest: Guest, datapath: str) -> None:
    switch = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    switch.bind(("127.0.0.1", 0))
    switch.settimeout(5.0)
    port = switch.getsockname()[1]
    h = guest.spawn("net", {"mac": MAC, "backend": f"udp:127.0.0.1:{port}", "datapath": datapath})
    rxq, txq = guest.queue(0), guest.queue(1)
    driver_init(h, {0: rxq, 1: txq}, FEATURES)
    f = frame(120, tag=9)
    txq.add_buffers(readable=[bytes(12) + f])
    kick(h, 1)
    while True:  # skip the backend's hello (shorter than an Ethernet header)
        data, peer = switch.recvfrom(65536)
        if len(data) >= 14:
            break
    assert data == f
    (head,) = post_rx(rxq, 1)
    kick(h, 0)
    back = frame(64, tag=1)
    switch.sendto(back, peer)
    while not (used := rxq.take_used()):
        assert h.wait_interrupt(5.0)
    assert used == [(head, 12 + 64)]
    assert rx_payload(guest, rxq, head, 76)[1] == back
    switch.close()


def test_backend_fd_must_be_a_datagram_socket(guest: Guest) -> None:
    from ptmig.devices.handle import DeviceStartError

    r, w = os.pipe()
    try:
        with pytest.raises(DeviceStartError, match="socket|fd"):
            guest.spawn("net", {"mac": MAC, "backend": f"fd:{r}"}, pass_fds=[r])
    finally:
        os.close(r)
        os.close(w)


def test_backend_hangup_is_link_down_not_a_busy_loop(net: tuple, guest: Guest) -> None:
    h, sock, _, _ = net
    sock.close()
    wait_for(lambda: h.stats()["device"]["link_up"] == 0)
    wait_for(lambda: any(e.name == "log" and "hung up" in e.data["message"] for e in guest.events))
    time.sleep(0.3)  # let the one-off work of the hangup finish: what must be zero is the rest
    before = cpu_ticks(h.pid)
    time.sleep(0.5)
    assert cpu_ticks(h.pid) - before <= 2  # a busy loop would burn ~50 ticks here
    assert h.alive


def test_dma_write_log_has_exactly_the_pages_rx_wrote(net: tuple, guest: Guest) -> None:
    h, sock, rxq, _ = net
    page = 4096
    h.dma_log_start()
    (head,) = post_rx(rxq, 1)
    kick(h, 0)
    f = frame(300, tag=5)
    sock.send(f)
    assert kick_and_wait(h, rxq, 0) == [(head, 12 + len(f))]
    bits = h.dma_log_harvest()
    pages = {i for i in range(len(bits) * 8) if bits[i // 8] >> (i % 8) & 1}
    buf = BUFFERS[head]
    written = {buf // page, (buf + 12 + len(f) - 1) // page}
    used = {(rxq.used_addr + 2) // page, (rxq.used_addr + 4 + 8 - 1) // page}  # idx, slot 0
    assert pages == written | used
    h.dma_log_stop()
    (head,) = post_rx(rxq, 1)
    kick(h, 0)
    sock.send(f)
    assert kick_and_wait(h, rxq, 0) == [(head, 12 + len(f))]
    assert not h.dma_log_harvest().any()
