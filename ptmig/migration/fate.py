"""A destination's fate for one migration, asked over a new connection after the answer was lost.

A source whose switchover is unresolved (`protocol.GuestOwnership`: it sent Complete and never
learnt whether the destination committed) cannot see the destination's commit point. It can ask
the destination, over a fresh authenticated connection to the same migration address, what
became of its migration, and resolve on a definite answer (`SourceMigration.ask_fate`).

Migration ids. Every migration's Hello carries `x-migration-id=ID` (32 hex digits, fresh per
migration). The destination remembers, for as long as its process lives, which ids it saw
(`Fates`).

Wire. A fate query is a Hello that asks for no migration: its capability `x-fate=ID` names the
migration asked about. The destination answers with a refused HelloAck whose reason is
`x-fate=FATE:ID` and the conversation ends (state REFUSED). A destination answers between
attempts (its accept loop) and, once it runs the guest, for as long as it runs (`FateServer`,
on the migration listener); never in the middle of an attempt: the query then waits in the
listen backlog until that attempt has ended one way or the other.

The destination's answers (`Fates.fate`):
- committed: this process committed migration ID: it runs (or ran) the guest.
- not-committed: this process saw ID's Hello and that attempt ended without its commit. It never
  commits ID afterwards: a later Hello with an id already seen is refused.
- unknown: an id this process never saw. It may be a restarted destination whose predecessor
  committed, so "never saw it" does not mean "did not commit".

The source resolves only on an answer that is (`read_answer`, `ask`):
- authenticated: over a PSK-sealed stream, TLS, or a unix socket in a private directory. An
  unauthenticated answer could come from anyone who can reach the port;
- about its own migration id: a stale answer about another migration is refused;
- definite: unknown keeps it unresolved.
Replay is the transport's part: under PSK each stream's keys derive from fresh nonces of both
sides, so bytes recorded from an earlier stream fail authentication on a new one (TLS likewise).
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import Any

from ..errors import PtmigError
from ..tokens import token_hex
from . import transport
from .events import Hello, HelloAck, ProtocolError, RemoteProtocolError, Role
from .protocol import Connection, ConnectionClosed, hello

log = logging.getLogger(__name__)

MIGRATION_ID_CAPABILITY = "x-migration-id"  # a migration's Hello: "x-migration-id=ID"
FATE_CAPABILITY = "x-fate"  # a fate query's Hello: "x-fate=ID"; the answer "x-fate=FATE:ID"
ID_DIGITS = 32
QUERY_TIMEOUT_S = 5.0  # connect, authenticate, ask and read the answer: each within this
SERVE_POLL_S = 0.5  # how often the fate server looks whether it should stop


class FateError(PtmigError):
    """A fate answer that cannot be relied on: unauthenticated, malformed, or about another
    migration."""


class Fate(enum.Enum):
    COMMITTED = "committed"
    NOT_COMMITTED = "not-committed"
    UNKNOWN = "unknown"


def new_migration_id() -> str:
    return token_hex(ID_DIGITS // 2)


def _valid_id(value: str) -> bool:
    return len(value) == ID_DIGITS and all(c in "0123456789abcdef" for c in value)


def capability_id(h: Hello, name: str) -> str | None:
    """The id of capability `name` (`name=ID`) in a peer's Hello, None if absent; a malformed
    or repeated one is refused."""
    found = [c for c in h.capabilities if c.startswith(name + "=")]
    if not found:
        return None
    value = found[0][len(name) + 1 :]
    if len(found) > 1 or not _valid_id(value):
        raise RemoteProtocolError(
            f"malformed {name} capability {found[0][:80]!r}: expected {name}=ID with a "
            f"{ID_DIGITS}-hex-digit ID, once"
        )
    return value


class Fates:
    """What this destination process knows of the migrations it saw (see the module
    docstring); `fate` answers, `begin` refuses an id seen before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._committed: str | None = None

    def begin(self, migration_id: str) -> None:
        """An attempt of `migration_id` starts: ValueError if that id was seen before (its
        fate may have been answered "not-committed" already)."""
        with self._lock:
            if migration_id in self._seen:
                raise ValueError(
                    f"migration id {migration_id} was used before on this destination: a "
                    "migration is attempted once per id"
                )
            self._seen.add(migration_id)

    def commit(self, migration_id: str | None) -> None:
        with self._lock:
            self._committed = migration_id

    @property
    def committed(self) -> str | None:
        """The migration id whose guest this process committed to run (None: none yet)."""
        with self._lock:
            return self._committed

    def fate(self, migration_id: str) -> Fate:
        with self._lock:
            if migration_id == self._committed:
                return Fate.COMMITTED
            return Fate.NOT_COMMITTED if migration_id in self._seen else Fate.UNKNOWN

    def answer(self, migration_id: str) -> HelloAck:
        fate = self.fate(migration_id)
        log.warning("answered a fate query for migration %s: %s", migration_id, fate.value)
        return HelloAck(False, f"{FATE_CAPABILITY}={fate.value}:{migration_id}")


