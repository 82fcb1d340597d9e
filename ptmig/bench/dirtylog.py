"""The floor under a pre-copy's latency: dirty tracking alone, nothing sent (part of the
`bandwidth` section).

A pre-copy round starts with a harvest of KVM's dirty log, and a harvest write-protects every
page the guest wrote since the one before, so the guest takes a write fault on its first write
to each of them. That cost is paid by every pre-copy whatever its DMA strategy and bandwidth;
how much it is depends on the host (hardware dirty logging such as Intel's PML makes it nearly
free; software write-protection under shadow paging does not). This measures it on one kv guest
that does not migrate, at the offered load of the cells: `calc-dirty-rate` in `dirty-bitmap`
mode back to back (one harvest every `calc-time`, the pace of pre-copy's rounds), each phase
against a plain phase just before it, and `page-sampling` (no harvest, same QMP traffic) as the
control:

    bandwidth.dirty_log.<P>ms.p99_ratio    kv p99 with a harvest every P ms ÷ p99 just before
    bandwidth.dirty_log.<P>ms.p50_ratio
    bandwidth.dirty_log.sampling.p99_ratio the control: page-sampling every 300 ms
    bandwidth.dirty_log.rate               the guest's dirty rate (MiB/s, dirty-bitmap at 300 ms)

No goal: this is not a cost ptmig adds but the one it cannot remove without hardware help; a
pre-copy's `p99_ratio` can be compared with it.

The same way, the other half of what a tracking strategy's pre-copy costs the guest without a
byte sent: its DMA tracking alone, `x-shadow-start` for the phase (shadowing entered at its
start, as a migration enters it, and left at its end), no dirty log harvested:

    bandwidth.dma_tracking.<shadow|intercept>.p99_ratio   kv p99 shadowed ÷ p99 just before
    bandwidth.dma_tracking.<shadow|intercept>.p50_ratio

and both at once, which is what a tracking strategy's pre-copy really costs before a byte is
sent: `x-shadow-start` and a dirty-bitmap harvest every 300 ms for the phase
(`<shadow|intercept>_300ms`). Every phase also reports how often the guest committed its log
to the disk, against the phase before (`commit_ratio`: the kv guest acknowledges a PUT only
after its group commit, one disk round trip through every hop of the data path, so a slower
round trip shows there first). Measured on the 2-core AMD host (1 GiB, 21,113 ops/s): either
tracking alone leaves the commit rate and p50 where they were and dirty logging alone does too
(p99 x1.5-2.1), but the two together halve the commit rate and raise p50 x2.5-4 -- with no
migration at all, so a shadowed pre-copy's latency is mostly this, not the pages it sends.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from . import progress
from .harness import BenchError, Result, measured, paired_ratios

SECTION = "bandwidth"
PERIODS_MS = (300, 1000)
CONTROL_MS = 300
PREFIX = f"{SECTION}.dirty_log"
TRACKING_PREFIX = f"{SECTION}.dma_tracking"
SHADOW_MODES = ("shadow", "intercept")  # x-shadow-start's x-dma-tracking
KEYS_PREFIX = "floor"  # every phase rewrites the same keys: the guest's table does not grow
WARMUP_S = 2.0


@dataclass(frozen=True)
class Phase:
    """One load phase: calc-dirty-rate `mode` ("dirty-bitmap" or "page-sampling") every
    `period_ms`, or none; DMA `tracking` ("shadow" / "intercept": x-shadow-start for the
    phase), or none. Neither: a plain phase."""

    name: str
    mode: str | None = None
    period_ms: int = 0
    tracking: str | None = None

    @property
    def prefix(self) -> str:
        return TRACKING_PREFIX if self.tracking is not None else PREFIX

    @property
    def how(self) -> str:
        parts = [f"x-shadow-start {self.tracking}"] if self.tracking is not None else []
        if self.mode is not None:
            parts.append(f"calc-dirty-rate {self.mode} every {self.period_ms} ms")
        return " and ".join(parts) or "nothing"


PHASES: tuple[Phase, ...] = (
    *(Phase(f"{p}ms", "dirty-bitmap", p) for p in PERIODS_MS),
    Phase("sampling", "page-sampling", CONTROL_MS),
    *(Phase(mode, tracking=mode) for mode in SHADOW_MODES),
    *(Phase(f"{mode}_{CONTROL_MS}ms", "dirty-bitmap", CONTROL_MS, mode) for mode in SHADOW_MODES),
)

# The kv guest's count of log commits: its vCPU 0 stats slot, workload word 9
# (guest/workloads/kv.c), as x-query-guest-stats returns it.
KV_COMMITS_WORD = 9


@dataclass
class LoadStats:
    p50_ms: float
    p99_ms: float
    ops_per_s: float
    lost: int
    commits: int = 0  # the guest's log commits while the load ran


def result_names() -> list[str]:
    names = []
    for phase in PHASES:
        base = f"{phase.prefix}.{phase.name}"
        names += [f"{base}.p99_ratio", f"{base}.p50_ratio", f"{base}.commit_ratio"]
    return [*names, f"{PREFIX}.rate"]


def results(
    pairs: dict[str, list[tuple[LoadStats, LoadStats]]],
    rates: Sequence[float],
    extra: dict[str, Any],
) -> list[Result]:
    """Per measured phase, the medians of each pair's own ratio (pure)."""
    out = []
    phases = {p.name: p for p in PHASES}
    for name, runs in pairs.items():
        phase = phases[name]
        what = {**extra, "what": f"kv latency with {phase.how} ÷ the phase before"}
        for stat in ("p99", "p50"):
            ratios = paired_ratios(
                [getattr(m, f"{stat}_ms") for _, m in runs],
                [getattr(b, f"{stat}_ms") for b, _ in runs],
            )
            name_ = f"{phase.prefix}.{name}.{stat}_ratio"
            out.append(measured(SECTION, name_, ratios, "ratio", None, what))
        commits = paired_ratios([m.commits for _, m in runs], [b.commits for b, _ in runs])
        what = {**extra, "what": f"the kv guest's log commits with {phase.how} ÷ the phase before"}
        out.append(
            measured(SECTION, f"{phase.prefix}.{name}.commit_ratio", commits, "ratio", None, what)
        )
    what = {**extra, "what": "the guest's dirty rate, dirty-bitmap every 300 ms"}
    out.append(
        measured(SECTION, f"{PREFIX}.rate", list(rates) or [float("nan")], "MiB/s", None, what)
    )
    return out


