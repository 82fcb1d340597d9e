"""`ptmig migrate`'s pure logic: the command sequence, exit status and the rows it shows."""

from __future__ import annotations

import pytest

from ptmig.migrate import (
    EXIT_FAILED,
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_UNRESOLVED,
    MigrateOptions,
    asking_fate,
    exit_status,
    finished,
    progress_rows,
    setup_commands,
    summary_rows,
)


def test_setup_commands_send_only_what_was_asked_then_migrate() -> None:
    cmds = setup_commands(
        MigrateOptions(
            "q.sock",
            "tcp:10.0.0.1:4444",
            dma_tracking="shadow",
            downtime_limit_ms=20,
            max_bandwidth=0,
            verify=True,
        )
    )
    assert cmds[0] == (
        "migrate-set-parameters",
        {"x-dma-tracking": "shadow", "downtime-limit": 20, "max-bandwidth": 0},
    )
    assert cmds[1] == (
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": "x-verify", "state": True},
                {"capability": "auto-converge", "state": False},
            ]
        },
    )
    assert cmds[2] == ("migrate", {"uri": "tcp:10.0.0.1:4444"})
    plain = setup_commands(MigrateOptions("q.sock", "tcp:h:1"))
    assert [c for c, _ in plain] == ["migrate-set-capabilities", "migrate"]


@pytest.mark.parametrize(
    "kw, what",
    [
        ({"uri": "udp:1.2.3.4:5"}, "tcp:HOST:PORT or unix:PATH"),
        ({"dma_tracking": "magic"}, "magic"),
        ({"downtime_limit_ms": 0}, "at least 1 ms"),
        ({"max_bandwidth": -1}, ">= 0"),
    ],
)
def test_bad_options_say_what_is_wrong(kw: dict, what: str) -> None:
    args = {"qmp_path": "q.sock", "uri": "tcp:h:1", **kw}
    with pytest.raises(ValueError, match=what):
        MigrateOptions(**args)


def test_exit_status() -> None:
    assert exit_status({"status": "completed"}) == EXIT_OK
    assert exit_status({"status": "completed", "x-verify": {"mismatched": 0}}) == EXIT_OK
    assert exit_status({"status": "completed", "x-verify": {"mismatched": 3}}) == EXIT_MISMATCH
    assert exit_status({"status": "failed"}) == EXIT_FAILED
    assert exit_status({"status": "cancelled"}) == EXIT_FAILED
    assert exit_status({"status": "x-unresolved"}) == EXIT_UNRESOLVED


def test_progress_and_summary_rows() -> None:
    info = {
        "status": "active",
        "total-time": 120,
        "expected-downtime": 7,
        "ram": {
            "remaining": 3 << 20,
            "transferred": 10 << 20,
            "dirty-pages-rate": 256,
            "mbps": 800.0,
            "page-size": 4096,
            "dirty-sync-count": 2,
        },
        "x-rounds": [{"round": 0, "pages": 10}, {"round": 1, "pages": 3}],
    }
    rows = dict(progress_rows(info))
    assert rows["round"] == "2" and rows["remaining"] == "3.0 MiB"
    assert rows["dirty rate"] == "1.0 MiB/s" and rows["throughput"] == "100.0 MB/s"
    assert rows["expected downtime"] == "7 ms"
    done = dict(
        summary_rows(
            {
                **info,
                "status": "completed",
                "downtime": 9,
                "x-verify": {"pages": 5, "mismatched": 2, "first-mismatched": [1, 4]},
                "x-shadow": {"pages": 12},
            }
        )
    )
    assert done["downtime"] == "9 ms" and done["rounds"] == "2 (pages: 10, 3)"
    assert "2 of 5 pages DIFFER" in done["x-verify"] and done["x-shadow"] == "pages=12"
    assert progress_rows({"status": "setup"})[0] == ("status", "setup")


def test_an_unresolved_source_that_still_asks_its_fate_is_not_final() -> None:
    """x-unresolved while the source's own fate queries run is waited for (up to the
    bound); once they ended, or from a source that does not report them, it is final."""
    opts = MigrateOptions("/q", "tcp:h:1", resolve_wait_s=90)
    asking = {
        "status": "x-unresolved",
        "x-fate-query": {
            "asking": True,
            "queries": 3,
            "last": "the destination could not be asked",
        },
    }
    assert asking_fate(asking)
    assert not finished(asking, 0.0, opts) and not finished(asking, 89.9, opts)
    assert finished(asking, 90.0, opts)  # the bound: report it unresolved
    ended = {**asking, "x-fate-query": {"asking": False, "queries": 4, "last": "unknown"}}
    assert finished(ended, 0.0, opts) and exit_status(ended) == EXIT_UNRESOLVED
    assert finished({"status": "x-unresolved"}, 0.0, opts)  # QEMU: no queries of its own
    assert finished({"status": "completed", "x-fate-query": {"asking": True}}, 0.0, opts)
    assert not finished({"status": "active"}, 100.0, opts)
    rows = dict(progress_rows(asking))
    assert "asks the destination" in rows["unresolved"] and "3 queries" in rows["unresolved"]
    assert "unresolved" not in dict(progress_rows(ended))
    with pytest.raises(ValueError, match="resolve wait"):
        MigrateOptions("/q", "tcp:h:1", resolve_wait_s=-1)
