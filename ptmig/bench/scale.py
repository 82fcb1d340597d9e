"""The scale benchmark (section `scale`): how migration cost grows with guest RAM.

Per guest size (256 MiB, 1, 2, 4 GiB; 8 GiB in the full bench only), `config.runs` times: two
`ptmig run` processes with an idle guest (the `dirty` workload on one page, halting between
stores, as in the `migration` section), whose RAM above `FILL_FROM` -- on both sides of the
MMIO gap for guests over 3 GiB -- is first filled with random bytes by the VMM, so every page
carries real data. It is migrated over loopback with the same data channels as the `migration`
section; one more migration per size runs with `x-verify` (not counted in the other medians:
the destination hashes each received batch, and a backlog of hashing delays its switchover
acknowledgement, i.e. the downtime) and must find no differing page. Reported per size:

- total time, downtime, throughput (`ram.transferred` / `total-time`), verify time (of the
  verified run: the digest comparison after the switchover);
- harvest time per pre-copy round (the dirty-log harvest of every RAM memslot, `harvest-ms`
  in `x-rounds`: a read of KVM's logs since pre-copy defers the re-arming), and the re-arming
  per round (`rearm-ms`: the CLEAR_DIRTY_LOG calls of the round's batches, spread over it);
- the VMM's own memory besides guest RAM, source and destination, as `x-query-memory`
  measures it after the migration (VMM and device processes' private memory, IOMMU tables,
  shadow pool), in MiB and as a percentage of guest RAM. ptmig's modules are compiled to
  bytecode before the VMMs start (`compile_ptmig`), as installing the package does: a VMM
  that compiles its modules from source at start keeps the compiler's garbage (after a 1 GiB
  migration 0.6 MiB of the source's private memory and 0.7 MiB of the destination's, 0.35 MiB
  of a VM that only runs: a source tree run with PYTHONDONTWRITEBYTECODE, as under a test
  runner); `extra["bytecode"]` says which it was.

Then the kv guest under load (`ptmig demo`, as one cell of the `strategies` section) at 1 and
4 GiB with `shadow`, sizes interleaved, `LOADED_RUNS` runs each (one in `--quick`): downtime, the
stop-and-copy round's pages, whether the switchover was forced, lost values and mismatched
pages. Both sizes get the same load, paced at half of what one guest serves unpaced (measured
first, as in `strategies`), with the demo's defaults (auto-converge on, 100 MiB/s, 300 ms
limit): downtime is then the engine's stop-and-copy of a converged pre-copy. An unpaced load
compares something else: on an idle host it out-dirties the 100 MiB/s link, pre-copy is forced
to end, and the downtime is whatever the guest dirtied in the last round -- larger at 4 GiB,
whose kv table spreads the same 65,536 keys over more pages (measured 2026-12-05: rounds of
~41,000 pages at 1 GiB and ~57,000 at 4 GiB; forced downtimes 182 / 312 ms).

A size whose source and destination would not fit the host's available memory with `HEADROOM`
to spare is skipped with a result that says so (the OOM killer would otherwise end one of them,
or something else on the host).

Goals (issue 18): total time per GiB at most 1.2x the 1 GiB one at every larger size (linear
in RAM); idle downtime <= 5 ms at the largest size; harvest <= 5 ms at the largest size; VMM
memory besides guest RAM <= 2 % of guest RAM at every size of 1 GiB and more; loaded downtime
at 4 GiB at most 1.3x the 1 GiB one; nothing lost, no page mismatched.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..vmmproc import free_port
from .harness import BenchConfig, BenchError, Goal, Result, compile_ptmig, measured, median
from .migration import (
    DATA_CHANNELS,
    FILL_FROM,
    _completed,
    _connect,
    _ptmig,
    _ptmig_config,
    _stop,
)

SECTION = "scale"
MiB = 1 << 20
GiB = 1 << 30
QUICK_SIZES = (256 * MiB, 1 * GiB, 2 * GiB, 4 * GiB)
FULL_SIZES = (*QUICK_SIZES, 8 * GiB)

GOAL_LINEAR = Goal("<=", 1.2, "x")
GOAL_IDLE_DOWNTIME = Goal("<=", 5, "ms")
GOAL_HARVEST = Goal("<=", 5, "ms")
GOAL_VMM_MEMORY = Goal("<=", 2, "%")
GOAL_LOADED_DOWNTIME_RATIO = Goal("<=", 1.3, "x")
GOAL_NOTHING_LOST = Goal("<=", 0)
LOADED_SIZES = ("1G", "4G")
LOADED_RUNS = 5  # kv runs per size in the full bench, at least
HEADROOM = 3 * GiB  # left to the rest of the host beside the two guests of a scale run
START_TIMEOUT_S = 120.0  # the destination prefaults all its RAM before it listens


@dataclass
class ScaleSample:
    memory: int
    total_ms: float
    downtime_ms: float
    transferred: int
    verify_ms: float
    harvest_ms: list[float]
    src_vmm: int
    dst_vmm: int
    rearm_ms: list[float] = field(default_factory=list)  # per pre-copy round, summed over it

    @property
    def gb_per_s(self) -> float:
        return self.transferred / (self.total_ms / 1000) / 1e9 if self.total_ms else 0.0


def run(config: BenchConfig) -> list[Result]:
    sizes = QUICK_SIZES if config.quick else FULL_SIZES
    samples: dict[int, list[ScaleSample]] = {}
    skipped: list[Result] = []
    bytecode = "compiled" if compile_ptmig() else "compiled at each VMM's start (not writable)"
    with tempfile.TemporaryDirectory(prefix="ptmig-bench-scale-") as d:
        tmp = Path(d)
        for size in sizes:
            short = memory_shortfall(size, available_memory())
            if short is not None:  # two such guests would push the host into the OOM killer
                skipped.append(
                    Result(
                        SECTION, label(size), float("nan"), "", None, None, [], {"skipped": short}
                    )
                )
                continue
            samples[size] = [scale_migration(tmp, size) for _ in range(config.runs)]
            verified = scale_migration(tmp, size, verify=True)
            for s in samples[size]:
                s.verify_ms = verified.verify_ms
        out = results(samples, bytecode) + skipped
        out += loaded_section(tmp, config)
    return out


def loaded_section(tmp: Path, config: BenchConfig) -> list[Result]:
    """The kv rows: the offered load is half the maximum one guest serves (as in the
    `strategies` section), measured here, then the cells."""
    from .strategies import max_rate

    rate = round(max_rate(3.0 if config.quick else 5.0) * 0.5)
    runs = 1 if config.quick else max(config.runs, LOADED_RUNS)
    return loaded_results(loaded_cells(tmp, runs, rate), rate)


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 if unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_shortfall(size: int, available: int) -> str | None:
    """Why a source and a destination of `size` do not fit in `available` bytes, or None.

    Both hold all of guest RAM (the source filled, the destination prefaulted), and the rest
    of the host keeps running: HEADROOM is left for it."""
    need = 2 * size + HEADROOM
    if available >= need:
        return None
    return (
        f"two {label(size)} guests need {need / GiB:.1f} GiB free with the headroom, "
        f"the host has {available / GiB:.1f} GiB available"
    )


def loaded_cells(tmp: Path, runs: int, rate: float) -> dict[str, list[Any]]:
    """The kv guest under the same paced load (`rate` ops/s) migrated with `shadow` at each of
    LOADED_SIZES, sizes interleaved (1G, 4G, 1G, 4G, ...) so that a noisy neighbour hits both
    alike, with the demo's defaults otherwise (auto-converge on, 100 MiB/s, 300 ms limit)."""
    from .strategies import StrategyBenchParams, demo_cell

    p = StrategyBenchParams(
        memories=LOADED_SIZES,
        strategies=("shadow",),
        runs=runs,
        warmup_s=3.0,
        after_s=3.0,
        rate=rate,
        auto_converge=True,
    )
    cells: dict[str, list[Any]] = {m: [] for m in LOADED_SIZES}
    for i in range(runs):
        for m in LOADED_SIZES:
            cells[m].append(demo_cell("shadow", m, p, tmp / f"kv-{m}-{i}"))
    return cells


