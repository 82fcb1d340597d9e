"""`ptmig demo` end to end on real KVM: the short version of what `make demo` runs.

With `shadow` the demo must exit 0 with nothing lost and every page matching; with `none` the
very same run must report what the devices' untracked DMA writes cost (mismatched pages, lost
or wrong values) and exit non-zero. Both run the load through the migration and after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent


def run_demo(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    out_json = tmp_path / "demo.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptmig.cli",
            "demo",
            "--quick",
            "--no-live",
            "--json",
            str(out_json),
            "--report",
            str(tmp_path / "report"),
            "--run-dir",
            str(tmp_path / "run"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:  # a failing run carries its processes' logs into the report
        output += run_dir_logs(tmp_path / "run")
    assert out_json.exists(), f"no JSON (status {proc.returncode}):\n{output}"
    return proc.returncode, output, json.loads(out_json.read_text())


def run_dir_logs(run_dir: Path, lines: int = 25) -> str:
    """The last lines of every log and console the demo's processes wrote."""
    parts = []
    for path in sorted(run_dir.glob("*.log")) + sorted(run_dir.glob("*.console")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"\n--- {path.name} (last {len(tail)} lines) ---\n" + "\n".join(tail))
    return "".join(parts)


def no_children_left(run_dir: Path) -> bool:
    """No process still runs with a file of the run directory on its command line."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return str(run_dir) not in out


def test_shadow_migrates_under_load_and_verifies(tmp_path: Path) -> None:
    status, output, doc = run_demo(tmp_path)
    # where a stalled request stopped, if the load saw one: the devices' counters and rings
    stall_report = doc.get("devices")
    assert status == 0, f"{output}\ndevices: {stall_report}"
    assert set(doc) >= {"migration", "load", "guest", "devices"}
    mig, load, guest = doc["migration"], doc["load"], doc["guest"]
    assert mig["status"] == "completed" and mig["x-dma-tracking"] == "shadow"
    assert mig["x-verify"]["mismatched"] == 0 and mig["x-verify"]["pages"] == 65536
    assert mig["x-shadow"]["requests-forwarded"] > 0  # DMA work requests were intercepted
    assert load["acked"] > 0 and load["unverified"] == 0, stall_report
    assert load["lost"] == 0 and load["wrong"] == 0, stall_report
    assert guest["vcpus"][0]["max-gap-us"] > 0
    # the load ran before, during and after the migration, on the destination at the end
    tp = doc["demo"]["throughput"]
    assert tp["before"] and tp["pre-copy"] and tp["after"], tp
    assert doc["demo"]["outage"]["client-switchover"]["contains-switchover"]
    for field in (
        "Migration status: completed",
        "downtime:",
        "lost: 0",
        "mismatched pages: 0 of 65536",
        "VERIFIED",
    ):
        assert field in output, field
    assert (tmp_path / "report" / "index.html").exists()
    assert (tmp_path / "report" / "timeline.png").exists()
    assert no_children_left(tmp_path / "run")


def test_a_migration_longer_than_the_load_still_has_the_load_around_the_switchover(
    tmp_path: Path,
) -> None:
    """10 MiB/s for a 256 MiB guest: pre-copy alone outlasts the warm-up and after-switchover
    seconds together (the old fixed window), and the load still runs for 3 s past the resume."""
    status, output, doc = run_demo(
        tmp_path, "--max-bandwidth", "10M", "--rate", "4000", "--after", "3"
    )
    assert status == 0, output
    demo = doc["demo"]
    phases = {p["name"]: p for p in demo["phases"]}
    pre = phases["pre-copy"]
    assert pre["end_s"] - pre["start_s"] > demo["options"]["warmup-s"] + 3.0, phases
    after = phases["after"]
    assert after["start_s"] == phases["stop-and-copy"]["end_s"]
    assert after["end_s"] - after["start_s"] >= 2.5, phases  # --after 3, less clock slack
    gap = demo["outage"]["client-switchover"]
    assert gap["contains-switchover"], gap
    assert gap["start_s"] < phases["stop-and-copy"]["end_s"] and gap["end_s"] > pre["end_s"]
    assert demo["throughput"]["after"] > 0 and demo["latency"]["after"]["n"] > 0
    assert "VERIFIED" in output


def test_without_dma_tracking_the_loss_is_reported(tmp_path: Path) -> None:
    status, output, doc = run_demo(tmp_path, "--dma-tracking", "none")
    mig, load = doc["migration"], doc["load"]
    assert mig["status"] == "completed" and mig["x-dma-tracking"] == "none"
    detected = mig["x-verify"]["mismatched"] + load["lost"] + load["wrong"]
    assert detected > 0, output
    assert status == 1, output
    assert "NOT VERIFIED" in output
    assert no_children_left(tmp_path / "run")


def test_terminating_the_demo_stops_every_child(tmp_path: Path) -> None:
    import signal
    import time

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ptmig.cli",
            "demo",
            "--quick",
            "--no-live",
            "--run-dir",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 60
    while not (run_dir / "load.log").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the load client starts once both VMMs are up
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert no_children_left(run_dir)
