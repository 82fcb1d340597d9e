"""The strategy comparison benchmark: the cell numbers read out of a demo document, the derived
results and their goals from synthetic cells, the interleaving and retry policy with a fake
runner, and (on KVM) a tiny real run whose JSON holds every expected result name."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ptmig.bench import load_section, run_bench, write_json
from ptmig.bench.harness import BenchConfig, BenchError
from ptmig.bench.strategies import (
    DATAPATH_RESULTS,
    MAX_RATE_RESULTS,
    CellRun,
    DatapathRun,
    StrategyBenchParams,
    cell_from_doc,
    cell_label,
    cell_results,
    cell_table,
    datapath_results,
    derived_results,
    disk_datapath_results,
    expected_result_names,
    precopy_rate,
    run_cells,
    run_strategy_bench,
    split_label,
    with_offered_load,
)
from ptmig.migration.params import DMA_TRACKING
from ptmig.report.bench import strategy_points

MiB = 1 << 20


def demo_doc(
    *,
    downtime: int = 120,
    mismatched: int = 0,
    lost: int = 0,
    wrong: int = 0,
    verify_ms: float = 40.0,
) -> dict[str, Any]:
    """A demo document shaped like `run_demo`'s, with a load series of 100 ms buckets."""
    series = [[round(i * 0.1, 1), 500 if i < 30 else (400 if i < 40 else 450)] for i in range(80)]
    return {
        "migration": {
            "status": "completed",
            "total-time": 1000,
            "downtime": downtime,
            "ram": {"transferred": 64 * MiB, "dirty-sync-count": 3},
            "x-rounds": [
                {"round": 0, "pages": 65536},
                {"round": 1, "pages": 900},
                {
                    "round": 2,
                    "pages": 300,
                    "stop-and-copy": True,
                    "stop-at-ms": 880.0,
                    "downtime-ms": {"pause": 1, "sync": 2, "send": 30, "ack": 80},
                    "destination-ms": {"verify": verify_ms, "vcpus": 1, "devices": 5},
                },
            ],
            "x-verify": {"pages": 65536, "mismatched": mismatched, "first-mismatched": []},
        },
        "load": {
            "acked": 1000,
            "lost": lost,
            "wrong": wrong,
            "unverified": 0,
            "max_gap_ms": 150.0,
            "series": series,
        },
        "guest": {"vcpus": [{"max-gap-us": 140000}]},
        "demo": {
            "phases": [
                {"name": "warm-up", "start_s": 0.0, "end_s": 3.0},
                {"name": "setup", "start_s": 3.0, "end_s": 3.02},
                {"name": "pre-copy", "start_s": 3.02, "end_s": 3.9},
                {"name": "stop-and-copy", "start_s": 3.9, "end_s": 4.02},
                {"name": "after", "start_s": 4.02, "end_s": 8.0},
            ],
            "outage": {
                "client-ms": 150.0,
                "guest-ms": 140.0,
                "client-switchover": {
                    "start_s": 3.89,
                    "end_s": 4.04,
                    "ms": 150.0,
                    "contains-switchover": True,
                },
            },
            "throughput": {"before": 5000.0, "pre-copy": 3500.0, "after": 4500.0},
            "latency": {
                "before": {"n": 900, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0},
                "pre-copy": {"n": 300, "p50_ms": 1.5, "p99_ms": 5.0, "max_ms": 9.0},
                "after": {"n": 1800, "p50_ms": 1.1, "p99_ms": 2.5, "max_ms": 150.0},
            },
            "cpu": {
                "source-s": 0.05,
                "source-s-per-gib": 0.8,
                "source-s-per-ram-gib": 0.2,
                "destination-s": 0.04,
                "destination-s-per-gib": 0.6,
                "destination-s-per-ram-gib": 0.15,
            },
            "problems": [],
        },
    }


def cell(
    strategy: str,
    memory: str,
    downtime: float,
    *,
    correct: bool = True,
    before: float = 5000.0,
    during: float = 4000.0,
    p99: tuple[float, float] = (2.0, 3.0),
    cpu: float = 0.7,
) -> CellRun:
    return CellRun(
        strategy,
        memory,
        status="completed",
        total_ms=1000.0,
        downtime_ms=downtime,
        bytes_sent=64.0 * MiB,
        rounds=3.0,
        client_gap_ms=downtime + 10,
        guest_pause_ms=downtime,
        ops_before=before,
        ops_precopy=during,
        ops_after=4800.0,
        mismatched=0.0 if correct else 12.0,
        lost=0.0 if correct else 3.0,
        wrong=0.0,
        unverified=0.0,
        acked=1000.0,
        covered=True,
        latency={
            "before": {"p50_ms": 1.0, "p99_ms": p99[0], "max_ms": 4.0},
            "precopy": {"p50_ms": 1.2, "p99_ms": p99[1], "max_ms": 9.0},
        },
        cpu_source=cpu,
        cpu_destination=cpu / 2,
    )


