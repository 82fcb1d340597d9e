"""The benchmark harness: statistics, goals, the report and its JSON, section selection and
crash handling (no KVM); and one quick smoke run of the `core` section on KVM."""

from __future__ import annotations

import io
import json
import math
import struct
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

import ptmig.bench as bench
from ptmig.bench import guests
from ptmig.bench.harness import (
    BenchConfig,
    BenchError,
    Goal,
    Report,
    Result,
    format_value,
    machine_info,
    measured,
    median,
    paired_ratios,
    percentile,
    section_table,
)

# ---- statistics -----------------------------------------------------------------------------


def test_median_of_odd_and_even_counts() -> None:
    assert median([5.0, 1.0, 3.0]) == 3.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(BenchError, match="no samples"):
        median([])


def test_percentile_interpolates_between_ranks() -> None:
    samples = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert percentile(samples, 0) == 10.0
    assert percentile(samples, 100) == 50.0
    assert percentile(samples, 50) == 30.0
    assert percentile(samples, 90) == pytest.approx(46.0)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="percentile 101"):
        percentile(samples, 101)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_lies_within_the_samples(samples: list[float], pct: float) -> None:
    assert min(samples) <= percentile(samples, pct) <= max(samples)


def test_paired_ratios_are_per_run() -> None:
    # the median of per-run ratios, not the ratio of medians: run 2 was slow on both sides
    guest = [1.0, 2.0, 0.5]
    native = [1.0, 2.5, 0.5]
    assert paired_ratios(guest, native) == [1.0, 0.8, 1.0]
    with pytest.raises(BenchError, match="got 2 and 1"):
        paired_ratios([1.0, 2.0], [1.0])
    with pytest.raises(BenchError, match="run 1: the ratio's denominator is 0"):
        paired_ratios([1.0, 2.0], [1.0, 0.0])


# ---- goals and results ----------------------------------------------------------------------


def test_goal_bounds_are_inclusive_and_nan_fails() -> None:
    at_most = Goal("<=", 30, "µs")
    assert at_most.met_by(30) and at_most.met_by(1) and not at_most.met_by(30.01)
    at_least = Goal(">=", 0.9)
    assert at_least.met_by(0.9) and not at_least.met_by(0.89)
    assert not at_most.met_by(math.nan) and not at_least.met_by(math.nan)
    assert str(at_most) == "≤ 30 µs" and str(at_least) == "≥ 0.9"
    with pytest.raises(ValueError, match="'<'"):
        Goal("<", 1)  # type: ignore[arg-type]


def test_measured_reports_the_median_and_checks_the_goal_against_it() -> None:
    r = measured("s", "exit", [50.0, 10.0, 12.0, 11.0, 13.0], "µs", Goal("<=", 30, "µs"))
    assert r.value == 12.0 and r.ok is True  # one outlier does not fail the goal
    assert (r.min, r.max) == (10.0, 50.0)
    assert r.runs == [50.0, 10.0, 12.0, 11.0, 13.0]
    bad = measured("s", "exit", [40.0, 31.0, 35.0], "µs", Goal("<=", 30, "µs"))
    assert bad.value == 35.0 and bad.ok is False
    none = measured("s", "info", [1.0], "x")
    assert none.goal is None and none.ok is None


def test_measured_percentile_statistic() -> None:
    r = measured("s", "pause.p99", [float(i) for i in range(1, 101)], "µs", statistic=99)
    assert r.value == pytest.approx(99.01)
    assert r.extra["statistic"] == "p99"


def test_result_json_shape() -> None:
    r = measured("core", "x", [1.0, 3.0, 2.0], "ms", Goal("<=", 5, "ms"), {"k": 1})
    assert r.to_json() == {
        "section": "core",
        "name": "x",
        "value": 2.0,
        "unit": "ms",
        "goal": "≤ 5 ms",
        "ok": True,
        "min": 1.0,
        "max": 3.0,
        "runs": [1.0, 3.0, 2.0],
        "extra": {"k": 1},
    }


def test_non_finite_values_become_null_in_json() -> None:
    r = Result("s", "n", math.nan, "u", None, None, [math.inf, 1.0])
    doc = r.to_json()
    assert doc["value"] is None and doc["runs"] == [None, 1.0] and doc["max"] is None
    json.dumps(doc, allow_nan=False)  # strict JSON


