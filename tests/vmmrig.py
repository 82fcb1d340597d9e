"""The rig for tests that run VMMs: `ptmig run` processes driven over QMP, their configs, a
switch, the load client and a TCP link the test can cut.

Each VMM is a separate process (as on two hosts), driven over QMP by the `qemu.qmp` client, so
the tests exercise what a management tool would. Nothing here asserts; the tests do. This
module holds no tests.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ptmig.devices.vhost_user.daemon import find_program
from ptmig.migration.seal import new_key_file
from ptmig.net.switch import probe_switch
from ptmig.vmmproc import QmpMonitor, VmmError, free_port, run_command, stop_process

#: skips a test that needs a real vhost-user backend where qemu-storage-daemon is missing
needs_storage_daemon = pytest.mark.skipif(
    find_program() is None,
    reason="qemu-storage-daemon is not installed (Debian qemu-system-common; "
    "make test installs it as root)",
)

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """The child processes import this checkout's ptmig, whatever their working directory."""
    return dict(os.environ, PYTHONPATH=str(ROOT))


def dirty_config(
    tmp: Path, *, memory: str = "128M", vcpus: int = 2, ws: str = "32M", extra: str = ""
) -> Path:
    """`extra`: more workload arguments, as TOML inline-table entries (`at = "0x..."`)."""
    path = tmp / "dirty.toml"
    more = f", {extra}" if extra else ""
    path.write_text(
        f'[vm]\nmemory = "{memory}"\nvcpus = {vcpus}\n\n'
        f'[workload]\nname = "dirty"\nargs = {{ ws = "{ws}"{more} }}\n'
    )
    return path


def kv_config(
    tmp: Path, switch_port: int | None = None, *, memory: str = "128M", vhost_user: bool = False
) -> Path:
    """A kv VM on its own switch port and disk image, so tests never share state.

    Without `switch_port` the VM gets a free port and its VMM starts the switch there itself
    (`switch = "auto"`); with one, the test runs the switch (see `switch()`) and decides when
    it ends. `vhost_user`: the disk is served by a qemu-storage-daemon the VMM spawns."""
    mode = "none" if switch_port is not None else "auto"
    port = switch_port if switch_port is not None else free_port(socket.SOCK_DGRAM)
    path = tmp / "kv.toml"
    path.write_text(
        f'[vm]\nmemory = "{memory}"\nvcpus = 1\n\n'
        '[workload]\nname = "kv"\nargs = { port = 7000 }\n\n'
        '[[net]]\nid = "net0"\nmac = "52:54:00:12:34:56"\nip = "10.0.0.2/24"\n'
        f'backend = "udp:127.0.0.1:{port}"\nswitch = "{mode}"\n\n'
        # 64M: the log is two areas, and a checkpoint of every key the table can hold must fit
        # one of them
        f'[[disk]]\nid = "disk0"\npath = "{tmp / "kv.img"}"\nsize = "64M"\n'
        'serial = "ptmig-disk0"\n'
        + ('backend = "vhost-user"\nspawn = "qemu-storage-daemon"\n' if vhost_user else "")
    )
    return path


