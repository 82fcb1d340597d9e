"""QMP server: protocol conformance driven by the real ``qemu.qmp`` client and by raw bytes.

The VM state here is a small real run-state model (running/paused, stop/cont emitting STOP and
RESUME) so the thing under test is the server and the protocol, not a mock of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from ptmig.qmp.server import MAX_OUTPUT_BACKLOG, QmpServer
from ptmig.qmp.session import (
    ErrorClass,
    QmpError,
    RunStatus,
    check_arguments,
    query_status_reply,
    version_info,
)
from ptmig.qmp.stream import InputError, JsonSplitter

pytestmark = pytest.mark.timeout(60)


class RunState:
    """The run state of a pretend VM, with the QMP commands a VMM registers for it."""

    def __init__(self, server: QmpServer) -> None:
        self.server = server
        self.status = RunStatus.RUNNING
        self.lock = threading.Lock()

    def query_status(self) -> dict[str, Any]:
        with self.lock:
            return query_status_reply(self.status)

    def stop(self) -> None:
        with self.lock:
            if self.status is RunStatus.RUNNING:
                self.status = RunStatus.PAUSED
                self.server.emit("STOP")

    def cont(self) -> None:
        with self.lock:
            if self.status is RunStatus.INMIGRATE:
                raise QmpError(
                    ErrorClass.GENERIC_ERROR, "guest is waiting for an incoming migration"
                )
            if self.status is not RunStatus.RUNNING:
                self.status = RunStatus.RUNNING
                self.server.emit("RESUME")

    def register(self) -> None:
        self.server.register("query-status", self.query_status)
        self.server.register("stop", self.stop)
        self.server.register("cont", self.cont)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "qmp.sock")


@pytest.fixture
def server(sock_path: str) -> Iterator[QmpServer]:
    srv = QmpServer(sock_path)
    RunState(srv).register()
    srv.register(
        "echo", lambda **kw: kw, args_schema={"text": str, "*count": int, "*dash-name": bool}
    )
    srv.register("boom", lambda: 1 / 0)
    srv.register("not-json", lambda: {"x": object()})
    srv.register("fail", _fail, args_schema={"*cls": str})
    srv.start()
    yield srv
    srv.close()


def _fail(cls: str = "DeviceNotActive") -> None:
    raise QmpError(cls, "no such thing: 'x'")


class Raw:
    """A raw-bytes QMP client."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv(self) -> dict[str, Any]:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"server closed; unparsed {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        assert line.isascii()
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def execute(self, cmd: str, arguments: dict[str, Any] | None = None, **extra: Any) -> Any:
        msg: dict[str, Any] = {"execute": cmd, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send(json.dumps(msg))
        return self.recv()

    def negotiate(self) -> dict[str, Any]:
        greeting = self.recv()
        assert self.execute("qmp_capabilities") == {"return": {}}
        return greeting

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server: QmpServer) -> Iterator[Raw]:
    client = Raw(server.path)
    yield client
    client.close()


async def execute(client: QMPClient, cmd: str, arguments: dict[str, Any] | None = None) -> Any:
    return await client.execute(cmd, arguments)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


# ----------------------------------------------------------------------------- qemu.qmp client


def test_qemu_qmp_client_greeting_and_builtins(server: QmpServer) -> None:
    async def main() -> None:
        client = QMPClient("test")
        await client.connect(server.path)
        try:
            assert client.greeting is not None
            assert client.greeting.QMP.capabilities == []
            assert client.greeting.QMP.version == version_info()
            version = await execute(client, "query-version")
            assert version == {
                "qemu": {"major": 0, "minor": 1, "micro": 0},
                "package": "ptmig 0.1.0",
            }
            names = {c["name"] for c in await execute(client, "query-commands")}
            assert {
                "qmp_capabilities",
                "query-commands",
                "query-version",
                "query-status",
                "stop",
                "cont",
                "echo",
            } <= names
        finally:
            await client.disconnect()

    run(main())


def test_qemu_qmp_client_stop_cont_with_events(server: QmpServer) -> None:
    async def main() -> None:
        client = QMPClient("test")
        await client.connect(server.path)
        try:
            with client.listener() as listener:
                assert await execute(client, "query-status") == {
                    "status": "running",
                    "running": True,
                    "singlestep": False,
                }
                before = time.time()
                assert await execute(client, "stop") == {}
                event: Any = await listener.get()
                assert event["event"] == "STOP" and "data" not in event
                ts = event["timestamp"]
                assert set(ts) == {"seconds", "microseconds"}
                assert 0 <= ts["microseconds"] < 1_000_000
                assert abs(ts["seconds"] + ts["microseconds"] / 1e6 - before) < 5
                status = await execute(client, "query-status")
                assert status == {"status": "paused", "running": False, "singlestep": False}
                await execute(client, "cont")
                assert (await listener.get())["event"] == "RESUME"
                assert (await execute(client, "query-status"))["running"] is True
        finally:
            await client.disconnect()

    run(main())


def test_qemu_qmp_client_sees_error_classes(server: QmpServer) -> None:
    async def main() -> None:
        client = QMPClient("test")
        await client.connect(server.path)
        try:
            with pytest.raises(ExecuteError) as info:
                await execute(client, "no-such-command")
            assert info.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as info:
                await execute(client, "fail")
            assert info.value.error_class == "DeviceNotActive"
            assert str(info.value) == "no such thing: 'x'"
            with pytest.raises(ExecuteError) as info:
                await execute(client, "echo", {"text": 5})
            assert info.value.error_class == "GenericError"
            assert "'text'" in str(info.value) and "string" in str(info.value)
            # and the session is still alive
            assert await execute(client, "echo", {"text": "hi", "count": 2}) == {
                "text": "hi",
                "count": 2,
            }
        finally:
            await client.disconnect()

    run(main())


def test_dashed_argument_names_reach_handlers_as_underscores(raw: Raw) -> None:
    raw.negotiate()
    reply = raw.execute("echo", {"text": "a", "dash-name": True})
    assert reply == {"return": {"text": "a", "dash_name": True}}


# ----------------------------------------------------------------------------- raw protocol


def test_greeting_is_sent_first_and_ends_with_crlf(server: QmpServer) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(server.path)
    data = b""
    while not data.endswith(b"\r\n"):
        data += s.recv(4096)
    s.close()
    greeting = json.loads(data)
    assert greeting == {"QMP": {"version": version_info(), "capabilities": []}}


@pytest.mark.parametrize("msg_id", [1, "abc", None, {"a": [1, 2]}, [3], 1.5, True])
def test_id_is_echoed_verbatim(raw: Raw, msg_id: Any) -> None:
    raw.negotiate()
    assert raw.execute("query-status", id=msg_id)["id"] == msg_id
    assert raw.execute("nope", id=msg_id) == {
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
        "id": msg_id,
    }
    assert raw.execute("echo", {"bad": 1}, id=msg_id)["id"] == msg_id


def test_reply_without_id_has_no_id(raw: Raw) -> None:
    raw.negotiate()
    assert "id" not in raw.execute("query-status")


def test_commands_before_negotiation_are_refused(raw: Raw) -> None:
    raw.recv()
    assert raw.execute("query-status", id=7) == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        },
        "id": 7,
    }
    assert raw.execute("qmp_capabilities", id=8) == {"return": {}, "id": 8}
    assert raw.execute("query-status")["return"]["status"] == "running"


