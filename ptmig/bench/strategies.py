"""The DMA-tracking strategy comparison (section `strategies`): none, all-dirty, device-log and
shadow, over guest RAM sizes, each migrated live under the kv load.

Each cell (strategy × RAM size × run) is one `ptmig demo` run (`ptmig.demo.run_demo`): a source
and a destination VMM on loopback, the kv guest with a passthrough virtio-net and virtio-blk, the
load client checking every acknowledged value, `x-verify` on, the same `max-bandwidth` for every
cell. The load runs from a warm-up until `after_s` past the switchover, however long pre-copy
takes, at a fixed offered load: half the maximum kv ops/s the client reaches against one guest
that is not migrating, measured once at the start of the section (`max_rate()`). From the demo
document `cell_from_doc()` takes: total time, downtime (and where it went), bytes sent, rounds,
the client's outage at the switchover, the guest's longest pause, kv ops/s served before /
during pre-copy (the pre-copy phase alone) / after the switchover, latency p50 / p99 / max in
each of those phases (a request still in flight when the guest paused is the client's outage,
not pre-copy's: `timeline.latency_by_phase`), the VMM processes' CPU seconds per GiB sent
(vCPU threads left out), mismatched pages, lost and wrong values, and whether the load
spanned the switchover.

`none` is expected to lose device writes: its rows are marked, never counted as an error.

Reported per cell (median of the runs; correctness as the worst run), with names the HTML report
reads (`ptmig.report.bench`):

    strategy.<name>.<ram>.downtime / .bytes / .total / .rounds / .client_gap /
                          .guest_pause / .ops_before / .ops_precopy / .ops_after /
                          .p50_before ... .max_after / .cpu_source / .cpu_destination /
                          .mismatched / .lost / .wrong

and the derived results with the issue's goals (`derived_results()`, pure):

    strategy.shadow.correct                        every shadow run verified (and spanned the
                                                   switchover)
    strategy.shadow_vs_devicelog.downtime_ratio.<ram>   ≤ 1.5
    strategy.shadow.downtime_spread                largest / smallest over RAM sizes, ≤ 1.5
    strategy.alldirty.downtime_growth              largest RAM / smallest RAM, ≥ 2 (it grows)
    strategy.shadow.during_vs_before               kv ops/s served during pre-copy ÷ before,
                                                   at the fixed offered load, ≥ 0.7
    strategy.shadow_vs_devicelog.during_vs_before  the same ÷ device-log's (no goal: context)
    strategy.<name>.p99_precopy_vs_before          p99 latency during pre-copy ÷ before, ≤ 2
    strategy.<name>.cpu_per_gib.source / .destination   VMM CPU s per GiB of guest RAM
                                                   migrated, ≤ 1
    strategy.<name>.cpu_per_gib_sent.source / .destination   the same per GiB sent (no goal)

Why the goal is per GiB of RAM, not of traffic: a migration's VMM work is mostly per page of
RAM, whatever is sent: the first round reads every page (zero scan), the destination takes
every page's state (a zero run punched or data written and hashed for x-verify), every round
harvests every memslot's log. Idle, a kv guest of 1 GiB holds ~0.25 GiB of data (the rest is
zero pages); a 1 GiB guest whose every page carries data (the `migration` section) costs
0.3-0.5 s per GiB, sent or of RAM alike, so per GiB sent would measure how empty the guest is.
Under the half load, what is sent depends on `max-bandwidth` against the guest's dirty rate
(~100 MiB/s of fresh pages at ~22,000 ops/s): at 100 MiB/s pre-copy resends for 12 rounds and
sends ~0.9 GiB, at 200 MiB/s it sends ~0.3 GiB in 3 (the `bandwidth` section measures both).

and, apart from any migration (`shadow_datapath()`): kv ops/s on one guest with direct DMA and
with its devices shadowed (`x-shadow-start`), alternating, back to back:

    strategy.shadow.datapath.direct_ops / .shadow_ops
    strategy.shadow.datapath_vs_direct             shadowed ÷ direct, ≥ 0.7

The downtime's breakdown (query-migrate's stop-and-copy round: pause, sync, send, ack, the
destination's share) is kept in `extra["downtime_parts"]` of each `.downtime` result. `x-verify`
adds one thing to the downtime: the destination hashes the stop-and-copy round's pages as they
arrive (in C, 0.4-0.6 µs a page on a 2-core host, so 3-4 ms for a 7,000-page final round;
3 µs a page when the digest was numpy's); the source hashes its RAM after the switchover,
which costs no downtime.

On a vhost-user disk (the kv log on a qemu-storage-daemon that ptmig spawns, a device nobody
here wrote), the same cells for `none`, `device-log` (the daemon's own dirty log) and `shadow`
(its memory table swapped to the shadow pool), named `vhost-user-<strategy>` in place of
`<strategy>` (in the full mode at the 1G size only: `vhost_user_memories`), and their goals:

    strategy.vhost-user.shadow.correct                   every run verified
    strategy.vhost-user.shadow_vs_devicelog.downtime_ratio.<ram>   ≤ 1.5
    strategy.vhost-user.none.incorrect                   every `none` run lost something (1.0)
    strategy.vhost-user.shadow.datapath_vs_direct        the data path alone, as above, ≥ 0.8

They run when qemu-storage-daemon is installed (`for_config`); else the section says why.
`ptmig bench --only strategies-vhost-user` runs them alone (256 MiB and 1 GiB, with the offered
load and the data path on the real backend): the rows of issue 13 in a fraction of the
section's time; `make bench` leaves that section out, as `strategies` has the same cells.

Cells run interleaved (run i of every strategy and size before run i+1), so a noisy neighbour
hits every strategy alike and the shadow / device-log ratio is paired within one round.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..cputime import CpuSample
from ..migration.params import DMA_TRACKING
from ..report.bench import parse_ram
from . import progress
from .harness import (
    BenchConfig,
    BenchError,
    Goal,
    Result,
    compile_ptmig,
    format_value,
    measured,
    paired_ratios,
)

SECTION = "strategies"
MiB = 1 << 20
BUCKET_S = 0.1  # the load client's series resolution (ptmig.demo.timeline)
VHOST_USER = "vhost-user"
VHOST_USER_STRATEGIES = ("none", "device-log", "shadow", "intercept")
VHOST_USER_MEMORIES = ("256M", "1G")
NO_DAEMON = "qemu-storage-daemon is not installed (Debian qemu-system-common)"
FULL_RUNS = 3  # per cell in the full mode (see `StrategyBenchParams.for_config` for the cost)

GOAL_SHADOW_CORRECT = Goal(">=", 1.0)
GOAL_SHADOW_VS_DEVICELOG = Goal("<=", 1.5)
GOAL_INTERCEPT_VS_DEVICELOG = Goal("<=", 1.2)
GOAL_INTERCEPT_VS_DIRECT = Goal(">=", 0.95)
GOAL_SHADOW_SPREAD = Goal("<=", 1.5)
GOAL_ALLDIRTY_GROWTH = Goal(">=", 2.0)
GOAL_DURING_VS_BEFORE = Goal(">=", 0.7)
GOAL_VHOST_USER_DATAPATH = Goal(">=", 0.8)  # issue 13: shadowed ÷ direct on the real backend
GOAL_P99_PRECOPY_VS_BEFORE = Goal("<=", 2.0)
GOAL_CPU_PER_GIB = Goal("<=", 1.0, "s/GiB")
GOAL_ZERO = Goal("<=", 0)
LATENCY_PHASES = (("before", "before"), ("precopy", "pre-copy"), ("after", "after"))


@dataclass(frozen=True)
class StrategyBenchParams:
    memories: tuple[str, ...] = ("256M", "1G", "2G")
    strategies: tuple[str, ...] = DMA_TRACKING
    runs: int = FULL_RUNS
    warmup_s: float = 4.0  # kv load before the migration starts
    after_s: float = 4.0  # kv load after the switchover, however long the migration took
    load_fraction: float = 0.5  # the offered load, as a fraction of `max_rate()`
    rate: float | None = None  # offered ops/s (set from `max_rate()`); None: unpaced
    max_bandwidth_mib: float = 100.0  # about a 1 GbE link, the demo's default; 0 = unlimited
    downtime_limit_ms: int = 300
    # off: the strategies are compared on the same paced load, unthrottled (all-dirty never
    # converges: auto-converge would throttle its guest and lengthen its pre-copy)
    auto_converge: bool = False
    datapath_pairs: int = 5  # direct/shadowed load pairs of `shadow_datapath()`
    datapath_s: float = 4.0  # seconds of load in each
    vhost_user: tuple[str, ...] = ()  # strategies also run with the disk on vhost-user
    vhost_user_memories: tuple[str, ...] | None = None  # their RAM sizes; None: `memories`

    def __post_init__(self) -> None:
        if any(s not in DMA_TRACKING for s in self.strategies):
            raise ValueError(f"strategies {self.strategies} must be a subset of {DMA_TRACKING}")
        if any(s not in DMA_TRACKING for s in self.vhost_user):
            raise ValueError(
                f"vhost-user strategies {self.vhost_user} must be a subset of {DMA_TRACKING}"
            )
        if not self.strategies and not self.vhost_user:
            raise ValueError("at least one strategy is needed, on either disk; got none")
        if not self.memories:
            raise ValueError("at least one RAM size is needed, got none")
        if self.vhost_user_memories is not None and not set(self.vhost_user_memories) <= set(
            self.memories
        ):
            raise ValueError(
                f"vhost-user RAM sizes {self.vhost_user_memories} must be a subset of "
                f"{self.memories}"
            )
        for m in self.memories:
            parse_ram(m)  # raises on a size that is not like '256M'
        if self.runs < 1:
            raise ValueError(f"runs={self.runs} must be at least 1")
        if self.warmup_s <= 0 or self.after_s <= 0:
            raise ValueError(
                f"warm-up ({self.warmup_s} s) and after ({self.after_s} s) must both be positive"
            )
        if self.max_bandwidth_mib < 0:
            raise ValueError(f"max bandwidth must be >= 0 MiB/s, got {self.max_bandwidth_mib}")
        if not 0 < self.load_fraction <= 1:
            raise ValueError(f"load fraction must be in (0, 1], got {self.load_fraction}")

    @property
    def labels(self) -> tuple[str, ...]:
        """Every cell row: the strategies on ptmig's disk, then those on a vhost-user disk."""
        return self.strategies + tuple(cell_label(s, VHOST_USER) for s in self.vhost_user)

    @property
    def vhost_memories(self) -> tuple[str, ...]:
        """The RAM sizes the vhost-user cells run at."""
        if self.vhost_user_memories is None:
            return self.memories
        return tuple(m for m in self.memories if m in self.vhost_user_memories)

    def labels_at(self, memory: str) -> tuple[str, ...]:
        """The cell rows run at one RAM size."""
        if memory in self.vhost_memories:
            return self.labels
        return self.strategies

    @property
    def cell_count(self) -> int:
        return self.runs * sum(len(self.labels_at(m)) for m in self.memories)

    @classmethod
    def for_config(cls, config: BenchConfig) -> StrategyBenchParams:
        from ..devices.vhost_user.daemon import find_program

        vhost = VHOST_USER_STRATEGIES if find_program() is not None else ()
        if config.quick:  # about 3 minutes: two sizes, one run each, a short load
            return cls(
                memories=("256M", "1G"),
                runs=1,
                warmup_s=3.0,
                after_s=3.0,
                datapath_pairs=3,
                datapath_s=2.0,
                vhost_user=vhost,
            )
        # The full mode's cost is its cells (one demo each, 15-25 s on a 2-core host with a
        # 3 s warm-up and 3 s after the switchover): 5 strategies × 3 sizes × 3 runs, and the
        # vhost-user disk's 3 at the middle size only (its goals are correctness and the
        # shadow / device-log ratio, which does not need every size) = 54 cells, about 20
        # minutes, against 72 cells with 4 s phases (over 25 minutes) before.
        return cls(
            runs=min(config.runs, FULL_RUNS),
            warmup_s=3.0,
            after_s=3.0,
            datapath_pairs=4,
            datapath_s=3.0,
            vhost_user=vhost,
            vhost_user_memories=("1G",),
        )

    @classmethod
    def vhost_user_only(cls, config: BenchConfig) -> StrategyBenchParams:
        """The `strategies-vhost-user` section: only the cells on a vhost-user disk, at the
        sizes issue 13 names (256 MiB and 1 GiB), with the section's runs and load."""
        p = cls.for_config(config)
        if not p.vhost_user:
            raise BenchError(f"no vhost-user cells: {NO_DAEMON}")
        return replace(p, strategies=(), memories=VHOST_USER_MEMORIES, vhost_user_memories=None)

    def bandwidth_text(self) -> str:
        if self.max_bandwidth_mib:
            return f"max-bandwidth {self.max_bandwidth_mib:g} MiB/s"
        return "unlimited bandwidth"

    def load_text(self) -> str:
        if self.rate is None:
            return "kv load unpaced"
        return f"kv load {self.rate:,.0f} ops/s offered"


