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


AUTOGROUP_SCRIPT = """
import json, sys
from ptmig.migration import background
def nice():
    return background._autogroup_nice(background.AUTOGROUP)
before = nice()
returned = background.lower_session()
lowered = nice()
background.restore_session(returned)
print(json.dumps({"before": before, "returned": returned, "lowered": lowered, "after": nice()}))
"""


def _session_run(new_session: bool) -> dict[str, object]:
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", AUTOGROUP_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=new_session,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


autogroups = pytest.mark.skipif(
    not os.path.exists(background.AUTOGROUP), reason="the kernel has no scheduling autogroups"
)


@autogroups
def test_a_session_leader_lowers_its_session_and_puts_it_back() -> None:
    got = _session_run(new_session=True)
    if got["returned"] is None:  # not allowed to put it back: it must not have been lowered
        assert os.geteuid() != 0
        assert got["lowered"] == got["before"]
        return
    assert got["returned"] == got["before"]
    assert got["lowered"] == min(19, int(got["before"]) + background.MIGRATION_NICE)  # type: ignore[call-overload]
    assert got["after"] == got["before"]


@autogroups
def test_a_process_in_someone_elses_session_leaves_it_alone() -> None:
    # (a VMM started from a shell: its autogroup is the shell's whole session)
    got = _session_run(new_session=False)
    assert got["returned"] is None
    assert got["lowered"] == got["before"]


def test_without_autogroups_nothing_changes(tmp_path) -> None:
    missing = str(tmp_path / "autogroup")
    assert background.lower_session(path=missing) is None
    background.restore_session(None, path=missing)


def test_only_the_switchover_ends_the_destinations_lowered_session() -> None:
    from ptmig.migration import destination
    from ptmig.migration.events import RoundEnd, RoundStart, VcpuStates

    assert destination._precopy_on_main(RoundStart(3, 0))  # pages on the data channels
    assert destination._precopy_on_main(RoundEnd(3))
    assert not destination._precopy_on_main(RoundStart(4, 120))  # the stop-and-copy round
    assert not destination._precopy_on_main(VcpuStates(b""))
