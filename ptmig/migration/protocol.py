"""The live-migration protocol as a sans-I/O state machine (the h11 model).

`Connection(role, guest_pages=...)` turns events into bytes (`send`, `send_pages`) and bytes into
events (`receive_data`, `next_event`). It never touches a socket. One transition table,
`TRANSITIONS`, keyed by (role of the sender, state, event tag), serves both sides: a
`Connection` applies it with its own role when sending (→ LocalProtocolError) and with the peer's
role when receiving (→ RemoteProtocolError), so both ends walk the same states in lockstep.

Conversation (see `events` for who sends what):

    START --S Hello--> HELLO_SENT --D HelloAck(accepted)--> PRECOPY      (refused → REFUSED)
    PRECOPY --S RoundStart--> IN_ROUND --S PageRuns*--> IN_ROUND --S RoundEnd--> PRECOPY
    PRECOPY --S VcpuStates--> VCPU_SENT --S DeviceStates--> DEVICES_SENT
    DEVICES_SENT --S VerifyDigests*--> VERIFYING --S Complete--> COMPLETE_SENT  (or skip verify)
    COMPLETE_SENT --D SwitchoverAck(ok)--> SWITCHED_OVER   (not ok → SWITCHOVER_REFUSED)
    post-copy (capability `postcopy-ram`; see `postcopy`):
    DEVICES_SENT --S PostcopyStart--> POSTCOPY_ARMED --S Complete--> POSTCOPY_COMPLETE_SENT
    POSTCOPY_COMPLETE_SENT --D SwitchoverAck(ok)--> POSTCOPY
    POSTCOPY --S PostcopyPages* | D PageRequest*--> POSTCOPY --S PostcopyEnd--> POSTCOPY_ENDED
    POSTCOPY_ENDED --D PostcopyDone--> SWITCHED_OVER   (the source may close only now)
    (optionally, at the round end where the source decides to switch, before it stops:
    PRECOPY --S PostcopyDiscard--> DISCARD_SENT --D PostcopyDiscarded--> DISCARDED
    DISCARDED --S VcpuStates--> POSTCOPY_VCPU_SENT --S DeviceStates--> POSTCOPY_DEVICES_SENT
    POSTCOPY_DEVICES_SENT --S PostcopyStart--> POSTCOPY_ARMED: no round and no plain
    switchover after a discard, whose pages the destination no longer has)
    (a PageRequest that crossed PostcopyEnd is allowed, and ignored, until the end)
    a resumed post-copy (`Connection(resume=True)`, a new stream; see `recovery`):
    RESUME_START --S Hello--> RESUME_HELLO_SENT --D HelloAck(accepted)--> RESUME_ACKED
    RESUME_ACKED --D PostcopyReceived--> POSTCOPY                    (refused → REFUSED)
    any non-final state --S|D Abort--> ABORTED

Who runs the guest (`GuestOwnership`, table `OWNERSHIP`). The conversation above says what may
be sent; ownership says which side may run the guest, and it has one commit point: the
destination's, after it received Complete, loaded the vCPU and device state and took the disk
locks. From there on the destination runs the guest whatever happens to the link; its
SwitchoverAck only reports the commit. The source cannot see that point, so from the moment it
sends Complete it is in doubt and must not resume on its own:

    source's view                                    destination's view
    SOURCE --S Complete--> IN_DOUBT                  SOURCE --D Commit--> DESTINATION
    SOURCE --LinkLost--> SOURCE   (resume here)      SOURCE --LinkLost | Abort--> SOURCE
    IN_DOUBT --D SwitchoverAck(ok)--> DESTINATION
    IN_DOUBT --D SwitchoverAck(refused) | D Abort--> SOURCE   (the destination will not run it)
    IN_DOUBT --LinkLost (broken stream, timeout, migrate_cancel)--> UNRESOLVED
    UNRESOLVED --Resolve(source)--> SOURCE
    UNRESOLVED --Resolve(destination)--> DESTINATION

UNRESOLVED keeps the source paused (query-migrate says "x-unresolved" with the reason) until it
knows the winner: the destination's authenticated, definite answer to a fate query over a new
connection (`fate`: committed → destination, not committed → source; the source asks by itself
for a while, and again on `x-migrate-resolve` without a winner), or an operator, who can look at
the destination, naming it (`x-migrate-resolve` with a winner). The source sends no Abort after
Complete: it could not know whether it arrived before the commit.

A stop request to the destination (SIGTERM, SIGINT) obeys the same commit point. Before the
commit begins it is a failure of the destination's own: it sends Abort ("did not commit") and
exits, and the source resumes. Once the commit has begun it waits: the destination finishes the
switchover, starts the guest, and then stops it as it would stop any running VM. The guest
never runs on both sides, and a stop never strands it between them.

Zero-copy pages. Source: `send_pages(runs, guest_mem)` returns [header bytes, memoryview per
DATA run] for `sendmsg`. Destination: `next_event()` yields `PageRunsHeader(runs, nbytes)` with
runs already validated against guest RAM; the caller then calls `payload_targets(guest_mem)`,
which zero-fills ZERO runs, moves any payload bytes already buffered into place, and returns
the memoryview slices still to be filled in order; the caller `recv_into`s them and reports each
chunk with `payload_received(n)` (or simply keeps calling `receive_data`, which copies into the
targets). Peer page numbers become addresses only inside `pages.data_slices`/`zero_fill`, after
`pages.validate_runs`, so a hostile stream cannot write outside guest RAM.

Data channels (parallel TCP streams for RAM, like QEMU's multifd). The main stream's Hello may
carry the capability `x-data-channels=N:TOKEN` (1 ≤ N ≤ MAX_DATA_CHANNELS, TOKEN 32 hex digits).
Once the destination has accepted it, the source opens N more authenticated connections; each
is a stream of its own (preamble, Hello with `x-data-channel=I:TOKEN`, HelloAck) that then carries
only rounds: RoundStart, PageRuns*, RoundEnd (`Connection(data_channel=True)` refuses anything
else) and may end after any complete round. Page p of a pre-copy round travels on data channel
(p // STRIPE_PAGES) % N, so a page resent in a later round never overtakes itself; the main
stream carries these rounds with 0 pages, and the destination applies nothing of round r on the
main stream before every data channel has ended round r - 1. The stop-and-copy round travels on
the main stream only, after the source closed its data channels. Failures travel on the main
stream: a destination that gives up (a data channel failed, say) sends its Abort there, and the
source watches it during every data-channel round.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptmig.migration import frames, pages
from ptmig.migration.events import (
    NEED_DATA,
    RUN_DTYPE,
    Abort,
    Complete,
    Event,
    Hello,
    HelloAck,
    LocalProtocolError,
    PageRequest,
    PageRuns,
    PageRunsHeader,
    PostcopyDiscard,
    PostcopyPages,
    PostcopyReceived,
    PostcopyStart,
    ProtocolError,
    RemoteProtocolError,
    Role,
    RoundEnd,
    RoundStart,
    RunKind,
    SwitchoverAck,
    VerifyDigests,
    VerifyReport,
    _NeedData,
)
from ptmig.migration.frames import HEADER_SIZE, MAGIC, PROTOCOL_VERSION, FrameType


class State(enum.Enum):
    START = "start"
    HELLO_SENT = "hello-sent"
    PRECOPY = "precopy"
    IN_ROUND = "in-round"
    VCPU_SENT = "vcpu-sent"
    DEVICES_SENT = "devices-sent"
    VERIFYING = "verifying"
    COMPLETE_SENT = "complete-sent"
    SWITCHED_OVER = "switched-over"
    POST_VERIFY = "post-verify"
    VERIFIED = "verified"
    SWITCHOVER_REFUSED = "switchover-refused"
    REFUSED = "refused"
    ABORTED = "aborted"
    ERROR = "error"
    POSTCOPY_ARMED = "postcopy-armed"
    POSTCOPY_COMPLETE_SENT = "postcopy-complete-sent"
    POSTCOPY = "postcopy"
    POSTCOPY_ENDED = "postcopy-ended"
    RESUME_START = "resume-start"
    DISCARD_SENT = "discard-sent"
    DISCARDED = "discarded"
    POSTCOPY_VCPU_SENT = "postcopy-vcpu-sent"
    POSTCOPY_DEVICES_SENT = "postcopy-devices-sent"
    RESUME_HELLO_SENT = "resume-hello-sent"
    RESUME_ACKED = "resume-acked"


FINAL_STATES = frozenset(
    {State.VERIFIED, State.SWITCHOVER_REFUSED, State.REFUSED, State.ABORTED, State.ERROR}
)
# The source may close after the switchover, or verify first: the peer's EOF is fine here.
CLOSABLE_STATES = FINAL_STATES | {State.SWITCHED_OVER}
# A data channel carries rounds only, and ends after one of them.
DATA_CHANNEL_EVENTS = frozenset(
    {"Hello", "HelloAck", "HelloRefused", "RoundStart", "PageRuns", "RoundEnd", "Abort"}
)
DATA_CHANNEL_CLOSABLE = CLOSABLE_STATES | {State.PRECOPY}
MAX_DATA_CHANNELS = 16
STRIPE_PAGES = 4096  # 16 MiB: the unit of guest RAM that always travels on the same data channel
DATA_CHANNELS_OFFER_CAPABILITY = "x-data-channels"  # main Hello: "x-data-channels=N:TOKEN"
#: Hello capability: the source will send digests after the switchover and wait for a report.
VERIFY_CAPABILITY = "x-verify-after-switchover"
DATA_CHANNEL_JOIN_CAPABILITY = "x-data-channel"  # a data channel's Hello: "x-data-channel=I:TOKEN"
# After the switchover the destination runs the guest: nothing can be aborted any more.
_NO_ABORT = FINAL_STATES | {
    State.SWITCHED_OVER,
    State.POST_VERIFY,
    State.POSTCOPY,
    State.POSTCOPY_ENDED,
}

S, D = Role.SOURCE, Role.DESTINATION
TRANSITIONS: dict[tuple[Role, State, str], State] = {
    (S, State.START, "Hello"): State.HELLO_SENT,
    (D, State.HELLO_SENT, "HelloAck"): State.PRECOPY,
    (D, State.HELLO_SENT, "HelloRefused"): State.REFUSED,
    (S, State.PRECOPY, "RoundStart"): State.IN_ROUND,
    (S, State.IN_ROUND, "PageRuns"): State.IN_ROUND,
    (S, State.IN_ROUND, "RoundEnd"): State.PRECOPY,
    (S, State.PRECOPY, "VcpuStates"): State.VCPU_SENT,
    (S, State.VCPU_SENT, "DeviceStates"): State.DEVICES_SENT,
    (S, State.DEVICES_SENT, "VerifyDigests"): State.VERIFYING,
    (S, State.VERIFYING, "VerifyDigests"): State.VERIFYING,
    (S, State.DEVICES_SENT, "Complete"): State.COMPLETE_SENT,
    (S, State.VERIFYING, "Complete"): State.COMPLETE_SENT,
    (D, State.COMPLETE_SENT, "SwitchoverAck"): State.SWITCHED_OVER,
    (D, State.COMPLETE_SENT, "SwitchoverRefused"): State.SWITCHOVER_REFUSED,
    # Post-switchover verification: the source's RAM is frozen for good once the destination
    # runs, so hashing it is kept out of the downtime.
    (S, State.SWITCHED_OVER, "VerifyDigests"): State.POST_VERIFY,
    (S, State.POST_VERIFY, "VerifyDigests"): State.POST_VERIFY,
    (D, State.POST_VERIFY, "VerifyReport"): State.VERIFIED,
    # Post-copy: the guest runs on the destination before all of its pages are there.
    (S, State.DEVICES_SENT, "PostcopyStart"): State.POSTCOPY_ARMED,
    (S, State.PRECOPY, "PostcopyDiscard"): State.DISCARD_SENT,
    (D, State.DISCARD_SENT, "PostcopyDiscarded"): State.DISCARDED,
    (S, State.DISCARDED, "VcpuStates"): State.POSTCOPY_VCPU_SENT,
    (S, State.POSTCOPY_VCPU_SENT, "DeviceStates"): State.POSTCOPY_DEVICES_SENT,
    (S, State.POSTCOPY_DEVICES_SENT, "PostcopyStart"): State.POSTCOPY_ARMED,
    (S, State.POSTCOPY_ARMED, "Complete"): State.POSTCOPY_COMPLETE_SENT,
    (D, State.POSTCOPY_COMPLETE_SENT, "SwitchoverAck"): State.POSTCOPY,
    (D, State.POSTCOPY_COMPLETE_SENT, "SwitchoverRefused"): State.SWITCHOVER_REFUSED,
    (S, State.POSTCOPY, "PostcopyPages"): State.POSTCOPY,
    (D, State.POSTCOPY, "PageRequest"): State.POSTCOPY,
    (S, State.POSTCOPY, "PostcopyEnd"): State.POSTCOPY_ENDED,
    (D, State.POSTCOPY_ENDED, "PageRequest"): State.POSTCOPY_ENDED,
    (D, State.POSTCOPY_ENDED, "PostcopyDone"): State.SWITCHED_OVER,
    (D, State.SWITCHED_OVER, "PageRequest"): State.SWITCHED_OVER,
    (D, State.POST_VERIFY, "PageRequest"): State.POST_VERIFY,
    # A resumed post-copy: the destination's received bitmap says what the source resends.
    (S, State.RESUME_START, "Hello"): State.RESUME_HELLO_SENT,
    (D, State.RESUME_HELLO_SENT, "HelloAck"): State.RESUME_ACKED,
    (D, State.RESUME_HELLO_SENT, "HelloRefused"): State.REFUSED,
    (D, State.RESUME_ACKED, "PostcopyReceived"): State.POSTCOPY,
}
for _state in State:
    if _state not in _NO_ABORT:
        for _role in Role:
            TRANSITIONS[(_role, _state, "Abort")] = State.ABORTED
# Once Complete is sent the destination may commit at any moment: an Abort from the source
# could arrive after that and take nothing back (see GuestOwnership).
del TRANSITIONS[(S, State.COMPLETE_SENT, "Abort")]
del TRANSITIONS[(S, State.POSTCOPY_COMPLETE_SENT, "Abort")]


class Owner(enum.Enum):
    """Who may run the guest, as one side sees it (see the module docstring)."""

    SOURCE = "source"  # the source runs it, or resumes it after any failure
    IN_DOUBT = "in-doubt"  # Complete is sent: the destination may have committed
    DESTINATION = "destination"  # the destination runs it; the source never will again
    UNRESOLVED = "unresolved"  # in doubt and the answer is lost: paused until an operator decides


@dataclass(frozen=True)
class Commit:
    """Destination, local: state loaded and disk locks taken; it runs the guest from now on."""


@dataclass(frozen=True)
class LinkLost:
    """Local: the stream to the peer broke, timed out, or the migration was cancelled."""

    reason: str


@dataclass(frozen=True)
class Resolve:
    """Source, local: someone who knows named the side that keeps the guest: the operator
    (`x-migrate-resolve`), or the destination's authenticated answer to a fate query (`fate`)."""

    winner: Role
    by: str = "the operator"