def cell_label(strategy: str, disk: str) -> str:
    """A cell row's name: the strategy, prefixed with the disk when it is not ptmig's own."""
    return strategy if disk == "builtin" else f"{disk}-{strategy}"


def split_label(label: str) -> tuple[str, str]:
    """(strategy, disk) of a cell row's name."""
    prefix = f"{VHOST_USER}-"
    return (label[len(prefix) :], VHOST_USER) if label.startswith(prefix) else (label, "builtin")


def expected_incorrect(label: str) -> bool:
    return split_label(label)[0] == "none"


# ---- one cell ---------------------------------------------------------------------------------


@dataclass
class CellRun:
    """What one demo run measured (NaN where the run could not say)."""

    strategy: str
    memory: str
    status: str = "failed"
    total_ms: float = math.nan
    downtime_ms: float = math.nan
    bytes_sent: float = math.nan
    rounds: float = math.nan
    client_gap_ms: float = math.nan  # the client's outage at the switchover
    guest_pause_ms: float = math.nan
    ops_before: float = math.nan
    ops_precopy: float = math.nan  # the pre-copy phase alone (the guest runs; devices tracked)
    ops_after: float = math.nan
    mismatched: float = math.nan
    lost: float = math.nan  # acknowledged values missing when read back
    wrong: float = math.nan  # acknowledged values read back different
    unverified: float = math.nan
    acked: float = math.nan
    covered: bool = False  # the load spanned the switchover (`coverage_problems`)
    # latency ms: {"before" | "precopy" | "after": {"p50_ms", "p99_ms", "max_ms"}}
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_source: float = math.nan  # VMM CPU s per GiB of guest RAM, vCPU threads left out
    cpu_destination: float = math.nan
    cpu_source_sent: float = math.nan  # the same per GiB sent
    cpu_destination_sent: float = math.nan
    downtime_parts: dict[str, Any] = field(default_factory=dict)
    forced: bool = False  # the switchover was forced: pre-copy did not converge
    throttle_pct: float = 0.0  # auto-converge's vCPU throttle at the end, 0 when off
    problems: list[str] = field(default_factory=list)
    error: str | None = None  # the demo could not run at all

    @property
    def ram_bytes(self) -> int:
        return parse_ram(self.memory)

    @property
    def correct(self) -> bool:
        """Completed, every page verified equal, every acknowledged value read back, and the
        load spanned the switchover."""
        return (
            self.error is None
            and self.status == "completed"
            and self.mismatched == 0
            and self.lost == 0
            and self.wrong == 0
            and self.unverified == 0
            and self.acked > 0
            and self.covered
        )

    def lat(self, phase: str, stat: str) -> float:
        return _num((self.latency.get(phase) or {}).get(stat))


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def precopy_rate(series: Sequence[Sequence[float]], start_s: float, end_s: float) -> float:
    """kv ops/s over the load buckets lying wholly inside [start_s, end_s].

    A window shorter than any whole bucket falls back to the buckets overlapping it, so a very
    short pre-copy still gets a number (diluted by its edges) rather than none.
    """
    inside = [n for t, n in series if t >= start_s - 1e-9 and t + BUCKET_S <= end_s + 1e-9]
    if not inside:
        inside = [n for t, n in series if t + BUCKET_S > start_s and t < end_s]
    return sum(inside) / (len(inside) * BUCKET_S) if inside else math.nan


