"""A destination under attack by peers that know the key: whatever frames they send — every
frame type, deep nesting and type confusion in the JSON parts, state its devices reject — each
attempt ends in a clean refusal (an Abort with the reason where the stream still works, a
rejection logged and reported), and the destination is still waiting for a valid source.

The destination here is the real `Incoming` on a machine without KVM (`FakeMachine`: guest RAM
in a bytearray, devices that record or refuse the state they are given)."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptmig.devices.control import DeviceState
from ptmig.devices.handle import DeviceCommandError
from ptmig.devices.virtio.mmio import MmioState, QueueRegisters
from ptmig.devices.virtio.queue import QueueState
from ptmig.memory import GuestMemory
from ptmig.migration import (
    NEED_DATA,
    Abort,
    Complete,
    Connection,
    DeviceStates,
    Role,
    RoundEnd,
    RoundStart,
    VcpuStates,
    frames,
    hello,
    transport,
)
from ptmig.migration.destination import Incoming
from ptmig.migration.events import RemoteProtocolError, RunKind, make_runs
from ptmig.migration.frames import FrameType
from ptmig.migration.protocol import ConnectionClosed
from ptmig.vm import RunState

KEY = b"fuzz-key-" * 4
PAGES = 64
FP = {"memory": PAGES * 4096, "vcpus": 1, "devices": [{"index": 0, "kind": "blk", "id": "d0"}]}


class FakeMemory:
    def __init__(self) -> None:
        self.buf = bytearray(PAGES * 4096)
        self.view = memoryview(self.buf)
        self.npages, self.size = PAGES, len(self.buf)

    def punch_zero(self, start: int, n: int) -> None:
        self.view[start * 4096 : (start + n) * 4096] = bytes(n * 4096)

    def holes(self) -> list[tuple[int, int]]:
        return []  # one region from GPA 0: no gap below 4 GiB

    def allocated(self) -> np.ndarray:
        return np.ones(PAGES, dtype=bool)  # a bytearray: every page may hold data


class FakeVm:
    def __init__(self) -> None:
        self.memory = FakeMemory()
        self.vcpus: list[Any] = []
        self.state = RunState.PRELAUNCH

    def _set_state(self, state: RunState) -> None:
        self.state = state

    def restore_vcpus(self, states: list[Any]) -> None:
        pass

    def vcpu_thread_ids(self) -> list[int]:
        return []  # no vCPU threads: the whole process's CPU is the migration's


class FakeHandle:
    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse

    def set_state(self, state: dict[str, Any]) -> None:
        if self.refuse:
            raise DeviceCommandError("set_state: queue 0 size 3 is not a power of two")


class FakeDevice:
    def __init__(self, refuse: bool) -> None:
        self.id, self.kind, self.handle = "d0", "blk", FakeHandle(refuse)


class FakeQmp:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((name, data or {}))


class FakeConfig:
    def compat_fingerprint(self) -> dict[str, Any]:
        return FP


class FakeMachine:
    def __init__(self, refuse_state: bool = False) -> None:
        self.vm = FakeVm()
        self.cfg = FakeConfig()
        self.devices = [FakeDevice(refuse_state)]
        self.qmp = FakeQmp()


class Destination:
    """`Incoming.receive` in a thread, on a free port, under KEY."""

    def __init__(
        self, machine: FakeMachine, timeout: float | None = None, prefault: bool = False
    ) -> None:
        self.m = machine
        self.incoming = Incoming(
            machine,  # type: ignore[arg-type]
            "tcp:127.0.0.1:0",
            psk=KEY,
            prefault=prefault,
            incoming_timeout=timeout,
        )
        self.port = self.incoming.listener.port
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.incoming.receive()
        except BaseException as e:  # noqa: BLE001 - the test reports it
            self.error = e

    def attempt(self, stream: bytes, *, read_reply: bool = True) -> list[Any]:
        """Send `stream` (preamble included) on a new authenticated main stream, end it, and
        return the destination's events until it closes; waits for the rejection."""
        before = len(self.incoming.rejected)
        ch = transport.connect("127.0.0.1", self.port, psk=KEY, inactivity_timeout=10)
        conn = Connection(Role.SOURCE, guest_pages=PAGES)
        conn._preamble_sent = True  # the stream is the caller's, preamble and all
        replies: list[Any] = []
        try:
            ch.sendall(stream)
            socket_shutdown_write(ch)
            while read_reply and (data := ch.recv()):
                replies.append(data)
        except transport.TransportError:
            pass
        finally:
            ch.close()
        deadline = time.monotonic() + 20
        while len(self.incoming.rejected) == before:
            assert self.thread.is_alive(), f"the destination ended: {self.error!r}"
            assert time.monotonic() < deadline, "the attempt was never refused"
            time.sleep(0.005)
        assert self.thread.is_alive() and self.m.vm.state is RunState.INMIGRATE
        return replies

    def stop(self) -> None:
        self.incoming.listener.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.thread.join(10)
        assert not self.thread.is_alive()


