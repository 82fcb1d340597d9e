"""The kv workload end to end on real KVM: the firmware's virtio-net and virtio-blk drivers
against the device processes, its ARP/IPv4/ICMP/UDP stack, and its write-ahead log."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptmig.devices.handle import DeviceHandle
from ptmig.firmware import FirmwareImage, read_abi_header
from ptmig.iommu import IommuTable
from ptmig.layout import ABI_WORKLOAD_STATS_GPA, BootDevice, mmio_gpa
from ptmig.net import frames as fr
from ptmig.net import kvproto as kp
from ptmig.vm import RunState, Vm, VmSpec

pytestmark = pytest.mark.kvm

ABI = read_abi_header()
GUEST_MAC = fr.parse_mac("52:54:00:12:34:56")
HOST_MAC = fr.parse_mac("52:54:00:aa:bb:cc")
GUEST_IP, HOST_IP = fr.ip_aton("10.0.0.2"), fr.ip_aton("10.0.0.1")
MEMORY = 64 << 20
DISK_SIZE = 1 << 20
_KV_REPORT = struct.Struct("<20Q")
LOG_START = 512


class KvGuest:
    """A 1-vCPU VM running `kv`, with a net device on a socketpair and a disk image."""

    def __init__(self, firmware: FirmwareImage, disk: Path, args: str = "") -> None:
        self.vm = Vm(VmSpec(MEMORY, 1, f"kv ip=10.0.0.2 mask=24 port=7000 {args}".strip()))
        pages = MEMORY // 4096
        self.iommu = IommuTable.create(pages)
        self.iommu.map_identity(pages)
        self.host, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.devices: list[DeviceHandle] = []
        try:
            self.devices.append(
                DeviceHandle.spawn(
                    "net",
                    0,
                    {"mac": fr.mac_str(GUEST_MAC), "backend": f"fd:{dev.fileno()}"},
                    self.vm.memory.fd,
                    MEMORY,
                    self.iommu,
                    pass_fds=[dev.fileno()],
                )
            )
            self.devices.append(
                DeviceHandle.spawn(
                    "blk",
                    1,
                    {"path": str(disk), "size": DISK_SIZE, "serial": "kv-test"},
                    self.vm.memory.fd,
                    MEMORY,
                    self.iommu,
                )
            )
        finally:
            dev.close()
        for i, d in enumerate(self.devices):
            self.vm.attach_device(i, d)
            self.vm.wake_fds.append(d.irq_eventfd)
        self.vm.boot(
            firmware.data,
            firmware.entry,
            firmware.entry_ap,
            [BootDevice(mmio_gpa(0), 0x1000, 1), BootDevice(mmio_gpa(1), 0x1000, 2)],
        )
        self.req_id = 0
        self.closed = False
        self.vm.start()

    def send(self, op: int, key: bytes = b"", value: bytes = b"", flags: int = 0) -> int:
        """Send one request without waiting; its req_id."""
        self.req_id += 1
        payload = kp.encode_request(kp.KvRequest(self.req_id, kp.Op(op), key, value, flags))
        self.host.send(fr.udp_frame(HOST_MAC, GUEST_MAC, HOST_IP, GUEST_IP, 40000, 7000, payload))
        return self.req_id

    def replies(self, n: int) -> dict[int, kp.KvReply]:
        """The next n kv replies, by req_id (ARP and other frames skipped)."""
        out: dict[int, kp.KvReply] = {}
        while len(out) < n:
            f = self.frame()
            assert f is not None, f"{len(out)} of {n} replies: {self.console()}"
            eth = fr.parse_ethernet(f)
            if eth.ethertype != 0x0800:
                continue
            ip = fr.parse_ipv4(eth.payload)
            reply = kp.decode_reply(fr.parse_udp(ip.payload, ip.src, ip.dst).payload)
            out[reply.req_id] = reply
        return out

    def frame(self, timeout: float = 5.0) -> bytes | None:
        ready, _, _ = select.select([self.host], [], [], timeout)
        return self.host.recv(65536) if ready else None

    def request(
        self,
        op: int,
        key: bytes = b"",
        value: bytes = b"",
        flags: int = 0,
        raw: bytes | None = None,
    ) -> kp.KvReply | None:
        self.req_id += 1
        payload = (
            raw
            if raw is not None
            else kp.encode_request(kp.KvRequest(self.req_id, kp.Op(op), key, value, flags))
        )
        self.host.send(fr.udp_frame(HOST_MAC, GUEST_MAC, HOST_IP, GUEST_IP, 40000, 7000, payload))
        deadline = time.monotonic() + 5
        while (f := self.frame(max(0.0, deadline - time.monotonic()))) is not None:
            eth = fr.parse_ethernet(f)
            if eth.ethertype != 0x0800:
                continue
            ip = fr.parse_ipv4(eth.payload)
            udp = fr.parse_udp(ip.payload, ip.src, ip.dst)
            assert (udp.src_port, udp.dst_port) == (7000, 40000)
            return kp.decode_reply(udp.payload)
        return None

    def report(self) -> tuple[int, ...]:
        return _KV_REPORT.unpack(self.vm.memory.read(ABI_WORKLOAD_STATS_GPA, _KV_REPORT.size))

    def console(self) -> str:
        return "\n".join(self.vm.console.lines)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.vm.close()
        for d in self.devices:
            d.close()
        self.host.close()
        self.iommu.close()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return tmp_path / "kv.img"


@pytest.fixture
def start(firmware: FirmwareImage) -> Iterator:
    guests: list[KvGuest] = []

    def boot(disk: Path, args: str = "") -> KvGuest:
        g = KvGuest(firmware, disk, args)
        guests.append(g)
        first = g.frame()  # the gratuitous ARP comes once replay is done
        assert first is not None, g.console()
        arp = fr.parse_arp(fr.parse_ethernet(first).payload)
        assert (arp.sha, arp.spa, arp.tpa) == (GUEST_MAC, GUEST_IP, GUEST_IP)
        return g

    yield boot
    for g in guests:
        g.close()


def test_put_get_and_replay_across_restart(start, disk: Path) -> None:
    g = start(disk)
    assert g.request(kp.Op.PUT, b"alpha", b"one") == kp.KvReply(1, kp.Status.OK)
    assert g.request(kp.Op.PUT, b"beta", b"x" * 512, flags=kp.FLAG_DURABLE).status == 0
    assert g.request(kp.Op.PUT, b"alpha", b"uno").status == kp.Status.OK
    assert g.request(kp.Op.GET, b"alpha") == kp.KvReply(4, kp.Status.OK, b"uno")
    assert g.request(kp.Op.GET, b"gamma") == kp.KvReply(5, kp.Status.NOT_FOUND)
    stats = g.request(kp.Op.STATS)
    assert stats is not None and stats.status == kp.Status.OK
    requests, puts, gets, log_bytes, entries, io_errors, bad, replayed = struct.unpack(
        "<8Q", stats.value
    )
    assert (requests, puts, gets, entries, io_errors, bad, replayed) == (6, 3, 2, 2, 0, 0, 0)
    assert log_bytes == (24 + 5 + 3) * 2 + 24 + 4 + 512
    rep = g.report()
    assert rep[0] == ABI["KV_REPORT_MAGIC"] and rep[5] == 1  # formatted a fresh disk
    g.close()

    g2 = start(disk)
    rep = g2.report()
    assert rep[1:5] == (3, log_bytes, 3, ABI["KV_REPLAY_END"]), g2.console()
    assert rep[5] == 0
    assert g2.request(kp.Op.GET, b"alpha").value == b"uno"
    assert g2.request(kp.Op.GET, b"beta").value == b"x" * 512
    assert g2.request(kp.Op.PUT, b"delta", b"4").status == kp.Status.OK
    g2.close()

    g3 = start(disk)
    assert g3.report()[1:4] == (4, log_bytes + 24 + 5 + 1, 4)


def _reply_to(g: KvGuest, req_id: int, timeout: float) -> kp.KvReply:
    """The kv reply to `req_id` (other frames skipped), waiting up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (f := g.frame(max(0.0, deadline - time.monotonic()))) is not None:
        eth = fr.parse_ethernet(f)
        if eth.ethertype != 0x0800:
            continue
        ip = fr.parse_ipv4(eth.payload)
        reply = kp.decode_reply(fr.parse_udp(ip.payload, ip.src, ip.dst).payload)
        if reply.req_id == req_id:
            return reply
    raise AssertionError(f"no reply to request {req_id} in {timeout:.0f} s: {g.console()}")


