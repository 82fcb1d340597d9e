"""`ptmig demo`'s pure parts: the generated config, the timeline, the verdict and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptmig.config import parse_config
from ptmig.demo.plan import DemoOptions, config_text
from ptmig.demo.summary import EXIT_NOT_VERIFIED, EXIT_VERIFIED, summary_lines, verdict
from ptmig.demo.timeline import migration_phases, rate_between, throughput

DEMO_DOC = Path(__file__).resolve().parent / "test_report_demo.json"


def test_generated_config_is_a_valid_kv_vm_with_net_and_disk(tmp_path: Path) -> None:
    cfg = parse_config(config_text("1G", "udp:127.0.0.1:9999", "kv.img"), "demo.toml",
                       base_dir=tmp_path)
    assert cfg.memory_bytes == 1 << 30 and cfg.vcpus == 1
    assert cfg.workload.name == "kv"
    assert str(cfg.net[0].backend) == "udp:127.0.0.1:9999"
    assert cfg.net[0].switch == "none"  # the demo runs its own switch
    assert cfg.disk[0].path == tmp_path / "kv.img"


def test_options_are_checked_with_the_offending_value() -> None:
    with pytest.raises(ValueError, match="'bogus'"):
        DemoOptions(dma_tracking="bogus").check()
    with pytest.raises(ValueError, match="duration 3.0 s"):
        DemoOptions(warmup_s=2.0, duration_s=3.0).check()
    DemoOptions.quick().check()
    assert DemoOptions.quick().memory == "256M"


INFO = {"status": "completed", "total-time": 1000, "setup-time": 100, "downtime": 200}


def test_phases_follow_qemus_fields() -> None:
    phases = {p.name: p for p in migration_phases(INFO, 4.0, 10.0)}
    assert phases["warm-up"].end_s == 4.0
    assert phases["setup"].end_s == pytest.approx(4.1)
    assert phases["pre-copy"].end_s == pytest.approx(4.8)
    assert phases["stop-and-copy"].start_s == pytest.approx(4.8)
    assert phases["stop-and-copy"].end_s == pytest.approx(5.0)
    assert (phases["after"].start_s, phases["after"].end_s) == (pytest.approx(5.0), 10.0)


def test_a_failed_migration_has_no_stop_and_copy() -> None:
    names = [p.name for p in migration_phases({"status": "failed", "total-time": 500}, 2.0, 6.0)]
    assert names == ["warm-up", "setup", "pre-copy", "after"]


def test_throughput_before_during_after() -> None:
    # 100 ops per bucket before 4 s, 0 during [4, 5), 50 after; the last bucket is partial.
    series = [[round(i * 0.1, 1), 100 if i < 40 else (0 if i < 50 else 50)] for i in range(100)]
    phases = migration_phases(INFO, 4.0, 9.95)
    tp = throughput(series, phases, 9.95)
    assert tp["before"] == pytest.approx(1000.0)
    assert tp["during"] == pytest.approx(0.0)
    assert tp["after"] == pytest.approx(500.0)
    assert rate_between(series, 20.0, 30.0) is None


def doc() -> dict:
    return json.loads(DEMO_DOC.read_text())


def test_a_clean_run_is_verified() -> None:
    v = verdict(doc())
    assert v.ok and v.exit_status == EXIT_VERIFIED, v.problems
    lines = summary_lines(doc())
    assert lines[0] == "Migration status: completed"
    assert any(line.startswith("downtime: ") for line in lines)
    assert lines[-1].startswith("VERIFIED")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["migration"]["x-verify"].update(mismatched=3), "3 of 262144 pages differ"),
    (lambda d: d["load"].update(lost=2), "2 acknowledged values lost"),
    (lambda d: d["load"].update(wrong=1), "1 wrong"),
    (lambda d: d["load"].update(unverified=5), "5 acknowledged values could not be read"),
    (lambda d: d["load"].update(acked=0), "acknowledged no value"),
    (lambda d: d["migration"].update(status="failed"), "'failed'"),
    (lambda d: d["migration"].pop("x-verify"), "verification did not run"),
    (lambda d: d["migration"].update({"x-verify": {"error": "ConnectionResetError: peer gone"}}),
     "verification did not conclude"),
])
def test_any_loss_fails_the_verdict(change, expected: str) -> None:
    d = doc()
    change(d)
    v = verdict(d)
    assert not v.ok and v.exit_status == EXIT_NOT_VERIFIED
    assert any(expected in p for p in v.problems), v.problems
    assert "NOT VERIFIED:" in summary_lines(d)