class Monitor(QmpMonitor):
    """The QMP socket of a VMM, whoever started it. One connection, opened at the first
    command and kept (as a management tool would); events that arrive with the replies are
    collected in `events`."""

    @property
    def qmp_path(self) -> Path:
        return self.path

    @property
    def qmp(self) -> Any:
        """The underlying `qemu.qmp` legacy client (for `pull_event`)."""
        if not self.connected:
            self._connect()
        return self._qmp

    def _connect(self) -> None:
        self.connect()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if not self.connected:
            self._connect()
        return super().execute(command, arguments)

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run a QMP command; its `return` value, or a RuntimeError (VmmError) with QMP's
        error text."""
        return self.execute(name, args)

    def iterations(self) -> list[int]:
        return [v["iterations"] for v in self.cmd("x-query-guest-stats")["vcpus"]]

    def migrate(
        self,
        port: int,
        *,
        tracking: str = "none",
        verify: bool = True,
        downtime_limit: int = 50,
        max_bandwidth: int = 0,
    ) -> None:
        """Start a migration to 127.0.0.1:port; `wait_migration()` waits for its end."""
        self.cmd(
            "migrate-set-parameters",
            {
                "x-dma-tracking": tracking,
                "downtime-limit": downtime_limit,
                "max-bandwidth": max_bandwidth,
            },
        )
        self.cmd(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-verify", "state": verify}]},
        )
        self.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})


class Vmm(Monitor):
    """One `ptmig run` process with a QMP socket; stdout/stderr go to files in `tmp`, the
    guest's console to `tmp/<name>.console`. The constructor does not wait: VMMs started one
    after the other boot in parallel; `wait_ready()` (or the first command) waits for QMP."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        config: Path,
        *,
        incoming_port: int | None = None,
        psk_file: Path | None = None,
        insecure: bool = False,
        incoming: str | None = None,
        keyless: bool = False,
        extra: Sequence[str] = (),
    ) -> None:
        """Migrations are authenticated by default: without `psk_file` (or `insecure`) the VMM
        uses `tmp/migration.key`, one key shared by the VMMs of a test (`migration_key`).
        `incoming`: any migration URI to wait on; `keyless`: no credential option at all."""
        super().__init__(tmp / f"{name}.qmp", name)
        self.out_path = tmp / f"{name}.out"
        self.err_path = tmp / f"{name}.err"
        args = run_command(config, self.qmp_path, tmp / f"{name}.console")
        if incoming_port is not None:
            args += ["--incoming", f"tcp:127.0.0.1:{incoming_port}"]
        if incoming is not None:
            args += ["--incoming", incoming]
        if insecure:
            args += ["--insecure"]
        elif not keyless:
            args += ["--psk-file", str(psk_file or migration_key(tmp))]
        args += extra
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, env=_env(), cwd=tmp)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until QMP answers; RuntimeError (with the output) if the VMM exited."""
        try:
            self.connect(self.proc, timeout)
        except VmmError as e:
            raise VmmError(f"{e}:\n{self.output()}") from None

    def _connect(self) -> None:
        self.wait_ready()

    def wait_running(self, timeout: float = 60.0) -> None:
        """Until the guest runs (devices spawned, firmware loaded)."""
        self.wait_status("running", timeout)

    def wait_incoming(self, timeout: float = 60.0) -> None:
        """Until a `--incoming` VMM listens (its QMP socket comes up before its listener)."""
        self.wait_status("inmigrate", timeout)

    def stop(self) -> int | None:
        """Quit (politely, then by force); returns the exit status."""
        code = stop_process(self.proc, lambda: self.cmd("quit"), grace_s=15)
        self.close()
        return code

    def kill(self) -> None:
        """SIGKILL, no goodbye: for clean-ups that must not wait on a guest."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()


def assert_still_waiting(dst: Vmm, message: str, timeout: float = 30.0) -> None:
    """The destination refused an attempt whose reason contains `message` (logged, no
    traceback) and still waits for a valid source."""
    deadline = time.monotonic() + timeout
    while message not in (out := dst.output()) or "rejected an incoming migration" not in out:
        assert dst.proc.poll() is None, f"the destination exited:\n{out}"
        assert time.monotonic() < deadline, f"no rejection naming {message!r}:\n{out}"
        time.sleep(0.05)
    assert "Traceback" not in out, out
    assert dst.status() == "inmigrate"
    assert any(e["event"] == "X_MIGRATION_REJECTED" for e in dst.events), dst.events


def migration_key(tmp: Path) -> Path:
    """The pre-shared migration key of the VMMs started in `tmp` (made on first use, mode 0600)."""
    path = tmp / "migration.key"
    return path if path.exists() else new_key_file(path)


