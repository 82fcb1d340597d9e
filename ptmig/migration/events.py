"""The events of the live-migration protocol, and its error types.

Events are frozen dataclasses: what the engine hands to `Connection.send` and what
`Connection.next_event` hands back. They say nothing about bytes; `frames` owns the wire format.

Who sends what (S = source, D = destination):

    S Hello            D HelloAck
    S RoundStart  S PageRuns / PageRunsHeader ...  S RoundEnd      (repeated: pre-copy rounds)
    S VcpuStates  S DeviceStates  [S VerifyDigests ...]  S Complete
    D SwitchoverAck                                  (ok: the destination runs the guest)
    S|D Abort                                        (before the end; S not after Complete)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ..errors import PtmigError


class ProtocolError(PtmigError):
    """The migration stream broke the protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed, oversized, inconsistent or out of order."""


class Role(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def peer(self) -> Role:
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


class RunKind(enum.IntEnum):
    """What a page run carries: DATA runs have payload bytes, ZERO runs are a marker only."""

    DATA = 0
    ZERO = 1


class _NeedData:
    """Sentinel: `next_event` needs more bytes from the peer before it can say anything."""

    _instance: _NeedData | None = None

    def __new__(cls) -> _NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

# A run array: numpy structured array, one row per run, sorted by start, non-overlapping.
RUN_DTYPE: Final = np.dtype([("start", "<u8"), ("npages", "<u4"), ("kind", "u1"), ("_pad", "V3")])


def make_runs(starts: Any, npages: Any, kinds: Any = RunKind.DATA) -> np.ndarray:
    """Build a run array (RUN_DTYPE) from start pages, page counts and kinds (broadcast)."""
    starts_a = np.asarray(starts, dtype=np.uint64).reshape(-1)
    runs = np.zeros(starts_a.shape[0], dtype=RUN_DTYPE)
    runs["start"] = starts_a
    runs["npages"] = np.asarray(npages, dtype=np.uint32)
    runs["kind"] = np.asarray(kinds, dtype=np.uint8)
    return runs


@dataclass(frozen=True)
class Hello:
    """Source → destination: who I am and what VM I carry."""

    protocol_version: int
    vm_fingerprint: dict[str, Any]
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True)
class HelloAck:
    """Destination → source: whether it accepts this VM; `reason` says why not."""

    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class RoundStart:
    """A pre-copy round begins; it will carry exactly `dirty_pages` pages in its runs."""

    round: int
    dirty_pages: int


@dataclass(frozen=True, eq=False)
class PageRuns:
    """A batch of page runs with their payload, copied into one bytes object.

    The convenient, copying form, for tests and small transfers. The zero-copy form is
    `Connection.send_pages` on the source and `PageRunsHeader` + `payload_targets` on the
    destination; on the wire both are the same frame.
    """

    runs: np.ndarray
    payload: bytes

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PageRuns)
            and np.array_equal(self.runs, other.runs)
            and self.payload == other.payload
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class PageRunsHeader:
    """Destination side: a page-run frame was parsed; `payload_nbytes` of payload follow.

    `runs` is validated (inside guest RAM, sorted, non-overlapping, counts consistent). The
    receiver must call `Connection.payload_targets(guest_mem)` next.
    """

    runs: np.ndarray
    payload_nbytes: int

    @property
    def pages(self) -> int:
        return int(self.runs["npages"].sum(dtype=np.uint64))

    @property
    def zero_pages(self) -> int:
        return int(self.runs["npages"][self.runs["kind"] == RunKind.ZERO].sum(dtype=np.uint64))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PageRunsHeader)
            and np.array_equal(self.runs, other.runs)
            and self.payload_nbytes == other.payload_nbytes
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class RoundEnd:
    round: int


@dataclass(frozen=True)
class VcpuStates:
    """Opaque vCPU state blob (its format belongs to the vCPU code)."""

    blob: bytes


@dataclass(frozen=True)
class DeviceStates:
    """Opaque device state blob (its format belongs to the device code)."""

    blob: bytes


@dataclass(frozen=True)
class VerifyDigests:
    """Per-page digests of the source's RAM at stop time, pages [start_page, start_page + n).

    `digests` is n little-endian uint64 values (see `verify.page_digests`). The source sends
    them in order, covering all of guest RAM, before `Complete`.
    """

    start_page: int
    digests: bytes


@dataclass(frozen=True)
class Complete:
    """Source: everything is sent; the destination may load the state and resume."""


@dataclass(frozen=True)
class SwitchoverAck:
    """Destination: ok=True reports its commit (state loaded, disk locks taken: it runs the
    guest, the source never will again); ok=False means it will not run the guest (the source
    resumes). See `protocol.GuestOwnership` for what the source does when neither arrives."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Abort:
    """Either side gives up; the source keeps (or resumes) running the guest."""

    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """Destination → source, after a post-switchover verification: how many pages of the
    destination's RAM (as it was before the guest resumed) differ from the source's digests."""

    pages: int
    mismatched: int
    first_mismatched: tuple[int, ...] = ()


@dataclass(frozen=True)
class PostcopyStart:
    """Source, with the guest stopped, before Complete: the switchover is a post-copy one.
    `pending` is the bitmap (little-endian uint64 words, one bit per guest page) of the pages
    whose content the destination does not have: it makes them missing, and they arrive later
    as PostcopyPages, in the background or on request."""

    pending: bytes


@dataclass(frozen=True)
class PostcopyPages:
    """Source, during post-copy: `npages` pages from `first_page`; `data` holds them, or is
    empty for zero pages."""

    first_page: int
    npages: int
    data: bytes = b""


@dataclass(frozen=True)
class PageRequest:
    """Destination, during post-copy (the return path): send these pages first."""

    first_page: int
    npages: int


@dataclass(frozen=True)
class PostcopyEnd:
    """Source: every pending page has been sent; post-copy is over."""


@dataclass(frozen=True)
class PostcopyDiscard:
    """Source, at the pre-copy round end where it decided to switch to post-copy, before it
    stops the vCPUs: these pages (bitmap as PostcopyStart's) will be pending, make them
    missing now, outside the downtime. No round follows; PostcopyStart will name them again."""

    pending: bytes


@dataclass(frozen=True)
class PostcopyDone:
    """Destination: every page is installed here after PostcopyEnd; the source may close.
    (Closing earlier, with page requests still unread, makes its kernel reset the connection
    and drop what it had not yet delivered: the end of post-copy would be lost.)"""


@dataclass(frozen=True)
class PostcopyDiscarded:
    """Destination: the PostcopyDiscard pages are missing here; the source may stop."""


@dataclass(frozen=True)
class PostcopyReceived:
    """Destination, on a resumed post-copy connection (see `recovery`): the bitmap
    (little-endian uint64 words, one bit per guest page) of the pages it holds; the source
    sends every other RAM page."""

    received: bytes


Event = (
    Hello
    | HelloAck
    | RoundStart
    | PageRuns
    | PageRunsHeader
    | RoundEnd
    | VcpuStates
    | DeviceStates
    | VerifyDigests
    | Complete
    | SwitchoverAck
    | VerifyReport
    | Abort
    | PostcopyStart
    | PostcopyPages
    | PageRequest
    | PostcopyEnd
    | PostcopyDone
    | PostcopyReceived
    | PostcopyDiscard
    | PostcopyDiscarded
)
