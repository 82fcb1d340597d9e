"""Post-copy recovery: a link broken during post-copy is reconnected and the migration resumes.

QEMU's interface (docs/devel/migration/postcopy.rst, "Postcopy recovery"; qapi/migration.json):
`migrate-pause` breaks the link on purpose (on either side); `migrate-recover {"uri": ...}` on
the paused destination listens for the source; `migrate {"uri": ..., "resume": true}` on the
paused source reconnects. This module owns the rules both sides follow, as pure code:

Each side's post-copy, one state machine (`Recovery`, the status `query-migrate` reports on the
source and `x-query-postcopy` on the destination):

    postcopy-active --link lost | migrate-pause--> postcopy-paused
    postcopy-paused --migrate-recover (dest) | migrate resume:true (source)--> postcopy-recover
    postcopy-recover --resumed (the received bitmap crossed)--> postcopy-active
    postcopy-recover --link lost | migrate-pause--> postcopy-paused   (recoverable again)
    postcopy-active --every page installed--> completed
    anything else (a recover while active, a resume before any pause, ...) is refused, and
    nothing changes

The resumed conversation runs on a new connection, authenticated as the first one was (the
same TLS certificates, pre-shared key or private unix directory: the same `transport` calls).
Its Hello carries the migration's session token (`SESSION_CAPABILITY`, a 32-hex-digit secret
the source put in its first Hello), so a peer that authenticates but is not this migration's
source cannot take over the destination's missing pages (see `protocol`, RESUME_* states):

    S Hello(x-postcopy-session=0:TOKEN) -> D HelloAck -> D PostcopyReceived(bitmap)
    -> S PostcopyPages* | D PageRequest* -> S PostcopyEnd (-> verification, as after a switchover)

The destination's received bitmap is the truth (as QEMU's recv bitmap): one bit per guest page,
set for each page it holds (installed, or known to be zero). The source resends every RAM page
whose bit is clear -- pages that were in flight when the link broke included -- and nothing
else; the destination asks again, with priority, for the pages its vCPUs were waiting on.

During the pause the guest runs nowhere: the destination's vCPUs are paused and its faults stay
blocked in the fault server (a missing page is never zero-filled); the source keeps all of its
RAM. A resume that fails at any step (refused token, broken link, a hostile bitmap) leaves both
sides paused and recoverable; nothing is lost until one of the two processes ends.
"""

from __future__ import annotations

import enum

import numpy as np
import numpy.typing as npt

from ..errors import PtmigError
from .events import Hello
from .protocol import channel_capability, parse_channel_capability
from .uffd import PageState

#: Hello capability carrying the migration's secret: `x-postcopy-session=0:TOKEN`.
SESSION_CAPABILITY = "x-postcopy-session"


class RecoveryError(PtmigError, RuntimeError):
    """A recovery step that does not fit the migration's state, or a hostile resume."""


class Phase(enum.Enum):
    ACTIVE = "postcopy-active"
    PAUSED = "postcopy-paused"
    RECOVER = "postcopy-recover"
    COMPLETED = "completed"


class Step(enum.Enum):
    LINK_LOST = "link lost"
    PAUSE = "migrate-pause"
    RECOVER = "recover"  # migrate-recover (destination), migrate resume:true (source)
    RESUMED = "resumed"
    DONE = "every page installed"


_MOVES: dict[tuple[Phase, Step], Phase] = {
    (Phase.ACTIVE, Step.LINK_LOST): Phase.PAUSED,
    (Phase.ACTIVE, Step.PAUSE): Phase.PAUSED,
    (Phase.ACTIVE, Step.DONE): Phase.COMPLETED,
    (Phase.PAUSED, Step.RECOVER): Phase.RECOVER,
    (Phase.RECOVER, Step.RESUMED): Phase.ACTIVE,
    (Phase.RECOVER, Step.LINK_LOST): Phase.PAUSED,
    (Phase.RECOVER, Step.PAUSE): Phase.PAUSED,
    # a link that fails while already paused (the other stream noticing late) changes nothing
    (Phase.PAUSED, Step.LINK_LOST): Phase.PAUSED,
}


class Recovery:
    """One side's post-copy phase; `handle` moves it or refuses with the reason."""

    def __init__(self) -> None:
        self.phase = Phase.ACTIVE

    def allowed(self, step: Step) -> bool:
        return (self.phase, step) in _MOVES

    def handle(self, step: Step) -> Phase:
        nxt = _MOVES.get((self.phase, step))
        if nxt is None:
            raise RecoveryError(f"{step.value}: post-copy is {self.phase.value}")
        self.phase = nxt
        return nxt


def session_capability(token: str) -> str:
    return channel_capability(SESSION_CAPABILITY, 0, token)


def session_token(hello: Hello) -> str | None:
    """The session token a Hello carries (None if it has none); malformed ones raise."""
    found = parse_channel_capability(hello, SESSION_CAPABILITY)
    return None if found is None else found[1]


def received_bitmap(states: npt.NDArray[np.uint8]) -> bytes:
    """The destination's pages it holds (PRESENT or ZERO), as little-endian uint64 words."""
    held = (states == PageState.PRESENT) | (states == PageState.ZERO)
    nwords = (len(states) + 63) // 64
    packed = np.packbits(held, bitorder="little")
    out = np.zeros(nwords * 8, dtype=np.uint8)
    out[: len(packed)] = packed
    return out.tobytes()


def parse_received_bitmap(blob: bytes, npages: int) -> npt.NDArray[np.bool_]:
    """A peer's received bitmap as one bool per page; the wrong size, or a bit set for a page
    past guest RAM, raise RecoveryError (nothing is resent on a bitmap we cannot trust)."""
    need = 8 * ((npages + 63) // 64)
    if len(blob) != need:
        raise RecoveryError(
            f"received bitmap of {len(blob)} bytes for {npages} pages (expected {need})"
        )
    bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8), bitorder="little").astype(bool)
    past = np.flatnonzero(bits[npages:])
    if len(past):
        raise RecoveryError(
            f"received bitmap names page {npages + int(past[0])}, past guest RAM ({npages} pages)"
        )
    return bits[:npages]


def pages_to_resend(
    received: npt.NDArray[np.bool_], ram: npt.NDArray[np.bool_]
) -> npt.NDArray[np.bool_]:
    """Every RAM page the destination does not hold (outside RAM: the MMIO gap, never sent)."""
    if received.shape != ram.shape:
        raise RecoveryError(f"received {received.shape} and RAM {ram.shape} bitmaps differ")
    return ram & ~received


def requested_pages(states: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Pages the destination asked for and still waits on (their request or answer may have
    been lost with the link): asked for again first after a resume."""
    return np.flatnonzero(states == PageState.REQUESTED).astype(np.uint64)