def loaded_results(cells: dict[str, list[Any]], rate: float | None = None) -> list[Result]:
    """Per size: downtime, the stop-and-copy round's pages, forced switchovers, lost values
    and mismatched pages; then the two sizes' median downtimes compared.

    The comparison is the ratio of the two medians (the goal compares the sizes' downtimes);
    the per-pair ratios (run i of each size) are kept as its runs, for the spread."""
    out: list[Result] = []
    what = {
        "load": "kv guest, shadow, the same paced load at every size"
        + (f" ({rate:.0f} ops/s)" if rate else "")
        + ", auto-converge on, 100 MiB/s, 300 ms downtime limit"
    }
    for m, cs in cells.items():
        extra = {**what, "errors": [c.error for c in cs if c.error]}
        out += [
            measured(
                SECTION, f"kv-{m}.shadow.downtime", [c.downtime_ms for c in cs], "ms", extra=extra
            ),
            measured(
                SECTION,
                f"kv-{m}.shadow.final-pages",
                [float(c.downtime_parts.get("final-pages", math.nan)) for c in cs],
                "pages",
                extra={"what": "pages sent in the stop-and-copy round"},
            ),
            measured(
                SECTION,
                f"kv-{m}.shadow.forced",
                [float(c.forced) for c in cs],
                "",
                extra={"what": "1 where the switchover was forced (pre-copy did not converge)"},
            ),
            measured(
                SECTION,
                f"kv-{m}.shadow.lost+mismatched",
                [c.lost + c.mismatched for c in cs],
                "",
                GOAL_NOTHING_LOST,
                extra=extra,
            ),
        ]
    small, big = (cells[m] for m in LOADED_SIZES)
    name = f"kv.shadow.downtime {LOADED_SIZES[1]}/{LOADED_SIZES[0]}"
    small_ms = median([c.downtime_ms for c in small]) if small else math.nan
    big_ms = median([c.downtime_ms for c in big]) if big else math.nan
    ratio = big_ms / small_ms if small_ms > 0 else math.nan
    pairs = [
        b.downtime_ms / s.downtime_ms for s, b in zip(small, big, strict=False) if s.downtime_ms > 0
    ]
    out.append(
        Result(
            SECTION,
            name,
            ratio,
            "x",
            str(GOAL_LOADED_DOWNTIME_RATIO),
            GOAL_LOADED_DOWNTIME_RATIO.met_by(ratio),
            pairs,
            {
                "statistic": f"median {LOADED_SIZES[1]} / median {LOADED_SIZES[0]}; runs: "
                "run i's ratio",
                **what,
            },
        )
    )
    return out


