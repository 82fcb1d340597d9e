"""The demo's load client, run as its own process so the VMMs and the live view never slow it.

`python -m ptmig.demo.loadproc CONFIG DURATION OUT.json [--target HOST:PORT]` waits until the
guest answers ARP, then runs the kv load engine (`ptmig.net.kvload`) for DURATION seconds,
prints a progress line `progress <CLOCK_MONOTONIC seconds> <ops completed>` every 250 ms, and
writes `{"t0": <CLOCK_MONOTONIC at the start of the load>, "result": LoadResult.to_json()}`.
CLOCK_MONOTONIC is shared by all processes of a host, so the demo puts the load's time series
and the migration's phases on one time axis.
"""

from __future__ import annotations

import argparse
import json
import selectors
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..load import LoadOptions, LoadResult, open_datapath
from ..net.hoststack import Datapath
from ..net.kvload import EngineConfig, LoadEngine, NotReadyError

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


def run(config: str, duration_s: float, out: Path, target: str | None,
        ready_timeout_s: float = 30.0) -> int:
    opts = LoadOptions(config=config, target=target, duration_s=duration_s)
    dp = open_datapath(opts)
    try:
        wait_ready(dp, ready_timeout_s)
        engine = LoadEngine(dp, EngineConfig(duration_s=duration_s,
                                             prefix=f"demo{int(time.time()) % 100000}".encode()))
        stop = threading.Event()
        reporter = threading.Thread(target=_report_progress, args=(engine, stop), daemon=True)
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
    out.write_text(json.dumps({"t0": t0, "result": result.to_json()}) + "\n")
    print(f"done {time.monotonic():.4f}", flush=True)
    return result.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ptmig.demo.loadproc")
    p.add_argument("config")
    p.add_argument("duration", type=float)
    p.add_argument("out", type=Path)
    p.add_argument("--target", help="HOST:PORT of the kv service (TAP guests)")
    args = p.parse_args(argv)
    try:
        return run(args.config, args.duration, args.out, args.target)
    except (OSError, ValueError) as e:
        print(f"error {e}", flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
