"""The post-copy benchmark (section `postcopy`): one guest that dirties faster than the link,
migrated three ways on the same link caps, in the same run.

The guest: 1 GiB, `dirty` with a 32 MiB working set written as fast as one vCPU can (far more
than the link carries) in a scattered page order (`scatter=1`: after a post-copy switchover it
touches pages all over the working set, so it faults on many the source has not pushed yet:
43-498 a run in six runs on a loaded host, not the 1-8 of a page-order sweep), its other RAM
above `FILL_FROM` filled with random bytes (`x-debug-fill-ram`) so every page has data to
carry; `downtime-limit` 20 ms at 100 MiB/s and 5 ms unlimited (`DOWNTIME_LIMITS_MS`), so no
pre-copy round fits it (32 MiB would need 1.6 and 6.4 GB/s). Per run and per link cap
(`max-bandwidth` 100 MiB/s, and unlimited over loopback), back to back:
- **precopy**: plain pre-copy; it cannot converge, so it ends in the forced switchover after
  `x-max-stalled-rounds` rounds without progress (the working set moves in the downtime);
- **autoconverge**: pre-copy with QEMU's auto-converge throttle;
- **postcopy**: `postcopy-ram`, switching after the first pre-copy round
  (`x-postcopy-after-rounds` 1), the rest fetched on demand.
Reported per mode and cap: total time and downtime (`query-migrate`), bytes sent
(`ram.transferred`) and their ratio to guest RAM, the guest's throughput during the migration
as a fraction of its own rate just before it (loop iterations from the `migrate` command until
the guest runs on the destination with every page there, so the window contains the
switchover), and for post-copy the destination's remote fault latency p50/p99/max in µs with
the number of remote faults it is taken over (from the fault being read to the page
installed, `x-query-postcopy`; `fault_p99` says per run how many faults and who wrote the
requests: the native sender on a plain stream). `postcopy/autoconverge.guest` is
the ratio of the two guest throughputs, per run.

A fourth row set, **devices** (`postcopy.devices.*`): the kv guest (256 MiB) with its NIC and
disk shadowed (`x-dma-tracking` shadow), under a paced `ptmig load` (DEVICE_LOAD_RATE ops/s,
verified) from before the migration until after it, switched to post-copy after pre-copy round
1 at 100 MiB/s with `x-verify`: downtime and outage (checked to hold the switchover as below),
the destination's vCPU faults and page requests, the pages its shadow data plane fetched
itself before forwarding a request (`x-query-shadow` x-postcopy `pages-fetched`), and the
load's lost / wrong values and `x-verify` mismatched pages (all three must be 0).

The post-copy downtime is checked to contain the switchover, in the same run: the source
stamps its vCPU stop and the destination's acknowledgement, the destination the start of its
vCPUs, all on the host's CLOCK_MONOTONIC (both processes run on this host). `outage` is the
stop → the guest running on the destination; `switchover_in_window` (per run, in the downtime
row's extra) says the destination started the guest after the stop and within SPAN_SLACK_MS
of the acknowledgement that ends the downtime figure.

The post-copy rows are taken over the runs that switched to post-copy (a run whose pre-copy
round fits the downtime limit is a pre-copy migration: the policy prefers it) and, for the
outage and the fault latencies, that measured them (a run whose background push stays ahead
of the guest has no remote fault). A row no run measured says why (`skipped`, shown as "not
measured: ...") and its goal is not judged; the fault p99 goal applies to both caps (both
are loopback).
"""

from __future__ import annotations

import math
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..vmmproc import QmpMonitor, free_port
from . import progress
from .harness import BenchConfig, BenchError, Goal, Result, measured, paired_ratios
from .migration import _completed, _connect, _ptmig, _stop

