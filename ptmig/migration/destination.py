"""The destination side of a live migration (`ptmig run CONFIG --incoming tcp:HOST:PORT`).

The destination owns fresh device processes (different hardware) and an empty guest. It accepts
one authenticated connection, receives RAM straight into guest memory (page numbers from the
peer are validated by the protocol before they become addresses), then the vCPU and device
state. Only when everything is loaded does it acknowledge the switchover and start the guest —
after that acknowledgement the source never runs the guest again. Any error before it ends the
incoming migration with a clear message and the source resumes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import struct
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..vcpu_state import MAX_STATE_BYTES, VcpuState
from ..vm import RunState
from . import transport
from .events import (
    NEED_DATA,
    Abort,
    Complete,
    DeviceStates,
    Hello,
    PageRunsHeader,
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
from .protocol import Connection, ConnectionClosed, check_hello
from .source import VERIFY_CAPABILITY, parse_uri
from .strategies import decode_device_states
from .verify import ZERO_PAGE_DIGEST, compare_digests, digests_from_bytes, page_digests

if TYPE_CHECKING:
    from ..machine import Machine

log = logging.getLogger(__name__)

RECV_CHUNK = 64 << 10  # bytes per plain read: frame headers, metadata, small frames


class IncomingError(RuntimeError):
    pass


def unpack_vcpu_states(blob: bytes, nvcpus: int) -> list[VcpuState]:
    states: list[VcpuState] = []
    off = 0
    while off < len(blob):
        if off + 4 > len(blob):
            raise IncomingError("truncated vCPU state list")
        (n,) = struct.unpack_from("<I", blob, off)
        off += 4
        if n > MAX_STATE_BYTES or off + n > len(blob):
            raise IncomingError(f"vCPU state of {n} bytes does not fit the list")
        states.append(VcpuState.from_bytes(blob[off : off + n]))
        off += n
    if len(states) != nvcpus:
        raise IncomingError(f"{len(states)} vCPU states for a VM with {nvcpus} vCPUs")
    if sorted(s.index for s in states) != list(range(nvcpus)):
        raise IncomingError(f"vCPU states for indices {[s.index for s in states]}")
    return sorted(states, key=lambda s: s.index)


def program_devices(machine: Machine, devices: list[dict[str, Any]]) -> None:
    """Program this host's fresh devices from the transferred state."""
    for dev, entry in zip(machine.devices, devices, strict=True):
        if entry.get("source") == "shadow":
            from ..shadow.restore import restore_shadowed_device

            restore_shadowed_device(machine, dev, entry)
        else:
            dev.handle.set_state(entry["state"])


