"""virtio-mmio v2 register file: identification, negotiation, status, queues, config, snapshot."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptmig.devices.virtio import constants as c
from ptmig.devices.virtio.mmio import MmioState, VirtioMmioRegisters
from ptmig.devices.virtio.queue import QueueState

MAC = bytes.fromhex("525400123456")
FEATURES = c.feature_mask(c.VIRTIO_F_VERSION_1, c.VIRTIO_NET_F_MAC, c.VIRTIO_NET_F_STATUS)


class Recorder:
    def __init__(self, regs: VirtioMmioRegisters) -> None:
        self.events: list[tuple[object, ...]] = []
        regs.on_queue_ready = lambda i, s: self.events.append(("ready", i, s))
        regs.on_queue_disable = lambda i: self.events.append(("disable", i))
        regs.on_notify = lambda i: self.events.append(("notify", i))
        regs.on_reset = lambda: self.events.append(("reset",))
        regs.on_driver_ok = lambda: self.events.append(("driver_ok",))
        regs.on_interrupt = lambda bits: self.events.append(("irq", bits))


def net_device() -> tuple[VirtioMmioRegisters, Recorder]:
    regs = VirtioMmioRegisters(c.VIRTIO_ID_NET, FEATURES, 2, 256, c.net_config(MAC))
    return regs, Recorder(regs)


def negotiate(regs: VirtioMmioRegisters, features: int = FEATURES) -> int:
    regs.write(c.REG_STATUS, 4, c.STATUS_ACKNOWLEDGE)
    regs.write(c.REG_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    for sel in (0, 1):
        regs.write(c.REG_DRIVER_FEATURES_SEL, 4, sel)
        regs.write(c.REG_DRIVER_FEATURES, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    regs.write(c.REG_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK)
    return regs.read(c.REG_STATUS, 4)


def setup_queue(
    regs: VirtioMmioRegisters, index: int, num: int, desc: int, avail: int, used: int
) -> None:
    regs.write(c.REG_QUEUE_SEL, 4, index)
    regs.write(c.REG_QUEUE_NUM, 4, num)
    for reg, addr in (
        (c.REG_QUEUE_DESC_LOW, desc),
        (c.REG_QUEUE_DRIVER_LOW, avail),
        (c.REG_QUEUE_DEVICE_LOW, used),
    ):
        regs.write(reg, 4, addr & 0xFFFFFFFF)
        regs.write(reg + 4, 4, addr >> 32)
    regs.write(c.REG_QUEUE_READY, 4, 1)


def bring_up(regs: VirtioMmioRegisters) -> None:
    assert negotiate(regs) & c.STATUS_FEATURES_OK
    setup_queue(regs, 0, 256, 0x1_0000_0000, 0x1_0000_1000, 0x1_0000_2000)
    setup_queue(regs, 1, 128, 0x20000, 0x21000, 0x22000)
    regs.write(c.REG_STATUS, 4, 0xF)


def test_identification() -> None:
    regs, _ = net_device()
    assert regs.read(c.REG_MAGIC_VALUE, 4) == 0x74726976
    assert regs.read(c.REG_VERSION, 4) == 2
    assert regs.read(c.REG_DEVICE_ID, 4) == 1
    regs.write(c.REG_DEVICE_FEATURES_SEL, 4, 0)
    low = regs.read(c.REG_DEVICE_FEATURES, 4)
    regs.write(c.REG_DEVICE_FEATURES_SEL, 4, 1)
    high = regs.read(c.REG_DEVICE_FEATURES, 4)
    regs.write(c.REG_DEVICE_FEATURES_SEL, 4, 2)
    assert low | high << 32 == FEATURES and regs.read(c.REG_DEVICE_FEATURES, 4) == 0
    assert regs.read(c.REG_QUEUE_NUM_MAX, 4) == 256
    regs.write(c.REG_QUEUE_SEL, 4, 2)
    assert regs.read(c.REG_QUEUE_NUM_MAX, 4) == 0  # no queue 2
    with pytest.raises(ValueError, match="VERSION_1"):
        VirtioMmioRegisters(c.VIRTIO_ID_NET, 1 << c.VIRTIO_NET_F_MAC, 2, 256, bytearray())


def test_feature_negotiation_accepts_subset_with_version_1() -> None:
    regs, _ = net_device()
    status = negotiate(regs, c.feature_mask(c.VIRTIO_F_VERSION_1, c.VIRTIO_NET_F_MAC))
    assert status & c.STATUS_FEATURES_OK
    assert regs.feature_negotiated(c.VIRTIO_NET_F_MAC)
    assert not regs.feature_negotiated(c.VIRTIO_NET_F_STATUS)
    regs.write(c.REG_DRIVER_FEATURES_SEL, 4, 0)
    regs.write(c.REG_DRIVER_FEATURES, 4, 0xFFFFFFFF)  # frozen after FEATURES_OK
    assert regs.driver_features == c.feature_mask(c.VIRTIO_F_VERSION_1, c.VIRTIO_NET_F_MAC)
    assert regs.bad_writes == 1


@pytest.mark.parametrize(
    "features",
    [
        c.feature_mask(c.VIRTIO_NET_F_MAC),  # no VERSION_1
        FEATURES | c.feature_mask(c.VIRTIO_F_INDIRECT_DESC),  # not offered
    ],
)
def test_features_ok_refused(features: int) -> None:
    regs, rec = net_device()
    assert not negotiate(regs, features) & c.STATUS_FEATURES_OK
    regs.write(c.REG_STATUS, 4, 0xF)  # DRIVER_OK without FEATURES_OK is refused too
    assert not regs.read(c.REG_STATUS, 4) & c.STATUS_DRIVER_OK
    assert ("driver_ok",) not in rec.events


def test_queue_setup_builds_validated_state() -> None:
    regs, rec = net_device()
    bring_up(regs)
    assert rec.events[0] == (
        "ready",
        0,
        QueueState(256, 0x1_0000_0000, 0x1_0000_1000, 0x1_0000_2000, 0, 0, True),
    )
    assert rec.events[1] == ("ready", 1, QueueState(128, 0x20000, 0x21000, 0x22000))
    assert rec.events[2] == ("driver_ok",)
    assert regs.read(c.REG_QUEUE_READY, 4) == 1 and regs.driver_ok
    assert regs.queue_state(1) == QueueState(128, 0x20000, 0x21000, 0x22000)
    regs.write(c.REG_QUEUE_NUM, 4, 64)  # queue 1 is ready: ignored
    assert regs.queue_state(1) == QueueState(128, 0x20000, 0x21000, 0x22000)
    assert regs.bad_writes == 1
    regs.write(c.REG_QUEUE_NOTIFY, 4, 1)
    regs.write(c.REG_QUEUE_NOTIFY, 4, 5)
    assert rec.events[-1] == ("notify", 1) and regs.bad_writes == 2
    regs.write(c.REG_QUEUE_READY, 4, 0)
    assert rec.events[-1] == ("disable", 1) and regs.queue_state(1) is None


@pytest.mark.parametrize(
    ("num", "desc", "message"),
    [
        (100, 0x1000, "not a power of 2"),
        (512, 0x1000, "exceeds QueueNumMax 256"),
        (0, 0x1000, "not a power of 2"),
        (64, 0x1008, "not 16-byte aligned"),
    ],
)
def test_invalid_queue_needs_reset(num: int, desc: int, message: str) -> None:
    regs, rec = net_device()
    negotiate(regs)
    setup_queue(regs, 0, num, desc, 0x2000, 0x3000)
    status = regs.read(c.REG_STATUS, 4)
    assert status & c.STATUS_DEVICE_NEEDS_RESET
    assert regs.needs_reset_reason is not None and message in regs.needs_reset_reason
    assert regs.read(c.REG_QUEUE_READY, 4) == 0
    assert not [e for e in rec.events if e[0] == "ready"]


def test_queue_before_features_ok_needs_reset() -> None:
    regs, _ = net_device()
    regs.write(c.REG_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    setup_queue(regs, 0, 64, 0x1000, 0x2000, 0x3000)
    assert regs.read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
    assert "before FEATURES_OK" in (regs.needs_reset_reason or "")


def test_status_rules_and_reset() -> None:
    regs, rec = net_device()
    bring_up(regs)
    regs.write(c.REG_STATUS, 4, c.STATUS_ACKNOWLEDGE)  # clearing bits is not allowed
    assert regs.read(c.REG_STATUS, 4) == 0xF
    regs.write(c.REG_STATUS, 4, 0xF | c.STATUS_DEVICE_NEEDS_RESET)  # device-owned bit
    assert regs.read(c.REG_STATUS, 4) == 0xF
    regs.raise_interrupt()
    assert regs.read(c.REG_INTERRUPT_STATUS, 4) == c.INTERRUPT_USED_BUFFER
    regs.write(c.REG_STATUS, 4, 0)
    assert rec.events[-1] == ("reset",)
    assert regs.read(c.REG_STATUS, 4) == 0 and regs.read(c.REG_INTERRUPT_STATUS, 4) == 0
    assert regs.driver_features == 0 and regs.queue_state(0) is None
    regs.write(c.REG_QUEUE_SEL, 4, 0)
    assert regs.read(c.REG_QUEUE_READY, 4) == 0


def test_interrupts_and_needs_reset_after_driver_ok() -> None:
    regs, rec = net_device()
    bring_up(regs)
    regs.raise_interrupt(c.INTERRUPT_USED_BUFFER)
    assert rec.events[-1] == ("irq", 1)
    regs.needs_reset("descriptor 5 next=70 out of range for queue size 64")
    assert rec.events[-1] == ("irq", 3)
    assert regs.read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET and not regs.driver_ok
    regs.write(c.REG_INTERRUPT_ACK, 4, 1)
    assert regs.read(c.REG_INTERRUPT_STATUS, 4) == 2
    gen = regs.read(c.REG_CONFIG_GENERATION, 4)
    regs.config_changed()
    assert regs.read(c.REG_CONFIG_GENERATION, 4) == gen + 1


def test_config_space() -> None:
    regs, _ = net_device()
    assert bytes(regs.read(c.REG_CONFIG + i, 1) for i in range(6)) == MAC
    assert regs.read(c.REG_CONFIG + c.NET_CONFIG_STATUS, 2) == c.VIRTIO_NET_S_LINK_UP
    assert regs.read(c.REG_CONFIG, 4) == struct.unpack("<I", MAC[:4])[0]
    assert regs.read(c.REG_CONFIG + 10, 4) == 0 and regs.bad_reads == 1  # past the end
    regs.write(c.REG_CONFIG, 1, 0xFF)  # no config-write hook: ignored
    assert regs.read(c.REG_CONFIG, 1) == MAC[0] and regs.bad_writes == 1
    writes: list[tuple[int, bytes]] = []
    regs.on_config_write = lambda off, data: writes.append((off, data))
    regs.write(c.REG_CONFIG + 2, 2, 0x1_BEEF)
    assert writes == [(2, b"\xef\xbe")]
    blk = VirtioMmioRegisters(c.VIRTIO_ID_BLOCK, 1 << 32, 1, 128, c.blk_config(2048))
    assert blk.read(c.REG_CONFIG, 8) == 2048
    assert blk.read(c.REG_CONFIG + c.BLK_CONFIG_BLK_SIZE, 4) == 512


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0x002, 2),
        (0x000, 8),
        (0x048, 4),
        (0x0FE, 4),
        (0xFFF, 1),
        (-4, 4),
        (0x001, 4),
    ],
)
def test_bad_accesses_are_ignored_and_counted(offset: int, size: int) -> None:
    regs, _ = net_device()
    before = regs.snapshot()
    assert regs.read(offset, size) == 0
    regs.write(offset, size, 0xFFFFFFFF)
    assert regs.bad_reads == 1 and regs.bad_writes == 1
    assert regs.snapshot() == before


def test_snapshot_restore_round_trip() -> None:
    regs, _ = net_device()
    bring_up(regs)
    regs.raise_interrupt()
    saved = regs.snapshot()
    fresh, rec = net_device()
    fresh.restore(saved)
    assert rec.events == []  # restore does not replay hooks
    for off in range(0, 0x100, 4):
        for sel in (0, 1):
            regs.write(c.REG_QUEUE_SEL, 4, sel)
            fresh.write(c.REG_QUEUE_SEL, 4, sel)
            assert fresh.read(off, 4) == regs.read(off, 4), hex(off)
    assert fresh.snapshot() == regs.snapshot()
    saved.queues[0].num = 3  # snapshots are copies: this does not touch either device
    assert regs.queue_state(0) is not None and regs.queue_state(0).size == 256  # type: ignore


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: setattr(s, "device_id", 2), "does not fit"),
        (lambda s: s.queues.pop(), "queues"),
        (lambda s: setattr(s, "driver_features", 1 << 40), "does not offer"),
        (lambda s: setattr(s.queues[0], "num", 3), "saved queue 0 is invalid"),
    ],
)
def test_restore_rejects_bad_state(mutate: object, message: str) -> None:
    regs, _ = net_device()
    bring_up(regs)
    saved: MmioState = regs.snapshot()
    mutate(saved)  # type: ignore[operator]
    fresh, _ = net_device()
    with pytest.raises(ValueError, match=message):
        fresh.restore(saved)


access_st = st.tuples(
    st.booleans(),
    st.one_of(st.sampled_from(list(range(0, 0x110, 4))), st.integers(-8, 0x1010)),
    st.sampled_from([1, 2, 4, 8, 3]),
    st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 0xF, 0xB, 0x8])),
)


@settings(max_examples=300, deadline=None)
@given(accesses=st.lists(access_st, max_size=80))
def test_random_guest_accesses_never_raise_and_keep_invariants(
    accesses: list[tuple[bool, int, int, int]],
) -> None:
    regs, rec = net_device()
    for is_write, offset, size, value in accesses:
        if is_write:
            regs.write(offset, size, value)
        else:
            assert 0 <= regs.read(offset, size) < 1 << (8 * size)
        status = regs.read(c.REG_STATUS, 4)
        if status & c.STATUS_FEATURES_OK:
            f = regs.driver_features
            assert f >> 32 & 1 and not f & ~FEATURES
        if status & c.STATUS_DRIVER_OK:
            assert status & c.STATUS_FEATURES_OK
    for event in rec.events:
        if event[0] == "ready":
            state = event[2]
            assert isinstance(state, QueueState) and state.validate() is state
