"""`ptmig demo`'s pure parts: the generated config, the timeline, the verdict and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ptmig.config import parse_config
from ptmig.demo.plan import DemoOptions, config_text
from ptmig.demo.summary import (
    EXIT_NOT_VERIFIED,
    EXIT_VERIFIED,
    load_lines,
    summary_lines,
    verdict,
)
from ptmig.demo.timeline import (
    Gap,
    Phase,
    bridge_stale_replies,
    gap_contains,
    last_reply_sent_s,
    latency_by_phase,
    migration_phases,
    rate_between,
    switchover_gap,
    throughput,
)

DEMO_DOC = Path(__file__).resolve().parent / "test_report_demo.json"


def test_generated_config_is_a_valid_kv_vm_with_net_and_disk(tmp_path: Path) -> None:
    cfg = parse_config(
        config_text("1G", "udp:127.0.0.1:9999", "kv.img"), "demo.toml", base_dir=tmp_path
    )
    assert cfg.memory_bytes == 1 << 30 and cfg.vcpus == 1
    assert cfg.workload.name == "kv"
    assert str(cfg.net[0].backend) == "udp:127.0.0.1:9999"
    assert cfg.net[0].switch == "none"  # the demo runs its own switch
    assert cfg.disk[0].path == tmp_path / "kv.img"


def test_the_vhost_user_demo_disk_is_a_spawned_qemu_storage_daemon(tmp_path: Path) -> None:
    text = config_text("1G", "udp:127.0.0.1:9999", "kv.img", disk_backend="vhost-user")
    disk = parse_config(text, "demo.toml", base_dir=tmp_path).disk[0]
    assert disk.backend == "vhost-user" and disk.spawn == "qemu-storage-daemon"
    assert disk.path == tmp_path / "kv.img"


def test_a_vhost_user_demo_without_qemu_storage_daemon_says_why_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ptmig.demo import run
    from ptmig.devices.vhost_user import daemon

    monkeypatch.setattr(daemon, "find_program", lambda name=daemon.PROGRAM: None)
    with pytest.raises(run.DemoError, match="qemu-storage-daemon, which is not installed"):
        run._check_disk_backend(DemoOptions.quick(disk="vhost-user", run_dir=tmp_path))
    run._check_disk_backend(DemoOptions.quick(run_dir=tmp_path))  # the builtin disk needs none


def test_options_are_checked_with_the_offending_value() -> None:
    with pytest.raises(ValueError, match="'nvme'"):
        DemoOptions(disk="nvme").check()
    with pytest.raises(ValueError, match="'bogus'"):
        DemoOptions(dma_tracking="bogus").check()
    with pytest.raises(ValueError, match="got 0.5 s"):
        DemoOptions(after_s=0.5).check()
    with pytest.raises(ValueError, match="got -3 ops/s"):
        DemoOptions(rate=-3).check()
    DemoOptions.quick().check()
    assert DemoOptions.quick().memory == "256M"


INFO = {"status": "completed", "total-time": 1000, "setup-time": 100, "downtime": 200}


def test_the_pause_is_placed_where_the_source_says_it_began() -> None:
    # total-time also counts the verification after the switchover: the pause is not its end
    info = dict(
        INFO,
        **{
            "total-time": 3000,
            "x-rounds": [
                {"round": 0, "pages": 10},
                {"round": 1, "pages": 3, "stop-and-copy": True, "stop-at-ms": 700.0},
            ],
        },
    )
    phases = {p.name: p for p in migration_phases(info, 4.0, 12.0)}
    assert phases["pre-copy"].end_s == pytest.approx(4.7)
    assert (phases["stop-and-copy"].start_s, phases["stop-and-copy"].end_s) == (
        pytest.approx(4.7),
        pytest.approx(4.9),
    )
    assert phases["after"].start_s == pytest.approx(4.9)


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


def test_throughput_before_precopy_after() -> None:
    # 100 ops per bucket before 4 s, 20 in setup [4, 4.1), 0 in pre-copy [4.1, 4.8) and
    # stop-and-copy, 50 after 5 s; the last bucket is partial.
    def ops(i: int) -> int:
        return 100 if i < 40 else 20 if i < 41 else 0 if i < 50 else 50

    series = [[round(i * 0.1, 1), ops(i)] for i in range(100)]
    phases = migration_phases(INFO, 4.0, 9.95)
    tp = throughput(series, phases, 9.95)
    assert tp["before"] == pytest.approx(1000.0)
    assert tp["pre-copy"] == pytest.approx(0.0)  # pre-copy alone: setup's bucket left out
    assert tp["after"] == pytest.approx(500.0)
    assert rate_between(series, 20.0, 30.0) is None


def test_latency_percentiles_per_phase() -> None:
    phases = migration_phases(INFO, 4.0, 9.0)
    # (completed at, latency): phases are warm-up < 4.0, setup < 4.1, pre-copy < 4.8,
    # stop-and-copy < 5.0, after
    rows = np.array(
        [
            [1.0, 1.0],
            [2.0, 3.0],
            [4.5, 10.0],
            [4.6, 30.0],
            [5.05, 300.0],
            [4.95, 99.0],
            [6.0, 2.0],
            [6.5, 4.0],
        ]
    )
    lat = latency_by_phase(rows, phases)
    assert lat["before"]["n"] == 2 and lat["before"]["max_ms"] == 3.0
    # sent at 4.49 and 4.57; the one sent at 4.75 waited through the pause (answered after
    # it began at 4.8: the switchover's, counted apart); the one sent at 4.851, inside the
    # pause, counts nowhere
    assert lat["pre-copy"] == {
        "n": 2,
        "p50_ms": 20.0,
        "p99_ms": pytest.approx(29.8),
        "max_ms": 30.0,
        "waited_for_switchover": 1,
    }
    assert lat["after"] == {"n": 2, "p50_ms": 3.0, "p99_ms": pytest.approx(3.98), "max_ms": 4.0}
    assert "pre-copy" not in latency_by_phase(rows[:2], phases)


STOP = Phase("stop-and-copy", 5.0, 5.1)


@pytest.mark.parametrize(
    "gaps, expected",
    [
        ([[1.0, 50.0], [4.99, 130.0], [6.0, 400.0]], (4.99, 5.12)),  # the one at the pause
        ([[4.95, 60.0], [5.02, 100.0]], (5.02, 5.12)),  # the larger overlap wins
        ([[1.0, 500.0], [5.2, 30.0]], None),  # none overlaps: served right through it
    ],
)
def test_the_gap_at_the_switchover_is_found(gaps, expected) -> None:
    g = switchover_gap(gaps, STOP)
    assert (None if g is None else (g.start_s, pytest.approx(g.end_s))) == expected


@pytest.mark.parametrize(
    "start, end, ok",
    [
        (4.99, 5.12, True),
        (5.004, 5.12, True),  # replies queued before the pause went out during the first 5 ms
        (5.02, 5.12, False),  # began well after the pause began: the client was served inside it
        (4.99, 5.085, True),  # the guest ran during the last 20 ms, while the ack travelled
        (4.99, 5.05, False),  # ended before the guest can have resumed
    ],
)
def test_the_gap_must_contain_the_pause(start: float, end: float, ok: bool) -> None:
    assert gap_contains(Gap(start, end), STOP, early_s=0.005, late_s=0.02, slack_s=0.001) is ok


def test_the_reply_that_began_a_gap_is_found_with_its_send_time() -> None:
    """Rows are (completed at s, latency ms): the gap beginning at 5.02 s began with the
    replies completed then; the latest of their requests was sent at 5.02 - 0.030 s."""
    rows = np.array([[4.90, 2.0], [5.02, 40.0], [5.02, 30.0], [5.2, 1.0]])
    assert last_reply_sent_s(rows, Gap(5.02, 5.2)) == pytest.approx(4.99)
    assert last_reply_sent_s(rows, Gap(5.05, 5.2)) is None  # no reply completed there
    assert last_reply_sent_s(np.empty((0, 2)), Gap(5.02, 5.2)) is None


@pytest.mark.parametrize(
    "gap_start, sent, ok",
    [
        # a reply that arrived 40 ms into the pause, to a request sent before it: the guest
        # stopped answering before the pause, the client was only slow to read
        (5.04, 4.995, True),
        (5.04, 5.0015, True),  # sent during the vCPUs' pause (quiesce 2 ms): still before it
        # began early enough by the p99 allowance, but the guest answered a request sent
        # well after it was paused: the gap does not contain the pause
        (5.004, 5.003, False),
    ],
)
def test_a_gap_begins_in_time_when_its_last_request_was_sent_before_the_pause(
    gap_start: float, sent: float, ok: bool
) -> None:
    gap = Gap(gap_start, 5.12)
    assert gap_contains(gap, STOP, 0.005, 0.02, 0.0, last_sent_s=sent, quiesce_s=0.002) is ok


def test_the_switchover_outage_is_judged_by_the_last_requests_send_time() -> None:
    """The failure seen on a loaded host: the client read the last replies sent before the
    pause 50 ms late, far past the pre-copy p99; the record shows their requests were sent
    before the pause, so the outage contains it (and the JSON says when they were sent)."""
    from ptmig.demo.run import _switchover_outage

    stop = Phase("stop-and-copy", 10.0, 10.25)
    info = {"x-rounds": [{"stop-and-copy": True, "downtime-ms": {"pause": 1, "sync": 1}}]}
    latency = {"pre-copy": {"n": 100, "p50_ms": 2.0, "p99_ms": 20.0, "max_ms": 30.0}}
    gaps = [[10.05, 207.0]]
    late = np.array([[9.9, 2.0], [10.05, 55.0], [10.257, 2.0]])  # sent at 9.995 s
    out = _switchover_outage([stop], gaps, info, latency, 0.0, late)
    assert out is not None and out["contains-switchover"], out
    assert out["last-reply-sent_s"] == pytest.approx(9.995)
    without = _switchover_outage([stop], gaps, info, latency, 0.0)
    assert without is not None and not without["contains-switchover"], without
    served = np.array([[9.9, 2.0], [10.05, 40.0], [10.257, 2.0]])  # sent at 10.010 s
    out = _switchover_outage([stop], gaps, info, latency, 0.0, served)
    assert out is not None and not out["contains-switchover"], out
    problems = verdict(_with_outage(out)).problems
    assert any("answered a request sent at 10.01 s" in p for p in problems), problems


def test_a_stale_reply_inside_the_pause_does_not_end_the_outage() -> None:
    """The failure seen at load 7 (a demo --quick beside two others): the last pre-pause
    reply reached the client 23 ms into a 34 ms pause, so the client's silence was two gaps
    and the one at the switchover ended before the guest could have resumed. The record shows
    the reply answered a request sent before the pause: the outage runs on to the first reply
    after it (and says how many stale replies it spans)."""
    from ptmig.demo.run import _switchover_outage

    stop = Phase("stop-and-copy", 10.0, 10.04)
    info = {
        "x-rounds": [
            {
                "stop-and-copy": True,
                "downtime-ms": {"pause": 2, "sync": 3, "ack": 8},
                "destination-ms": {"vcpus": 1, "devices": 1},
            }
        ]
    }  # the guest can have resumed from 10.04 - (8 - 2) ms = 10.034 s on
    latency = {"pre-copy": {"n": 100, "p50_ms": 2.0, "p99_ms": 20.0, "max_ms": 30.0}}
    gaps = [[9.99, 33.0], [10.023, 15.0]]  # split by the stale reply at 10.023
    rows = np.array([[9.99, 2.0], [10.023, 30.0], [10.038, 2.0], [10.05, 1.0]])
    out = _switchover_outage([stop], gaps, info, latency, 0.0, rows)
    assert out is not None and out["contains-switchover"], out
    assert (out["start_s"], out["end_s"], out["stale-replies-inside"]) == (9.99, 10.038, 1)
    assert "it spans 1 stale reply (to requests sent before the pause" in " ".join(
        summary_lines(_with_outage(out))
    )
    # the reply inside the pause answers a request sent after the pause began (+ quiesce):
    # the guest answered while paused; not bridged, and the verdict says so
    fresh = np.array([[9.99, 2.0], [10.023, 10.0], [10.038, 2.0], [10.05, 1.0]])
    out = _switchover_outage([stop], gaps, info, latency, 0.0, fresh)
    assert out is not None and not out["contains-switchover"], out
    assert out["end_s"] == 10.023 and "stale-replies-inside" not in out
    assert not verdict(_with_outage(out)).ok


def test_the_reply_that_ended_a_rounded_gap_is_checked_too() -> None:
    """The client records a gap's start to 0.1 ms, so its end can fall just after the reply
    that ended it: that reply, sent after the pause began and answered inside it, must still
    stop the bridging (found in review: it escaped the check)."""
    rows = np.array(
        [
            [5.07826449, 8.26449],  # the last reply before the gap
            [5.10000004, 1.00004],  # ended the gap: sent at 5.099, inside the pause
            [5.1050, 25.0],  # stale: sent at 5.080
            [5.1400, 1.0],
        ]
    )
    gap = Gap(5.0783, 5.100036)  # as recorded: the end rounded past the reply at 5.10000004
    assert bridge_stale_replies(rows, gap, 5.1189, 5.0989) == (gap, 0)


def test_bridging_needs_a_reply_after_the_pause() -> None:
    gap = Gap(9.99, 10.023)
    only_stale = np.array([[9.99, 2.0], [10.023, 30.0]])  # the load ended inside the pause
    assert bridge_stale_replies(only_stale, gap, 10.034, 10.005) == (gap, 0)
    assert bridge_stale_replies(np.empty((0, 2)), gap, 10.034, 10.005) == (gap, 0)
    ended_late = Gap(9.99, 10.036)  # already past the earliest resume: nothing to bridge
    assert bridge_stale_replies(only_stale, ended_late, 10.034, 10.005) == (ended_late, 0)


def _with_outage(outage: dict) -> dict:
    d = doc()
    d["demo"]["outage"]["client-switchover"] = outage
    return d


def doc() -> dict:
    return json.loads(DEMO_DOC.read_text())


def test_a_clean_run_is_verified() -> None:
    v = verdict(doc())
    assert v.ok and v.exit_status == EXIT_VERIFIED, v.problems
    lines = summary_lines(doc())
    assert lines[0] == "Migration status: completed"
    assert any(line.startswith("downtime: ") for line in lines)
    assert lines[-1].startswith("VERIFIED")


def test_an_outage_that_misses_the_pause_says_by_which_bounds() -> None:
    """The verdict's text carries the allowances the gap was judged with, so a failure on a
    loaded host shows which end missed and by how much."""
    d = doc()
    d["demo"]["outage"]["client-switchover"].update(
        {"contains-switchover": False, "early-ms": 12.5, "late-ms": 3.0, "slack-ms": 2.1}
    )
    problems = verdict(d).problems
    assert any(
        "may begin 12.5 ms after the pause began and end 3.0 ms before the downtime ended, "
        "± 2.1 ms" in p
        for p in problems
    ), problems


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["migration"]["x-verify"].update(mismatched=3), "3 of 262144 pages differ"),
        (lambda d: d["load"].update(lost=2), "2 acknowledged values lost"),
        (lambda d: d["load"].update(wrong=1), "1 wrong"),
        (lambda d: d["load"].update(unverified=5), "5 acknowledged values could not be read"),
        (lambda d: d["load"].update(acked=0), "acknowledged no value"),
        (lambda d: d["migration"].update(status="failed"), "'failed'"),
        (lambda d: d["migration"].pop("x-verify"), "verification did not run"),
        (
            lambda d: d["migration"].update(
                {"x-verify": {"error": "ConnectionResetError: peer gone"}}
            ),
            "verification did not conclude",
        ),
        # the load did not span the switchover
        (lambda d: d["demo"]["throughput"].update(after=None), "not served after the switchover"),
        (lambda d: d["demo"]["throughput"].update({"pre-copy": 0.0}), "not served during pre-copy"),
        (lambda d: d["demo"]["throughput"].update(before=None), "not served before the migration"),
        (
            lambda d: d["demo"]["phases"][-1].update(end_s=d["demo"]["phases"][-1]["start_s"]),
            "no 'after' phase",
        ),
        (
            lambda d: d["demo"]["outage"].update({"client-switchover": None}),
            "its outage there was not measured",
        ),
        (
            lambda d: d["demo"]["outage"]["client-switchover"].update(
                {"contains-switchover": False}
            ),
            "does not contain the guest's pause",
        ),
    ],
)
def test_any_loss_fails_the_verdict(change, expected: str) -> None:
    d = doc()
    change(d)
    v = verdict(d)
    assert not v.ok and v.exit_status == EXIT_NOT_VERIFIED
    assert any(expected in p for p in v.problems), v.problems
    assert "NOT VERIFIED:" in summary_lines(d)


def test_the_migrations_origin_is_pinned_down_by_the_polls() -> None:
    from ptmig.demo.run import MigrationRun

    run = MigrationRun(10.0, 130.0, {}, [])
    run.bound_start(10.050, 10.060, 47)  # origin in [10.002, 10.013]
    run.bound_start(10.200, 10.203, 195)  # origin in [10.004, 10.008]
    run.bound_start(10.300, 10.400, "n/a")  # no total-time: no information
    run.bound_start(10.500, 10.501, 0)  # 0: the source's clock had not started: none either
    assert (run.start_lo, run.start_hi) == (pytest.approx(10.004), pytest.approx(10.008))
    assert run.started == pytest.approx(10.006) and run.slack_s == pytest.approx(0.002)
    run.bound_start(11.0, 11.001, 10)  # contradicts the others (a stale reply): ignored
    assert run.start_lo == pytest.approx(10.004)
    run.info = {
        "status": "completed",
        "downtime": 30,
        "x-rounds": [{"round": 3, "pages": 9, "stop-and-copy": True, "stop-at-ms": 900}],
    }
    assert run.resumed_at() == pytest.approx(10.006 + 0.93)
    run.info = {"status": "failed"}
    assert run.resumed_at() is None


def test_the_switchover_outage_may_begin_a_pre_copy_p99_round_trip_after_the_pause() -> None:
    """Replies the guest sent before its pause reach a descheduled client late: a gap that
    begins past the median round trip but inside quiesce + the p99 one still contains the
    switchover; one that begins later than that does not (the guest cannot have served)."""
    from ptmig.demo.run import _switchover_outage
    from ptmig.demo.timeline import Phase

    stop = Phase("stop-and-copy", 10.0, 10.1)
    info = {"x-rounds": [{"stop-and-copy": True, "downtime-ms": {"pause": 1, "sync": 1}}]}
    latency = {"pre-copy": {"n": 100, "p50_ms": 2.0, "p99_ms": 20.0, "max_ms": 30.0}}

    def contains(gap_start: float) -> bool:
        out = _switchover_outage([stop], [[gap_start, 200.0]], info, latency, 0.0)
        assert out is not None
        return bool(out["contains-switchover"])

    assert contains(10.011)  # 11 ms late: past p50 + quiesce, inside p99 + quiesce
    assert contains(10.0215)
    assert not contains(10.023)


def test_a_downtime_over_the_limit_is_said_with_its_cause() -> None:
    """A forced switchover over the demo's downtime limit is printed first, with why and what
    to try; a run within its limit prints no such line."""
    d = doc()
    limit = d["demo"]["options"]["downtime-limit-ms"]
    d["migration"]["downtime"] = limit
    assert not any("OVER" in line for line in load_lines(d))
    d["migration"]["downtime"] = limit + 127
    d["migration"]["x-forced-switchover"] = True
    d["demo"]["options"]["auto-converge"] = False
    lines = load_lines(d)
    assert lines[0].startswith(f"downtime {limit + 127} ms is OVER the {limit} ms limit")
    assert "forced the switchover" in lines[0] and "--auto-converge" in lines[0]
    assert any(line.startswith("x-forced-switchover: yes") for line in summary_lines(d))
    d["demo"]["options"]["auto-converge"] = True  # it was on: not suggested again
    assert "--auto-converge" not in load_lines(d)[0]


def test_the_guests_own_log_checkpoints_are_told_apart_from_the_migration() -> None:
    """The kv guest's longest pause may be its own log checkpoint: the summary prints the
    checkpoints right under the guest's outage line; none, no line."""
    d = doc()
    d["guest"]["kv"] = {"checkpoints": 0, "checkpoint-max-ms": 0.0}
    assert not any("log checkpoint" in line for line in load_lines(d))
    d["guest"]["kv"] = {"checkpoints": 2, "checkpoint-max-ms": 41.5}
    lines = load_lines(d)
    at = next(i for i, line in enumerate(lines) if line.startswith("outage seen by the guest"))
    assert lines[at + 1].startswith("  of which the guest's own: 2 log checkpoint(s)")
    assert "the longest 42 ms" in lines[at + 1]