def cell_from_doc(strategy: str, memory: str, doc: Mapping[str, Any]) -> CellRun:
    """The cell's numbers out of a demo document (`DemoOutcome.doc`)."""
    from ..demo.summary import coverage_problems
    from ..demo.timeline import stop_round

    mig = doc.get("migration") or {}
    load = doc.get("load") or {}
    demo = doc.get("demo") or {}
    ram = mig.get("ram") or {}
    rounds = mig.get("x-rounds")
    outage = demo.get("outage") or {}
    tp = demo.get("throughput") or {}
    ver = mig.get("x-verify") if isinstance(mig.get("x-verify"), Mapping) else {}
    phases = {p.get("name"): p for p in demo.get("phases") or []}
    pre = phases.get("pre-copy")
    during = (
        precopy_rate(load.get("series") or [], float(pre["start_s"]), float(pre["end_s"]))
        if pre
        else math.nan
    )
    stop = stop_round(mig)
    dest = stop.get("destination-ms") if isinstance(stop.get("destination-ms"), Mapping) else {}
    parts: dict[str, Any] = dict(stop.get("downtime-ms") or {})
    if "pages" in stop:
        parts["final-pages"] = stop["pages"]
    if dest:
        parts["destination"] = dict(dest)
    problems = list(demo.get("problems") or [])
    if ver and "mismatched" not in ver:  # e.g. {"error": ...}: the check itself failed
        problems.append(f"page verification did not conclude: {ver.get('error', dict(ver))}")
    lat = demo.get("latency") or {}
    cpu = demo.get("cpu") or {}
    return CellRun(
        strategy=strategy,
        memory=memory,
        status=str(mig.get("status", "failed")),
        total_ms=_num(mig.get("total-time")),
        downtime_ms=_num(mig.get("downtime")),
        bytes_sent=_num(ram.get("transferred")),
        rounds=float(len(rounds))
        if isinstance(rounds, list) and rounds
        else _num(ram.get("dirty-sync-count")),
        client_gap_ms=_num(outage.get("client-ms")),
        guest_pause_ms=_num(outage.get("guest-ms")),
        ops_before=_num(tp.get("before")),
        ops_precopy=during,
        ops_after=_num(tp.get("after")),
        mismatched=_num(ver.get("mismatched")) if ver else math.nan,
        lost=_num(load.get("lost")),
        wrong=_num(load.get("wrong")),
        unverified=_num(load.get("unverified")),
        acked=_num(load.get("acked")),
        covered=bool(demo) and not coverage_problems(demo),
        latency={
            key: dict(lat[name])
            for key, name in LATENCY_PHASES
            if isinstance(lat.get(name), Mapping)
        },
        cpu_source=_num(cpu.get("source-s-per-ram-gib")),
        cpu_destination=_num(cpu.get("destination-s-per-ram-gib")),
        cpu_source_sent=_num(cpu.get("source-s-per-gib")),
        cpu_destination_sent=_num(cpu.get("destination-s-per-gib")),
        downtime_parts=parts,
        forced=bool(mig.get("x-forced-switchover")),
        throttle_pct=_num(mig.get("cpu-throttle-percentage") or 0),
        problems=problems,
    )


# ---- results ----------------------------------------------------------------------------------

# (result suffix, CellRun attribute, unit, scale, worst-run statistic)
CELL_METRICS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("downtime", "downtime_ms", "ms", 1.0, False),
    ("bytes", "bytes_sent", "MiB", 1 / MiB, False),
    ("total", "total_ms", "ms", 1.0, False),
    ("rounds", "rounds", "rounds", 1.0, False),
    ("client_gap", "client_gap_ms", "ms", 1.0, False),
    ("guest_pause", "guest_pause_ms", "ms", 1.0, False),
    ("ops_before", "ops_before", "ops/s", 1.0, False),
    ("ops_precopy", "ops_precopy", "ops/s", 1.0, False),
    ("ops_after", "ops_after", "ops/s", 1.0, False),
    *(
        (f"{stat}_{phase}", f"lat:{phase}:{stat}_ms", "ms", 1.0, False)
        for phase, _ in LATENCY_PHASES
        for stat in ("p50", "p99", "max")
    ),
    ("cpu_source", "cpu_source", "s/GiB", 1.0, False),
    ("cpu_destination", "cpu_destination", "s/GiB", 1.0, False),
    ("cpu_source_sent", "cpu_source_sent", "s/GiB", 1.0, False),
    ("cpu_destination_sent", "cpu_destination_sent", "s/GiB", 1.0, False),
    ("mismatched", "mismatched", "pages", 1.0, True),
    ("lost", "lost", "values", 1.0, True),
    ("wrong", "wrong", "values", 1.0, True),
)


