"""The benchmark harness: results, statistics, goals, the report table and the JSON document.

A benchmark section is a function `run(config) -> list[Result]`. It repeats each measurement
`config.runs` times and turns the samples into a `Result` with `measured()`: the reported value
is the MEDIAN of the samples (min and max are kept beside it), because the machines this runs on
are shared and noisy. A ratio between two things (guest vs native, say) is computed per run from
two measurements taken back to back, then summarised the same way (`paired_ratios()`), so a
noisy neighbour hits both sides of each ratio.

A goal is a bound on the median (`Goal("<=", 30, "µs")`); missing it makes `ok` False and is
reported, never raised. This module does no measuring and needs neither KVM nor a terminal.
"""

from __future__ import annotations

import compileall
import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from ..errors import PtmigError

DEFAULT_RUNS = 5
QUICK_RUNS = 3
DEFAULT_JSON_PATH = Path("bench-results") / "bench.json"
JSON_FORMAT_VERSION = 1


class BenchError(PtmigError, RuntimeError):
    """A benchmark could not produce a measurement (as opposed to missing its goal).
    `partial`: what the section had measured before it failed (kept in the report)."""

    def __init__(self, message: str, *, partial: list[Result] | None = None) -> None:
        super().__init__(message)
        self.partial = partial or []


@dataclass(frozen=True)
class BenchConfig:
    """What every section is told: how many runs, whether to use the quick sizes, and the kv
    ops/s the migrating cells offer (`rate`; None: half the client's maximum, measured at the
    section's start)."""

    quick: bool = False
    runs: int = DEFAULT_RUNS
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ValueError(f"runs={self.runs} must be at least 1")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate={self.rate} must be a positive number of ops/s")

    @classmethod
    def for_mode(cls, quick: bool, rate: float | None = None) -> BenchConfig:
        return cls(quick=quick, runs=QUICK_RUNS if quick else DEFAULT_RUNS, rate=rate)


@dataclass(frozen=True)
class Goal:
    """A bound the median must satisfy: `value <= limit` or `value >= limit`."""

    op: Literal["<=", ">="]
    limit: float
    unit: str = ""

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"goal operator {self.op!r} must be '<=' or '>='")
        if not math.isfinite(self.limit):
            raise ValueError(f"goal limit {self.limit!r} must be a finite number")

    def met_by(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def __str__(self) -> str:
        sym = "≤" if self.op == "<=" else "≥"
        unit = f" {self.unit}" if self.unit else ""
        return f"{sym} {self.limit:g}{unit}"


@dataclass
class Result:
    """One reported number: the median of `runs`, with its goal and verdict."""

    section: str
    name: str
    value: float
    unit: str
    goal: str | None
    ok: bool | None
    runs: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def min(self) -> float:
        return min(self.runs) if self.runs else math.nan

    @property
    def max(self) -> float:
        return max(self.runs) if self.runs else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "value": _finite_or_none(self.value),
            "unit": self.unit,
            "goal": self.goal,
            "ok": self.ok,
            "min": _finite_or_none(self.min),
            "max": _finite_or_none(self.max),
            "runs": [_finite_or_none(r) for r in self.runs],
            "extra": self.extra,
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ---- statistics -----------------------------------------------------------------------------


def median(samples: Sequence[float]) -> float:
    """The median of the samples (the mean of the middle two for an even count)."""
    if not samples:
        raise BenchError("median of no samples: the benchmark produced no measurement")
    return float(statistics.median(samples))


def percentile(samples: Sequence[float], pct: float) -> float:
    """The `pct` percentile (0..100) by linear interpolation between closest ranks."""
    if not samples:
        raise BenchError(f"p{pct:g} of no samples: the benchmark produced no measurement")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile {pct} must be in [0, 100]")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * pct / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-run ratios of two measurements taken in the same run (same index)."""
    if len(numerators) != len(denominators):
        raise BenchError(
            f"paired ratios need one denominator per numerator: got {len(numerators)} and "
            f"{len(denominators)}"
        )
    out = []
    for i, (a, b) in enumerate(zip(numerators, denominators, strict=True)):
        if b == 0:
            raise BenchError(f"run {i}: the ratio's denominator is 0 (numerator {a})")
        out.append(a / b)
    return out


def measured(
    section: str,
    name: str,
    runs: Sequence[float],
    unit: str,
    goal: Goal | None = None,
    extra: dict[str, Any] | None = None,
    statistic: float | None = None,
) -> Result:
    """Summarise samples into a Result, the goal checked against the reported value.

    The value is the median, or the `statistic` percentile (e.g. 99) when one is given; a
    percentile is recorded in `extra["statistic"]` as "p99".
    """
    samples = [float(r) for r in runs]
    extra = dict(extra or {})
    if statistic is None:
        value = median(samples)
    else:
        value = percentile(samples, statistic)
        extra["statistic"] = f"p{statistic:g}"
    return Result(
        section=section,
        name=name,
        value=value,
        unit=unit,
        goal=str(goal) if goal is not None else None,
        ok=goal.met_by(value) if goal is not None else None,
        runs=samples,
        extra=extra,
    )


# ---- the report -----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg": load_average(),
    }