def by_name(results: list[Any]) -> dict[str, Any]:
    return {r.name: r for r in results}


# ---- reading a demo document ---------------------------------------------------------------


def test_cell_from_doc_reads_every_column() -> None:
    c = cell_from_doc("shadow", "256M", demo_doc(lost=1, wrong=2))
    assert (c.total_ms, c.downtime_ms, c.bytes_sent, c.rounds) == (1000, 120, 64 * MiB, 3)
    assert (c.client_gap_ms, c.guest_pause_ms) == (150.0, 140.0)
    assert (c.ops_before, c.ops_after) == (5000.0, 4500.0)
    # pre-copy 3.02..3.9 s: whole buckets 3.1 .. 3.7 (400 ops each) -> 4000 ops/s
    assert c.ops_precopy == pytest.approx(4000.0)
    assert (c.lost, c.wrong, c.mismatched) == (1, 2, 0)  # each on its own
    assert c.lat("precopy", "p99_ms") == 5.0 and c.lat("after", "max_ms") == 150.0
    assert (c.cpu_source, c.cpu_destination) == (0.2, 0.15)  # per GiB of guest RAM
    assert (c.cpu_source_sent, c.cpu_destination_sent) == (0.8, 0.6)
    assert c.downtime_parts["ack"] == 80 and c.downtime_parts["destination"]["verify"] == 40.0
    assert not c.correct  # values were lost
    assert cell_from_doc("shadow", "256M", demo_doc()).correct


def test_a_load_that_missed_the_switchover_is_not_a_correct_cell() -> None:
    doc = demo_doc()
    doc["demo"]["throughput"]["after"] = None  # the load ended before the switchover
    c = cell_from_doc("shadow", "256M", doc)
    assert not c.covered and not c.correct


def test_cell_from_doc_without_verification_is_not_correct() -> None:
    doc = demo_doc()
    del doc["migration"]["x-verify"]
    c = cell_from_doc("shadow", "1G", doc)
    assert math.isnan(c.mismatched) and not c.correct
    assert c.ram_bytes == 1 << 30


def test_a_verification_that_failed_is_not_a_pass() -> None:
    doc = demo_doc()
    doc["migration"]["x-verify"] = {"error": "ConnectionResetError: peer went away"}
    c = cell_from_doc("shadow", "1G", doc)
    assert not c.correct and "peer went away" in c.problems[0]
    p = StrategyBenchParams(memories=("1G",), strategies=("shadow",), runs=1)
    lost = by_name(cell_results([c], p))["strategy.shadow.1G.lost"]
    assert lost.extra["correct_runs"] == 0 and "peer went away" in lost.extra["problems"][0]


def test_cell_from_an_empty_document_is_all_nan_and_incorrect() -> None:
    c = cell_from_doc("device-log", "256M", {})
    assert c.status == "failed" and math.isnan(c.downtime_ms) and not c.correct


def test_precopy_rate_uses_whole_buckets_and_falls_back_to_overlap() -> None:
    series = [[0.0, 10], [0.1, 20], [0.2, 30], [0.3, 40]]
    assert precopy_rate(series, 0.1, 0.3) == pytest.approx(250.0)  # buckets 0.1, 0.2
    assert precopy_rate(series, 0.12, 0.18) == pytest.approx(200.0)  # only overlapping: 0.1
    assert math.isnan(precopy_rate(series, 5.0, 6.0))


# ---- derived results -------------------------------------------------------------------------

PARAMS = StrategyBenchParams(memories=("256M", "1G", "2G"), runs=2)


def synthetic_cells(
    shadow_downtime: dict[str, float],
    alldirty_downtime: dict[str, float],
    devicelog_downtime: float = 100.0,
    intercept_downtime: float = 110.0,
) -> list[CellRun]:
    out = []
    for _ in range(2):
        for m in PARAMS.memories:
            out += [
                cell("none", m, 90.0, correct=False),
                cell("all-dirty", m, alldirty_downtime[m]),
                cell("device-log", m, devicelog_downtime),
                cell("shadow", m, shadow_downtime[m]),
                cell("intercept", m, intercept_downtime),
            ]
    return out