def read_answer(ack: object, migration_id: str) -> Fate:
    """The fate a destination's reply states for `migration_id`; FateError if the reply is no
    fate answer or one about another migration."""
    if not isinstance(ack, HelloAck) or ack.accepted:
        raise FateError(f"the destination sent {ack!r}, not a fate answer")
    prefix = FATE_CAPABILITY + "="
    if not ack.reason.startswith(prefix):
        raise FateError(f"the destination did not answer the fate query: {ack.reason[:200]!r}")
    value, sep, answered_id = ack.reason[len(prefix) :].partition(":")
    try:
        fate = Fate(value)
    except ValueError:
        raise FateError(f"unknown fate {value[:40]!r} in {ack.reason[:200]!r}") from None
    if not sep or answered_id != migration_id:
        raise FateError(
            f"the fate answer is about migration {answered_id[:40]!r}, not {migration_id}"
        )
    return fate


def authenticated(ch: transport.Channel, address: transport.Address, insecure: bool) -> bool:
    """The peer on `ch` proved who it is: PSK, TLS, or a private unix socket."""
    return ch.sealed or ch.is_tls or (address.path is not None and not insecure)


def ask(
    address: transport.Address,
    migration_id: str,
    fingerprint: dict[str, Any],
    *,
    tls: transport.TlsConfig | None,
    psk: bytes | None,
    insecure: bool,
    timeout_s: float = QUERY_TIMEOUT_S,
) -> Fate:
    """Ask the destination at `address` what became of `migration_id`. TransportError if it
    cannot be asked; FateError if its answer cannot be relied on."""
    ch = transport.connect_to(
        address,
        tls=tls,
        psk=psk,
        insecure=insecure,
        timeout=timeout_s,
        inactivity_timeout=timeout_s,
    )
    try:
        if not authenticated(ch, address, insecure):
            raise FateError(
                f"{ch.peer} is not authenticated (--insecure): its answer could come from "
                "anyone, so it cannot resolve the switchover"
            )
        conn = Connection(Role.SOURCE, guest_pages=1)
        transport.send_event(ch, conn, hello(fingerprint, (f"{FATE_CAPABILITY}={migration_id}",)))
        try:
            reply = transport.recv_event(ch, conn)
        except ProtocolError as e:
            raise FateError(f"the destination's fate answer is malformed: {e}") from None
        return read_answer(reply, migration_id)
    finally:
        ch.close()


class FateServer:
    """Once the guest runs on this destination: answer fate queries on the migration listener
    (one connection at a time, each within QUERY_TIMEOUT_S) until `close`."""

    def __init__(self, listener: transport.Listener, fates: Fates) -> None:
        self.listener = listener
        self.fates = fates
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migration-fate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ch = self.listener.accept(timeout=SERVE_POLL_S)
            except transport.AuthenticationError as e:
                log.warning("fate server: %s", e)
                continue
            except transport.TransportError:
                continue  # the poll's timeout, or the listener closed by `close`
            try:
                self._serve(ch)
            except Exception as e:  # a peer's bytes must not end the server
                log.warning("fate server: a query from %s failed: %s", ch.peer, e)
            finally:
                ch.close()

    def _serve(self, ch: transport.Channel) -> None:
        ch.inactivity_timeout = QUERY_TIMEOUT_S
        ch.sock.settimeout(QUERY_TIMEOUT_S)
        conn = Connection(Role.DESTINATION, guest_pages=1)
        ev = transport.recv_event(ch, conn)
        if isinstance(ev, ConnectionClosed):
            return
        assert isinstance(ev, Hello)  # the protocol allows nothing else first
        migration_id = capability_id(ev, FATE_CAPABILITY)
        if migration_id is None:
            ack = HelloAck(False, "the guest already runs here: only fate queries are answered")
        else:
            ack = self.fates.answer(migration_id)
        transport.send_event(ch, conn, ack)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=2 * SERVE_POLL_S + QUERY_TIMEOUT_S)
