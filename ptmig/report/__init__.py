"""The evaluation report: an HTML page with PNG plots, from a demo document and a bench document.

`write_report(out_dir, demo=..., bench=...)` writes `index.html` and its plots into `out_dir`
and returns the page's path. `demo` is what `ptmig demo --json` writes (see
`ptmig.demo.summary`); `bench` is what `ptmig bench` writes (see `ptmig.bench.write_json` and,
for the strategy comparison, `ptmig.report.bench`). Either may be None; the page shows what it
has. `python -m ptmig.report OUT_DIR --demo FILE --bench FILE` does the same from files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..demo.summary import summary_lines, verdict
from ..demo.timeline import phases_from_json
from .bench import bandwidth_points, result_rows, strategy_points
from .html import Section, machine_rows, render_page

PAGE = "index.html"


def _demo_section(doc: Mapping[str, Any], out_dir: Path) -> Section:
    from .plots import plot_rounds, plot_timeline

    s = Section("Live migration under load (ptmig demo)")
    v = verdict(doc)
    mig, load, demo = doc.get("migration") or {}, doc.get("load") or {}, doc.get("demo") or {}
    if v.ok:
        s.para(
            "VERIFIED: the guest was live-migrated while serving the kv load; every "
            "acknowledged value was read back and every page matched.",
            "ok",
        )
    else:
        s.para("NOT VERIFIED: " + "; ".join(v.problems), "bad")
    outage = demo.get("outage") or {}
    tp = demo.get("throughput") or {}
    lat = demo.get("latency") or {}
    cpu = demo.get("cpu") or {}
    ver = mig.get("x-verify") or {}

    def num(x: Any, spec: str = ".0f") -> str:
        return format(float(x), spec) if isinstance(x, (int, float)) else "n/a"

    s.table(
        ["measure", "value"],
        [
            ("DMA tracking", mig.get("x-dma-tracking", "n/a")),
            ("guest RAM", f"{num((mig.get('ram') or {}).get('total', 0) / (1 << 20))} MiB"),
            ("total migration time", f"{num(mig.get('total-time'))} ms"),
            ("downtime (VMM)", f"{num(mig.get('downtime'))} ms"),
            ("outage seen by the client at the switchover", f"{num(outage.get('client-ms'))} ms"),
            (
                "longest gap between the client's replies",
                f"{num(outage.get('client-longest-ms'))} ms",
            ),
            ("outage seen by the guest", f"{num(outage.get('guest-ms'))} ms"),
            (
                "kv ops/s before / during pre-copy / after the switchover",
                f"{num(tp.get('before'))} / {num(tp.get('pre-copy'))} / {num(tp.get('after'))}",
            ),
            *[
                (
                    f"kv latency {name} (p50 / p99 / max)",
                    f"{num(lat[key].get('p50_ms'), '.2f')} / "
                    f"{num(lat[key].get('p99_ms'), '.2f')} / "
                    f"{num(lat[key].get('max_ms'), '.1f')} ms",
                )
                for key, name in (
                    ("before", "before"),
                    ("pre-copy", "during pre-copy"),
                    ("after", "after the switchover"),
                )
                if isinstance(lat.get(key), dict)
            ],
            (
                "VMM CPU, migrate to switchover (source / destination)",
                f"{num(cpu.get('source-s-per-gib'), '.2f')} / "
                f"{num(cpu.get('destination-s-per-gib'), '.2f')} s per GiB sent",
            ),
            (
                "acknowledged values lost / wrong",
                f"{load.get('lost', 'n/a')} / {load.get('wrong', 'n/a')}",
            ),
            ("mismatched pages", f"{ver.get('mismatched', 'n/a')} of {ver.get('pages', 'n/a')}"),
        ],
        numeric=(1,),
    )
    phases = phases_from_json(demo.get("phases") or [])
    series = load.get("series") or []
    if series and phases:
        plot_timeline(series, phases, out_dir / "timeline.png", downtime_ms=mig.get("downtime"))
        s.figure(
            "timeline.png",
            "kv ops/s over time with the migration phases",
            "Client-observed kv operations per second (100 ms buckets). Shaded: warm-up, "
            "setup, pre-copy, stop-and-copy (the guest is paused: the downtime), and the "
            "time after the switchover, when the destination serves the load.",
        )
    rounds = mig.get("x-rounds") or []
    if rounds:
        plot_rounds(rounds, out_dir / "rounds.png")
        s.figure(
            "rounds.png",
            "pages per pre-copy round",
            "Pages sent in each pre-copy round (the last one, red, while the guest is "
            "paused) and the dirty pages left when each round ended.",
        )
    s.pre(summary_lines(doc))
    return s


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.4g}"
    return "n/a" if x is None else str(x)


def _bench_section(doc: Mapping[str, Any], out_dir: Path) -> Section:
    from .plots import plot_bandwidth, plot_strategies

    s = Section("Benchmarks (ptmig bench)")
    machine = doc.get("machine") or {}
    if machine:
        s.table(["machine", ""], machine_rows(machine))
    points = strategy_points(doc)
    if points:
        plot_strategies(points, out_dir / "strategies.png")
        s.figure(
            "strategies.png",
            "downtime and bytes sent versus RAM size per strategy",
            "Each DMA-tracking strategy migrating guests of growing RAM under device DMA: "
            "all-dirty re-sends every writable-mapped page at stop-and-copy, so its "
            "downtime grows with RAM; shadow and device-log only send what changed.",
        )
    else:
        s.para(
            "No strategy comparison in this bench run (results named "
            "strategy.<name>.<ram>.downtime / .bytes)."
        )
    by_bandwidth = bandwidth_points(doc)
    if by_bandwidth:
        plot_bandwidth(by_bandwidth, out_dir / "bandwidth.png")
        s.figure(
            "bandwidth.png",
            "latency and CPU cost versus max-bandwidth per strategy",
            "The same migration at several max-bandwidth caps, at half the kv client's maximum "
            "load: a higher cap moves more bytes a second beside the guest (its p99 during "
            "pre-copy rises) but ends pre-copy sooner and resends less (CPU per GiB falls).",
        )
    rows = [
        (
            r.get("section"),
            r.get("name"),
            _fmt(r.get("value")),
            r.get("unit", ""),
            r.get("goal") or "",
            {True: "yes", False: "NO", None: ""}[r.get("ok")],
        )
        for r in result_rows(doc)
    ]
    if rows:
        s.table(["section", "name", "median", "unit", "goal", "met"], rows, numeric=(2,))
    errors = doc.get("errors") or []
    if errors:
        s.pre([f"{e.get('section')}: {e.get('error', e)}" for e in errors])
    return s


def write_report(
    out_dir: Path, *, demo: Mapping[str, Any] | None = None, bench: Mapping[str, Any] | None = None
) -> Path:
    if demo is None and bench is None:
        raise ValueError("a report needs a demo document, a bench document, or both")
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    if demo is not None:
        sections.append(_demo_section(demo, out_dir))
    if bench is not None:
        sections.append(_bench_section(bench, out_dir))
    page = out_dir / PAGE
    page.write_text(
        render_page(
            "ptmig evaluation report",
            "Live migration of a KVM guest whose NIC and disk DMA straight into its memory.",
            sections,
        ),
        encoding="utf-8",
    )
    return page


__all__ = ["PAGE", "write_report"]