def test_derived_results_meet_their_goals_when_shadow_behaves() -> None:
    cells = synthetic_cells(
        {"256M": 110, "1G": 120, "2G": 130}, {"256M": 300, "1G": 1200, "2G": 2400}
    )
    r = by_name(derived_results(cells, PARAMS))
    assert list(r) == expected_result_names(PARAMS)[-len(r) :]
    assert r["strategy.shadow.correct"].value == 1.0 and r["strategy.shadow.correct"].ok
    assert r["strategy.shadow_vs_devicelog.downtime_ratio.1G"].value == pytest.approx(1.2)
    assert r["strategy.shadow.downtime_spread"].value == pytest.approx(130 / 110)
    assert r["strategy.shadow.downtime_spread"].ok
    assert r["strategy.alldirty.downtime_growth"].value == pytest.approx(8.0)
    assert r["strategy.alldirty.downtime_growth"].ok
    assert r["strategy.shadow.during_vs_before"].value == pytest.approx(0.8)
    assert r["strategy.shadow_vs_devicelog.during_vs_before"].value == pytest.approx(1.0)
    assert r["strategy.shadow_vs_devicelog.during_vs_before"].ok is None  # no goal: context
    assert r["strategy.shadow.p99_precopy_vs_before"].value == pytest.approx(1.5)
    assert r["strategy.all-dirty.cpu_per_gib.source"].value == pytest.approx(0.7)
    assert r["strategy.all-dirty.cpu_per_gib.destination"].value == pytest.approx(0.35)
    assert all(x.ok for x in r.values() if x.goal is not None)


def test_intercept_downtime_is_held_to_1_2_times_device_logs() -> None:
    ok = by_name(
        derived_results(
            synthetic_cells(
                {"256M": 110, "1G": 120, "2G": 130}, {"256M": 300, "1G": 1200, "2G": 2400}
            ),
            PARAMS,
        )
    )
    assert ok["strategy.intercept.correct"].ok
    assert ok["strategy.intercept_vs_devicelog.downtime_ratio.1G"].value == pytest.approx(1.1)
    assert ok["strategy.intercept_vs_devicelog.downtime_ratio.1G"].ok
    slow = synthetic_cells(
        {"256M": 110, "1G": 120, "2G": 130},
        {"256M": 300, "1G": 1200, "2G": 2400},
        intercept_downtime=125.0,
    )
    r = by_name(derived_results(slow, PARAMS))
    assert r["strategy.intercept_vs_devicelog.downtime_ratio.2G"].value == pytest.approx(1.25)
    assert r["strategy.intercept_vs_devicelog.downtime_ratio.2G"].ok is False
    assert r["strategy.shadow_vs_devicelog.downtime_ratio.1G"].ok  # shadow's goal stays 1.5


def test_datapath_results_pair_each_mode_with_direct_in_the_same_round() -> None:
    runs = {
        "direct": [DatapathRun(10000, 50), DatapathRun(8000, 60), DatapathRun(9000, 55)],
        "shadow": [DatapathRun(7000, 80), DatapathRun(6400, 90), DatapathRun(6300, 85)],
        "intercept": [DatapathRun(9800, 52), DatapathRun(7200, 63), DatapathRun(8910, 58)],
    }
    r = by_name(datapath_results(runs, {"pairs": 3}))
    assert list(r) == list(DATAPATH_RESULTS)
    assert r["strategy.shadow.datapath_vs_direct"].runs == pytest.approx([0.7, 0.8, 0.7])
    assert r["strategy.shadow.datapath_vs_direct"].ok
    assert r["strategy.intercept.datapath_vs_direct"].runs == pytest.approx([0.98, 0.9, 0.99])
    assert r["strategy.intercept.datapath_vs_direct"].value == pytest.approx(0.98)
    assert r["strategy.intercept.datapath_vs_direct"].ok  # the median pair meets 0.95
    assert r["strategy.datapath.cpu_us_per_request.shadow"].value == 85
    runs["intercept"][0] = DatapathRun(9000, 52)
    runs["intercept"][2] = DatapathRun(8000, 52)
    assert by_name(datapath_results(runs, {}))["strategy.intercept.datapath_vs_direct"].ok is False