def test_machine_info_has_the_fields_the_report_promises() -> None:
    info = machine_info()
    assert set(info) == {"cpu_model", "cores", "kernel", "python", "date", "loadavg"}
    assert info["cpu_model"] and info["python"].count(".") == 2


def test_format_value() -> None:
    assert format_value(141.53) == "141.5"
    assert format_value(0.98765) == "0.9877"
    assert format_value(2964.2) == "2964"
    assert format_value(0.0) == "0"
    assert format_value(math.nan) == "n/a"
    assert format_value(1.5e-5) == "1.500e-05"


def test_section_table_marks_missed_goals() -> None:
    results = [
        measured("core", "fast", [1.0], "µs", Goal("<=", 30, "µs")),
        measured("core", "slow", [99.0], "µs", Goal("<=", 30, "µs")),
    ]
    console = Console(width=120, record=True)
    console.print(section_table("core", results))
    text = console.export_text()
    fast = next(line for line in text.splitlines() if "fast" in line)
    slow = next(line for line in text.splitlines() if "slow" in line)
    assert "✓" in fast and "✗" in slow and "≤ 30 µs" in slow


# ---- sections, main, JSON -------------------------------------------------------------------


@pytest.fixture
def fake_sections(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Replace the section table with fake sections living in a throwaway module."""
    mod = types.ModuleType("ptmig_bench_fake_sections")

    def good(config: BenchConfig) -> list[Result]:
        runs = [float(i) for i in range(config.runs)]
        return [
            measured("good", "met", runs, "ms", Goal("<=", 100, "ms")),
            measured("good", "missed", [500.0] * config.runs, "ms", Goal("<=", 100, "ms")),
        ]

    def broken(config: BenchConfig) -> list[Result]:
        raise RuntimeError("device exploded")

    mod.good = good  # type: ignore[attr-defined]
    mod.broken = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(
        bench,
        "SECTIONS",
        {
            "good": f"{mod.__name__}:good",
            "broken": f"{mod.__name__}:broken",
            "missing": "ptmig_bench_no_such_module:run",
        },
    )
    return mod


def test_select_sections_keeps_table_order_and_rejects_unknown(fake_sections) -> None:
    assert bench.select_sections(None) == ["good", "broken", "missing"]
    assert bench.select_sections(["broken", "good"]) == ["good", "broken"]
    with pytest.raises(KeyError, match="'nope'.*known sections: good, broken, missing"):
        bench.select_sections(["good", "nope"])


def test_the_rate_reaches_every_section(fake_sections, tmp_path: Path) -> None:
    seen: list[float | None] = []

    def rate(config: BenchConfig) -> list[Result]:
        seen.append(config.rate)
        return []

    fake_sections.good = rate
    assert bench.main(quick=True, json_path=tmp_path / "a.json", only=["good"], rate=9_000) == 0
    assert bench.main(quick=True, json_path=tmp_path / "b.json", only=["good"]) == 0
    assert seen == [9_000, None]


def test_a_missed_goal_is_reported_not_an_error(fake_sections, tmp_path: Path) -> None:
    out = tmp_path / "out" / "bench.json"
    assert bench.main(quick=True, json_path=out, only=["good"]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"format", "machine", "results", "errors", "sections", "duration_s"}
    assert set(doc["machine"]) == {"cpu_model", "cores", "kernel", "python", "date", "loadavg"}
    assert doc["errors"] == []
    by_name = {r["name"]: r for r in doc["results"]}
    assert by_name["met"]["ok"] is True and by_name["missed"]["ok"] is False
    assert len(by_name["met"]["runs"]) == 3  # quick mode: 3 runs
    assert by_name["met"]["value"] == 1.0  # median of 0, 1, 2


def test_a_crashing_section_makes_main_fail_but_the_others_still_run(
    fake_sections, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(quick=False, json_path=out, only=None) == 1
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["results"]] == ["met", "missed"]
    assert len(doc["results"][0]["runs"]) == 5  # full mode: 5 runs
    errors = {e["section"]: e["error"] for e in doc["errors"]}
    assert errors["broken"] == "RuntimeError: device exploded"
    assert "ModuleNotFoundError" in errors["missing"]


def test_each_section_s_duration_is_printed_and_written(
    fake_sections, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a clock that advances 70 s per reading: each section spans one start and one end reading
    ticks = iter(range(0, 10_000, 70))
    monkeypatch.setattr(bench, "clock", lambda: float(next(ticks)))
    out = tmp_path / "bench.json"
    console = Console(file=io.StringIO(), width=200)
    monkeypatch.setattr(bench, "Console", lambda *a, **k: console)
    monkeypatch.setattr(bench, "load_average", lambda: [1.5, 1.0, 0.5])
    assert bench.main(quick=True, json_path=out, only=None) == 1
    doc = json.loads(out.read_text())
    load = [1.5, 1.0, 0.5]  # the host's load when each section ended
    assert doc["sections"] == [
        {"section": "good", "duration_s": 70.0, "results": 2, "crashed": False, "loadavg": load},
        {"section": "broken", "duration_s": 70.0, "results": 0, "crashed": True, "loadavg": load},
        {"section": "missing", "duration_s": 70.0, "results": 0, "crashed": True, "loadavg": load},
    ]
    assert doc["duration_s"] == 210.0
    # the same run as Markdown tables beside the JSON
    assert "| good | 1 min 10 s | 1.50 / 1.00 / 0.50 | 2 |" in out.with_suffix(".md").read_text()
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "bench good took 1 min 10 s" in text
    assert "bench took 3 min 30 s: good 1 min 10 s, broken 1 min 10 s" in text


def test_unknown_section_name_returns_2_and_writes_nothing(fake_sections, tmp_path) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(quick=True, json_path=out, only=["nope"]) == 2
    assert not out.exists()


def test_json_to_stdout_puts_the_tables_on_stderr(
    fake_sections, capsys, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert bench.main(quick=True, json_path=Path("-"), only=["good"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)  # nothing but the document on stdout
    assert [r["name"] for r in doc["results"]] == ["met", "missed"]
    assert "bench good" in out.err
    assert not (tmp_path / "-").exists() and not (tmp_path / "bench-results").exists()


def test_run_bench_files_results_under_their_section() -> None:
    def section(config: BenchConfig) -> list[Result]:
        return [measured("wrong-name", "x", [1.0], "u")]

    report = bench.run_bench(BenchConfig(runs=1), [("mine", section)], Console(quiet=True))
    assert isinstance(report, Report) and report.results[0].section == "mine"


def test_a_failing_section_keeps_what_it_measured_before_failing() -> None:
    from ptmig.bench.harness import BenchError

    def section(config: BenchConfig) -> list[Result]:
        raise BenchError("the last part failed", partial=[measured("mine", "x", [1.0], "u")])

    report = bench.run_bench(BenchConfig(runs=1), [("mine", section)], Console(quiet=True))
    assert [r.name for r in report.results] == ["x"]
    assert [e.section for e in report.errors] == ["mine"]
    assert "the last part failed" in report.errors[0].error


def test_the_core_section_is_registered() -> None:
    assert "core" in bench.SECTIONS
    from ptmig.bench import core

    assert bench.load_section("core") is core.run


def test_bench_config_modes() -> None:
    assert BenchConfig.for_mode(quick=True).runs == 3
    assert BenchConfig.for_mode(quick=False).runs == 5
    with pytest.raises(ValueError, match="runs=0"):
        BenchConfig(runs=0)


# ---- the micro-guests -----------------------------------------------------------------------


def test_loop_guests_encode_their_iteration_count() -> None:
    for make in (guests.port_io_loop, guests.mmio_store_loop):
        code = make(20000)
        assert code[0] == 0xB9 and struct.unpack_from("<I", code, 1)[0] == 20000
        assert code.endswith(bytes.fromhex("EFEBFE"))  # out dx, eax (HC_EXIT); jmp $
        with pytest.raises(ValueError, match="iterations=-1"):
            make(-1)
        with pytest.raises(ValueError, match="iterations=4294967296"):
            make(1 << 32)
    mmio = guests.mmio_store_loop(1)
    assert struct.unpack_from("<I", mmio, 6)[0] == guests.UNBACKED_MMIO_GPA
    with pytest.raises(ValueError, match="hypercall port"):
        guests.port_io_loop(1, port=0x500)


# ---- KVM smoke run --------------------------------------------------------------------------

CORE_RESULT_NAMES = {
    "storebw.guest",
    "storebw.native",
    "storebw.ratio",
    "exit.pio",
    "exit.mmio",
    "exit.pio.kvm_run_floor",
    "harvest.64m.running",
    "harvest.64m.backlog",
    "harvest.64m.idle",
    "harvest.fault_us",
    "pause.running",
    "pause.running.p99",
    "pause.halted",
    "pause.halted.p99",
}


@pytest.mark.kvm
def test_core_section_quick_smoke(tmp_path: Path) -> None:
    from ptmig.bench import core

    def tiny_core(config: BenchConfig) -> list[Result]:
        return core.run_core(config, core.CoreParams.tiny())

    config = BenchConfig.for_mode(quick=True)
    report = bench.run_bench(config, [("core", tiny_core)], Console(quiet=True))
    out = tmp_path / "bench.json"
    bench.write_json(report, out)
    doc = json.loads(out.read_text())
    assert doc["errors"] == []
    by_name = {r["name"]: r for r in doc["results"]}
    assert set(by_name) == CORE_RESULT_NAMES
    for name, r in by_name.items():
        assert r["section"] == "core"
        assert (r["ok"] is None) == (r["goal"] is None), name
        assert len(r["runs"]) >= config.runs, f"{name}: {r}"
        if name in ("exit.pio", "exit.mmio", "harvest.fault_us"):
            # differences of two timings (with and without the exits; the tiny run does few):
            # one preempted baseline makes a run negative, so only the count is checked
            # (the bench raises if the VM did not take every exit it measures; the fault
            # cost is a time lost beyond a timed baseline too, and raises if no fault came)
            assert all(math.isfinite(x) for x in r["runs"]), f"{name}: {r}"
            continue
        assert r["value"] is not None and r["value"] > 0, f"{name}: {r}"
        assert all(x > 0 for x in r["runs"]), f"{name}: {r}"
    assert sum(by_name["harvest.64m.running"]["extra"]["dirty_pages"]) > 0
    assert by_name["harvest.64m.idle"]["extra"]["dirty_pages"] == [0] * (3 * 2)
    assert by_name["pause.halted"]["extra"]["halts"] >= 2
    fault = by_name["harvest.fault_us"]["extra"]
    assert all(f > 0 for f in fault["faults_per_s"])
    assert all(r > 0 for r in fault["plain_pages_per_s"])


@pytest.mark.kvm
def test_a_dirty_log_that_reports_no_fault_is_an_error_not_a_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fault cost divides by the pages the harvests reported: a dirty log that reports
    none (tracking broken, or a guest that stopped writing) must fail the measurement with the
    reason, not divide by zero or report a cost of nothing. The real dirty guest runs; only the
    count of what its harvests reported is zeroed."""
    from ptmig.bench import core
    from ptmig.firmware import build_firmware, load_firmware_image

    monkeypatch.setattr(core, "bitmap_popcount", lambda bm: 0)
    fw = load_firmware_image(build_firmware())
    config = BenchConfig.for_mode(quick=True)
    with pytest.raises(BenchError, match="harvests reported 0 pages armed"):
        core.bench_write_fault(config, core.CoreParams.tiny(), fw)


# ---- the progress line ----------------------------------------------------------------------


def test_the_progress_line_names_section_cell_run_and_elapsed_time() -> None:
    from ptmig.bench.progress import BenchProgress

    now = [100.0]
    p = BenchProgress(Console(quiet=True), live=False, clock=lambda: now[0])
    p.section("strategies", 4, 4)
    now[0] = 190.0
    p.step("shadow, 1G guest (cell 6/8)", 2, 3)
    now[0] = 225.0
    assert p.text() == (
        "bench strategies (4/4) │ shadow, 1G guest (cell 6/8) │ run 2/3 │ "
        "2:05 in this section, 2:05 in all"
    )
    p.section("core", 1, 4)  # a new section starts with no cell and its own clock
    now[0] = 3925.0
    assert p.text() == "bench core (1/4) │ 1:01:40 in this section, 1:03:45 in all"


def test_sections_report_their_steps_to_the_running_bench() -> None:
    from ptmig.bench import progress

    progress.step("outside any bench")  # no bench running: nothing happens, nothing fails
    seen: list[str] = []

    def section(config: BenchConfig) -> list[Result]:
        progress.step("cell a", 1, 2)
        assert progress._current is not None
        seen.append(progress._current.text())
        return [Result("s", "x", 1.0, "ms", None, None, [1.0])]

    bench.run_bench(
        BenchConfig(runs=1), [("first", section), ("second", section)], Console(quiet=True)
    )
    assert seen[0].startswith("bench first (1/2) │ cell a │ run 1/2 │ ")
    assert seen[1].startswith("bench second (2/2) │ cell a │ run 1/2 │ ")
    assert progress._current is None


def test_a_missing_comparison_says_why_in_the_table() -> None:
    from ptmig.bench.harness import section_table

    skipped = Result(
        "migration",
        "qemu",
        math.nan,
        "",
        None,
        None,
        [],
        {"skipped": "qemu-system-x86_64 is not installed"},
    )
    console = Console(record=True, width=200)
    console.print(section_table("migration", [skipped]))
    assert "not measured: qemu-system-x86_64 is not installed" in console.export_text()


def test_cpu_rows_per_gib_sent_for_plain_and_sealed_runs() -> None:
    from ptmig.bench.migration import GOAL_CPU_PER_GIB, Sample, cpu_results

    gib = 1 << 30
    runs = [
        Sample(500.0, 3.0, 2 * gib, {}, cpu_source_s=0.6, cpu_destination_s=0.4),
        Sample(500.0, 3.0, 2 * gib, {}, cpu_source_s=1.0, cpu_destination_s=0.8),
    ]
    plain = {r.name: r for r in cpu_results("ptmig", runs, {}, GOAL_CPU_PER_GIB)}
    sealed = {r.name: r for r in cpu_results("ptmig.sealed", runs, {"memory_mib": 1})}
    assert plain["ptmig.cpu_per_gib.source"].runs == [0.3, 0.5]
    assert plain["ptmig.cpu_per_gib.destination"].value == pytest.approx(0.3)
    assert plain["ptmig.cpu_per_gib.source"].ok is True
    assert sealed["ptmig.sealed.cpu_per_gib.source"].goal is None  # context, not a goal
    assert sealed["ptmig.sealed.cpu_per_gib.source"].extra["memory_mib"] == 1


def test_sealed_rows_pair_each_sealed_run_with_the_plain_run_beside_it() -> None:
    """`ptmig.sealed/plain` per pair of runs, and `.cpu_bound`: plain ÷ sealed CPU per GiB of
    both VMMs together (what a host whose cores they saturate allows)."""
    from ptmig.bench.migration import Sample, sealed_results

    gib = 1 << 30
    plain = [
        Sample(500.0, 3.0, 1 * gib, {}, cpu_source_s=0.25, cpu_destination_s=0.25),
        Sample(400.0, 3.0, 1 * gib, {}, cpu_source_s=0.3, cpu_destination_s=0.3),
    ]
    sealed = [
        Sample(1000.0, 4.0, 1 * gib, {}, cpu_source_s=0.5, cpu_destination_s=0.5),
        Sample(500.0, 4.0, 1 * gib, {}, cpu_source_s=0.4, cpu_destination_s=0.35),
    ]
    rows = {r.name: r for r in sealed_results(plain, sealed, {"memory_mib": 1024})}
    assert rows["ptmig.sealed/plain"].runs == pytest.approx([0.5, 0.8])
    assert rows["ptmig.sealed/plain"].ok is False  # median 0.65, goal >= 0.8
    assert rows["ptmig.sealed/plain.cpu_bound"].runs == pytest.approx([0.5, 0.8])
    assert rows["ptmig.sealed/plain.cpu_bound"].goal is None
    assert rows["ptmig.sealed.cpu_per_gib.destination"].runs == pytest.approx([0.5, 0.35])
    assert rows["ptmig.sealed.downtime"].value == pytest.approx(4.0)