SECTION = "postcopy"
MiB = 1 << 20
FILL_FROM = 48 * MiB  # firmware, the workload's bitmap and its 32 MiB working set live below
WORKING_SET_MIB = 32
DOWNTIME_LIMIT_MS = 20
CAPS = {"100MiBps": 100 * MiB, "unlimited": 0}
# The downtime limit per cap, the same for the three modes: 20 ms at 100 MiB/s (the working set
# would need 1.6 GB/s); over unlimited loopback an idle 2-core host carries the 32 MiB in
# 15-19 ms, so with 20 ms a pre-copy round fitted, the policy preferred it and the "postcopy"
# runs were pre-copy migrations (0 faults in 5 of 5 on 2026-12-05): 5 ms would need 6.4 GB/s.
DOWNTIME_LIMITS_MS = {"100MiBps": DOWNTIME_LIMIT_MS, "unlimited": 5}
MODES = ("precopy", "autoconverge", "postcopy")

GOAL_BYTES_PER_RAM = Goal("<=", 1.05)
GOAL_TOTAL_PER_IDEAL = Goal("<=", 1.2)
GOAL_DOWNTIME_MS = Goal("<=", 20, "ms")
GOAL_FAULT_P99_US = Goal("<=", 2000, "us")
GOAL_GUEST_VS_AUTOCONVERGE = Goal(">=", 1.0)
# The destination starts its vCPUs right after sending its acknowledgement: a start later than
# this past the source's receipt of it is a switchover the downtime figure did not hold.
SPAN_SLACK_MS = 2.0
DEVICE_MEMORY = "256M"
DEVICE_LOAD_RATE = 300.0  # kv ops/s offered (verified) during the devices row's migration
DEVICE_WARMUP_S = 2.0
DEVICE_LOAD_S = 20.0  # long enough to span the migration at 100 MiB/s


@dataclass(frozen=True)
class PostcopyBenchParams:
    memory: int = 1024 * MiB
    start_timeout_s: float = 60.0
    migration_timeout_s: float = 300.0
    baseline_s: float = 1.0  # how long the guest's own rate is measured before migrating

    @classmethod
    def for_config(cls, config: BenchConfig) -> PostcopyBenchParams:
        return cls()  # quick only runs fewer times: a smaller guest would miss the bytes goal


@dataclass
class Sample:
    total_ms: float
    downtime_ms: float
    transferred: int
    guest_kept: float  # guest progress rate during the migration / its rate before
    fault_p50_us: float = float("nan")
    fault_p99_us: float = float("nan")
    fault_max_us: float = float("nan")
    faults: int = 0  # remote faults the latencies are taken over
    request_path: str | None = None  # who wrote the page requests ("native", "fetcher")
    went_postcopy: bool = False  # the postcopy mode switched (a loaded host may converge first)
    outage_ms: float = float("nan")  # source stop -> guest started on the destination
    in_window: bool | None = None  # the switchover lies inside the downtime window


def run(config: BenchConfig) -> list[Result]:
    p = PostcopyBenchParams.for_config(config)
    samples: dict[tuple[str, str], list[Sample]] = {(m, c): [] for m in MODES for c in CAPS}
    devices: list[DeviceSample] = []
    with tempfile.TemporaryDirectory(prefix="ptmig-bench-postcopy-") as d:
        for i in range(config.runs):
            for cap, rate in CAPS.items():
                for mode in MODES:
                    progress.step(f"{mode} at {cap}", i + 1, config.runs)
                    samples[(mode, cap)].append(
                        migrate_once(Path(d), p, mode, rate, DOWNTIME_LIMITS_MS[cap])
                    )
            progress.step("postcopy with devices", i + 1, config.runs)
            devices.append(devices_once(Path(d), p))
    return results(samples, p) + device_results(devices)


@dataclass
class DeviceSample:
    """One post-copy migration of the kv guest with its devices shadowed, under load."""

    downtime_ms: float
    outage_ms: float = float("nan")
    in_window: bool | None = None
    faults: int = 0  # the destination's vCPU faults on missing pages
    requests: int = 0  # pages the destination asked for (faults, VMM and data plane)
    pages_fetched: int = 0  # of them, fetched by the shadow data plane before a request
    ring_fetch_ms: float = float("nan")  # the devices' entry after the vCPUs started: ring pages
    enter_ms: float = float("nan")  # then the shadow engine's entry
    lost: int = 0
    wrong: int = 0
    acked: int = 0
    mismatched: int = 0
    went_postcopy: bool = False


def device_results(runs: list[DeviceSample]) -> list[Result]:
    """The `postcopy.devices.*` rows (pure)."""
    if not runs:
        return []
    name = "postcopy.devices"
    what = {
        "guest": f"kv, {DEVICE_MEMORY}, NIC and disk shadowed",
        "load_ops_per_s": DEVICE_LOAD_RATE,
        "max_bandwidth": "100MiBps",
        "switched_to_postcopy": [r.went_postcopy for r in runs],
    }
    counts = {
        "faults": [float(r.faults) for r in runs],
        "postcopy_requests": [float(r.requests) for r in runs],
        "pages_fetched_by_dataplane": [float(r.pages_fetched) for r in runs],
        "acked": [float(r.acked) for r in runs],
    }
    zero = Goal("<=", 0)
    return [
        measured(
            SECTION,
            f"{name}.downtime",
            [r.downtime_ms for r in runs],
            "ms",
            GOAL_DOWNTIME_MS,
            {**what, "switchover_in_window": [r.in_window for r in runs]},
        ),
        measured(SECTION, f"{name}.outage", [r.outage_ms for r in runs], "ms", GOAL_DOWNTIME_MS),
        *[measured(SECTION, f"{name}.{k}", v, "count") for k, v in counts.items()],
        measured(
            SECTION,
            f"{name}.ring_fetch",
            [r.ring_fetch_ms for r in runs],
            "ms",
            extra={"what": "the devices' ring pages made present, after the vCPUs started"},
        ),
        measured(
            SECTION,
            f"{name}.shadow_entry",
            [r.enter_ms for r in runs],
            "ms",
            extra={"what": "entering shadow mode (what it would add to the downtime before)"},
        ),
        *[
            measured(SECTION, f"{name}.{k}", v, unit, zero, statistic=100)  # every run: 0
            for k, v, unit in (
                ("lost", [float(r.lost) for r in runs], "count"),
                ("wrong", [float(r.wrong) for r in runs], "count"),
                ("mismatched", [float(r.mismatched) for r in runs], "pages"),
            )
        ],
    ]


def results(samples: dict[tuple[str, str], list[Sample]], p: PostcopyBenchParams) -> list[Result]:
    """The rows (pure). A post-copy row is taken over the runs that switched to post-copy and
    measured it (`_postcopy_row`): a run whose pre-copy round fitted the downtime limit is a
    pre-copy migration, and one without remote faults has no fault latency."""
    out: list[Result] = []
    extra: dict[str, Any] = {
        "memory_mib": p.memory // MiB,
        "working_set_mib": WORKING_SET_MIB,
        "downtime_limit_ms": DOWNTIME_LIMITS_MS,
    }
    for (mode, cap), runs in samples.items():
        post = mode == "postcopy"
        name = f"{mode}.{cap}"
        ex = {**extra, "switched_to_postcopy": [s.went_postcopy for s in runs]} if post else extra

        def row(
            suffix: str,
            values: list[float],
            unit: str,
            goal: Goal | None = None,
            more: dict[str, Any] | None = None,
            *,
            post: bool = post,
            name: str = name,
            runs: list[Sample] = runs,
        ) -> Result:
            if post:
                return _postcopy_row(f"{name}.{suffix}", runs, values, unit, goal, more)
            return measured(SECTION, f"{name}.{suffix}", values, unit, goal, more)

        rate = CAPS[cap]
        out += [
            row("total", [s.total_ms for s in runs], "ms", None, ex),
            row(
                "downtime",
                [s.downtime_ms for s in runs],
                "ms",
                GOAL_DOWNTIME_MS if post else None,
                {"switchover_in_window": [s.in_window for s in runs]} if post else None,
            ),
            row(
                "bytes/ram",
                [s.transferred / p.memory for s in runs],
                "ratio",
                GOAL_BYTES_PER_RAM if post else None,
            ),
            row("guest", [s.guest_kept for s in runs], "ratio"),
        ]
        if rate:
            ideal_ms = p.memory / rate * 1000
            out.append(
                row(
                    "total/ideal",
                    [s.total_ms / ideal_ms for s in runs],
                    "ratio",
                    GOAL_TOTAL_PER_IDEAL if post else None,
                    {"ideal": "guest RAM / max-bandwidth"},
                )
            )
        if post:
            out += [
                row(
                    "outage",
                    [s.outage_ms for s in runs],
                    "ms",
                    GOAL_DOWNTIME_MS,
                    {"what": "source vCPU stop -> destination vCPU start, one clock"},
                ),
                row("fault_p50", [s.fault_p50_us for s in runs], "us"),
                row(
                    "fault_p99",
                    [s.fault_p99_us for s in runs],
                    "us",
                    GOAL_FAULT_P99_US,  # both caps are loopback
                    {
                        "faults": [s.faults for s in runs],
                        "request_path": [s.request_path for s in runs],
                    },
                ),
                row("fault_max", [s.fault_max_us for s in runs], "us"),
                row("faults", [float(s.faults) for s in runs], "count"),
            ]
    for cap in CAPS:
        pc, ac = samples[("postcopy", cap)], samples[("autoconverge", cap)]
        pairs = [(a, b) for a, b in zip(pc, ac, strict=True) if a.went_postcopy]
        out.append(
            _postcopy_row(
                f"postcopy/autoconverge.{cap}.guest",
                [a for a, _ in pairs] or pc,
                paired_ratios([a.guest_kept for a, _ in pairs], [b.guest_kept for _, b in pairs])
                if pairs
                else [math.nan] * len(pc),
                "ratio",
                GOAL_GUEST_VS_AUTOCONVERGE,
            )
        )
    return out


def _postcopy_row(
    name: str,
    runs: list[Sample],
    values: list[float],
    unit: str,
    goal: Goal | None = None,
    extra: dict[str, Any] | None = None,
) -> Result:
    """A post-copy row over the runs that switched to post-copy and measured it (the fault
    latencies need a remote fault); if none did, a row that says why, its goal not judged:
    a workload that cannot show the number is neither a met nor a missed goal (pure)."""
    have = [v for s, v in zip(runs, values, strict=True) if s.went_postcopy and math.isfinite(v)]
    extra = dict(extra or {})
    if have:
        if len(have) < len(values):
            extra["runs_not_measuring"] = len(values) - len(have)
        return measured(SECTION, name, have, unit, goal, extra)
    extra["skipped"] = _why_unmeasured(runs)
    return Result(
        SECTION, name, math.nan, unit, None if goal is None else str(goal), None, [], extra
    )


def _why_unmeasured(runs: list[Sample]) -> str:
    """Why no run of a post-copy row measured it (pure)."""
    if not any(s.went_postcopy for s in runs):
        return "no run switched to post-copy (a pre-copy round fitted the downtime limit first)"
    if not any(s.faults for s in runs if s.went_postcopy):
        return "0 remote faults in every run: the push sent every page before the guest asked"
    return "no run that switched to post-copy reported it"


def _config(tmp: Path, memory: int) -> Path:
    path = tmp / "postcopy.toml"
    path.write_text(
        f'[vm]\nname = "benchpostcopy"\nmemory = "{memory // MiB}M"\nvcpus = 1\n\n'
        f'[workload]\nname = "dirty"\nargs = {{ ws = "{WORKING_SET_MIB}M", scatter = "1" }}\n'
    )
    return path


def _iterations(q: QmpMonitor) -> int:
    return sum(int(v["iterations"]) for v in q.execute("x-query-guest-stats")["vcpus"])


def migrate_once(
    tmp: Path, p: PostcopyBenchParams, mode: str, rate: int, downtime_limit_ms: int
) -> Sample:
    """One migration of the dirty guest in `mode` at `rate` bytes/s (0: unlimited)."""
    config = _config(tmp, p.memory)
    port = free_port()
    src = _ptmig(tmp, "src", config, "--insecure")
    dst = _ptmig(tmp, "dst", config, "--insecure", "--incoming", f"tcp:127.0.0.1:{port}")
    qs = qd = None
    try:
        qs = _connect(tmp / "src.qmp", src, p.start_timeout_s)
        qd = _connect(tmp / "dst.qmp", dst, p.start_timeout_s)
        qs.wait_status("running", p.start_timeout_s)
        qd.wait_status("inmigrate", p.start_timeout_s)
        qs.execute("x-debug-fill-ram", {"gpa": FILL_FROM, "size": p.memory - FILL_FROM})
        params: dict[str, Any] = {
            "x-dma-tracking": "none",
            "max-bandwidth": rate,
            "downtime-limit": downtime_limit_ms,
        }
        if mode == "postcopy":
            params["x-postcopy-after-rounds"] = 1
        qs.execute("migrate-set-parameters", params)
        caps = [
            {"capability": "auto-converge", "state": mode == "autoconverge"},
            {"capability": "postcopy-ram", "state": mode == "postcopy"},
        ]
        qs.execute("migrate-set-capabilities", {"capabilities": caps})
        t0, i0 = time.monotonic(), _iterations(qs)
        time.sleep(p.baseline_s)  # the guest's own rate, just before
        t1, i1 = time.monotonic(), _iterations(qs)
        qs.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = _completed(qs, p.migration_timeout_s)
        qd.wait_status("running", 10)
        report = _postcopy_done(qd, p.migration_timeout_s) if mode == "postcopy" else {}
        t2, i2 = time.monotonic(), _iterations(qd)  # counters carry over to the destination
        before = (i1 - i0) / (t1 - t0)
        during = (i2 - i1) / (t2 - t1)
        sample = Sample(
            float(info["total-time"]),
            float(info["downtime"]),
            int(info["ram"]["transferred"]),
            during / before if before > 0 else float("nan"),
            went_postcopy="x-postcopy" in info,
        )
        if mode == "postcopy":
            lat = report.get("fault-latency-us", {})
            sample.fault_p50_us = float(lat.get("p50", float("nan")))
            sample.fault_p99_us = float(lat.get("p99", float("nan")))
            sample.fault_max_us = float(lat.get("max", float("nan")))
            sample.faults = int(lat.get("samples", 0))
            sample.request_path = report.get("request-path")
            _switchover_window(sample, info.get("x-postcopy", {}), report)
        return sample
    finally:
        _stop(src, qs)
        _stop(dst, qd)


def _kv_config(tmp: Path) -> Path:
    path = tmp / "postcopy-kv.toml"
    path.write_text(
        f'[vm]\nname = "benchpostcopykv"\nmemory = "{DEVICE_MEMORY}"\nvcpus = 1\n'
        '[workload]\nname = "kv"\n'
        f'[[net]]\nid = "net0"\nmac = "52:54:00:b0:00:0c"\nip = "10.0.0.2/24"\n'
        f'backend = "udp:127.0.0.1:{free_port(socket.SOCK_DGRAM)}"\nswitch = "auto"\n'
        f'[[disk]]\nid = "disk0"\npath = "{tmp / "postcopy-kv.img"}"\nsize = "64M"\n'
    )
    return path


def _wait_serving(console: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while "kv: serving on" not in (console.read_text() if console.exists() else ""):
        if time.monotonic() > deadline:
            raise BenchError(f"the kv guest did not serve within {timeout} s")
        time.sleep(0.05)


def devices_once(tmp: Path, p: PostcopyBenchParams) -> DeviceSample:
    """The kv guest with its NIC and disk shadowed, under load, migrated in post-copy."""
    from ..load import LoadOptions, LoadResult, run_load

    config = _kv_config(tmp)
    port = free_port()
    src = _ptmig(tmp, "kvsrc", config, "--insecure")
    dst = _ptmig(tmp, "kvdst", config, "--insecure", "--incoming", f"tcp:127.0.0.1:{port}")
    qs = qd = None
    loads: list[LoadResult | BaseException] = []
    load = threading.Thread(target=lambda: None)
    try:
        qs = _connect(tmp / "kvsrc.qmp", src, p.start_timeout_s)
        qd = _connect(tmp / "kvdst.qmp", dst, p.start_timeout_s)
        qs.wait_status("running", p.start_timeout_s)
        qd.wait_status("inmigrate", p.start_timeout_s)
        _wait_serving(tmp / "kvsrc.con", p.start_timeout_s)
        opts = LoadOptions(config=config, rate=DEVICE_LOAD_RATE, duration_s=DEVICE_LOAD_S)
        load = threading.Thread(target=lambda: loads.append(_guarded(run_load, opts)))
        load.start()
        time.sleep(DEVICE_WARMUP_S)  # the load runs before the migration starts
        qs.execute(
            "migrate-set-parameters",
            {
                "x-dma-tracking": "shadow",
                "max-bandwidth": 100 * MiB,
                "downtime-limit": 1,  # no round fits: the switch is post-copy
                "x-postcopy-after-rounds": 1,
            },
        )
        caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "x-verify")]
        qs.execute("migrate-set-capabilities", {"capabilities": caps})
        qs.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = _completed(qs, p.migration_timeout_s)
        report = _postcopy_done(qd, p.migration_timeout_s)
        shadow = qd.execute("x-query-shadow").get("x-postcopy") or {}
        load.join(DEVICE_LOAD_S + p.migration_timeout_s)
        return _device_sample(info, report, shadow, loads)
    finally:
        _stop(src, qs)
        _stop(dst, qd)
        load.join(p.migration_timeout_s)


def _guarded(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:  # the load's failure is the sample's, reported with it
        return e


def _device_sample(
    info: dict[str, Any],
    report: dict[str, Any],
    shadow: dict[str, Any],
    loads: list[Any],
) -> DeviceSample:
    if not loads or isinstance(loads[0], BaseException):
        raise BenchError(f"the kv load did not finish: {loads[0] if loads else 'still running'}")
    res = loads[0]
    sample = DeviceSample(
        float(info["downtime"]),
        faults=int(report.get("faults", 0)),
        requests=int(report.get("postcopy-requests", 0)),
        pages_fetched=int(shadow.get("pages-fetched", 0)),
        lost=res.lost,
        wrong=res.wrong,
        acked=res.acked,
        mismatched=int((info.get("x-verify") or {}).get("mismatched", -1)),
        went_postcopy="x-postcopy" in info,
    )
    timings = report.get("x-devices") or {}
    sample.ring_fetch_ms = float(timings.get("ring-fetch-ms", float("nan")))
    sample.enter_ms = float(timings.get("enter-ms", float("nan")))
    _switchover_window(sample, info.get("x-postcopy", {}), report)
    return sample


def _switchover_window(
    sample: Sample | DeviceSample, source: dict[str, Any], dest: dict[str, Any]
) -> None:
    """The outage and whether the downtime window holds the switchover (module docstring)."""
    stopped, acked = source.get("stopped-at-s"), source.get("acked-at-s")
    started = dest.get("guest-started-at-s")
    if stopped is None or acked is None or started is None:
        return  # no post-copy switchover in this run
    sample.outage_ms = (started - stopped) * 1000
    sample.in_window = stopped <= started <= acked + SPAN_SLACK_MS / 1000


def _postcopy_done(q: QmpMonitor, timeout: float) -> dict[str, Any]:
    """The destination's post-copy report once its last page is installed (the source's
    `completed` comes when it has sent the last one)."""
    deadline = time.monotonic() + timeout
    while (report := q.execute("x-query-postcopy")).get("status") == "postcopy-active":
        if time.monotonic() > deadline:
            raise BenchError(f"post-copy still active on the destination after {timeout} s")
        time.sleep(0.01)
    if report and report.get("status") != "completed":
        raise BenchError(f"post-copy on the destination: {report}")
    return dict(report)  # {}: no post-copy (a pre-copy round fitted the downtime after all)