def metric_of(c: CellRun, attr: str) -> float:
    """A CellRun attribute, or "lat:<phase>:<stat>" for a latency percentile."""
    if attr.startswith("lat:"):
        _, phase, stat = attr.split(":")
        return c.lat(phase, stat)
    return float(getattr(c, attr))


def cell_name(strategy: str, memory: str, metric: str) -> str:
    return f"strategy.{strategy}.{memory}.{metric}"


def summary(
    name: str,
    values: Sequence[float],
    unit: str,
    goal: Goal | None = None,
    extra: dict[str, Any] | None = None,
    worst: bool = False,
    section: str = SECTION,
) -> Result:
    """`measured()` over the finite values; NaN (no runs) when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Result(
            section,
            name,
            math.nan,
            unit,
            str(goal) if goal else None,
            False if goal else None,
            [],
            dict(extra or {}),
        )
    return measured(section, name, finite, unit, goal, extra, statistic=100 if worst else None)


def _cells(cells: Sequence[CellRun], strategy: str, memory: str) -> list[CellRun]:
    return [c for c in cells if c.strategy == strategy and c.memory == memory]


def cell_results(cells: Sequence[CellRun], params: StrategyBenchParams) -> list[Result]:
    """Every metric of every (strategy, RAM size) cell, median over its runs."""
    out: list[Result] = []
    for memory in params.memories:
        for strategy in params.labels_at(memory):
            runs = _cells(cells, strategy, memory)
            extra: dict[str, Any] = {
                "ram_bytes": parse_ram(memory),
                "strategy": split_label(strategy)[0],
                "disk": split_label(strategy)[1],
                "expected_incorrect": expected_incorrect(strategy),
                "correct_runs": sum(c.correct for c in runs),
                "runs": len(runs),
            }
            errors = [c.error for c in runs if c.error]
            if errors:
                extra["errors"] = errors
            problems = [p for c in runs if not c.correct for p in c.problems]
            if problems:
                extra["problems"] = problems
            for suffix, attr, unit, scale, worst in CELL_METRICS:
                goal = GOAL_ZERO if worst and not expected_incorrect(strategy) else None
                cx = dict(extra)
                if suffix == "downtime":
                    cx["downtime_parts"] = [c.downtime_parts for c in runs]
                out.append(
                    summary(
                        cell_name(strategy, memory, suffix),
                        [metric_of(c, attr) * scale for c in runs],
                        unit,
                        goal,
                        cx,
                        worst,
                    )
                )
    return out


def median_of(cells: Sequence[CellRun], attr: str) -> float:
    vals = sorted(v for v in (metric_of(c, attr) for c in cells) if math.isfinite(v))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def _ram_ratio(
    cells: Sequence[CellRun],
    strategy: str,
    memories: Sequence[str],
    name: str,
    goal: Goal,
    how: str,
) -> Result:
    """Median downtime at the largest RAM size over the smallest (`how`="growth") or the
    largest over the smallest median across all sizes (`how`="spread")."""
    med = {m: median_of(_cells(cells, strategy, m), "downtime_ms") for m in memories}
    extra: dict[str, Any] = {"downtime_ms": med, "strategy": strategy}
    by_size = sorted(memories, key=parse_ram)
    vals = [v for v in med.values() if math.isfinite(v)]
    if how == "growth":
        lo, hi = med[by_size[0]], med[by_size[-1]]
        value = hi / max(lo, 1.0) if math.isfinite(lo) and math.isfinite(hi) else math.nan
        extra["sizes"] = [by_size[0], by_size[-1]]
    else:
        value = max(vals) / max(min(vals), 1.0) if len(vals) == len(med) else math.nan
    return Result(
        SECTION,
        name,
        value,
        "ratio",
        str(goal),
        goal.met_by(value),
        [value] if math.isfinite(value) else [],
        extra,
    )


def _slowdown(c: CellRun) -> float:
    """kv ops/s during pre-copy ÷ before the migration, in one run (NaN if unknown)."""
    ok = math.isfinite(c.ops_precopy) and math.isfinite(c.ops_before) and c.ops_before > 0
    return c.ops_precopy / c.ops_before if ok else math.nan


def p99_growth(c: CellRun) -> float:
    """p99 latency during pre-copy ÷ before, in one run (NaN if unknown)."""
    before, pre = c.lat("before", "p99_ms"), c.lat("precopy", "p99_ms")
    return pre / before if math.isfinite(pre) and math.isfinite(before) and before > 0 else math.nan


def _cost_results(cells: Sequence[CellRun], strategy: str) -> dict[str, Result]:
    """What a migration costs a user of `strategy`, over every run and RAM size."""
    runs = [c for c in cells if c.strategy == strategy]
    what = {"offered_load": "half the client's maximum against a guest that is not migrating"}
    out = {
        f"strategy.{strategy}.p99_precopy_vs_before": summary(
            f"strategy.{strategy}.p99_precopy_vs_before",
            [p99_growth(c) for c in runs],
            "ratio",
            GOAL_P99_PRECOPY_VS_BEFORE,
            dict(what, ratio="kv p99 latency during pre-copy ÷ before, per run"),
        )
    }
    for side in ("source", "destination"):
        cpu_what = (
            f"{side} VMM process CPU (user + system, vCPU threads left out) from migrate to "
            "the switchover"
        )
        name = f"strategy.{strategy}.cpu_per_gib.{side}"
        out[name] = summary(
            name,
            [getattr(c, f"cpu_{side}") for c in runs],
            "s/GiB",
            GOAL_CPU_PER_GIB,
            {"what": f"{cpu_what}, per GiB of guest RAM migrated"},
        )
        name = f"strategy.{strategy}.cpu_per_gib_sent.{side}"
        out[name] = summary(
            name,
            [getattr(c, f"cpu_{side}_sent") for c in runs],
            "s/GiB",
            None,
            {"what": f"{cpu_what}, per GiB sent"},
        )
    return out


def _during_vs_devicelog(cells: Sequence[CellRun], params: StrategyBenchParams) -> Result:
    """Shadow's pre-copy slowdown over device-log's, run by run: the cost of shadowing itself,
    with what any migration costs a 2-core host (sending pages) divided out. No goal."""
    ratios: list[float] = []
    for m in params.memories:
        sh = _cells(cells, "shadow", m)
        dl = _cells(cells, "device-log", m)
        n = min(len(sh), len(dl))
        for a, b in zip(sh[:n], dl[:n], strict=True):
            r = _slowdown(a) / _slowdown(b) if _slowdown(b) > 0 else math.nan
            if math.isfinite(r):
                ratios.append(r)
    return summary(
        "strategy.shadow_vs_devicelog.during_vs_before",
        ratios,
        "ratio",
        None,
        {"what": "(shadow ops/s pre-copy ÷ before) ÷ (device-log's), paired runs"},
    )


def expected_result_names(params: StrategyBenchParams) -> list[str]:
    """The names `run_strategy_bench` reports for these parameters, in order."""
    names = [
        cell_name(s, m, suffix)
        for m in params.memories
        for s in params.labels_at(m)
        for suffix, *_ in CELL_METRICS
    ]
    return names + _derived_names(params)


def _derived_names(params: StrategyBenchParams) -> list[str]:
    s = set(params.strategies)
    names: list[str] = []
    if "shadow" in s:
        names += ["strategy.shadow.correct", "strategy.shadow.during_vs_before"]
    if {"shadow", "device-log"} <= s:
        names += [f"strategy.shadow_vs_devicelog.downtime_ratio.{m}" for m in params.memories]
        names.append("strategy.shadow_vs_devicelog.during_vs_before")
    if "intercept" in s:
        names.append("strategy.intercept.correct")
    if {"intercept", "device-log"} <= s:
        names += [f"strategy.intercept_vs_devicelog.downtime_ratio.{m}" for m in params.memories]
    if len(params.memories) > 1:
        if "shadow" in s:
            names.append("strategy.shadow.downtime_spread")
        if "all-dirty" in s:
            names.append("strategy.alldirty.downtime_growth")
    for strategy in params.strategies:
        names += [
            f"strategy.{strategy}.p99_precopy_vs_before",
            f"strategy.{strategy}.cpu_per_gib.source",
            f"strategy.{strategy}.cpu_per_gib_sent.source",
            f"strategy.{strategy}.cpu_per_gib.destination",
            f"strategy.{strategy}.cpu_per_gib_sent.destination",
        ]
    return names + _vhost_user_names(params)


def _vhost_user_names(params: StrategyBenchParams) -> list[str]:
    v = set(params.vhost_user)
    names: list[str] = []
    for software in ("shadow", "intercept"):
        if software in v:
            names.append(f"strategy.{VHOST_USER}.{software}.correct")
        if {software, "device-log"} <= v:
            names += [
                f"strategy.{VHOST_USER}.{software}_vs_devicelog.downtime_ratio.{m}"
                for m in params.vhost_memories
            ]
    if "none" in v:
        names.append(f"strategy.{VHOST_USER}.none.incorrect")
    return names


def _correct(cells: Sequence[CellRun], strategy: str) -> Result:
    """Whether every run of `strategy` verified (and spanned the switchover): the worst run."""
    runs = [c for c in cells if c.strategy == strategy]
    return _every_run(runs, f"strategy.{strategy}.correct", True)


def _downtime_vs_devicelog(cells: Sequence[CellRun], strategy: str, m: str, name: str) -> Result:
    """`strategy`'s downtime ÷ device-log's at RAM size `m`, paired run by run."""
    goal = GOAL_INTERCEPT_VS_DEVICELOG if strategy == "intercept" else GOAL_SHADOW_VS_DEVICELOG
    return _downtime_ratio(cells, strategy, "device-log", m, name, goal)


def derived_results(cells: Sequence[CellRun], params: StrategyBenchParams) -> list[Result]:
    """The issue's goals, computed from the cells (pure: no KVM, no processes)."""
    out: dict[str, Result] = {}
    shadow = [c for c in cells if c.strategy == "shadow"]
    for software in ("shadow", "intercept"):
        if software in params.strategies:
            out[f"strategy.{software}.correct"] = _correct(cells, software)
        if software in params.strategies and "device-log" in params.strategies:
            for m in params.memories:
                name = f"strategy.{software}_vs_devicelog.downtime_ratio.{m}"
                out[name] = _downtime_vs_devicelog(cells, software, m, name)
    if "shadow" in params.strategies:
        out["strategy.shadow.during_vs_before"] = summary(
            "strategy.shadow.during_vs_before",
            [_slowdown(c) for c in shadow],
            "ratio",
            GOAL_DURING_VS_BEFORE,
            {
                "during": "kv ops/s served in the pre-copy phase alone (devices shadowed)",
                "before": "kv ops/s before the migration (direct DMA)",
                "offered": "the same fixed offered load in both",
            },
        )
    if "shadow" in params.strategies and "device-log" in params.strategies:
        out["strategy.shadow_vs_devicelog.during_vs_before"] = _during_vs_devicelog(cells, params)
    if len(params.memories) > 1:
        if "shadow" in params.strategies:
            out["strategy.shadow.downtime_spread"] = _ram_ratio(
                cells,
                "shadow",
                params.memories,
                "strategy.shadow.downtime_spread",
                GOAL_SHADOW_SPREAD,
                "spread",
            )
        if "all-dirty" in params.strategies:
            out["strategy.alldirty.downtime_growth"] = _ram_ratio(
                cells,
                "all-dirty",
                params.memories,
                "strategy.alldirty.downtime_growth",
                GOAL_ALLDIRTY_GROWTH,
                "growth",
            )
    for strategy in params.strategies:
        out.update(_cost_results(cells, strategy))
    out.update(_vhost_user_results(cells, params))
    return [out[n] for n in _derived_names(params)]