OwnershipEvent = Complete | SwitchoverAck | Abort | Commit | LinkLost | Resolve
OwnershipKey = tuple[Role, Owner, type, object]

# (whose view, owner now, event type, outcome) → owner next. The outcome is SwitchoverAck.ok or
# Resolve.winner, None for the other events. A pair missing here is a bug in the caller.
OWNERSHIP: dict[OwnershipKey, Owner] = {
    (S, Owner.SOURCE, LinkLost, None): Owner.SOURCE,
    (S, Owner.SOURCE, Complete, None): Owner.IN_DOUBT,
    (S, Owner.IN_DOUBT, SwitchoverAck, True): Owner.DESTINATION,
    (S, Owner.IN_DOUBT, SwitchoverAck, False): Owner.SOURCE,
    (S, Owner.IN_DOUBT, Abort, None): Owner.SOURCE,
    (S, Owner.IN_DOUBT, LinkLost, None): Owner.UNRESOLVED,
    (S, Owner.UNRESOLVED, Resolve, S): Owner.SOURCE,
    (S, Owner.UNRESOLVED, Resolve, D): Owner.DESTINATION,
    (D, Owner.SOURCE, Commit, None): Owner.DESTINATION,
    (D, Owner.SOURCE, LinkLost, None): Owner.SOURCE,
    (D, Owner.SOURCE, Abort, None): Owner.SOURCE,
}


