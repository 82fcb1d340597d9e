"""`ptmig migrate` end to end on real KVM: the command drives a source VMM over QMP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vmmrig import ROOT, Vmm, dirty_config, free_port, iterations_increase, migration_pair

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
