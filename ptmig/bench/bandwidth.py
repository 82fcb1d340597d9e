"""What a migration costs as a function of `max-bandwidth` (section `bandwidth`).

`max-bandwidth` is the knob a user turns, and the two costs issue 16 sets goals for pull it in
opposite directions:

- the guest's kv latency during pre-copy grows with the bytes moved per second (the senders,
  receivers and their loopback traffic share two cores with the guest, its devices and the
  load client; the tracking's own cost, write-protection faults or the shadow data plane,
  comes on top), so a lower bandwidth hurts the guest less;
- the VMMs' CPU per GiB of RAM shrinks as the bandwidth grows: a guest that dirties pages
  while pre-copy runs makes every round resend what it dirtied meanwhile, so the closer the
  bandwidth is to the guest's dirty rate the more rounds and resent pages a GiB costs, and
  the shadow data plane costs CPU for every second it runs, not for every byte.

So this section runs the `strategies` cells (one `ptmig demo` each: the kv guest with ptmig's
NIC and disk, live-migrated under a fixed offered load of half the client's maximum, x-verify
on) at one RAM size for several bandwidths, and reports per strategy and bandwidth (medians of
the runs):

    bandwidth.<strategy>.<N>MiBps.p99_ratio        kv p99 during pre-copy ÷ before, per run, ≤ 2
    bandwidth.<strategy>.<N>MiBps.cpu_source / .cpu_destination
                                                   VMM CPU s per GiB of guest RAM (vCPU threads
                                                   left out), from `migrate` to the switchover, ≤ 1
    bandwidth.<strategy>.<N>MiBps.p50_before / .p50_precopy / .p99_before / .p99_precopy  (ms)
    bandwidth.<strategy>.<N>MiBps.bytes / .total / .rounds / .downtime
    bandwidth.<strategy>.<N>MiBps.correct          every run verified (none: expected not to)

and per strategy

    bandwidth.<strategy>.both_goals                how many of the bandwidths met both goals, ≥ 1

`all-dirty` is left out: it resends every mapped page each round, so it does not converge at
these bandwidths without auto-converge throttling its guest (the `strategies` section measures
it at one bandwidth). Cells run interleaved (run i of every bandwidth and strategy before run
i + 1), as in `strategies`, so a noisy neighbour hits every cell alike.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import progress
from .dirtylog import run_dirty_log_floor
from .harness import BenchConfig, BenchError, Goal, Result, compile_ptmig
from .strategies import (
    GOAL_CPU_PER_GIB,
    GOAL_P99_PRECOPY_VS_BEFORE,
    CellRun,
    DemoRunner,
    MiB,
    StrategyBenchParams,
    cell_text,
    demo_cell,
    expected_incorrect,
    median_of,
    metric_of,
    offered_load,
    p99_growth,
    progress_line,
    run_cell,
    summary,
)

SECTION = "bandwidth"
BANDWIDTHS_MIB = (100.0, 200.0, 400.0)
STRATEGIES = ("none", "device-log", "shadow", "intercept")
GOAL_BOTH = Goal(">=", 1.0)
FLOOR_SECONDS = 4.0  # each load phase of the dirty-log floor (`ptmig.bench.dirtylog`)
FLOOR_SECONDS_QUICK = 2.0

# (result suffix, CellRun attribute or "lat:<phase>:<stat>", unit, scale, goal)
METRICS: tuple[tuple[str, str, str, float, Goal | None], ...] = (
    ("p50_before", "lat:before:p50_ms", "ms", 1.0, None),
    ("p50_precopy", "lat:precopy:p50_ms", "ms", 1.0, None),
    ("p99_before", "lat:before:p99_ms", "ms", 1.0, None),
    ("p99_precopy", "lat:precopy:p99_ms", "ms", 1.0, None),
    ("p99_ratio", "p99_ratio", "ratio", 1.0, GOAL_P99_PRECOPY_VS_BEFORE),
    ("cpu_source", "cpu_source", "s/GiB", 1.0, GOAL_CPU_PER_GIB),
    ("cpu_destination", "cpu_destination", "s/GiB", 1.0, GOAL_CPU_PER_GIB),
    ("bytes", "bytes_sent", "MiB", 1 / MiB, None),
    ("total", "total_ms", "ms", 1.0, None),
    ("rounds", "rounds", "rounds", 1.0, None),
    ("downtime", "downtime_ms", "ms", 1.0, None),
)


@dataclass(frozen=True)
class BandwidthBenchParams:
    bandwidths: tuple[float, ...] = BANDWIDTHS_MIB  # MiB/s
    strategies: tuple[str, ...] = STRATEGIES
    memory: str = "1G"
    runs: int = 3
    cells: StrategyBenchParams = StrategyBenchParams(warmup_s=3.0, after_s=3.0)

    def __post_init__(self) -> None:
        if not self.bandwidths or any(not (b > 0 and math.isfinite(b)) for b in self.bandwidths):
            raise ValueError(f"bandwidths {self.bandwidths} must be finite MiB/s above 0")
        if len(set(self.bandwidths)) != len(self.bandwidths):
            raise ValueError(f"bandwidths {self.bandwidths} must differ")
        if not self.strategies:
            raise ValueError("at least one strategy is needed, got none")
        if self.runs < 1:
            raise ValueError(f"runs={self.runs} must be at least 1")
        # the cells' own checks (strategy names, RAM size, phases)
        replace(self.cells, strategies=self.strategies, memories=(self.memory,))

    @classmethod
    def for_config(cls, config: BenchConfig) -> BandwidthBenchParams:
        if config.quick:  # 4 cells, about 2 minutes
            return cls(
                bandwidths=(100.0, 400.0),
                strategies=("none", "shadow"),
                memory="256M",
                runs=1,
            )
        # 4 strategies × 3 bandwidths × 3 runs = 36 cells at 1 GiB, 15-25 s each: 10-15 min
        return cls(runs=min(config.runs, 3))

    def at(self, bandwidth: float) -> StrategyBenchParams:
        """The cells' parameters at one bandwidth."""
        return replace(
            self.cells,
            strategies=self.strategies,
            memories=(self.memory,),
            runs=1,
            max_bandwidth_mib=bandwidth,
        )

    @property
    def cell_count(self) -> int:
        return self.runs * len(self.bandwidths) * len(self.strategies)