def test_latency_and_cpu_goals_are_missed_when_exceeded() -> None:
    p = StrategyBenchParams(memories=("256M",), strategies=("shadow",), runs=2)
    cells = [
        cell("shadow", "256M", 100, p99=(2.0, 5.0), cpu=1.4),
        cell("shadow", "256M", 100, p99=(2.0, 6.0), cpu=1.8),
    ]
    r = by_name(derived_results(cells, p))
    assert r["strategy.shadow.p99_precopy_vs_before"].runs == [2.5, 3.0]
    assert r["strategy.shadow.p99_precopy_vs_before"].ok is False
    assert r["strategy.shadow.cpu_per_gib.source"].ok is False
    assert r["strategy.shadow.cpu_per_gib.destination"].ok is True  # 0.7, 0.9


def test_the_cpu_goal_is_per_gib_of_ram_and_per_gib_sent_is_context() -> None:
    # A mostly-zero guest: cheap per GiB of RAM, dear per GiB sent. Only the first has a goal.
    p = StrategyBenchParams(memories=("1G",), strategies=("shadow",), runs=1)
    c = replace(cell("shadow", "1G", 100), cpu_source=0.4, cpu_source_sent=4.0)
    r = by_name(derived_results([c], p))
    assert r["strategy.shadow.cpu_per_gib.source"].value == pytest.approx(0.4)
    assert r["strategy.shadow.cpu_per_gib.source"].ok is True
    assert r["strategy.shadow.cpu_per_gib_sent.source"].value == pytest.approx(4.0)
    assert r["strategy.shadow.cpu_per_gib_sent.source"].goal is None
    assert "guest RAM" in r["strategy.shadow.cpu_per_gib.source"].extra["what"]


def test_shadow_slowdown_is_compared_with_device_logs_in_the_same_round() -> None:
    p = StrategyBenchParams(memories=("256M",), strategies=("device-log", "shadow"), runs=2)
    cells = [
        cell("device-log", "256M", 100, during=4000),
        cell("shadow", "256M", 100, during=3000),
        cell("device-log", "256M", 100, during=5000),
        cell("shadow", "256M", 100, during=2500),
    ]
    r = by_name(derived_results(cells, p))
    assert r["strategy.shadow.during_vs_before"].runs == [0.6, 0.5]
    assert r["strategy.shadow.during_vs_before"].ok is False
    assert r["strategy.shadow_vs_devicelog.during_vs_before"].runs == pytest.approx([0.75, 0.5])


def test_derived_results_miss_their_goals_when_shadow_does_not() -> None:
    cells = synthetic_cells(
        {"256M": 100, "1G": 250, "2G": 400}, {"256M": 300, "1G": 320, "2G": 330}
    )
    cells.append(cell("shadow", "1G", 120.0, correct=False, during=2000.0))
    r = by_name(derived_results(cells, PARAMS))
    assert r["strategy.shadow.correct"].value == 0.0 and r["strategy.shadow.correct"].ok is False
    assert "1G run" in r["strategy.shadow.correct"].extra["incorrect"][0]
    assert r["strategy.shadow_vs_devicelog.downtime_ratio.2G"].value == pytest.approx(4.0)
    assert r["strategy.shadow_vs_devicelog.downtime_ratio.2G"].ok is False
    assert r["strategy.shadow.downtime_spread"].ok is False
    assert r["strategy.alldirty.downtime_growth"].value == pytest.approx(1.1)
    assert r["strategy.alldirty.downtime_growth"].ok is False


def test_none_losing_data_is_reported_but_has_no_goal() -> None:
    cells = synthetic_cells({m: 100 for m in PARAMS.memories}, {m: 100 for m in PARAMS.memories})
    r = by_name(cell_results(cells, PARAMS))
    none = r["strategy.none.256M.mismatched"]
    assert none.value == 12 and none.goal is None and none.ok is None
    assert none.extra["expected_incorrect"] is True and none.extra["correct_runs"] == 0
    assert "problems" not in r["strategy.shadow.256M.downtime"].extra
    shadow = r["strategy.shadow.256M.mismatched"]
    assert shadow.value == 0 and shadow.ok is True


def test_cell_correctness_is_the_worst_run_not_the_median() -> None:
    cells = [
        cell("shadow", "256M", 100),
        cell("shadow", "256M", 100),
        cell("shadow", "256M", 100, correct=False),
    ]
    p = StrategyBenchParams(memories=("256M",), strategies=("shadow",), runs=3)
    r = by_name(cell_results(cells, p))
    assert r["strategy.shadow.256M.mismatched"].value == 12
    assert r["strategy.shadow.256M.mismatched"].ok is False
    assert r["strategy.shadow.256M.downtime"].value == 100


