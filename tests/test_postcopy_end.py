"""The end of post-copy over a real socket pair: the source reads on past PostcopyEnd until the
destination confirms (PostcopyDone). Closing earlier, with page requests unread, makes the
kernel reset the connection and drop the frames still in flight: a full bench run lost the
last 8,193 pages and the destination paused with them missing."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from ptmig.migration import (
    Complete,
    Connection,
    DeviceStates,
    HelloAck,
    RemoteProtocolError,
    Role,
    State,
    SwitchoverAck,
    VcpuStates,
    hello,
    transport,
)
from ptmig.migration.events import PageRequest, PostcopyDone, PostcopyEnd, PostcopyStart
from ptmig.migration.postcopy import await_done, pending_bytes

PAGES = 64
WAIT_S = 10.0


def ended_pair() -> tuple[transport.Channel, Connection, socket.socket, Connection]:
    """Source channel and connection after PostcopyEnd; the destination's socket and
    connection, which has received it."""
    s, d = (
        Connection(Role.SOURCE, guest_pages=PAGES),
        Connection(Role.DESTINATION, guest_pages=PAGES),
    )
    for frm, to, ev in (
        (s, d, hello({"m": 1})),
        (d, s, HelloAck(True, "")),
        (s, d, VcpuStates(b"v")),
        (s, d, DeviceStates(b"d")),
        (s, d, PostcopyStart(pending_bytes(np.ones(1, dtype=np.uint64)))),
        (s, d, Complete()),
        (d, s, SwitchoverAck(True, "")),
        (s, d, PostcopyEnd()),
    ):
        to.receive_data(frm.send(ev))  # type: ignore[arg-type]
        to.next_event()
    assert s.state is d.state is State.POSTCOPY_ENDED
    a, b = socket.socketpair()
    return transport.Channel(a, WAIT_S, "dst"), s, b, d


def test_requests_that_crossed_the_end_are_read_and_the_source_waits_for_done() -> None:
    ch, s, peer, d = ended_pair()
    peer.sendall(d.send(PageRequest(3, 1)) + d.send(PageRequest(9, 2)))
    done = threading.Event()

    def wait() -> None:
        await_done(ch, s)
        done.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert not done.wait(0.2)  # the requests alone do not end it
    peer.sendall(d.send(PostcopyDone()))
    waiter.join(WAIT_S)
    assert done.is_set() and s.state is State.SWITCHED_OVER
    ch.close()
    peer.close()


def test_a_destination_that_goes_away_before_confirming_is_a_lost_link() -> None:
    """The source cannot know the destination has every page: the truncated stream fails the
    migration, which the source handles as a link lost during post-copy (postcopy-paused,
    every page kept)."""
    ch, s, peer, d = ended_pair()
    peer.sendall(d.send(PageRequest(3, 1)))
    peer.close()
    with pytest.raises(RemoteProtocolError, match="peer closed in state postcopy-ended"):
        await_done(ch, s)
    ch.close()


def test_anything_but_done_after_the_end_is_refused() -> None:
    ch, s, peer, _ = ended_pair()
    rogue = Connection(Role.SOURCE, guest_pages=PAGES)  # frames a destination may not send
    peer.sendall(rogue.send(hello({"m": 1})))
    with pytest.raises(RemoteProtocolError):
        await_done(ch, s)
    ch.close()
    peer.close()