@dataclass
class BandwidthCell:
    bandwidth: float  # MiB/s
    run: CellRun

    @property
    def p99_ratio(self) -> float:
        return p99_growth(self.run)


def cell_name(strategy: str, bandwidth: float, metric: str) -> str:
    return f"{SECTION}.{strategy}.{bandwidth:g}MiBps.{metric}"


def run_cells(
    params: BandwidthBenchParams,
    workdir: Path,
    runner: DemoRunner = demo_cell,
    console: Console | None = None,
) -> list[BandwidthCell]:
    """Every cell, interleaved; a cell whose demo fails to run is retried once (except `none`,
    whose guest may legitimately break after losing device writes)."""
    cells: list[BandwidthCell] = []
    total = params.cell_count
    for i in range(params.runs):
        for bw in params.bandwidths:
            at = params.at(bw)
            for strategy in params.strategies:
                t0 = time.monotonic()
                tag = f"{strategy}-{bw:g}MiBps-{i}"
                progress.step(
                    f"{strategy} at {bw:g} MiB/s (cell {len(cells) + 1}/{total})",
                    i + 1,
                    params.runs,
                )
                cell = run_cell(runner, strategy, params.memory, at, workdir / tag)
                cells.append(BandwidthCell(bw, cell))
                if console is not None:
                    line = progress_line(cell, len(cells), total, time.monotonic() - t0)
                    console.print(
                        line.replace(f" {params.memory} (", f" {bw:g} MiB/s (", 1),
                        highlight=False,
                        markup=False,
                        soft_wrap=True,
                    )
    return cells


def _of(cells: Sequence[BandwidthCell], strategy: str, bw: float) -> list[BandwidthCell]:
    return [c for c in cells if c.run.strategy == strategy and c.bandwidth == bw]


def _value(c: BandwidthCell, attr: str) -> float:
    return c.p99_ratio if attr == "p99_ratio" else metric_of(c.run, attr)


def results(cells: Sequence[BandwidthCell], params: BandwidthBenchParams) -> list[Result]:
    """Every metric of every (strategy, bandwidth), then each strategy's count of bandwidths
    that met both goals (pure: no KVM, no processes)."""
    out: list[Result] = []
    for strategy in params.strategies:
        met: dict[str, bool] = {}
        for bw in params.bandwidths:
            runs = _of(cells, strategy, bw)
            extra: dict[str, Any] = {
                "strategy": strategy,
                "max_bandwidth_mib": bw,
                "ram": params.memory,
                "runs": len(runs),
                "correct_runs": sum(c.run.correct for c in runs),
            }
            errors = [c.run.error for c in runs if c.run.error]
            if errors:
                extra["errors"] = errors
            by_suffix: dict[str, Result] = {}
            for suffix, attr, unit, scale, goal in METRICS:
                r = summary(
                    cell_name(strategy, bw, suffix),
                    [_value(c, attr) * scale for c in runs],
                    unit,
                    goal,
                    extra,
                    section=SECTION,
                )
                by_suffix[suffix] = r
                out.append(r)
            out.append(_correct(runs, strategy, bw, extra))
            met[f"{bw:g}"] = bool(
                by_suffix["p99_ratio"].ok
                and by_suffix["cpu_source"].ok
                and by_suffix["cpu_destination"].ok
            )
        both = float(sum(met.values()))
        out.append(
            Result(
                SECTION,
                f"{SECTION}.{strategy}.both_goals",
                both,
                "bandwidths",
                str(GOAL_BOTH),
                GOAL_BOTH.met_by(both),
                [both],
                {
                    "met_at_mib": met,
                    "goals": f"p99 ratio {GOAL_P99_PRECOPY_VS_BEFORE}, CPU per GiB of RAM "
                    f"{GOAL_CPU_PER_GIB} on each side",
                },
            )
        )
    return out