def socket_shutdown_write(ch: transport.Channel) -> None:
    socket.socket.shutdown(ch.sock, socket.SHUT_WR)


def frame(ftype: FrameType, metadata: bytes) -> bytes:
    """A frame with a correct header and crc: it reaches the decoder and the destination."""
    lo, hi = frames.METADATA_LIMITS[ftype]
    if not lo <= len(metadata) <= hi:
        metadata = (metadata + bytes(lo))[: max(lo, min(len(metadata), hi))]
    return frames.encode_frame(ftype, metadata)


def hello_frame(doc: Any) -> bytes:
    return frame(
        FrameType.HELLO, frames._U32.pack(frames.PROTOCOL_VERSION) + json.dumps(doc).encode()
    )


VALID_HELLO = hello_frame({"fingerprint": FP, "capabilities": []})
# Round 0 with no pages, then the (empty) vCPU states of the fake VM: DEVICE_STATES may follow.
TO_DEVICE_STATES = (
    VALID_HELLO
    + frames.encode_event(RoundStart(0, 0))
    + frames.encode_event(RoundEnd(0))
    + frames.encode_event(VcpuStates(b""))
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "fingerprint",
                    "capabilities",
                    "version",
                    "devices",
                    "id",
                    "state",
                    "source",
                    "inflight",
                    "queues",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@st.composite
def json_body(draw: st.DrawFn) -> bytes:
    """JSON that is nested too deep, type-confused, or arbitrary."""
    kind = draw(st.sampled_from(["deep", "confused", "any", "bytes"]))
    if kind == "deep":
        depth = draw(st.integers(33, 20_000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        return (opener * depth).encode()
    if kind == "confused":
        return json.dumps(
            draw(
                st.sampled_from(
                    [
                        {"fingerprint": [], "capabilities": []},
                        {"fingerprint": FP, "capabilities": [1, {"x": 2}]},
                        {"fingerprint": FP, "capabilities": "x-data-channels=99:zz"},
                        {"version": 1, "devices": [{"id": "d0", "state": "not an object"}]},
                        {
                            "version": 1,
                            "devices": [
                                {
                                    "id": "d0",
                                    "state": {},
                                    "source": "shadow",
                                    "inflight": {"0": "x"},
                                }
                            ],
                        },
                        {
                            "version": 1,
                            "devices": [
                                {
                                    "id": "d0",
                                    "state": {"queues": [{"size": "8"}]},
                                    "source": "shadow",
                                    "inflight": {},
                                }
                            ],
                        },
                        {"version": "1", "devices": {}},
                        [1, 2, 3],
                    ]
                )
            )
        ).encode()
    if kind == "any":
        return json.dumps(draw(json_values)).encode()
    return draw(st.binary(max_size=200))


@st.composite
def hostile_stream(draw: st.DrawFn) -> bytes:
    """A plausible start (nothing, or a valid Hello and a round) and then frames of every type
    with hostile metadata, or raw bytes."""
    out = frames.MAGIC + draw(
        st.sampled_from(
            [
                b"",
                VALID_HELLO,
                VALID_HELLO + frames.encode_event(RoundStart(0, PAGES)),
                TO_DEVICE_STATES,
            ]
        )
    )
    for _ in range(draw(st.integers(1, 3))):
        ftype = draw(st.sampled_from(list(FrameType)))
        if ftype is FrameType.HELLO:
            meta = frames._U32.pack(draw(st.sampled_from([1, 0, 2**32 - 1]))) + draw(json_body())
        elif ftype is FrameType.DEVICE_STATES:
            meta = draw(json_body())
        else:
            meta = draw(st.binary(max_size=64))
        out += frame(ftype, meta) if draw(st.integers(0, 9)) else draw(st.binary(max_size=40))
    return out


@pytest.fixture(scope="module")
def destination() -> Any:
    d = Destination(FakeMachine())
    yield d
    d.stop()


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(stream=hostile_stream())
def test_hostile_streams_are_refused_and_the_destination_waits_on(
    destination: Destination, stream: bytes
) -> None:
    destination.attempt(stream)
    name, data = destination.m.qmp.events[-1]
    assert name == "X_MIGRATION_REJECTED" and data["reason"], data
    assert "Traceback" not in data["reason"]


def abort_reason(replies: list[bytes]) -> str:
    conn = Connection(Role.SOURCE, guest_pages=PAGES)
    conn.send(hello(FP))
    conn.receive_data(b"".join(replies))
    conn.receive_data(b"")
    reasons = []
    try:
        while not isinstance(ev := conn.next_event(), type(NEED_DATA) | ConnectionClosed):
            if isinstance(ev, Abort):
                reasons.append(ev.reason)
    except RemoteProtocolError:
        pass
    return " ".join(reasons)


def blk_state(**queue: Any) -> dict[str, Any]:
    """A well-formed state of a blk device with one queue (`queue` overrides its fields)."""
    mmio = MmioState(device_id=2, device_features=1, queues=[QueueRegisters(num=8, ready=True)])
    state = DeviceState("blk", mmio, {0: QueueState(8, 0x1000, 0x2000, 0x3000, 3, 3)}).to_json()
    state["queues"][0].update(queue)
    return state


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"[" * 100_000, "nests 100000 levels deep", id="deeply-nested"),
        pytest.param(
            json.dumps(
                {
                    "version": 1,
                    "devices": [{"id": "d0", "kind": "disk", "source": "device", "state": 3}],
                }
            ).encode(),
            "device d0: device state must be an object, got int",
            id="state-of-the-wrong-type",
        ),
        pytest.param(
            json.dumps(
                {
                    "version": 1,
                    "devices": [
                        {
                            "id": "d0",
                            "kind": "disk",
                            "source": "shadow",
                            "state": blk_state(),
                            "inflight": ["x"],
                        }
                    ],
                }
            ).encode(),
            "device d0: 'inflight' must be an object, got list",
            id="shadow-entry-of-the-wrong-type",
        ),
    ],
)
def test_device_states_refused_with_the_reason_sent_to_the_source(
    destination: Destination, body: bytes, message: str
) -> None:
    start = frames.MAGIC + TO_DEVICE_STATES
    replies = destination.attempt(start + frame(FrameType.DEVICE_STATES, body))
    assert message in abort_reason(replies)
    assert message in destination.incoming.rejected[-1]