def test_cell_results_feed_the_report_plot() -> None:
    cells = synthetic_cells(
        {"256M": 110, "1G": 120, "2G": 130}, {"256M": 300, "1G": 1200, "2G": 2400}
    )
    results = cell_results(cells, PARAMS)
    doc = {"results": [r.to_json() for r in results]}
    points = strategy_points(doc)
    assert set(points) == {"none", "all-dirty", "device-log", "shadow", "intercept"}
    ad = points["all-dirty"]
    assert [p.ram_bytes for p in ad] == [256 * MiB, 1 << 30, 2 << 30]
    assert [p.downtime_ms for p in ad] == [300, 1200, 2400]
    assert ad[0].bytes_sent == pytest.approx(64 * MiB)


def test_a_failed_cell_gives_nan_not_a_crash() -> None:
    p = StrategyBenchParams(memories=("256M",), strategies=("shadow", "device-log"), runs=1)
    cells = [CellRun("shadow", "256M", error="demo exit 2: boom"), cell("device-log", "256M", 90)]
    results = cell_results(cells, p) + derived_results(cells, p)
    r = by_name(results)
    assert [x.name for x in results] == expected_result_names(p)
    assert math.isnan(r["strategy.shadow.256M.downtime"].value)
    assert r["strategy.shadow.256M.downtime"].extra["errors"] == ["demo exit 2: boom"]
    assert r["strategy.shadow.correct"].ok is False
    assert math.isnan(r["strategy.shadow_vs_devicelog.downtime_ratio.256M"].value)
    json.dumps([x.to_json() for x in results], allow_nan=False)


def test_params_reject_unknown_strategies_and_sizes() -> None:
    with pytest.raises(ValueError, match="subset"):
        StrategyBenchParams(strategies=("shadow", "magic"))
    with pytest.raises(ValueError, match="256M"):
        StrategyBenchParams(memories=("lots",))
    quick = StrategyBenchParams.for_config(BenchConfig.for_mode(True))
    assert quick.runs == 1 and len(quick.memories) == 2
    with pytest.raises(ValueError, match="got 1.5"):
        StrategyBenchParams(load_fraction=1.5)


def test_the_offered_load_is_the_fraction_of_the_maximum() -> None:
    p, results = with_offered_load(StrategyBenchParams(load_fraction=0.5), 41_000.0)
    assert p.rate == 20_500 and "20,500 ops/s offered" in p.load_text()
    assert [(r.name, r.value) for r in results] == [
        (MAX_RATE_RESULTS[0], 41_000.0),
        (MAX_RATE_RESULTS[1], 20_500.0),
    ]


def test_a_fixed_rate_is_offered_as_given_and_nothing_is_measured(monkeypatch: Any) -> None:
    import ptmig.bench.strategies as mod

    measured: list[float] = []

    def max_rate(s: float, *a: object) -> float:
        measured.append(s)
        return 40_000.0

    monkeypatch.setattr(mod, "max_rate", max_rate)
    p, results = mod.offered_load(BenchConfig(rate=18_000.0), StrategyBenchParams(), "bandwidth")
    assert p.rate == 18_000.0 and measured == []
    assert [(r.name, r.value) for r in results] == [("bandwidth.load.offered_ops", 18_000.0)]
    # without --rate: half of what the client reaches now
    p, results = mod.offered_load(BenchConfig(quick=True), StrategyBenchParams())
    assert p.rate == 20_000 and measured == [3.0]
    assert [r.name for r in results] == list(MAX_RATE_RESULTS)


