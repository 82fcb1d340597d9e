"""Convergence policies: pure functions, no sockets, no clocks."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ptmig.migration.policy import (
    AutoConverge,
    BandwidthEstimator,
    Decision,
    RoundStats,
    TimeoutAction,
    TimeoutPolicy,
    TokenBucket,
    decide,
    expected_downtime,
    should_switchover,
)


def test_expected_downtime_and_switchover_rule() -> None:
    assert expected_downtime(100_000_000, 1e9) == pytest.approx(0.1)
    assert expected_downtime(0, 0) == 0.0
    assert expected_downtime(1, 0) == math.inf
    assert should_switchover(30_000_000, 1e9, 0.03)
    assert not should_switchover(30_000_001, 1e9, 0.03)
    assert not should_switchover(1, 0.0, 10.0)
    with pytest.raises(ValueError, match="remaining_bytes must be >= 0, not -1"):
        expected_downtime(-1, 1.0)


def test_bandwidth_ewma() -> None:
    bw = BandwidthEstimator(alpha=0.25)
    assert bw.update(1000, 1.0) == 1000.0
    assert bw.update(2000, 1.0) == pytest.approx(0.25 * 2000 + 0.75 * 1000)
    assert bw.update(5, 0.0) == pytest.approx(1250.0)  # zero-length rounds are ignored
    with pytest.raises(ValueError, match="alpha must be in"):
        BandwidthEstimator(alpha=0)


def test_auto_converge_schedule_matches_qemu() -> None:
    ac = AutoConverge()
    hot = RoundStats(transferred_bytes=100, dirty_bytes=80)
    cold = RoundStats(transferred_bytes=100, dirty_bytes=10)
    assert ac.update(hot) == 0  # first fast-dirtying round: not yet
    assert ac.update(cold) == 0
    assert ac.update(hot) == 20  # second one: start at 20 %
    assert ac.update(hot) == 20
    assert ac.update(hot) == 30  # +10 every two such rounds
    seq = [ac.update(hot) for _ in range(40)]
    assert seq[-1] == 99 and max(seq) == 99
    assert ac.update(cold) == 99  # never lowered during a migration


def test_auto_converge_threshold_is_half_of_transfer() -> None:
    ac = AutoConverge()
    at = RoundStats(transferred_bytes=100, dirty_bytes=50)
    for _ in range(10):
        assert ac.update(at) == 0


def test_token_bucket_limits_rate_with_injected_clock() -> None:
    t = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        t[0] += s

    tb = TokenBucket(rate_bps=1000.0, burst_bytes=500, clock=lambda: t[0], sleep=sleep)
    assert tb.consume(500) == 0.0  # the burst is free
    assert tb.consume(1000) == pytest.approx(1.0)  # 1000 bytes over budget at 1000 B/s
    total = 1500
    for _ in range(20):
        tb.consume(100)
        total += 100
    # sustained: never faster than the rate plus one burst
    assert total <= 1000.0 * t[0] + 500
    assert total >= 1000.0 * t[0]  # and no slower either
    assert sum(slept) == pytest.approx(t[0])


def test_token_bucket_without_sleep_returns_the_delay() -> None:
    t = [0.0]
    tb = TokenBucket(rate_bps=1e6, clock=lambda: t[0])  # burst 100 kB
    assert tb.consume(100_000) == 0.0
    assert tb.consume(500_000) == pytest.approx(0.5)
    t[0] += 0.5
    assert tb.consume(1) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="rate_bps"):
        TokenBucket(rate_bps=0)


def test_decide_switchover_continue_and_timeouts() -> None:
    pol = TimeoutPolicy(max_total_s=10, max_rounds=5)
    kw: dict[str, Any] = dict(bandwidth_bps=1e6, downtime_limit_s=0.1, timeout=pol)
    assert decide(remaining_bytes=50_000, elapsed_s=1, rounds=1, **kw) is Decision.SWITCHOVER
    assert decide(remaining_bytes=10**9, elapsed_s=1, rounds=1, **kw) is Decision.CONTINUE
    assert decide(remaining_bytes=10**9, elapsed_s=11, rounds=1, **kw) is Decision.CANCEL
    assert decide(remaining_bytes=10**9, elapsed_s=1, rounds=5, **kw) is Decision.CANCEL
    force = TimeoutPolicy(max_total_s=10, on_timeout=TimeoutAction.FORCE_SWITCHOVER)
    kw["timeout"] = force
    assert decide(remaining_bytes=10**9, elapsed_s=11, rounds=1, **kw) is Decision.SWITCHOVER
