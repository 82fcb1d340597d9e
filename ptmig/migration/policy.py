"""Convergence policies for pre-copy, as pure functions and small state machines.

Nothing here reads a clock or a socket: the engine passes in times and byte counts, and
`TokenBucket` takes its clock and sleep function as arguments. Bandwidths are in **bytes per
second** throughout (the `_bps` suffix), times in seconds.

- `expected_downtime` / `should_switchover`: QEMU's rule, remaining / bandwidth ≤ limit.
- `BandwidthEstimator`: EWMA of the per-round transfer rate.
- `AutoConverge`: QEMU's auto-converge throttle schedule (start 20 %, +10 %, at most 99 %),
  raised when the guest dirtied more than half of what was sent in a round, twice.
- `TokenBucket`: a max-bandwidth limiter.
- `TimeoutPolicy` / `decide`: when to give up and what to do then.
- `StallCounter` / `PostcopyPolicy` / `postcopy_trigger`: when to leave pre-copy for post-copy.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


def expected_downtime(remaining_bytes: int, bandwidth_bps: float) -> float:
    """Seconds to send `remaining_bytes` at `bandwidth_bps` bytes/s (inf if no bandwidth yet)."""
    if remaining_bytes < 0:
        raise ValueError(f"remaining_bytes must be >= 0, not {remaining_bytes}")
    if remaining_bytes == 0:
        return 0.0
    if bandwidth_bps <= 0 or math.isnan(bandwidth_bps):
        return math.inf
    return remaining_bytes / bandwidth_bps


def should_switchover(remaining_bytes: int, bandwidth_bps: float, downtime_limit_s: float) -> bool:
    """QEMU's convergence test: stop the vCPUs when the rest fits in the downtime limit."""
    if downtime_limit_s < 0:
        raise ValueError(f"downtime_limit_s must be >= 0, not {downtime_limit_s}")
    return expected_downtime(remaining_bytes, bandwidth_bps) <= downtime_limit_s


@dataclass
class BandwidthEstimator:
    """EWMA of round bandwidths: est = alpha * sample + (1 - alpha) * est (first sample as is)."""

    alpha: float = 0.5
    estimate_bps: float = 0.0
    samples: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], not {self.alpha}")

    def update(self, nbytes: int, seconds: float) -> float:
        """Add one round (nbytes sent in `seconds`); returns the new estimate in bytes/s."""
        if nbytes < 0 or seconds < 0:
            raise ValueError(f"bad sample: {nbytes} bytes in {seconds} s")
        if seconds == 0:
            return self.estimate_bps  # too short to measure; ignore
        sample = nbytes / seconds
        self.estimate_bps = (
            sample
            if self.samples == 0
            else self.alpha * sample + (1 - self.alpha) * self.estimate_bps
        )
        self.samples += 1
        return self.estimate_bps


@dataclass(frozen=True)
class RoundStats:
    """What one pre-copy round did: bytes sent, bytes the guest dirtied meanwhile (the dirty set
    harvested after the round), and how long the round took."""

    transferred_bytes: int
    dirty_bytes: int
    seconds: float = 0.0


@dataclass
class AutoConverge:
    """QEMU's auto-converge: throttle vCPUs when the guest dirties memory faster than we send.

    A round "dirties too fast" when dirty_bytes > trigger_pct % of transferred_bytes. After
    `trigger_rounds` such rounds the throttle starts at `initial_pct`, and every further
    `trigger_rounds` such rounds it steps up by `increment_pct`, capped at `max_pct`. The count
    restarts after each step, as in QEMU; the throttle is never lowered during a migration.
    """

    initial_pct: int = 20
    increment_pct: int = 10
    max_pct: int = 99
    trigger_pct: int = 50
    trigger_rounds: int = 2
    throttle_pct: int = 0
    _high_rounds: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial_pct <= self.max_pct <= 99:
            raise ValueError(
                f"need 0 < initial_pct ({self.initial_pct}) <= max_pct ({self.max_pct}) <= 99"
            )

    def update(self, stats: RoundStats) -> int:
        """Feed one round; returns the throttle percentage the vCPUs should run with now."""
        if stats.dirty_bytes * 100 > stats.transferred_bytes * self.trigger_pct:
            self._high_rounds += 1
            if self._high_rounds >= self.trigger_rounds:
                self._high_rounds = 0
                if self.throttle_pct == 0:
                    self.throttle_pct = self.initial_pct
                else:
                    self.throttle_pct = min(self.throttle_pct + self.increment_pct, self.max_pct)
        return self.throttle_pct


