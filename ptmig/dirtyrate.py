"""QEMU's `calc-dirty-rate` / `query-dirty-rate`: how fast the guest dirties its RAM, measured
before a migration, to choose the bandwidth and downtime limit that let pre-copy converge.

Two modes, QEMU's names and arguments (qapi/migration.json):

- `page-sampling` (the default): `sample-pages` random pages per GiB of RAM are checksummed at
  the start and at the end of `calc-time`; the share that changed, times the RAM, over the time,
  is the rate. It costs the guest nothing (nothing is write-protected), it sees every writer of
  guest RAM, passthrough devices' DMA included, and it undercounts a page rewritten with the
  same bytes (and is a sample: its error shrinks with `sample-pages`).
- `dirty-bitmap`: KVM's dirty log, exactly. The log is harvested at the start (which
  write-protects every page the guest wrote since the last harvest) and at the end; the pages
  set in the second harvest are the ones written during `calc-time`. It sees what the vCPUs and
  the VMM wrote, not device DMA (which is why a migration needs `ptmig.migration.tracking`), and
  it costs the guest what dirty tracking costs during pre-copy: a write fault on the first write
  to each page after the start. That cost is the point of measuring with it too: it is the
  floor under every pre-copy's latency on this host, whatever the DMA strategy.

`dirty-ring` (KVM's per-vCPU dirty ring) is refused: this VMM tracks with the bitmap.

The two harvests of `dirty-bitmap` take what they find, so a migration cannot run at the same
time (its rounds would miss those pages): a measurement is refused while a migration runs, and
`migrate` is refused while a `dirty-bitmap` measurement runs. `page-sampling` reads only.

Limits (QEMU's): `calc-time` 0.1-60 s, `sample-pages` 128-4096. The result is in MiB/s (QEMU's
"MB/s" is 2**20 bytes).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from .errors import PtmigError
from .layout import PAGE_SIZE

if TYPE_CHECKING:
    from .dirty import DirtyTracker
    from .memory import GuestMemory

log = logging.getLogger(__name__)

MIN_CALC_MS = 100
MAX_CALC_MS = 60_000
MIN_SAMPLE_PAGES = 128
MAX_SAMPLE_PAGES = 4096
DEFAULT_SAMPLE_PAGES = 512
MODES = ("page-sampling", "dirty-ring", "dirty-bitmap")
UNITS = ("second", "millisecond")


class DirtyRateError(PtmigError, ValueError):
    """A measurement that cannot start (bad arguments, one already running, a migration)."""


class Status(Enum):
    UNSTARTED = "unstarted"
    MEASURING = "measuring"
    MEASURED = "measured"


@dataclass(frozen=True)
class Request:
    calc_ms: int
    unit: str
    mode: str
    sample_pages: int

    @classmethod
    def parse(
        cls,
        calc_time: int,
        unit: str = "second",
        mode: str = "page-sampling",
        sample_pages: int | None = None,
    ) -> Request:
        if unit not in UNITS:
            raise DirtyRateError(f"calc-time-unit must be one of {', '.join(UNITS)}, not {unit!r}")
        calc_ms = calc_time * 1000 if unit == "second" else calc_time
        if not MIN_CALC_MS <= calc_ms <= MAX_CALC_MS:
            raise DirtyRateError(
                f"calc-time {calc_time} {unit}(s) is out of range "
                f"[{MIN_CALC_MS} ms, {MAX_CALC_MS // 1000} s]"
            )
        if mode not in MODES:
            raise DirtyRateError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "dirty-ring":
            raise DirtyRateError(
                "mode dirty-ring needs KVM's dirty ring, which this VMM does not use: "
                "use dirty-bitmap (exact) or page-sampling"
            )
        if sample_pages is not None and mode != "page-sampling":
            raise DirtyRateError("sample-pages only applies to mode page-sampling")
        pages = DEFAULT_SAMPLE_PAGES if sample_pages is None else sample_pages
        if not MIN_SAMPLE_PAGES <= pages <= MAX_SAMPLE_PAGES:
            raise DirtyRateError(
                f"sample-pages {pages} is out of range [{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}]"
            )
        return cls(calc_ms, unit, mode, pages if mode == "page-sampling" else 0)


def sample_pages_of(memory: GuestMemory, per_gib: int, seed: int | None = None) -> list[int]:
    """`per_gib` random RAM pages per GiB (at least one), distinct, sorted: the pages sampled."""
    import numpy as np

    firsts, counts = np.array(memory.page_ranges(), dtype=np.int64).T
    total = int(counts.sum())
    want = min(total, max(1, round(per_gib * total * PAGE_SIZE / 2**30)))
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(total, size=want, replace=False))
    ends = np.cumsum(counts)
    region = np.searchsorted(ends, index, side="right")
    return [int(x) for x in firsts[region] + index - (ends[region] - counts[region])]


def checksums(memory: GuestMemory, pages: list[int]) -> list[int]:
    return [zlib.crc32(memory.slice(p * PAGE_SIZE, PAGE_SIZE)) for p in pages]


def rate_mib_s(dirty_pages: float, seconds: float) -> int:
    """MiB/s, rounded down as QEMU does (an int64 of "MB/s")."""
    return int(dirty_pages * PAGE_SIZE / 2**20 / seconds) if seconds > 0 else 0


def sampled_rate(before: list[int], after: list[int], ram_pages: int, seconds: float) -> int:
    """The rate page-sampling reports: the changed share of the sample, scaled to the RAM."""
    if not before:
        return 0
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    return rate_mib_s(changed / len(before) * ram_pages, seconds)


class DirtyRateMeter:
    """One measurement at a time, in a thread of its own; its last result is kept."""

    def __init__(self, memory: GuestMemory, tracker: DirtyTracker) -> None:
        self.memory = memory
        self.tracker = tracker
        self._lock = threading.Lock()
        self.status = Status.UNSTARTED
        self.request: Request | None = None
        self.started_at = 0.0
        self.seconds = 0.0
        self.rate: int | None = None
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def holds_dirty_log(self) -> bool:
        """A dirty-bitmap measurement is running (a migration must not start)."""
        with self._lock:
            return (
                self.status is Status.MEASURING
                and self.request is not None
                and self.request.mode == "dirty-bitmap"
            )

    def start(self, request: Request) -> None:
        with self._lock:
            if self.status is Status.MEASURING:
                raise DirtyRateError("a dirty rate measurement is already running")
            self.status, self.request = Status.MEASURING, request
            self.rate, self.error, self.started_at = None, None, time.monotonic()
            self._thread = threading.Thread(
                target=self._run, args=(request,), name="dirty-rate", daemon=True
            )
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status is not Status.MEASURING

    def _run(self, request: Request) -> None:
        rate: int | None = None
        error: str | None = None
        try:
            if request.mode == "dirty-bitmap":
                rate, seconds = self._by_bitmap(request)
            else:
                rate, seconds = self._by_sampling(request)
        except Exception as e:  # a measurement that fails says so; the VM is not affected
            log.warning("dirty rate measurement failed: %s", e)
            error, seconds = str(e), time.monotonic() - self.started_at
        with self._lock:
            self.rate, self.error, self.seconds = rate, error, seconds
            self.status = Status.MEASURED

    def _by_bitmap(self, request: Request) -> tuple[int, float]:
        from . import bitmap

        self.tracker.harvest()  # forget what came before; the written pages become protected
        start = time.monotonic()
        time.sleep(request.calc_ms / 1000)
        dirty = self.tracker.harvest()
        seconds = time.monotonic() - start
        return rate_mib_s(bitmap.count(dirty), seconds), seconds

    def _by_sampling(self, request: Request) -> tuple[int, float]:
        pages = sample_pages_of(self.memory, request.sample_pages)
        before = checksums(self.memory, pages)
        start = time.monotonic()
        time.sleep(request.calc_ms / 1000)
        after = checksums(self.memory, pages)
        seconds = time.monotonic() - start
        ram_pages = self.memory.ram // PAGE_SIZE
        return sampled_rate(before, after, ram_pages, seconds), seconds

    def info(self) -> dict[str, Any]:
        """QEMU's DirtyRateInfo (`dirty-rate` once measured), plus `x-error` if it failed and
        `x-calc-ms`, the time it really measured over."""
        with self._lock:
            req = self.request or Request(1000, "second", "page-sampling", DEFAULT_SAMPLE_PAGES)
            calc = req.calc_ms // 1000 if req.unit == "second" else req.calc_ms
            out: dict[str, Any] = {
                "status": self.status.value,
                "start-time": math.floor(self.started_at),
                "calc-time": calc,
                "calc-time-unit": req.unit,
                "sample-pages": req.sample_pages,
                "mode": req.mode,
            }
            if self.status is Status.MEASURED:
                if self.error is None and self.rate is not None:
                    out["dirty-rate"] = self.rate
                else:
                    out["x-error"] = self.error
                out["x-calc-ms"] = round(self.seconds * 1000, 1)
            return out


__all__ = ["DirtyRateError", "DirtyRateMeter", "Request", "Status", "sampled_rate"]
