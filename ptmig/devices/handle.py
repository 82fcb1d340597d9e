"""The VMM's handle on one device process: spawn it, talk to it, notice when it dies.

Owns the VMM side of a device: the eventfds (one doorbell per queue, which the VMM binds to
QueueNotify with KVM_IOEVENTFD; one interrupt, which the VMM watches to wake halted vCPUs),
the child process, and the client end of the control channel (see `control`).

Threads (all daemons, all per handle):

* reader   -- reads control frames; responses complete the matching request, events are queued
* events   -- calls the `on_event` callbacks, one event at a time, in order; a callback may call
              back into the handle (it does not run on the reader thread)
* waiter   -- waits for the process to exit
* stderr   -- forwards the child's stderr lines to ``logging`` (logger ``ptmig.device.NAME``)

When the process exits or the control channel hits EOF, the handle is marked gone with a reason
that says which and how (exit code or signal), pending and later calls raise DeviceGoneError,
and the callbacks get a ``DeviceEvent("gone", {"reason": ...})``. The VMM stays up.

Every command method blocks until the device answers or `timeout` seconds pass, and is safe to
call from several threads at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ptmig.devices import eventfd
from ptmig.devices.control import (
    ControlProtocolError,
    Event,
    FrameDecoder,
    Request,
    Response,
    encode,
    recv_message,
)
from ptmig.devices.process import LaunchSpec
from ptmig.iommu import IommuTable
from ptmig.layout import ABI_MMIO_BASE_GPA, ABI_MMIO_STRIDE

from ..errors import PtmigError

NUM_QUEUES: Final = {"net": 2, "blk": 1}
DEFAULT_TIMEOUT: Final = 10.0


class DeviceError(PtmigError):
    """Base of everything a DeviceHandle raises."""


class DeviceStartError(DeviceError):
    """The device process could not be started or reported a startup failure."""


class DeviceGoneError(DeviceError):
    """The device process is dead or its control channel is closed."""


class DeviceTimeoutError(DeviceError):
    """The device did not answer a command in time (it is not declared dead for that)."""


class DeviceCommandError(DeviceError):
    """The device refused a command and said why."""


@dataclass(frozen=True)
class DeviceEvent:
    """An asynchronous event: ``fault``, ``needs_reset``, ``log`` from the device, or
    ``gone`` from the handle itself."""

    device: str
    name: str
    data: dict[str, Any] = field(default_factory=dict)


EventCallback = Callable[[DeviceEvent], None]


class Liveness:
    """`alive` and `gone_reason` of something that can die under the VMM: a device process, a
    vhost-user backend or its connection. Subclasses set `_gone` to the reason, once."""

    _gone: str | None = None

    @property
    def alive(self) -> bool:
        return self._gone is None

    @property
    def gone_reason(self) -> str | None:
        return self._gone


class _Slot:
    __slots__ = ("done", "response", "gone")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: Response | None = None
        self.gone: str | None = None


class DeviceHandle(Liveness):
    """A running device process as the VMM sees it. Create with `spawn`."""

    def __init__(
        self,
        name: str,
        kind: str,
        index: int,
        proc: subprocess.Popen[bytes],
        sock: socket.socket,
        doorbells: dict[int, int],
        irq_fd: int,
        timeout: float,
    ) -> None:
        self.name, self.kind, self.index = name, kind, index
        self.mmio_base = ABI_MMIO_BASE_GPA + index * ABI_MMIO_STRIDE
        self.mmio_size = ABI_MMIO_STRIDE
        self.doorbell_eventfds = doorbells
        self.irq_eventfd = irq_fd
        self.timeout = timeout
        self._proc = proc
        self._sock = sock
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._callbacks: list[EventCallback] = []
        self._events: queue.Queue[DeviceEvent | None] = queue.Queue()
        self._ready = threading.Event()
        self._startup_error: str | None = None
        self._gone: str | None = None
        self._closing = False
        self._child_log = logging.getLogger(f"ptmig.device.{name}")
        for target, tname in (
            (self._reader, "reader"),
            (self._dispatcher, "events"),
            (self._waiter, "waiter"),
            (self._stderr_pump, "stderr"),
        ):
            threading.Thread(target=target, name=f"{name}-{tname}", daemon=True).start()

    # -- creation ----------------------------------------------------------------------------
    @classmethod
    def spawn(
        cls,
        kind: str,
        index: int,
        config: dict[str, Any],
        guest_memfd: int,
        guest_size: int,
        iommu: IommuTable,
        pool_fd: int | None = None,
        *,
        name: str | None = None,
        pass_fds: Sequence[int] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> DeviceHandle:
        """Start the device process for device `index` and wait until it is ready.

        `config` is the device's JSON config (blk: path, size, readonly, serial; net: mac,
        backend). `pass_fds` are extra fds the child inherits (e.g. a backend ``fd:N``).
        Raises DeviceStartError with the child's reason if it cannot start.
        """
        if kind not in NUM_QUEUES:
            raise ValueError(f"device kind must be one of {sorted(NUM_QUEUES)}, got {kind!r}")
        name = name or f"{kind}{index}"
        doorbells = {q: eventfd.create() for q in range(NUM_QUEUES[kind])}
        irq_fd = eventfd.create()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = LaunchSpec(
            name=name,
            kind=kind,
            config=config,
            guest_fd=guest_memfd,
            guest_size=guest_size,
            iommu_fd=iommu.fd,
            iova_pages=iommu.iova_pages,
            control_fd=child.fileno(),
            irq_fd=irq_fd,
            doorbell_fds=doorbells,
            pool_fd=pool_fd,
            extra_fds=list(pass_fds),
        )
        fds = [guest_memfd, iommu.fd, child.fileno(), irq_fd, *doorbells.values(), *pass_fds]
        if pool_fd is not None:
            fds.append(pool_fd)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ptmig.devices.process", spec.to_json()],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                process_group=0,
            )  # Ctrl-C is the VMM's to handle
        except OSError as exc:
            parent.close()
            child.close()
            for fd in (*doorbells.values(), irq_fd):
                os.close(fd)
            raise DeviceStartError(f"cannot start the {name} device process: {exc}") from exc
        child.close()
        handle = cls(name, kind, index, proc, parent, doorbells, irq_fd, timeout)
        if not handle._ready.wait(timeout) or handle._startup_error or handle._gone:
            reason = handle._startup_error or handle._gone or f"not ready after {timeout} s"
            handle.close()
            raise DeviceStartError(f"device {name} failed to start: {reason}")
        return handle

    # -- state -------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._proc.pid

    def on_event(self, callback: EventCallback) -> None:
        """Call `callback(DeviceEvent)` for every device event and for ``gone``."""
        with self._lock:
            self._callbacks.append(callback)

    # -- requests ----------------------------------------------------------------------------
    def request(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Response:
        """Send one command and wait for its response (raises on error, death or timeout)."""
        slot = _Slot()
        with self._lock:
            if self._gone is not None:
                raise DeviceGoneError(f"device {self.name} is gone: {self._gone}")
            req_id = next(self._ids)
            self._pending[req_id] = slot
        try:
            with self._send_lock:
                self._sock.sendall(encode(Request(req_id, cmd, args or {})))
        except OSError as exc:
            self._mark_gone(f"control channel send failed: {exc}")
        wait = self.timeout if timeout is None else timeout
        if not slot.done.wait(wait):
            with self._lock:
                self._pending.pop(req_id, None)
            raise DeviceTimeoutError(f"device {self.name} did not answer {cmd} in {wait} s")
        if slot.gone is not None:
            raise DeviceGoneError(f"device {self.name} is gone: {slot.gone}")
        assert slot.response is not None
        if not slot.response.ok:
            raise DeviceCommandError(f"device {self.name}: {slot.response.error}")
        return slot.response

    def mmio_read(self, offset: int, size: int) -> int:
        """A register read the VMM forwards from KVM_EXIT_MMIO (offset from mmio_base)."""
        return int(self.request("mmio_read", {"offset": offset, "size": size}).result["value"])

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """A register write the VMM forwards (QueueNotify included, if not on an ioeventfd)."""
        self.request("mmio_write", {"offset": offset, "size": size, "value": value})

    def reset(self) -> None:
        self.request("reset")

    def quiesce(self) -> dict[str, Any]:
        """Stop starting new requests; returns once no DMA is in flight (with queue indices)."""
        return self.request("quiesce").result

    def resume(self) -> None:
        self.request("resume")

    def iotlb_invalidate(self, iova_pfn: int | None = None, count: int = 1) -> int:
        """Flush the device's IOTLB (all, or pages [iova_pfn, +count)); returns the table
        generation the device saw after the flush."""
        args = {} if iova_pfn is None else {"iova_pfn": iova_pfn, "count": count}
        return int(self.request("iotlb_invalidate", args).result["generation"])

    def get_state(self) -> dict[str, Any]:
        """Register file + queue positions, as JSON-ready data (see control.DeviceState)."""
        return dict(self.request("get_state").result["state"])

    def set_state(self, state: dict[str, Any]) -> None:
        """Program the device from `get_state` output (validated by the device)."""
        self.request("set_state", {"state": state})

    def needs_reset(self, reason: str) -> None:
        """Mark the device DEVICE_NEEDS_RESET (with a configuration change interrupt for a
        running driver): it leaves its rings alone until the driver resets it."""
        self.request("needs_reset", {"reason": reason})

    def dma_log_start(self) -> None:
        self.request("dma_log_start")

    def dma_log_stop(self) -> None:
        self.request("dma_log_stop")

    def dma_log_harvest(self) -> npt.NDArray[np.uint8]:
        """Bitmap (bit p%8 of byte p//8 = guest page p) of pages DMA wrote since the last
        harvest; the device clears it."""
        return np.frombuffer(self.request("dma_log_harvest").payload, dtype=np.uint8).copy()

    def stats(self) -> dict[str, Any]:
        return self.request("stats").result

    def announce(self) -> None:
        """net only: broadcast this MAC's new location (after switchover)."""
        self.request("announce")

    def kick(self, queue_index: int) -> None:
        """Ring queue `queue_index`'s doorbell from the VMM (what KVM_IOEVENTFD does for a guest
        write; the shadow engine forwards trapped doorbells this way)."""
        eventfd.signal(self.doorbell_eventfds[queue_index])

    def wait_interrupt(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the interrupt eventfd; consume it. For tests and tools:
        the VMM normally polls `irq_eventfd` itself."""
        readable, _, _ = select.select([self.irq_eventfd], [], [], timeout)
        return bool(readable) and eventfd.drain(self.irq_eventfd) > 0

    # -- teardown ----------------------------------------------------------------------------
    def close(self, timeout: float = 2.0) -> None:
        """Shut the device down (politely, then by force) and release its fds."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self.alive:
            try:
                self.request("shutdown", timeout=timeout)
            except DeviceError:
                pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._mark_gone("closed by the VMM")
        self._sock.close()
        for fd in (*self.doorbell_eventfds.values(), self.irq_eventfd):
            os.close(fd)
        self._events.put(None)

    def __enter__(self) -> DeviceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- threads -----------------------------------------------------------------------------
    def _mark_gone(self, reason: str) -> None:
        with self._lock:
            if self._gone is not None:
                return
            self._gone = reason
            pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.gone = reason
            slot.done.set()
        self._ready.set()
        if not self._closing:
            logging.getLogger("ptmig.devices").warning("device %s is gone: %s", self.name, reason)
        self._events.put(
            DeviceEvent(self.name, "gone", {"reason": reason, "expected": self._closing})
        )

    def _exit_reason(self) -> str:
        try:
            code = self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "control channel closed while the process is still running"
        if code < 0:
            return f"device process {self._proc.pid} killed by signal {signal.Signals(-code).name}"
        return f"device process {self._proc.pid} exited with code {code}"

    def _reader(self) -> None:
        decoder = FrameDecoder()
        reason = "control channel closed"
        try:
            while True:
                msg = recv_message(self._sock, decoder)
                if msg is None:
                    break
                if isinstance(msg, Response):
                    with self._lock:
                        slot = self._pending.pop(msg.id, None)
                    if slot is not None:
                        slot.response = msg
                        slot.done.set()
                elif isinstance(msg, Event):
                    self._device_event(msg)
        except (OSError, ControlProtocolError) as exc:
            reason = f"control channel failed: {exc}"
        if self._closing:
            self._mark_gone("closed by the VMM")
        else:
            self._mark_gone(f"{self._exit_reason()} ({reason})")

    def _device_event(self, msg: Event) -> None:
        if msg.name == "ready":
            self._ready.set()
        elif msg.name == "startup_failed":
            self._startup_error = str(msg.data.get("reason"))
            self._ready.set()
        else:
            self._events.put(DeviceEvent(self.name, msg.name, dict(msg.data)))

    def _dispatcher(self) -> None:
        log = logging.getLogger("ptmig.devices")
        while (event := self._events.get()) is not None:
            with self._lock:
                callbacks = list(self._callbacks)
            for cb in callbacks:
                try:
                    cb(event)
                except Exception:
                    log.exception("device %s: event callback failed on %s", self.name, event.name)

    def _waiter(self) -> None:
        self._proc.wait()
        if not self._closing:
            self._mark_gone(self._exit_reason())

    def _stderr_pump(self) -> None:
        assert self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            level_name, _, text = line.partition(" ")
            level = logging.getLevelName(level_name)
            if isinstance(level, int):
                self._child_log.log(level, "%s", text)
            elif line:
                self._child_log.warning("%s", line)
