"""The migration's pre-copy threads run at a lower CPU priority than the guest's
(`ptmig.migration.background`): per thread, and back where it was for the stop-and-copy."""

from __future__ import annotations

import os
import threading

import pytest

from ptmig.migration import background


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


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


def test_the_block_lowers_only_the_calling_thread_and_restores_it() -> None:
    main_before = _nice()

    def body() -> dict[str, object]:
        before = _nice()
        with background.background():
            inside = _nice()
            main_inside = os.getpriority(os.PRIO_PROCESS, main_tid)
        return {"before": before, "inside": inside, "after": _nice(), "main": main_inside}

    main_tid = threading.get_native_id()
    got = _in_thread(body)
    assert got["inside"] == min(19, int(got["before"]) + background.MIGRATION_NICE)  # type: ignore[call-overload]
    assert got["main"] == main_before  # another thread of the process is untouched
    if os.geteuid() == 0:  # an unprivileged thread may not lower its nice value again
        assert got["after"] == got["before"]
    assert _nice() == main_before


def test_a_data_channel_thread_stays_lowered_until_it_ends() -> None:
    def body() -> dict[str, object]:
        before = _nice()
        returned = background.lower_this_thread()
        return {"before": before, "returned": returned, "now": _nice()}

    got = _in_thread(body)
    assert got["returned"] == got["before"]
    assert got["now"] == min(19, int(got["before"]) + background.MIGRATION_NICE)  # type: ignore[call-overload]


def test_nothing_changes_when_the_priority_cannot_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    assert background.lower_this_thread() is None
    background.restore_this_thread(None)  # nothing to restore, no error
    with background.background():
        pass
