"""The vhost-user-blk frontend against a scripted backend in this process: what it negotiates,
the messages a queue start sends, and how a backend that misbehaves at each step is reported
(a start error, or a `gone` device with DEVICE_NEEDS_RESET) while nothing raises into the VMM's
register path. No KVM, no qemu-storage-daemon."""

from __future__ import annotations

import array
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from test_vhost_user_backend import ALL_STATUS, _bring_up, _GuestView, _set_up_queue

from ptmig.devices import eventfd
from ptmig.devices.handle import DeviceCommandError, DeviceEvent, DeviceGoneError
from ptmig.devices.vhost_user import codec
from ptmig.devices.vhost_user.codec import ProtocolFeature, Request
from ptmig.devices.vhost_user.connection import VhostUserConnection
from ptmig.devices.vhost_user.frontend import BackendView, VhostUserBlk
from ptmig.devices.virtio import constants as c
from ptmig.devices.virtio.testing import DriverQueue
from ptmig.layout import PAGE_SIZE
from ptmig.memory import GuestMemory
from ptmig.shadow.pool import ShadowPool

pytestmark = pytest.mark.timeout(30)

FEATURES = (
    1 << c.VIRTIO_F_VERSION_1
    | 1 << codec.F_PROTOCOL_FEATURES
    | 1 << codec.F_LOG_ALL
    | 1 << 9
    | 1 << c.VIRTIO_F_EVENT_IDX
)
PROTOCOL = sum(
    1 << f
    for f in (
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.CONFIG,
        ProtocolFeature.LOG_SHMFD,
        ProtocolFeature.MQ,
        ProtocolFeature.BACKEND_REQ,
    )
)
#: what starting a ring sends, in this order (CALL no later than KICK: a completion
#: without a call fd makes qemu-storage-daemon 7.2 panic)
QUEUE_START = [
    "SET_FEATURES",
    "SET_VRING_NUM",
    "SET_VRING_BASE",
    "SET_VRING_ADDR",
    "SET_VRING_CALL",
    "SET_VRING_KICK",
    "SET_VRING_ENABLE",
]
CONFIG = (8192).to_bytes(8, "little").ljust(60, b"\0")

#: how the scripted backend answers one request: a reply payload, None for the default, or
#: raw bytes sent instead of any reply
Hook = Callable[[codec.Message], "codec.Payload | bytes | None"]


class ScriptedBackend:
    """A vhost-user-blk backend that answers like qemu-storage-daemon, except where a hook says
    otherwise; records every request it got."""

    def __init__(self, sock: socket.socket, hook: Hook | None = None) -> None:
        self.sock, self.hook = sock, hook
        self.requests: list[codec.Message] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        reader = codec.FrameReader()
        while True:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
            if not data:
                return
            fds: list[int] = []
            for _level, _kind, raw in anc:
                got = array.array("i")
                got.frombytes(raw[: len(raw) - len(raw) % 4])
                fds.extend(got)
            reader.feed(data)
            while (frame := reader.next_frame()) is not None:
                msg = codec.decode_request(frame, tuple(fds))
                fds = []
                self.requests.append(msg)
                if not self._answer(msg):
                    self.sock.close()
                    return

    def _answer(self, msg: codec.Message) -> bool:
        custom = self.hook(msg) if self.hook is not None else None
        if isinstance(custom, bytes):
            if custom:
                self.sock.sendall(custom)
            return bool(custom)
        reply = custom if custom is not None else self._default(msg)
        if reply is not None:
            self.sock.sendall(
                codec.encode_reply(msg.request, reply, need_reply_echo=msg.need_reply)
            )
        return True

    def _default(self, msg: codec.Message) -> codec.Payload | None:
        req = Request(msg.request)
        if req == Request.GET_FEATURES:
            return codec.U64(FEATURES)
        if req == Request.GET_PROTOCOL_FEATURES:
            return codec.U64(PROTOCOL)
        if req in (Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS):
            return codec.U64(1)
        if req == Request.GET_CONFIG:
            assert isinstance(msg.payload, codec.Config)
            return codec.Config(0, msg.payload.size, 0, CONFIG[: msg.payload.size])
        if req == Request.GET_VRING_BASE:
            assert isinstance(msg.payload, codec.VringState)
            return codec.VringState(msg.payload.index, 0)
        if req == Request.SET_LOG_BASE:
            assert isinstance(msg.payload, codec.LogBase)
            return codec.U64(msg.payload.size)
        return codec.U64(0) if msg.need_reply else None

    def names(self) -> list[str]:
        return [Request(m.request).name for m in self.requests]


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(4 << 20)
    yield m
    m.close()