class TokenBucket:
    """Max-bandwidth limiter: `rate_bps` bytes/s sustained, bursts up to `burst_bytes`.

    `delay_for(nbytes, now)` is pure arithmetic (how long to wait before sending); `consume`
    applies it with the injected clock and sleep. With `sleep=None`, `consume` only returns the
    delay and the caller waits (e.g. `time.sleep(bucket.consume(n))`). The default burst is a
    tenth of a second of traffic.
    """

    def __init__(
        self,
        rate_bps: float,
        burst_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if burst_bytes is None:
            burst_bytes = max(int(rate_bps / 10), 1)
        if rate_bps <= 0 or burst_bytes <= 0:
            raise ValueError(f"rate_bps ({rate_bps}) and burst_bytes ({burst_bytes}) must be > 0")
        self.rate_bps = rate_bps
        self.burst_bytes = burst_bytes
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst_bytes)
        self._last = clock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst_bytes, self._tokens + (now - self._last) * self.rate_bps)
        self._last = max(self._last, now)

    def delay_for(self, nbytes: int, now: float) -> float:
        """Seconds to wait before `nbytes` may go (the bucket may go negative: large sends
        are allowed and paid for afterwards, so a batch bigger than the burst never blocks)."""
        self._refill(now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bps

    def consume(self, nbytes: int) -> float:
        """Take `nbytes` tokens; returns the wait owed before the next send (already slept if a
        sleep function was given)."""
        self._refill(self._clock())
        self._tokens -= nbytes
        wait = 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bps
        if wait > 0 and self._sleep is not None:
            self._sleep(wait)
            self._refill(self._clock())
        return wait


class Decision(enum.Enum):
    CONTINUE = "continue"  # run another pre-copy round
    SWITCHOVER = "switchover"  # stop the vCPUs and send the rest
    CANCEL = "cancel"  # give up: the source keeps running the guest


class TimeoutAction(enum.Enum):
    CANCEL = "cancel"  # QEMU's default when nothing converges: the user must decide
    FORCE_SWITCHOVER = "force-switchover"  # accept a longer downtime instead of failing


@dataclass(frozen=True)
class TimeoutPolicy:
    """Give up after `max_total_s` seconds or `max_rounds` rounds, then do `on_timeout`."""

    max_total_s: float = 600.0
    max_rounds: int = 1000
    on_timeout: TimeoutAction = TimeoutAction.CANCEL


def decide(
    *,
    remaining_bytes: int,
    bandwidth_bps: float,
    downtime_limit_s: float,
    elapsed_s: float,
    rounds: int,
    timeout: TimeoutPolicy,
) -> Decision:
    """One decision per round end: switch over if it fits, else apply the timeout policy."""
    if should_switchover(remaining_bytes, bandwidth_bps, downtime_limit_s):
        return Decision.SWITCHOVER
    if elapsed_s >= timeout.max_total_s or rounds >= timeout.max_rounds:
        if timeout.on_timeout is TimeoutAction.FORCE_SWITCHOVER:
            return Decision.SWITCHOVER
        return Decision.CANCEL
    return Decision.CONTINUE


@dataclass
class StallCounter:
    """Counts pre-copy rounds that made no progress: a round stalls unless its remaining dirty
    set is below `progress` × the smallest remaining set seen so far (the source's rule for
    "pre-copy stopped converging"). A round that makes progress resets the count."""

    progress: float = 0.95
    best_bytes: int | None = None
    stalled: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.progress <= 1:
            raise ValueError(f"progress must be in (0, 1], not {self.progress}")

    def update(self, remaining_bytes: int) -> int:
        """Feed one round's remaining bytes; returns how many rounds in a row stalled."""
        if remaining_bytes < 0:
            raise ValueError(f"remaining_bytes must be >= 0, not {remaining_bytes}")
        if self.best_bytes is None or remaining_bytes < self.best_bytes * self.progress:
            self.best_bytes = remaining_bytes
            self.stalled = 0
        else:
            self.stalled += 1
        return self.stalled


class PostcopyTrigger(enum.Enum):
    REQUESTED = "requested"  # migrate-start-postcopy
    ROUNDS = "rounds"  # the configured number of pre-copy rounds is done
    STALLED = "stalled"  # pre-copy stopped converging


@dataclass(frozen=True)
class PostcopyPolicy:
    """When the source leaves pre-copy for post-copy on its own (`postcopy-ram` on).

    `after_rounds`: once that many pre-copy rounds are complete (0: never by count).
    `stalled_rounds`: once that many rounds in a row made no progress (`StallCounter`; 0:
    never). `migrate-start-postcopy` starts it at the next round end in any case."""

    after_rounds: int = 0
    stalled_rounds: int = 2

    def __post_init__(self) -> None:
        if self.after_rounds < 0 or self.stalled_rounds < 0:
            raise ValueError(
                f"after_rounds ({self.after_rounds}) and stalled_rounds "
                f"({self.stalled_rounds}) must be >= 0"
            )


def postcopy_trigger(
    *,
    policy: PostcopyPolicy,
    requested: bool,
    rounds_done: int,
    stalled: int,
    fits_downtime: bool,
) -> PostcopyTrigger | None:
    """At a round end: why the source should switch to post-copy now, or None to go on.

    A pre-copy that fits the downtime limit (`fits_downtime`, from `should_switchover`) always
    wins: a plain switchover moves the whole guest at once, while post-copy leaves it split
    between the hosts (and at the link's mercy) until the last page has arrived."""
    if rounds_done < 0 or stalled < 0:
        raise ValueError(f"rounds_done ({rounds_done}) and stalled ({stalled}) must be >= 0")
    if fits_downtime:
        return None
    if requested:
        return PostcopyTrigger.REQUESTED
    if policy.after_rounds and rounds_done >= policy.after_rounds:
        return PostcopyTrigger.ROUNDS
    if policy.stalled_rounds and stalled >= policy.stalled_rounds:
        return PostcopyTrigger.STALLED
    return None