def _ownership_key(role: Role, owner: Owner, event: OwnershipEvent) -> OwnershipKey:
    outcome: object = None
    if isinstance(event, SwitchoverAck):
        outcome = event.ok
    elif isinstance(event, Resolve):
        outcome = event.winner
    return role, owner, type(event), outcome


class GuestOwnership:
    """One side's view of who may run the guest; `handle` walks `OWNERSHIP`."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.owner = Owner.SOURCE
        self.reason = ""  # why the owner is what it is (the last event's story)

    @property
    def runs_here(self) -> bool:
        """This side may run the guest (the source may resume it)."""
        return self.owner.value == self.role.value

    def handle(self, event: OwnershipEvent) -> Owner:
        nxt = OWNERSHIP.get(_ownership_key(self.role, self.owner, event))
        if nxt is None:
            raise LocalProtocolError(
                f"{self.role.value}: {type(event).__name__} is not possible while the guest's "
                f"owner is {self.owner.value}"
            )
        self.owner = nxt
        self.reason = _ownership_reason(event)
        return nxt


def _ownership_reason(event: OwnershipEvent) -> str:
    match event:
        case LinkLost(reason) | Abort(reason):
            return reason
        case SwitchoverAck(ok, reason) if not ok:
            return reason
        case Resolve(winner, by):
            return f"resolved by {by}: the guest belongs to the {winner.value}"
    return ""


def event_tag(event: object) -> str:
    """The transition-table key of an event (acks split by outcome)."""
    if isinstance(event, HelloAck):
        return "HelloAck" if event.accepted else "HelloRefused"
    if isinstance(event, SwitchoverAck):
        return "SwitchoverAck" if event.ok else "SwitchoverRefused"
    if isinstance(event, PageRunsHeader):
        return "PageRuns"
    return type(event).__name__


def compare_fingerprints(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """None if the two VM fingerprints match, else a reason naming every differing key."""
    diffs = [
        f"{key}: source={theirs.get(key, '<missing>')!r} destination={ours.get(key, '<missing>')!r}"
        for key in sorted(set(ours) | set(theirs), key=str)
        if ours.get(key) != theirs.get(key)
    ]
    return "VM fingerprint mismatch: " + "; ".join(diffs) if diffs else None


def check_hello(hello: Hello, own_fingerprint: dict[str, Any]) -> HelloAck:
    """The destination's answer to a Hello: refuse an unknown version or a different VM."""
    if hello.protocol_version != PROTOCOL_VERSION:
        return HelloAck(
            False,
            f"unsupported protocol version {hello.protocol_version} "
            f"(destination speaks {PROTOCOL_VERSION})",
        )
    reason = compare_fingerprints(own_fingerprint, hello.vm_fingerprint)
    return HelloAck(False, reason) if reason else HelloAck(True, "")


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the stream cleanly after the conversation reached a final state."""


@dataclass
class _Payload:
    """Receive-side bookkeeping of one page-run batch's payload."""

    runs: np.ndarray
    total: int
    crc: int | None
    targets: list[memoryview] | None = None
    received: int = 0
    index: int = 0  # current target
    offset: int = 0  # bytes filled in the current target
    all_targets: list[memoryview] = field(default_factory=list)