def _vhost_user_results(cells: Sequence[CellRun], params: StrategyBenchParams) -> dict[str, Result]:
    """The goals of the cells on a vhost-user disk (see `_vhost_user_names`)."""
    out: dict[str, Result] = {}
    label = {s: cell_label(s, VHOST_USER) for s in params.vhost_user}
    for software in ("shadow", "intercept"):
        if software in label:
            name = f"strategy.{VHOST_USER}.{software}.correct"
            runs = [c for c in cells if c.strategy == label[software]]
            out[name] = _every_run(runs, name, True)
        if software in label and "device-log" in label:
            goal = (
                GOAL_INTERCEPT_VS_DEVICELOG if software == "intercept" else GOAL_SHADOW_VS_DEVICELOG
            )
            for m in params.vhost_memories:
                name = f"strategy.{VHOST_USER}.{software}_vs_devicelog.downtime_ratio.{m}"
                out[name] = _downtime_ratio(
                    cells, label[software], label["device-log"], m, name, goal
                )
    if "none" in label:
        name = f"strategy.{VHOST_USER}.none.incorrect"
        out[name] = _every_run([c for c in cells if c.strategy == label["none"]], name, False)
    return out


def _every_run(runs: Sequence[CellRun], name: str, correct: bool) -> Result:
    """1.0 when every run is correct (`correct`), or every run is not (a strategy that must
    lose something); the worst run decides, never the median one."""
    ok = [1.0 if c.correct == correct else 0.0 for c in runs]
    value = min(ok) if ok else math.nan
    bad = [
        f"{c.memory} run: {c.error or '; '.join(c.problems) or c.status}"
        for c in runs
        if c.correct != correct
    ]
    return Result(
        SECTION,
        name,
        value,
        "all runs",
        str(GOAL_SHADOW_CORRECT),
        GOAL_SHADOW_CORRECT.met_by(value),
        ok,
        {
            "runs": len(ok),
            "correct_runs": sum(c.correct for c in runs),
            "incorrect" if correct else "verified_anyway": bad,
        },
    )


