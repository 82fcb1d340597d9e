"""The migration's pre-copy threads run below the guest's (`ptmig.migration.background`):
SCHED_IDLE where the thread may come back from it, else a higher nice value; per thread, and
back where it was for the stop-and-copy."""

from __future__ import annotations

import os
import threading

import pytest

from ptmig.migration import background

IDLE = os.SCHED_IDLE  # (Linux: ptmig runs on KVM)


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


def _lowered(before: background.Priority, idle_ok: bool | None = None) -> background.Priority:
    """What `lower_this_thread` should make of `before` on this host (`idle_ok`: whether the
    process may leave SCHED_IDLE; by default, this one)."""
    if idle_ok is None:
        idle_ok = background.idle_is_reversible()
    if IDLE is not None and idle_ok:
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
    before = got["before"]
    assert isinstance(before, background.Priority), got
    assert got["inside"] == background.Priority(IDLE, before.nice)
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
    try:
        assert background.lower_this_thread() is None
        assert _now() == before
        background.restore_this_thread(None)  # nothing to restore, no error
        with background.background():
            pass
    finally:
        background.idle_is_reversible.cache_clear()  # what it learnt from the refusing kernel


@pytest.mark.parametrize(
    "before, now, expected",
    [
        (("R", 10), ("R", 10), True),  # runnable at both looks, not a tick of CPU
        (("R", 10), ("R", 11), False),  # it ran
        (("S", 10), ("R", 10), False),  # it slept (waiting for the socket, the pacing)
        (("R", 10), ("S", 10), False),
        (None, ("R", 10), False),  # the first look
        (("R", 10), None, False),  # the thread ended
    ],
)
def test_a_thread_is_starved_when_runnable_without_cpu(before, now, expected) -> None:
    assert background.starved(before, now) is expected


def test_a_starved_idle_thread_is_demoted_to_a_nice_value() -> None:
    """Found when two migrations of spinning guests ran at once on a 2-core host: their
    SCHED_IDLE senders got no CPU and both stood still for 60 s. With normal work busy on
    every core, a lowered thread that wants the CPU is moved to the normal policy at nice
    +MIGRATION_NICE by the watchdog; without it, it would stay idle (and starved)."""
    background.idle_is_reversible.cache_clear()
    if not background.idle_is_reversible():
        pytest.skip("not permitted here to leave SCHED_IDLE (needs CAP_SYS_NICE or RLIMIT_NICE)")
    import subprocess
    import sys
    import time

    spin = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        state: dict[str, object] = {}
        stop = threading.Event()

        def worker() -> None:
            tid = threading.get_native_id()
            before = _now()
            with background.background():
                state["tid"] = tid
                while not stop.is_set():  # wants the CPU the whole time
                    sum(range(1000))
                state["demoted"] = _now()
            state["before"], state["after"] = before, _now()

        t = threading.Thread(target=worker)
        t.start()
        deadline = time.monotonic() + 30
        while state.get("tid") not in background.GUARD.demoted and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        t.join(60)
        assert state.get("tid") in background.GUARD.demoted, "the starved thread stayed idle"
        before = state["before"]
        assert state["demoted"] == background.Priority(
            before.policy,  # type: ignore[attr-defined]
            min(19, before.nice + background.MIGRATION_NICE),  # type: ignore[attr-defined]
        )
        assert state["after"] == before  # and put back after the block
    finally:
        for p in spin:
            p.kill()
            p.wait()


# A machine as far as `migrate` looks before it starts: a guest that has shut down, so the
# command is refused once the source's modules are loaded.
_LOAD_UNDER_MIGRATE = """
import json, os, sys, threading
from types import SimpleNamespace
from ptmig.migration import background
from ptmig.migration.control import MigrationControl
from ptmig.qmp.session import QmpError
from ptmig.vm import RunState

def priority():
    tid = threading.get_native_id()
    return [os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)]

seen = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "ptmig.migration.source":
            seen["loading"] = priority()
            seen["on_caller"] = threading.get_ident() == caller
        return None
sys.meta_path.insert(0, Watch())
caller = threading.get_ident()
before = priority()
vm = SimpleNamespace(state=RunState.SHUTDOWN, vcpu_thread_ids=lambda: [])
cfg = SimpleNamespace(migration=SimpleNamespace(psk_file=None, tls=False))
m = SimpleNamespace(
    cfg=cfg, vm=vm, shadowed_by_hand=lambda: False, measuring_dirty_log=lambda: False
)
try:
    MigrationControl(m).migrate("tcp:127.0.0.1:1")
except QmpError as e:
    assert "shutdown" in str(e), e
print(json.dumps({"before": before, "loading": seen.get("loading"), "after": priority(),
                  "on_caller": seen.get("on_caller"), "idle_ok": background.idle_is_reversible()}))
"""


def test_migrate_loads_the_source_modules_below_the_guest_and_comes_back() -> None:
    """A VMM's first `migrate` loads the source's modules (numpy, the protocol, the transport:
    ~0.15 s of CPU) at the migration's lower priority, on a thread of its own: the thread that
    took the command keeps its priority."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _LOAD_UNDER_MIGRATE],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    got = json.loads(out.stdout.splitlines()[-1])
    before = background.Priority(*got["before"])
    assert got["loading"] is not None, "ptmig.migration.source was already loaded"
    assert background.Priority(*got["loading"]) == _lowered(before, got["idle_ok"])
    assert got["on_caller"] is False
    assert background.Priority(*got["after"]) == before


def test_run_lowered_runs_lowered_on_its_own_thread_and_hands_back_result_or_error() -> None:
    def body() -> dict[str, object]:
        before = _now()
        inside = background.run_lowered(_now)
        with pytest.raises(ValueError, match="from the lowered thread"):
            background.run_lowered(_raise)
        return {"before": before, "inside": inside, "after": _now()}

    got = _in_thread(body)
    assert got["inside"] == _lowered(got["before"])  # type: ignore[arg-type]
    assert got["after"] == got["before"]


def _raise() -> None:
    raise ValueError("from the lowered thread")


def test_a_block_lowered_only_if_reversible_stays_where_it_could_not_come_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(background, "idle_is_reversible", lambda: False)

    def body() -> dict[str, object]:
        before = _now()
        with background.background(only_if_reversible=True):
            inside = _now()
        return {"before": before, "inside": inside}

    got = _in_thread(body)
    assert got["inside"] == got["before"]
