"""`ptmig bench`: the section table, running sections, and writing the report.

A section is a module with a function `run(config: BenchConfig) -> list[Result]`. Adding one
(devices, migration, strategies, bandwidth) means adding its module and one line to
`SECTIONS`; nothing else changes. Modules are imported only when their section runs, so a
section whose prerequisites are missing cannot break the others. A section in `ON_REQUEST`
runs only when `--only` names it: it measures a part of another section by itself.
"""

from __future__ import annotations

import importlib
import json
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from ..cliconv import FAILED, OK, USAGE, json_to_stdout
from ..cliconv import write_json as write_conv_json
from .harness import (
    DEFAULT_JSON_PATH,
    BenchConfig,
    Report,
    Result,
    SectionError,
    SectionTime,
    load_average,
    machine_info,
    minutes_text,
    print_section,
)
from .progress import BenchProgress

SectionFn = Callable[[BenchConfig], list[Result]]
clock: Callable[[], float] = time.monotonic  # a section's duration (a test sets its own)

# name -> "module:function", in the order sections run.
SECTIONS: dict[str, str] = {
    "core": "ptmig.bench.core:run",
    "devices": "ptmig.bench.devices:run",
    "migration": "ptmig.bench.migration:run",
    "postcopy": "ptmig.bench.postcopy:run",
    "strategies": "ptmig.bench.strategies:run",
    "strategies-vhost-user": "ptmig.bench.strategies:run_vhost_user",
    "bandwidth": "ptmig.bench.bandwidth:run",
    "scale": "ptmig.bench.scale:run",
}
# the vhost-user cells of `strategies` alone (they are also in `strategies`)
ON_REQUEST = frozenset({"strategies-vhost-user"})


def load_section(name: str) -> SectionFn:
    """The run function of the section called `name`."""
    try:
        target = SECTIONS[name]
    except KeyError:
        raise KeyError(
            f"unknown bench section {name!r}; known sections: {', '.join(SECTIONS)}"
        ) from None
    module_name, _, func_name = target.partition(":")
    fn: SectionFn = getattr(importlib.import_module(module_name), func_name)
    return fn


def select_sections(only: Sequence[str] | None) -> list[str]:
    """Section names to run: all of them but those run on request, or those in `only` (in
    table order)."""
    if not only:
        return [n for n in SECTIONS if n not in ON_REQUEST]
    unknown = [n for n in only if n not in SECTIONS]
    if unknown:
        raise KeyError(
            f"unknown bench section(s) {', '.join(map(repr, unknown))}; known sections: "
            f"{', '.join(SECTIONS)}"
        )
    return [n for n in SECTIONS if n in only]


def run_bench(
    config: BenchConfig,
    sections: Sequence[tuple[str, SectionFn]],
    console: Console | None = None,
) -> Report:
    """Run each section, print its table, and collect everything into one report.

    A section that raises is recorded in `report.errors` (with its traceback printed); the
    other sections still run.
    """
    console = console or Console()
    report = Report(machine=machine_info())
    with BenchProgress(console) as status:
        for number, (name, fn) in enumerate(sections, 1):
            status.section(name, number, len(sections))
            _run_section(console, config, name, fn, report)
    if len(report.sections) > 1:
        console.print(
            "bench took "
            + minutes_text(report.duration_s)
            + ": "
            + ", ".join(f"{t.section} {minutes_text(t.duration_s)}" for t in report.sections)
        )
    missed = [r for r in report.results if r.ok is False]
    if missed:
        console.print(
            f"[yellow]{len(missed)} goal(s) missed:[/yellow] "
            + ", ".join(f"{r.section}/{r.name}" for r in missed)
        )
    return report


def _run_section(
    console: Console, config: BenchConfig, name: str, fn: SectionFn, report: Report
) -> None:
    # a section may run fewer (strategies: each cell is a whole demo) and says so itself
    console.print(f"[bold]bench {name}[/bold] (up to {config.runs} runs per measurement)")
    started = clock()
    crashed = False
    try:
        results = fn(config)
    except Exception as e:
        crashed = True
        errors = Console(stderr=True, soft_wrap=True, highlight=False)
        errors.print(f"[red]section {name} crashed:[/red]")
        errors.print(traceback.format_exc(), markup=False)
        report.errors.append(SectionError(name, f"{type(e).__name__}: {e}"))
        results = list(getattr(e, "partial", []))
    took = SectionTime(name, clock() - started, len(results), crashed, load_average())
    report.sections.append(took)
    console.print(f"bench {name} took {minutes_text(took.duration_s)}")
    if not results:
        return
    for r in results:
        if r.section != name:
            r.section = name
    report.results.extend(results)
    print_section(console, name, results)


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _lazy(name: str) -> SectionFn:
    """Import the section only when it runs, so an import failure is that section's crash."""

    def run(config: BenchConfig) -> list[Result]:
        return load_section(name)(config)

    return run


def main(
    quick: bool, json_path: Path | None, only: list[str] | None, rate: float | None = None
) -> int:
    """Entry point of `ptmig bench`. Returns 0 unless a section crashed (1) or `only` is bad (2).

    Missed goals are reported in the table and the JSON, not in the exit status. With
    `json_path` `-` the JSON goes to stdout, the tables to stderr, and no HTML report is made.
    """
    to_stdout = json_to_stdout(json_path)
    console = Console(stderr=to_stdout)
    if not console.is_terminal:  # a log file: do not squeeze the table to 80 columns
        console = Console(width=120, stderr=to_stdout)
    try:
        names = select_sections(only)
    except KeyError as e:
        Console(stderr=True, soft_wrap=True).print(f"[red]{e.args[0]}[/red]")
        return USAGE
    config = BenchConfig.for_mode(quick, rate)
    report = run_bench(config, [(n, _lazy(n)) for n in names], console)
    if to_stdout:
        write_conv_json(report.to_json(), "-", indent=2)
        return FAILED if report.errors else OK
    path = json_path if json_path is not None else DEFAULT_JSON_PATH
    write_json(report, path)
    from .markdown import render as render_markdown  # (`python -m` it alone, too)

    md = path.with_suffix(".md")
    md.write_text(render_markdown(report.to_json()))
    console.print(f"results written to {path} (tables in Markdown: {md})")
    from ..report import write_report

    page = write_report(path.parent / "report", bench=report.to_json())
    console.print(f"report written to {page}")
    return FAILED if report.errors else OK


__all__ = [
    "SECTIONS",
    "BenchConfig",
    "Report",
    "Result",
    "load_section",
    "main",
    "run_bench",
    "select_sections",
    "write_json",
]
