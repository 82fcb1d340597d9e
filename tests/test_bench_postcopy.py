"""The post-copy bench's check that its downtime figure holds the switchover, and its rows for
the kv guest with devices (pure)."""

from __future__ import annotations

import math

import pytest

from ptmig.bench.harness import BenchError
from ptmig.bench.postcopy import (
    SPAN_SLACK_MS,
    DeviceSample,
    Sample,
    _device_sample,
    _switchover_window,
    device_results,
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