def preallocate(fd: int, size: int) -> None:
    """Allocate the guest RAM's backing pages while nothing else happens yet.

    Receiving into never-touched memfd pages costs a page allocation per 4 KiB on the hot path
    (on nested hosts several µs each, more than the copy itself); doing it before the source
    connects takes it off the migration's clock. The destination has to hold the whole guest
    anyway; pages the source sends as zero runs are punched back into holes."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:  # not fatal: pages are then allocated as they arrive
        log.warning("could not preallocate %d bytes of guest RAM: %s", size, e)


class SpliceReceiver:
    """Page payloads from a plain TCP socket into the guest memfd with splice(2), through a pipe.

    The kernel moves the bytes into the memfd's pages directly: no copy through this process's
    mapping, hence no page-table entry to populate per 4 KiB page (the dominant cost of
    `recv_into` on fresh guest memory). `fill(target)` writes one memoryview slice of guest
    memory (from `Connection.payload_targets`, so already validated) at the matching file offset."""

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
                moved += os.splice(self.rfd, self.mem_fd, k - moved,
                                   offset_dst=offset + done + moved)
            done += k
            self.ch.bytes_received += k

    def _from_socket(self, want: int, total: int, done: int) -> int:
        while True:
            try:
                k = os.splice(self.sock_fd, self.wfd, want, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                ready, _, _ = select.select([self.sock_fd], [], [], self.ch.inactivity_timeout)
                if not ready:
                    raise transport.TransportError(
                        f"receiving {total} bytes (got {done}): no progress from {self.ch.peer} "
                        f"for {self.ch.inactivity_timeout} s (peer unresponsive)") from None
                continue
            except OSError as e:
                raise transport.TransportError(
                    f"receiving {total} bytes (got {done}): connection to {self.ch.peer} "
                    f"failed: {e}") from e
            if k == 0:
                raise transport.TransportError(
                    f"peer {self.ch.peer} closed the connection after {done} of {total} bytes")
            return k

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


class Incoming:
    def __init__(self, machine: Machine, uri: str, *, psk: bytes | None = None,
                 tls: transport.TlsConfig | None = None, insecure: bool = False) -> None:
        self.m = machine
        self.host, self.port = parse_uri(uri)
        self.listener = transport.listen(self.host, self.port, tls=tls, psk=psk,
                                         insecure=insecure)
        self.verify: dict[str, Any] | None = None
        self.digests: np.ndarray | None = None  # per page, as received (x-verify)
        self.started_at: float | None = None
        self.pages_received = 0

    def receive(self) -> None:
        """Accept one migration and run it to the switchover; the guest runs on return."""
        m = self.m
        vm = m.vm
        vm._set_state(RunState.INMIGRATE)
        preallocate(vm.memory.fd, vm.memory.size)
        # vCPU threads start parked (a VM's vCPUs wait until it is started); creating them now
        # keeps thread start-up, which a busy host can stretch to tens of ms, out of the downtime.
        for v in vm.vcpus:
            if v.thread.ident is None:
                v.start()
        log.info("waiting for an incoming migration on %s:%s", self.host, self.listener.port)
        ch = self.listener.accept()
        self.listener.close()
        conn = Connection(Role.DESTINATION, guest_pages=vm.memory.npages,
                          zero_filler=self._punch_zero_runs)
        splicer = (None if ch.is_tls or not hasattr(os, "splice")
                   else SpliceReceiver(ch, vm.memory.fd, vm.memory.host_address))
        vcpus: list[VcpuState] | None = None
        devices: list[dict[str, Any]] | None = None
        try:
            while True:
                ev = self._recv_event(ch, conn, splicer)
                if isinstance(ev, Hello):
                    ack = check_hello(ev, m.cfg.compat_fingerprint())
                    transport.send_event(ch, conn, ack)
                    if not ack.accepted:
                        raise IncomingError(f"refused the migration: {ack.reason}")
                    if VERIFY_CAPABILITY in ev.capabilities:
                        self.digests = np.full(vm.memory.npages, ZERO_PAGE_DIGEST, np.uint64)
                elif isinstance(ev, PageRunsHeader):
                    self.pages_received += int(ev.runs["npages"].sum())
                    if self.digests is not None:
                        self._digest_runs(ev.runs)
                elif isinstance(ev, (RoundStart, RoundEnd)):
                    pass
                elif isinstance(ev, VcpuStates):
                    vcpus = unpack_vcpu_states(ev.blob, len(vm.vcpus))
                elif isinstance(ev, DeviceStates):
                    devices = decode_device_states(ev.blob, [d.id for d in m.devices])
                elif isinstance(ev, Complete):
                    if vcpus is None or devices is None:
                        raise IncomingError("Complete arrived before the vCPU and device state")
                    self._switchover(ch, conn, vcpus, devices)
                    if self.digests is not None:
                        self._verify_after_switchover(ch, conn, splicer)
                    return
                elif isinstance(ev, Abort):
                    raise IncomingError(f"the source aborted the migration: {ev.reason}")
                elif isinstance(ev, ConnectionClosed):
                    raise IncomingError("the source closed the connection before completing")
                else:
                    raise IncomingError(f"unexpected event {type(ev).__name__}")
        finally:
            ch.close()
            if splicer is not None:
                splicer.close()

    def _recv_event(self, ch: transport.Channel, conn: Connection,
                    splicer: SpliceReceiver | None) -> Any:
        """`transport.recv_event`, with page payloads spliced into guest memory when possible.
        Reads are kept small so that little payload passes through the protocol's buffer."""
        if splicer is None:
            return transport.recv_event(ch, conn, self.m.vm.memory.view)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                conn.receive_data(ch.recv(RECV_CHUNK))
                continue
            if isinstance(ev, PageRunsHeader):
                for target in conn.payload_targets(self.m.vm.memory.view):
                    splicer.fill(target)
                    conn.payload_received(target.nbytes)
            return ev

    def _digest_runs(self, runs: np.ndarray) -> None:
        """Keep the digest of every page as received: the destination's RAM changes only by
        received pages until its guest runs, so these are the digests of its RAM at resume."""
        assert self.digests is not None
        mem = self.m.vm.memory.view
        for start, n, kind in zip(runs["start"].tolist(), runs["npages"].tolist(),
                                  runs["kind"].tolist(), strict=True):
            if kind == RunKind.ZERO:
                self.digests[start : start + n] = ZERO_PAGE_DIGEST
            else:
                self.digests[start : start + n] = page_digests(mem, first_page=start, npages=n)

    def _verify_after_switchover(self, ch: transport.Channel, conn: Connection,
                                 splicer: SpliceReceiver | None) -> None:
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
            self.verify = {"pages": res.pages, "mismatched": res.mismatched,
                           "first-mismatched": [int(p) for p in res.first_mismatched]}
            if res.mismatched:
                log.error("verification: %d of %d pages differ (first %s)", res.mismatched,
                          res.pages, self.verify["first-mismatched"])
            transport.send_event(ch, conn, VerifyReport(
                res.pages, res.mismatched, tuple(int(p) for p in res.first_mismatched)))
        except Exception as e:
            log.error("verification after the switchover failed: %s", e)

    def _punch_zero_runs(self, mem: memoryview, runs: np.ndarray) -> None:
        """ZERO runs become holes in the guest memfd: nothing is written or allocated."""
        sel = runs[runs["kind"] == RunKind.ZERO]
        for start, n in zip(sel["start"].tolist(), sel["npages"].tolist(), strict=True):
            self.m.vm.memory.punch_zero(start, n)

    def _switchover(self, ch: transport.Channel, conn: Connection, vcpus: list[VcpuState],
                    devices: list[dict[str, Any]]) -> None:
        vm = self.m.vm
        report: dict[str, Any] = {}
        t1 = time.monotonic()
        vm.restore_vcpus(vcpus)
        t2 = time.monotonic()
        program_devices(self.m, devices)
        # Everything but the final "go" happens before the acknowledgement, so that the source's
        # downtime (its vCPUs stopping → this ack) ends just before our vCPUs enter the guest:
        # the vCPU threads exist and are parked (see `receive`), `start` below releases them.
        t3 = time.monotonic()
        # What the destination spent between the source's Complete and its ack (part of the
        # downtime the source reports): vCPU restore, device programming.
        report["x-switchover-ms"] = {"vcpus": round((t2 - t1) * 1000, 2),
                                     "devices": round((t3 - t2) * 1000, 2)}
        transport.send_event(ch, conn, SwitchoverAck(True, json.dumps(report)))
        vm.start()
        self.started_at = time.monotonic()
        for dev in self.m.devices:
            if dev.kind == "net":
                try:
                    dev.handle.announce()
                except Exception as e:
                    log.warning("announce on %s failed: %s", dev.id, e)
        self.m.after_incoming()


def run_incoming(machine: Machine, uri: str) -> int:
    """`ptmig run --incoming`: receive the guest, then run it until it exits or `quit`.

    Credentials (pre-shared key, TLS) are the machine's migration settings."""
    ctl = machine.migration
    try:
        incoming = Incoming(machine, uri, psk=ctl.psk, tls=ctl.tls, insecure=ctl.insecure)
    except (transport.TransportError, ValueError) as e:
        print(f"ptmig: cannot accept an incoming migration: {e}", flush=True)
        return 2
    if machine.cfg.devices:
        machine.boot_devices()
    machine.incoming = incoming
    try:
        incoming.receive()
    except (IncomingError, RemoteProtocolError, transport.TransportError, OSError, ValueError) as e:
        log.error("incoming migration failed: %s", e)
        print(f"ptmig: incoming migration failed: {e}", flush=True)
        return 1
    return machine.wait()