def _frontend(mem: GuestMemory, hook: Hook | None = None) -> tuple[VhostUserBlk, ScriptedBackend]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = ScriptedBackend(b, hook)
    return VhostUserBlk("vd", 0, VhostUserConnection(a, "vd", timeout=5.0), mem), backend


def test_negotiation_and_a_queue_start_send_the_specified_messages(mem: GuestMemory) -> None:
    dev, backend = _frontend(mem)
    with dev:
        # BACKEND_REQ: the backend channel goes over with SET_BACKEND_REQ_FD; EVENT_IDX is not
        # passed on
        assert dev.protocol_features == PROTOCOL
        assert dev.device_features == 1 << c.VIRTIO_F_VERSION_1 | 1 << 9
        assert bytes(dev.config) == CONFIG
        assert backend.names() == [
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES",
            "GET_QUEUE_NUM",
            "SET_BACKEND_REQ_FD",
            "SET_OWNER",
            "SET_FEATURES",
            "GET_CONFIG",
            "SET_MEM_TABLE",
        ]
        assert len(backend.requests[4].fds) == 1
        table = backend.requests[-1]
        assert isinstance(table.payload, codec.MemTable) and len(table.fds) == 1
        assert table.payload.regions == (codec.MemRegion(0, mem.size, mem.host_address, 0),)
        q = DriverQueue(_GuestView(mem), 64, base=0x10000, data_start=0x20000)
        del backend.requests[:]
        _bring_up(dev, q)
        assert backend.names() == QUEUE_START
        assert all(m.need_reply for m in backend.requests)  # REPLY_ACK: every one acked
        addr = backend.requests[3].payload
        assert addr == codec.VringAddr(
            0,
            codec.VRING_F_LOG,
            mem.host_address + q.desc_addr,
            mem.host_address + q.used_addr,
            mem.host_address + q.avail_addr,
            q.used_addr,
        )
        assert [len(m.fds) for m in backend.requests[4:6]] == [1, 1]
        # quiesce stops the ring with GET_VRING_BASE; resume restarts it from that base
        dev.quiesce()
        dev.resume()
        assert backend.names()[7:] == ["GET_VRING_BASE", *QUEUE_START]


@pytest.mark.parametrize(
    ("hook", "fragment"),
    [
        (
            lambda m: (
                codec.U64(1 << c.VIRTIO_F_VERSION_1) if m.request == Request.GET_FEATURES else None
            ),
            "without bit 30",
        ),
        (
            lambda m: codec.U64(0) if m.request == Request.GET_PROTOCOL_FEATURES else None,
            "CONFIG protocol feature",
        ),
        (
            lambda m: codec.Config(0, 0, 0, b"") if m.request == Request.GET_CONFIG else None,
            "refused GET_CONFIG",
        ),
        (lambda m: codec.U64(5) if m.request == Request.SET_OWNER else None, "ack 0x5"),
        (lambda m: b"" if m.request == Request.SET_MEM_TABLE else None, "closed the connection"),
        (
            lambda m: (
                codec.HEADER.pack(m.request, 0x5, 1 << 20)
                if m.request == Request.GET_FEATURES
                else None
            ),
            "more than 4096",
        ),
    ],
)
def test_a_backend_that_misbehaves_while_starting_is_refused_with_the_reason(
    mem: GuestMemory, hook: Hook, fragment: str
) -> None:
    with pytest.raises((DeviceCommandError, DeviceGoneError), match=fragment):
        _frontend(mem, hook)


def test_a_backend_that_misbehaves_at_queue_start_breaks_the_device_not_the_vmm(
    mem: GuestMemory,
) -> None:
    def hook(m: codec.Message) -> codec.Payload | bytes | None:
        if m.request == Request.SET_VRING_ADDR:  # a reply with the wrong request code
            return codec.encode_reply(Request.GET_FEATURES, codec.U64(0))
        return None

    dev, _backend = _frontend(mem, hook)
    with dev:
        events: list[DeviceEvent] = []
        seen = threading.Event()

        def record(ev: DeviceEvent) -> None:
            events.append(ev)
            seen.set()

        dev.on_event(record)
        q = DriverQueue(_GuestView(mem), 64, base=0x10000, data_start=0x20000)
        _set_up_queue(dev, q)
        # DRIVER_OK: the queue start fails inside this register write
        dev.mmio_write(c.REG_STATUS, 4, ALL_STATUS)
        assert dev.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
        assert seen.wait(5) and events[0].name == "gone"
        assert "GET_FEATURES" in events[0].data["reason"]
        with pytest.raises(DeviceGoneError):
            dev.dma_log_start()