def _correct(
    runs: Sequence[BandwidthCell], strategy: str, bw: float, extra: dict[str, Any]
) -> Result:
    """1.0 when every run verified; the worst run decides. `none` has no goal here: it is
    expected to lose device writes."""
    ok = [1.0 if c.run.correct else 0.0 for c in runs]
    value = min(ok) if ok else math.nan
    goal = None if expected_incorrect(strategy) else Goal(">=", 1.0)
    return Result(
        SECTION,
        cell_name(strategy, bw, "correct"),
        value,
        "all runs",
        str(goal) if goal else None,
        goal.met_by(value) if goal else None,
        ok,
        dict(extra, expected_incorrect=expected_incorrect(strategy)),
    )


def expected_result_names(params: BandwidthBenchParams) -> list[str]:
    names: list[str] = []
    for strategy in params.strategies:
        for bw in params.bandwidths:
            names += [cell_name(strategy, bw, suffix) for suffix, *_ in METRICS]
            names.append(cell_name(strategy, bw, "correct"))
        names.append(f"{SECTION}.{strategy}.both_goals")
    return names


TABLE_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("p50 bef", "lat:before:p50_ms", 1.0),
    ("p50 pre", "lat:precopy:p50_ms", 1.0),
    ("p99 bef", "lat:before:p99_ms", 1.0),
    ("p99 pre", "lat:precopy:p99_ms", 1.0),
    ("p99 ×", "p99_ratio", 1.0),
    ("cpu src", "cpu_source", 1.0),
    ("cpu dst", "cpu_destination", 1.0),
    ("MiB", "bytes_sent", 1 / MiB),
    ("total", "total_ms", 1.0),
    ("rounds", "rounds", 1.0),
    ("downtime", "downtime_ms", 1.0),
)


def _median(cells: Sequence[BandwidthCell], attr: str) -> float:
    if attr == "p99_ratio":
        vals = sorted(v for v in (c.p99_ratio for c in cells) if math.isfinite(v))
        if not vals:
            return math.nan
        mid = len(vals) // 2
        return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    return median_of([c.run for c in cells], attr)


def table(cells: Sequence[BandwidthCell], params: BandwidthBenchParams) -> Table:
    t = Table(
        title=f"cost by max-bandwidth, {params.memory} guest ({params.at(0.0).load_text()}, "
        "x-verify on; medians)",
        title_justify="left",
        caption="latency in ms before / during pre-copy; p99 ×: pre-copy ÷ before per run "
        f"(goal {GOAL_P99_PRECOPY_VS_BEFORE}); VMM CPU s per GiB of guest RAM (goal "
        f"{GOAL_CPU_PER_GIB}); MiB sent; total and downtime in ms",
        caption_justify="left",
    )
    t.add_column("strategy", no_wrap=True)
    t.add_column("MiB/s", justify="right")
    for head, _, _ in TABLE_COLUMNS:
        t.add_column(head, justify="right")
    t.add_column("correct", no_wrap=True)
    for strategy in params.strategies:
        for bw in params.bandwidths:
            runs = _of(cells, strategy, bw)
            good = sum(c.run.correct for c in runs)
            expected_bad = expected_incorrect(strategy)
            t.add_row(
                strategy,
                f"{bw:g}",
                *[cell_text(_median(runs, attr) * scale) for _, attr, scale in TABLE_COLUMNS],
                f"{good}/{len(runs)}" + (" (expected ✗)" if expected_bad else ""),
                style=None if good == len(runs) else "yellow" if expected_bad else "red",
            )
    return t


def run_bandwidth_bench(
    params: BandwidthBenchParams,
    console: Console | None = None,
    runner: DemoRunner = demo_cell,
    workdir: Path | None = None,
) -> list[Result]:
    console = console or Console(width=120)
    console.print(
        f"  {len(params.strategies)} strategies × {len(params.bandwidths)} bandwidths "
        f"({', '.join(f'{b:g}' for b in params.bandwidths)} MiB/s) × {params.runs} run(s) = "
        f"{params.cell_count} cells, {params.memory} guest, {params.at(0.0).load_text()}",
        highlight=False,
    )
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ptmig-bench-bandwidth-") as d:
            cells = run_cells(params, Path(d), runner, console)
    else:
        cells = run_cells(params, workdir, runner, console)
    console.print(table(cells, params))
    return results(cells, params)


def run(config: BenchConfig) -> list[Result]:
    """The section `bandwidth`: the offered load (half the client's maximum, or `--rate`),
    then the cells."""
    compile_ptmig()
    params = BandwidthBenchParams.for_config(config)
    cells, load = offered_load(config, params.cells, prefix=SECTION)
    out = load + run_bandwidth_bench(replace(params, cells=cells))
    if cells.rate is None:
        raise BenchError("the cells have no offered load")
    return out + run_dirty_log_floor(
        params.memory,
        cells.rate,
        params.runs,
        FLOOR_SECONDS_QUICK if config.quick else FLOOR_SECONDS,
    )
