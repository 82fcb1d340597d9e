"""`ptmig migrate` end to end on real KVM: the command drives a source VMM over QMP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from vmmrig import (
    ROOT,
    TcpProxy,
    Vmm,
    dirty_config,
    free_port,
    iterations_increase,
    kv_migration,
    migration_pair,
)

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]


def _ptmig_migrate(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120")
    return subprocess.run(
        [sys.executable, "-m", "ptmig.cli", "migrate", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )


def test_ptmig_migrate_completes_verified_and_writes_json(tmp_path: Path) -> None:
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    with migration_pair(tmp_path, cfg) as (src, dst, port):
        out_json = tmp_path / "mig.json"
        res = _ptmig_migrate(
            "--qmp",
            f"unix:{src.qmp_path}",
            f"tcp:127.0.0.1:{port}",
            "--dma-tracking",
            "none",
            "--downtime-limit",
            "30",
            "--max-bandwidth",
            "1G",
            "--verify",
            "--json",
            str(out_json),
        )
        assert res.returncode == 0, res.stdout + res.stderr
        info = json.loads(out_json.read_text())
        assert info["status"] == "completed"
        assert info["x-verify"]["mismatched"] == 0
        assert "downtime" in res.stdout and "all identical" in res.stdout, res.stdout
        assert f"{info['downtime']} ms" in res.stdout
        params = src.cmd("query-migrate-parameters")
        assert (params["downtime-limit"], params["max-bandwidth"]) == (30, 1 << 30)
        assert iterations_increase(dst)
        assert src.status() == "postmigrate"
        # A second migration of a guest that has left fails, with a non-zero status.
        again = _ptmig_migrate("--qmp", f"unix:{src.qmp_path}", f"tcp:127.0.0.1:{port}")
        assert again.returncode == 3, again.stdout + again.stderr
        assert "postmigrate" in again.stderr, again.stdout + again.stderr


def test_ptmig_migrate_to_nowhere_fails_and_the_guest_stays(tmp_path: Path) -> None:
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    src = Vmm(tmp_path, "src", cfg)
    try:
        src.wait_running()
        res = _ptmig_migrate(
            "--qmp",
            f"unix:{src.qmp_path}",
            f"tcp:127.0.0.1:{free_port()}",
            "--dma-tracking",
            "none",
        )
        assert res.returncode == 1, res.stdout + res.stderr
        assert "failed" in res.stdout and "Traceback" not in res.stdout + res.stderr
        assert "the guest runs on the source" in res.stderr, res.stderr
        assert src.status() == "running"
        assert iterations_increase(src)
    finally:
        src.stop()


def test_ptmig_migrate_without_a_vmm_is_a_clear_error(tmp_path: Path) -> None:
    res = _ptmig_migrate("--qmp", f"unix:{tmp_path / 'none.sock'}", "tcp:127.0.0.1:1")
    assert res.returncode == 3
    assert "cannot connect" in res.stderr and "Traceback" not in res.stdout + res.stderr
    assert res.stdout == ""


def _query_until(vmm: Vmm, check: Any, what: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not check(info := vmm.cmd("query-migrate")):
        assert time.monotonic() < deadline, f"migration never {what}: {info}"
        time.sleep(0.02)
    return dict(info)


def test_ptmig_migrate_waits_for_the_sources_own_fate_queries(tmp_path: Path) -> None:
    """The switchover's acknowledgement is lost (a relay darkens the replies): the source goes
    x-unresolved and asks the destination for the migration's fate by itself. `ptmig
    migrate` does not report that at once: it shows the queries and waits; once the link is
    back the answer (committed) completes the migration, and that is what it reports."""
    with kv_migration(tmp_path) as (_, src, dst, port):
        relay = TcpProxy(port)
        src.cmd("migrate-set-parameters", {"x-switchover-timeout": 2})
        out_json = tmp_path / "mig.json"
        cli = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ptmig.cli",
                "migrate",
                "--qmp",
                f"unix:{src.qmp_path}",
                f"tcp:127.0.0.1:{relay.port}",
                "--dma-tracking",
                "device-log",
                "--max-bandwidth",
                "16M",  # still in its rounds when the poll below sees it active
                "--json",
                str(out_json),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120"),
        )
        try:
            _query_until(src, lambda i: i.get("status") in ("active", "device"), "active")
            relay.replies_dark.set()
            _query_until(
                src,
                lambda i: i.get("x-fate-query", {}).get("queries", 0) >= 2,
                "asked its fate twice",
            )
            assert cli.poll() is None, cli.communicate()  # a second later, still waiting
            dst.wait_running()
            relay.replies_dark.clear()  # the link is back: the next query is answered
            stdout, stderr = cli.communicate(timeout=90)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
        assert cli.returncode == 0, stdout + stderr
        info = json.loads(out_json.read_text())
        assert info["status"] == "completed" and info["x-guest-owner"] == "destination", info
        assert info["x-fate-query"]["last"] == "committed", info
        assert "fate query (committed)" in info["error-desc"], info
        assert src.status() == "postmigrate" and dst.status() == "running"
