"""The bench's Markdown tables: what the README's result tables are pasted from."""

from __future__ import annotations

import json
from pathlib import Path

from ptmig.bench import markdown
from ptmig.bench.harness import Report, Result, SectionError, SectionTime


def report() -> dict:
    r = Report(
        machine={
            "cpu_model": "Test CPU",
            "cores": 2,
            "kernel": "6.1",
            "python": "3.11",
            "date": "2026-12-04T00:00:00+00:00",
            "loadavg": [0.5, 0.4, 0.3],
        }
    )
    r.results += [
        Result("core", "storebw.ratio", 0.95, "guest/native", "≥ 0.9", True, [0.9, 0.95, 1.0]),
        Result("core", "exit.pio", 42.0, "µs", "≤ 30 µs", False, [41.0, 42.0, 47.0]),
        Result("migration", "qemu.total", float("nan"), "ms", None, None, []),
    ]
    r.sections += [
        SectionTime("core", 19.0, 2, loadavg=[2.0, 1.2, 1.24]),
        SectionTime("migration", 125.4, 1),
        SectionTime("scale", 3.0, 0, crashed=True),
    ]
    r.errors.append(SectionError("scale", "BenchError: no room for two 8 GiB VMs"))
    return r.to_json()


def test_each_section_gets_a_table_with_its_goals_judged() -> None:
    text = markdown.render(report())
    assert "Test CPU, 2 cores, Linux 6.1, Python 3.11" in text
    assert "load average at the start 0.50 / 0.40 / 0.30" in text
    assert "| `storebw.ratio` | 0.9500 | 0.9000 … 1.000 | 3 | guest/native | ≥ 0.9 (met) |" in text
    assert "| `exit.pio` | 42.00 | 41.00 … 47.00 | 3 | µs | ≤ 30 µs (missed) |" in text
    assert "| `qemu.total` | n/a | n/a … n/a | 0 | ms |  |" in text
    assert text.index("#### `core`") < text.index("#### `migration`")


def test_durations_loads_and_crashes_are_listed() -> None:
    text = markdown.render(report())
    assert "| core | 19 s | 2.00 / 1.20 / 1.24 | 2 |" in text
    assert "| migration | 2 min 05 s | n/a | 1 |" in text
    assert "| scale (crashed) | 3 s | n/a | 0 |" in text
    assert "Total: 2 min 27 s." in text
    assert "section `scale` crashed: BenchError: no room for two 8 GiB VMs" in text


def test_a_stored_run_is_rendered_again(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report()))
    assert markdown.main([str(path)]) == 0
    assert "#### `core`" in capsys.readouterr().out
    assert markdown.main([str(tmp_path / "missing.json")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert markdown.main([]) == 2


def test_strategy_cells_are_one_row_per_strategy_and_size_in_size_order() -> None:
    def cell(strategy: str, size: str, metric: str, value: float) -> dict:
        return {"name": f"strategy.{strategy}.{size}.{metric}", "value": value}

    results = [
        cell("shadow", "1G", "downtime", 103.0),
        cell("shadow", "256M", "downtime", 71.0),
        cell("shadow", "256M", "ops_before", 17465.0),
        cell("shadow", "256M", "ops_precopy", 17954.0),
        {"name": "strategy.shadow.correct", "value": 1.0},  # a derived row: not a cell
    ]
    rows = markdown.strategy_cells(results)
    assert rows[0].startswith("| RAM | strategy | downtime (ms) |")
    assert [r.split(" | ")[:3] for r in rows[2:]] == [
        ["| 256M", "`shadow`", "71.00"],
        ["| 1G", "`shadow`", "103.0"],
    ]
    assert "17465 / 17954 / n/a" in rows[2]  # a metric the cell lacks reads n/a
    assert markdown.strategy_cells([{"name": "storebw.ratio", "value": 1.0}]) == []


def test_a_row_its_workload_could_not_measure_says_why_and_is_not_judged() -> None:
    doc = report()
    doc["results"].append(
        Result(
            "postcopy",
            "postcopy.unlimited.fault_p99",
            float("nan"),
            "us",
            "≤ 2000 us",
            None,
            [],
            {"skipped": "0 remote faults in every run"},
        ).to_json()
    )
    text = markdown.render(doc)
    assert (
        "| `postcopy.unlimited.fault_p99` | n/a | not measured: 0 remote faults in every run "
        "| 0 | us | ≤ 2000 us (not judged) |"
    ) in text