class Connection:
    """One end of a migration stream; see the module docstring."""

    def __init__(
        self,
        role: Role,
        *,
        guest_pages: int,
        page_size: int = pages.PAGE_SIZE,
        zero_filler: Callable[[memoryview, np.ndarray], None] | None = None,
        data_channel: bool = False,
        ram_holes: Sequence[tuple[int, int]] = (),
        resume: bool = False,
    ) -> None:
        """`zero_filler(guest_mem, runs)` replaces the default zeroing of ZERO runs (the
        destination VMM punches holes in its guest memfd instead of writing zeros).
        `data_channel`: this stream only carries rounds (see the module docstring).
        `ram_holes`: (first_page, npages) ranges below `guest_pages` that are not RAM (the
        MMIO gap below 4 GiB); no run may touch them.
        `resume`: a resumed post-copy's stream (see the module docstring and `recovery`)."""
        if guest_pages <= 0:
            raise ValueError(f"guest_pages must be positive, not {guest_pages}")
        if page_size <= 0 or page_size % 8:
            raise ValueError(f"page_size must be a positive multiple of 8, not {page_size}")
        self.role = role
        self.data_channel = data_channel
        self._closable = DATA_CHANNEL_CLOSABLE if data_channel else CLOSABLE_STATES
        self._zero_filler = zero_filler or (lambda mem, runs: pages.zero_fill(mem, runs, page_size))
        self.guest_pages = guest_pages
        self.ram_holes = tuple(ram_holes)
        self.page_size = page_size
        self.state = State.RESUME_START if resume else State.START
        self._buf = bytearray()
        self._preamble_sent = False
        self._preamble_received = False
        self._eof = False
        self._aborted_locally = False
        self._error: str | None = None
        self._round = -1
        self._round_dirty = 0
        self._round_pages = 0
        self._digest_next = 0
        self._payload: _Payload | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    # ---- shared bookkeeping: the same checks for both directions --------------------------

    def _apply(self, sender: Role, event: object, err: type[ProtocolError]) -> None:
        tag = event_tag(event)
        if self.data_channel and tag not in DATA_CHANNEL_EVENTS:
            raise err(f"{sender.value} may not send {tag} on a data channel (rounds only)")
        nxt = TRANSITIONS.get((sender, self.state, tag))
        if nxt is None:
            raise err(f"{sender.value} may not send {tag} in state {self.state.value}")
        match event:
            case RoundStart(rnd, dirty):
                if rnd != self._round + 1:
                    raise err(f"RoundStart for round {rnd}, expected round {self._round + 1}")
                if dirty > self.guest_pages:
                    raise err(
                        f"round {rnd} announces {dirty} dirty pages, guest has {self.guest_pages}"
                    )
                self._round, self._round_dirty, self._round_pages = rnd, dirty, 0
            case PageRuns(runs) | PageRunsHeader(runs):
                n = int(runs["npages"].sum(dtype=np.uint64))
                if self._round_pages + n > self._round_dirty:
                    raise err(
                        f"round {self._round} announced {self._round_dirty} pages, "
                        f"page runs now carry {self._round_pages + n}"
                    )
                self._round_pages += n
            case RoundEnd(rnd):
                if rnd != self._round:
                    raise err(f"RoundEnd for round {rnd} inside round {self._round}")
                if self._round_pages != self._round_dirty:
                    raise err(
                        f"round {rnd} announced {self._round_dirty} pages but carried "
                        f"{self._round_pages}"
                    )
            case VerifyDigests(start, digests):
                n = len(digests) // 8
                if start != self._digest_next or n == 0 or start + n > self.guest_pages:
                    raise err(
                        f"VerifyDigests for pages {start}..{start + n - 1}, expected a non-empty "
                        f"range starting at {self._digest_next} inside {self.guest_pages} pages"
                    )
                self._digest_next = start + n
            case PostcopyStart(bits) | PostcopyReceived(bits) | PostcopyDiscard(bits):
                if len(bits) != 8 * ((self.guest_pages + 63) // 64):
                    raise err(f"{tag} bitmap of {len(bits)} bytes for {self.guest_pages} pages")
            case PostcopyPages(first, npages) | PageRequest(first, npages):
                self._check_page_range(first, npages, tag, err)
            case VerifyReport():
                if self._digest_next != self.guest_pages:
                    raise err(
                        f"VerifyReport after digests of {self._digest_next} pages, "
                        f"guest has {self.guest_pages}"
                    )
            case Complete() if self.state is State.VERIFYING:
                if self._digest_next != self.guest_pages:
                    raise err(
                        f"Complete after digests of {self._digest_next} pages, "
                        f"guest has {self.guest_pages}"
                    )
        self.state = nxt

    def _check_page_range(
        self, first: int, npages: int, what: str, err: type[ProtocolError]
    ) -> None:
        """A post-copy page range: inside guest RAM, outside its holes."""
        end = first + npages
        if npages <= 0 or end > self.guest_pages:
            raise err(f"{what} for pages [{first}, {end}) outside {self.guest_pages} pages")
        for hole_first, hole_pages in self.ram_holes:
            if first < hole_first + hole_pages and hole_first < end:
                raise err(f"{what} for pages [{first}, {end}) touches a hole of guest RAM")

    # ---- sending ----------------------------------------------------------------------------

    def _check_can_send(self) -> None:
        if self.state is State.ERROR:
            raise LocalProtocolError(f"connection failed earlier ({self._error}); cannot send")

    def _out(self, data: bytes) -> bytes:
        if not self._preamble_sent:
            self._preamble_sent = True
            data = MAGIC + data
        self.bytes_sent += len(data)
        return data

    def send(self, event: Event) -> bytes:
        """Bytes for one event. PageRuns here copies its payload; prefer `send_pages`."""
        if self.state is State.ERROR and isinstance(event, Abort) and not self._aborted_locally:
            # The peer broke the protocol: it may still learn why we give up.
            self._aborted_locally = True
            return self._out(frames.encode_event(event))
        self._check_can_send()
        if isinstance(event, PageRunsHeader):
            raise LocalProtocolError("PageRunsHeader is a receive-side event; use send_pages")
        if isinstance(event, PageRuns):
            runs = self._local_runs(event.runs)
            need = pages.data_pages(runs) * self.page_size
            if len(event.payload) != need:
                raise LocalProtocolError(
                    f"PageRuns payload is {len(event.payload)} bytes, its DATA runs need {need}"
                )
            self._apply(self.role, event, LocalProtocolError)
            return self._out(frames.encode_page_runs(runs, None) + bytes(event.payload))
        try:
            data = frames.encode_event(event)
        except ValueError as e:
            raise LocalProtocolError(str(e)) from None
        self._apply(self.role, event, LocalProtocolError)
        if isinstance(event, Abort):
            self._aborted_locally = True
        return self._out(data)

    def _local_runs(self, runs: np.ndarray) -> np.ndarray:
        runs = np.ascontiguousarray(runs, dtype=RUN_DTYPE)
        try:
            pages.validate_runs(runs, self.guest_pages, self.page_size, holes=self.ram_holes)
        except RemoteProtocolError as e:
            raise LocalProtocolError(f"refusing to send bad runs: {e}") from None
        return runs

    def send_pages(
        self, runs: np.ndarray, guest_mem: memoryview, *, checksum: bool = False
    ) -> list[bytes | memoryview]:
        """Buffers for one PAGE_RUNS frame: header bytes, then one slice of `guest_mem` per DATA
        run (zero-copy: the guest may still write them; pre-copy resends pages it dirties).

        With checksum=True the payload is snapshotted (one copy) so its crc32 matches what is
        sent even while the guest runs; that costs throughput (see the benchmark)."""
        self._check_can_send()
        runs = self._local_runs(runs)
        mem = _as_guest_view(guest_mem, self.guest_pages * self.page_size, LocalProtocolError)
        slices: list[bytes | memoryview] = list(pages.data_slices(mem, runs, self.page_size))
        crc: int | None = None
        if checksum:
            payload = b"".join(slices)
            crc = zlib.crc32(payload)
            slices = [payload] if payload else []
        self._apply(self.role, PageRuns(runs, b""), LocalProtocolError)
        head = self._out(frames.encode_page_runs(runs, crc))
        self.bytes_sent += pages.data_pages(runs) * self.page_size  # the slices' bytes
        return [head, *slices]

    def send_pages_header(
        self, runs: np.ndarray, guest_mem: memoryview
    ) -> tuple[bytes, np.ndarray, memoryview]:
        """A PAGE_RUNS frame's header alone, for a sender that copies the payload anyway (a
        sealed channel) and gathers it itself: returns the header bytes, the frame's DATA runs
        (checked) and `guest_mem` as the byte view their pages are in. The caller must send
        exactly those runs' bytes, in run order, right after the header."""
        self._check_can_send()
        runs = self._local_runs(runs)
        mem = _as_guest_view(guest_mem, self.guest_pages * self.page_size, LocalProtocolError)
        self._apply(self.role, PageRuns(runs, b""), LocalProtocolError)
        head = self._out(frames.encode_page_runs(runs, None))
        data = runs[runs["kind"] == RunKind.DATA]
        self.bytes_sent += int(data["npages"].sum(dtype=np.uint64)) * self.page_size
        return head, data, mem

    # ---- receiving --------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; b"" means the peer closed its end."""
        if not data:
            self._eof = True
            return
        self.bytes_received += len(data)
        if self._aborted_locally:
            return  # we gave up: whatever was in flight is dropped
        p = self._payload
        if p is not None and p.targets is not None and not self._buf:
            n = min(len(data), p.total - p.received)
            self._fill(p, memoryview(data)[:n])
            data = memoryview(data)[n:]
            if not data:
                return
        self._buf += data

    def next_event(self) -> Event | ConnectionClosed | _NeedData:
        """The next complete event from the peer, or NEED_DATA."""
        if self.state is State.ERROR:
            raise RemoteProtocolError(f"connection failed earlier: {self._error}")
        if self._aborted_locally:
            return NEED_DATA
        try:
            return self._next_event()
        except RemoteProtocolError as e:
            self.state = State.ERROR
            self._error = str(e)
            self._payload = None
            raise

    def _next_event(self) -> Event | ConnectionClosed | _NeedData:
        p = self._payload
        if p is not None:
            if p.targets is None:
                raise LocalProtocolError(
                    "a page-run payload is pending: call payload_targets() first"
                )
            if p.received < p.total:
                if self._eof:
                    raise RemoteProtocolError(
                        f"stream truncated inside a page-run payload: got {p.received} "
                        f"of {p.total} bytes"
                    )
                return NEED_DATA
        if not self._preamble_received:
            got = bytes(self._buf[: len(MAGIC)])
            if got != MAGIC[: len(got)]:
                raise RemoteProtocolError(
                    f"bad magic {got!r}: the peer is not a ptmig migration stream "
                    f"(expected {MAGIC!r})"
                )
            if len(got) < len(MAGIC):
                return self._need(f"the {len(MAGIC)}-byte stream preamble")
            del self._buf[: len(MAGIC)]
            self._preamble_received = True
        if len(self._buf) < HEADER_SIZE:
            return self._need("a frame header")
        raw_header = bytes(self._buf[:HEADER_SIZE])
        header = frames.parse_header(raw_header)
        end = HEADER_SIZE + header.metadata_len
        if len(self._buf) < end:
            return self._need(f"a {header.type.name} frame ({header.metadata_len} metadata bytes)")
        metadata = bytes(self._buf[HEADER_SIZE:end])
        frames.check_crc(raw_header, header, metadata)
        if self.state in FINAL_STATES:
            raise RemoteProtocolError(
                f"{header.type.name} frame after the end of the conversation ({self.state.value})"
            )
        if header.type is FrameType.PAGE_RUNS:
            runs, crc = frames.decode_page_runs(metadata)
            nbytes = pages.validate_runs(
                runs, self.guest_pages, self.page_size, holes=self.ram_holes
            )
            event: Event = PageRunsHeader(runs, nbytes)
            self._apply(self.role.peer, event, RemoteProtocolError)
            has_crc = bool(header.flags & frames.FLAG_PAYLOAD_CRC)
            self._payload = _Payload(runs, nbytes, crc if has_crc else None)
        else:
            event = frames.decode_event(header.type, metadata)
            self._apply(self.role.peer, event, RemoteProtocolError)
        del self._buf[:end]
        return event

    def _need(self, what: str) -> ConnectionClosed | _NeedData:
        if self._eof:
            if not self._buf and self.state in self._closable:
                return ConnectionClosed()
            raise RemoteProtocolError(
                f"stream truncated: peer closed in state {self.state.value} while waiting for "
                f"{what} ({len(self._buf)} bytes buffered)"
            )
        return NEED_DATA

    # ---- zero-copy payload ------------------------------------------------------------------

    @property
    def payload_pending(self) -> int:
        """Payload bytes of the current page-run batch not yet received (0 if none)."""
        p = self._payload
        return 0 if p is None else p.total - p.received

    def payload_targets(self, guest_mem: memoryview | bytearray) -> list[memoryview]:
        """After a PageRunsHeader: zero the ZERO runs, place already-buffered payload bytes, and
        return the slices of `guest_mem` still to be filled, in order (fill them front to back
        and report with `payload_received`)."""
        p = self._payload
        if p is None or p.targets is not None:
            raise LocalProtocolError("payload_targets() is only valid right after a PageRunsHeader")
        mem = _as_guest_view(guest_mem, self.guest_pages * self.page_size, LocalProtocolError)
        self._zero_filler(mem, p.runs)
        p.all_targets = pages.data_slices(mem, p.runs, self.page_size)
        p.targets = p.all_targets
        if self._buf and p.total:
            n = min(len(self._buf), p.total)
            with memoryview(self._buf) as buffered:
                self._fill(p, buffered[:n])
            del self._buf[:n]
        elif p.total == 0:
            self._finish(p)
        if p.received == p.total:
            return []
        return [p.targets[p.index][p.offset :], *p.targets[p.index + 1 :]]

    def payload_received(self, nbytes: int) -> None:
        """The caller wrote `nbytes` more payload bytes straight into the targets, in order."""
        p = self._payload
        if p is None or p.targets is None:
            raise LocalProtocolError("payload_received() without payload_targets()")
        if nbytes < 0 or nbytes > p.total - p.received:
            raise LocalProtocolError(
                f"payload_received({nbytes}) but only {p.total - p.received} bytes are expected"
            )
        self.bytes_received += nbytes
        self._advance(p, nbytes)

    def _fill(self, p: _Payload, data: memoryview) -> None:
        """Copy `data` into the targets at the cursor (one copy per run touched)."""
        assert p.targets is not None
        pos = 0
        while pos < len(data):
            t = p.targets[p.index]
            k = min(len(t) - p.offset, len(data) - pos)
            assert k > 0, "payload cursor stuck: targets shorter than the payload"
            t[p.offset : p.offset + k] = data[pos : pos + k]
            pos += k
            self._advance(p, k)

    def _advance(self, p: _Payload, n: int) -> None:
        assert p.targets is not None
        p.received += n
        if p.received == p.total:  # the rest arrived at once (a batch received whole): no
            p.index, p.offset = len(p.targets), 0  # walk over its runs, one per page if scattered
            self._finish(p)
            return
        left = n
        while left and p.index < len(p.targets):
            k = min(len(p.targets[p.index]) - p.offset, left)
            p.offset += k
            left -= k
            if p.offset == len(p.targets[p.index]):
                p.index += 1
                p.offset = 0
        if p.received == p.total:
            self._finish(p)

    def _finish(self, p: _Payload) -> None:
        """The batch's payload is complete: check its crc32 if the frame carried one."""
        self._payload = None
        if p.crc is not None:
            crc = 0
            for t in p.all_targets:
                crc = zlib.crc32(t, crc)
            if crc != p.crc:
                self.state = State.ERROR
                self._error = (
                    f"page payload crc32 mismatch (frame says {p.crc:#010x}, got {crc:#010x})"
                )
                raise RemoteProtocolError(self._error)


def _as_guest_view(mem: Any, size: int, err: type[ProtocolError]) -> memoryview:
    view = memoryview(mem)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if view.nbytes != size:
        raise err(f"guest memory view is {view.nbytes} bytes, the connection expects {size}")
    return view


def hello(vm_fingerprint: dict[str, Any], capabilities: tuple[str, ...] = ()) -> Hello:
    """A Hello for this protocol version."""
    return Hello(PROTOCOL_VERSION, vm_fingerprint, capabilities)


def channel_capability(name: str, number: int, token: str) -> str:
    """`x-data-channels=N:TOKEN` (main Hello) or `x-data-channel=I:TOKEN` (a channel's Hello)."""
    return f"{name}={number}:{token}"


def parse_channel_capability(hello: Hello, name: str) -> tuple[int, str] | None:
    """(number, token) of the capability `name` in a Hello, None if absent. The peer's values
    are checked here: a number within 0..MAX_DATA_CHANNELS and a 32-hex-digit token."""
    found = [c for c in hello.capabilities if c.startswith(name + "=")]
    if not found:
        return None
    number, sep, token = found[0][len(name) + 1 :].partition(":")
    if (
        len(found) > 1
        or not sep
        or not number.isdigit()
        or len(number) > 2
        or int(number) > MAX_DATA_CHANNELS
        or len(token) != 32
        or any(ch not in "0123456789abcdef" for ch in token)
    ):
        raise RemoteProtocolError(
            f"malformed {name} capability {found[0][:80]!r}: expected {name}=NUMBER:TOKEN with "
            f"NUMBER ≤ {MAX_DATA_CHANNELS} and a 32-hex-digit TOKEN, once"
        )
    return int(number), token


__all__ = [
    "VERIFY_CAPABILITY",
    "DATA_CHANNELS_OFFER_CAPABILITY",
    "DATA_CHANNEL_JOIN_CAPABILITY",
    "FINAL_STATES",
    "MAX_DATA_CHANNELS",
    "OWNERSHIP",
    "STRIPE_PAGES",
    "TRANSITIONS",
    "Commit",
    "Connection",
    "ConnectionClosed",
    "GuestOwnership",
    "LinkLost",
    "Owner",
    "Resolve",
    "State",
    "channel_capability",
    "check_hello",
    "compare_fingerprints",
    "event_tag",
    "hello",
    "parse_channel_capability",
]
