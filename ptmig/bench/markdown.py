"""The bench's results as Markdown: one table per section, written beside the JSON.

The README's result tables are this file's tables, pasted from one run, so regenerating them
is `ptmig bench` and a copy, not a transcription. Everything here reads the JSON document
(`Report.to_json()`), so a stored run can be rendered again (`python -m ptmig.bench.markdown
bench.json`) after the table's layout changes.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .harness import format_value, minutes_text


def render(doc: Mapping[str, Any]) -> str:
    """The whole run: what it ran on, each section's duration and load, then its results."""
    lines = [_machine_line(doc.get("machine") or {}), ""]
    sections = doc.get("sections") or []
    if sections:
        lines += ["| section | duration | load average at its end (1/5/15 min) | results |"]
        lines += ["|---|---|---|---|"]
        for t in sections:
            crashed = " (crashed)" if t.get("crashed") else ""
            lines.append(
                f"| {t['section']}{crashed} | {minutes_text(float(t['duration_s']))} | "
                f"{_load(t.get('loadavg'))} | {t['results']} |"
            )
        lines.append(f"\nTotal: {minutes_text(float(doc.get('duration_s') or 0.0))}.\n")
    for section, results in _by_section(doc.get("results") or []):
        lines += [f"#### `{section}`", ""]
        cells = strategy_cells(results) or bandwidth_cells(results)
        if cells:
            lines += ["Per cell (medians of its runs):", "", *cells, "", "Every result:", ""]
        lines += [*section_table(results), ""]
    for err in doc.get("errors") or []:
        lines.append(f"- section `{err['section']}` crashed: {err['error']}")
    return "\n".join(lines).rstrip() + "\n"


def section_table(results: Iterable[Mapping[str, Any]]) -> list[str]:
    """One Markdown table: name, median, min … max over its runs, unit, goal and verdict."""
    out = ["| measurement | median | min … max | runs | unit | goal |", "|---|---|---|---|---|---|"]
    for r in results:
        why = (r.get("extra") or {}).get("skipped") if r.get("value") is None else None
        spread = f"not measured: {why}" if why else f"{_num(r.get('min'))} … {_num(r.get('max'))}"
        out.append(
            f"| `{r['name']}` | {_num(r.get('value'))} | {spread} | "
            f"{len(r.get('runs') or [])} | {r.get('unit', '')} | {_goal(r)} |"
        )
    return out


# strategy cells: `strategy.<strategy>.<size>.<metric>`, shown one row per strategy and size
_CELL = re.compile(r"^strategy\.(?P<strategy>[a-z-]+)\.(?P<size>\d+[MG])\.(?P<metric>[a-z0-9_]+)$")
CELL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("downtime (ms)", "downtime"),
    ("MiB sent", "bytes"),
    ("total (ms)", "total"),
    ("rounds", "rounds"),
    ("client outage (ms)", "client_gap"),
    ("kv ops/s before / pre-copy / after", "ops_before ops_precopy ops_after"),
    ("p99 ms before / pre-copy / after", "p99_before p99_precopy p99_after"),
    ("VMM CPU s/GiB src / dst", "cpu_source cpu_destination"),
    ("mismatched pages", "mismatched"),
    ("lost", "lost"),
    ("wrong", "wrong"),
)


def strategy_cells(results: Iterable[Mapping[str, Any]]) -> list[str]:
    """The strategies section's cells as one table (empty for any other section)."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        m = _CELL.match(str(r["name"]))
        if m:
            cell = cells.setdefault((m["strategy"], m["size"]), {})
            cell[m["metric"]] = r.get("value")
    if not cells:
        return []
    out = [
        "| RAM | strategy | " + " | ".join(title for title, _ in CELL_COLUMNS) + " |",
        "|---" * (2 + len(CELL_COLUMNS)) + "|",
    ]
    for (strategy, size), cell in sorted(cells.items(), key=lambda kv: _size_key(kv[0])):
        values = [
            " / ".join(_num(cell.get(metric)) for metric in metrics.split())
            for _, metrics in CELL_COLUMNS
        ]
        out.append(f"| {size} | `{strategy}` | " + " | ".join(values) + " |")
    return out


# bandwidth cells: `bandwidth.<strategy>.<N>MiBps.<metric>`, one row per strategy and bandwidth
_BW_CELL = re.compile(
    r"^bandwidth\.(?P<strategy>[a-z-]+)\.(?P<bw>[0-9.]+)MiBps\.(?P<metric>[a-z0-9_]+)$"
)
BW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("p50 ms before / pre-copy", "p50_before p50_precopy"),
    ("p99 ms before / pre-copy", "p99_before p99_precopy"),
    ("p99 pre-copy ÷ before", "p99_ratio"),
    ("VMM CPU s/GiB src / dst", "cpu_source cpu_destination"),
    ("MiB sent", "bytes"),
    ("total (ms)", "total"),
    ("rounds", "rounds"),
    ("downtime (ms)", "downtime"),
    ("correct", "correct"),
)


def bandwidth_cells(results: Iterable[Mapping[str, Any]]) -> list[str]:
    """The bandwidth section's cells as one table (empty for any other section)."""
    cells: dict[tuple[str, float], dict[str, Any]] = {}
    order: list[str] = []
    for r in results:
        m = _BW_CELL.match(str(r["name"]))
        if m:
            if m["strategy"] not in order:
                order.append(m["strategy"])
            cell = cells.setdefault((m["strategy"], float(m["bw"])), {})
            cell[m["metric"]] = r.get("value")
    if not cells:
        return []
    out = [
        "| strategy | max-bandwidth MiB/s | " + " | ".join(t for t, _ in BW_COLUMNS) + " |",
        "|---" * (2 + len(BW_COLUMNS)) + "|",
    ]
    for (strategy, bw), cell in sorted(
        cells.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])
    ):
        values = [" / ".join(_num(cell.get(m)) for m in ms.split()) for _, ms in BW_COLUMNS]
        out.append(f"| `{strategy}` | {bw:g} | " + " | ".join(values) + " |")
    return out


def _size_key(key: tuple[str, str]) -> tuple[int, str]:
    strategy, size = key
    mib = int(size[:-1]) * (1024 if size.endswith("G") else 1)
    return mib, strategy


def _by_section(results: Iterable[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """Results grouped by section, in the order the sections ran."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(str(r["section"]), []).append(r)
    return list(groups.items())


def _goal(r: Mapping[str, Any]) -> str:
    goal = r.get("goal")
    if not goal:
        return ""
    ok = r.get("ok")
    verdict = "not judged" if ok is None else "met" if ok else "missed"
    return f"{goal} ({verdict})"


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format_value(float(v))


def _load(loadavg: Any) -> str:
    return "n/a" if not loadavg else " / ".join(f"{float(x):.2f}" for x in loadavg)


def _machine_line(m: Mapping[str, Any]) -> str:
    return (
        f"Measured on {m.get('cpu_model', 'an unknown CPU')}, {m.get('cores', '?')} cores, "
        f"Linux {m.get('kernel', '?')}, Python {m.get('python', '?')}, {m.get('date', '?')}; "
        f"load average at the start {_load(m.get('loadavg'))}."
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m ptmig.bench.markdown BENCH_JSON`: print a stored run's tables."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ptmig.bench.markdown BENCH_JSON", file=sys.stderr)
        return 2
    try:
        doc = json.loads(Path(args[0]).read_text())
    except (OSError, ValueError) as e:
        print(f"cannot read {args[0]}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