def test_a_disk_request_that_never_completes_is_given_up_with_a_message(start, disk) -> None:
    """The disk stops answering (its device process is stopped): the PUT waiting for it gets
    an error reply after the guest's 20 s give-up, the console says why, later PUTs fail at
    once, and GETs are still served from the table."""
    g = start(disk)
    assert g.request(kp.Op.PUT, b"alpha", b"one") == kp.KvReply(1, kp.Status.OK)
    blk = g.devices[1]
    os.kill(blk.pid, signal.SIGSTOP)
    try:
        stuck = g.send(kp.Op.PUT, b"beta", b"two", flags=kp.FLAG_DURABLE)
        # generous: the guest counts 20 s of its own waiting, which a loaded host stretches
        assert _reply_to(g, stuck, timeout=180).status == kp.Status.IO_ERROR
        assert "did not complete log request" in g.console(), g.console()
        assert g.request(kp.Op.GET, b"alpha") == kp.KvReply(g.req_id, kp.Status.OK, b"one")
        assert g.request(kp.Op.PUT, b"gamma", b"3").status == kp.Status.IO_ERROR
        assert g.request(kp.Op.GET, b"beta").status == kp.Status.NOT_FOUND  # never acknowledged
    finally:
        os.kill(blk.pid, signal.SIGCONT)
    # a completion arriving after the give-up is never read: the log stays stuck
    assert g.request(kp.Op.PUT, b"delta", b"4").status == kp.Status.IO_ERROR
    assert g.request(kp.Op.GET, b"alpha").value == b"one"


