"""CPU accounting of a migration (`ptmig.cputime`): /proc parsing, the observer's samples, and
the meter each VMM runs on itself; the demo's use of both (`CpuWatch`)."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable

import pytest

from ptmig.cputime import (
    TICK_S,
    CpuSample,
    MigrationMeter,
    StatTimes,
    migration_clock,
    migration_cpu_s,
    parse_stat,
    sample,
)
from ptmig.demo.run import CpuWatch
from ptmig.migration.source import _ack_field, _seconds

STAT = (
    "4242 (python -m (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 {ut} {st} 0 0 20 0 3 0 "
    "100 1000 100 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 {gt} 0 0 0"
)


def test_proc_stat_times_are_parsed_past_a_name_with_parentheses() -> None:
    t = parse_stat(STAT.format(ut=150, st=50, gt=120))
    assert t.cpu_s == pytest.approx(200 * TICK_S) and t.guest_s == pytest.approx(120 * TICK_S)
    with pytest.raises(ValueError, match="not a /proc stat line"):
        parse_stat("12 (short) S 1 2")


def test_migration_cpu_leaves_out_the_threads_that_ran_a_guest() -> None:
    # thread 1: main (no guest); 2: a vCPU on both samples; 3: a vCPU that first ran the
    # guest after the start (the destination's)
    start = CpuSample(
        10.0, {1: StatTimes(4.0, 0.0), 2: StatTimes(5.0, 4.0), 3: StatTimes(1.0, 0.0)}
    )
    end = CpuSample(20.0, {1: StatTimes(9.0, 0.0), 2: StatTimes(8.0, 7.0), 3: StatTimes(3.0, 1.5)})
    assert migration_cpu_s(start, end) == pytest.approx(10.0 - 3.0 - 2.0)


def test_this_process_can_be_sampled() -> None:

    s = sample(os.getpid())
    assert s is not None and s.total_s >= 0 and os.getpid() in s.threads


def test_the_meter_reports_what_the_clock_advanced_between_start_and_stop() -> None:
    readings = iter([10.0, 12.5, 20.0, 19.0])
    asked: list[list[int]] = []

    def clock(tids: Iterable[int]) -> float:
        asked.append(list(tids))
        return next(readings)

    tids = [7]
    meter = MigrationMeter(lambda: tids, clock)
    assert meter.stop() is None  # never started: nothing to report
    meter.start()
    tids.append(8)  # a vCPU thread started meanwhile is left out of the second reading
    assert meter.stop() == pytest.approx(2.5) and meter.used_s == pytest.approx(2.5)
    assert asked == [[7], [7, 8]]
    meter.start()  # a new attempt starts afresh
    assert meter.used_s is None
    assert meter.stop() == 0.0  # a clock that went back (tick-rounded vCPU times): not negative


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_the_clock_leaves_out_the_vcpu_threads() -> None:
    """A thread burning CPU counts in the process clock unless it is named as a vCPU."""
    ready, go, done, release = (threading.Event() for _ in range(4))
    tid: list[int] = []

    def vcpu() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        go.wait()
        _burn(0.3)
        done.set()
        release.wait()  # alive (its /proc entry readable) until the second reading

    t = threading.Thread(target=vcpu)
    t.start()
    ready.wait()
    whole0, without0 = migration_clock([]), migration_clock(tid)
    go.set()
    done.wait()
    whole1, without1 = migration_clock([]), migration_clock(tid)
    release.set()
    t.join()
    assert whole1 - whole0 >= 0.3
    assert without1 - without0 < 0.1  # its 0.3 s left out (its /proc times are in ticks)
    # An ended thread has no /proc entry: its time stays counted, nothing fails.
    assert migration_clock(tid) >= whole1


def test_a_destinations_reported_seconds_are_checked() -> None:
    """The destination's `x-cpu-s` is peer data: only a finite number >= 0 is taken, and no
    reply can make the source's switchover raise (it has committed by then)."""
    assert _seconds(_ack_field('{"x-cpu-s": 0.25}', "x-cpu-s")) == 0.25
    assert _seconds(_ack_field('{"x-cpu-s": 3}', "x-cpu-s")) == 3.0
    for reason in (
        '{"x-cpu-s": -1}',
        '{"x-cpu-s": "0.5"}',
        '{"x-cpu-s": true}',
        '{"x-cpu-s": NaN}',
        '{"x-cpu-s": 1e999}',
        '{"x-cpu-s": [1]}',
        '{"x-cpu-s": 1' + "0" * 400 + "}",  # an integer too large for a float
        '{"x-cpu-s": 1' + "0" * 5000 + "}",  # past Python's integer digit limit
        '{"x-cpu-s": ' + "[" * 100_000 + "]" * 100_000 + "}",  # nesting past the recursion limit
        '{"other": 1}',
        "[1, 2]",
        "not json",
        "",
    ):
        assert _seconds(_ack_field(reason, "x-cpu-s")) is None, reason


def _watch(switched: bool) -> CpuWatch:
    def at(total: float, vcpu: float) -> CpuSample:
        return CpuSample(total, {1: StatTimes(total - vcpu, 0.0), 2: StatTimes(vcpu, vcpu)})

    w = CpuWatch(1, 2)
    w.warm, w.warm_at = (at(1.0, 0.5), at(1.0, 0.0)), 10.0
    w.start, w.start_at = (at(2.0, 1.0), at(1.5, 0.0)), 20.0  # warm-up: 0.05 s/s, 0.05 s/s
    if switched:
        w.switched, w.switched_at = (at(4.0, 1.5), at(2.5, 0.0)), 24.0
    w.end = (at(5.0, 2.0), at(3.5, 0.0))
    return w


INFO = {"ram": {"transferred": 1 << 29, "total": 1 << 30}, "total-time": 4000}


def test_the_demo_takes_the_vmms_own_figures_when_it_missed_the_switchover() -> None:
    out = _watch(switched=False).to_json({**INFO, "x-cpu-s": {"source": 0.8, "destination": 0.4}})
    assert (out["source-s"], out["source-s-per-gib"], out["source-s-per-ram-gib"]) == (
        0.8,
        1.6,
        0.8,
    )
    assert out["destination-s-per-ram-gib"] == 0.4
    assert out["source-by"] == out["destination-by"] == "vmm"
    assert out["source-baseline-s"] == pytest.approx(0.2)  # 0.05 s/s over total-time's 4 s
    assert out["source-with-verify-s"] == pytest.approx(2.0)  # 3.0 s of which vCPU 1.0


def test_without_the_vmms_figures_the_demo_falls_back_to_its_polls_or_says_nothing() -> None:
    polled = _watch(switched=True).to_json(INFO)
    assert polled["source-s"] == pytest.approx(1.5) and polled["source-by"] == "poll"
    assert polled["destination-s"] == pytest.approx(1.0)
    missed = _watch(switched=False).to_json(INFO)
    assert "source-s" not in missed and "source-s-per-ram-gib" not in missed
    # only the side the destination reported: the other falls back
    half = _watch(switched=True).to_json({**INFO, "x-cpu-s": {"source": 0.8}})
    assert (half["source-by"], half["destination-by"]) == ("vmm", "poll")
    assert half["source-s"] == 0.8 and half["source-poll-s"] == pytest.approx(1.5)


def test_nan_is_never_reported() -> None:
    out = _watch(switched=False).to_json({"ram": {}, "x-cpu-s": {"source": 0.1}})
    assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())
    assert out["source-s"] == 0.1 and "source-s-per-gib" not in out
