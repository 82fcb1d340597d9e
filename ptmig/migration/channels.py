"""The source's data channels: extra authenticated streams that carry pre-copy pages.

While the `multifd` capability is on, guest RAM is cut into stripes of `STRIPE_PAGES` pages and
each stripe always travels on the same data channel (`stripe_masks`). A round over the data
channels (`ChannelRound`) runs one sender thread per channel; meanwhile the migration thread
watches the main stream, which carries nothing else during such a round: the destination's
Abort, its end of stream or a reset there, like a failed sender, stops the round at once, so a
destination that gives up or disappears never leaves the source waiting on a sender asleep in
the rate limit. The first failure is the round's error; every other sender is stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from .. import bitmap
from ..errors import PtmigError
from . import background, transport
from .events import NEED_DATA, Abort, ProtocolError
from .protocol import STRIPE_PAGES, Connection

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.02  # how often a data-channel round looks at the main stream
ABORT_GRACE_S = 0.25  # for the destination's reason to follow a broken data channel
SENDER_EXIT_S = 10.0  # a stopped sender leaves within one rate-limit step or aborted send


class RoundStopped(PtmigError):
    """A data-channel round was stopped: another sender or the destination failed first."""


def stripe_masks(npages: int, nchannels: int) -> list[bitmap.Bitmap]:
    """One bitmap per data channel selecting its pages: page p belongs to channel
    (p // STRIPE_PAGES) % nchannels, so a page always travels on the same stream."""
    words = np.arange(bitmap.words_for(npages)) // (STRIPE_PAGES // 64) % nchannels
    ones = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    return [np.where(words == k, ones, np.uint64(0)) for k in range(nchannels)]


class DataChannel:
    """One extra authenticated stream of pre-copy pages, with its own protocol state."""

    def __init__(self, channel: transport.Channel, conn: Connection, mask: bitmap.Bitmap) -> None:
        self.channel, self.conn, self.mask = channel, conn, mask


class ChannelRound:
    """One pre-copy round spread over the data channels, a sender thread per channel."""

    def __init__(self, channels: list[DataChannel]) -> None:
        self.channels = channels
        self.stopped = threading.Event()
        self.error: BaseException | None = None  # why the round stopped (the first failure)
        self._lock = threading.Lock()

    def check(self) -> None:
        """Called by the senders between sends: leave once the round was stopped."""
        if self.stopped.is_set():
            raise RoundStopped("the round was stopped")

    def run(
        self,
        ch: transport.Channel,
        conn: Connection,
        rnd: int,
        send: Callable[[DataChannel], int],
        check: Callable[[], None],
    ) -> int:
        """Send the round on every channel (`send` returns bytes sent) while watching the main
        stream `ch`; `check` raises on cancel or timeout. Returns the bytes sent, or raises the
        round's first failure (the destination's reason when a stream broke and it gave one)."""
        counts = [0] * len(self.channels)

        def sender(i: int, d: DataChannel) -> None:
            try:
                background.lower_this_thread()  # pre-copy only: the thread ends with its round
                counts[i] = send(d)
            except BaseException as e:  # re-raised below, in the migration thread
                self.stop(e)

        threads = [
            threading.Thread(target=sender, args=(i, d), name=f"migration-data-{i}")
            for i, d in enumerate(self.channels)
        ]
        for t in threads:
            t.start()
        try:
            self._watch(ch, conn, rnd, threads, check)
        except BaseException as e:
            self.stop(e)
        for t in threads:
            t.join(SENDER_EXIT_S)
            if t.is_alive():
                log.error("%s did not stop within %.0f s", t.name, SENDER_EXIT_S)
        if self.error is not None:
            if isinstance(self.error, transport.TransportError):
                raise destination_abort(ch, conn) or self.error
            raise self.error
        return sum(counts)

    def _watch(
        self,
        ch: transport.Channel,
        conn: Connection,
        rnd: int,
        threads: list[threading.Thread],
        check: Callable[[], None],
    ) -> None:
        """While the senders run: cancel, timeout, or the destination giving up on the main
        stream (it carries nothing else now) ends the round at once. Waking every
        WATCH_INTERVAL_S costs nothing; the senders' completion ends the wait immediately."""
        while alive := [t for t in threads if t.is_alive()]:
            if self.stopped.is_set():
                return
            alive[0].join(WATCH_INTERVAL_S)
            check()
            data = ch.recv_nowait()
            if data is None:
                continue
            if not data:
                raise transport.TransportError(
                    f"the migration stream to {ch.peer} ended during round {rnd}: the "
                    "destination gave up or is gone"
                )
            conn.receive_data(data)
            ev = conn.next_event()  # anything but an Abort is a RemoteProtocolError here
            if isinstance(ev, Abort):
                raise RuntimeError(f"destination aborted: {ev.reason}")
            if ev is not NEED_DATA:
                raise RuntimeError(f"unexpected {type(ev).__name__} from the destination")

    def stop(self, error: BaseException) -> None:
        """End the round after a failure; the first one is the round's error. Every sender
        stops: one asleep in the rate limit within a step (`check`), one blocked in a send
        because its stream is aborted (the migration fails; the guest stays here)."""
        with self._lock:
            if self.error is None and not isinstance(error, RoundStopped):
                self.error = error
            first = not self.stopped.is_set()
            self.stopped.set()
        if first:
            for d in self.channels:
                d.channel.abort()


def destination_abort(ch: transport.Channel, conn: Connection) -> RuntimeError | None:
    """After a stream broke: the destination's Abort, if it sent one, says why. It follows
    closely the reset it causes on our data channels, so wait for it a moment."""
    deadline = time.monotonic() + ABORT_GRACE_S
    while time.monotonic() < deadline:
        try:
            data = ch.recv_nowait()
            if data is None:
                time.sleep(0.01)
                continue
            if not data:
                return None
            conn.receive_data(data)
            ev = conn.next_event()
        except (transport.TransportError, ProtocolError):
            return None
        if isinstance(ev, Abort):
            return RuntimeError(f"destination aborted: {ev.reason}")
        if ev is not NEED_DATA:
            return None
    return None