def compile_ptmig() -> bool:
    """Compile ptmig's modules to bytecode beside their sources (where an installed package
    has it) unless it is there already; False if a module's could not be written. A section
    whose VMMs run from a source tree under PYTHONDONTWRITEBYTECODE (as under a test runner)
    calls it first: else each VMM compiles what it imports, and what a source imports at its
    first `migrate` (the migration code, ~0.07 s of compiling here) lands in the migration's
    CPU and, in `scale`, the compiler's garbage in the VMM's memory."""
    return bool(compileall.compile_dir(Path(__file__).resolve().parents[1], quiet=2))


def load_average() -> list[float] | None:
    """The host's 1/5/15-minute load averages: on a shared machine, the context of a number."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class SectionError:
    """A section that crashed instead of measuring."""

    section: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"section": self.section, "error": self.error}


@dataclass
class SectionTime:
    """How long one section ran (wall clock, from its start to its table), so a full bench's
    cost can be planned section by section."""

    section: str
    duration_s: float
    results: int
    crashed: bool = False
    loadavg: list[float] | None = None  # the host's load averages when the section ended

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "duration_s": round(self.duration_s, 1),
            "results": self.results,
            "crashed": self.crashed,
            "loadavg": self.loadavg,
        }


@dataclass
class Report:
    machine: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    errors: list[SectionError] = field(default_factory=list)
    sections: list[SectionTime] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return sum(t.duration_s for t in self.sections)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": JSON_FORMAT_VERSION,
            "machine": self.machine,
            "results": [r.to_json() for r in self.results],
            "errors": [e.to_json() for e in self.errors],
            "sections": [t.to_json() for t in self.sections],
            "duration_s": round(self.duration_s, 1),
        }


def minutes_text(seconds: float) -> str:
    """A duration as "3 min 05 s", or "42 s" under a minute."""
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def format_value(value: float) -> str:
    """A number with about four significant digits, no exponent for everyday magnitudes."""
    if not math.isfinite(value):
        return "n/a"
    mag = abs(value)
    if mag == 0 or 1e-3 <= mag < 1e6:
        decimals = max(0, 3 - int(math.floor(math.log10(mag)))) if mag else 0
        return f"{value:.{decimals}f}"
    return f"{value:.3e}"


def verdict(ok: bool | None) -> str:
    return {True: "✓", False: "✗", None: ""}[ok]


def section_table(section: str, results: Sequence[Result]) -> Table:
    table = Table(title=f"bench: {section}", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("median", justify="right", no_wrap=True)
    table.add_column("min … max", justify="right", no_wrap=True)
    table.add_column("unit", no_wrap=True)
    table.add_column("goal", no_wrap=True)
    table.add_column("ok", justify="center")
    for r in results:
        style = "red" if r.ok is False else None
        why = r.extra.get("skipped") if not math.isfinite(r.value) else None
        table.add_row(
            r.name,
            format_value(r.value),
            f"not measured: {why}" if why else f"{format_value(r.min)} … {format_value(r.max)}",
            r.unit,
            r.goal or "",
            verdict(r.ok),
            style="yellow" if why else style,
        )
    return table


def print_section(console: Console, section: str, results: Sequence[Result]) -> None:
    console.print(section_table(section, results))
