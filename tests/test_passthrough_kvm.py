"""The passthrough property on real KVM, the gap ptmig exists to close: pages a device process
wrote by DMA (RX buffers holding received requests, the RX used ring) hold the device's data in
guest RAM, yet are ABSENT from the harvested dirty set (KVM's log ∪ the VMM's bitmap) and
PRESENT in the device's own DMA write log when that hardware feature is switched on."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from test_kv_e2e import _call
from vmmrig import kv_config

from ptmig import bitmap
from ptmig.config import load_config
from ptmig.layout import ABI_STATS_GPA
from ptmig.load import LoadOptions, open_datapath
from ptmig.machine import Machine
from ptmig.net import kvproto as kp

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

PAGE = 4096
RX_BUF = 2048
MARKER = b"PASSTHROUGH-DMA-MARKER"


def _rx_queue(machine: Machine) -> dict[str, int]:
    net = next(d for d in machine.devices if d.kind == "net")
    state = net.handle.get_state()
    return next(q for q in state["queues"] if q["index"] == 0)


def test_device_writes_escape_the_dirty_log_but_not_the_dma_log(tmp_path: Path) -> None:
    machine = Machine(load_config(kv_config(tmp_path)))
    try:
        machine.boot()
        machine.vm.start()
        net = next(d for d in machine.devices if d.kind == "net")
        dp = open_datapath(LoadOptions(config=tmp_path / "kv.toml"))
        try:
            assert _call(dp, [kp.KvRequest(1, kp.Op.STATS)])[1].status == kp.Status.OK
            time.sleep(0.3)  # let the guest go idle, then start both logs from zero
            machine.vm.dirty.harvest()
            net.handle.dma_log_start()
            puts = [
                kp.KvRequest(10 + i, kp.Op.PUT, b"k%d" % i, MARKER + b"-%d" % i) for i in range(8)
            ]
            replies = _call(dp, puts)
            assert all(r.status == kp.Status.OK for r in replies.values())
            dirty = bitmap.to_bool(machine.vm.dirty.harvest(), machine.vm.memory.npages)
            dma_log = np.unpackbits(net.handle.dma_log_harvest(), bitorder="little")
        finally:
            dp.close()

        mem = machine.vm.memory
        rx = _rx_queue(machine)
        descs = mem.read(rx["desc_addr"], 16 * rx["size"])
        rx_pages: set[int] = set()
        for i in range(rx["size"]):
            addr, length, _, _ = struct.unpack_from("<QIHH", descs, 16 * i)
            if MARKER in mem.read(addr, min(length, RX_BUF)):
                rx_pages.update(range(addr // PAGE, (addr + length - 1) // PAGE + 1))
        assert rx_pages, "no RX buffer holds a received request: the device wrote nothing?"
        used_page = rx["used_addr"] // PAGE

        # the KVM log works: the guest's own writes (its statistics page) are in the set
        assert dirty[ABI_STATS_GPA // PAGE]
        # ... and the device's writes are not: this is what a pre-copy migration would miss
        for page in sorted(rx_pages | {used_page}):
            assert not dirty[page], f"page {page:#x} (device-written) is in the dirty set"
            assert dma_log[page], f"page {page:#x} (device-written) is not in the DMA log"
    finally:
        machine.close()
