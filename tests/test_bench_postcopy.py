"""The post-copy bench's check that its downtime figure holds the switchover, its rows for the
kv guest with devices, and its post-copy rows that a run may not measure (pure)."""

from __future__ import annotations

import math

import pytest

from ptmig.bench.harness import BenchError, Result
from ptmig.bench.postcopy import (
    CAPS,
    MODES,
    SPAN_SLACK_MS,
    DeviceSample,
    PostcopyBenchParams,
    Sample,
    _device_sample,
    _switchover_window,
    device_results,
    results,
)


def sample() -> Sample:
    return Sample(total_ms=1000.0, downtime_ms=10.0, transferred=0, guest_kept=1.0)


@pytest.mark.parametrize(
    ("started", "inside"),
    [
        (100.004, True),  # between the stop and the acknowledgement
        (100.010 + SPAN_SLACK_MS / 2000, True),  # right after the acknowledgement
        (100.010 + 3 * SPAN_SLACK_MS / 1000, False),  # the guest moved after the window
        (99.999, False),  # started before the source stopped: another switchover
    ],
)
def test_the_destination_start_is_checked_against_the_downtime_window(
    started: float, inside: bool
) -> None:
    s = sample()
    _switchover_window(
        s, {"stopped-at-s": 100.0, "acked-at-s": 100.010}, {"guest-started-at-s": started}
    )
    assert s.in_window is inside
    assert s.outage_ms == pytest.approx((started - 100.0) * 1000)


def test_a_run_without_a_postcopy_switchover_has_no_window() -> None:
    s = sample()
    _switchover_window(s, {}, {})
    assert s.in_window is None and math.isnan(s.outage_ms)


def _device_run(lost: int = 0) -> DeviceSample:
    return DeviceSample(
        downtime_ms=15.0, outage_ms=16.0, in_window=True, faults=3, pages_fetched=7, lost=lost
    )


def test_the_devices_rows_fail_when_any_run_lost_a_value() -> None:
    """lost / wrong / mismatched must be 0 in every run, not only in the median one."""
    rows = {r.name: r for r in device_results([_device_run(), _device_run(2), _device_run()])}
    assert rows["postcopy.devices.lost"].ok is False
    assert rows["postcopy.devices.lost"].value == 2
    assert rows["postcopy.devices.wrong"].ok is True
    assert rows["postcopy.devices.downtime"].ok is True  # 15 ms <= 20 ms
    assert rows["postcopy.devices.downtime"].extra["switchover_in_window"] == [True] * 3
    assert rows["postcopy.devices.pages_fetched_by_dataplane"].value == 7
    assert device_results([]) == []


def test_a_devices_run_whose_load_failed_is_an_error_not_a_sample() -> None:
    info = {"downtime": 10, "x-verify": {"mismatched": 0}}
    with pytest.raises(BenchError, match="the kv load did not finish: .*no reply"):
        _device_sample(info, {}, {}, [RuntimeError("no reply")])
    with pytest.raises(BenchError, match="still running"):
        _device_sample(info, {}, {}, [])


def _cap_run(went: bool, faults: int, p99: float = math.nan, guest: float = 1.0) -> Sample:
    s = Sample(
        total_ms=1000.0,
        downtime_ms=8.0,
        transferred=1 << 30,
        guest_kept=guest,
        fault_p50_us=p99 / 4,
        fault_p99_us=p99,
        fault_max_us=p99 * 2,
        faults=faults,
        went_postcopy=went,
    )
    if went:
        s.outage_ms, s.in_window = 9.0, True
    return s


def _rows(postcopy_runs: list[Sample]) -> dict[str, Result]:
    other = [_cap_run(False, 0, guest=0.5) for _ in postcopy_runs]
    samples = {
        (m, c): list(postcopy_runs) if m == "postcopy" else list(other) for m in MODES for c in CAPS
    }
    return {r.name: r for r in results(samples, PostcopyBenchParams())}


def test_postcopy_rows_no_run_could_measure_say_why_instead_of_missing_their_goal() -> None:
    """0 remote faults (the push was ahead of the guest): the fault latency rows have no
    sample. They are not judged and say why; the outage and downtime are judged."""
    rows = _rows([_cap_run(True, 0), _cap_run(True, 0)])
    p99 = rows["postcopy.unlimited.fault_p99"]
    assert p99.ok is None and p99.goal == "≤ 2000 us"
    assert "0 remote faults in every run" in p99.extra["skipped"]
    assert rows["postcopy.unlimited.fault_p50"].ok is None
    assert rows["postcopy.unlimited.outage"].ok is True
    assert rows["postcopy.unlimited.faults"].value == 0


def test_postcopy_rows_of_runs_that_never_switched_are_not_postcopy_numbers() -> None:
    """A pre-copy round that fits the downtime limit wins over post-copy: such a run is a
    pre-copy migration, so none of the post-copy rows (downtime, bytes, guest) is judged on it."""
    rows = _rows([_cap_run(False, 0), _cap_run(False, 0)])
    for suffix in ("downtime", "bytes/ram", "total", "outage", "fault_p99"):
        r = rows[f"postcopy.unlimited.{suffix}"]
        assert r.ok is None and not r.runs, suffix
        assert "no run switched to post-copy" in r.extra["skipped"]
    assert rows["postcopy/autoconverge.unlimited.guest"].ok is None


def test_postcopy_rows_are_taken_over_the_runs_that_measured_them() -> None:
    """One run without faults: the fault rows' median is over the others (a NaN in the
    samples would make the median meaningless), and the row says how many did not measure."""
    rows = _rows([_cap_run(True, 40, 1500.0), _cap_run(True, 0), _cap_run(True, 30, 2500.0)])
    p99 = rows["postcopy.100MiBps.fault_p99"]
    assert p99.runs == [1500.0, 2500.0] and p99.value == 2000.0 and p99.ok is True
    assert p99.extra["runs_not_measuring"] == 1
    one_switched = _rows([_cap_run(False, 0, guest=2.0), _cap_run(True, 3, 100.0, guest=0.75)])
    ratio = one_switched["postcopy/autoconverge.100MiBps.guest"]
    assert ratio.runs == [1.5]  # paired in its own run, with auto-converge's 0.5
    assert one_switched["postcopy.100MiBps.downtime"].runs == [8.0]