def _downtime_ratio(
    cells: Sequence[CellRun],
    shadow: str,
    devlog: str,
    memory: str,
    name: str,
    goal: Goal = GOAL_SHADOW_VS_DEVICELOG,
) -> Result:
    """Median over paired runs (run i of each ran back to back) of shadow's downtime ÷
    device-log's, at one RAM size."""
    sh, dl = _cells(cells, shadow, memory), _cells(cells, devlog, memory)
    n = min(len(sh), len(dl))
    pairs = [
        (a.downtime_ms, max(b.downtime_ms, 1.0))
        for a, b in zip(sh[:n], dl[:n], strict=True)
        if math.isfinite(a.downtime_ms) and math.isfinite(b.downtime_ms)
    ]
    return summary(
        name,
        paired_ratios([a for a, _ in pairs], [b for _, b in pairs]),
        "ratio",
        goal,
        {"ram_bytes": parse_ram(memory), "paired_runs": len(pairs)},
    )


# ---- tables -----------------------------------------------------------------------------------

TABLE_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("total", "total_ms", 1.0),
    ("down", "downtime_ms", 1.0),
    ("MiB", "bytes_sent", 1 / MiB),
    ("rnds", "rounds", 1.0),
    ("c.out", "client_gap_ms", 1.0),
    ("g.pause", "guest_pause_ms", 1.0),
    ("before", "ops_before", 1.0),
    ("pre-copy", "ops_precopy", 1.0),
    ("after", "ops_after", 1.0),
    ("p99 bef", "lat:before:p99_ms", 1.0),
    ("p99 pre", "lat:precopy:p99_ms", 1.0),
    ("p99 aft", "lat:after:p99_ms", 1.0),
    ("cpu src", "cpu_source", 1.0),
    ("cpu dst", "cpu_destination", 1.0),
    ("bad pg", "mismatched", 1.0),
    ("lost", "lost", 1.0),
    ("wrong", "wrong", 1.0),
)
TABLE_CAPTION = (
    "times in ms (c.out: the client's outage at the switchover; g.pause: the "
    "longest pause the guest saw), MiB sent, kv ops/s served before / during the "
    "pre-copy phase / after the switchover, p99 latency in ms in the same phases, "
    "VMM CPU s per GiB of guest RAM (vCPU threads left out), mismatched pages, lost and "
    "wrong values"
)


def cell_table(cells: Sequence[CellRun], params: StrategyBenchParams, memory: str) -> Table:
    """One RAM size: a row per strategy (medians; correctness over all runs)."""
    t = Table(
        title=f"strategies, {memory} guest ({params.load_text()}, "
        f"{params.bandwidth_text()}, x-verify on; medians)",
        title_justify="left",
        caption=TABLE_CAPTION,
        caption_justify="left",
    )
    t.add_column("strategy", no_wrap=True)
    for head, _, _ in TABLE_COLUMNS:
        t.add_column(head, justify="right")
    t.add_column("correct", no_wrap=True)
    for strategy in params.labels_at(memory):
        runs = _cells(cells, strategy, memory)
        good = sum(c.correct for c in runs)
        expected_bad = expected_incorrect(strategy)
        verdict = f"{good}/{len(runs)}" + (" (expected ✗)" if expected_bad else "")
        style = None
        if good < len(runs):
            style = "yellow" if expected_bad else "red"
        t.add_row(
            strategy,
            *[cell_text(median_of(runs, attr) * scale) for _, attr, scale in TABLE_COLUMNS],
            verdict,
            style=style,
        )
    return t


def cell_text(v: float) -> str:
    if not math.isfinite(v):
        return "–"
    if v == int(v) or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


# ---- running ----------------------------------------------------------------------------------

DemoRunner = Callable[[str, str, StrategyBenchParams, Path], CellRun]


def demo_cell(strategy: str, memory: str, p: StrategyBenchParams, run_dir: Path) -> CellRun:
    """One demo run (its own output kept in `run_dir`/demo.out); a cell with `error` set when
    the demo could not run at all."""
    from ..demo import DemoOptions, run_demo

    run_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    tracking, disk = split_label(strategy)
    opts = DemoOptions(
        memory=memory,
        dma_tracking=tracking,
        disk=disk,
        warmup_s=p.warmup_s,
        after_s=p.after_s,
        rate=p.rate,
        max_bandwidth_mib=p.max_bandwidth_mib,
        downtime_limit_ms=p.downtime_limit_ms,
        auto_converge=p.auto_converge,
        run_dir=run_dir,
        live=False,
    )
    try:
        outcome = run_demo(opts, Console(file=buf, width=120, highlight=False))
    except Exception as e:  # e.g. the firmware does not build: this cell fails, not the section
        return CellRun(strategy, memory, error=f"demo raised {type(e).__name__}: {e}")
    text = buf.getvalue()
    (run_dir / "demo.out").write_text(text)
    if not outcome.doc:
        tail = "\n".join(text.strip().splitlines()[-8:])
        return CellRun(strategy, memory, error=f"demo exit {outcome.exit_status}: {tail}")
    return cell_from_doc(strategy, memory, outcome.doc)


def run_cell(
    runner: DemoRunner, strategy: str, memory: str, params: StrategyBenchParams, run_dir: Path
) -> CellRun:
    """One cell; a demo that fails to run is retried once (except `none`, whose guest may
    legitimately break after losing device writes), in `run_dir`-retry."""
    cell = runner(strategy, memory, params, run_dir)
    if cell.error is not None and not expected_incorrect(strategy):
        cell = runner(strategy, memory, params, run_dir.with_name(f"{run_dir.name}-retry"))
    return cell


def run_cells(
    params: StrategyBenchParams,
    workdir: Path,
    runner: DemoRunner = demo_cell,
    console: Console | None = None,
) -> list[CellRun]:
    """Every cell, interleaved; a cell whose demo fails to run is retried once (except `none`,
    whose guest may legitimately break after losing device writes)."""
    cells: list[CellRun] = []
    total = params.cell_count
    for i in range(params.runs):
        for memory in params.memories:
            for strategy in params.labels_at(memory):
                t0 = time.monotonic()
                tag = f"{strategy}-{memory}-{i}"
                progress.step(
                    f"{strategy}, {memory} guest (cell {len(cells) + 1}/{total})",
                    i + 1,
                    params.runs,
                )
                cell = run_cell(runner, strategy, memory, params, workdir / tag)
                cells.append(cell)
                if console is not None:
                    console.print(
                        progress_line(cell, len(cells), total, time.monotonic() - t0),
                        highlight=False,
                        markup=False,
                        soft_wrap=True,
                    )
    return cells