@pytest.mark.parametrize("rate", [0.0, -5.0, math.nan, math.inf])
def test_a_bench_rate_must_be_a_positive_number(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        BenchConfig(rate=rate)


# ---- running, with a fake demo ---------------------------------------------------------------


def test_run_cells_interleaves_and_retries_a_failed_demo_once(tmp_path: Path) -> None:
    calls: list[str] = []

    def runner(strategy: str, memory: str, p: StrategyBenchParams, d: Path) -> CellRun:
        calls.append(d.name)
        if strategy == "shadow" and not d.name.endswith("retry"):
            return CellRun(strategy, memory, error="demo exit 2: switch port taken")
        if strategy == "none":
            return CellRun(strategy, memory, error="demo exit 2: guest broke")
        return cell(strategy, memory, 100)

    p = StrategyBenchParams(memories=("256M", "1G"), strategies=("none", "shadow"), runs=2)
    cells = run_cells(p, tmp_path, runner)
    assert calls[:3] == ["none-256M-0", "shadow-256M-0", "shadow-256M-0-retry"]
    assert len(cells) == 8 and sum(c.error is None for c in cells) == 4
    assert not any(n.startswith("none") and n.endswith("retry") for n in calls)
    assert [c.memory for c in cells[:4]] == ["256M", "256M", "1G", "1G"]


def test_run_strategy_bench_prints_one_table_per_size(tmp_path: Path) -> None:
    def runner(strategy: str, memory: str, p: StrategyBenchParams, d: Path) -> CellRun:
        return cell(strategy, memory, 100, correct=strategy != "none")

    p = StrategyBenchParams(memories=("256M", "1G"), runs=1)
    console = Console(record=True, width=200)
    results = run_strategy_bench(p, console, runner, tmp_path)
    text = console.export_text()
    assert text.count("strategies, ") == 2 and "(expected ✗)" in text
    assert [r.name for r in results] == expected_result_names(p)
    table = cell_table([cell("shadow", "1G", 100)], p, "1G")
    assert table.row_count == len(p.strategies)


def test_vhost_user_cells_run_beside_the_builtin_ones_with_their_own_goals(
    tmp_path: Path,
) -> None:
    """The vhost-user rows are their own cells (the demo asked for that disk), in every
    table, and their goals are computed from their rows alone: the builtin shadow rows are
    all wrong here, the vhost-user ones all right."""
    asked: list[tuple[str, str]] = []

    def runner(label: str, memory: str, p: StrategyBenchParams, d: Path) -> CellRun:
        asked.append(split_label(label))
        strategy, disk = split_label(label)
        downtime = 150.0 if strategy == "shadow" else 100.0
        correct = (strategy != "none") and (disk == "vhost-user" or strategy != "shadow")
        return cell(label, memory, downtime, correct=correct)

    p = StrategyBenchParams(
        memories=("256M", "1G"),
        strategies=("device-log", "shadow"),
        runs=1,
        vhost_user=("none", "device-log", "shadow"),
    )
    assert p.labels == (
        "device-log",
        "shadow",
        "vhost-user-none",
        "vhost-user-device-log",
        "vhost-user-shadow",
    )
    console = Console(record=True, width=250)
    results = {r.name: r for r in run_strategy_bench(p, console, runner, tmp_path)}
    assert list(results) == expected_result_names(p)
    assert ("shadow", "vhost-user") in asked and ("shadow", "builtin") in asked
    assert "vhost-user-shadow" in console.export_text()
    assert results["strategy.shadow.correct"].value == 0.0
    assert results["strategy.vhost-user.shadow.correct"].value == 1.0
    assert results["strategy.vhost-user.none.incorrect"].value == 1.0
    ratio = results["strategy.vhost-user.shadow_vs_devicelog.downtime_ratio.1G"]
    assert ratio.value == pytest.approx(1.5) and ratio.ok
    cells = results["strategy.vhost-user-none.256M.lost"]
    assert cells.goal is None and cells.extra["disk"] == "vhost-user"  # expected to lose


def test_vhost_user_cells_can_run_at_fewer_sizes_than_the_builtin_ones(tmp_path: Path) -> None:
    """The full mode runs the vhost-user rows at one size: only those cells run, the other
    sizes' tables and results have no vhost-user rows, and its ratio goal is at that size."""
    asked: list[tuple[str, str]] = []

    def runner(label: str, memory: str, p: StrategyBenchParams, d: Path) -> CellRun:
        asked.append((label, memory))
        return cell(label, memory, 100.0, correct=split_label(label)[0] != "none")

    p = StrategyBenchParams(
        memories=("256M", "1G", "2G"),
        strategies=("device-log", "shadow"),
        runs=2,
        vhost_user=("device-log", "shadow"),
        vhost_user_memories=("1G",),
    )
    assert p.cell_count == 2 * (3 * 2 + 2) == len(run_cells(p, tmp_path, runner))
    assert {m for label, m in asked if label.startswith("vhost-user-")} == {"1G"}
    console = Console(record=True, width=250)
    results = {r.name: r for r in run_strategy_bench(p, console, runner, tmp_path)}
    assert list(results) == expected_result_names(p)
    assert "strategy.vhost-user-shadow.1G.downtime" in results
    assert not any(n.startswith("strategy.vhost-user-shadow.256M") for n in results)
    ratios = [n for n in results if n.startswith("strategy.vhost-user.shadow_vs_devicelog")]
    assert ratios == ["strategy.vhost-user.shadow_vs_devicelog.downtime_ratio.1G"]
    assert cell_table([], p, "256M").row_count == 2 and cell_table([], p, "1G").row_count == 4
    with pytest.raises(ValueError, match="subset"):
        StrategyBenchParams(memories=("256M",), vhost_user_memories=("1G",))


def test_the_full_mode_runs_every_strategy_at_three_sizes_in_a_bounded_number_of_cells() -> None:
    full = StrategyBenchParams.for_config(BenchConfig.for_mode(False))
    assert full.strategies == DMA_TRACKING and full.memories == ("256M", "1G", "2G")
    assert full.runs == 3
    vhost = len(full.vhost_user)
    assert full.cell_count == 3 * (5 * 3 + vhost)  # vhost-user rows at one size only


def test_the_vhost_user_section_runs_only_its_own_cells(tmp_path: Path, monkeypatch: Any) -> None:
    """`--only strategies-vhost-user`: the vhost-user cells at 256 MiB and 1 GiB, no builtin
    cell and no builtin goal; `make bench` (no --only) leaves the section out, since
    `strategies` has the same cells."""
    import ptmig.bench as bench
    import ptmig.devices.vhost_user.daemon as daemon

    assert "strategies-vhost-user" not in bench.select_sections(None)
    assert bench.select_sections(["strategies-vhost-user"]) == ["strategies-vhost-user"]
    assert bench.load_section("strategies-vhost-user").__name__ == "run_vhost_user"
    monkeypatch.setattr(daemon, "find_program", lambda: Path("/usr/bin/qemu-storage-daemon"))
    p = StrategyBenchParams.vhost_user_only(BenchConfig.for_mode(False))
    assert p.memories == ("256M", "1G") and p.strategies == ()
    assert p.labels == tuple(
        f"vhost-user-{s}" for s in ("none", "device-log", "shadow", "intercept")
    )
    asked: list[tuple[str, str]] = []

    def runner(label: str, memory: str, params: StrategyBenchParams, d: Path) -> CellRun:
        asked.append(split_label(label))
        return cell(label, memory, 120.0, correct=not label.endswith("none"))

    results = {r.name: r for r in run_strategy_bench(replace(p, runs=1), None, runner, tmp_path)}
    assert {disk for _, disk in asked} == {"vhost-user"} and len(asked) == 2 * 4
    assert list(results) == expected_result_names(replace(p, runs=1))
    assert not any(n.startswith("strategy.shadow") for n in results)
    assert results["strategy.vhost-user.shadow_vs_devicelog.downtime_ratio.1G"].value == 1.0
    assert results["strategy.vhost-user.none.incorrect"].value == 1.0
    intercept = results["strategy.vhost-user.intercept_vs_devicelog.downtime_ratio.1G"]
    assert intercept.value == 1.0 and "1.2" in str(intercept.goal)  # issue 15's goal
    assert results["strategy.vhost-user.intercept.correct"].value == 1.0


def test_the_vhost_user_section_says_why_it_cannot_run(monkeypatch: Any) -> None:
    import ptmig.devices.vhost_user.daemon as daemon

    monkeypatch.setattr(daemon, "find_program", lambda: None)
    with pytest.raises(BenchError, match="qemu-storage-daemon is not installed"):
        StrategyBenchParams.vhost_user_only(BenchConfig.for_mode(True))
    with pytest.raises(ValueError, match="at least one strategy"):
        StrategyBenchParams(strategies=(), vhost_user=())


def test_the_real_backends_data_path_is_held_to_0_8_of_direct() -> None:
    """Issue 13's goal for shadow on the real backend is 0.8 of direct DMA, per paired round."""

    def runs(ops: list[float]) -> list[DatapathRun]:
        return [DatapathRun(o, 10.0) for o in ops]

    def ratio(shadow: list[float]) -> Any:
        got = disk_datapath_results(
            {"direct": runs([1000.0] * 3), "shadow": runs(shadow)}, {}, "vhost-user"
        )
        return by_name(got)["strategy.vhost-user.shadow.datapath_vs_direct"]

    assert ratio([790.0, 750.0, 900.0]).ok is False
    met = ratio([810.0, 850.0, 700.0])
    assert met.value == pytest.approx(0.81) and met.ok


@pytest.mark.parametrize("strategy", ["none", "all-dirty", "device-log", "shadow"])
def test_a_cell_label_names_its_strategy_and_disk(strategy: str) -> None:
    assert split_label(cell_label(strategy, "builtin")) == (strategy, "builtin")
    assert split_label(cell_label(strategy, "vhost-user")) == (strategy, "vhost-user")
    with pytest.raises(ValueError, match="vhost-user strategies"):
        StrategyBenchParams(vhost_user=("magic",))


# ---- on real KVM -----------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.timeout(300)
def test_tiny_real_run_reports_every_result(tmp_path: Path, monkeypatch: Any) -> None:
    import ptmig.bench.strategies as mod

    tiny = StrategyBenchParams(
        memories=("256M",),
        strategies=("none", "shadow"),
        runs=1,
        warmup_s=2.0,
        after_s=2.0,
        datapath_pairs=1,
        datapath_s=1.0,
    )
    monkeypatch.setattr(mod.StrategyBenchParams, "for_config", classmethod(lambda cls, c: tiny))
    report = run_bench(
        BenchConfig(quick=True, runs=1),
        [("strategies", load_section("strategies"))],
        Console(file=open(tmp_path / "out.txt", "w"), width=200),
    )
    path = tmp_path / "bench.json"
    write_json(report, path)
    doc = json.loads(path.read_text())
    assert doc["errors"] == []
    results = {r["name"]: r for r in doc["results"]}
    assert list(results) == (
        list(MAX_RATE_RESULTS) + expected_result_names(tiny) + list(DATAPATH_RESULTS)
    )
    assert results["strategy.shadow.datapath_vs_direct"]["value"] > 0
    assert all(r["section"] == "strategies" for r in results.values())
    for s in ("none", "shadow"):
        downtime = results[f"strategy.{s}.256M.downtime"]
        assert 0 < downtime["value"] < 10_000 and downtime["extra"]["ram_bytes"] == 256 * MiB
        rounds = results[f"strategy.{s}.256M.rounds"]["value"]
        assert rounds >= 2
        # a round (the stop-and-copy too) sends each page of the 256 MiB at most once, plus a
        # little framing: however fast the machine, the bytes are bounded by the rounds
        assert 0 < results[f"strategy.{s}.256M.bytes"]["value"] <= rounds * 256 * 1.02  # MiB
        assert results[f"strategy.{s}.256M.ops_before"]["value"] > 0
        assert results[f"strategy.{s}.256M.total"]["value"] >= downtime["value"]
        assert results[f"strategy.{s}.256M.mismatched"]["value"] is not None
    assert results["strategy.shadow.correct"]["value"] == 1.0, results["strategy.shadow.correct"][
        "extra"
    ]
    assert results["strategy.shadow.during_vs_before"]["value"] > 0
    points = strategy_points(doc)
    assert set(points) == {"none", "shadow"}


def test_demo_cell_turns_a_demo_that_cannot_run_into_a_failed_cell(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import ptmig.demo
    from ptmig.bench.strategies import demo_cell
    from ptmig.demo import DemoOutcome

    seen: list[Any] = []

    def broken(opts: Any, console: Any) -> DemoOutcome:
        seen.append(opts)
        raise RuntimeError("compiling workloads/kv.c failed (exit 1)")

    monkeypatch.setattr(ptmig.demo, "run_demo", broken)
    p = StrategyBenchParams(memories=("1G",), strategies=("all-dirty",), runs=1)
    c = demo_cell("all-dirty", "1G", p, tmp_path / "cell")
    assert c.error is not None and "kv.c failed" in c.error and not c.correct
    opts = seen[0]
    assert (opts.memory, opts.dma_tracking, opts.live) == ("1G", "all-dirty", False)
    assert (opts.after_s, opts.rate) == (p.after_s, p.rate)

    def printed(opts: Any, console: Any) -> DemoOutcome:
        console.print("VERIFIED")
        return DemoOutcome(demo_doc(), 0, tmp_path)

    monkeypatch.setattr(ptmig.demo, "run_demo", printed)
    c = demo_cell("shadow", "256M", p, tmp_path / "ok")
    assert c.correct and c.downtime_ms == 120
    assert "VERIFIED" in (tmp_path / "ok" / "demo.out").read_text()


def test_the_cell_count_line_names_only_the_disks_that_have_cells() -> None:
    from ptmig.bench.strategies import cells_text

    both = StrategyBenchParams(
        memories=("256M", "1G"), strategies=("shadow",), runs=2, vhost_user=("shadow",)
    )
    assert cells_text(both) == (
        "(1 strategies × 256M, 1G and 1 on a vhost-user disk × 256M, 1G) × 2 run(s)"
    )
    only_vhost = replace(both, strategies=())
    assert cells_text(only_vhost) == "(1 on a vhost-user disk × 256M, 1G) × 2 run(s)"