def test_second_negotiation_is_refused(raw: Raw) -> None:
    raw.negotiate()
    reply = raw.execute("qmp_capabilities")
    assert reply["error"]["class"] == "CommandNotFound"
    assert "already complete" in reply["error"]["desc"]


def test_unoffered_capability_is_refused(raw: Raw) -> None:
    raw.recv()
    reply = raw.execute("qmp_capabilities", {"enable": ["oob"]})
    assert reply == {"error": {"class": "GenericError", "desc": "Capability 'oob' not available"}}
    assert raw.execute("qmp_capabilities", {"enable": []}) == {"return": {}}


BAD_INPUT = [
    (b'{"execute": }', None, "JSON parse error"),
    (b"[1, 2]", None, "QMP input must be a JSON object"),
    (b'"stop"', None, "QMP input must be a JSON object"),
    (b"42\n", None, "QMP input must be a JSON object"),
    (b'{"id": 3}', 3, "QMP input lacks member 'execute'"),
    (b'{"execute": 1, "id": 3}', 3, "QMP input member 'execute' must be a string"),
    (
        b'{"execute": "stop", "arguments": [], "id": 3}',
        3,
        "QMP input member 'arguments' must be an object",
    ),
    (b'{"execute": "stop", "extra": 1, "id": 3}', 3, "QMP input member 'extra' is unexpected"),
    (b'{"exec-oob": "stop", "id": 3}', 3, "Out-of-band execution is not supported"),
    (b'{"execute": "stop", "arguments": {"x": NaN}}', None, "JSON parse error"),
    (b'{"execute": "\xc3\x28"}', None, "invalid UTF-8"),
    (b"]", None, "unexpected ']'"),
    (b"{" * 5000 + b"}" * 5000, None, "JSON parse error"),
]


