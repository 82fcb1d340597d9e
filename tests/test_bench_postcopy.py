"""The post-copy bench's check that its downtime figure holds the switchover (pure)."""

from __future__ import annotations

import math

import pytest

from ptmig.bench.postcopy import SPAN_SLACK_MS, Sample, _switchover_window


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
