"""The destination side of a live migration (`ptmig run CONFIG --incoming tcp:HOST:PORT`).

The destination owns fresh device processes (different hardware) and an empty guest. It accepts
one authenticated connection, receives RAM straight into guest memory (page numbers from the
peer are validated by the protocol before they become addresses), then the vCPU and device
state. Its commit point (`protocol.GuestOwnership`) comes when everything is loaded and it has
taken the disk locks (`ptmig.disklock`; it opened the images unlocked, the source held them):
from then on it runs the guest whatever happens to the link, and its SwitchoverAck only reports
the commit. Any error before it -- a refusal, a failure of its own, even a SIGTERM -- ends the
incoming migration with a clear message, sent to the source in an Abort (or a refused
SwitchoverAck) where the main stream still works, and the source resumes, even from its doubt
after Complete. Only a destination that dies without a word (SIGKILL, a crash, a lost link)
leaves a source in doubt unresolved.

A stop request (SIGTERM, SIGINT) follows the same line (`Incoming.defer_stop`): before the
commit point begins, the incoming migration ends at once and the Abort tells the source to
resume; from the moment the commit begins (the disk locks are being taken) the request waits:
the switchover finishes, the guest starts here, and then it stops as any running VM stops when
told to (`quit`). Should the commit fail after all (a disk lock held elsewhere), the deferred
request ends the VMM as soon as the refusal is sent. So a stop request never leaves the guest
running nowhere, and never leaves it running twice.

`PTMIG_TEST_HOLD` (tests only) holds the destination at one point of the switchover:
`before-commit:PATH` (state loaded, commit not begun) or `after-commit:PATH` (committed and
acknowledged, the guest not started yet); in post-copy, `postcopy-end:PATH` (every page
installed, post-copy not declared done) or `postcopy-done:PATH` (done, the source not told yet).
The destination creates PATH when it gets there and
goes on once PATH is removed (or after HOLD_MAX_S), so a test can inject a signal exactly in
that window.

With data channels the streams of one migration share one watchdog (`transport.SharedActivity`):
the main stream is silent while a round's pages flow on the data channels, so only a migration
without progress on any stream for the inactivity timeout is given up. A data channel that fails
wakes the main stream's receive, so the failure is reported at once, not at the next frame.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..cliconv import VMM_FAILED
from ..cputime import MigrationMeter
from ..devices.handle import DeviceError
from ..disklock import DiskLockError
from ..errors import PtmigError
from ..guest_state import DeviceSnapshot, unpack_devices, unpack_vcpus
from ..memstats import release_free_memory
from ..tokens import compare_digest
from ..vcpu_state import VcpuState
from ..vm import RunState
from ..vmparts import MigratingVm
from . import background, transport
from .events import (
    NEED_DATA,
    Abort,
    Complete,
    DeviceStates,
    Hello,
    HelloAck,
    PageRunsHeader,
    PostcopyDiscard,
    PostcopyDiscarded,
    PostcopyDone,
    PostcopyReceived,
    PostcopyStart,
    ProtocolError,
    RemoteProtocolError,
    Role,
    RoundEnd,
    RoundStart,
    RunKind,
    SwitchoverAck,
    VcpuStates,
    VerifyDigests,
    VerifyReport,
)
from .fate import (
    FATE_CAPABILITY,
    MIGRATION_ID_CAPABILITY,
    Fates,
    FateServer,
    capability_id,
)
from .frames import MAX_REASON
from .pages import PAGE_SIZE, expand_runs, native_library, pages_to_runs
from .postcopy import (
    POSTCOPY_CAPABILITY,
    PostcopyError,
    PostcopyReceiver,
    pending_pages,
    punch_pages,
)
from .protocol import (
    DATA_CHANNEL_JOIN_CAPABILITY,
    DATA_CHANNELS_OFFER_CAPABILITY,
    VERIFY_CAPABILITY,
    Commit,
    Connection,
    ConnectionClosed,
    GuestOwnership,
    check_hello,
    parse_channel_capability,
)
from .recovery import (
    Recovery,
    RecoveryError,
    Step,
    received_bitmap,
    requested_pages,
    session_token,
)
from .uffd import FaultServerError
from .verify import (
    ZERO_PAGE_DIGEST,
    compare_digests,
    digests_from_bytes,
    page_digests,
    page_digests_at,
    scatter_pages,
)

if TYPE_CHECKING:
    from ..devices.attach import AttachedDevice
    from ..layout import BootDevice
    from .postcopy_devices import PostcopyDevices

log = logging.getLogger(__name__)

RECV_CHUNK = 64 << 10  # bytes per plain read: frame headers, metadata, small frames
GATHER_MIN_RUNS = 8  # a page batch in at least this many runs is received whole, then scattered
DATA_CHANNEL_ACCEPT_S = 10.0  # the source connects its data channels right after the HelloAck
HOLD_ENV = "PTMIG_TEST_HOLD"  # see the module docstring
HOLD_MAX_S = 120.0


class IncomingError(PtmigError, RuntimeError):
    pass


# What a failed attempt can raise; the destination then waits for the next source.
ATTEMPT_FAILURES = (IncomingError, ProtocolError, transport.TransportError, ValueError)
# Failures whose text is sent to the source in an Abort (the peer's own or our refusal).
REFUSALS = (IncomingError, RemoteProtocolError, ValueError)


def failure_before_commit(e: BaseException) -> str:
    """The Abort reason for a failure of this side's own (not a refusal) before its commit.
    Sending it is always safe there: this side knows it has not committed and, as it gives
    up, never will, so a source already in doubt may resume (without it, the source could
    only see the stream end and would have to stay unresolved)."""
    if isinstance(e, SystemExit | KeyboardInterrupt):
        what = "the destination VMM is stopping (terminated or interrupted)"
    else:
        what = f"the destination failed: {type(e).__name__}: {e}"
    return f"{what}; it did not commit and will not run the guest"


def hold_for_test(point: str) -> None:
    """Wait at `point` of the switchover if `PTMIG_TEST_HOLD` asks for it (module docstring)."""
    spec = os.environ.get(HOLD_ENV, "")
    where, _, path = spec.partition(":")
    if where != point or not path:
        return
    log.warning("%s: holding the switchover %s until %s is removed", HOLD_ENV, point, path)
    with open(path, "w"):
        pass
    deadline = time.monotonic() + HOLD_MAX_S
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def program_devices(machine: MigratingVm, devices: list[DeviceSnapshot]) -> None:
    """Program this host's fresh devices from the transferred state (checked for shape when it
    was unpacked). Whatever a device or the shadow restore still finds wrong with it (a
    rejected command, a ring that does not match the in-flight list) refuses the migration,
    naming the device.

    The devices are programmed at once, one thread each (this one takes the first): each is a
    round trip to another process (a device process, a vhost-user backend's few messages),
    on the downtime's clock, and on a busy host most of a round trip is waiting to be
    scheduled, so they overlap instead of adding up."""
    pairs = list(zip(machine.devices, devices, strict=True))
    failed: dict[str, BaseException] = {}

    def program(dev: AttachedDevice, snap: DeviceSnapshot) -> None:
        try:
            _program_device(machine, dev, snap)
        except BaseException as e:  # re-raised below, in this thread, naming the device
            failed[dev.id] = e

    helpers = [
        threading.Thread(target=program, args=pair, name=f"program-{pair[0].id}", daemon=True)
        for pair in pairs[1:]
    ]
    for t in helpers:
        t.start()
    if pairs:
        program(*pairs[0])
    for t in helpers:
        t.join()
    for dev, _ in pairs:
        e = failed.get(dev.id)
        if isinstance(e, DeviceError | ValueError):
            raise IncomingError(
                f"device {dev.id} rejected the migrated state: {type(e).__name__}: {e}"
            ) from e
        if e is not None:
            raise e


def _program_device(machine: MigratingVm, dev: AttachedDevice, snap: DeviceSnapshot) -> None:
    if snap.source == "shadow":
        from ..shadow.restore import restore_shadowed_device

        restore_shadowed_device(machine, dev, snap)
    else:
        dev.handle.set_state(snap.state.to_json())


def program_postcopy_devices(pd: PostcopyDevices, devices: list[DeviceSnapshot]) -> None:
    """`program_devices` for a post-copy switchover: each device quiesced first (it must not
    touch guest RAM before it is shadowed; see `postcopy_devices`)."""
    try:
        pd.program(devices)
    except (DeviceError, ValueError) as e:
        raise IncomingError(f"a device rejected the migrated state: {type(e).__name__}: {e}") from e


def prepare_guest_ram(machine: MigratingVm, prefault: bool) -> bool:
    """Take page allocation off the migration's clock; True if guest RAM is now mapped.

    The destination waits for the source anyway, and must hold the whole guest once it arrives,
    so it allocates and maps all of guest RAM up front (`GuestMemory.prefault`) instead of one
    page fault per 4 KiB while the pages stream in. Pages the source sends as zero runs are
    punched back into holes. Failure is not fatal: pages are then allocated as they arrive."""
    if not prefault:
        return False
    mem = machine.vm.memory
    t0 = time.monotonic()
    try:
        mapped = mem.prefault()
    except OSError as e:
        log.warning("could not prefault %d bytes of guest RAM: %s", mem.ram, e)
        return False
    log.info(
        "prefaulted %d MiB of guest RAM in %.0f ms%s",
        mem.ram >> 20,
        (time.monotonic() - t0) * 1000,
        "" if mapped else " (allocated, not mapped)",
    )
    return mapped


class SpliceReceiver:
    """Page payloads from a plain TCP socket into the guest memfd with splice(2), through a pipe.

    The kernel moves the bytes into the memfd's pages directly: no copy through this process's
    mapping, hence no page-table entry to populate per 4 KiB page (the dominant cost of
    `recv_into` on guest memory that is not mapped yet). Used when guest RAM could not be
    prefaulted; on prefaulted RAM a plain `recv_into` costs less CPU (no per-page trip through
    the memfd's write path). `fill(target)` writes one memoryview slice of guest memory (from
    `Connection.payload_targets`, so already validated) at the matching file offset."""

    PIPE_BYTES = 1 << 20
    _F_SETPIPE_SZ = 1031

    def __init__(self, ch: transport.Channel, mem_fd: int, mem_base: int) -> None:
        self.ch = ch
        self.sock_fd = ch.sock.fileno()
        self.mem_fd, self.mem_base = mem_fd, mem_base
        self.rfd, self.wfd = os.pipe2(os.O_CLOEXEC)
        try:
            self.pipe_bytes = fcntl.fcntl(self.wfd, self._F_SETPIPE_SZ, self.PIPE_BYTES)
        except OSError:
            self.pipe_bytes = 1 << 16  # the default size of a pipe

    def fill(self, target: memoryview) -> None:
        offset = np.frombuffer(target, dtype=np.uint8).ctypes.data - self.mem_base
        total = target.nbytes
        done = 0
        while done < total:
            k = self._from_socket(min(self.pipe_bytes, total - done), total, done)
            moved = 0
            while moved < k:
                moved += os.splice(
                    self.rfd, self.mem_fd, k - moved, offset_dst=offset + done + moved
                )
            done += k
            self.ch.note_received(k)

    def _from_socket(self, want: int, total: int, done: int) -> int:
        while True:
            try:
                k = os.splice(self.sock_fd, self.wfd, want, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                self._wait_readable(total, done)
                continue
            except OSError as e:
                raise transport.TransportError(
                    f"receiving {total} bytes (got {done}): connection to {self.ch.peer} "
                    f"failed: {e}"
                ) from e
            if k == 0:
                raise transport.TransportError(
                    f"peer {self.ch.peer} closed the connection after {done} of {total} bytes"
                )
            return k

    def _wait_readable(self, total: int, done: int) -> None:
        """Until the socket has data, within the channel's inactivity timeout (extended while
        the migration's other streams make progress, see `transport.Channel.patience`)."""
        wait = self.ch.inactivity_timeout
        while wait > 0:
            ready, _, _ = select.select([self.sock_fd], [], [], wait)
            if ready:
                return
            wait = self.ch.patience()
        raise transport.TransportError(
            f"receiving {total} bytes (got {done}): no progress from {self.ch.peer} "
            f"for {self.ch.inactivity_timeout} s (peer unresponsive)"
        )

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


class DataChannelReceiver:
    """One data channel of an incoming migration: a thread that receives its rounds straight
    into guest memory and reports, under `cond`, the last round it completed."""

    def __init__(
        self,
        incoming: Incoming,
        index: int,
        ch: transport.Channel,
        conn: Connection,
        splicer: SpliceReceiver | None,
        cond: threading.Condition,
    ) -> None:
        self.incoming, self.index, self.ch, self.conn = incoming, index, ch, conn
        self.splicer, self.cond = splicer, cond
        self.rounds_done = -1
        self.closed = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"incoming-data-{index}", daemon=True)

    def _run(self) -> None:
        background.lower_this_thread()  # data channels carry pre-copy rounds only
        try:
            while True:
                ev = self.incoming._recv_event(self.ch, self.conn, self.splicer)
                if isinstance(ev, PageRunsHeader):
                    self.incoming._pages_arrived(ev.runs)
                elif isinstance(ev, RoundEnd):
                    with self.cond:
                        self.rounds_done = ev.round
                        self.cond.notify_all()
                elif isinstance(ev, ConnectionClosed):
                    return
                elif not isinstance(ev, RoundStart):  # the protocol allows nothing else
                    raise IncomingError(f"unexpected {type(ev).__name__} on a data channel")
        except Exception as e:
            self.error = e
            self.incoming._data_channel_failed(self)
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def describe_lag(self, rnd: int) -> str | None:
        """Why this channel will never complete round `rnd` (None: it still may)."""
        if self.error is not None:
            return f"data channel {self.index} failed: {self.error}"
        if self.closed and self.rounds_done < rnd:
            return (
                f"data channel {self.index} ended after round {self.rounds_done}, "
                f"before round {rnd}"
            )
        return None

    def close(self) -> None:
        self.ch.close()
        self.thread.join(timeout=5)
        if self.splicer is not None and not self.thread.is_alive():
            self.splicer.close()


