"""The demo's time axis: migration phases and kv throughput, on the load client's clock.

t = 0 is the start of the load. The migration starts at `migration_start_s` (when the demo sent
`migrate`); its phases follow from the source's final `query-migrate`: `setup-time` ends setup,
the stop-and-copy round of `x-rounds` says when the guest was paused (`stop-at-ms`) and
`downtime` how long (stop-and-copy and switchover), and the destination runs it from then on.
`total-time` ends at the switchover, as QEMU's (a page verification after it reports its own
time). Throughput before /
during pre-copy / after comes from the client's 100 ms buckets, latency percentiles per phase
from its per-request record, and the client's outage at the switchover from its list of gaps
between successful replies. Pure functions over plain values, so the report can redraw them
from a stored document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BUCKET_S = 0.1  # the load client's series resolution


@dataclass(frozen=True)
class Phase:
    name: str  # warm-up, setup, pre-copy, stop-and-copy, after
    start_s: float
    end_s: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.end_s - self.start_s)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "start_s": round(self.start_s, 4), "end_s": round(self.end_s, 4)}


def stop_round(info: Mapping[str, Any]) -> Mapping[str, Any]:
    """The stop-and-copy entry of `x-rounds` ({} when there is none)."""
    rounds = info.get("x-rounds")
    return (
        next((r for r in rounds if isinstance(r, Mapping) and r.get("stop-and-copy")), {})
        if isinstance(rounds, list)
        else {}
    )


def migration_phases(
    info: Mapping[str, Any], migration_start_s: float, load_end_s: float
) -> list[Phase]:
    """Phases from the final `query-migrate` object of the source.

    The guest is paused from the stop-and-copy round's `stop-at-ms` (after the migration
    started) for `downtime` ms; the destination runs it from then on ("after"). Without
    `stop-at-ms` (an older source) the pause is taken as the last `downtime` ms of
    `total-time`. A migration that did not complete has no stop-and-copy, and "after" is the
    source running on once the migration ended.
    """
    total = float(info.get("total-time", 0)) / 1000.0
    setup = min(float(info.get("setup-time", 0)) / 1000.0, total)
    end = migration_start_s + total
    phases = [
        Phase("warm-up", 0.0, migration_start_s),
        Phase("setup", migration_start_s, migration_start_s + setup),
    ]
    downtime = info.get("downtime")
    if info.get("status") == "completed" and isinstance(downtime, (int, float)):
        stop_at = stop_round(info).get("stop-at-ms")
        if isinstance(stop_at, (int, float)):
            paused = migration_start_s + float(stop_at) / 1000.0
        else:
            paused = end - min(float(downtime) / 1000.0, total - setup)
        resumed = paused + float(downtime) / 1000.0
        phases += [
            Phase("pre-copy", migration_start_s + setup, paused),
            Phase("stop-and-copy", paused, resumed),
        ]
        end = resumed
    else:
        phases.append(Phase("pre-copy", migration_start_s + setup, end))
    phases.append(Phase("after", end, max(end, load_end_s)))
    return phases


def phases_from_json(items: Sequence[Mapping[str, Any]]) -> list[Phase]:
    return [Phase(str(p["name"]), float(p["start_s"]), float(p["end_s"])) for p in items]


def rate_between(series: Sequence[Sequence[float]], start_s: float, end_s: float) -> float | None:
    """Mean ops/s over the buckets that overlap [start_s, end_s); None when no bucket does.

    A window shorter than a bucket still counts the whole bucket it falls in, so a 30 ms
    stop-and-copy shows the throughput of the 100 ms around it rather than nothing.
    """
    ops = 0.0
    buckets = 0
    for t, n in series:
        if t + BUCKET_S > start_s and t < end_s:
            ops += n
            buckets += 1
    return ops / (buckets * BUCKET_S) if buckets else None


def throughput(
    series: Sequence[Sequence[float]], phases: Sequence[Phase], load_end_s: float
) -> dict[str, float | None]:
    """kv ops/s before the migration, during pre-copy alone (setup and the stop-and-copy
    left out), and after the switchover."""
    by = {p.name: p for p in phases}
    pre = by["pre-copy"]
    end = by["after"].start_s
    # The last bucket of the series is cut short by the end of the load: leave it out.
    last_full = int(load_end_s / BUCKET_S) * BUCKET_S
    return {
        "before": rate_between(series, BUCKET_S, by["setup"].start_s),  # 1st: ramp-up
        "pre-copy": rate_between(series, pre.start_s, max(pre.end_s, pre.start_s + 1e-6)),
        "after": rate_between(series, end + BUCKET_S, last_full),
    }


PERCENTILE_PHASES = ("warm-up", "pre-copy", "after")


# Phases whose requests must also be answered inside them: one still waiting when the next
# step began (setup; the guest's pause) measures that step, not this phase.
ANSWERED_INSIDE = ("warm-up", "pre-copy")


def latency_by_phase(rows: np.ndarray, phases: Sequence[Phase]) -> dict[str, dict[str, float]]:
    """Latency p50 / p99 / max (ms) of the requests of warm-up ("before"), pre-copy and
    after; `rows` is (completed at s, latency ms) per request, so a request was sent at
    completion - latency. A request belongs to the phase it was sent in, and for warm-up and
    pre-copy only if it was also answered before the phase ended: the requests in flight when
    the guest paused wait for the switchover (with a window of requests in flight, more than
    1 % of a short pre-copy's), which is the client's outage, reported apart; they are
    counted in pre-copy's `waited_for_switchover`. Requests sent during setup or the
    stop-and-copy are left out, and so is a phase in which no request was sent."""
    by = {p.name: p for p in phases}
    out: dict[str, dict[str, float]] = {}
    for name in PERCENTILE_PHASES:
        p = by.get(name)
        if p is None or not len(rows):
            continue
        sent = rows[:, 0] - rows[:, 1] / 1000.0
        in_phase = (sent >= p.start_s) & (sent < p.end_s)
        answered = rows[:, 0] <= p.end_s if name in ANSWERED_INSIDE else in_phase
        inside = rows[in_phase & answered, 1]
        if len(inside):
            p50, p99 = np.percentile(inside, [50, 99]).tolist()
            out["before" if name == "warm-up" else name] = {
                "n": int(len(inside)),
                "p50_ms": round(p50, 3),
                "p99_ms": round(p99, 3),
                "max_ms": round(float(inside.max()), 3),
            }
            if name == "pre-copy":
                out[name]["waited_for_switchover"] = int((in_phase & ~answered).sum())
    return out


@dataclass(frozen=True)
class Gap:
    """The client's longest wait between two successful replies around an instant."""

    start_s: float
    end_s: float

    @property
    def ms(self) -> float:
        return (self.end_s - self.start_s) * 1000.0

    def to_json(self) -> dict[str, float]:
        return {
            "start_s": round(self.start_s, 4),
            "end_s": round(self.end_s, 4),
            "ms": round(self.ms, 3),
        }


def switchover_gap(gaps: Sequence[Sequence[float]], stop: Phase) -> Gap | None:
    """The client's gap (from `[[start_s, length_ms], ...]`) that overlaps the stop-and-copy
    most; None when no recorded gap overlaps it (the client was served right through it)."""
    best: Gap | None = None
    best_overlap = 0.0
    for start, length_ms in gaps:
        g = Gap(float(start), float(start) + float(length_ms) / 1000.0)
        overlap = min(g.end_s, stop.end_s) - max(g.start_s, stop.start_s)
        if overlap > best_overlap:
            best, best_overlap = g, overlap
    return best


def last_reply_sent_s(rows: np.ndarray, gap: Gap, tolerance_s: float = 0.0005) -> float | None:
    """When the client sent the request whose reply began `gap` (the latest send among the
    replies completed at its start, `rows` being (completed at s, latency ms) per request);
    None when the record has no reply there. The guest answered that request after it was
    sent, so it was running then: a gap whose first silence follows a request sent before
    the pause began no later than the pause, however late the reply itself arrived."""
    if not len(rows):
        return None
    done = rows[:, 0]
    at_start = (done >= gap.start_s - tolerance_s) & (done <= gap.start_s + tolerance_s)
    if not at_start.any():
        return None
    return float((done[at_start] - rows[at_start, 1] / 1000.0).max())


def bridge_stale_replies(
    rows: np.ndarray,
    gap: Gap,
    paused_until_s: float,
    sent_by_s: float,
    tolerance_s: float = 0.0005,
) -> tuple[Gap, int]:
    """The switchover's gap extended over replies that arrived while the guest was paused.

    On a loaded host the client reads the last replies the guest sent before its pause so
    late that one arrives inside the pause, splitting the client's silence in two. A reply
    completed before `paused_until_s` (the earliest the destination can have resumed the guest)
    to a request sent no later than `sent_by_s` (the pause's start + quiesce) is such a stale
    reply: the outage runs on to the first reply completed after `paused_until_s`. Returns the
    (possibly longer) gap and how many stale replies it spans; the gap unchanged (and 0) when
    any reply inside the pause answers a later request: a guest that answered while it was
    supposed to be paused is a fault to report, not to bridge. `rows`: (completed at s,
    latency ms) per request; `tolerance_s` covers the rounding of the client's gap record, so
    the reply that ended the gap is always among those checked. A reply to a retransmission
    looks as old as the request's first sending (the client times from there): a guest that
    answered a retransmission while paused would be taken for a stale reply."""
    if not len(rows) or gap.end_s >= paused_until_s:
        return gap, 0
    done = rows[:, 0]
    inside = (done >= gap.end_s - tolerance_s) & (done < paused_until_s)
    sent = done[inside] - rows[inside, 1] / 1000.0
    later = done[done >= paused_until_s]
    if not inside.any() or (sent > sent_by_s).any() or not later.size:
        return gap, 0
    return Gap(gap.start_s, float(later.min())), int(inside.sum())


def gap_contains(
    gap: Gap,
    stop: Phase,
    early_s: float,
    late_s: float,
    slack_s: float,
    last_sent_s: float | None = None,
    quiesce_s: float = 0.0,
) -> bool:
    """Does the client's gap contain the switchover? It must begin before the guest stopped
    answering and last until the guest resumed, which is at most `late_s` before the end of
    the downtime (the source counts until the destination's acknowledgement arrives; the
    destination resumes the guest as it sends it). `slack_s` is how well the two time axes'
    origins are known.

    The beginning: when the send time of the reply that began the gap is known
    (`last_sent_s`), that request must have been sent before the guest stopped, i.e. no later
    than `quiesce_s` (vCPU pause + device sync) after the stop-and-copy began: a later one
    was answered by a guest that was supposed to be paused. Without it, the gap must begin
    no later than `early_s` after the pause began (replies sent before the pause still
    arrive for a while: the devices' queues, the switch, the client)."""
    if last_sent_s is not None:
        began = last_sent_s <= stop.start_s + quiesce_s + slack_s
    else:
        began = gap.start_s <= stop.start_s + early_s + slack_s
    return began and gap.end_s >= stop.end_s - late_s - slack_s
