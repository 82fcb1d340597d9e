"""Who runs the guest during a switchover (`protocol.GuestOwnership`), without KVM or sockets.

The table is walked by hand for the cases that matter, then by hypothesis over any event
sequence; a two-sided simulation over every way the final exchange can go wrong checks that the
guest never runs on both sides and that the source resumes only when it knows it may.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptmig.migration.events import (
    Abort,
    Complete,
    LocalProtocolError,
    Role,
    SwitchoverAck,
)
from ptmig.migration.params import MigrationInfo, MigrationParams, Status
from ptmig.migration.protocol import (
    OWNERSHIP,
    Commit,
    Connection,
    GuestOwnership,
    LinkLost,
    Owner,
    Resolve,
    State,
)

S, D = Role.SOURCE, Role.DESTINATION


def _source_after(*events: object) -> GuestOwnership:
    own = GuestOwnership(S)
    for ev in events:
        own.handle(ev)  # type: ignore[arg-type]
    return own


def test_a_failure_before_complete_leaves_the_guest_with_the_source() -> None:
    own = _source_after(LinkLost("destination gone"))
    assert own.owner is Owner.SOURCE and own.runs_here


def test_after_complete_the_source_is_in_doubt_and_may_not_resume() -> None:
    own = _source_after(Complete())
    assert own.owner is Owner.IN_DOUBT and not own.runs_here


def test_a_lost_answer_after_complete_is_unresolved_not_a_resume() -> None:
    own = _source_after(Complete(), LinkLost("no acknowledgement within 2 s"))
    assert own.owner is Owner.UNRESOLVED and not own.runs_here
    assert own.reason == "no acknowledgement within 2 s"


@pytest.mark.parametrize("answer", [SwitchoverAck(False, "disk locked"), Abort("bad state")])
def test_an_explicit_refusal_gives_the_guest_back_to_the_source(answer: object) -> None:
    own = _source_after(Complete(), answer)
    assert own.owner is Owner.SOURCE and own.runs_here


def test_the_acknowledgement_hands_the_guest_to_the_destination_for_good() -> None:
    own = _source_after(Complete(), SwitchoverAck(True))
    assert own.owner is Owner.DESTINATION and not own.runs_here
    for late in (LinkLost("closed"), Abort("late"), Resolve(S), Complete()):
        with pytest.raises(LocalProtocolError):
            own.handle(late)  # type: ignore[arg-type]
        assert own.owner is Owner.DESTINATION


@pytest.mark.parametrize(("winner", "owner"), [(S, Owner.SOURCE), (D, Owner.DESTINATION)])
def test_the_operator_resolves_either_way(winner: Role, owner: Owner) -> None:
    own = _source_after(Complete(), LinkLost("cancelled"), Resolve(winner))
    assert own.owner is owner and own.runs_here is (winner is S)
    assert winner.value in own.reason


def test_resolve_is_refused_unless_unresolved() -> None:
    for events in [(), (Complete(),), (Complete(), SwitchoverAck(True))]:
        own = _source_after(*events)
        before = own.owner
        with pytest.raises(LocalProtocolError, match="not possible while"):
            own.handle(Resolve(S))
        assert own.owner is before


def test_the_destination_owns_the_guest_only_from_its_commit() -> None:
    own = GuestOwnership(D)
    assert not own.runs_here
    own.handle(LinkLost("source gone"))
    assert not own.runs_here
    own.handle(Commit())
    assert own.owner is Owner.DESTINATION and own.runs_here
    with pytest.raises(LocalProtocolError):
        own.handle(Abort("too late"))


def test_the_source_cannot_send_an_abort_after_complete() -> None:
    conn = Connection(S, guest_pages=16)
    conn.state = State.COMPLETE_SENT  # the conversation's own tests walk there byte by byte
    with pytest.raises(LocalProtocolError, match="may not send Abort"):
        conn.send(Abort("changed my mind"))


_EVENTS = st.sampled_from(
    [
        Complete(),
        SwitchoverAck(True),
        SwitchoverAck(False, "no"),
        Abort("no"),
        LinkLost("lost"),
        Resolve(S),
        Resolve(D),
        Commit(),
    ]
)


@given(st.lists(_EVENTS, max_size=12))
def test_no_event_sequence_resumes_the_source_without_an_answer(events: list[object]) -> None:
    """Once Complete is sent, the source runs the guest again only after a refusal, an Abort
    or the operator's decision; an event the table does not allow changes nothing."""
    own = GuestOwnership(S)
    sent_complete = False
    for ev in events:
        before = own.owner
        try:
            own.handle(ev)  # type: ignore[arg-type]
        except LocalProtocolError:
            assert own.owner is before
            continue
        if isinstance(ev, Complete):
            sent_complete = True
        if sent_complete and own.owner is Owner.SOURCE and before is not Owner.SOURCE:
            assert isinstance(ev, Abort | Resolve) or (isinstance(ev, SwitchoverAck) and not ev.ok)
        if before is Owner.DESTINATION:
            assert own.owner is Owner.DESTINATION


