"""The report's plots, drawn with matplotlib (Agg backend: no display needed) into PNG files.

- `plot_timeline`: the load client's ops/s over time, the migration phases shaded, the
  stop-and-copy (downtime) marked.
- `plot_rounds`: pages sent and pages remaining per pre-copy round.
- `plot_strategies`: downtime and bytes sent versus RAM size, one line per DMA-tracking
  strategy (from `ptmig bench`).
- `plot_bandwidth`: what a migration costs by `max-bandwidth`: the kv p99 during pre-copy ÷
  before, and each VMM's CPU per GiB of RAM, one line per strategy, the goals dashed.
Each function takes plain data and a path, writes the file and returns the path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..demo.timeline import BUCKET_S, Phase  # noqa: E402
from .bench import BandwidthPoint, StrategyPoint  # noqa: E402

PHASE_COLOURS = {
    "warm-up": "#f2f2f2",
    "setup": "#ffe9a8",
    "pre-copy": "#cfe3ff",
    "stop-and-copy": "#ff9d9d",
    "after": "#e3f5dc",
}
DPI = 110


def plot_timeline(
    series: Sequence[Sequence[float]],
    phases: Sequence[Phase],
    path: Path,
    *,
    title: str = "kv operations per second, as the client saw them",
    downtime_ms: float | None = None,
) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=DPI)
    for p in phases:
        if p.seconds > 0:
            ax.axvspan(
                p.start_s,
                p.end_s,
                color=PHASE_COLOURS.get(p.name, "#eeeeee"),
                alpha=0.9 if p.name == "stop-and-copy" else 0.6,
                lw=0,
                label=p.name,
            )
    t = [row[0] + BUCKET_S / 2 for row in series]
    rate = [row[1] / BUCKET_S for row in series]
    ax.plot(t, rate, color="#1f4e9c", lw=1.2, label="ops/s (100 ms buckets)")
    stop = next((p for p in phases if p.name == "stop-and-copy"), None)
    if stop is not None:
        ax.axvline(stop.start_s, color="#c00000", lw=0.8, ls="--")
        label = f"downtime {downtime_ms:.0f} ms" if downtime_ms is not None else "downtime"
        ax.annotate(
            label,
            xy=(stop.end_s, 1),
            xycoords=("data", "axes fraction"),
            xytext=(6, -14),
            textcoords="offset points",
            color="#c00000",
            fontsize=8,
        )
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("ops/s")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=6, frameon=False)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_rounds(rounds: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One bar per round: pages sent; the line: pages still dirty when the round ended."""
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=DPI)
    idx = [int(r.get("round", i)) for i, r in enumerate(rounds)]
    sent = [int(r.get("pages", 0)) for r in rounds]
    colours = ["#ff9d9d" if r.get("stop-and-copy") else "#6d9eeb" for r in rounds]
    ax.bar(idx, sent, color=colours, label="pages sent (red: stop-and-copy)")
    remaining = [
        (i, int(r["remaining-pages"]))
        for i, r in zip(idx, rounds, strict=True)
        if "remaining-pages" in r
    ]
    if remaining:
        ax.plot(
            [i for i, _ in remaining],
            [n for _, n in remaining],
            "o-",
            color="#333333",
            lw=1,
            label="pages remaining after the round",
        )
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xticks(idx)
    ax.set_xlabel("pre-copy round")
    ax.set_ylabel("4 KiB pages")
    ax.set_title("pages per pre-copy round", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_strategies(points: Mapping[str, Sequence[StrategyPoint]], path: Path) -> Path:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=DPI)
    for name, pts in points.items():
        ram = [p.ram_bytes / (1 << 30) for p in pts]
        d = [(r, p.downtime_ms) for r, p in zip(ram, pts, strict=True) if p.downtime_ms is not None]
        b = [
            (r, p.bytes_sent / (1 << 20))
            for r, p in zip(ram, pts, strict=True)
            if p.bytes_sent is not None
        ]
        if d:
            a1.plot([x for x, _ in d], [y for _, y in d], "o-", label=name)
        if b:
            a2.plot([x for x, _ in b], [y for _, y in b], "o-", label=name)
    a1.set_title("downtime", fontsize=10)
    a1.set_ylabel("ms")
    a2.set_title("bytes sent", fontsize=10)
    a2.set_ylabel("MiB")
    for ax in (a1, a2):
        ax.set_xlabel("guest RAM (GiB)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)
    fig.suptitle("DMA-tracking strategies versus RAM size", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bandwidth(
    points: Mapping[str, Sequence[BandwidthPoint]],
    path: Path,
    p99_goal: float = 2.0,
    cpu_goal: float = 1.0,
) -> Path:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=DPI)
    for name, pts in points.items():
        lat = [(p.bandwidth_mib, p.p99_ratio) for p in pts if p.p99_ratio is not None]
        if lat:
            a1.plot([x for x, _ in lat], [y for _, y in lat], "o-", label=name)
        src = [(p.bandwidth_mib, p.cpu_source) for p in pts if p.cpu_source is not None]
        dst = [(p.bandwidth_mib, p.cpu_destination) for p in pts if p.cpu_destination is not None]
        if src:
            (line,) = a2.plot([x for x, _ in src], [y for _, y in src], "o-", label=f"{name} src")
            if dst:
                a2.plot(
                    [x for x, _ in dst],
                    [y for _, y in dst],
                    "s:",
                    color=line.get_color(),
                    label=f"{name} dst",
                )
    a1.axhline(p99_goal, color="grey", linestyle="--", linewidth=1, label=f"goal {p99_goal:g}")
    a2.axhline(cpu_goal, color="grey", linestyle="--", linewidth=1, label=f"goal {cpu_goal:g}")
    a1.set_title("kv p99 during pre-copy ÷ before", fontsize=10)
    a1.set_ylabel("ratio")
    a2.set_title("VMM CPU per GiB of guest RAM", fontsize=10)
    a2.set_ylabel("s/GiB")
    ticks = sorted({p.bandwidth_mib for pts in points.values() for p in pts})
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("max-bandwidth (MiB/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)
    fig.suptitle("what a migration costs by max-bandwidth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
