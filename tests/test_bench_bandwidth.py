"""The cost-by-bandwidth benchmark: results and goals from synthetic cells (the p99 ratio taken
run by run, both goals per bandwidth), the interleaving, retry and per-bandwidth parameters
with a fake runner, its Markdown table, and (on KVM) a tiny real run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ptmig.bench import load_section, run_bench, select_sections, write_json
from ptmig.bench.bandwidth import (
    BandwidthBenchParams,
    BandwidthCell,
    expected_result_names,
    results,
    run_bandwidth_bench,
    run_cells,
)
from ptmig.bench.dirtylog import PHASES, LoadStats
from ptmig.bench.dirtylog import result_names as floor_names
from ptmig.bench.dirtylog import results as floor_results
from ptmig.bench.harness import BenchConfig, BenchError
from ptmig.bench.markdown import render
from ptmig.bench.strategies import CellRun, StrategyBenchParams

MiB = 1 << 20


def cell(
    strategy: str,
    *,
    p99_before: float = 2.0,
    p99_precopy: float = 4.0,
    cpu: float = 0.8,
    correct: bool = True,
    error: str | None = None,
) -> CellRun:
    good = correct and strategy != "none"
    return CellRun(
        strategy,
        "1G",
        status="completed",
        total_ms=2000.0,
        downtime_ms=40.0,
        bytes_sent=300.0 * MiB,
        rounds=3.0,
        mismatched=0.0 if good else 130.0,
        lost=0.0,
        wrong=0.0,
        unverified=0.0,
        acked=1000.0,
        covered=True,
        latency={
            "before": {"p50_ms": 1.0, "p99_ms": p99_before, "max_ms": 5.0},
            "precopy": {"p50_ms": 2.0, "p99_ms": p99_precopy, "max_ms": 9.0},
        },
        cpu_source=cpu,
        cpu_destination=cpu * 0.9,
        error=error,
    )


def by_name(rs: list[Any]) -> dict[str, Any]:
    return {r.name: r for r in rs}


PARAMS = BandwidthBenchParams(bandwidths=(100.0, 400.0), strategies=("none", "shadow"), runs=3)


def test_the_p99_ratio_is_the_median_of_each_runs_own_ratio_not_a_ratio_of_medians() -> None:
    # per run: 6/2 = 3.0, 3/1 = 3.0, 4/4 = 1.0 -> median 3.0; medians' ratio would be 4/2 = 2.0
    runs = [
        cell("shadow", p99_before=2.0, p99_precopy=6.0),
        cell("shadow", p99_before=1.0, p99_precopy=3.0),
        cell("shadow", p99_before=4.0, p99_precopy=4.0),
    ]
    p = BandwidthBenchParams(bandwidths=(100.0,), strategies=("shadow",), runs=3)
    r = by_name(results([BandwidthCell(100.0, c) for c in runs], p))
    ratio = r["bandwidth.shadow.100MiBps.p99_ratio"]
    assert ratio.value == 3.0 and sorted(ratio.runs) == [1.0, 3.0, 3.0]
    assert ratio.ok is False and ratio.goal == "≤ 2"
    assert r["bandwidth.shadow.100MiBps.p99_before"].value == 2.0
    assert r["bandwidth.shadow.100MiBps.p99_precopy"].value == 4.0


def test_both_goals_counts_the_bandwidths_where_latency_and_cpu_on_both_sides_were_met() -> None:
    cells = []
    for _ in range(3):
        cells += [
            BandwidthCell(100.0, cell("none", p99_precopy=5.0, cpu=0.9)),  # latency missed
            BandwidthCell(400.0, cell("none", p99_precopy=3.6, cpu=0.5)),  # both met
            BandwidthCell(100.0, cell("shadow", p99_precopy=3.0, cpu=1.5)),  # CPU missed
            BandwidthCell(400.0, cell("shadow", p99_precopy=9.0, cpu=0.6)),  # latency missed
        ]
    r = by_name(results(cells, PARAMS))
    none, shadow = r["bandwidth.none.both_goals"], r["bandwidth.shadow.both_goals"]
    assert (none.value, none.ok) == (1.0, True)
    assert none.extra["met_at_mib"] == {"100": False, "400": True}
    assert (shadow.value, shadow.ok) == (0.0, False)
    assert shadow.extra["met_at_mib"] == {"100": False, "400": False}
    assert r["bandwidth.shadow.100MiBps.cpu_source"].ok is False
    assert r["bandwidth.shadow.100MiBps.cpu_destination"].ok is False  # 1.35
    assert r["bandwidth.shadow.400MiBps.cpu_source"].ok is True
    assert r["bandwidth.shadow.100MiBps.bytes"].value == 300.0  # MiB


def test_a_destination_over_budget_alone_misses_both_goals() -> None:
    c = cell("shadow", p99_precopy=3.0, cpu=0.8)
    c.cpu_destination = 1.2
    p = BandwidthBenchParams(bandwidths=(200.0,), strategies=("shadow",), runs=1)
    r = by_name(results([BandwidthCell(200.0, c)], p))
    assert r["bandwidth.shadow.200MiBps.cpu_source"].ok is True
    assert r["bandwidth.shadow.both_goals"].value == 0.0


def test_correctness_is_the_worst_run_and_none_has_no_goal() -> None:
    cells = [
        BandwidthCell(100.0, cell("shadow")),
        BandwidthCell(100.0, cell("shadow", correct=False)),
        BandwidthCell(100.0, cell("none")),
    ]
    p = BandwidthBenchParams(bandwidths=(100.0,), strategies=("none", "shadow"), runs=2)
    r = by_name(results(cells, p))
    shadow = r["bandwidth.shadow.100MiBps.correct"]
    assert (shadow.value, shadow.ok, shadow.runs) == (0.0, False, [1.0, 0.0])
    none = r["bandwidth.none.100MiBps.correct"]
    assert none.value == 0.0 and none.goal is None and none.ok is None


def test_a_cell_without_runs_reports_nan_and_misses_its_goals() -> None:
    r = by_name(results([], PARAMS))
    ratio = r["bandwidth.shadow.400MiBps.p99_ratio"]
    assert math.isnan(ratio.value) and ratio.ok is False
    assert r["bandwidth.shadow.both_goals"].value == 0.0


def test_the_expected_names_are_the_results_names_in_order() -> None:
    cells = [BandwidthCell(b, cell(s)) for b in PARAMS.bandwidths for s in PARAMS.strategies]
    assert [r.name for r in results(cells, PARAMS)] == expected_result_names(PARAMS)
    assert "bandwidth.shadow.400MiBps.cpu_destination" in expected_result_names(PARAMS)


class FakeRunner:
    """Records what each cell was asked to run; the cells listed in `fail` fail once."""

    def __init__(self, fail: set[tuple[str, float]] | None = None) -> None:
        self.calls: list[tuple[str, str, float, float | None, Path]] = []
        self.fail = set(fail or ())

    def __call__(self, strategy: str, memory: str, p: StrategyBenchParams, d: Path) -> CellRun:
        self.calls.append((strategy, memory, p.max_bandwidth_mib, p.rate, d))
        assert p.strategies == PARAMS.strategies and p.memories == (memory,) and p.runs == 1
        key = (strategy, p.max_bandwidth_mib)
        if key in self.fail:
            self.fail.discard(key)
            return cell(strategy, error="demo raised RuntimeError: boom")
        return cell(strategy)


def test_cells_interleave_every_bandwidth_and_strategy_per_run_at_its_own_bandwidth(
    tmp_path: Path,
) -> None:
    runner = FakeRunner()
    p = BandwidthBenchParams(
        bandwidths=PARAMS.bandwidths,
        strategies=PARAMS.strategies,
        runs=2,
        cells=StrategyBenchParams(rate=20_000.0),
    )
    cells = run_cells(p, tmp_path, runner)
    order = [(s, bw) for s, _, bw, _, _ in runner.calls]
    one_run = [("none", 100.0), ("shadow", 100.0), ("none", 400.0), ("shadow", 400.0)]
    assert order == one_run * 2
    assert [(c.run.strategy, c.bandwidth) for c in cells] == one_run * 2
    assert {rate for *_, rate, _ in runner.calls} == {20_000.0}
    assert {m for _, m, *_ in runner.calls} == {"1G"}
    assert len({d for *_, d in runner.calls}) == 8  # a directory of its own per cell


def test_a_failed_cell_is_retried_once_but_none_is_not(tmp_path: Path) -> None:
    runner = FakeRunner(fail={("shadow", 400.0), ("none", 100.0)})
    p = BandwidthBenchParams(bandwidths=PARAMS.bandwidths, strategies=PARAMS.strategies, runs=1)
    cells = run_cells(p, tmp_path, runner)
    assert [(s, bw) for s, _, bw, _, _ in runner.calls] == [
        ("none", 100.0),
        ("shadow", 100.0),
        ("none", 400.0),
        ("shadow", 400.0),
        ("shadow", 400.0),
    ]
    assert runner.calls[-1][-1].name.endswith("-retry")
    assert cells[0].run.error is not None  # none's failure stays
    assert cells[-1].run.error is None


@pytest.mark.parametrize(
    "kw",
    [
        {"bandwidths": ()},
        {"bandwidths": (0.0,)},
        {"bandwidths": (-5.0, 100.0)},
        {"bandwidths": (math.inf,)},
        {"bandwidths": (100.0, 100.0)},
        {"strategies": ()},
        {"strategies": ("shadow", "teleport")},
        {"runs": 0},
        {"memory": "lots"},
    ],
)
def test_bad_parameters_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BandwidthBenchParams(**kw)


def test_the_full_mode_measures_four_strategies_at_three_bandwidths_and_quick_is_small() -> None:
    full = BandwidthBenchParams.for_config(BenchConfig(quick=False, runs=5))
    assert full.strategies == ("none", "device-log", "shadow", "intercept")
    assert full.bandwidths == (100.0, 200.0, 400.0) and full.runs == 3 and full.memory == "1G"
    quick = BandwidthBenchParams.for_config(BenchConfig(quick=True, runs=1))
    assert quick.cell_count == 4


def test_the_section_runs_with_make_bench() -> None:
    assert "bandwidth" in select_sections(None)
    assert select_sections(["bandwidth"]) == ["bandwidth"]


def test_the_markdown_has_one_row_per_strategy_and_bandwidth(tmp_path: Path) -> None:
    runner = FakeRunner()
    out = Console(file=open(tmp_path / "out.txt", "w"), width=200)
    rs = run_bandwidth_bench(
        BandwidthBenchParams(bandwidths=PARAMS.bandwidths, strategies=PARAMS.strategies, runs=1),
        out,
        runner,
        tmp_path,
    )
    for r in rs:
        r.section = "bandwidth"
    md = render({"results": [r.to_json() for r in rs]})
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    table_rows = [line for line in rows if not line.startswith("| `bandwidth.")]
    assert [line.split("|")[1:3] for line in table_rows] == [
        [" `none` ", " 100 "],
        [" `none` ", " 400 "],
        [" `shadow` ", " 100 "],
        [" `shadow` ", " 400 "],
    ]
    # p99 pre-copy ÷ before and the CPU pair are the row's columns
    assert "| 2.000 | 0.8000 / 0.7200 |" in table_rows[0]
    text = (tmp_path / "out.txt").read_text()
    assert "cost by max-bandwidth" in text and "400 MiB/s" in text


# ---- on real KVM -----------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.timeout(300)
def test_tiny_real_run_reports_every_result(tmp_path: Path, monkeypatch: Any) -> None:
    import ptmig.bench.bandwidth as mod

    tiny = BandwidthBenchParams(
        bandwidths=(100.0, 400.0),
        strategies=("shadow",),
        memory="256M",
        runs=1,
        cells=StrategyBenchParams(warmup_s=2.0, after_s=2.0),
    )
    monkeypatch.setattr(mod.BandwidthBenchParams, "for_config", classmethod(lambda cls, c: tiny))
    report = run_bench(
        BenchConfig(quick=True, runs=1),
        [("bandwidth", load_section("bandwidth"))],
        Console(file=open(tmp_path / "out.txt", "w"), width=200),
    )
    path = tmp_path / "bench.json"
    write_json(report, path)
    doc = json.loads(path.read_text())
    assert doc["errors"] == []
    got = {r["name"]: r for r in doc["results"]}
    assert list(got) == [
        "bandwidth.load.max_ops",
        "bandwidth.load.offered_ops",
        *expected_result_names(tiny),
        *floor_names(),
    ]
    for name in floor_names():  # the floor: dirty or DMA tracking alone, no migration
        assert got[name]["value"] > 0, got[name]
    assert got["bandwidth.dirty_log.300ms.p99_ratio"]["goal"] is None
    for bw in ("100", "400"):
        name = f"bandwidth.shadow.{bw}MiBps"
        assert got[f"{name}.correct"]["value"] == 1.0, got[f"{name}.correct"]["extra"]
        assert got[f"{name}.p99_ratio"]["value"] > 0
        assert got[f"{name}.cpu_source"]["value"] > 0
        assert got[f"{name}.cpu_destination"]["value"] > 0
        rounds = got[f"{name}.rounds"]["value"]
        assert 0 < got[f"{name}.bytes"]["value"] <= rounds * 256 * 1.02  # MiB
    assert got["bandwidth.shadow.both_goals"]["value"] in (0.0, 1.0, 2.0)


def test_the_dirty_log_floor_is_each_pairs_own_ratio_without_a_goal() -> None:
    def stats(p50: float, p99: float, commits: int = 4000) -> LoadStats:
        return LoadStats(p50, p99, 20_000.0, 0, commits)

    pairs = {
        phase.name: [
            (stats(1.0, 2.0), stats(2.0, 6.0, 2000)),  # p99 x3, commits x0.5
            (stats(1.0, 4.0), stats(1.5, 4.0, 4000)),  # x1, x1
            (stats(2.0, 3.0), stats(2.0, 6.0, 1000)),  # x2, x0.25
        ]
        for phase in PHASES
    }
    rs = floor_results(pairs, [80.0, 90.0, 100.0], {"memory": "1G"})
    assert [r.name for r in rs] == floor_names()
    got = {r.name: r for r in rs}
    assert got["bandwidth.dirty_log.300ms.p99_ratio"].value == 2.0  # median of 3, 1, 2
    assert got["bandwidth.dirty_log.1000ms.p50_ratio"].value == 1.5  # median of 2, 1.5, 1
    assert got["bandwidth.dirty_log.rate"].value == 90.0
    # DMA tracking alone: its own names, the same paired ratios
    assert got["bandwidth.dma_tracking.shadow.p99_ratio"].value == 2.0
    assert got["bandwidth.dma_tracking.intercept.p50_ratio"].value == 1.5
    assert "x-shadow-start" in got["bandwidth.dma_tracking.shadow.p99_ratio"].extra["what"]
    # both at once, under the tracking's names; and every phase's log commits, paired the same way
    assert got["bandwidth.dma_tracking.shadow_300ms.p99_ratio"].value == 2.0
    what = got["bandwidth.dma_tracking.intercept_300ms.p50_ratio"].extra["what"]
    assert "x-shadow-start intercept and calc-dirty-rate dirty-bitmap every 300 ms" in what
    assert got["bandwidth.dirty_log.300ms.commit_ratio"].value == 0.5  # median of 0.5, 1, 0.25
    assert got["bandwidth.dma_tracking.shadow_300ms.commit_ratio"].runs == [0.5, 1.0, 0.25]
    assert all(r.goal is None for r in rs)
    assert [(p.mode, p.tracking) for p in PHASES] == [
        ("dirty-bitmap", None),
        ("dirty-bitmap", None),
        ("page-sampling", None),
        (None, "shadow"),
        (None, "intercept"),
        ("dirty-bitmap", "shadow"),
        ("dirty-bitmap", "intercept"),
    ]


def test_a_phase_without_commits_before_it_is_an_error_not_a_ratio() -> None:
    pairs = {
        p.name: [(LoadStats(1.0, 2.0, 1.0, 0, 0), LoadStats(1.0, 2.0, 1.0, 0, 5))] for p in PHASES
    }
    with pytest.raises(BenchError, match="denominator is 0"):
        floor_results(pairs, [1.0], {})
