"""Fate queries (`ptmig.migration.fate`) without KVM: the destination's rules, the source's
checks on an answer, and hostile answers over real loopback sockets (stale migration id, an
unauthenticated peer, a peer without the key, an answer replayed from an earlier stream)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from ptmig.migration import Connection, Role, hello
from ptmig.migration.events import HelloAck, RemoteProtocolError
from ptmig.migration.fate import (
    FATE_CAPABILITY,
    MIGRATION_ID_CAPABILITY,
    Fate,
    FateError,
    Fates,
    FateServer,
    ask,
    capability_id,
    new_migration_id,
    read_answer,
)
from ptmig.migration.transport import (
    Address,
    AuthenticationError,
    Listener,
    TransportError,
    listen,
    recv_event,
    send_event,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
FINGERPRINT = {"memory": 1}


def test_the_destination_answers_what_it_knows_and_never_reuses_an_id() -> None:
    fates = Fates()
    committed, failed, never = new_migration_id(), new_migration_id(), new_migration_id()
    assert fates.fate(never) is Fate.UNKNOWN
    fates.begin(failed)  # an attempt that ended without its commit
    fates.begin(committed)
    assert fates.fate(committed) is Fate.NOT_COMMITTED  # (asked between attempts)
    fates.commit(committed)
    assert fates.fate(committed) is Fate.COMMITTED
    assert fates.fate(failed) is Fate.NOT_COMMITTED
    assert fates.fate(never) is Fate.UNKNOWN  # a restarted destination may have committed it
    with pytest.raises(ValueError, match="was used before"):
        fates.begin(failed)  # "not-committed" was final: it can never commit now
    assert read_answer(fates.answer(committed), committed) is Fate.COMMITTED


@pytest.mark.parametrize(
    "ack, match",
    [
        (HelloAck(True, ""), "not a fate answer"),
        (HelloAck(False, "VM fingerprint mismatch"), "did not answer the fate query"),
        (HelloAck(False, f"{FATE_CAPABILITY}=maybe:{'a' * 32}"), "unknown fate"),
        (HelloAck(False, f"{FATE_CAPABILITY}=committed"), "about migration ''"),
        (HelloAck(False, f"{FATE_CAPABILITY}=committed:{'b' * 32}"), "about migration 'bbbb"),
    ],
)
def test_an_answer_that_is_no_fate_or_about_another_migration_is_refused(
    ack: HelloAck, match: str
) -> None:
    with pytest.raises(FateError, match=match):
        read_answer(ack, "a" * 32)


@pytest.mark.parametrize(
    "caps",
    [
        (f"{FATE_CAPABILITY}=XYZ",),
        (f"{FATE_CAPABILITY}={'A' * 32}",),  # hex digits are lower case
        (f"{FATE_CAPABILITY}={'a' * 32}", f"{FATE_CAPABILITY}={'b' * 32}"),
        (f"{FATE_CAPABILITY}={'a' * 33}",),
    ],
)
def test_a_malformed_id_in_a_hello_is_refused(caps: tuple[str, ...]) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed x-fate"):
        capability_id(hello(FINGERPRINT, caps), FATE_CAPABILITY)
    assert capability_id(hello(FINGERPRINT, caps), MIGRATION_ID_CAPABILITY) is None


@contextmanager
def fake_destination(
    listener: Listener, reply: Callable[[str], HelloAck]
) -> Iterator[dict[str, object]]:
    """One destination connection answered with `reply(asked id)`: a hostile peer."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            ch = listener.accept(timeout=30)
            conn = Connection(Role.DESTINATION, guest_pages=1)
            ev = recv_event(ch, conn)
            asked = capability_id(ev, FATE_CAPABILITY)  # type: ignore[arg-type]
            assert asked is not None
            send_event(ch, conn, reply(asked))
            ch.close()
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield out
    finally:
        t.join(30)
        listener.close()


def _ask(port: int, mid: str, *, psk: bytes | None = KEY, insecure: bool = False) -> Fate:
    return ask(
        Address(host="127.0.0.1", port=port),
        mid,
        FINGERPRINT,
        tls=None,
        psk=psk,
        insecure=insecure,
    )


