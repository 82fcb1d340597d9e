"""The demo's time axis: migration phases and kv throughput, on the load client's clock.

t = 0 is the start of the load. The migration starts at `migration_start_s` (when the demo sent
`migrate`); its phases follow from QEMU's own `query-migrate` fields: `setup-time` ends setup,
the guest is paused for the last `downtime` ms before `total-time` (stop-and-copy and
switchover). Throughput before / during / after comes from the client's 100 ms buckets.
Pure functions over plain JSON values, so the report can redraw them from a stored document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
        return {"name": self.name, "start_s": round(self.start_s, 4),
                "end_s": round(self.end_s, 4)}


def migration_phases(info: Mapping[str, Any], migration_start_s: float,
                     load_end_s: float) -> list[Phase]:
    """Phases from the final `query-migrate` object of the source."""
    total = float(info.get("total-time", 0)) / 1000.0
    setup = min(float(info.get("setup-time", 0)) / 1000.0, total)
    end = migration_start_s + total
    phases = [Phase("warm-up", 0.0, migration_start_s),
              Phase("setup", migration_start_s, migration_start_s + setup)]
    downtime = info.get("downtime")
    if info.get("status") == "completed" and isinstance(downtime, (int, float)):
        pause = min(float(downtime) / 1000.0, total - setup)
        phases += [Phase("pre-copy", migration_start_s + setup, end - pause),
                   Phase("stop-and-copy", end - pause, end)]
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


def throughput(series: Sequence[Sequence[float]], phases: Sequence[Phase],
               load_end_s: float) -> dict[str, float | None]:
    """kv ops/s before, during and after the migration."""
    by = {p.name: p for p in phases}
    start = by["setup"].start_s
    end = by["after"].start_s
    # The last bucket of the series is cut short by the end of the load: leave it out.
    last_full = int(load_end_s / BUCKET_S) * BUCKET_S
    return {
        "before": rate_between(series, BUCKET_S, start),  # the first bucket includes ramp-up
        "during": rate_between(series, start, max(end, start + 1e-6)),
        "after": rate_between(series, end + BUCKET_S, last_full),
    }