class Incoming:
    def __init__(
        self,
        machine: MigratingVm,
        uri: str,
        *,
        psk: bytes | None = None,
        tls: transport.TlsConfig | None = None,
        insecure: bool = False,
        prefault: bool = True,
        incoming_timeout: float | None = None,
    ) -> None:
        """`prefault`: allocate and map all guest RAM before accepting (`prepare_guest_ram`).
        `incoming_timeout`: seconds to wait for a valid source (None: no limit)."""
        self.m = machine
        self.prefault = prefault
        self.incoming_timeout = incoming_timeout
        self.address = transport.parse_address(uri)  # port 0: any free port
        self.listener = transport.listen_at(self.address, tls=tls, psk=psk, insecure=insecure)
        self._credentials = (tls, psk, insecure)  # a post-copy recovery listens with the same
        self.rejected: list[str] = []  # why each failed attempt was refused, in order
        self.verify: dict[str, Any] | None = None
        self.digests: np.ndarray | None = None  # per page, as received (x-verify)
        self.started_at: float | None = None
        self.pages_received = 0
        self.data_channels: list[DataChannelReceiver] = []
        self._data_cond = threading.Condition()
        self._mapped = False
        self.activity = transport.SharedActivity()  # one watchdog for all streams (see there)
        self._main: transport.Channel | None = None
        self._failure: str | None = None  # the first data channel failure
        self._scratch = threading.local()  # `_gather`'s receive buffer, per thread
        self.ownership = GuestOwnership(Role.DESTINATION)
        # Per page: may hold data (see `_punch_zero_runs`); None: unknown, every zero run is
        # punched. Kept across attempts: a failed attempt's pages stay marked.
        self._maybe_data: np.ndarray | None = None
        self.postcopy_start: PostcopyStart | None = None
        self.postcopy: PostcopyReceiver | None = None  # once a post-copy switchover began
        self.postcopy_devices: PostcopyDevices | None = None  # its devices, if the VM has any
        # With post-copy offered: which pages arrived as zero pages (holes in the memfd), so
        # that arming knows them without scanning the memfd inside the downtime.
        self.zero_received: np.ndarray | None = None
        self._committing = False  # the commit point has begun: a stop request must wait
        self.cpu = MigrationMeter(machine.vm.vcpu_thread_ids)  # Hello to the switchover's ack
        self.fates = Fates()  # every migration id this process saw, and the one it committed
        self.migration_id: str | None = None  # the current attempt's (its Hello's)
        self.fate_server: FateServer | None = None  # once the guest runs here
        self.deferred_stop: int | None = None  # the signal of a stop request that waits
        self.discarded: np.ndarray | None = None  # pages PostcopyDiscard made missing
        # Its fault server, opened at PostcopyDiscard (out of the downtime) and armed at the
        # switchover, when it becomes `postcopy`.
        self.postcopy_early: PostcopyReceiver | None = None
        # Post-copy recovery (see `recovery`): the source's session token, this side's phase,
        # the stream post-copy pages arrive on (migrate-pause breaks it), the recovery listener.
        self.session: str | None = None
        self.recovery = Recovery()
        self._postcopy_ch: transport.Channel | None = None
        self._recover_listener: transport.Listener | None = None
        self._pause_asked = False
        # migrate-pause against the end of post-copy: a pause either breaks the stream the
        # pages arrive on or is refused because every page is installed, never accepted and
        # then ignored (taken around the pause and around the receiver's start and end)
        self._pause_lock = threading.Lock()

    def defer_stop(self, signum: int) -> bool:
        """A stop request (signal `signum`) arrived while the guest is on its way here: False
        if the caller may unwind at once (nothing committed: the source is told to resume),
        True if it must wait because the commit point has begun. Called from the signal
        handler, in the thread that runs `receive`, between two of its bytecodes, so
        `_committing` cannot change under it."""
        if not self._committing:
            return False
        self.deferred_stop = signum
        log.warning(
            "stop requested (signal %d) during the switchover, after the commit point began: "
            "the guest starts here as committed, then stops like any running VM",
            signum,
        )
        return True

    def receive(self) -> None:
        """Wait for a source and run its migration to the switchover; the guest runs on return.

        A connection that fails before the guest runs here — authentication, garbage, silence,
        a refused Hello or state, a source that gives up — is closed, logged and reported
        (`X_MIGRATION_REJECTED`), and the destination waits for the next one until
        `incoming_timeout` (None: for ever). Each attempt sends all of RAM again (round 0
        covers every page), so nothing of a failed one survives into the guest."""
        m = self.m
        vm = m.vm
        # Pages with data before any arrives (anything allocated now); the rest read as zero,
        # also once prefaulted.
        self._maybe_data = vm.memory.allocated()
        # 'inmigrate' once RAM is ready: a management layer waiting for it then knows the
        # prefaulting is over (it would otherwise compete with whatever runs next).
        self._mapped = prepare_guest_ram(m, self.prefault)
        vm._set_state(RunState.INMIGRATE)
        # vCPU threads start parked (a VM's vCPUs wait until it is started); creating them now
        # keeps thread start-up, which a busy host can stretch to tens of ms, out of the downtime.
        for v in vm.vcpus:
            if v.thread.ident is None:
                v.start()
        log.info(
            "waiting for an incoming migration on %s (port %d)", self.address, self.listener.port
        )
        deadline = (
            None if self.incoming_timeout is None else time.monotonic() + self.incoming_timeout
        )
        try:
            while True:
                ch = self._accept_source(deadline, f"{self.incoming_timeout} s")
                try:
                    if self._attempt(ch):
                        break
                except ATTEMPT_FAILURES as e:
                    if vm.state is not RunState.INMIGRATE:
                        raise  # the guest ran here: this migration is over either way
                    self._rejected(ch.peer, f"{type(e).__name__}: {e}")
                    if self.deferred_stop is not None:  # the commit failed: stop now
                        raise SystemExit(128 + self.deferred_stop) from e
                self._reset_attempt()
        except BaseException:
            self.listener.close()
            raise
        # The guest runs here: the listener answers fate queries from now on (see `fate`).
        self.fate_server = FateServer(self.listener, self.fates)

    def close(self) -> None:
        """Stop answering fate queries and release the listener."""
        if self.fate_server is not None:
            self.fate_server.close()
        self.listener.close()

    def _accept_source(
        self,
        deadline: float | None,
        allowed: str,
        what: str = "incoming migration",
        listener: transport.Listener | None = None,
    ) -> transport.Channel:
        """The next connection that authenticates (on `listener`, by default the incoming
        one); failed ones are reported and skipped. `allowed` names the limit `deadline`
        stands for, for the error."""
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                refused = f" ({len(self.rejected)} refused)" if self.rejected else ""
                raise transport.TransportError(f"no valid {what} within {allowed}{refused}")
            try:
                return (listener or self.listener).accept(timeout=left)
            except transport.AuthenticationError as e:
                self._rejected("a connection", str(e))
            except transport.TransportError:
                if deadline is None or time.monotonic() < deadline:
                    raise  # the time is up: the check above says so, with the whole story

    def _rejected(self, peer: str, reason: str) -> None:
        """A peer's attempt failed: log it, tell the management layer, keep waiting."""
        log.warning("rejected an incoming migration from %s: %s", peer, reason)
        if self.m.qmp is not None:
            self.m.qmp.emit("X_MIGRATION_REJECTED", {"peer": peer, "reason": reason[:MAX_REASON]})
        self.rejected.append(reason)

    def _reset_attempt(self) -> None:
        self.migration_id = None  # (`Fates` remembers it: its attempt ended uncommitted)
        self.listener.sessions.clear()  # no data channel may join a refused attempt's session
        self.data_channels = []
        self.digests = None
        self.pages_received = 0
        self.activity = transport.SharedActivity()
        self._main = None
        self._failure = None
        self.postcopy_start = None
        self.zero_received = None
        if self.postcopy_devices is not None:  # programmed (quiesced), the guest never ran
            self.postcopy_devices.reset()
            self.postcopy_devices = None
        self.discarded = None
        for pc in (self.postcopy, self.postcopy_early):
            if pc is not None:  # opened or armed, but the guest never ran here
                self.m.vm.memory.presence = None
                pc.finish()
        self.postcopy = self.postcopy_early = None

    def _attempt(self, ch: transport.Channel) -> bool:
        """One source's migration on its main stream `ch`, to the switchover: True once the
        guest runs here, False if the connection only asked a migration's fate."""
        ch.activity = self.activity
        self.activity.touch()  # the watchdog starts with the migration, not with the wait for it
        self._main = ch
        conn = self._connection()
        splicer = self._splicer(ch)
        try:
            return self._converse(ch, conn, splicer)
        except BaseException as e:
            why = self._failure or (str(e) if isinstance(e, REFUSALS) else None)
            if why is None and not self.ownership.runs_here:
                why = failure_before_commit(e)
            if why is not None:
                self._abort_to_source(ch, conn, why)
            if self._failure is not None and not isinstance(e, IncomingError):
                raise IncomingError(self._failure) from e  # the cause, not its echo on this stream
            raise
        finally:
            for d in self.data_channels:
                d.close()
            ch.close()
            if splicer is not None:
                splicer.close()

    def _converse(
        self, ch: transport.Channel, conn: Connection, splicer: SpliceReceiver | None
    ) -> bool:
        """The main stream's conversation, from the Hello to the switchover (and verify):
        True once the guest runs here, False after answering a fate query."""
        m = self.m
        vm = m.vm
        vcpus: list[VcpuState] | None = None
        devices: list[DeviceSnapshot] | None = None
        rnd = -1
        while True:
            ev = self._recv_event(ch, conn, splicer)
            if isinstance(ev, Hello):
                asked = capability_id(ev, FATE_CAPABILITY)
                if asked is not None:
                    transport.send_event(ch, conn, self.fates.answer(asked))
                    return False
                self.cpu.start()
                ack = self._check_hello(ev)
                transport.send_event(ch, conn, ack)
                if not ack.accepted:
                    raise IncomingError(f"refused the migration: {ack.reason}")
                if POSTCOPY_CAPABILITY in ev.capabilities:
                    self.zero_received = np.zeros(vm.memory.npages, dtype=bool)
                    self.session = session_token(ev)
                if VERIFY_CAPABILITY in ev.capabilities:
                    self.digests = np.full(vm.memory.npages, ZERO_PAGE_DIGEST, np.uint64)
                    native_library()  # loaded (or built) now, not by the first batch's receiver
                self._accept_data_channels(ev)
            elif isinstance(ev, PageRunsHeader):
                self._pages_arrived(ev.runs)
            elif isinstance(ev, RoundStart):
                # Nothing of this round may land before the data channels' previous round.
                rnd = ev.round
                self._await_data_rounds(rnd - 1)
            elif isinstance(ev, RoundEnd):
                pass
            elif isinstance(ev, VcpuStates):
                vcpus = unpack_vcpus(ev.blob, len(vm.vcpus))
            elif isinstance(ev, DeviceStates):
                devices = unpack_devices(ev.blob, [d.id for d in m.devices])
            elif isinstance(ev, PostcopyStart):
                if self.zero_received is None:  # set at a Hello that offered post-copy
                    raise IncomingError(
                        f"PostcopyStart from a source whose Hello did not offer "
                        f"{POSTCOPY_CAPABILITY}"
                    )
                self.postcopy_start = ev
            elif isinstance(ev, PostcopyDiscard):
                self._discard_early(ch, conn, ev, rnd)
            elif isinstance(ev, Complete):
                if vcpus is None or devices is None:
                    raise IncomingError("Complete arrived before the vCPU and device state")
                # (a plain switchover's last round, the stop-and-copy one, is on this stream;
                # a post-copy switchover has none)
                self._finish_data_channels(rnd if self.postcopy_start is not None else rnd - 1)
                armed: dict[str, float] | None = None
                if self.postcopy_start is not None:
                    armed = self._arm_postcopy(self.postcopy_start)
                self._switchover(ch, conn, vcpus, devices, armed)
                if self.postcopy is not None:
                    self.postcopy.report.guest_started_at = self.started_at
                if self.postcopy is not None and not self._run_postcopy(ch, conn):
                    return True  # paused: the source keeps the pages we lack
                if self.digests is not None:
                    self._verify_after_switchover(ch, conn, splicer)
                return True
            elif isinstance(ev, Abort):
                raise IncomingError(f"the source aborted the migration: {ev.reason}")
            elif isinstance(ev, ConnectionClosed):
                raise IncomingError("the source closed the connection before completing")
            else:
                raise IncomingError(f"unexpected event {type(ev).__name__}")

    def _check_hello(self, h: Hello) -> HelloAck:
        """A migration's Hello: the same VM, a protocol we speak, and a migration id not seen
        before (its fate may have been answered already)."""
        ack = check_hello(h, self.m.cfg.compat_fingerprint())
        if not ack.accepted:
            return ack
        self.migration_id = capability_id(h, MIGRATION_ID_CAPABILITY)
        if self.migration_id is not None:
            try:
                self.fates.begin(self.migration_id)
            except ValueError as e:
                self.migration_id = None
                return HelloAck(False, str(e))
        return ack

    def _discard_early(
        self, ch: transport.Channel, conn: Connection, ev: PostcopyDiscard, rnd: int
    ) -> None:
        """The source will switch to post-copy: make the pages it names missing now, while its
        guest still runs (outside the downtime), once no page of the last round can land."""
        if self.zero_received is None:  # set at a Hello that offered post-copy
            raise IncomingError(
                f"PostcopyDiscard from a source whose Hello did not offer {POSTCOPY_CAPABILITY}"
            )
        self._finish_data_channels(rnd)
        mem = self.m.vm.memory
        discarded = pending_pages(ev.pending, mem.npages)
        punch_pages(discarded, mem.punch_zero)
        self.discarded = discarded
        early = PostcopyReceiver(mem.view, mem.host_address, mem.npages)
        try:
            early.open_early(discarded, self._allocated())
        except (FaultServerError, PostcopyError, OSError) as e:
            raise IncomingError(f"cannot start post-copy here: {e}") from None
        self.postcopy_early = early
        # a VMM access to a discarded page is refused from now on, not read as a zero page
        mem.presence = early.presence
        if self.m.devices:
            # Shadowing's modules load now, while the guest still runs on the source: loading
            # them at the switchover took 27-29 ms of a 37-41 ms downtime (kv guest, NIC and
            # disk; `x-switchover-ms` postcopy-arm devices-setup).
            from . import postcopy_devices  # noqa: F401
        transport.send_event(ch, conn, PostcopyDiscarded())

    def _allocated(self) -> np.ndarray:
        """The pages that hold data in the memfd (the others are holes: zero pages)."""
        if self.zero_received is not None:  # known without scanning the memfd
            return ~self.zero_received
        return self.m.vm.memory.allocated()

    def _arm_postcopy(self, start: PostcopyStart) -> dict[str, float]:
        """Before the vCPUs run: the pages the source still has become missing, and guest RAM
        is served by the fault server (see `postcopy`). Returns its phases' ms."""
        t0 = time.monotonic()
        if self.m.devices:
            # (loaded at PostcopyDiscard already, unless the source sent none)
            from .postcopy_devices import PostcopyDevices

            self.postcopy_devices = PostcopyDevices(self.m)
        t1 = time.monotonic()
        mem = self.m.vm.memory
        pc = self.postcopy_early or PostcopyReceiver(mem.view, mem.host_address, mem.npages)
        self.postcopy, self.postcopy_early = pc, None
        try:
            pc.arm(start, self._allocated(), mem.punch_zero, self.discarded)
        except (FaultServerError, PostcopyError, OSError) as e:
            # refused: the source resumes the guest
            raise IncomingError(f"cannot start post-copy here: {e}") from None
        mem.presence = pc.presence
        t2 = time.monotonic()
        return {"devices-setup": round((t1 - t0) * 1000, 2), "mark": round((t2 - t1) * 1000, 2)}

    def _run_postcopy(self, ch: transport.Channel, conn: Connection) -> bool:
        """The guest runs: receive the pending pages until the last one. A broken link pauses
        the guest here (False); nothing missing is ever zero-filled."""
        pc = self.postcopy
        assert pc is not None and pc.server is not None
        # its fetcher runs since the switchover; the devices' data plane fetches through it
        if self.postcopy_devices is not None:
            self.postcopy_devices.start(pc.server, lambda: pc.report.status == "postcopy-active")
        return self._receive_postcopy(ch, conn)

    def _receive_postcopy(self, ch: transport.Channel, conn: Connection) -> bool:
        pc = self.postcopy
        assert pc is not None
        with self._pause_lock:
            self._postcopy_ch = ch
            if self._pause_asked:  # asked between the switchover (or resume) and now
                ch.abort()
        try:
            pc.receive(ch, conn, self._postcopy_pages)
            hold_for_test("postcopy-end")
            self._end_postcopy_unless_paused()
        except (transport.TransportError, ProtocolError, PostcopyError, OSError) as e:
            self._postcopy_lost(f"{type(e).__name__}: {e}")
            return False
        finally:
            self._postcopy_ch = None
        if self.postcopy_devices is not None:  # before the fault server goes
            self.postcopy_devices.finish()
        self.m.vm.memory.presence = None
        pc.finish()
        log.info("post-copy: completed, %d pages installed", pc.report.pending_pages)
        hold_for_test("postcopy-done")
        self._confirm_postcopy_done(ch, conn)
        return True

    def _end_postcopy_unless_paused(self) -> None:
        """Every page is installed: post-copy is done from here on (a later migrate-pause is
        refused), unless a migrate-pause came first. That pause was accepted and broke the
        stream, so the source cannot be told: it is honoured (raises), and a recovery then
        finds nothing missing and ends post-copy at once."""
        with self._pause_lock:
            self._postcopy_ch = None
            if self._pause_asked:
                raise transport.TransportError(
                    "every page was installed, but the stream was broken before the source was told"
                )
            self.recovery.handle(Step.DONE)

    def _confirm_postcopy_done(self, ch: transport.Channel, conn: Connection) -> None:
        """Tell the source it may close (see `postcopy.await_done`). Every page is here, so a
        link that breaks now costs nothing on this side: the source, which cannot tell, stays
        postcopy-paused and never runs the guest again."""
        try:
            transport.send_event(ch, conn, PostcopyDone())
        except (transport.TransportError, OSError) as e:
            log.warning("post-copy: completed here, but the source was not told (%s)", e)

    def _postcopy_lost(self, why: str) -> None:
        """The link broke (or migrate-pause broke it): pause the guest, keep every page and the
        fault server; `recover_postcopy` can take it up again."""
        pc = self.postcopy
        assert pc is not None
        step = Step.PAUSE if self._pause_asked else Step.LINK_LOST
        if self._pause_asked:
            why = f"migrate-pause ({why})"
        self._pause_asked = False
        self.recovery.handle(step)
        if self.m.vm.state is RunState.RUNNING:
            self.m.vm.pause()
        pc.paused(why)
        log.error(
            "post-copy: the link to the source broke (%s); the guest is paused here with "
            "%d pages missing, the source keeps them (recover with migrate-recover)",
            why,
            pc.report.stats.missing if pc.report.stats else -1,
        )

    # --- post-copy recovery (see `recovery`) --------------------------------------------------

    def pause_postcopy(self) -> None:
        """`migrate-pause`: break the post-copy link (or stop listening for a resume); refused
        once every page is installed (`_end_postcopy_unless_paused`)."""
        with self._pause_lock:
            if self.postcopy is None or not self.recovery.allowed(Step.PAUSE):
                raise RecoveryError(f"migrate-pause: post-copy is {self.recovery.phase.value}")
            self._pause_asked = True
            if self._postcopy_ch is not None:
                self._postcopy_ch.abort()
            if self._recover_listener is not None:
                self._recover_listener.close()

    def recover_postcopy(self, uri: str) -> int:
        """`migrate-recover`: listen on `uri` (same credentials as the first connection) for
        the source's `migrate resume:true`; returns the port. The resume runs in a thread."""
        if self.postcopy is None or not self.recovery.allowed(Step.RECOVER):
            raise RecoveryError(f"migrate-recover: post-copy is {self.recovery.phase.value}")
        tls, psk, insecure = self._credentials
        listener = transport.listen_at(
            transport.parse_address(uri), tls=tls, psk=psk, insecure=insecure
        )
        self.recovery.handle(Step.RECOVER)
        self.postcopy.report.status = self.recovery.phase.value
        self._recover_listener = listener
        threading.Thread(
            target=self._recover, args=(listener,), name="postcopy-recover", daemon=True
        ).start()
        return listener.port

    def _recover(self, listener: transport.Listener) -> None:
        """Accept the source's resume (strangers are refused and reported), exchange the
        received bitmap, resume the guest, receive the rest; a failure pauses again."""
        try:
            while True:
                ch = self._accept_source(None, "no limit", "post-copy resume", listener)
                conn = Connection(
                    Role.DESTINATION, guest_pages=self.m.vm.memory.npages, resume=True
                )
                try:
                    self._resume_handshake(ch, conn)
                    break
                except (RecoveryError, ProtocolError, transport.TransportError, OSError) as e:
                    self._rejected(ch.peer, f"{type(e).__name__}: {e}")  # listen on
                    ch.close()
        except (transport.TransportError, ProtocolError, OSError) as e:
            self._recover_listener = None
            listener.close()
            self._postcopy_lost(f"{type(e).__name__}: {e}")
            return
        self._recover_listener = None
        listener.close()
        if self.postcopy_devices is not None and self.postcopy is not None:
            assert self.postcopy.server is not None  # kept while paused
            self.postcopy_devices.retry(self.postcopy.server)  # if the break stopped their entry
        try:
            if self._receive_postcopy(ch, conn) and self.digests is not None:
                self._verify_after_switchover(ch, conn, None)
        finally:
            ch.close()

    def _resume_handshake(self, ch: transport.Channel, conn: Connection) -> None:
        """Hello (this migration's session token) -> HelloAck -> our received bitmap."""
        ev = transport.recv_event(ch, conn)
        if not isinstance(ev, Hello):
            raise RecoveryError(f"a resume must start with a Hello, got {type(ev).__name__}")
        ack = check_hello(ev, self.m.cfg.compat_fingerprint())
        token = session_token(ev) if ack.accepted else None
        if ack.accepted and (
            self.session is None or token is None or not compare_digest(token, self.session)
        ):
            ack = HelloAck(False, "this is not the source of the paused post-copy migration")
        transport.send_event(ch, conn, ack)
        if not ack.accepted:
            raise RecoveryError(f"refused a post-copy resume: {ack.reason}")
        if self._pause_asked:  # migrate-pause while this source was being accepted
            raise RecoveryError("migrate-pause during the resume handshake")
        pc = self.postcopy
        assert pc is not None and pc.server is not None
        states = pc.server.states()
        transport.send_event(ch, conn, PostcopyReceived(received_bitmap(states)))
        pc.resumed(ch, conn, requested_pages(states))
        self.recovery.handle(Step.RESUMED)
        self.m.vm.resume()
        log.info("post-copy: resumed with %s", ch.peer)

    def _postcopy_pages(self, first: int, npages: int, data: bytes) -> None:
        with self._data_cond:
            self.pages_received += npages
        if self.digests is not None:
            if data:
                self.digests[first : first + npages] = page_digests(
                    np.frombuffer(data, dtype=np.uint8)
                )
            else:
                self.digests[first : first + npages] = ZERO_PAGE_DIGEST

    def _abort_to_source(self, ch: transport.Channel, conn: Connection, reason: str) -> None:
        """Best effort: tell the source why this side gives up, so that its error says more
        than "connection closed". Nothing is sent where the protocol allows no Abort (refused,
        aborted, switched over) or the stream itself failed."""
        try:
            transport.send_event(ch, conn, Abort(reason[: MAX_REASON // 4]))
        except (ProtocolError, transport.TransportError):
            pass

    def _data_channel_failed(self, d: DataChannelReceiver) -> None:
        """A data channel failed, so the migration cannot complete: record the first such
        failure and wake the main stream's receive, so that the main thread gives up now and
        tells the source why (see `receive`) instead of waiting for the source's next frame."""
        with self._data_cond:
            if self._failure is None:
                self._failure = f"data channel {d.index} failed: {d.error}"
        if self._main is not None:
            self._main.interrupt_receive()

    def _connection(self, *, data_channel: bool = False) -> Connection:
        mem = self.m.vm.memory
        return Connection(
            Role.DESTINATION,
            guest_pages=mem.npages,
            zero_filler=self._punch_zero_runs,
            data_channel=data_channel,
            ram_holes=mem.holes(),
        )

    def _splicer(self, ch: transport.Channel) -> SpliceReceiver | None:
        """A splice receiver where it beats `recv_into` (guest RAM not mapped, plain TCP)."""
        if self._mapped or ch.is_tls or ch.sealed or not hasattr(os, "splice"):
            return None
        mem = self.m.vm.memory
        return SpliceReceiver(ch, mem.fd, mem.host_address)

    def _accept_data_channels(self, hello: Hello) -> None:
        """Accept the data channels the source's Hello announced, each authenticated by the
        transport and naming this migration's token and a free channel index in its Hello."""
        request = parse_channel_capability(hello, DATA_CHANNELS_OFFER_CAPABILITY)
        if request is None:
            return
        n, token = request
        slots: list[DataChannelReceiver | None] = [None] * n
        deadline = time.monotonic() + DATA_CHANNEL_ACCEPT_S
        for _ in range(n):
            ch = self._accept_source(deadline, f"{DATA_CHANNEL_ACCEPT_S} s", "data channel")
            try:
                conn = self._connection(data_channel=True)
                index = self._data_channel_hello(ch, conn, token, slots)
            except BaseException:
                ch.close()
                raise
            ch.activity = self.activity
            slots[index] = DataChannelReceiver(
                self, index, ch, conn, self._splicer(ch), self._data_cond
            )
        self.data_channels = [d for d in slots if d is not None]
        for d in self.data_channels:
            d.thread.start()

    def _data_channel_hello(
        self,
        ch: transport.Channel,
        conn: Connection,
        token: str,
        slots: list[DataChannelReceiver | None],
    ) -> int:
        """Check a data channel's Hello and acknowledge it; returns its channel index."""
        ev = self._recv_event(ch, conn, None)
        if not isinstance(ev, Hello):
            raise IncomingError(f"a data channel began with {type(ev).__name__}, not Hello")
        got = parse_channel_capability(ev, DATA_CHANNEL_JOIN_CAPABILITY)
        ack = check_hello(ev, self.m.cfg.compat_fingerprint())
        main = self._main
        if got is None or not compare_digest(got[1], token):
            ack = HelloAck(False, "data channel without this migration's token")
        elif (
            main is not None
            and main.session is not None
            and (ch.session != main.session or ch.stream != got[0] + 1)
        ):
            ack = HelloAck(
                False,
                f"data channel {got[0]} did not join this migration's "
                f"PSK session as that channel (stream {ch.stream})",
            )
        elif got[0] >= len(slots) or slots[got[0]] is not None:
            ack = HelloAck(False, f"data channel index {got[0]} is not a free one of {len(slots)}")
        transport.send_event(ch, conn, ack)
        if not ack.accepted or got is None:
            raise IncomingError(f"refused a data channel: {ack.reason}")
        return got[0]

    def _await_data_rounds(self, rnd: int) -> None:
        """Wait until every data channel has completed round `rnd` (a channel that failed or
        ended early fails the migration; a silent one times out in its own receive)."""
        with self._data_cond:
            while lagging := [d for d in self.data_channels if d.rounds_done < rnd]:
                for d in lagging:
                    if (why := d.describe_lag(rnd)) is not None:
                        raise IncomingError(why)
                self._data_cond.wait(1.0)

    def _finish_data_channels(self, last_round: int) -> None:
        """Before the switchover: every data channel ended cleanly after exactly the last
        pre-copy round, so no page can still arrive once the guest runs."""
        self._await_data_rounds(last_round)
        with self._data_cond:
            while open_ := [d for d in self.data_channels if not d.closed]:
                if (why := open_[0].describe_lag(last_round)) is not None:
                    raise IncomingError(why)
                self._data_cond.wait(1.0)
        for d in self.data_channels:
            if d.error is not None:
                raise IncomingError(f"data channel {d.index} failed: {d.error}")
            if d.rounds_done != last_round:
                raise IncomingError(
                    f"data channel {d.index} ended after round {d.rounds_done}, "
                    f"not after the last pre-copy round {last_round}"
                )

    def _pages_arrived(self, runs: np.ndarray) -> None:
        """Bookkeeping of one received batch (main stream or a data channel's thread)."""
        n = int(runs["npages"].sum())
        with self._data_cond:
            self.pages_received += n
        if self.digests is not None:
            self._digest_runs(runs)  # distinct pages per stream: no lock needed
        if self.zero_received is not None:  # (distinct pages per stream here too)
            zero = runs["kind"] == RunKind.ZERO
            self.zero_received[expand_runs(runs[zero])] = True
            self.zero_received[expand_runs(runs[~zero])] = False

    def _recv_event(
        self, ch: transport.Channel, conn: Connection, splicer: SpliceReceiver | None
    ) -> Any:
        """`transport.recv_event`, with page payloads received straight into guest memory
        (`recv_into` its mapping, or spliced into its memfd). Reads of frame headers are kept
        small, so that little payload takes the detour through the protocol's buffer."""
        fill = ch.recv_into_exact if splicer is None else splicer.fill
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                data = ch.recv(RECV_CHUNK)
                if not data and self._failure is not None:
                    raise IncomingError(self._failure)  # see `_data_channel_failed`
                conn.receive_data(data)
                continue
            if isinstance(ev, PageRunsHeader):
                targets = conn.payload_targets(self.m.vm.memory.view)
                if splicer is None and len(targets) >= GATHER_MIN_RUNS:
                    self._gather(ch, conn, targets, ev.runs)
                else:
                    for target in targets:
                        fill(target)
                        conn.payload_received(target.nbytes)
            return ev

    def _gather(
        self,
        ch: transport.Channel,
        conn: Connection,
        targets: list[memoryview],
        runs: np.ndarray,
    ) -> None:
        """Many small runs (scattered pages, as in a stop-and-copy round): one receive of the
        whole payload into a scratch buffer, then one scatter into guest RAM, instead of a
        receive call per run -- on the downtime's clock, system calls are what costs.

        `targets` are the slices of the batch's DATA runs (`runs`) still to be filled: the
        first may be the tail of a run whose head was already buffered, the others are the
        last runs whole; those are scattered page by page by numpy (one Python-level copy per
        run cost more than the copies themselves: ~2.4 µs per 4 KiB page)."""
        total = conn.payload_pending  # the targets' bytes
        buf = getattr(self._scratch, "buf", None)  # one per receiving thread (data channels)
        if buf is None or len(buf) < total:
            buf = self._scratch.buf = bytearray(total)
        with memoryview(buf) as scratch:
            ch.recv_into_exact(scratch[:total])
            head = targets[0].nbytes
            targets[0][:] = scratch[:head]
        data = runs[runs["kind"] == RunKind.DATA]
        pages = expand_runs(data[data.size - (len(targets) - 1) :]) if len(targets) > 1 else None
        if pages is not None and pages.size * PAGE_SIZE == total - head:
            src = np.frombuffer(buf, np.uint8, count=total - head, offset=head)
            if self.digests is not None:
                # hashed as they are placed (their bytes in the cache): `_digest_runs` leaves
                # out this batch's last `pages.size` pages
                self.digests[pages] = scatter_pages(self.m.vm.memory.view, pages, src)
                self._scratch.hashed = (runs, pages.size)
            else:
                ram = np.frombuffer(self.m.vm.memory.view, np.uint8).reshape(-1, PAGE_SIZE)
                ram[pages] = src.reshape(-1, PAGE_SIZE)
            del src  # (the scratch buffer may be replaced by a larger one next time)
        else:
            with memoryview(buf) as scratch:
                pos = head
                for t in targets[1:]:
                    t[:] = scratch[pos : pos + t.nbytes]
                    pos += t.nbytes
        conn.payload_received(total)

    def _digest_runs(self, runs: np.ndarray) -> None:
        """Keep the digest of every page as received: the destination's RAM changes only by
        received pages until its guest runs, so these are the digests of its RAM at resume."""
        assert self.digests is not None
        zero = runs["kind"] == RunKind.ZERO
        self.digests[expand_runs(runs[zero])] = ZERO_PAGE_DIGEST
        pages = expand_runs(runs[~zero])  # all the batch's pages in one pass, not one per run
        hashed = getattr(self._scratch, "hashed", None)  # by `_gather`, for this very batch
        if hashed is not None:
            self._scratch.hashed = None
            if hashed[0] is runs:
                pages = pages[: pages.size - hashed[1]]
        self.digests[pages] = page_digests_at(self.m.vm.memory.view, pages)

    def _verify_after_switchover(
        self, ch: transport.Channel, conn: Connection, splicer: SpliceReceiver | None
    ) -> None:
        """The guest already runs: compare the source's digests of its RAM at the stop with
        ours of the RAM we resumed, and report. A failure here loses only the check."""
        assert self.digests is not None
        try:
            parts: list[np.ndarray] = []
            while sum(p.shape[0] for p in parts) < self.digests.shape[0]:
                ev = self._recv_event(ch, conn, splicer)
                if not isinstance(ev, VerifyDigests):
                    raise IncomingError(f"expected verification digests, got {type(ev).__name__}")
                parts.append(digests_from_bytes(ev.digests))
            source = np.concatenate(parts)
            res = compare_digests(source, self.digests)
            self.verify = {
                "pages": res.pages,
                "mismatched": res.mismatched,
                "first-mismatched": [int(p) for p in res.first_mismatched],
            }
            if res.mismatched:
                log.error(
                    "verification: %d of %d pages differ (first %s)",
                    res.mismatched,
                    res.pages,
                    self.verify["first-mismatched"],
                )
            transport.send_event(
                ch,
                conn,
                VerifyReport(
                    res.pages, res.mismatched, tuple(int(p) for p in res.first_mismatched)
                ),
            )
        except Exception as e:
            log.error("verification after the switchover failed: %s", e)

    def _commit(self, ch: transport.Channel, conn: Connection) -> None:
        """The commit point: take the disk locks, or refuse the switchover (the source then
        resumes, its locks back). Past this, the guest runs here. From its first line on, a
        stop request waits (`defer_stop`)."""
        hold_for_test("before-commit")
        self._committing = True
        try:
            self.m.disk_locks.acquire(record=False)  # the records wait for the guest to run
        except DiskLockError as e:
            self._committing = False
            reason = f"cannot take the disk locks: {e}"
            try:
                transport.send_event(ch, conn, SwitchoverAck(False, reason[: MAX_REASON // 4]))
            except (ProtocolError, transport.TransportError):
                pass
            raise IncomingError(f"refused the switchover: {reason}") from None
        self.ownership.handle(Commit())
        self.fates.commit(self.migration_id)

    def _punch_zero_runs(self, mem: memoryview, runs: np.ndarray) -> None:
        """ZERO runs become holes in the guest memfd: nothing is written or allocated.

        Only pages that may hold data are punched (`_maybe_data`): the others -- holes, or
        prefaulted and not written since -- read as zero already, and punching a prefaulted
        page would only free it for the guest to fault back in (the whole of RAM, page by page,
        in a first round full of zero pages). A DATA run marks its pages here, before any of
        its payload lands, so a payload cut short (a failed attempt) leaves them marked."""
        zero = runs["kind"] == RunKind.ZERO
        sel = runs[zero]
        maybe = self._maybe_data
        if maybe is not None:
            maybe[expand_runs(runs[~zero])] = True
            if not sel.size:
                return
            zpages = expand_runs(sel)
            zpages = zpages[maybe[zpages]]
            sel = pages_to_runs(zpages)
        for start, n in zip(sel["start"].tolist(), sel["npages"].tolist(), strict=True):
            self.m.vm.memory.punch_zero(start, n)
            if maybe is not None:
                maybe[start : start + n] = False

    def _switchover(
        self,
        ch: transport.Channel,
        conn: Connection,
        vcpus: list[VcpuState],
        devices: list[DeviceSnapshot],
        postcopy_arm: dict[str, float] | None = None,
    ) -> None:
        vm = self.m.vm
        report: dict[str, Any] = {}
        t1 = time.monotonic()
        try:
            vm.restore_vcpus(vcpus)
        except OSError as e:
            raise IncomingError(f"KVM rejected the migrated vCPU state: {e}") from e
        t2 = time.monotonic()
        if self.postcopy_devices is not None:
            program_postcopy_devices(self.postcopy_devices, devices)
        else:
            program_devices(self.m, devices)
        # Everything but the final "go" happens before the acknowledgement, so that the source's
        # downtime (its vCPUs stopping → this ack) ends just before our vCPUs enter the guest:
        # the vCPU threads exist and are parked (see `receive`), `start` below releases them.
        t3 = time.monotonic()
        # What the destination spent between the source's Complete and its ack (part of the
        # downtime the source reports): vCPU restore, device programming.
        report["x-switchover-ms"] = {
            "vcpus": round((t2 - t1) * 1000, 2),
            "devices": round((t3 - t2) * 1000, 2),
        }
        if postcopy_arm is not None:  # pending pages punched, guest RAM registered
            report["x-switchover-ms"]["postcopy-arm"] = postcopy_arm
        used = self.cpu.stop()  # a clock read and a /proc read per vCPU: microseconds
        if used is not None:
            report["x-cpu-s"] = round(used, 4)
        self._commit(ch, conn)
        try:
            transport.send_event(ch, conn, SwitchoverAck(True, json.dumps(report)))
        except (ProtocolError, transport.TransportError) as e:
            log.error(
                "the switchover acknowledgement was not sent (%s): the guest runs here "
                "anyway; the source stays paused until x-migrate-resolve",
                e,
            )
        hold_for_test("after-commit")
        vm.start()
        self.started_at = time.monotonic()
        self._committing = False  # the guest runs: a stop request stops it (vm state RUNNING)
        if self.deferred_stop is not None:
            log.warning(
                "the guest runs here (the switchover had committed); now stopping it as "
                "requested by signal %d",
                self.deferred_stop,
            )
        # right after the vCPUs (a thread start before them would lengthen the outage), and
        # before the rest: the first faults' requests must not wait for it
        if self.postcopy is not None:
            self.postcopy.start_fetcher(ch, conn)
        self.m.disk_locks.record()
        self.m.announce_nics()
        self.m.after_incoming()


class MigrationSettings(Protocol):
    """The credentials an incoming migration is accepted with (`MigrationControl`'s)."""

    @property
    def psk(self) -> bytes | None: ...
    @property
    def tls(self) -> transport.TlsConfig | None: ...
    @property
    def insecure(self) -> bool: ...


class IncomingHost(MigratingVm, Protocol):
    """What `ptmig run --incoming` needs besides: the devices booted, the migration settings,
    and the run loop once the guest runs here."""

    incoming: Incoming | None

    @property
    def migration(self) -> MigrationSettings: ...
    def boot_devices(self) -> list[BootDevice]: ...
    def wait(self) -> int: ...


def run_incoming(
    machine: IncomingHost,
    uri: str,
    *,
    prefault: bool = True,
    incoming_timeout: float | None = None,
) -> int:
    """`ptmig run --incoming`: receive the guest, then run it until it exits or `quit`.

    Credentials (pre-shared key, TLS) are the machine's migration settings; `prefault` and
    `incoming_timeout` are `Incoming`'s (prefault on by default: the destination has nothing
    else to do while it waits; no timeout by default, as QEMU's -incoming)."""
    ctl = machine.migration
    try:
        incoming = Incoming(
            machine,
            uri,
            psk=ctl.psk,
            tls=ctl.tls,
            insecure=ctl.insecure,
            prefault=prefault,
            incoming_timeout=incoming_timeout,
        )
    except (transport.TransportError, ValueError) as e:
        print(f"ptmig: cannot accept an incoming migration: {e}", file=sys.stderr, flush=True)
        return VMM_FAILED
    if machine.cfg.devices:
        machine.boot_devices()
    machine.incoming = incoming
    try:
        incoming.receive()
    except (IncomingError, RemoteProtocolError, transport.TransportError, OSError, ValueError) as e:
        log.error("incoming migration failed: %s", e)
        print(f"ptmig: incoming migration failed: {e}", file=sys.stderr, flush=True)
        return VMM_FAILED
    release_free_memory()  # the receive buffers are gone; the host gets their pages back
    return machine.wait()