def progress_line(c: CellRun, n: int, total: int, took_s: float) -> str:
    head = f"  [{n}/{total}] {c.strategy:<21} {c.memory:>5} ({took_s:4.0f} s): "
    if c.error is not None:
        return head + f"demo failed: {c.error.splitlines()[0] if c.error else ''}"
    return head + (
        f"{c.status}, downtime {format_value(c.downtime_ms)} ms, "
        f"{format_value(c.bytes_sent / MiB)} MiB, mismatched "
        f"{format_value(c.mismatched)}, lost {format_value(c.lost)}, wrong "
        f"{format_value(c.wrong)}" + ("" if c.correct else "  NOT VERIFIED")
    )


def cells_text(params: StrategyBenchParams) -> str:
    """What the cells are: strategies × sizes on each disk, × runs."""
    parts = []
    if params.strategies:
        parts.append(f"{len(params.strategies)} strategies × {', '.join(params.memories)}")
    if params.vhost_user:
        parts.append(
            f"{len(params.vhost_user)} on a vhost-user disk × {', '.join(params.vhost_memories)}"
        )
    return f"({' and '.join(parts)}) × {params.runs} run(s)"


def run_strategy_bench(
    params: StrategyBenchParams,
    console: Console | None = None,
    runner: DemoRunner = demo_cell,
    workdir: Path | None = None,
) -> list[Result]:
    console = console or _console()
    console.print(
        f"  {cells_text(params)} = {params.cell_count} cells, {params.load_text()}, "
        f"{params.warmup_s:g} s before each migration and {params.after_s:g} s after its "
        "switchover, "
        f"{params.bandwidth_text()}",
        highlight=False,
    )
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ptmig-bench-strategies-") as d:
            cells = run_cells(params, Path(d), runner, console)
    else:
        cells = run_cells(params, workdir, runner, console)
    for memory in params.memories:
        console.print(cell_table(cells, params, memory))
    return cell_results(cells, params) + derived_results(cells, params)


def _console() -> Console:
    c = Console()
    return c if c.is_terminal else Console(width=160)


# ---- the data path alone: shadowed vs direct DMA on one guest, no migration ---------------------


def datapath_names(disk: str = "builtin") -> tuple[str, str, str]:
    """The shadow data path's result names with the kv log on `disk`."""
    base = "strategy.shadow" if disk == "builtin" else f"strategy.{disk}.shadow"
    return (
        f"{base}.datapath.direct_ops",
        f"{base}.datapath.shadow_ops",
        f"{base}.datapath_vs_direct",
    )


DATAPATH_MODES = ("direct", "shadow", "intercept")
DATAPATH_RESULTS = (
    "strategy.shadow.datapath.direct_ops",
    "strategy.shadow.datapath.shadow_ops",
    "strategy.shadow.datapath_vs_direct",
    "strategy.intercept.datapath.intercept_ops",
    "strategy.intercept.datapath_vs_direct",
    "strategy.datapath.cpu_us_per_request.direct",
    "strategy.datapath.cpu_us_per_request.shadow",
    "strategy.datapath.cpu_us_per_request.intercept",
)


@dataclass
class DatapathRun:
    """One load on one guest in one DMA mode: kv ops/s, and host CPU per request (the VMM
    without its vCPU threads, plus the device processes)."""

    ops_per_s: float
    cpu_us_per_request: float


def _host_cpu_s(vmm_pid: int, device_pids: Sequence[int]) -> CpuSample:
    """A CPU sample of the VMM with the device processes' time added to its total."""
    from ..cputime import sample

    s = sample(vmm_pid)
    if s is None:
        raise BenchError(f"the kv VMM (pid {vmm_pid}) is gone")
    for pid in device_pids:
        d = sample(pid)
        if d is not None:
            s.total_s += d.total_s
    return s


def datapath_load(vmm: Any, qmp: Any, mode: str, seconds: float) -> DatapathRun:
    """kv --max load for `seconds` with the devices in `mode` (direct, or shadow / intercept
    through x-shadow-start); lost or wrong values are an error."""
    from ..cputime import migration_cpu_s
    from ..load import LoadOptions, run_load

    pids = vmm.device_pids()
    if mode != "direct":
        qmp.execute("x-shadow-start", {"x-dma-tracking": mode})
    try:
        start = _host_cpu_s(vmm.proc.pid, pids)
        r = run_load(LoadOptions(config=vmm.config, duration_s=seconds))
        end = _host_cpu_s(vmm.proc.pid, pids)
    finally:
        if mode != "direct":
            qmp.execute("x-shadow-stop")
    if r.lost or r.wrong:
        raise BenchError(f"kv under {mode} DMA lost {r.lost}, wrong {r.wrong}")
    requests = max(1.0, r.ops_per_s * seconds)
    return DatapathRun(r.ops_per_s, migration_cpu_s(start, end) / requests * 1e6)


def shadow_datapath(
    pairs: int,
    seconds: float,
    memory: str = "512M",
    console: Console | None = None,
    disk: str = "builtin",
) -> list[Result]:
    """kv ops/s (--max) and host CPU per request with direct DMA, then with every device
    shadowed, then intercepted (`x-shadow-start`), in turn `pairs` times on the same guest: the
    cost of each software data path by itself, without migration traffic competing for the
    CPUs. Each round's ratios are measured back to back; the results are their medians.
    `disk`: the kv log's disk (`KvVmm`); on a vhost-user disk only direct and shadow (the
    goal there is shadow's, issue 13's)."""
    from ..load import LoadOptions, run_load
    from ..vmmproc import QmpMonitor
    from .devices import KvVmm

    console = console or _console()
    modes = DATAPATH_MODES if disk == "builtin" else ("direct", "shadow")
    runs: dict[str, list[DatapathRun]] = {mode: [] for mode in modes}
    with KvVmm(memory, qmp=True, disk=disk) as vmm, QmpMonitor(vmm.qmp_path(), "kv vmm") as qmp:
        qmp.connect(vmm.proc)
        run_load(LoadOptions(config=vmm.config, duration_s=1.0, verify=False))  # warm up
        for k in range(pairs):
            progress.step(f"data path ({disk} disk): {', '.join(modes)}", k + 1, pairs)
            for mode in modes:
                runs[mode].append(datapath_load(vmm, qmp, mode, seconds))
            console.print(
                f"  data path ({disk} disk): "
                + ", ".join(
                    f"{mode} {runs[mode][-1].ops_per_s:.0f} ops/s "
                    f"{runs[mode][-1].cpu_us_per_request:.0f} µs CPU/req"
                    for mode in modes
                ),
                highlight=False,
            )
    extra = {"memory": memory, "disk": disk, "seconds": seconds, "pairs": pairs}
    if disk != "builtin":
        return disk_datapath_results(runs, extra, disk)
    return datapath_results(runs, extra)