def test_a_ring_outside_guest_ram_breaks_the_device_and_sends_nothing(mem: GuestMemory) -> None:
    dev, backend = _frontend(mem)
    with dev:
        q = DriverQueue(_GuestView(mem), 64, base=0x10000, data_start=0x20000)
        q.used_addr = mem.size + 0x1000  # the driver points the used ring past RAM
        del backend.requests[:]
        _set_up_queue(dev, q)
        dev.mmio_write(c.REG_STATUS, 4, ALL_STATUS)
        assert dev.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
        assert "SET_VRING_ADDR" not in backend.names() and dev.alive


@pytest.mark.parametrize(
    "state",
    [
        None,
        {"version": 1},
        {"version": 1, "kind": "net", "mmio": {}, "queues": []},
        {"version": 9, "kind": "blk", "mmio": {}, "queues": []},
    ],
)
def test_a_hostile_migrated_state_is_refused_and_programs_nothing(
    mem: GuestMemory, state: object
) -> None:
    dev, backend = _frontend(mem)
    with dev:
        del backend.requests[:]
        with pytest.raises(DeviceCommandError, match="device vd: "):
            dev.set_state(state)  # type: ignore[arg-type]
        assert backend.requests == [] and dev.alive


def test_state_round_trips_to_a_fresh_frontend_that_restarts_the_ring_at_the_base(
    mem: GuestMemory,
) -> None:
    def base_seven(m: codec.Message) -> codec.Payload | bytes | None:
        if m.request == Request.GET_VRING_BASE:
            return codec.VringState(0, 7)
        return None

    src, _ = _frontend(mem, base_seven)
    q = DriverQueue(_GuestView(mem), 64, base=0x10000, data_start=0x20000, start_index=7)
    with src:
        _bring_up(src, q)
        src.quiesce()
        state = src.get_state()
    dst, backend = _frontend(mem)
    with dst:
        del backend.requests[:]
        dst.set_state(state)
        assert backend.names() == QUEUE_START
        assert backend.requests[2].payload == codec.VringState(0, 7)  # SET_VRING_BASE
        assert dst.mmio_read(c.REG_STATUS, 4) == ALL_STATUS


def test_marked_for_reset_the_rings_stay_stopped_until_the_driver_resets(
    mem: GuestMemory,
) -> None:
    """What the shadow engine does to a vhost-user device it could not take out of shadow
    mode (here: before the backend had guest RAM back): DEVICE_NEEDS_RESET with a
    configuration change interrupt, and `resume` starts no ring; the driver's reset gives the
    backend guest RAM again, and a fresh set-up starts it there."""
    pool, _offset, view = _pool_view(mem)
    dev, backend = _frontend(mem)
    q = DriverQueue(_GuestView(mem), 64, base=0x10000, data_start=0x20000)
    with dev:
        _bring_up(dev, q)
        dev.quiesce()
        dev.set_backend_view(view)  # shadowed, and left so
        dev.needs_reset("leaving shadow mode failed: injected")
        assert dev.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
        assert dev.wait_interrupt(1.0)
        assert dev.mmio_read(c.REG_INTERRUPT_STATUS, 4) & c.INTERRUPT_CONFIG_CHANGE
        del backend.requests[:]
        dev.resume()
        assert backend.names() == []  # no ring restarted
        dev.mmio_write(c.REG_STATUS, 4, 0)  # the driver's reset
        assert dev.backend_view is None
        tables = [m.payload for m in backend.requests if m.request == Request.SET_MEM_TABLE]
        guest = codec.MemRegion(0, mem.size, mem.host_address, 0)
        assert tables and tables[-1] == codec.MemTable((guest,))
        q2 = DriverQueue(_GuestView(mem), 64, base=0x40000, data_start=0x50000)
        _bring_up(dev, q2)
        assert dev.mmio_read(c.REG_STATUS, 4) == ALL_STATUS
        assert "SET_VRING_KICK" in backend.names()
    pool.close()


def _pool_view(mem: GuestMemory, beside_ram: bool = False) -> tuple[ShadowPool, int, BackendView]:
    """A shadow pool with one view as large as guest RAM, and the backend view of it."""
    pool = ShadowPool(4, views=1, view_pages=mem.npages)
    offset = pool.view_base(0) * PAGE_SIZE
    args = (pool.fd, offset, mem.size, pool.address + offset, pool.mmap)
    return pool, offset, BackendView(*args, True) if beside_ram else BackendView(*args)