class _Measuring:
    """calc-dirty-rate back to back in a thread until stopped; the rates it read."""

    def __init__(self, qmp: Any, phase: Phase, seconds: float) -> None:
        self.qmp, self.phase = qmp, phase
        self.until = time.monotonic() + seconds  # the load's phase (not its read-back after)
        self.rates: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="calc-dirty-rate", daemon=True)

    def __enter__(self) -> _Measuring:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        args = {
            "calc-time": self.phase.period_ms,
            "calc-time-unit": "millisecond",
            "mode": self.phase.mode,
        }
        try:
            while not self._stop.is_set() and time.monotonic() < self.until:
                self.qmp.execute("calc-dirty-rate", args)
                time.sleep(self.phase.period_ms / 1000)
                while (info := self.qmp.execute("query-dirty-rate"))["status"] != "measured":
                    time.sleep(0.01)
                if "dirty-rate" not in info:
                    raise BenchError(f"calc-dirty-rate failed: {info.get('x-error')}")
                self.rates.append(float(info["dirty-rate"]))
        except Exception as e:  # reported by the phase
            self.error = str(e)


def _load(config: Path, rate: float, seconds: float, out: Path) -> LoadStats:
    """`ptmig load` in a process of its own (the bench's QMP thread must not share its GIL)."""
    from ..vmmproc import ptmig_command

    cmd = ptmig_command(
        *("load", str(config), "--rate", str(rate), "--duration", str(seconds)),
        *("--json", str(out), "--keys-prefix", KEYS_PREFIX),
    )
    proc = subprocess.run(cmd, capture_output=True, timeout=seconds + 120)
    if proc.returncode != 0:
        raise BenchError(f"ptmig load failed ({proc.returncode}): {proc.stderr.decode()[-800:]}")
    doc = json.loads(out.read_text())
    return LoadStats(
        float(doc["p50_ms"]), float(doc["p99_ms"]), float(doc["ops_per_s"]), int(doc["lost"])
    )