def test_a_deeply_nested_hello_is_refused_with_a_reason(destination: Destination) -> None:
    replies = destination.attempt(
        frames.MAGIC
        + frame(FrameType.HELLO, frames._U32.pack(frames.PROTOCOL_VERSION) + b"{" * 50_000)
    )
    assert "nests 50000 levels deep" in abort_reason(replies)


def test_after_every_refusal_a_valid_source_still_migrates(destination: Destination) -> None:
    """Last: a well-behaved source, after all the above, is accepted (Hello acknowledged)."""
    ch = transport.connect("127.0.0.1", destination.port, psk=KEY)
    conn = Connection(Role.SOURCE, guest_pages=PAGES)
    transport.send_event(ch, conn, hello(FP))
    ack = transport.recv_event(ch, conn)
    assert getattr(ack, "accepted", False), ack
    transport.send_event(ch, conn, Abort("test over"))
    ch.close()


def device_states(entry: dict[str, Any]) -> bytes:
    return frames.encode_event(
        DeviceStates(json.dumps({"version": 1, "devices": [{"id": "d0", **entry}]}).encode())
    )


@pytest.mark.parametrize(
    ("refuse", "entry", "message"),
    [
        pytest.param(
            True,
            {"kind": "disk", "source": "device", "state": blk_state()},
            "device d0 rejected the migrated state: DeviceCommandError",
            id="device-refuses",
        ),
        pytest.param(
            False,
            {"kind": "disk", "source": "device", "state": {"queues": []}},
            "device d0: device state version None is not 1",
            id="state-shape",
        ),
        pytest.param(
            False,
            {
                "kind": "disk",
                "state": blk_state(size="8"),
                "source": "shadow",
                "inflight": {"0": [{"head": 0}]},
            },
            "device d0: 'size' must be an integer",
            id="shadow-entry-types",
        ),
        pytest.param(
            False,
            {
                "kind": "disk",
                "state": blk_state(),
                "source": "shadow",
                "inflight": {"0": [{"head": 0}]},
            },
            "device d0 queue 0 in-flight request 0: 'avail_index' must be an integer",
            id="shadow-inflight-types",
        ),
    ],
)
def test_state_the_device_rejects_at_the_switchover_is_a_clean_refusal(
    refuse: bool, entry: dict[str, Any], message: str
) -> None:
    d = Destination(FakeMachine(refuse_state=refuse))
    try:
        replies = d.attempt(
            frames.MAGIC + TO_DEVICE_STATES + device_states(entry) + frames.encode_event(Complete())
        )
        assert message in abort_reason(replies)
        assert message in d.incoming.rejected[-1]
    finally:
        d.stop()


def test_the_destination_waits_for_a_valid_source_until_its_own_timeout() -> None:
    d = Destination(FakeMachine(), timeout=3.0)
    with socket.create_connection(("127.0.0.1", d.port)) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 8)  # not the key's handshake
        d.thread.join(1.0)
        assert d.thread.is_alive()  # refused, still waiting
    d.thread.join(10)
    assert not d.thread.is_alive()
    assert isinstance(d.error, transport.TransportError), d.error
    assert "no valid incoming migration within 3.0 s (1 refused)" in str(d.error)
    assert len(d.incoming.rejected) == 1 and "PSK" in d.incoming.rejected[0]