def test_a_backend_view_replaces_guest_ram_in_two_tables_with_the_rings_moved_unkicked(
    mem: GuestMemory,
) -> None:
    """Shadowing's memory swap, message by message: [guest RAM, view above it], the ring moved
    into the view without a kick, [view at GPA 0]; the restart then kicks it there. Leaving is
    the same with guest RAM. With the ring running the swap is refused and sends nothing."""
    pool, offset, view = _pool_view(mem)
    dev, backend = _frontend(mem)
    with dev:
        q = DriverQueue(_GuestView(mem), 64, base=0x10000, data_start=0x20000)
        _bring_up(dev, q)
        del backend.requests[:]
        with pytest.raises(DeviceCommandError, match="rings stopped"):
            dev.set_backend_view(view)
        assert backend.requests == []
        dev.quiesce()
        del backend.requests[:]
        dev.set_backend_view(view)
        moved = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR"]
        assert backend.names() == ["SET_MEM_TABLE", *moved, "SET_MEM_TABLE"]
        guest = codec.MemRegion(0, mem.size, mem.host_address, 0)
        both, _n, _b, addr, final = (m.payload for m in backend.requests)
        assert both == codec.MemTable(
            (guest, codec.MemRegion(mem.size, mem.size, view.user_addr, offset))
        )
        assert final == codec.MemTable((codec.MemRegion(0, mem.size, view.user_addr, offset),))
        assert isinstance(addr, codec.VringAddr) and addr.desc == view.user_addr + q.desc_addr
        assert [len(m.fds) for m in backend.requests] == [2, 0, 0, 0, 1]
        del backend.requests[:]
        dev.resume()
        assert backend.names() == QUEUE_START
        assert backend.requests[3].payload == addr
        dev.quiesce()
        del backend.requests[:]
        dev.set_backend_view(None)
        assert backend.names() == ["SET_MEM_TABLE", *moved, "SET_MEM_TABLE"]
        assert backend.requests[-1].payload == codec.MemTable((guest,))
        addr = backend.requests[3].payload
        assert isinstance(addr, codec.VringAddr), addr
        assert addr.desc == mem.host_address + q.desc_addr
        assert dev.alive
    pool.close()


