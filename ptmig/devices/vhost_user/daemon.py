"""A `qemu-storage-daemon` that ptmig starts and supervises as a disk's vhost-user backend.

Owns the daemon's command line (a raw image exported as vhost-user-blk on a unix socket), its
process, its stderr (forwarded to logging as ``ptmig.vhost.NAME``) and the watch for its exit:
when it exits on its own the `on_exit` callback gets a reason that names the exit code or signal,
just as a device process's death is reported.

A daemon never outlives its VMM: it is started under `setpriv --pdeathsig KILL` (util-linux), so
the kernel kills it when the VMM dies, even by SIGKILL. The parent-death signal belongs to the
thread that forked, so every daemon is forked by one thread that lives as long as the process
(`_Spawner`), never by the short-lived thread that happened to open the disk.

Image locks: the vhost-user-blk export takes only *shared* locks on the image (measured on
QEMU 7.2), so the source's and the destination's daemons can both open the shared
image. Only the side that runs the guest writes it: the destination's frontend programs no ring
before the migrated state arrives, so its daemon issues no I/O until the guest runs there.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ...errors import PtmigError
from ..blk import BlkConfig, open_image

PROGRAM = "qemu-storage-daemon"
#: runs the daemon with a parent-death signal (util-linux, in every Debian install)
PDEATHSIG_WRAPPER = "setpriv"


class StorageDaemonError(PtmigError):
    """The daemon could not be started."""


def find_program(name: str = PROGRAM) -> str | None:
    return shutil.which(name)


def _qemu_value(text: str) -> str:
    """QEMU's option syntax: a comma inside a value is written twice."""
    return text.replace(",", ",,")


def command_line(program: str, image: Path, socket_path: Path, *, readonly: bool) -> list[str]:
    img, sock = _qemu_value(str(image)), _qemu_value(str(socket_path))
    ro = "on" if readonly else "off"
    return [
        program,
        "--blockdev",
        f"driver=file,node-name=file0,filename={img},read-only={ro}",
        "--blockdev",
        f"driver=raw,node-name=disk0,file=file0,read-only={ro}",
        "--export",
        f"type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,"
        f"addr.path={sock},writable={'off' if readonly else 'on'}",
    ]


def guarded_command(argv: list[str]) -> list[str]:
    """`argv` under a wrapper that makes the kernel SIGKILL it when its parent thread dies."""
    wrapper = shutil.which(PDEATHSIG_WRAPPER)
    if wrapper is None:
        raise StorageDaemonError(
            f"{PDEATHSIG_WRAPPER} (util-linux) is not installed: a daemon started without it "
            f"would outlive a killed VMM"
        )
    return [wrapper, "--pdeathsig", "KILL", "--", *argv]


class _Spawner:
    """The one thread that forks the daemons (their parent-death signal is tied to it), started
    at first use and alive until the process exits."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[dict[str, Any], Future[subprocess.Popen[bytes]]]]
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def popen(self, **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qsd-spawner", daemon=True)
                self._thread.start()
        done: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((kwargs, done))
        return done.result()

    def _run(self) -> None:
        while True:
            kwargs, done = self._jobs.get()
            try:
                done.set_result(subprocess.Popen(**kwargs))
            except BaseException as exc:  # handed to the caller, who raises it
                done.set_exception(exc)


_spawner = _Spawner()


class StorageDaemon:
    """One running qemu-storage-daemon exporting one image."""

    def __init__(
        self,
        name: str,
        image: Path,
        size: int | None,
        socket_path: Path,
        *,
        program: str = PROGRAM,
        readonly: bool = False,
    ) -> None:
        found = find_program(program)
        if found is None:
            raise StorageDaemonError(
                f"{program} is not installed (Debian package "
                f"qemu-system-common): cannot back disk {name}"
            )
        fd, _capacity = open_image(BlkConfig(str(image), size, readonly))  # create if missing
        os.close(fd)
        self.name = name
        self.socket_path = socket_path
        self.on_exit: Callable[[str], None] | None = None
        self._stopping = False
        self._log = logging.getLogger(f"ptmig.vhost.{name}")
        socket_path.unlink(missing_ok=True)
        try:
            self._proc = _spawner.popen(
                args=guarded_command(command_line(found, image, socket_path, readonly=readonly)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                process_group=0,
            )  # Ctrl-C is the VMM's to handle
        except OSError as exc:
            raise StorageDaemonError(f"cannot start {program} for disk {name}: {exc}") from exc
        threading.Thread(target=self._stderr_pump, name=f"{name}-qsd-stderr", daemon=True).start()
        threading.Thread(target=self._waiter, name=f"{name}-qsd-waiter", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def exit_reason(self) -> str | None:
        """None while it runs; else how it ended."""
        code = self._proc.poll()
        if code is None:
            return None
        if code < 0:
            return f"{PROGRAM} {self._proc.pid} killed by signal {signal.Signals(-code).name}"
        return f"{PROGRAM} {self._proc.pid} exited with code {code}"

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping = True
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self.socket_path.unlink(missing_ok=True)

    def _waiter(self) -> None:
        self._proc.wait()
        callback = self.on_exit
        if not self._stopping and callback is not None:
            callback(self.exit_reason() or "exited")

    def _stderr_pump(self) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._log.warning("%s", line)