def test_a_failure_of_its_own_before_the_commit_reaches_the_source_in_an_abort() -> None:
    """Not a refusal but a failure of the destination's own (here its vCPU restore breaks after
    Complete): it has not committed, so it says so, and a source in doubt may resume."""
    m = FakeMachine()

    def broken_restore(states: list[Any]) -> None:
        raise RuntimeError("injected: the vCPU restore broke")

    m.vm.restore_vcpus = broken_restore  # type: ignore[method-assign]
    d = Destination(m)
    ch = transport.connect("127.0.0.1", d.port, psk=KEY, inactivity_timeout=10)
    replies: list[bytes] = []
    try:
        ch.sendall(
            frames.MAGIC
            + TO_DEVICE_STATES
            + device_states({"kind": "disk", "source": "device", "state": blk_state()})
            + frames.encode_event(Complete())
        )
        while data := ch.recv():
            replies.append(data)
    finally:
        ch.close()
    d.thread.join(10)
    assert isinstance(d.error, RuntimeError), d.error  # not swallowed: the VMM exits 125
    reason = abort_reason(replies)
    assert "the destination failed: RuntimeError: injected" in reason, reason
    assert "did not commit and will not run the guest" in reason, reason
    assert d.incoming.ownership.owner.value == "source"


def page_runs(starts: list[int], counts: list[int], kind: RunKind, payload: bytes = b"") -> bytes:
    runs = make_runs(np.array(starts), np.array(counts), kind)
    return frames.encode_page_runs(runs, None) + payload


def test_zero_runs_punch_only_the_pages_that_may_hold_data_across_attempts() -> None:
    """Prefaulted pages that were never written are zero already: a zero run leaves them in
    place (punching would free them for the guest to fault back in). A page that a DATA run
    wrote -- here in an attempt that fails after it -- is punched back to zero by the next
    attempt's zero run."""
    m = FakeMachine()
    mem = GuestMemory(PAGES * 4096)
    m.vm.memory = mem  # type: ignore[assignment]
    d = Destination(m, prefault=True)
    try:
        deadline = time.monotonic() + 20
        while m.vm.state is not RunState.INMIGRATE:  # RAM prepared
            assert time.monotonic() < deadline, "the destination never got ready"
            time.sleep(0.005)
        assert mem.allocated().all()  # prefaulted: every page allocated, all zero
        round0 = VALID_HELLO + frames.encode_event(RoundStart(0, PAGES))
        written = page_runs([3], [2], RunKind.DATA, b"\xab" * 8192)
        d.attempt(frames.MAGIC + round0 + written + frames.encode_event(Abort("test")))
        assert bytes(mem.view[3 * 4096 : 5 * 4096]) == b"\xab" * 8192
        zero_all = page_runs([0], [PAGES], RunKind.ZERO)
        d.attempt(frames.MAGIC + round0 + zero_all + frames.encode_event(Abort("test")))
        allocated = mem.allocated()  # (before reading: reading a hole allocates it)
        assert not allocated[3:5].any()  # punched: holes again
        assert allocated[:3].all() and allocated[5:].all()  # never written: left in place
        assert not any(mem.view)  # the failed attempt's pages are zero again
    finally:
        d.stop()
        mem.close()


def test_a_batch_of_many_runs_lands_page_for_page() -> None:
    """A batch of scattered runs larger than a header's read (received whole, then scattered
    into guest RAM): every page holds its own bytes, the run the header's read cut included."""
    m = FakeMachine()
    mem = GuestMemory(1024 * 4096)  # room for a batch of several header reads
    m.vm.memory = mem  # type: ignore[assignment]
    d = Destination(m)
    try:
        counts = [1, 37, 2, 50, 3, 64, 1, 40, 9, 30]  # 237 pages: ~15 reads of 64 KiB
        starts = [10 + 100 * i for i in range(len(counts))]
        npages = sum(counts)
        payload = b"".join(i.to_bytes(2, "little") * 2048 for i in range(npages))
        round0 = VALID_HELLO + frames.encode_event(RoundStart(0, npages))
        batch = page_runs(starts, counts, RunKind.DATA, payload)
        d.attempt(frames.MAGIC + round0 + batch + frames.encode_event(Abort("test")))
        i = 0
        for start, n in zip(starts, counts, strict=True):
            for page in range(start, start + n):
                got = bytes(mem.view[page * 4096 : (page + 1) * 4096])
                assert got == i.to_bytes(2, "little") * 2048, page
                i += 1
        assert not any(mem.view[: 10 * 4096]) and not any(mem.view[11 * 4096 : 110 * 4096])
    finally:
        d.stop()
        mem.close()