@pytest.mark.parametrize("data, msg_id, desc", BAD_INPUT)
def test_bad_input_gets_generic_error_and_session_continues(
    raw: Raw, server: QmpServer, data: bytes, msg_id: Any, desc: str
) -> None:
    raw.negotiate()
    raw.send(data)
    reply = raw.recv()
    assert reply["error"]["class"] == "GenericError"
    assert desc in reply["error"]["desc"], reply
    assert reply.get("id") == msg_id and (("id" in reply) == (msg_id is not None))
    assert raw.execute("query-status", id="after")["id"] == "after"


def test_control_byte_resets_a_half_sent_request(raw: Raw) -> None:
    raw.negotiate()
    raw.send(b'{"execute": "st')  # incomplete...
    raw.send(b"\x01")  # ...then the spec's "get back to a known-good state" byte
    assert "invalid byte 0x01" in raw.recv()["error"]["desc"]
    assert raw.execute("query-status", id=1)["id"] == 1


@pytest.mark.parametrize("bad", [b"\xff", b"\xfe", b"\x01", b"\x1f", b"\x00"])
def test_an_invalid_byte_mid_string_costs_one_error_and_the_next_command_is_answered(
    raw: Raw, bad: bytes
) -> None:
    """As QEMU's lexer recovers: the rest of the broken command (`op"}`) is skipped, not read
    as a string that would swallow the next command; one error, then the next reply."""
    raw.negotiate()
    raw.send(b'{"execute": "st' + bad + b'op", "id": 5}{"execute": "query-status", "id": "next"}')
    assert f"invalid byte 0x{bad[0]:02x}" in raw.recv()["error"]["desc"]
    assert raw.recv()["id"] == "next"
    # A nested object after the bad byte is read as a text of its own (QEMU does the same):
    # errors for the pieces, and still the next command is answered.
    raw.send(
        b'{"execute": "st' + bad + b'op", "arguments": {"a": [1]}}{"execute": '
        b'"query-status", "id": "later"}'
    )
    replies = [raw.recv()]
    while replies[-1].get("id") != "later":
        assert "error" in replies[-1] and len(replies) < 5, replies
        replies.append(raw.recv())
    # The spec's recovery byte still works on its own, then carry on.
    raw.send(b"\x01")
    assert "invalid byte 0x01" in raw.recv()["error"]["desc"]
    assert raw.execute("query-status", id="after")["id"] == "after"


def test_invalid_utf8_inside_a_string_is_one_error(raw: Raw) -> None:
    raw.negotiate()
    raw.send(b'{"execute": "qu\xc3\x28ery-status"}{"execute": "query-status", "id": 2}')
    assert "invalid UTF-8" in raw.recv()["error"]["desc"]
    assert raw.recv()["id"] == 2


def test_requests_split_and_batched_arbitrarily(raw: Raw) -> None:
    raw.negotiate()
    stream = b"".join(
        json.dumps({"execute": "echo", "arguments": {"text": f'{{{i}"}}'}, "id": i}).encode()
        for i in range(20)
    )
    for k in range(0, len(stream), 7):  # 7-byte writes, no separators between requests
        raw.send(stream[k : k + 7])
    for i in range(20):
        assert raw.recv() == {"return": {"text": f'{{{i}"}}'}, "id": i}


def test_handler_crash_is_a_generic_error(raw: Raw) -> None:
    raw.negotiate()
    reply = raw.execute("boom", id=1)
    assert reply["error"]["class"] == "GenericError"
    assert "ZeroDivisionError" in reply["error"]["desc"] and reply["id"] == 1
    reply = raw.execute("not-json", id=2)
    assert reply["error"]["class"] == "GenericError" and "not JSON" in reply["error"]["desc"]
    assert raw.execute("query-status", id=3)["return"]["running"] is True