def test_replay_stops_at_a_corrupt_record(start, disk: Path) -> None:
    g = start(disk)
    for i in range(3):
        assert g.request(kp.Op.PUT, b"k%d" % i, b"v%d" % i).status == kp.Status.OK
    g.close()
    record = 24 + 2 + 2
    image = bytearray(disk.read_bytes())
    image[LOG_START + record + 20] ^= 0xFF  # the second record's key: its CRC no longer holds
    disk.write_bytes(image)

    g2 = start(disk)
    assert g2.report()[1:5] == (1, record, 1, ABI["KV_REPLAY_BAD_CRC"])
    assert g2.request(kp.Op.GET, b"k0").value == b"v0"
    assert g2.request(kp.Op.GET, b"k2").status == kp.Status.NOT_FOUND
    # the next append overwrites the corrupt record and zeroes the rest of its sector (which
    # held the stale third record): a restart sees a log with a clean end again
    assert g2.request(kp.Op.PUT, b"k9", b"v9").status == kp.Status.OK
    g2.close()
    g3 = start(disk)
    assert g3.report()[1:5] == (2, 2 * record, 2, ABI["KV_REPLAY_END"])
    assert g3.request(kp.Op.GET, b"k9").value == b"v9"


# report fields (struct kv_report)
REPLAY_RECORDS, REPLAY_STOP, IO_ERRORS = 1, 4, 11
AREA_BYTES, ACTIVE, FIRST_SEQ, CHECKPOINTS = 13, 14, 15, 16
CHECKPOINT_US, CHECKPOINT_MAX_US = 18, 19
SMALL_LOG = 16 << 10  # two areas of 8 KiB


def _drive(g: KvGuest, model: dict[bytes, bytes], rounds: int, keys: int, tag: str) -> int:
    """PUT `rounds` bursts of one value per key (every other one durable), recording what was
    acknowledged in `model`; the log bytes appended."""
    appended = 0
    for rnd in range(rounds):
        sent = {}
        for k in range(keys):
            key, value = b"key-%02d" % k, (b"%s-%d-%d:" % (tag.encode(), rnd, k)) * 12
            sent[g.send(kp.Op.PUT, key, value, flags=k % 2)] = (key, value)
            appended += 24 + len(key) + len(value)
        for req_id, reply in g.replies(len(sent)).items():
            assert reply.status == kp.Status.OK, (reply, g.console())
            key, value = sent[req_id]
            model[key] = value
    return appended


def _check_all(g: KvGuest, model: dict[bytes, bytes]) -> None:
    for key, value in model.items():
        reply = g.request(kp.Op.GET, key)
        assert reply is not None and (reply.status, reply.value) == (kp.Status.OK, value), key


