"""When pre-copy gives way to post-copy: pure functions, no sockets, no clocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptmig.migration.policy import (
    PostcopyPolicy,
    PostcopyTrigger,
    StallCounter,
    postcopy_trigger,
)

policies = st.builds(
    PostcopyPolicy,
    after_rounds=st.integers(min_value=0, max_value=20),
    stalled_rounds=st.integers(min_value=0, max_value=20),
)
counts = st.integers(min_value=0, max_value=100)


def test_trigger_examples() -> None:
    pol = PostcopyPolicy(after_rounds=1, stalled_rounds=3)
    kw = {"policy": pol, "requested": False, "stalled": 0, "fits_downtime": False}
    assert postcopy_trigger(rounds_done=0, **kw) is None  # type: ignore[arg-type]
    assert postcopy_trigger(rounds_done=1, **kw) is PostcopyTrigger.ROUNDS  # type: ignore[arg-type]
    never_by_count = PostcopyPolicy(after_rounds=0, stalled_rounds=3)
    assert (
        postcopy_trigger(
            policy=never_by_count, requested=False, rounds_done=9, stalled=2, fits_downtime=False
        )
        is None
    )
    assert (
        postcopy_trigger(
            policy=never_by_count, requested=False, rounds_done=9, stalled=3, fits_downtime=False
        )
        is PostcopyTrigger.STALLED
    )
    with pytest.raises(ValueError, match=r"after_rounds \(-1\)"):
        PostcopyPolicy(after_rounds=-1)
    with pytest.raises(ValueError, match=r"rounds_done \(-2\)"):
        postcopy_trigger(policy=pol, requested=True, rounds_done=-2, stalled=0, fits_downtime=False)


@given(policies, st.booleans(), counts, counts)
def test_a_precopy_that_fits_the_downtime_never_goes_postcopy(
    pol: PostcopyPolicy, requested: bool, rounds: int, stalled: int
) -> None:
    assert (
        postcopy_trigger(
            policy=pol, requested=requested, rounds_done=rounds, stalled=stalled, fits_downtime=True
        )
        is None
    )


@given(policies, counts, counts)
def test_a_request_always_starts_postcopy_unless_precopy_fits(
    pol: PostcopyPolicy, rounds: int, stalled: int
) -> None:
    got = postcopy_trigger(
        policy=pol, requested=True, rounds_done=rounds, stalled=stalled, fits_downtime=False
    )
    assert got is PostcopyTrigger.REQUESTED


@given(policies, counts, counts)
def test_without_request_it_starts_exactly_when_a_configured_limit_is_reached(
    pol: PostcopyPolicy, rounds: int, stalled: int
) -> None:
    got = postcopy_trigger(
        policy=pol, requested=False, rounds_done=rounds, stalled=stalled, fits_downtime=False
    )
    by_rounds = pol.after_rounds > 0 and rounds >= pol.after_rounds
    by_stall = pol.stalled_rounds > 0 and stalled >= pol.stalled_rounds
    assert (got is not None) == (by_rounds or by_stall)
    if by_rounds:
        assert got is PostcopyTrigger.ROUNDS
    # once triggered by count or stall, one more round (or stall) keeps it triggered
    later = postcopy_trigger(
        policy=pol,
        requested=False,
        rounds_done=rounds + 1,
        stalled=stalled + 1,
        fits_downtime=False,
    )
    if got is not None:
        assert later is not None


@given(st.lists(st.integers(min_value=0, max_value=1 << 40), min_size=1, max_size=50))
def test_stall_counter_counts_rounds_since_the_last_5_percent_progress(
    remaining: list[int],
) -> None:
    counter = StallCounter()
    best: int | None = None
    since = 0
    for r in remaining:
        got = counter.update(r)
        if best is None or r < best * 0.95:
            best, since = r, 0
        else:
            since += 1
        assert got == since
        assert counter.best_bytes == best


def test_stall_counter_examples() -> None:
    c = StallCounter()
    assert [c.update(x) for x in (1000, 960, 949, 949, 900, 10)] == [0, 1, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="remaining_bytes must be >= 0, not -5"):
        c.update(-5)
    with pytest.raises(ValueError, match="progress must be in"):
        StallCounter(progress=0)


def test_ptmig_migrate_postcopy_sends_the_capability_and_the_round_limit() -> None:
    from ptmig.migrate import (
        EXIT_UNRESOLVED,
        MigrateOptions,
        exit_status,
        setup_commands,
    )

    cmds = dict(
        setup_commands(MigrateOptions("q.sock", "tcp:h:1", postcopy=True, postcopy_after_rounds=1))
    )
    assert cmds["migrate-set-parameters"] == {"x-postcopy-after-rounds": 1}
    assert {"capability": "postcopy-ram", "state": True} in cmds["migrate-set-capabilities"][
        "capabilities"
    ]
    plain = dict(setup_commands(MigrateOptions("q.sock", "tcp:h:1")))
    assert all(
        c["capability"] != "postcopy-ram" for c in plain["migrate-set-capabilities"]["capabilities"]
    )
    with pytest.raises(ValueError, match="needs --postcopy"):
        MigrateOptions("q.sock", "tcp:h:1", postcopy_after_rounds=2)
    assert exit_status({"status": "postcopy-paused"}) == EXIT_UNRESOLVED