def test_argument_errors_are_reported_before_the_handler_runs(raw: Raw) -> None:
    raw.negotiate()
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "Parameter 'text' is missing"),
        ({"text": "a", "zzz": 1}, "Parameter 'zzz' is unexpected"),
        ({"text": "a", "count": "2"}, "Invalid parameter type for 'count', expected: integer"),
        ({"text": "a", "count": True}, "expected: integer (got true)"),
    ]
    for arguments, desc in cases:
        reply = raw.execute("echo", arguments)
        assert reply["error"]["class"] == "GenericError"
        assert desc in reply["error"]["desc"], reply
    assert raw.execute("stop", {"now": True})["error"]["desc"] == "Parameter 'now' is unexpected"
    assert raw.execute("query-status")["return"]["status"] == "running"  # stop did not run


def test_oversize_request_disconnects_only_that_client(sock_path: str) -> None:
    with QmpServer(sock_path, max_message=4096) as srv:
        srv.register("ping", lambda: "pong")
        good, bad = Raw(srv.path), Raw(srv.path)
        good.negotiate()
        bad.negotiate()
        bad.send(b'{"execute": "ping", "arguments": {"x": "' + b"a" * 8192)
        reply = bad.recv()
        assert reply["error"]["class"] == "GenericError"
        assert "exceeds 4096 bytes" in reply["error"]["desc"]
        assert bad.at_eof()
        assert good.execute("ping") == {"return": "pong"}
        good.close()
        bad.close()


def test_events_only_reach_negotiated_clients(server: QmpServer) -> None:
    negotiated, fresh = Raw(server.path), Raw(server.path)
    negotiated.negotiate()
    fresh.recv()  # greeting only
    server.emit("SHUTDOWN", {"guest": True, "reason": "host-qmp-quit"})
    event = negotiated.recv()
    assert event["event"] == "SHUTDOWN"
    assert event["data"] == {"guest": True, "reason": "host-qmp-quit"}
    # the fresh client's next message is its reply, not the event
    assert fresh.execute("qmp_capabilities", id=1) == {"return": {}, "id": 1}
    assert fresh.execute("query-status", id=2)["id"] == 2
    negotiated.close()
    fresh.close()


