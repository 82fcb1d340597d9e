"""The migration's pre-copy threads run below the guest's (`ptmig.migration.background`):
SCHED_IDLE where the thread may come back from it, else a higher nice value; per thread, and
back where it was for the stop-and-copy."""

from __future__ import annotations

import os
import threading

import pytest

from ptmig.migration import background

IDLE = getattr(os, "SCHED_IDLE", None)


def _now() -> background.Priority:
    tid = threading.get_native_id()
    return background.Priority(os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))


def _in_thread(fn) -> dict[str, object]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out.update(fn())
        except BaseException as e:  # reported by the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out


def _lowered(before: background.Priority) -> background.Priority:
    """What `lower_this_thread` should make of `before` on this host."""
    if IDLE is not None and background._may_leave_idle(before.nice):
        return background.Priority(IDLE, before.nice)
    return background.Priority(before.policy, min(19, before.nice + background.MIGRATION_NICE))


def test_the_block_lowers_only_the_calling_thread_and_restores_it() -> None:
    main_before = _now()
    main_tid = threading.get_native_id()

    def body() -> dict[str, object]:
        before = _now()
        with background.background():
            inside = _now()
            main_inside = background.Priority(
                os.sched_getscheduler(main_tid), os.getpriority(os.PRIO_PROCESS, main_tid)
            )
        return {"before": before, "inside": inside, "after": _now(), "main": main_inside}

    got = _in_thread(body)
    assert got["inside"] == _lowered(got["before"])  # type: ignore[arg-type]
    assert got["inside"] != got["before"]
    assert got["main"] == main_before  # another thread of the process is untouched
    if os.geteuid() == 0 or got["inside"].policy == IDLE:  # type: ignore[attr-defined]
        assert got["after"] == got["before"]  # the stop-and-copy round runs as before
    assert _now() == main_before


@pytest.mark.skipif(IDLE is None, reason="this platform has no SCHED_IDLE")
def test_where_the_thread_may_come_back_it_is_idle_during_precopy_and_normal_after() -> None:
    if not background._may_leave_idle(0):
        pytest.skip("not permitted here to leave SCHED_IDLE (needs root or RLIMIT_NICE >= 20)")

    def body() -> dict[str, object]:
        before = _now()
        with background.background():
            inside = _now()
        return {"before": before, "inside": inside, "after": _now()}

    got = _in_thread(body)
    assert got["inside"] == background.Priority(IDLE, got["before"].nice)  # type: ignore[attr-defined]
    assert got["after"] == got["before"]


def test_a_thread_that_could_not_come_back_from_idle_gets_a_nice_value_instead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(background, "_may_leave_idle", lambda nice: False)

    def body() -> dict[str, object]:
        before = _now()
        returned = background.lower_this_thread()
        return {"before": before, "returned": returned, "now": _now()}

    got = _in_thread(body)
    before = got["before"]
    assert got["returned"] == before
    assert got["now"] == background.Priority(
        before.policy,  # type: ignore[attr-defined]
        min(19, before.nice + background.MIGRATION_NICE),  # type: ignore[attr-defined]
    )


def test_a_data_channel_thread_stays_lowered_until_it_ends() -> None:
    def body() -> dict[str, object]:
        before = _now()
        returned = background.lower_this_thread()
        return {"before": before, "returned": returned, "now": _now()}

    got = _in_thread(body)
    assert got["returned"] == got["before"]
    assert got["now"] == _lowered(got["before"])  # type: ignore[arg-type]


def test_rlimit_nice_decides_whether_idle_can_be_left(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20, 20))
    assert background._may_leave_idle(0)  # 20 - 0 <= 20
    monkeypatch.setattr(resource, "getrlimit", lambda which: (10, 10))
    assert background._may_leave_idle(10)
    assert not background._may_leave_idle(0)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (0, 0))  # the usual default
    assert not background._may_leave_idle(19)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert background._may_leave_idle(0)


def test_nothing_changes_when_the_priority_cannot_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    before = _now()
    assert background.lower_this_thread() is None
    assert _now() == before
    background.restore_this_thread(None)  # nothing to restore, no error
    with background.background():
        pass
