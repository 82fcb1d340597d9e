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
    if IDLE is not None and background.idle_is_reversible():
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
    if not background.idle_is_reversible():
        pytest.skip("not permitted here to leave SCHED_IDLE (needs CAP_SYS_NICE or RLIMIT_NICE)")

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
    monkeypatch.setattr(background, "idle_is_reversible", lambda: False)

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


@pytest.mark.skipif(IDLE is None, reason="this platform has no SCHED_IDLE")
def test_a_process_that_may_not_leave_idle_is_found_out_once_and_never_goes_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As in a container without CAP_SYS_NICE: entering SCHED_IDLE works, leaving it is
    refused. The probe sees it, and lowering uses the nice value instead."""
    real = os.sched_setscheduler

    def no_way_back(tid: int, policy: int, param: os.sched_param) -> None:
        if os.sched_getscheduler(tid) == IDLE and policy != IDLE:
            raise PermissionError(1, "Operation not permitted")
        real(tid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", no_way_back)
    background.idle_is_reversible.cache_clear()
    try:
        assert background.idle_is_reversible() is False

        def body() -> dict[str, object]:
            before = _now()
            with background.background():
                inside = _now()
            return {"before": before, "inside": inside}

        got = _in_thread(body)
        before = got["before"]
        assert got["inside"] == background.Priority(
            before.policy,  # type: ignore[attr-defined]
            min(19, before.nice + background.MIGRATION_NICE),  # type: ignore[attr-defined]
        )
    finally:
        background.idle_is_reversible.cache_clear()


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