def test_events_from_many_threads_all_arrive_to_every_client(server: QmpServer) -> None:
    clients = [Raw(server.path) for _ in range(3)]
    for c in clients:
        c.negotiate()
    threads, per_thread = 8, 50

    def burst(t: int) -> None:
        for i in range(per_thread):
            server.emit("TICK", {"t": t, "i": i})

    workers = [threading.Thread(target=burst, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for c in clients:
        got = [c.recv()["data"] for _ in range(threads * per_thread)]
        for t in range(threads):  # each thread's events arrive in the order it sent them
            assert [d["i"] for d in got if d["t"] == t] == list(range(per_thread))
        c.close()


def test_slow_handler_does_not_stall_other_clients(server: QmpServer) -> None:
    release, entered = threading.Event(), threading.Event()

    def slow() -> str:
        entered.set()
        assert release.wait(20)
        return "done"

    server.register("slow", slow)
    a, b = Raw(server.path), Raw(server.path)
    a.negotiate()
    b.negotiate()
    a.send(json.dumps({"execute": "slow", "id": "a"}))
    assert entered.wait(10)
    t0 = time.monotonic()
    assert b.execute("query-status", id="b")["id"] == "b"
    server.emit("WHILE_SLOW")
    assert b.recv()["event"] == "WHILE_SLOW"
    assert time.monotonic() - t0 < 5
    release.set()
    # a was negotiated too: it gets the event (emitted while its command ran), then its reply
    assert a.recv()["event"] == "WHILE_SLOW"
    assert a.recv() == {"return": "done", "id": "a"}
    a.close()
    b.close()


def test_commands_of_one_client_are_answered_in_order(server: QmpServer) -> None:
    gate = threading.Event()
    server.register("wait-gate", lambda: gate.wait(20) and "gate")
    c = Raw(server.path)
    c.negotiate()
    c.send(
        json.dumps({"execute": "wait-gate", "id": 1})
        + json.dumps({"execute": "query-status", "id": 2})
    )
    time.sleep(0.2)
    gate.set()
    assert c.recv() == {"return": "gate", "id": 1}
    assert c.recv()["id"] == 2
    c.close()


def test_a_client_that_stops_reading_is_dropped_and_others_are_served(
    server: QmpServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Replies of 1 MiB to a client that never reads: once more than the backlog cap (plus what
    # the kernel's socket buffer holds) is unsent, the server drops that client only.
    reply_size = 1 << 20
    server.register("big", lambda: "x" * reply_size)
    hog, other = Raw(server.path), Raw(server.path)
    hog.negotiate()
    other.negotiate()
    n = 2 * MAX_OUTPUT_BACKLOG // reply_size
    with caplog.at_level(logging.WARNING, logger="ptmig.qmp.server"):
        hog.send("".join(json.dumps({"execute": "big", "id": i}) for i in range(n)))
        assert other.execute("query-status", id="o")["id"] == "o"
        # the hog reads nothing until the server has given up on it (reading while it sends
        # would keep its backlog under the cap, and every reply would arrive)
        deadline = time.monotonic() + 30
        while not any("is not reading" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the server never dropped a client not reading"
            time.sleep(0.01)
    replies = 0
    with pytest.raises((EOFError, ConnectionResetError)):
        while True:
            assert hog.recv() == {"return": "x" * reply_size, "id": replies}
            replies += 1
    assert replies < n
    assert other.execute("query-status", id="o2")["id"] == "o2"
    hog.close()
    other.close()


def test_clients_that_come_and_go_leave_the_server_serving(
    server: QmpServer,
) -> None:
    for i in range(50):
        c = Raw(server.path)
        if i % 2:
            c.negotiate()
            c.send(json.dumps({"execute": "query-status"}))  # left unread: closed with a reply
        c.close()
    c = Raw(server.path)
    c.negotiate()
    assert c.execute("query-status", id="last")["id"] == "last"
    c.close()


# ----------------------------------------------------------------------------- lifecycle


def test_close_removes_socket_and_is_idempotent(sock_path: str) -> None:
    srv = QmpServer(sock_path)
    srv.start()
    assert os.path.exists(sock_path)
    client = Raw(sock_path)
    client.negotiate()
    srv.close()
    assert not os.path.exists(sock_path)
    assert client.at_eof()
    srv.close()
    srv.emit("AFTER_CLOSE")  # dropped, not an error
    client.close()


def test_stale_socket_is_replaced_but_live_one_is_not(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: what a crashed VMM leaves behind
    with QmpServer(sock_path) as first:
        first.register("who", lambda: "first")
        with pytest.raises(OSError, match="in use"):
            QmpServer(sock_path).start()
        c = Raw(sock_path)
        c.negotiate()
        assert c.execute("who") == {"return": "first"}
        c.close()


def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        QmpServer(str(path)).start()
    assert path.read_text() == "keep me"


def test_socket_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="limit is 107"):
        QmpServer(str(tmp_path / ("x" * 120)))


def test_registration_rules(sock_path: str) -> None:
    srv = QmpServer(sock_path)

    @srv.command("hello", args_schema={"*who": str})
    def hello(who: str = "world") -> str:
        return f"hello {who}"

    assert hello() == "hello world"  # the decorator returns the function unchanged
    with pytest.raises(ValueError, match="already registered"):
        srv.register("hello", hello)
    with pytest.raises(ValueError, match="built into"):
        srv.register("qmp_capabilities", hello)
    with pytest.raises(TypeError, match="unsupported type"):
        srv.register("bad", hello, args_schema={"x": bytes})
    with srv:
        c = Raw(sock_path)
        c.negotiate()
        assert c.execute("hello", {"who": "qmp"}) == {"return": "hello qmp"}
        srv.register("late", lambda: "registered after start")
        assert c.execute("late") == {"return": "registered after start"}
        c.close()


# ----------------------------------------------------------------------------- pure pieces


def test_query_status_reply_shape() -> None:
    assert query_status_reply(RunStatus.INMIGRATE) == {
        "status": "inmigrate",
        "running": False,
        "singlestep": False,
    }
    assert query_status_reply(RunStatus.RUNNING)["running"] is True
    assert all(query_status_reply(s)["running"] is (s is RunStatus.RUNNING) for s in RunStatus)


def test_version_info() -> None:
    assert version_info("2.10.3") == {
        "qemu": {"major": 2, "minor": 10, "micro": 3},
        "package": "ptmig 2.10.3",
    }
    assert version_info("1.0")["qemu"] == {"major": 1, "minor": 0, "micro": 0}


def test_check_arguments_types() -> None:
    schema = {
        "n": int,
        "*f": float,
        "*b": bool,
        "*l": list[str],
        "*o": dict,
        "*a": object,
        "*mode": ("fast", "slow"),
        "*dash-ed": str,
    }
    good = {
        "n": 1,
        "f": 2,
        "b": False,
        "l": ["x"],
        "o": {},
        "a": None,
        "mode": "fast",
        "dash-ed": "y",
    }
    out = check_arguments(schema, good)
    assert out["dash_ed"] == "y" and "dash-ed" not in out
    bad: list[tuple[dict[str, Any], str]] = [
        ({"n": 1.5}, "expected: integer"),
        ({"n": 1, "f": "2"}, "expected: number"),
        ({"n": 1, "b": 0}, "expected: boolean"),
        ({"n": 1, "l": ["x", 1]}, "expected: array of string"),
        ({"n": 1, "o": []}, "expected: object"),
        ({"n": 1, "mode": "warp"}, "does not accept value 'warp' (allowed: fast, slow)"),
        ({"n": 1, "mode": 3}, "expected: one of 'fast', 'slow'"),
    ]
    for arguments, desc in bad:
        with pytest.raises(QmpError) as info:
            check_arguments(schema, arguments)
        assert info.value.error_class == "GenericError"
        assert desc in info.value.desc, info.value.desc


def test_splitter_pieces() -> None:
    s = JsonSplitter(max_size=64)
    assert s.feed(b' {"a": "}{\\"]"}  [1,[2]] "s\\\\" 12 tr') == [
        b'{"a": "}{\\"]"}',
        b"[1,[2]]",
        b'"s\\\\"',
        b"12",
    ]
    assert s.feed(b"ue\n") == [b"true"]
    assert s.feed(b'{"a": "\\') == []  # escape split across reads
    assert s.feed(b'"x"}') == [b'{"a": "\\"x"}']
    out = s.feed(b'{"a": 1\x1f{"b": 2}')
    assert isinstance(out[0], InputError) and not out[0].fatal
    assert out[1:] == [b'{"b": 2}']
    out = s.feed(b'{"a": "x\ny"}\n{"b": 2}')  # a raw line end in a string is an error
    assert isinstance(out[0], InputError) and out[1:] == [b'{"b": 2}']
    out = s.feed(b"[" + b"1," * 40)
    assert len(out) == 1 and isinstance(out[0], InputError) and out[0].fatal


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.text(max_size=5),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3)
                ),
                max_leaves=8,
            ),
            max_size=4,
        ),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.integers(min_value=1, max_value=16), min_size=1, max_size=50),
)
def test_splitter_recovers_every_object_whatever_the_chunking(
    objects: list[dict[str, Any]], cuts: list[int]
) -> None:
    stream = "".join(json.dumps(o, ensure_ascii=bool(i % 2)) for i, o in enumerate(objects))
    data = stream.encode()
    s, pos, k = JsonSplitter(), 0, 0
    out: list[bytes | InputError] = []
    while pos < len(data):
        step = cuts[k % len(cuts)]
        out += s.feed(data[pos : pos + step])
        pos, k = pos + step, k + 1
    assert all(isinstance(b, bytes) for b in out)
    assert [json.loads(b) for b in out if isinstance(b, bytes)] == objects