def iterations_increase(vmm: Monitor, timeout: float = 10.0) -> bool:
    """True once every vCPU's loop counter has moved forward (checked every 50 ms); False if
    one has not within `timeout` seconds, far longer than a running guest ever needs."""
    first = vmm.iterations()
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.05)
        if all(y > x for x, y in zip(first, vmm.iterations(), strict=True)):
            return True
        if time.monotonic() > deadline:
            return False


@contextmanager
def switch(port: int) -> Iterator[None]:
    """A `ptmig switch` on 127.0.0.1:port for the duration of the block."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ptmig.net.switch", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 10
        while probe_switch("127.0.0.1", port, timeout=0.1, tries=1) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"switch on port {port} did not start")
        yield
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def migration_pair(
    tmp: Path, config: Path, dst_config: Path | None = None
) -> Iterator[tuple[Vmm, Vmm, int]]:
    """A running source and a destination waiting for it on a free port: (source,
    destination, port). Both VMMs are stopped at the end of the block. `dst_config`: the
    destination's config, if not the source's."""
    port = free_port()
    src = Vmm(tmp, "src", config)
    dst = Vmm(tmp, "dst", dst_config or config, incoming_port=port)
    try:
        src.wait_running()
        dst.wait_incoming()
        yield src, dst, port
    finally:
        src.stop()
        dst.stop()


@contextmanager
def kv_migration(
    tmp: Path, *, dst_image: Path | None = None
) -> Iterator[tuple[Path, Vmm, Vmm, int]]:
    """A kv VM running on its own switch and a destination waiting for it on a free port:
    (config, source, destination, port). Both VMMs are stopped at the end of the block.
    `dst_image`: the destination's disk image, if not the source's (shared) one."""
    sw = free_port(socket.SOCK_DGRAM)
    cfg = dst_cfg = kv_config(tmp, sw)
    if dst_image is not None:
        dst_cfg = tmp / "kv-dst.toml"
        dst_cfg.write_text(cfg.read_text().replace(str(tmp / "kv.img"), str(dst_image)))
    with switch(sw), migration_pair(tmp, cfg, dst_cfg) as (src, dst, port):
        yield cfg, src, dst, port


@dataclass
class Load:
    """`ptmig load` in a background process; `wait()` gives its exit status, `result()` its
    parsed JSON (with the output under "output").

    `window` bounds the requests in flight (None: `ptmig load`'s own default); `rate` paces
    the requests (None: as fast as the window allows). `keys` is the key space the client
    cycles: 16,384 by default here, well inside the kv table of the tests' small guests (a
    128 MiB guest has room for 57,344 keys; a fast host cycles more than that in a few
    seconds, and the guest then refuses new keys, as it should)."""

    config: Path
    duration: float
    json_path: Path
    rate: float | None = None
    window: int | None = 16
    keys: int = 16384
    proc: subprocess.Popen[bytes] | None = None
    output: str | None = field(default=None, init=False)

    def start(self) -> Load:
        args = [
            sys.executable,
            "-m",
            "ptmig.cli",
            "load",
            str(self.config),
            "--duration",
            str(self.duration),
            "--json",
            str(self.json_path),
            "--keys",
            str(self.keys),
        ]
        if self.window is not None:
            args += ["--window", str(self.window)]
        if self.rate:
            args += ["--rate", str(self.rate)]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env()
        )
        return self

    def wait(self, timeout: float = 90.0) -> int:
        """The exit status (0: every acknowledged value read back intact); output in `output`."""
        assert self.proc is not None
        if self.output is None:
            out, _ = self.proc.communicate(timeout=timeout)
            self.output = out.decode(errors="replace")
        return self.proc.returncode

    def result(self, timeout: float = 90.0) -> dict[str, Any]:
        status = self.wait(timeout)
        if not self.json_path.exists():
            raise RuntimeError(f"ptmig load wrote no result (status {status}):\n{self.output}")
        doc: dict[str, Any] = json.loads(self.json_path.read_text())
        doc["output"] = self.output
        return doc


class TcpProxy:
    """A TCP forwarder 127.0.0.1:port → 127.0.0.1:target that the test can cut at will, or
    darken one way: once `replies_dark` is set, what the target sends back is read and dropped
    while both connections stay open (a link that went dark for the replies only)."""

    def __init__(self, target: int, cut_after: int | None = None) -> None:
        self.target = target
        self.cut_after = cut_after  # bytes forwarded (either way) before the link fails
        self.cut_done = threading.Event()
        self.replies_dark = threading.Event()
        self.dropped = 0  # reply bytes dropped since `replies_dark`
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.forwarded = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        """Every connection through the link (a migration may open parallel data channels)."""
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            with self._lock:
                self._socks += [client, upstream]
                cut = self.cut_done.is_set()
            if cut:  # the link is down: what connects now fails at once
                self.cut()
                return
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, replies: bool = False) -> None:
        try:
            while True:
                data = a.recv(1 << 16)
                if not data:
                    break
                if replies and self.replies_dark.is_set():
                    self.dropped += len(data)
                    continue
                b.sendall(data)
                with self._lock:
                    self.forwarded += len(data)
                if self.cut_after is not None and self.forwarded >= self.cut_after:
                    self.cut()
                    return
            if not (replies and self.replies_dark.is_set()):
                b.shutdown(socket.SHUT_WR)  # the end of one direction travels on, as over TCP
        except OSError:
            pass

    def cut(self) -> None:
        """Reset every connection at once, as a failing link would."""
        self.cut_done.set()
        self.listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
                    s.close()
                except OSError:
                    pass


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from `sock` (OSError if it closes first)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("closed")
        buf += chunk
    return bytes(buf)


class TamperProxy(TcpProxy):
    """An on-path attacker between a source and a destination under a PSK: it forwards every
    connection, and on connection number `stream` (0: the main stream, i + 1: data channel i)
    applies `attack` to the first sealed record of at least `min_size` bytes the source sends:
    "flip" one bit in it, "swap" it with the next record, or "replay" it (send it twice)."""

    HANDSHAKE = {0: 1 + 32 + 32 + 1}  # kind, nonce, proof, verdict (a NEW handshake)
    JOIN_HANDSHAKE = 1 + 32 + 16 + 1 + 32 + 1  # kind, nonce, session id, index, proof, verdict

    def __init__(self, target: int, stream: int, attack: str, min_size: int = 1) -> None:
        self.stream, self.attack, self.min_size = stream, attack, min_size
        self.connections = 0
        self.tampered = threading.Event()
        super().__init__(target)

    def _pump(self, a: socket.socket, b: socket.socket, replies: bool = False) -> None:
        if replies:  # destination → source: untouched
            return super()._pump(a, b, replies)
        with self._lock:
            index, self.connections = self.connections, self.connections + 1
        if index != self.stream:
            return super()._pump(a, b, replies)
        try:
            self._tamper(a, b, self.HANDSHAKE.get(index, self.JOIN_HANDSHAKE))
        except OSError:
            pass

    def _tamper(self, a: socket.socket, b: socket.socket, handshake: int) -> None:
        def exact(n: int) -> bytes:
            return recv_exact(a, n)

        b.sendall(exact(handshake - 1))  # the proof; the verdict follows the server's
        b.sendall(exact(1))
        held: bytes | None = None
        while True:
            head = exact(4)
            record = head + exact(struct.unpack("<I", head)[0])
            # the mark goes up before the bad bytes leave: a test reading it once the source
            # has failed must not race the send's return
            if held is not None:  # swap: the next record first, then the held one
                self.tampered.set()
                b.sendall(record + held)
                held = None
            elif self.tampered.is_set() or len(record) < self.min_size:
                b.sendall(record)
            elif self.attack == "flip":
                bad = bytearray(record)
                bad[len(bad) // 2] ^= 0x10
                self.tampered.set()
                b.sendall(bytes(bad))
            elif self.attack == "replay":
                self.tampered.set()
                b.sendall(record + record)
            else:
                held = record