def test_a_view_beside_guest_ram_remaps_only_the_ring_pages(mem: GuestMemory) -> None:
    """Intercept's memory table (`beside_ram`): guest RAM stays where it is (the backend
    writes the data buffers there itself) except the ring pages, which come from the view at
    the same addresses (a buffer the driver keeps on a ring page is written in its device
    buffer, as through the IOMMU of ptmig's own devices). Going in: [guest RAM, the whole view
    above], the ring moved into the view unkicked, then the split table; leaving: the
    transition table again, the ring moved back, [guest RAM]. Every table covers the ring's
    current addresses."""
    pool, offset, view = _pool_view(mem, beside_ram=True)
    dev, backend = _frontend(mem)
    with dev:
        q = DriverQueue(_GuestView(mem), 64, base=0x10000, data_start=0x20000)
        _bring_up(dev, q)
        dev.quiesce()
        del backend.requests[:]
        dev.set_backend_view(view)
        moved = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR"]
        assert backend.names() == ["SET_MEM_TABLE", *moved, "SET_MEM_TABLE"]
        guest = codec.MemRegion(0, mem.size, mem.host_address, 0)
        beside = codec.MemRegion(mem.size, mem.size, view.user_addr, offset)
        table, _n, _b, addr, final = (m.payload for m in backend.requests)
        assert table == codec.MemTable((guest, beside))
        assert isinstance(addr, codec.VringAddr) and addr.desc == view.user_addr + q.desc_addr
        assert addr.used == view.user_addr + q.used_addr
        ring_end = (q.used_addr + 6 + 8 * 64 + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        assert final == codec.MemTable(
            (
                codec.MemRegion(0, 0x10000, mem.host_address, 0),
                codec.MemRegion(
                    0x10000, ring_end - 0x10000, view.user_addr + 0x10000, offset + 0x10000
                ),
                codec.MemRegion(
                    ring_end, mem.size - ring_end, mem.host_address + ring_end, ring_end
                ),
            )
        )
        assert [len(m.fds) for m in backend.requests] == [2, 0, 0, 0, 3]
        dev.resume()
        dev.quiesce()
        del backend.requests[:]
        dev.set_backend_view(None)
        assert backend.names() == ["SET_MEM_TABLE", *moved, "SET_MEM_TABLE"]
        assert backend.requests[0].payload == codec.MemTable((guest, beside))
        addr = backend.requests[3].payload
        assert isinstance(addr, codec.VringAddr), addr
        assert addr.desc == mem.host_address + q.desc_addr
        assert backend.requests[-1].payload == codec.MemTable((guest,))
        assert dev.alive and dev.backend_view is None
    pool.close()


class _BackendSide:
    """The backend's end of the backend channel, taken from SET_BACKEND_REQ_FD; the config the
    scripted backend reports (the test changes it)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.config = bytearray(CONFIG)

    def hook(self, m: codec.Message) -> codec.Payload | bytes | None:
        if m.request == Request.SET_BACKEND_REQ_FD:
            self.sock = socket.socket(fileno=os.dup(m.fds[0]))
        if m.request == Request.GET_CONFIG:
            assert isinstance(m.payload, codec.Config)
            return codec.Config(0, m.payload.size, 0, bytes(self.config[: m.payload.size]))
        return None

    def send(self, request: int, flags: int, body: bytes = b"") -> None:
        assert self.sock is not None
        self.sock.sendall(codec.HEADER.pack(request, flags, len(body)) + body)

    def reply(self) -> tuple[int, int, int]:
        """(request, flags, u64) of the frontend's next reply."""
        assert self.sock is not None
        self.sock.settimeout(5.0)
        data = b""
        while len(data) < codec.HEADER.size + 8:
            chunk = self.sock.recv(64)
            assert chunk, "the frontend closed the backend channel"
            data += chunk
        request, flags, size = codec.HEADER.unpack_from(data)
        assert size == 8
        return request, flags, int.from_bytes(data[12:20], "little")


NEED_REPLY = codec.VERSION | codec.FLAG_NEED_REPLY
REPLY = codec.VERSION | codec.FLAG_REPLY


def test_a_backend_config_change_is_read_again_acked_and_raised_to_the_guest(
    mem: GuestMemory,
) -> None:
    side = _BackendSide()
    dev, backend = _frontend(mem, side.hook)
    with dev:
        q = DriverQueue(_GuestView(mem), 64, base=0x10000, data_start=0x20000)
        _bring_up(dev, q)
        generation = dev.mmio_read(c.REG_CONFIG_GENERATION, 4)
        eventfd.drain(dev.irq_eventfd)
        side.config[0:8] = (16384).to_bytes(8, "little")  # the image grew
        del backend.requests[:]
        side.send(codec.BackendRequest.CONFIG_CHANGE_MSG, NEED_REPLY)
        assert side.reply() == (codec.BackendRequest.CONFIG_CHANGE_MSG, REPLY, 0)
        assert backend.names() == ["GET_CONFIG"]  # read again before the ack
        assert dev.mmio_read(c.REG_CONFIG, 4) == 16384
        assert dev.mmio_read(c.REG_CONFIG_GENERATION, 4) == generation + 1
        assert dev.mmio_read(c.REG_INTERRUPT_STATUS, 4) & c.INTERRUPT_CONFIG_CHANGE
        assert dev.wait_interrupt(5.0), "the guest was not interrupted"
        assert dev.alive


def test_backend_requests_ptmig_did_not_negotiate_are_refused_and_the_channel_stays_up(
    mem: GuestMemory,
) -> None:
    side = _BackendSide()
    dev, _backend = _frontend(mem, side.hook)
    with dev:
        iotlb = codec.IotlbMsg(0, 0, 0, 0, 0).pack()
        side.send(codec.BackendRequest.IOTLB_MSG, NEED_REPLY, iotlb)
        assert side.reply() == (codec.BackendRequest.IOTLB_MSG, REPLY, 1)
        side.send(77, NEED_REPLY, b"\0" * 16)  # a request code this frontend does not know
        assert side.reply() == (77, REPLY, 1)
        side.send(77, codec.VERSION)  # no reply asked for: none comes ...
        side.send(codec.BackendRequest.CONFIG_CHANGE_MSG, NEED_REPLY)
        # ... so the next reply is the config change's
        assert side.reply() == (codec.BackendRequest.CONFIG_CHANGE_MSG, REPLY, 0)
        assert dev.alive


def test_a_malformed_backend_request_breaks_the_device_not_the_vmm(mem: GuestMemory) -> None:
    side = _BackendSide()
    dev, _backend = _frontend(mem, side.hook)
    with dev:
        events: list[DeviceEvent] = []
        seen = threading.Event()

        def record(ev: DeviceEvent) -> None:
            events.append(ev)
            seen.set()

        dev.on_event(record)
        side.send(codec.BackendRequest.CONFIG_CHANGE_MSG, NEED_REPLY, b"\0" * 8)  # no payload
        assert seen.wait(5) and events[0].name == "gone"
        assert "backend channel" in events[0].data["reason"], events[0].data
        assert dev.mmio_read(c.REG_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET
