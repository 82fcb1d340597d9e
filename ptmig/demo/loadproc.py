"""The demo's load client, run as its own process so the VMMs and the live view never slow it.

`python -m ptmig.demo.loadproc CONFIG MAX_DURATION OUT.json [--target HOST:PORT] [--rate R]`
waits until the guest answers ARP, then runs the kv load engine (`ptmig.net.kvload`) until the
demo says when to stop: a line `stop-at <CLOCK_MONOTONIC seconds>` on stdin (end of stdin: stop
now; MAX_DURATION seconds at most, a safety net). It prints `start <CLOCK_MONOTONIC>` and a
progress line `progress <CLOCK_MONOTONIC seconds> <ops completed>` every 250 ms, and writes
`{"t0": <CLOCK_MONOTONIC at the start of the load>, "result": LoadResult.to_json(), "gaps":
[[start_s, length_ms], ...]}` (every gap of at least 2 ms between two successful replies, up to
the 4096 longest) and, next to it, OUT.lat.npy: one row (completed at, s since t0; latency, ms)
per load-phase request. CLOCK_MONOTONIC is shared by all processes of a host, so the demo puts
the load's time series and the migration's phases on one time axis.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..load import LoadOptions, LoadResult, open_datapath
from ..net.hoststack import Datapath
from ..net.kvload import EngineConfig, LoadEngine, NotReadyError
from .plan import latency_path

PROGRESS_S = 0.25


def wait_ready(dp: Datapath, timeout_s: float) -> None:
    """Resolve the guest (ARP) before the clock of the load starts."""
    sel = selectors.DefaultSelector()
    sel.register(dp.fileno(), selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    try:
        while not dp.ready():
            now = time.monotonic()
            if now >= deadline:
                raise NotReadyError(f"the guest did not answer ARP within {timeout_s} s")
            dp.tick(now, 0.0)
            sel.select(0.05)
            dp.recv_batch()
    finally:
        sel.close()


def _report_progress(engine: LoadEngine, stop: threading.Event) -> None:
    while not stop.wait(PROGRESS_S):
        print(f"progress {time.monotonic():.4f} {engine.stats.ops}", flush=True)


def parse_control(line: str) -> float | None:
    """The stop time of a `stop-at <CLOCK_MONOTONIC seconds>` line; None for anything else."""
    word, _, rest = line.strip().partition(" ")
    if word != "stop-at":
        return None
    try:
        when = float(rest)
    except ValueError:
        return None
    return when if when == when else None  # not NaN


def _follow_control(engine: LoadEngine) -> None:
    """Apply the demo's `stop-at` lines; the end of stdin (the demo went away) stops now."""
    for line in sys.stdin:
        when = parse_control(line)
        if when is not None:
            engine.stop_at(when)
    engine.stop_at(time.monotonic())


def run(
    config: str,
    duration_s: float,
    out: Path,
    target: str | None,
    rate: float | None = None,
    ready_timeout_s: float = 30.0,
) -> int:
    opts = LoadOptions(config=config, target=target, duration_s=duration_s, rate=rate)
    dp = open_datapath(opts)
    try:
        wait_ready(dp, ready_timeout_s)
        engine = LoadEngine(
            dp,
            EngineConfig(
                duration_s=duration_s, rate=rate, prefix=f"demo{int(time.time()) % 100000}".encode()
            ),
        )
        stop = threading.Event()
        reporter = threading.Thread(target=_report_progress, args=(engine, stop), daemon=True)
        threading.Thread(target=_follow_control, args=(engine,), daemon=True).start()
        t0 = time.monotonic()
        print(f"start {t0:.4f}", flush=True)
        reporter.start()
        try:
            stats = engine.run()
        finally:
            stop.set()
    finally:
        dp.close()
    result = LoadResult.from_stats(stats)
    lat = np.column_stack(
        [
            np.frombuffer(stats.completed_at, dtype=np.float64),
            np.frombuffer(stats.latencies_ms, dtype=np.float64),
        ]
    )
    np.save(latency_path(out), lat)
    gaps = sorted([round(start, 4), round(length * 1000.0, 3)] for length, start in stats.gaps)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"t0": t0, "result": result.to_json(), "gaps": gaps}) + "\n")
    os.replace(tmp, out)  # the demo never reads half a file
    print(f"done {time.monotonic():.4f}", flush=True)
    return result.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ptmig.demo.loadproc")
    p.add_argument("config")
    p.add_argument("duration", type=float)
    p.add_argument("out", type=Path)
    p.add_argument("--target", help="HOST:PORT of the kv service (TAP guests)")
    p.add_argument(
        "--rate", type=float, help="offered load in ops/s (default: as fast as the window allows)"
    )
    args = p.parse_args(argv)
    try:
        return run(args.config, args.duration, args.out, args.target, args.rate)
    except (OSError, ValueError) as e:
        print(f"error {e}", flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
