"""The source side of a live migration: pre-copy rounds, stop-and-copy, switchover.

`SourceMigration` runs in its own thread, driven by the `migrate` QMP command. It speaks the
sans-I/O protocol (`protocol.Connection`) over a `transport.Channel`; every decision about when
to stop iterating comes from `policy`. If anything fails before the destination acknowledges the
switchover — the peer disappears, the stream breaks, the migration is cancelled or times out — the
strategy puts the devices back to normal and the guest resumes here, having lost nothing.

The switchover has one commit point, the destination's (see `protocol.GuestOwnership`). Once
Complete is sent this side is in doubt: a refusal or an Abort from the destination lets it resume,
its acknowledgement ends the migration, and anything else (a broken stream, no answer within
`x-switchover-timeout`, `migrate_cancel`) leaves the switchover unresolved: the guest stays
paused here until it knows the side that keeps it: it asks the destination over a new
connection (`ask_fate`, see `fate`) for up to FATE_ASK_FOR_S, and `x-migrate-resolve` asks
again or names the side (`resolve`). The disk locks
(`ptmig.disklock`) are released just before Complete, with the vCPUs stopped and the devices
quiesced, and taken back before the guest ever resumes here.

Pre-copy rounds go over `multifd-channels` parallel streams while the `multifd` capability is
on (see `protocol`): one sender thread per channel, each sending its stripes of the round's
dirty set (`channels`). Several streams keep both ends busy on a few cores (the copies happen
in the kernel, outside the GIL) where one stream alternates between a full socket on one side
and an empty one on the other.
"""

from __future__ import annotations

import logging
import math
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import bitmap
from ..cputime import MigrationMeter
from ..disklock import DiskLockError
from ..errors import PtmigError
from ..guest_state import pack_devices, pack_vcpus
from ..layout import PAGE_SIZE
from ..memstats import release_free_memory
from ..tokens import token_hex
from ..vm import RunState
from . import background, fate, pages, policy, postcopy, recovery, transport
from .channels import ChannelRound, DataChannel, stripe_masks
from .events import (
    NEED_DATA,
    Abort,
    Complete,
    DeviceStates,
    HelloAck,
    PostcopyDiscard,
    PostcopyDiscarded,
    PostcopyReceived,
    PostcopyStart,
    Role,
    RoundEnd,
    RoundStart,
    SwitchoverAck,
    VcpuStates,
    VerifyDigests,
    VerifyReport,
)
from .params import MigrationCapabilities, MigrationInfo, MigrationParams, Status
from .protocol import (
    DATA_CHANNEL_JOIN_CAPABILITY,
    DATA_CHANNELS_OFFER_CAPABILITY,
    VERIFY_CAPABILITY,
    Connection,
    GuestOwnership,
    LinkLost,
    Owner,
    Resolve,
    channel_capability,
    hello,
)
from .tracking import DmaTracking, make_strategy
from .verify import digests_to_bytes, page_digests

if TYPE_CHECKING:
    from ..vmparts import MigratingVm

log = logging.getLogger(__name__)

BATCH_PAGES = 4096  # 16 MiB per PageRuns frame
DIGESTS_PER_FRAME = 65536
PACE_S = 0.25  # under max-bandwidth, a send carries about this much time's worth of payload
DRAIN_MAX_S = 2.0  # at most this long waiting for the destination before the stop
DRAIN_SLACK = 64 << 10  # bytes still in flight that are not worth waiting for
REPLY_POLL_S = 0.05  # how often the wait for the switchover's answer looks for a cancel
FATE_ASK_FOR_S = 60.0  # an unresolved source asks the destination for its fate this long
FATE_RETRY_S = 1.0  # between two fate queries the destination could not answer


# A dirty set this small is listed from its non-zero bitmap words and its pages are read
# directly; above it, whole-RAM passes (the memfd's holes, batched bitmap runs) pay off. A
# stop-and-copy round of a busy guest (thousands of scattered pages) stays on the cheap path.
SPARSE_PAGES = 32768


class MigrationCancelled(PtmigError):
    pass


def parse_uri(uri: str) -> transport.Address:
    """A migration URI (`tcp:HOST:PORT` or `unix:PATH`); the source needs a port."""
    address = transport.parse_address(uri)
    if address.path is None and address.port == 0:
        raise ValueError(f"migration URI must name a port (tcp:HOST:PORT), got {uri!r}")
    return address