def guest_commits(qmp: Any) -> int:
    """The kv guest's log commits so far (0 where vCPU 0 reports no workload words)."""
    vcpus = qmp.execute("x-query-guest-stats")["vcpus"]
    words = vcpus[0]["workload"] if vcpus else []
    return int(words[KV_COMMITS_WORD]) if len(words) > KV_COMMITS_WORD else 0


def run_phase(
    qmp: Any, phase: Phase, seconds: float, load: Callable[[float], LoadStats]
) -> tuple[LoadStats, list[float]]:
    if phase.tracking is not None:
        qmp.execute("x-shadow-start", {"x-dma-tracking": phase.tracking})
    try:
        start = guest_commits(qmp)
        if phase.mode is None:
            stats, rates = load(seconds), []
        else:
            with _Measuring(qmp, phase, seconds) as m:
                stats = load(seconds)
            if m.error is not None:
                raise BenchError(f"calc-dirty-rate {phase.name}: {m.error}")
            rates = m.rates
        stats.commits = guest_commits(qmp) - start
    finally:
        if phase.tracking is not None:
            qmp.execute("x-shadow-stop")
    return stats, rates


def run_pair(
    memory: str, rate: float, seconds: float, phase: Phase
) -> tuple[LoadStats, LoadStats, list[float]]:
    """On a fresh kv guest (a harvest's after-effect outlasts 10 s of settling, measured):
    a warm-up, a plain phase, then `phase`."""
    from ..vmmproc import QmpMonitor
    from .devices import KvVmm

    with (
        tempfile.TemporaryDirectory(prefix="ptmig-bench-dirtylog-") as d,
        KvVmm(memory, qmp=True) as vmm,
        QmpMonitor(vmm.qmp_path(), "kv vmm") as qmp,
    ):
        qmp.connect(vmm.proc)
        out = Path(d) / "load.json"

        def load(seconds: float) -> LoadStats:
            return _load(vmm.config, rate, seconds, out)

        load(WARMUP_S)  # the keys' pages written once
        before, _ = run_phase(qmp, Phase("plain"), seconds, load)
        during, got = run_phase(qmp, phase, seconds, load)
    if before.lost or during.lost:
        raise BenchError(f"kv lost values in the phase {phase.name}")
    return before, during, got


def run_dirty_log_floor(
    memory: str, rate: float, repeats: int, seconds: float, console: Console | None = None
) -> list[Result]:
    console = console or Console(width=120)
    pairs: dict[str, list[tuple[LoadStats, LoadStats]]] = {m.name: [] for m in PHASES}
    rates: list[float] = []
    for k in range(repeats):
        progress.step("dirty and DMA tracking alone, no migration", k + 1, repeats)
        for phase in PHASES:
            before, during, got = run_pair(memory, rate, seconds, phase)
            pairs[phase.name].append((before, during))
            if (
                phase.period_ms == CONTROL_MS
                and phase.mode == "dirty-bitmap"
                and not phase.tracking
            ):
                rates += got
            console.print(
                f"  tracking, no migration, {phase.name:>15}: kv p99 {before.p99_ms:.2f} -> "
                f"{during.p99_ms:.2f} ms, p50 {before.p50_ms:.2f} -> {during.p50_ms:.2f} ms, "
                f"log commits {before.commits} -> {during.commits}"
                + (f", {statistics.median(got):.0f} MiB/s dirtied" if got else ""),
                highlight=False,
            )
    extra = {"memory": memory, "offered_ops": rate, "seconds": seconds, "repeats": repeats}
    return results(pairs, rates, extra)


__all__ = ["PHASES", "LoadStats", "result_names", "results", "run_dirty_log_floor"]
