"""Shared helpers for tests that run the kv guest: configs on free ports, VMM processes, QMP."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kv_config(tmp: Path, *, memory: str = "128M", name: str = "kv") -> Path:
    port = free_port()
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f"""
[vm]
memory = "{memory}"
vcpus = 1
[workload]
name = "kv"
[[net]]
id = "net0"
mac = "52:54:00:aa:bb:01"
ip = "10.0.0.2/24"
backend = "udp:127.0.0.1:{port}"
switch = "auto"
[[disk]]
id = "disk0"
path = "{tmp / 'kv.img'}"
size = "16M"
""")
    return cfg


class QmpEndpoint:
    """A QMP socket, one short connection per command."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        async def go() -> Any:
            c = QMPClient("test")
            await c.connect(str(self.sock))
            try:
                return await c.execute(cmd, args)
            finally:
                try:
                    await c.disconnect()
                except (EOFError, ConnectionError):
                    pass

        return asyncio.run(go())


class Vmm(QmpEndpoint):
    """A `ptmig run` process with its QMP socket."""

    def __init__(self, cfg: Path, tmp: Path, tag: str, *, incoming: int | None = None,
                 extra: list[str] | None = None) -> None:
        super().__init__(tmp / f"{tag}.qmp")
        self.log = tmp / f"{tag}.log"
        args = [sys.executable, "-m", "ptmig.cli", "run", str(cfg), "--qmp", f"unix:{self.sock}",
                "--console", str(tmp / f"{tag}.console")]
        if incoming is not None:
            args += ["--incoming", f"tcp:127.0.0.1:{incoming}"]
        args += extra or []
        self.proc = subprocess.Popen(args, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.sock.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"{tag} exited early ({self.proc.returncode}): "
                                     f"{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{tag}: QMP socket never appeared")
            time.sleep(0.05)

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def migrate(src: QmpEndpoint, port: int, *, strategy: str = "shadow", verify: bool = True,
            params: dict[str, Any] | None = None, timeout: float = 120) -> dict[str, Any]:
    src.qmp("migrate-set-parameters", {"x-dma-tracking": strategy, **(params or {})})
    src.qmp("migrate-set-capabilities",
            {"capabilities": [{"capability": "x-verify", "state": verify}]})
    src.qmp("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    return wait_migration(src, timeout)


def wait_migration(src: QmpEndpoint, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = src.qmp("query-migrate")
        if st["status"] in ("completed", "failed", "cancelled"):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"migration still {st['status']} after {timeout}s")
        time.sleep(0.05)


def start_load(cfg: Path, out: Path, duration: float, rate: int | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "ptmig.load", str(cfg), "--duration", str(duration),
            "--json", str(out)]
    args += ["--rate", str(rate)] if rate else ["--max"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
