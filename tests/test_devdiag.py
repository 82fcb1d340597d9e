"""x-query-devices: the device and guest-ring report that pins a stalled data path."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmmrig import Vmm, kv_config, switch

from ptmig.devdiag import queue_report, ring_indices
from ptmig.memory import GuestMemoryError
from ptmig.vmmproc import free_port

AVAIL, USED = 0x1000, 0x2000


def _ram(avail_idx: int, used_idx: int) -> bytearray:
    ram = bytearray(0x3000)
    struct.pack_into("<H", ram, AVAIL + 2, avail_idx)
    struct.pack_into("<H", ram, USED + 2, used_idx)
    return ram


def _reader(ram: bytearray) -> Any:
    def read(gpa: int, length: int) -> bytes:
        if gpa < 0 or gpa + length > len(ram):
            raise GuestMemoryError(f"GPA {gpa:#x}+{length} is outside guest RAM")
        return bytes(ram[gpa : gpa + length])

    return read


@given(st.integers(0, 0xFFFF), st.integers(0, 256))
def test_outstanding_counts_across_the_16_bit_wrap(used_idx: int, ahead: int) -> None:
    avail_idx = (used_idx + ahead) & 0xFFFF
    got = ring_indices(_reader(_ram(avail_idx, used_idx)), AVAIL, USED)
    assert got == {"avail-idx": avail_idx, "used-idx": used_idx, "outstanding": ahead}


def test_a_ring_outside_guest_ram_is_reported_not_raised() -> None:
    queue = {"next_avail": 3, "next_used": 3, "avail_addr": 0x10_0000, "used_addr": USED}
    out = queue_report(_reader(_ram(3, 3)), queue)
    assert "guest" not in out and "0x100000" in out["guest-error"]
    assert out["next_avail"] == 3  # the device's side is kept


def _net(report: dict[str, Any]) -> dict[str, Any]:
    (net,) = [d for d in report["devices"] if d["kind"] == "net"]
    return net


@pytest.mark.kvm
@pytest.mark.timeout(180)
def test_query_devices_shows_the_nics_rings_in_guest_ram(tmp_path: Path) -> None:
    """A booted kv guest posted every RX buffer (nothing was sent to it) and its gratuitous
    ARP went out: the report shows the RX ring a full ring ahead with no frame received, and
    the TX ring consumed up to the guest's avail index after at least one doorbell."""
    sw = free_port(socket.SOCK_DGRAM)
    with switch(sw):
        vmm = Vmm(tmp_path, "src", kv_config(tmp_path, sw))
        try:
            vmm.wait_running()
            deadline = time.monotonic() + 60
            while True:
                net = _net(vmm.cmd("x-query-devices"))
                tx = net.get("queues", {}).get("1")  # none before the driver set them up
                if tx is not None and net["stats"]["device"].get("tx_frames", 0) >= 1:
                    break
                assert time.monotonic() < deadline, net
                time.sleep(0.05)
            assert net["alive"] and net["direct-doorbells"]
            assert not net["stats"]["quiesced"] and not net["stats"]["broken"]
            assert net["stats"]["doorbells"] >= 1, net
            rx = net["queues"]["0"]
            assert rx["guest"]["outstanding"] == rx["size"] == 256, rx
            assert rx["next_avail"] == rx["guest"]["used-idx"] == rx["next_used"], rx
            assert tx["next_avail"] == tx["next_used"] == tx["guest"]["avail-idx"], tx
            assert tx["guest"]["used-idx"] == tx["next_used"], tx
            disk = [d for d in vmm.cmd("x-query-devices")["devices"] if d["kind"] == "disk"]
            assert len(disk) == 1 and "0" in disk[0]["queues"], disk
        finally:
            vmm.stop()