def label(size: int) -> str:
    return f"{size // GiB}G" if size >= GiB else f"{size // MiB}M"


def results(samples: dict[int, list[ScaleSample]], bytecode: str = "compiled") -> list[Result]:
    """The per-size rows and the goal rows, from the samples of every size (`bytecode`: how
    the VMMs had ptmig's modules, told with their memory)."""
    out: list[Result] = []
    for size, ss in samples.items():
        name = label(size)
        extra: dict[str, Any] = {"memory_mib": size // MiB}
        held = {**extra, "bytecode": bytecode}
        out += [
            measured(SECTION, f"{name}.total", [s.total_ms for s in ss], "ms", extra=extra),
            measured(SECTION, f"{name}.downtime", [s.downtime_ms for s in ss], "ms", extra=extra),
            measured(SECTION, f"{name}.throughput", [s.gb_per_s for s in ss], "GB/s", extra=extra),
            measured(
                SECTION,
                f"{name}.harvest",
                [max(s.harvest_ms, default=0.0) for s in ss],
                "ms",
                extra={**extra, "statistic": "slowest round of each run"},
            ),
            measured(
                SECTION,
                f"{name}.rearm",
                [max(s.rearm_ms, default=0.0) for s in ss],
                "ms",
                extra={**extra, "statistic": "costliest round of each run, its batches summed"},
            ),
            measured(SECTION, f"{name}.verify", [s.verify_ms for s in ss], "ms", extra=extra),
            measured(
                SECTION, f"{name}.src-vmm-memory", [s.src_vmm / MiB for s in ss], "MiB", extra=held
            ),
            measured(
                SECTION, f"{name}.dst-vmm-memory", [s.dst_vmm / MiB for s in ss], "MiB", extra=held
            ),
            measured(
                SECTION,
                f"{name}.vmm-memory/ram",
                [100 * max(s.src_vmm, s.dst_vmm) / size for s in ss],
                "%",
                GOAL_VMM_MEMORY if size >= GiB else None,
                extra=held,
            ),
        ]
    out += _goal_rows(samples)
    return out


def _goal_rows(samples: dict[int, list[ScaleSample]]) -> list[Result]:
    sizes = sorted(samples)
    if not sizes:
        return []
    largest = sizes[-1]
    out: list[Result] = []
    if GiB in samples:
        # total time per GiB, relative to the 1 GiB guest's, per run (back-to-back sizes share
        # the machine's mood less than runs of one size do, so each run pairs index-wise)
        base = [s.total_ms / (s.memory / GiB) for s in samples[GiB]]
        for size in (s for s in sizes if s > GiB):
            rel = [
                s.total_ms / (s.memory / GiB) / b for s, b in zip(samples[size], base, strict=False)
            ]
            out.append(measured(SECTION, f"{label(size)}.total-per-GiB/1G", rel, "x", GOAL_LINEAR))
    big = samples[largest]
    out.append(
        measured(
            SECTION,
            f"{label(largest)}.idle-downtime",
            [s.downtime_ms for s in big],
            "ms",
            GOAL_IDLE_DOWNTIME,
        )
    )
    out.append(
        measured(
            SECTION,
            f"{label(largest)}.harvest-per-round",
            [h for s in big for h in s.harvest_ms] or [float("nan")],
            "ms",
            GOAL_HARVEST,
            extra={"statistic": "median over every round"},
        )
    )
    return out


def scale_migration(tmp: Path, memory: int, verify: bool = False) -> ScaleSample:
    """One migration of an idle guest of `memory` bytes, its RAM filled first."""
    config = _ptmig_config(tmp, memory)
    port = free_port()
    # plain TCP, as the `migration` section's unsealed rows (and QEMU's tcp:)
    src = _ptmig(tmp, "src", config, "--insecure")
    dst = _ptmig(tmp, "dst", config, "--incoming", f"tcp:127.0.0.1:{port}", "--insecure")
    qs = qd = None
    try:
        qs = _connect(tmp / "src.qmp", src, START_TIMEOUT_S)
        qd = _connect(tmp / "dst.qmp", dst, START_TIMEOUT_S)
        qs.wait_status("running", START_TIMEOUT_S)
        qs.execute("x-debug-fill-ram", {"gpa": FILL_FROM, "size": span(memory) - FILL_FROM})
        qs.execute(
            "migrate-set-parameters",
            {"x-dma-tracking": "none", "max-bandwidth": 0, "multifd-channels": DATA_CHANNELS},
        )
        qs.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-verify", "state": verify}]},
        )
        qs.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = _completed(qs, 60 + 30 * memory / GiB)
        qd.wait_status("running", 30)
        checked = info.get("x-verify", {})
        if verify and checked.get("mismatched") != 0:
            raise BenchError(f"verified migration of {label(memory)} failed: {checked}")
        src_mem = qs.execute("x-query-memory")["vmm"]["total"]
        dst_mem = qd.execute("x-query-memory")["vmm"]["total"]
        rounds = info.get("x-rounds", [])
        harvest = [float(r["harvest-ms"]) for r in rounds if "harvest-ms" in r]
        rearm = [float(r["rearm-ms"]) for r in rounds if "rearm-ms" in r]
        return ScaleSample(
            memory,
            float(info["total-time"]),
            float(info["downtime"]),
            int(info["ram"]["transferred"]),
            float(checked.get("time-ms", 0.0)),
            harvest,
            int(src_mem),
            int(dst_mem),
            rearm,
        )
    finally:
        _stop(src, qs)
        _stop(dst, qd)


def span(memory: int) -> int:
    """The guest-physical span of `memory` bytes of RAM (the MMIO gap included)."""
    from ..layout import ram_top

    return ram_top(memory)