@given(
    junk=st.binary(min_size=1, max_size=30),
    bad=st.sampled_from([b"\x00", b"\x01", b"\x1b", b"\xfe", b"\xff"]),
)
# A line end in the junk resyncs and its quote opens a string: the next line end, a control
# byte inside that string, ends it (plain or escaped), as in QEMU's lexer.
@example(junk=b'\r"', bad=b"\x00")
@example(junk=b'\r"\\', bad=b"\x00")
@example(junk=b'\x1f"\t', bad=b"\xff")
def test_splitter_reads_the_next_command_after_a_bad_byte_in_a_string(
    junk: bytes, bad: bytes
) -> None:
    """Whatever follows the bad byte inside the string up to the end of that line, short of a
    new '{' or '[' (where a command may start), the command on the next line is read intact."""
    junk = junk.translate(None, b"\n{[")
    out = JsonSplitter().feed(b'{"execute": "x' + bad + junk + b'\n{"execute": "b"}')
    assert isinstance(out[0], InputError)
    assert out[-1] == b'{"execute": "b"}'


def test_splitter_resyncs_after_garbage_inside_a_structure() -> None:
    s = JsonSplitter()
    out = s.feed(b'{not json\n{"execute": "a"}{"x": NaN}{"execute": "b"}\n')
    assert isinstance(out[0], InputError)
    assert out[1] == b'{"execute": "a"}'
    assert isinstance(out[2], InputError)
    assert out[3:] == [b'{"execute": "b"}']