def test_every_transition_of_the_table_is_reachable_from_the_start() -> None:
    keys = set(OWNERSHIP)
    seen = set()
    frontier = [(role, Owner.SOURCE) for role in Role]
    done = set()
    while frontier:
        role, owner = frontier.pop()
        if (role, owner) in done:
            continue
        done.add((role, owner))
        for key, nxt in OWNERSHIP.items():
            if key[:2] == (role, owner):
                seen.add(key)
                frontier.append((role, nxt))
    assert seen == keys


@pytest.mark.parametrize(
    ("complete_arrives", "destination_refuses", "answer_arrives"),
    list(itertools.product([False, True], repeat=3)),
)
def test_the_guest_never_runs_on_both_sides(
    complete_arrives: bool, destination_refuses: bool, answer_arrives: bool
) -> None:
    """Both views, over every fate of Complete and of the destination's answer."""
    src, dst = GuestOwnership(S), GuestOwnership(D)
    src.handle(Complete())
    answer: SwitchoverAck | None = None
    if not complete_arrives:
        dst.handle(LinkLost("the source went silent"))
    elif destination_refuses:
        answer = SwitchoverAck(False, "cannot take the disk locks")
        dst.handle(Abort(answer.reason))
    else:
        dst.handle(Commit())
        answer = SwitchoverAck(True)
    if answer is not None and answer_arrives:
        src.handle(answer)
    else:
        src.handle(LinkLost("no answer"))
    assert not (src.runs_here and dst.runs_here)
    assert src.runs_here or dst.runs_here or src.owner is Owner.UNRESOLVED
    if src.owner is Owner.UNRESOLVED:  # the operator, who can see the destination, decides
        src.handle(Resolve(D if dst.runs_here else S))
        assert src.runs_here != dst.runs_here


def test_query_migrate_reports_the_owner_and_the_unresolved_status() -> None:
    info = MigrationInfo(
        status=Status.UNRESOLVED,
        start=1.0,
        guest_owner="unresolved",
        error="switchover unresolved (migration cancelled)",
    )
    out = info.to_qmp()
    assert out["status"] == "x-unresolved" and out["x-guest-owner"] == "unresolved"
    assert out["error-desc"].startswith("switchover unresolved")
    assert Status.UNRESOLVED.finished


def test_switchover_timeout_parameter() -> None:
    p = MigrationParams()
    p.set(x_switchover_timeout=2)
    assert p.x_switchover_timeout_s == 2.0 and p.to_qmp()["x-switchover-timeout"] == 2
    with pytest.raises(ValueError, match=r"x-switchover-timeout must be in \[1, 3600\] s, got 0"):
        p.set(x_switchover_timeout=0)
    assert p.x_switchover_timeout_s == 2.0