def disk_datapath_results(
    runs: Mapping[str, Sequence[DatapathRun]], extra: dict[str, Any], disk: str
) -> list[Result]:
    """Direct and shadowed kv ops/s with the kv log on `disk`, and their paired ratio (pure)."""
    direct = [r.ops_per_s for r in runs["direct"]]
    shadowed = [r.ops_per_s for r in runs["shadow"]]
    what = {**extra, "what": "kv --max ops/s, shadowed ÷ direct, same guest, back to back"}
    direct_name, shadow_name, ratio_name = datapath_names(disk)
    return [
        measured(SECTION, direct_name, direct, "ops/s", extra=what),
        measured(SECTION, shadow_name, shadowed, "ops/s", extra=what),
        measured(
            SECTION,
            ratio_name,
            paired_ratios(shadowed, direct),
            "ratio",
            GOAL_VHOST_USER_DATAPATH,
            what,
        ),
    ]


def datapath_results(
    runs: Mapping[str, Sequence[DatapathRun]], extra: dict[str, Any]
) -> list[Result]:
    """The data path's results from its runs per mode (pure)."""
    ops = {mode: [r.ops_per_s for r in runs[mode]] for mode in DATAPATH_MODES}
    what = {**extra, "what": "kv --max ops/s, same guest, back to back, no migration"}
    cpu_what = {
        **extra,
        "what": "host CPU µs per kv request: the VMM without its vCPU threads, plus the "
        "device processes",
    }

    def ratio(name: str, mode: str, goal: Goal) -> Result:
        return measured(
            SECTION,
            name,
            paired_ratios(ops[mode], ops["direct"]),
            "ratio",
            goal,
            {**what, "what": f"kv --max ops/s, {mode} ÷ direct, paired rounds, no migration"},
        )

    (direct_ops, shadow_ops, shadow_ratio, intercept_ops, intercept_ratio, *cpu_names) = (
        DATAPATH_RESULTS
    )
    return [
        measured(SECTION, direct_ops, ops["direct"], "ops/s", extra=what),
        measured(SECTION, shadow_ops, ops["shadow"], "ops/s", extra=what),
        ratio(shadow_ratio, "shadow", GOAL_DURING_VS_BEFORE),
        measured(SECTION, intercept_ops, ops["intercept"], "ops/s", extra=what),
        ratio(intercept_ratio, "intercept", GOAL_INTERCEPT_VS_DIRECT),
        *[
            measured(
                SECTION, name, [r.cpu_us_per_request for r in runs[mode]], "µs", extra=cpu_what
            )
            for name, mode in zip(cpu_names, DATAPATH_MODES, strict=True)
        ],
    ]


MAX_RATE_RESULTS = ("strategy.load.max_ops", "strategy.load.offered_ops")  # (prefix "strategy")


def max_rate(seconds: float, memory: str = "512M") -> float:
    """kv ops/s the load client reaches, unpaced, against one kv guest that is not migrating
    (after a 1 s warm-up): the maximum the cells' offered load is a fraction of."""
    from ..load import LoadOptions, run_load
    from .devices import KvVmm

    progress.step("the maximum kv load, one guest, no migration")
    with KvVmm(memory) as vmm:
        run_load(LoadOptions(config=vmm.config, duration_s=1.0, verify=False))
        r = run_load(LoadOptions(config=vmm.config, duration_s=seconds))
    if r.lost or r.wrong or not r.ops_per_s > 0:
        raise BenchError(
            f"the maximum kv load could not be measured: {r.ops_per_s:.0f} ops/s, "
            f"lost {r.lost}, wrong {r.wrong}"
        )
    return r.ops_per_s


def with_offered_load(
    params: StrategyBenchParams, maximum: float, prefix: str = "strategy"
) -> tuple[StrategyBenchParams, list[Result]]:
    """The parameters with `rate` set to `load_fraction` of `maximum`, and both as results
    (`<prefix>.load.max_ops` and `.offered_ops`: `MAX_RATE_RESULTS` for this section)."""
    offered = maximum * params.load_fraction
    extra = {
        "what": "kv ops/s of the load client, unpaced, against one guest that is not "
        "migrating; the cells offer load_fraction of it",
        "load_fraction": params.load_fraction,
    }
    max_name, offered_name = (f"{prefix}.load.max_ops", f"{prefix}.load.offered_ops")
    return replace(params, rate=round(offered)), [
        Result(SECTION, max_name, maximum, "ops/s", None, None, [maximum], extra),
        Result(SECTION, offered_name, offered, "ops/s", None, None, [offered], extra),
    ]


def offered_load(
    config: BenchConfig, params: StrategyBenchParams, prefix: str = "strategy"
) -> tuple[StrategyBenchParams, list[Result]]:
    """The cells' offered load: `config.rate` when the user fixed it (`ptmig bench --rate`:
    runs on different days, or a host busy when the section starts, then offer the same load),
    else `load_fraction` of the maximum measured now (`max_rate`)."""
    if config.rate is None:
        return with_offered_load(params, max_rate(3.0 if config.quick else 5.0), prefix)
    extra = {"what": "kv ops/s the cells offer, fixed by `ptmig bench --rate`"}
    return replace(params, rate=config.rate), [
        Result(
            SECTION,
            f"{prefix}.load.offered_ops",
            config.rate,
            "ops/s",
            None,
            None,
            [config.rate],
            extra,
        )
    ]


def run(config: BenchConfig) -> list[Result]:
    """The section `strategies`: every strategy on ptmig's disk, and on a vhost-user disk
    where qemu-storage-daemon is installed."""
    params = StrategyBenchParams.for_config(config)
    if not params.vhost_user:
        _console().print(f"  no vhost-user cells: {NO_DAEMON}", highlight=False)
    return run_section(config, params)


def run_vhost_user(config: BenchConfig) -> list[Result]:
    """The section `strategies-vhost-user`: the vhost-user cells (none, device-log, shadow at
    256 MiB and 1 GiB) and the shadow data path on the real backend, without the builtin
    cells, so issue 13's rows can be measured in a fraction of the whole section's time."""
    return run_section(config, StrategyBenchParams.vhost_user_only(config))


def run_section(config: BenchConfig, params: StrategyBenchParams) -> list[Result]:
    """The offered load, the cells of `params`, then the data path on each disk whose cells
    include shadow. ptmig is compiled to bytecode first (`compile_ptmig`), as an installed
    package has it: the cells' CPU per GiB is the migration's, not the compiler's."""
    compile_ptmig()
    params, results = offered_load(config, params)
    results += run_strategy_bench(params)
    disks = (["builtin"] if params.strategies else []) + (
        [VHOST_USER] if "shadow" in params.vhost_user else []
    )
    try:
        for disk in disks:
            results += shadow_datapath(params.datapath_pairs, params.datapath_s, disk=disk)
    except Exception as e:  # keep the strategy cells: they took minutes
        raise BenchError(f"the data path measurement failed: {e}", partial=results) from e
    return results