def test_the_log_wraps_through_checkpoints_and_loses_nothing(start, disk: Path) -> None:
    """Many times the log's size goes through a 16 KiB log (two 8 KiB areas; 24 live keys of
    about 130 bytes fill 3 KiB of one): every acknowledged value reads back, before and after a
    restart, and again after more wraps following the restart."""
    model: dict[bytes, bytes] = {}
    g = start(disk, f"log={SMALL_LOG}")
    appended = _drive(g, model, 40, 24, "a")
    assert appended > 6 * SMALL_LOG
    rep = g.report()
    assert rep[AREA_BYTES] == SMALL_LOG // 2
    assert rep[CHECKPOINTS] >= 6, (rep, g.console())
    assert rep[IO_ERRORS] == 0
    _check_all(g, model)
    first_seq = rep[FIRST_SEQ]
    g.close()

    g2 = start(disk)  # no log=: the disk's superblock says how big the log is
    rep = g2.report()
    assert (rep[AREA_BYTES], rep[FIRST_SEQ]) == (SMALL_LOG // 2, first_seq), g2.console()
    assert rep[REPLAY_STOP] in (ABI["KV_REPLAY_END"], ABI["KV_REPLAY_DISK_END"])
    assert rep[REPLAY_RECORDS] >= len(model)  # the checkpoint, then what followed it
    _check_all(g2, model)
    _drive(g2, model, 10, 24, "b")
    assert g2.report()[CHECKPOINTS] >= 2
    g2.close()

    g3 = start(disk)
    assert g3.report()[FIRST_SEQ] > first_seq
    _check_all(g3, model)


def _flushes(g: KvGuest) -> int:
    return int(g.devices[1].stats()["device"]["flushes"])


def test_a_checkpoint_of_many_batches_flushes_once_before_its_superblock(start, disk) -> None:
    """1,200 live keys are three batches of records: a checkpoint writes them with one FLUSH
    after the last batch and one after the superblock (a FLUSH per batch kept the guest from
    serving for 128 flushes at 65,536 keys), records its time, and loses nothing."""
    g = start(disk, "log=512K")  # two 256 KiB areas; the live keys fill ~100 KiB of one
    model: dict[bytes, bytes] = {}
    before = _flushes(g)
    for rnd in range(6):  # non-durable PUTs (no FLUSH of their own), 100 in flight at most
        for burst in range(0, 1200, 100):
            sent = {}
            for k in range(burst, burst + 100):
                key, value = b"key-%04d" % k, b"v%d-%d" % (rnd, k) * 6
                sent[g.send(kp.Op.PUT, key, value)] = (key, value)
            for req_id, reply in g.replies(len(sent)).items():
                assert reply.status == kp.Status.OK, (reply, g.console())
                model[sent[req_id][0]] = sent[req_id][1]
    rep = g.report()
    assert rep[CHECKPOINTS] >= 1, (rep, g.console())
    assert _flushes(g) - before == 2 * rep[CHECKPOINTS]
    assert 0 < rep[CHECKPOINT_MAX_US] <= rep[CHECKPOINT_US]
    _check_all(g, model)
    g.close()
    g2 = start(disk)  # the checkpoint (and what followed it) replays
    _check_all(g2, model)


def test_live_data_larger_than_an_area_fills_the_log_and_loses_nothing(start, disk: Path) -> None:
    """A 4 KiB log (two areas of 2 KiB) cannot hold more than a few 500-byte values: new keys
    then get IO_ERROR, every acknowledged value stays readable, also after a restart."""
    g = start(disk, "log=4K")
    model: dict[bytes, bytes] = {}
    errors = 0
    for i in range(12):
        key, value = b"big-%d" % i, bytes([65 + i]) * 500
        reply = g.request(kp.Op.PUT, key, value)
        assert reply is not None and reply.status in (kp.Status.OK, kp.Status.IO_ERROR)
        if reply.status == kp.Status.OK:
            model[key] = value
        else:
            errors += 1
    assert 0 < len(model) < 12 and errors == 12 - len(model), g.console()
    _check_all(g, model)
    g.close()
    g2 = start(disk)
    _check_all(g2, model)


def test_a_log_that_does_not_fit_the_disk_is_refused(firmware: FirmwareImage, disk: Path) -> None:
    g = KvGuest(firmware, disk, f"log={2 * DISK_SIZE}")
    try:
        assert g.vm.wait(timeout=30) == 1, g.console()
        assert f"log={2 * DISK_SIZE} must be at least 4096 bytes and at most" in g.console()
    finally:
        g.close()


@pytest.mark.parametrize(
    "superblock, message",
    [
        (
            struct.pack("<QIIQ", 0x31474F4C564B4D50, 1, 512, 512),
            "log superblock version 1 sector size 512 start 512 is not supported",
        ),
        (
            struct.pack("<QIIQQQQ", 0x31474F4C564B4D50, 2, 512, 512, DISK_SIZE, 0, 1),
            f"areas of {DISK_SIZE} bytes, active 0, first seq 1 do not fit a disk of {DISK_SIZE}",
        ),
        (
            struct.pack("<QIIQQQQ", 0x31474F4C564B4D50, 2, 512, 512, 8192, 2, 1),
            "areas of 8192 bytes, active 2, first seq 1 do not fit",
        ),
    ],
    ids=["version-1", "areas-too-big", "no-such-area"],
)
def test_a_log_it_does_not_understand_is_refused_not_overwritten(
    firmware: FirmwareImage, disk: Path, superblock: bytes, message: str
) -> None:
    image = superblock + bytes(DISK_SIZE - len(superblock))
    disk.write_bytes(image)
    g = KvGuest(firmware, disk)
    try:
        assert g.vm.wait(timeout=30) == 1, g.console()
        assert message in g.console()
    finally:
        g.close()
    assert disk.read_bytes() == image  # nothing was formatted away


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("<IIBBHHH", kp.REQUEST_MAGIC, 7, 9, 0, 0, 0, 0),  # unknown op
        struct.pack("<IIBBHHH", kp.REQUEST_MAGIC, 7, 2, 0x80, 1, 0, 0) + b"k",  # unknown flag
        struct.pack("<IIBBHHH", kp.REQUEST_MAGIC, 7, 1, 0, 129, 0, 0) + b"k" * 129,  # klen
        struct.pack("<IIBBHHH", kp.REQUEST_MAGIC, 7, 1, 0, 1, 1, 0) + b"k",  # short
        struct.pack("<IIBBHHH", kp.REQUEST_MAGIC, 7, 2, 0, 1, 1, 0) + b"kv",  # GET with value
        struct.pack("<IIBBHHH", kp.REQUEST_MAGIC, 7, 2, 0, 1, 0, 5) + b"k",  # reserved
    ],
)
def test_bad_requests_get_bad_request(start, disk: Path, raw: bytes) -> None:
    g = start(disk)
    assert g.request(0, raw=raw) == kp.KvReply(7, kp.Status.BAD_REQUEST)
    assert g.report()[12] == 1