def test_the_fate_server_answers_authenticated_queries() -> None:
    fates = Fates()
    mine, other = new_migration_id(), new_migration_id()
    fates.begin(mine)
    fates.commit(mine)
    server = FateServer(listen("127.0.0.1", 0, psk=KEY), fates)
    try:
        port = server.listener.port
        assert _ask(port, mine) is Fate.COMMITTED
        assert _ask(port, other) is Fate.UNKNOWN
        with pytest.raises(AuthenticationError):
            _ask(port, mine, psk=OTHER_KEY)  # a peer without the key learns nothing
        assert _ask(port, mine) is Fate.COMMITTED  # and the server still answers
    finally:
        server.close()


def test_a_stale_answer_about_another_migration_is_refused() -> None:
    stale = new_migration_id()
    listener = listen("127.0.0.1", 0, psk=KEY)
    port = listener.port
    with fake_destination(
        listener, lambda asked: HelloAck(False, f"{FATE_CAPABILITY}=not-committed:{stale}")
    ) as out:
        with pytest.raises(FateError, match=f"about migration '{stale}'"):
            _ask(port, new_migration_id())
    assert "error" not in out, out


def test_an_unauthenticated_answer_is_refused_even_if_it_looks_right() -> None:
    listener = listen("127.0.0.1", 0, insecure=True)
    port = listener.port
    with fake_destination(
        listener, lambda asked: HelloAck(False, f"{FATE_CAPABILITY}=not-committed:{asked}")
    ):
        with pytest.raises(FateError, match="not authenticated"):
            _ask(port, new_migration_id(), psk=None, insecure=True)


class Replayer:
    """A relay that records what the destination sends on the first connection and plays it
    back, without any destination, on the second: an attacker replaying an earlier answer."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.recorded = bytearray()
        self.replayed = threading.Event()
        self.first_done = threading.Event()  # the first stream is over: the replay is next
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def forward() -> None:
            try:
                while data := client.recv(1 << 16):
                    upstream.sendall(data)
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the destination hung up first: the relay's other half ends it

        forwarder = threading.Thread(target=forward, daemon=True)
        forwarder.start()
        while data := upstream.recv(1 << 16):
            self.recorded += data
            client.sendall(data)
        client.shutdown(socket.SHUT_RDWR)  # wakes the forwarder before anything is closed
        forwarder.join(10)
        client.close()
        self.first_done.set()
        upstream.close()
        client, _ = self.listener.accept()
        client.sendall(self.recorded)
        self.replayed.set()
        try:
            while client.recv(1 << 16):
                pass
        except OSError:
            pass
        client.close()


def test_an_answer_replayed_from_an_earlier_stream_is_refused() -> None:
    fates = Fates()
    mine = new_migration_id()
    fates.begin(mine)  # its attempt ended uncommitted: the source would resume on it
    server = FateServer(listen("127.0.0.1", 0, psk=KEY), fates)
    try:
        relay = Replayer(server.listener.port)
        assert _ask(relay.port, mine) is Fate.NOT_COMMITTED
        assert relay.recorded
        # the second stream meets the replay at once (not the relay still busy with the first,
        # which on a loaded host outlasted the query's timeout: a refusal for the wrong reason)
        assert relay.first_done.wait(30)
        with pytest.raises(TransportError) as refused:
            _ask(relay.port, mine)  # the same bytes again, on a stream with fresh nonces
        # the relay marks the replay once its send returned, which may come after the client
        # has already read the bytes and refused them
        assert relay.replayed.wait(10)
        assert "proof does not match" in str(refused.value)  # the handshake saw the replay
    finally:
        server.close()


def test_a_silent_or_garbled_peer_does_not_stop_the_fate_server() -> None:
    fates = Fates()
    mine = new_migration_id()
    fates.begin(mine)
    fates.commit(mine)
    server = FateServer(listen("127.0.0.1", 0, psk=KEY), fates)
    try:
        port = server.listener.port
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"\x00garbage" * 100)
        assert _ask(port, mine) is Fate.COMMITTED
    finally:
        server.close()