class SourceMigration:
    def __init__(
        self,
        machine: MigratingVm,
        uri: str,
        params: MigrationParams,
        caps: MigrationCapabilities,
        *,
        psk: bytes | None = None,
        tls: transport.TlsConfig | None = None,
        insecure: bool = False,
        on_status: Callable[[Status], None] | None = None,
        accepted_at: float | None = None,
        meter: MigrationMeter | None = None,
    ) -> None:
        """`accepted_at` (CLOCK_MONOTONIC) and `meter` (started): when the migration was asked
        for, and this side's CPU meter started then; by default, now."""
        self.m = machine
        self.address = parse_uri(uri)
        self.params = params
        self.caps = caps
        self.psk, self.tls, self.insecure = psk, tls, insecure
        self.info = MigrationInfo(dma_tracking=params.x_dma_tracking)
        self.on_status = on_status
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migration-source", daemon=True)
        self.strategy: DmaTracking = make_strategy(params.x_dma_tracking)
        self.channel: transport.Channel | None = None
        self.stopped_at: float | None = None
        self._bucket: policy.TokenBucket | None = None
        self._bucket_rate = 0
        self.data_channels: list[DataChannel] = []
        self._lock = threading.Lock()  # sender threads share the counters and the rate limit
        self._rearmed_pages = 0  # this round's pages re-armed in KVM's log before their read
        self._rearm_s = 0.0
        self._round: ChannelRound | None = None  # the current data-channel round
        self.ownership = GuestOwnership(Role.SOURCE)
        self._was_running = False
        self._began = False  # the strategy began: devices must be put back on a resume
        self._resolve_lock = threading.Lock()  # `resolve` (QMP thread) against `_run`'s end
        self.postcopy_requested = threading.Event()  # migrate-start-postcopy
        self._postcopy = False  # the switchover is a post-copy one
        self._sender: postcopy.PostcopySender | None = None
        self.migration_id = fate.new_migration_id()  # its Hello's, for a fate query
        self.info.migration_id = self.migration_id
        # Post-copy recovery (see `recovery`): the secret a resume proves this migration with,
        # this side's phase, and whether the last link loss was a migrate-pause.
        self._session = token_hex(16)
        self.recovery = recovery.Recovery()
        self._pause_asked = False
        # The origin of total-time and setup-time, and this side's CPU meter (to the
        # switchover): both from the command, so the module loading before `_run` counts.
        self.accepted_at = time.monotonic() if accepted_at is None else accepted_at
        self.info.start = self.accepted_at
        if meter is None:
            meter = MigrationMeter(self.m.vm.vcpu_thread_ids)
            meter.start()
        self.cpu = meter

    # --- control ----------------------------------------------------------------------------

    def start(self) -> None:
        self._set_status(Status.SETUP)
        self._thread.start()

    def cancel(self) -> None:
        if not self.info.status.finished:
            self._set_status(Status.CANCELLING)
            self._cancel.set()
            for ch in [self.channel, *(d.channel for d in self.data_channels)]:
                if ch is not None:
                    ch.abort()  # unblock a send/recv in progress; `_run` closes them

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _set_status(self, status: Status) -> None:
        self.info.status = status
        if self.on_status is not None:
            try:
                self.on_status(status)
            except Exception:
                log.exception("migration status listener failed")

    def _check(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled")
        if self._round is not None:
            self._round.check()
        engine = self.strategy.engine
        if engine is not None and self._began and self.info.status is Status.ACTIVE:
            # A shadowed device that broke (its process or backend gone, a hostile ring) ends
            # the migration now, not when the round ends: under a low max-bandwidth one round
            # can take minutes. (Called between sends and in the rate limit's steps.)
            engine.check()
        if (
            self.info.start
            and self.info.status is not Status.POSTCOPY_ACTIVE  # the guest runs there now
            and time.monotonic() - self.info.start > self.params.x_timeout_s
        ):
            raise TimeoutError(f"migration did not complete within {self.params.x_timeout_s:.0f} s")

    # --- the migration ------------------------------------------------------------------------

    def _run(self) -> None:
        m = self.m
        vm = m.vm
        t_run = time.monotonic()
        self.info.ram.total = vm.memory.ram  # RAM bytes, not the span with the MMIO gap
        self._was_running = vm.state == RunState.RUNNING
        self._note_owner()
        switched = False
        try:
            # Connecting and the handshakes (the key schedule, the cipher's first use) have no
            # deadline either: below the guest, like loading the modules before them. The
            # strategy's start is not: shadowing quiesces devices while their rings move (and
            # where this thread might not come back, the block is not lowered at all).
            with background.background(only_if_reversible=True):
                ch = transport.connect_to(
                    self.address, tls=self.tls, psk=self.psk, insecure=self.insecure
                )
                self.channel = ch
                conn = Connection(Role.SOURCE, guest_pages=vm.memory.npages)
                caps: tuple[str, ...] = (f"{fate.MIGRATION_ID_CAPABILITY}={self.migration_id}",)
                if self.caps.x_verify:
                    caps += (VERIFY_CAPABILITY,)
                if self.caps.postcopy_ram:
                    caps += (
                        postcopy.POSTCOPY_CAPABILITY,
                        recovery.session_capability(self._session),
                    )
                nchannels, token = self.caps.data_channels(self.params), token_hex(16)
                if nchannels:
                    caps += (channel_capability(DATA_CHANNELS_OFFER_CAPABILITY, nchannels, token),)
                t_connected = time.monotonic()
                self._handshake(ch, conn, caps)
                self._open_data_channels(nchannels, token)
            self._check()
            t_channels = time.monotonic()
            self.strategy.begin(m)
            self._began = True
            vm.dirty.reset(protect=False)  # round 0 re-arms each batch as it sends it
            t_began = time.monotonic()
            self.info.setup_time_ms = int((t_began - self.info.start) * 1000)
            # Where setup went: `load` from the command to this thread (the modules' first
            # load); `dma-tracking` is the strategy's start (shadowing: each device quiesced
            # while its rings move), which the guest's I/O waits for.
            self.info.setup_parts_ms = {
                k: round(v * 1000, 2)
                for k, v in (
                    ("load", t_run - self.info.start),
                    ("connect", t_connected - t_run),
                    ("handshake", t_channels - t_connected),
                    ("dma-tracking", t_began - t_channels),
                )
            }
            self._set_status(Status.ACTIVE)
            with background.background():  # the stop-and-copy round runs as before
                pending = self._precopy(ch, conn)
            switched = self._stop_and_copy(ch, conn, pending)
        except Exception as e:
            self._failed(e)
        else:
            if self.info.end is None:
                self.info.end = time.monotonic()
            if switched:
                self._completed()
        finally:
            self._close_data_channels()
            if self.channel is not None:
                self.channel.close()
            release_free_memory()  # the send buffers are gone; the host gets their pages back

    def _completed(self) -> None:
        self.strategy.complete(self.m)
        self.info.shadow = self.strategy.stats()
        self._set_status(Status.COMPLETED)

    def _failed(self, e: Exception) -> None:
        """The migration failed: resume here if the guest is still ours, else stay unresolved."""
        cancelled = isinstance(e, MigrationCancelled) or self._cancel.is_set()
        why = "migration cancelled" if cancelled else f"{type(e).__name__}: {e}"
        if self._postcopy and self.ownership.owner is Owner.DESTINATION:
            self._postcopy_paused(why)
            return
        if self.ownership.owner is Owner.DESTINATION:  # after the ack: the guest left anyway
            log.exception("migration: after the switchover")
            self.info.error = why
            self.strategy.complete(self.m)
            self._set_status(Status.COMPLETED)
            return
        self.ownership.handle(LinkLost(why))
        self._note_owner()
        self.info.end = time.monotonic()
        if self.ownership.owner is Owner.UNRESOLVED:
            self.info.error = (
                f"switchover unresolved ({why}): the destination may be running the guest, so "
                "it stays paused here; once you know which side runs it, name it with "
                "x-migrate-resolve (winner 'source' or 'destination')"
            )
            log.error("migration: %s", self.info.error)
            # (before the status: a poller that sees x-unresolved knows the queries follow)
            query = self.info.fate_query = {"asking": True, "queries": 0, "last": ""}
            self._set_status(Status.UNRESOLVED)
            self._ask_until_resolved(query)
            return
        self.info.error = why
        if not cancelled:
            log.error("migration failed: %s", self.info.error)
        self._recover()
        self.info.shadow = self.strategy.stats()  # before the status: pollers see both
        self._set_status(Status.CANCELLED if cancelled else Status.FAILED)

    def _note_owner(self) -> None:
        self.info.guest_owner = self.ownership.owner.value

    def _ask_until_resolved(self, query: dict[str, Any]) -> None:
        """Unresolved: ask the destination for this migration's fate until it gives a
        definite answer, says it cannot (unknown, or an answer not to be relied on), or
        FATE_ASK_FOR_S pass; an unreachable or busy destination is asked again. `query`
        (query-migrate's x-fate-query) counts them and says when they end."""
        deadline = time.monotonic() + FATE_ASK_FOR_S
        note = ""
        try:
            while self.ownership.owner is Owner.UNRESOLVED and time.monotonic() < deadline:
                query["queries"] += 1
                try:
                    answer = self.ask_fate()
                except transport.TransportError as e:
                    note = query["last"] = f"the destination could not be asked: {e}"
                except (fate.FateError, DiskLockError, ValueError) as e:
                    note = query["last"] = str(e)
                    break
                else:
                    query["last"] = answer.value
                    if answer is not fate.Fate.UNKNOWN:
                        return
                    note = f"the destination does not know migration {self.migration_id}"
                    break
                time.sleep(FATE_RETRY_S)
            with self._resolve_lock:
                if self.ownership.owner is Owner.UNRESOLVED:
                    self.info.error = f"{self.info.error}; asked for its fate: {note}"
                    log.warning("migration: switchover still unresolved: %s", note)
        finally:
            query["asking"] = False

    def ask_fate(self) -> fate.Fate:
        """Ask the destination, over a new connection, what became of this migration, and
        resolve on a definite answer (unknown changes nothing). TransportError: it could not
        be asked; FateError: its answer cannot be relied on; ValueError: nothing to resolve."""
        if self.ownership.owner is not Owner.UNRESOLVED:
            raise ValueError(self._not_unresolved())
        answer = fate.ask(
            self.address,
            self.migration_id,
            self.m.cfg.compat_fingerprint(),
            tls=self.tls,
            psk=self.psk,
            insecure=self.insecure,
        )
        log.info("migration %s: the destination answers %s", self.migration_id, answer.value)
        if answer is fate.Fate.UNKNOWN:
            return answer
        winner = Role.DESTINATION if answer is fate.Fate.COMMITTED else Role.SOURCE
        self.resolve(winner, by=f"the destination's answer to a fate query ({answer.value})")
        return answer

    def _not_unresolved(self) -> str:
        return (
            f"the migration has no unresolved switchover (status "
            f"'{self.info.status.value}', guest owner '{self.ownership.owner.value}')"
        )

    def resolve(self, winner: Role, by: str = "the operator") -> None:
        """End an unresolved switchover: `winner` keeps the guest, as `by` says. The source
        wins only with its disk locks back (DiskLockError names their holder, and nothing
        changes)."""
        with self._resolve_lock:
            if self.ownership.owner is not Owner.UNRESOLVED:
                raise ValueError(self._not_unresolved())
            if winner is Role.SOURCE:
                self.m.disk_locks.acquire()
            self.ownership.handle(Resolve(winner, by))
            self._note_owner()
            self.info.error = f"{self.ownership.reason}; was: {self.info.error}"
            log.warning("migration: %s", self.ownership.reason)
            if winner is Role.SOURCE:
                self._recover()
                self.m.announce_nics()  # the destination may have announced them meanwhile
                self.info.shadow = self.strategy.stats()
                self._set_status(Status.FAILED)
            else:
                self.strategy.complete(self.m)
                self.info.shadow = self.strategy.stats()
                self.m.vm._set_state(RunState.POSTMIGRATE)
                self._set_status(Status.COMPLETED)

    def _handshake(self, ch: transport.Channel, conn: Connection, caps: tuple[str, ...]) -> None:
        transport.send_event(ch, conn, hello(self.m.cfg.compat_fingerprint(), caps))
        ack = transport.recv_event(ch, conn)
        if not isinstance(ack, HelloAck) or not ack.accepted:
            reason = getattr(ack, "reason", repr(ack))
            raise ConnectionRefusedError(f"destination refused the migration: {reason}")

    def _open_data_channels(self, n: int, token: str) -> None:
        """Connect and authenticate the data channels the destination agreed to accept."""
        npages = self.m.vm.memory.npages
        for index, mask in enumerate(stripe_masks(npages, n) if n else []):
            self._check()
            main = self.channel
            join = (main.session, index) if main is not None and main.session else None
            ch = transport.connect_to(
                self.address, tls=self.tls, psk=self.psk, insecure=self.insecure, join=join
            )
            self.data_channels.append(
                DataChannel(
                    ch, Connection(Role.SOURCE, guest_pages=npages, data_channel=True), mask
                )
            )
            cap = channel_capability(DATA_CHANNEL_JOIN_CAPABILITY, index, token)
            self._handshake(ch, self.data_channels[-1].conn, (cap,))

    def _drain(self, ch: transport.Channel) -> None:
        """Before stopping the guest: let the destination catch up with what is in flight.

        A busy destination can be hundreds of ms behind the stream (socket buffers hold MBs);
        whatever it has not processed when the guest stops is processed inside the downtime.
        The guest still runs while we wait here, and what it dirties meanwhile goes in the
        stop-and-copy round, which is small by then."""
        streams = [ch, *(d.channel for d in self.data_channels)]
        deadline = time.monotonic() + DRAIN_MAX_S
        while any(s.unacknowledged() > DRAIN_SLACK for s in streams):
            self._check()
            if time.monotonic() > deadline:
                log.info("the destination did not catch up within %.1f s", DRAIN_MAX_S)
                return
            time.sleep(0.002)

    def _close_data_channels(self) -> None:
        """End the data channels after a complete round (the destination sees a clean end)."""
        channels, self.data_channels = self.data_channels, []
        for d in channels:
            d.channel.close()

    def _recover(self) -> None:
        """The guest is ours again: its disk locks back, devices as before, vCPUs resumed. A
        lock another process took meanwhile keeps the guest paused (error-desc says who)."""
        vm = self.m.vm
        vm.set_throttle(0)
        try:
            self.m.disk_locks.acquire()
        except DiskLockError as e:
            self.info.error = f"{self.info.error}; the guest stays paused: {e}"
            log.error("migration: cannot resume the guest: %s", e)
            return
        if self._began:
            try:
                self.strategy.abort(self.m)
            except Exception as e:  # (a shadowed device that failed waits for its reset)
                log.exception("restoring devices after a failed migration")
                self.info.error = f"{self.info.error}; restoring the devices: {e}"
        if self._was_running and vm.state in (RunState.FINISH_MIGRATE, RunState.PAUSED):
            vm.resume()

    def _pace(self, nbytes: int) -> float:
        """Take `nbytes` from `max-bandwidth`'s bucket: the seconds it owes before the next
        send (0 without a limit). A new limit starts a new bucket."""
        rate = self.params.max_bandwidth
        if rate != self._bucket_rate:
            self._bucket_rate = rate
            self._bucket = policy.TokenBucket(rate) if rate else None
        bucket = self._bucket
        if bucket is None:
            return 0.0
        with self._lock:
            return bucket.consume(nbytes)

    def _rate_limit(self, nbytes: int) -> None:
        """Sleep as `max-bandwidth` asks, in short steps: a cancel or a new limit cuts it short."""
        rate = self.params.max_bandwidth
        end = time.monotonic() + self._pace(nbytes)
        # Compared with this sleep's own rate: with several senders, another one may already
        # have switched `_bucket_rate` to the new limit.
        while (left := end - time.monotonic()) > 0:
            self._check()
            if self.params.max_bandwidth != rate:
                return
            time.sleep(min(left, 0.02))

    def _harvest(self) -> bitmap.Bitmap:
        """The next round's pages. KVM's log is only read: `_send_stream_round` re-arms each
        batch right before reading it (`DirtyTracker.reprotect`)."""
        dirty = self.m.vm.dirty.harvest(protect=False)
        extra = self.strategy.round_dirty(self.m)
        if extra is not None:
            np.bitwise_or(dirty, extra, out=dirty)
        self.info.ram.dirty_sync_count += 1
        return dirty

    def _send_round(
        self,
        ch: transport.Channel,
        conn: Connection,
        rnd: int,
        dirty: bitmap.Bitmap,
        *,
        throttle: bool,
    ) -> tuple[int, int]:
        """Send one round's dirty pages on the main stream, or on the data channels (the main
        stream then carries the round with 0 pages); returns bytes and pages sent. A
        throttled round is a pre-copy round: the guest runs, and each batch is re-armed in
        KVM's log before it is read; the stop-and-copy's guest is stopped and needs none."""
        if not self.data_channels:
            return self._send_stream_round(ch, conn, rnd, dirty, throttle=throttle)
        sent = transport.send_event(ch, conn, RoundStart(rnd, 0))
        # holes: zero pages we need not even read (found once for all channels; a round few
        # enough to be listed sparsely never needs them: no whole-RAM scan for it)
        mem = self.m.vm.memory
        count = pages.count_dirty(dirty, mem.npages)
        allocated = mem.allocated() if count > SPARSE_PAGES else None
        self._round = ChannelRound(self.data_channels)

        def send(d: DataChannel) -> int:
            return self._send_stream_round(
                d.channel, d.conn, rnd, dirty & d.mask, throttle=throttle, allocated=allocated
            )[0]

        sent += self._round.run(ch, conn, rnd, send, self._check)
        return sent + transport.send_event(ch, conn, RoundEnd(rnd)), count

    def _send_stream_round(
        self,
        ch: transport.Channel,
        conn: Connection,
        rnd: int,
        dirty: bitmap.Bitmap,
        *,
        throttle: bool,
        allocated: np.ndarray | None = None,
    ) -> tuple[int, int]:
        """Send one round's dirty pages on one stream; returns bytes and pages sent.
        `allocated`: the holes map the caller already made for the whole round (data
        channels), used as given: one channel's share of a large round may be small, but its
        holes are not fewer."""
        mem = self.m.vm.memory
        npages = mem.npages
        # A few pages (the usual stop-and-copy) are listed and counted in one pass over the
        # bitmap, the only whole-bitmap pass on the downtime's clock.
        listed = bitmap.sparse_pages(dirty, npages, SPARSE_PAGES)
        count = listed.size if listed is not None else pages.count_dirty(dirty, npages)
        sent = transport.send_event(ch, conn, RoundStart(rnd, count))
        if listed is not None:
            # (cut to the batch size: up to SPARSE_PAGES pages exceed one frame's payload cap)
            batches = iter(
                pages.split_by_data(pages.pages_to_runs(listed), BATCH_PAGES) if count else []
            )
        else:
            if allocated is None:
                allocated = mem.allocated()  # holes are zero pages we need not even read
            batches = pages.bitmap_to_runs(dirty, BATCH_PAGES, npages)
        for runs in batches:
            self._check()
            if throttle:
                self._rearm(runs)
            runs = pages.split_zero_runs(mem.view, runs, allocated=allocated)
            for piece in self._paced(runs, throttle):
                n = transport.send_pages(ch, conn, piece, mem.view)
                self._account(piece, n)
                sent += n
                if throttle:
                    self._rate_limit(n)
        sent += transport.send_event(ch, conn, RoundEnd(rnd))
        return sent, count

    def _rearm(self, runs: np.ndarray) -> None:
        """Before a pre-copy batch is read: its pages' tracking re-armed, so a write from now
        on is in the next harvest (the deferred half of `_harvest`)."""
        t0 = time.monotonic()
        n = self.m.vm.dirty.reprotect(pages.expand_runs(runs))
        took = time.monotonic() - t0
        with self._lock:
            self._rearmed_pages += n
            self._rearm_s += took

    def _paced(self, runs: np.ndarray, throttle: bool) -> list[np.ndarray]:
        """A batch as sent: whole, or under `max-bandwidth` in pieces of PACE_S worth of
        payload. The rate limit waits after each send for what it cost, so a whole 16 MiB batch
        at a low limit would mean minutes of silence on every stream (the destination gives up
        after 30 s without progress) and a new limit or a cancel noticed only after them."""
        rate = self.params.max_bandwidth if throttle else 0
        if not rate:
            return [runs]
        return pages.split_by_data(runs, max(1, int(rate * PACE_S) // PAGE_SIZE))

    def _account(self, runs: np.ndarray, nbytes: int) -> None:
        """`query-migrate`'s RAM counters for one sent batch."""
        data = pages.data_pages(runs)
        total = int(runs["npages"].sum())
        ram = self.info.ram
        with self._lock:
            ram.normal += data
            ram.normal_bytes += data * PAGE_SIZE
            ram.duplicate += total - data
            ram.transferred += nbytes
            ram.remaining = max(0, ram.remaining - total * PAGE_SIZE)

    def _precopy(self, ch: transport.Channel, conn: Connection) -> bitmap.Bitmap:
        """Pre-copy rounds until the policy says stop; returns the dirty set not yet sent."""
        vm = self.m.vm
        npages = vm.memory.npages
        params = self.params
        bw = policy.BandwidthEstimator()
        auto = policy.AutoConverge() if self.caps.auto_converge else None
        dirty = vm.memory.ram_bitmap()  # round 0: every page of RAM, none of the MMIO gap
        stalls = policy.StallCounter()
        rnd = 0
        while True:
            self._check()
            count = pages.count_dirty(dirty, npages)
            self.info.ram.remaining = count * PAGE_SIZE
            t0 = time.monotonic()
            with self._lock:
                self._rearmed_pages, self._rearm_s = 0, 0.0
            nbytes, _ = self._send_round(ch, conn, rnd, dirty, throttle=True)
            took = time.monotonic() - t0
            rate = bw.update(nbytes, took)
            self.info.ram.mbps = rate * 8 / 1e6
            t1 = time.monotonic()
            dirty = self._harvest()
            harvest_ms = (time.monotonic() - t1) * 1000
            remaining_pages = pages.count_dirty(dirty, npages)
            remaining = remaining_pages * PAGE_SIZE
            self.info.ram.remaining = remaining
            self.info.ram.dirty_pages_rate = int(remaining_pages / took) if took > 0 else 0
            self.info.ram.pages_per_round.append(count)
            self.info.expected_downtime_ms = int(policy.expected_downtime(remaining, rate) * 1000)
            self.info.rounds.append(
                {
                    "round": rnd,
                    "pages": count,
                    "seconds": round(took, 4),
                    "remaining-pages": remaining_pages,
                    "channels": len(self.data_channels),
                    "harvest-ms": round(harvest_ms, 3),
                    "rearmed-pages": self._rearmed_pages,
                    "rearm-ms": round(self._rearm_s * 1000, 3),
                }
            )
            log.info(
                "round %d: %d pages in %.3fs (%.0f MB/s), %d dirty after",
                rnd,
                count,
                took,
                rate / 1e6,
                remaining_pages,
            )
            rnd += 1
            # downtime-limit and max-bandwidth apply at once when changed mid-migration (QEMU's
            # behaviour): `MigrationControl` updates `self.params`.
            if policy.should_switchover(remaining, rate, params.downtime_limit_ms / 1000):
                self._drain(ch)
                self._close_data_channels()  # the stop-and-copy round uses the main stream
                return dirty
            stalled = stalls.update(remaining)
            if self._switch_to_postcopy(rnd, stalled):
                self._drain(ch)
                self._close_data_channels()
                self._discard_early(ch, conn, dirty)
                return dirty
            if auto is not None:
                pct = auto.update(
                    policy.RoundStats(dirty_bytes=remaining, transferred_bytes=nbytes, seconds=took)
                )
                if pct != self.info.throttle_pct:
                    self.info.throttle_pct = pct
                    vm.set_throttle(pct)
            if stalled >= params.x_max_stalled_rounds and (
                auto is None or self.info.throttle_pct >= 99
            ):
                # The dirty set no longer shrinks (e.g. all-dirty resends every mapped page):
                # stop iterating and pay for it in downtime, as QEMU eventually must.
                self.info.forced_switchover = True
                self._drain(ch)
                self._close_data_channels()
                return dirty

    def _stop_and_copy(
        self, ch: transport.Channel, conn: Connection, pending: bitmap.Bitmap
    ) -> bool:
        m = self.m
        vm = m.vm
        self._check()
        # Downtime starts when we ask the vCPUs to stop (they are all out of the guest when
        # pause returns): counting from before the request never flatters the number.
        self.stopped_at = t0 = time.monotonic()
        vm.pause(RunState.FINISH_MIGRATE)
        phases: dict[str, float] = {"pause": time.monotonic() - t0}
        vm.set_throttle(0)
        self._set_status(Status.DEVICE)
        extra = self.strategy.stop_and_copy(m)
        dirty = pending  # the last harvest goes where the pages not yet sent are: no new array
        # Read only: with the guest stopped, re-arming would cost the downtime ioctls for
        # nothing. Should it run here again, the next migration's reset reads these pages.
        vm.dirty.harvest_into(dirty, protect=False)
        if extra is not None:
            np.bitwise_or(dirty, extra, out=dirty)
        self.info.ram.dirty_sync_count += 1
        vcpus = vm.save_vcpus()
        devices = self.strategy.device_states(m)
        phases["sync"] = time.monotonic() - t0 - sum(phases.values())
        rnd = len(self.info.rounds)
        if self._postcopy:
            final_pages = pages.count_dirty(dirty, vm.memory.npages)
        else:
            final_pages = self._send_round(ch, conn, rnd, dirty, throttle=False)[1]
        stop_round: dict[str, Any] = {
            "round": rnd,
            "pages": final_pages,
            "stop-and-copy": True,
            "stop-at-ms": round((t0 - self.info.start) * 1000, 1),
        }
        self.info.rounds.append(stop_round)
        self.info.ram.pages_per_round.append(final_pages)
        transport.send_event(ch, conn, VcpuStates(pack_vcpus(vcpus)))
        transport.send_event(ch, conn, DeviceStates(pack_devices(devices)))
        if self._postcopy:
            dirty &= vm.memory.ram_bitmap()
            transport.send_event(ch, conn, PostcopyStart(postcopy.pending_bytes(dirty)))
        # The vCPUs are stopped and the devices quiesced: the disks may change hands. From
        # the first byte of Complete on, the destination may commit (GuestOwnership).
        m.disk_locks.release()
        self.ownership.handle(Complete())
        self._note_owner()
        transport.send_event(ch, conn, Complete())
        phases["send"] = time.monotonic() - t0 - sum(phases.values())
        reply = self._switchover_reply(ch, conn)
        self.ownership.handle(reply)
        self._note_owner()
        if isinstance(reply, Abort):
            raise RuntimeError(f"destination aborted: {reply.reason}")
        if not reply.ok:
            raise RuntimeError(f"destination refused the switchover: {reply.reason}")
        acked = time.monotonic()
        self.info.downtime_ms = int((acked - self.stopped_at) * 1000)
        self.info.cpu_s = {
            "source": self.cpu.stop(),
            "destination": _seconds(_ack_field(reply.reason, "x-cpu-s")),
        }
        if self._postcopy and self.info.postcopy is not None:
            # the host's CLOCK_MONOTONIC, which the destination's guest start on the same host
            # is stamped with too: the bench checks the downtime window holds the switchover
            self.info.postcopy["stopped-at-s"] = round(t0, 6)
            self.info.postcopy["acked-at-s"] = round(acked, 6)
        # The migration is complete here, as QEMU's total-time counts it: the verification
        # that may follow reports its own time (x-verify's time-ms).
        self.info.end = acked
        phases["ack"] = time.monotonic() - t0 - sum(phases.values())
        # Where the downtime went: vCPU pause, device quiesce + final harvest + state save,
        # sending the last pages and state (+ digests), waiting for the destination's ack.
        stop_round["downtime-ms"] = {k: round(v * 1000, 2) for k, v in phases.items()}
        self.info.ram.remaining = 0
        stop_round["destination-ms"] = _ack_field(reply.reason, "x-switchover-ms")
        if self._postcopy:
            self._run_postcopy(
                ch, conn, postcopy.pending_pages(postcopy.pending_bytes(dirty), vm.memory.npages)
            )
        self._hand_over(ch, conn)
        return True

    def _hand_over(self, ch: transport.Channel, conn: Connection) -> None:
        """The destination has every page: this side never runs the guest again."""
        self.m.vm._set_state(RunState.POSTMIGRATE)
        if self.caps.x_verify:
            self.info.verify = self._verify_after_switchover(ch, conn)

    # --- post-copy (see `postcopy`) -----------------------------------------------------------

    def _switch_to_postcopy(self, rounds_done: int, stalled: int) -> bool:
        """At a round end that did not fit the downtime: should the switchover be post-copy?"""
        if not self.caps.postcopy_ram:
            return False
        trigger = policy.postcopy_trigger(
            policy=policy.PostcopyPolicy(
                after_rounds=self.params.x_postcopy_after_rounds,
                stalled_rounds=self.params.x_postcopy_stalled_rounds,
            ),
            requested=self.postcopy_requested.is_set(),
            rounds_done=rounds_done,
            stalled=stalled,
            fits_downtime=False,
        )
        if trigger is None:
            return False
        self._postcopy = True
        self.info.postcopy = {"trigger": trigger.value, "after-rounds": rounds_done}
        log.info("switching to post-copy after %d rounds (%s)", rounds_done, trigger.value)
        return True

    def _discard_early(
        self, ch: transport.Channel, conn: Connection, pending: bitmap.Bitmap
    ) -> None:
        """Before the stop: the destination makes the pages dirty now missing while the guest
        still runs here, so that its arming in the downtime only punches what the last moments
        dirtied (the final PostcopyStart names these pages again)."""
        t0 = time.monotonic()
        pending = pending & self.m.vm.memory.ram_bitmap()
        transport.send_event(ch, conn, PostcopyDiscard(postcopy.pending_bytes(pending)))
        reply = self._reply(ch, conn, (PostcopyDiscarded, Abort), "discard acknowledgement")
        if isinstance(reply, Abort):
            raise RuntimeError(f"destination aborted: {reply.reason}")
        assert self.info.postcopy is not None
        self.info.postcopy["discard-ms"] = round((time.monotonic() - t0) * 1000, 2)

    def _run_postcopy(
        self, ch: transport.Channel, conn: Connection, pending: np.ndarray, key: str = "pending"
    ) -> None:
        """The destination runs the guest: send it every `pending` page (one bool per page),
        its requests first. `key`: the pages' field in x-postcopy ("pending", "resent")."""
        mem = self.m.vm.memory
        sender = postcopy.PostcopySender(
            ch,
            conn,
            mem.view,
            pending,
            mem.has_data,
            check=self._check_cancel,
            pace=self._pace,
        )
        self._sender = sender
        pc = self.info.postcopy
        assert pc is not None
        pc[f"{key}-pages"] = sender.order.left
        self._set_status(Status.POSTCOPY_ACTIVE)
        t0 = time.monotonic()
        try:
            sender.run()
            postcopy.await_done(ch, conn)
        finally:  # a resumed post-copy adds to the first one's counters
            self.info.ram.postcopy_requests += sender.requests
            self.info.ram.transferred += sender.bytes_sent
            pc["requested-pages"] = pc.get("requested-pages", 0) + sender.requested_pages
            pc["unsent-pages"] = sender.order.left
            pc["time-ms"] = round(pc.get("time-ms", 0) + (time.monotonic() - t0) * 1000, 1)
        self.recovery.handle(recovery.Step.DONE)
        self.info.ram.remaining = 0

    def _check_cancel(self) -> None:
        """During post-copy only a cancel stops the sender (no timeout: the guest runs there)."""
        if self._cancel.is_set():
            raise MigrationCancelled("migration cancelled during post-copy")

    def _postcopy_paused(self, why: str) -> None:
        """The link broke (or the migration was cancelled) during post-copy: the destination
        runs the guest with pages only we have. Keep them all, stay paused, say so."""
        if self._pause_asked:
            why = f"migrate-pause ({why})"
        step = recovery.Step.PAUSE if self._pause_asked else recovery.Step.LINK_LOST
        self._pause_asked = False
        if self.recovery.allowed(step):
            self.recovery.handle(step)
        left = self._sender.order.left if self._sender is not None else -1
        self.info.end = time.monotonic()
        self.info.error = (
            f"post-copy interrupted ({why}): {left} pages were not sent; the guest is paused on "
            "both sides and this side keeps all of its RAM: recover with migrate-recover on the "
            "destination, then migrate with resume true here (the guest is lost only if "
            "either process ends)"
        )
        log.error("migration: %s", self.info.error)
        self._set_status(Status.POSTCOPY_PAUSED)

    # --- post-copy recovery (see `recovery`) --------------------------------------------------

    def pause(self) -> None:
        """`migrate-pause`: break the post-copy link on purpose (both sides pause)."""
        if not self._postcopy or not self.recovery.allowed(recovery.Step.PAUSE):
            raise recovery.RecoveryError(
                f"migrate-pause: the migration is {self.info.status.value}, not in post-copy"
            )
        self._pause_asked = True
        if self.channel is not None:
            self.channel.abort()

    def resume(self, uri: str) -> None:
        """`migrate` with `resume: true`: reconnect to the destination (which listens after
        `migrate-recover`), with the first connection's credentials, and send what it lacks."""
        if self.info.status is not Status.POSTCOPY_PAUSED:
            raise recovery.RecoveryError(
                f"migrate resume: the migration is {self.info.status.value}, not postcopy-paused"
            )
        address = parse_uri(uri)
        self.recovery.handle(recovery.Step.RECOVER)
        self.address = address
        self.channel = None  # the broken one is closed; migrate-pause aborts the new one
        self._set_status(Status.POSTCOPY_RECOVER)
        self._thread = threading.Thread(
            target=self._run_resume, name="migration-resume", daemon=True
        )
        self._thread.start()

    def _run_resume(self) -> None:
        mem = self.m.vm.memory
        try:
            ch = transport.connect_to(
                self.address, tls=self.tls, psk=self.psk, insecure=self.insecure
            )
            self.channel = ch
            if self._pause_asked:  # migrate-pause while connecting
                raise recovery.RecoveryError("migrate-pause during the reconnection")
            conn = Connection(Role.SOURCE, guest_pages=mem.npages, resume=True)
            caps = (recovery.session_capability(self._session),)
            transport.send_event(ch, conn, hello(self.m.cfg.compat_fingerprint(), caps))
            ack = transport.recv_event(ch, conn)
            if not isinstance(ack, HelloAck) or not ack.accepted:
                reason = ack.reason if isinstance(ack, HelloAck) else "it closed the stream"
                raise recovery.RecoveryError(f"the destination refused the resume: {reason}")
            got = transport.recv_event(ch, conn)
            if not isinstance(got, PostcopyReceived):
                raise recovery.RecoveryError(f"expected the received bitmap, got {got}")
            received = recovery.parse_received_bitmap(got.received, mem.npages)
            ram = postcopy.pending_pages(postcopy.pending_bytes(mem.ram_bitmap()), mem.npages)
            self.recovery.handle(recovery.Step.RESUMED)
            self.info.error = None
            self._run_postcopy(ch, conn, recovery.pages_to_resend(received, ram), "resent")
            self._hand_over(ch, conn)
        except Exception as e:
            self._failed(e)
        else:
            self.info.end = time.monotonic()
            self._completed()
        finally:
            if self.channel is not None:
                self.channel.close()

    def _switchover_reply(self, ch: transport.Channel, conn: Connection) -> SwitchoverAck | Abort:
        """The destination's answer to Complete, within x-switchover-timeout; a cancel, the
        timeout or a broken stream raise (and leave the switchover unresolved)."""
        ev = self._reply(ch, conn, (SwitchoverAck, Abort), "switchover acknowledgement")
        assert isinstance(ev, SwitchoverAck | Abort)
        return ev

    def _reply(
        self, ch: transport.Channel, conn: Connection, kinds: tuple[type, ...], what: str
    ) -> Any:
        """The destination's next event, one of `kinds`, within x-switchover-timeout,
        watching for a cancel meanwhile."""
        limit = self.params.x_switchover_timeout_s
        deadline = time.monotonic() + limit
        while True:
            ev = conn.next_event()
            if isinstance(ev, kinds):
                return ev
            if ev is not NEED_DATA:
                raise RuntimeError(f"expected a {what}, got {ev!r}")
            if self._cancel.is_set():
                raise MigrationCancelled(
                    f"migration cancelled while waiting for the destination's {what}"
                )
            data = ch.recv_nowait()
            if data is not None:
                if not data:
                    raise transport.TransportError(f"{ch.peer} closed the stream before its {what}")
                conn.receive_data(data)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no {what} from {ch.peer} within {limit:.0f} s (x-switchover-timeout)"
                )
            select.select([ch.sock], [], [], min(left, REPLY_POLL_S))

    def _verify_after_switchover(self, ch: transport.Channel, conn: Connection) -> dict[str, Any]:
        """Digests of this side's RAM as it was when the vCPUs stopped, compared by the
        destination with its RAM as it was before its guest resumed.

        Done after the switchover, so it costs no downtime: this side never runs the guest again,
        its vCPUs stay stopped and its devices quiesced, so its RAM is still exactly what it was
        at the stop. The destination's digests were computed from the pages as they arrived."""
        vm = self.m.vm
        t0 = time.monotonic()
        try:
            digests = page_digests(vm.memory.view, allocated=vm.memory.allocated())
            for start in range(0, len(digests), DIGESTS_PER_FRAME):
                chunk = digests[start : start + DIGESTS_PER_FRAME]
                transport.send_event(ch, conn, VerifyDigests(start, digests_to_bytes(chunk)))
            report = postcopy.drop_stray_requests(ch, conn)
        except Exception as e:  # the guest runs on the destination: only the check is lost
            log.error("verification after the switchover failed: %s", e)
            return {"error": f"{type(e).__name__}: {e}"}
        if not isinstance(report, VerifyReport):
            return {"error": f"expected a verification report, got {type(report).__name__}"}
        return {
            "pages": report.pages,
            "mismatched": report.mismatched,
            "first-mismatched": list(report.first_mismatched),
            "time-ms": round((time.monotonic() - t0) * 1000, 1),
        }


def _seconds(value: Any) -> float | None:
    """A duration the destination reported (peer data): a finite number >= 0, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)  # a JSON integer may be too large for a float
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _ack_field(reason: str, key: str) -> Any:
    """One field of the JSON report the destination puts in its ack (None if absent)."""
    import json

    try:
        doc = json.loads(reason) if reason else None
    except (ValueError, RecursionError):  # not JSON, an integer past the digit limit, nesting
        return None
    return doc.get(key) if isinstance(doc, dict) else None