def test_answers_ping_and_arp_and_ignores_foreign_datagrams(start, disk: Path) -> None:
    g = start(disk)
    echo = fr.IcmpEcho(8, 0x1234, 7, b"ptmig-ping")
    packet = fr.Ipv4Packet(HOST_IP, GUEST_IP, 1, echo.to_bytes()).to_bytes()
    g.host.send(fr.EthernetFrame(GUEST_MAC, HOST_MAC, 0x0800, packet).to_bytes())
    reply = fr.parse_ipv4(fr.parse_ethernet(g.frame()).payload)
    assert (reply.src, reply.dst) == (GUEST_IP, HOST_IP)
    assert fr.parse_icmp_echo(reply.payload) == echo.reply()

    g.host.send(fr.arp_request_frame(HOST_MAC, HOST_IP, GUEST_IP))
    arp = fr.parse_arp(fr.parse_ethernet(g.frame()).payload)
    assert (arp.op, arp.sha, arp.spa, arp.tha, arp.tpa) == (
        2,
        GUEST_MAC,
        GUEST_IP,
        HOST_MAC,
        HOST_IP,
    )
    # not the kv magic: no reply at all
    g.host.send(fr.udp_frame(HOST_MAC, GUEST_MAC, HOST_IP, GUEST_IP, 40000, 7000, b"hello!" * 4))
    assert g.frame(0.5) is None
    assert g.request(kp.Op.GET, b"none").status == kp.Status.NOT_FOUND
    assert g.vm.state == RunState.RUNNING
