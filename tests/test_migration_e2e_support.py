"""Helpers for the live-migration end-to-end tests: `ptmig run` processes, QMP, configs, load.

Source and destination are separate `ptmig run` processes (as on two hosts), driven over QMP by
the `qemu.qmp` client. Nothing here asserts; the tests do. This module holds no tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

ROOT = Path(__file__).resolve().parent.parent
FINISHED = ("completed", "failed", "cancelled")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dirty_config(tmp: Path, *, memory: str = "128M", vcpus: int = 2, ws: str = "32M") -> Path:
    path = tmp / "dirty.toml"
    path.write_text(f'[vm]\nmemory = "{memory}"\nvcpus = {vcpus}\n\n'
                    f'[workload]\nname = "dirty"\nargs = {{ ws = "{ws}" }}\n')
    return path


def kv_config(tmp: Path, switch_port: int, *, memory: str = "128M") -> Path:
    """A kv VM on its own switch port and disk image, so tests never share state."""
    path = tmp / "kv.toml"
    path.write_text(
        f'[vm]\nmemory = "{memory}"\nvcpus = 1\n\n'
        '[workload]\nname = "kv"\nargs = { port = 7000 }\n\n'
        '[[net]]\nid = "net0"\nmac = "52:54:00:12:34:56"\nip = "10.0.0.2/24"\n'
        f'backend = "udp:127.0.0.1:{switch_port}"\nswitch = "none"\n\n'
        '[[disk]]\nid = "disk0"\npath = "kv.img"\nsize = "16M"\nserial = "ptmig-disk0"\n')
    return path


class Vmm:
    """One `ptmig run` process with a QMP socket; stdout/stderr go to files in `tmp`."""

    def __init__(self, tmp: Path, name: str, config: Path, *, incoming_port: int | None = None,
                 psk_file: Path | None = None) -> None:
        self.name = name
        self.qmp_path = tmp / f"{name}.qmp"
        self.out_path = tmp / f"{name}.out"
        self.err_path = tmp / f"{name}.err"
        args = [sys.executable, "-m", "ptmig.cli", "run", str(config),
                "--qmp", f"unix:{self.qmp_path}", "--console", str(tmp / f"{name}.console")]
        if incoming_port is not None:
            args += ["--incoming", f"tcp:127.0.0.1:{incoming_port}"]
        if psk_file is not None:
            args += ["--psk-file", str(psk_file)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=tmp)
        self._qmp: QEMUMonitorProtocol | None = None
        self.events: list[dict[str, Any]] = []

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(
            errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early ({self.proc.returncode}):\n"
                                   f"{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no QMP socket after {timeout} s")
            time.sleep(0.05)

    def wait_running(self, timeout: float = 60.0) -> None:
        """Until the guest runs (devices spawned, firmware loaded)."""
        deadline = time.monotonic() + timeout
        while self.status() != "running":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: guest not running after {timeout} s")
            time.sleep(0.05)

    def wait_incoming(self, timeout: float = 60.0) -> None:
        """Until a `--incoming` VMM listens (its QMP socket comes up before its listener)."""
        deadline = time.monotonic() + timeout
        while self.status() != "inmigrate":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not waiting for a migration after {timeout} s")
            time.sleep(0.05)

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        if self._qmp is None:
            self.wait_ready()
            try:
                asyncio.get_event_loop()
            except RuntimeError:  # a test's asyncio.run() closed the default loop
                asyncio.set_event_loop(asyncio.new_event_loop())
            q = QEMUMonitorProtocol(str(self.qmp_path))
            q.connect()
            self._qmp = q
        return self._qmp

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run a QMP command; its `return` value, or RuntimeError with QMP's error text."""
        reply = self.qmp.cmd(name, args)
        self.events.extend(self.qmp.get_events(wait=False))
        if "error" in reply:
            raise RuntimeError(f"{self.name} {name}: {reply['error'].get('desc')}")
        return reply["return"]

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def iterations(self) -> list[int]:
        return [v["iterations"] for v in self.cmd("x-query-guest-stats")["vcpus"]]

    def wait_migration(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.cmd("query-migrate")
            if info["status"] in FINISHED:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration still '{info['status']}' after {timeout} s")
            time.sleep(0.02)

    def migrate(self, port: int, *, tracking: str = "none", verify: bool = True,
                downtime_limit: int = 50, max_bandwidth: int = 0) -> None:
        self.cmd("migrate-set-parameters", {"x-dma-tracking": tracking,
                                            "downtime-limit": downtime_limit,
                                            "max-bandwidth": max_bandwidth})
        self.cmd("migrate-set-capabilities",
                 {"capabilities": [{"capability": "x-verify", "state": verify}]})
        self.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})

    def stop(self) -> int | None:
        """Quit (politely, then by force); returns the exit status."""
        if self.proc.poll() is None:
            try:
                self.cmd("quit")
            except Exception:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:
                pass
        return self.proc.returncode


def iterations_increase(vmm: Vmm, wait: float = 0.3) -> bool:
    """True if every vCPU's loop counter moves forward within `wait` seconds."""
    a = vmm.iterations()
    time.sleep(wait)
    b = vmm.iterations()
    return all(y > x for x, y in zip(a, b, strict=True))


@contextmanager
def switch(port: int) -> Iterator[None]:
    """A `ptmig switch` on 127.0.0.1:port for the duration of the block."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "ptmig.net.switch", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        from ptmig.net.switch import probe_switch

        deadline = time.monotonic() + 10
        while probe_switch("127.0.0.1", port, timeout=0.1, tries=1) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"switch on port {port} did not start")
        yield
    finally:
        proc.kill()
        proc.wait()


@dataclass
class Load:
    """`ptmig load` in a background process; `result()` waits for it and parses its JSON."""

    config: Path
    duration: float
    json_path: Path
    rate: float | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: list[str] = field(default_factory=list)

    def start(self) -> Load:
        args = [sys.executable, "-m", "ptmig.cli", "load", str(self.config),
                "--duration", str(self.duration), "--json", str(self.json_path),
                "--window", "16"]
        if self.rate:
            args += ["--rate", str(self.rate)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env)
        return self

    def result(self, timeout: float = 90.0) -> dict[str, Any]:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=timeout)
        text = out.decode(errors="replace")
        if not self.json_path.exists():
            raise RuntimeError(f"ptmig load wrote no result (status {self.proc.returncode}):\n"
                               f"{text}")
        doc: dict[str, Any] = json.loads(self.json_path.read_text())
        doc["output"] = text
        return doc


class TcpProxy:
    """A TCP forwarder 127.0.0.1:port → 127.0.0.1:target that the test can cut at will."""

    def __init__(self, target: int, cut_after: int | None = None) -> None:
        self.target = target
        self.cut_after = cut_after  # bytes forwarded (either way) before the link fails
        self.cut_done = threading.Event()
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
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(1 << 16)
                if not data:
                    break
                b.sendall(data)
                with self._lock:
                    self.forwarded += len(data)
                if self.cut_after is not None and self.forwarded >= self.cut_after:
                    self.cut()
                    break
        except OSError:
            pass

    def cut(self) -> None:
        """Reset every connection at once, as a failing link would."""
        import struct

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
