"""The learning L2 switch over UDP: the socket loop around `ptmig.net.fdb`.

Owns the switch process: binding HOST:PORT (a second switch on the same address fails to
bind and exits with status 3), answering control datagrams (`ptmig.net.switchproto`),
forwarding frames as the forwarding database decides, aging, counters; `ensure_switch`
starts one detached when none answers a probe; `query_stats` asks a running one for its
counters. Run it as `python -m ptmig.net.switch HOST:PORT`.

Known unicast frames, nearly all of the traffic, are forwarded by a native loop when it can be
built (`ptmig.net.switchnative`): it reads the socket, sends on what changes nothing in the
forwarding database, and hands everything else here in arrival order. What the switch does is
the same either way; the pure-Python loop is the reference and the fallback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ptmig.net import switchproto
from ptmig.net.backend import SOCKET_BUFFER, parse_host_port
from ptmig.net.fdb import DEFAULT_AGE_S, ForwardingDatabase
from ptmig.net.frames import ETH_HEADER_LEN
from ptmig.net.sched import use_batch_scheduling
from ptmig.net.switchnative import DRAINED, SLOW_READY, FastPath, FastPathUnavailable
from ptmig.net.switchproto import Msg

from ..errors import PtmigError

EXPIRE_EVERY_S = 1.0
EXIT_ADDRESS_IN_USE = 3
# A switch that `ptmig run` starts for a VM (switch = "auto") ends itself after this long
# without a datagram: every UDP backend says hello every few seconds (HELLO_INTERVAL_S), so
# only a switch whose VMs are all gone falls silent for that long.
AUTO_IDLE_EXIT_S = 60.0

log = logging.getLogger(__name__)
_fallback_logged = False


class SwitchError(PtmigError, OSError):
    """The switch cannot bind, or cannot be started or reached."""


class UdpSwitch:
    """A bound switch socket; `serve()` runs the loop until `stop` is set.

    `native`: True requires the native fast path, False never uses it, None (the default) uses
    it when it can be built and otherwise logs once and forwards everything in Python."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        age_s: float = DEFAULT_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        native: bool | None = None,
    ) -> None:
        self.fdb = ForwardingDatabase(age_s)
        self.clock = clock
        self.frames_in = 0
        self.frames_out = 0
        self.malformed = 0
        self.controls = 0
        self.send_errors = 0
        self.last_heard = clock()  # when the last datagram reached Python (hellos do)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            self.sock.bind(addr)
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise SwitchError(
                    exc.errno,
                    f"switch: {host}:{port} is already in use "
                    "(another switch is probably running there)",
                ) from exc
            raise SwitchError(exc.errno, f"switch: cannot bind {host}:{port}: {exc}") from exc
        self.sock.setblocking(False)
        try:
            self.fast = self._open_fast_path(native)
        except FastPathUnavailable:
            self.sock.close()
            raise
        if self.fast is not None:
            self.fdb.mirror = self.fast  # the database keeps the native cache a copy of itself
        # The fast path forwards only for a horizon Python renews at each sync (see sync()).
        self._sync_every = min(EXPIRE_EVERY_S, age_s / 4)
        self._next_sync = 0.0
        self._passes_seen = 0

    def _open_fast_path(self, native: bool | None) -> FastPath | None:
        global _fallback_logged
        if native is False:
            return None
        try:
            return FastPath(self.sock)
        except FastPathUnavailable as exc:
            if native:
                raise
            if not _fallback_logged:
                log.info("switch: %s; forwarding every frame in Python", exc)
                _fallback_logged = True
            return None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def counters(self) -> dict[str, int]:
        """The switch's counters, fast-path frames included (they are known unicast)."""
        fast = self.fast.counters() if self.fast is not None else {}
        fast_in, fast_out = fast.get("forwarded", 0), fast.get("sent", 0)
        fdb = self.fdb.counters.as_dict()
        fdb["unicast"] += fast_in
        return {
            "frames_in": self.frames_in + fast_in,
            "frames_out": self.frames_out + fast_out,
            "malformed": self.malformed,
            "controls": self.controls,
            "send_errors": self.send_errors + fast.get("send_errors", 0),
            "endpoints": len(self.fdb.endpoints),
            "macs": len(self.fdb.macs),
            **fdb,
            "fast_forwarded": fast_in,
            "handed_to_python": fast.get("handed", 0),
            "fast_stalls": fast.get("stalls", 0),
        }

    def _sendto(self, data: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(data, addr)
            self.frames_out += 1
        except OSError:  # full buffer, vanished peer: a switch drops, it does not stall
            self.send_errors += 1

    def _control(self, data: bytes, addr: Any, now: float) -> None:
        try:
            msg = switchproto.decode(data)
        except switchproto.ControlError:
            self.malformed += 1
            return
        self.controls += 1
        if msg.type == Msg.HELLO:
            self.fdb.touch_endpoint(addr, now)
            if msg.payload:
                self.fdb.learn(msg.payload, addr, now, move=False)
            self._reply(switchproto.encode(Msg.HELLO_ACK), addr)
        elif msg.type == Msg.PROBE:
            self._reply(switchproto.probe_reply(os.getpid()), addr)
        elif msg.type == Msg.STATS:
            self._reply(switchproto.stats_reply(self.counters()), addr)

    def _reply(self, data: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.send_errors += 1

    def handle(self, data: bytes, addr: Any, now: float) -> None:
        """Process one received datagram."""
        self.last_heard = now
        if len(data) < ETH_HEADER_LEN:
            if switchproto.is_control(data):
                self._control(data, addr, now)
            else:
                self.malformed += 1
            return
        self.frames_in += 1
        for target in self.fdb.forward(addr, data, now):
            self._sendto(data, target)

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` for datagrams and handle every one that is pending. With the
        fast path: return once its loop has taken in everything sent so far and whatever it
        handed over is handled, so a caller sees the same effects as without it."""
        if self.fast is None:
            self._poll_socket(timeout)
        else:
            self._pump(timeout, progress=True)

    def _poll_socket(self, timeout: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        recvfrom = self.sock.recvfrom
        handle = self.handle
        now = self.clock()
        for _ in range(4096):
            try:
                data, addr = recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP errors reported on the socket
                continue
            handle(data, addr, now)

    def _pump(self, timeout: float, *, progress: bool) -> None:
        """Handle what the fast path hands over, for up to `timeout`. With `progress` (poll),
        until its loop has drained the socket; without (serve), until one batch was handled:
        the serving thread is then never woken by frames the loop forwarded itself."""
        assert self.fast is not None
        self.fast.start()
        deadline = time.monotonic() + timeout
        while True:
            self._sync_if_due()
            left = deadline - time.monotonic()
            status = self.fast.wait(
                min(max(left, 0.0), self._sync_every), progress=progress, seen=self._passes_seen
            )
            if status == SLOW_READY:
                self._handle_slow()
                if not progress:
                    return
            elif status == DRAINED:
                self._passes_seen = self.fast.counters()["passes"]
                return
            elif left <= 0:
                return

    def _handle_slow(self) -> None:
        assert self.fast is not None
        batch = self.fast.take()
        now = self.clock()
        try:
            self.fdb.note_heard(now)  # lazy aging below must see what the loop heard
            for data, addr in batch:
                self.handle(data, addr, now)
        finally:
            self.fast.done(len(batch))  # the loop may take the fast path again

    def _sync_if_due(self) -> None:
        t = time.monotonic()
        if t >= self._next_sync:
            self._next_sync = t + self._sync_every
            self.sync(self.clock())

    def sync(self, now: float) -> None:
        """Fold the MACs the fast path heard into the database, evict from its cache every MAC
        that could age out before the next sync, and let it forward until then (with a margin):
        so it never forwards to a MAC the database would have aged, even if this thread stalls
        (it then hands everything over). Runs every `_sync_every` seconds of real time."""
        if self.fast is None:
            return
        horizon = 2 * self._sync_every
        self.fdb.note_heard(now)
        for mac in list(self.fast.cached):
            entry = self.fdb.macs.get(mac)
            if entry is None or entry[1] + self.fdb.age_s - now < horizon:
                self.fast.drop(mac)
        self.fast.renew(horizon)

    def serve(
        self, stop: threading.Event | None = None, *, idle_exit_s: float | None = None
    ) -> None:
        """Switch until `stop` is set, or (with `idle_exit_s`) until that long has passed
        without a datagram reaching Python: hellos and every control message do, so a switch
        with a live backend behind it never counts as idle."""
        next_expire = self.clock() + EXPIRE_EVERY_S
        while stop is None or not stop.is_set():
            if idle_exit_s is not None and self.clock() - self.last_heard > idle_exit_s:
                return
            if self.fast is None:
                self._poll_socket(0.2)
            else:
                self._pump(0.2, progress=False)
            now = self.clock()
            if now >= next_expire:
                self.fdb.expire(now)
                next_expire = now + EXPIRE_EVERY_S

    def close(self) -> None:
        """Stop the fast path (after `serve` returned) and close the socket."""
        if self.fast is not None:
            self.fast.close()
        self.sock.close()


def run_switch(
    host: str,
    port: int,
    *,
    age_s: float = DEFAULT_AGE_S,
    native: bool | None = None,
    idle_exit_s: float | None = None,
) -> None:
    """Bind HOST:PORT and switch frames until interrupted (or idle for `idle_exit_s`). Raises
    SwitchError on bind.
    The process runs under SCHED_BATCH (`ptmig.net.sched`): it takes bursts whole. The fast
    path's thread starts in `serve`, so it inherits the policy."""
    switch = UdpSwitch(host, port, age_s=age_s, native=native)
    switch.fdb.on_change = _log_mac_change
    use_batch_scheduling()  # only once it is the switch: a failed bind changes nothing
    path = "native fast path" if switch.fast is not None else "Python only"
    idle = f", ends after {idle_exit_s:g} s without traffic" if idle_exit_s is not None else ""
    print(
        f"ptmig switch: listening on {host}:{port} (pid {os.getpid()}, age {age_s:g} s, "
        f"{path}{idle})",
        file=sys.stderr,
        flush=True,
    )
    try:
        switch.serve(idle_exit_s=idle_exit_s)
    finally:
        switch.close()
    if idle_exit_s is not None:
        print(
            f"ptmig switch: nothing heard for {idle_exit_s:g} s; exiting",
            file=sys.stderr,
            flush=True,
        )


def _log_mac_change(mac: bytes, old: Any, new: Any) -> None:
    """One stderr line per MAC learned or moved: where the switch sends a VM's frames."""
    what = f"moved from {old}" if old is not None else "learned"
    print(f"ptmig switch: {mac.hex(':')} {what} -> {new}", file=sys.stderr, flush=True)


def switch_main(
    listen: str,
    *,
    age_s: float = DEFAULT_AGE_S,
    native: bool | None = None,
    idle_exit_s: float | None = None,
) -> int:
    """CLI entry: `listen` is HOST:PORT. Returns the process exit status."""
    try:
        host, port = parse_host_port(listen, what="--listen")
    except ValueError as exc:
        print(f"ptmig switch: {exc}", file=sys.stderr)
        return 2
    try:
        run_switch(host, port, age_s=age_s, native=native, idle_exit_s=idle_exit_s)
    except SwitchError as exc:
        print(exc.strerror or str(exc), file=sys.stderr)
        return EXIT_ADDRESS_IN_USE if exc.errno == errno.EADDRINUSE else 1
    except KeyboardInterrupt:
        return 0
    return 0


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _request(
    host: str, port: int, msg: Msg, want: Msg, timeout: float, tries: int
) -> switchproto.Control | None:
    infos = socket.getaddrinfo(_probe_host(host), port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(addr)
        for _ in range(tries):
            try:
                sock.send(switchproto.encode(msg))
            except OSError:
                time.sleep(timeout)
                continue
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                try:
                    data = sock.recv(65536)
                except ConnectionRefusedError:  # nobody is listening
                    time.sleep(left)
                    break
                try:
                    reply = switchproto.decode(data)
                except switchproto.ControlError:
                    continue
                if reply.type == want:
                    return reply
    return None


def probe_switch(host: str, port: int, *, timeout: float = 0.2, tries: int = 3) -> int | None:
    """The pid of the switch answering at host:port, or None if none answers."""
    reply = _request(host, port, Msg.PROBE, Msg.PROBE_REPLY, timeout, tries)
    return None if reply is None else switchproto.probe_reply_pid(reply)


def query_stats(host: str, port: int, *, timeout: float = 0.5) -> dict[str, int]:
    reply = _request(host, port, Msg.STATS, Msg.STATS_REPLY, timeout, 3)
    if reply is None:
        raise SwitchError(f"no switch answered at {host}:{port}")
    return switchproto.stats_from_reply(reply)


def ensure_switch(
    host: str,
    port: int,
    *,
    start_timeout: float = 5.0,
    age_s: float = DEFAULT_AGE_S,
    idle_exit_s: float = AUTO_IDLE_EXIT_S,
) -> subprocess.Popen[bytes] | None:
    """Make sure a switch listens on host:port. Returns the process started here, or None
    when one was already running. Race-safe: if two callers start one at once, the second
    fails to bind and exits, and the caller whose process lost gets None. The switch started
    here is detached (other VMs may use it after this one) and ends itself once nothing has
    been heard on it for `idle_exit_s`."""
    if probe_switch(host, port) is not None:
        return None
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ptmig.net.switch",
            f"{host}:{port}",
            "--age",
            str(age_s),
            "--idle-exit",
            str(idle_exit_s),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        pid = probe_switch(host, port, timeout=0.1, tries=1)
        if pid is not None:
            if pid == proc.pid:
                return proc
            proc.wait(timeout=start_timeout)  # it lost the bind race and exits
            return None
        if proc.poll() is not None and proc.returncode != EXIT_ADDRESS_IN_USE:
            log.seek(0)
            raise SwitchError(
                f"switch on {host}:{port} exited with status {proc.returncode}: "
                f"{log.read().decode(errors='replace').strip()}"
            )
    proc.kill()
    proc.wait()
    log.seek(0)
    detail = log.read().decode(errors="replace").strip()
    raise SwitchError(
        f"switch on {host}:{port} did not answer within {start_timeout} s "
        f"(exit status {proc.returncode}){': ' + detail if detail else ''}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ptmig.net.switch", description="learning L2 switch over UDP"
    )
    parser.add_argument("listen", help="HOST:PORT to bind")
    parser.add_argument(
        "--age",
        type=float,
        default=DEFAULT_AGE_S,
        help="seconds before an unheard MAC or endpoint is forgotten",
    )
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="S",
        help="exit after S seconds without a datagram (default: never)",
    )
    parser.add_argument(
        "--no-native",
        action="store_true",
        help="forward every frame in Python (no native fast path)",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print the counters of the switch running at HOST:PORT and exit",
    )
    args = parser.parse_args(argv)
    if args.stats:
        host, port = parse_host_port(args.listen, what="switch address")
        try:
            stats = query_stats(host, port)
        except SwitchError as exc:
            print(exc, file=sys.stderr)
            return 1
        for key, value in sorted(stats.items()):
            print(f"{key:16} {value}")
        return 0
    if args.idle_exit is not None and args.idle_exit <= 0:
        print("ptmig switch: --idle-exit must be positive", file=sys.stderr)
        return 2
    return switch_main(
        args.listen,
        age_s=args.age,
        native=False if args.no_native else None,
        idle_exit_s=args.idle_exit,
    )


if __name__ == "__main__":
    sys.exit(main())
