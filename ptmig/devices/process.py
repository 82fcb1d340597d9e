"""The device process: one virtio device playing passthrough hardware, in its own process.

Owns the device's life from the inside: mapping guest RAM and the IOMMU table from inherited
fds, the register file, the virtqueues, the single-threaded event loop and the device end of
the control channel. Run as ``python -m ptmig.devices.process SPEC_JSON`` (the VMM's
`DeviceHandle.spawn` does this, passing the fds with ``pass_fds``).

A net device process runs under SCHED_BATCH (see `ptmig.net.sched`): an arriving frame or a TX
doorbell queues it to run rather than preempting the process that sent or rang, so bursts
reach it whole. A blk device keeps the default policy: it gets one doorbell per batch of log
records and the guest is waiting for it, so it should run at once.

The per-request work runs in native code by default (`ptmig.devices.nativepath`: C on a
thread of this process, `native/netpath.c` and `native/blkpath.c`): that thread waits on the
doorbell eventfds (the VMM binds each to QueueNotify with KVM_IOEVENTFD and datamatch = queue
index, so a guest doorbell reaches the device without a VM exit to the VMM) and the net
backend, and does what the Python data path below does, with the same rules. The Python event
loop then waits only on the control socket and the thread's event fd, and takes the thread's
lock around every command. With `datapath = "python"` in the device config, or without a C
compiler, the device model's Python data path runs instead, in this loop:

The event loop (selectors/epoll, no busy polling: an idle device sleeps in epoll_wait) waits on

* one doorbell eventfd per queue,
* the control socket (register accesses, admin commands),
* the device model's own fds (the net backend).

A kick drains the eventfd and runs that queue in batches of at most BATCH chains; after each
pass that returned buffers it sets InterruptStatus bit 0 and writes the interrupt eventfd once
(the device's MSI). Control messages are handled between batches, and every chain is completed
before the next starts, so whenever a command is handled no DMA is in flight: quiesce and IOTLB
invalidation can be acknowledged at once and are exact. (The native thread keeps the same
promise: it completes every request of a pass before releasing its lock.)

A guest that breaks the ring rules (QueueError) or points the device at memory the IOMMU does
not allow (DmaFault) gets DEVICE_NEEDS_RESET, a ``fault`` and a ``needs_reset`` event on the
control channel, and no further processing until the device is reset. The process survives.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import selectors
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np

from ptmig.devices import eventfd
from ptmig.devices.control import (
    ControlProtocolError,
    DeviceState,
    Event,
    FrameDecoder,
    Request,
    Response,
    encode,
)
from ptmig.devices.nativepath import BlkPath, NativePath, NetPath
from ptmig.devices.virtio.mmio import VirtioMmioRegisters
from ptmig.devices.virtio.queue import QueueError, QueueState, SplitQueue
from ptmig.iommu import PAGE_SIZE, DmaFault, DmaView, IommuTable
from ptmig.nativelib import NativeLibraryError
from ptmig.net.sched import use_batch_scheduling

from ..errors import PtmigError

log = logging.getLogger("ptmig.devices.process")

BATCH: Final = 64  # chains per queue per pass, so control messages are never starved
KINDS: Final = ("net", "blk")


class DeviceModel(Protocol):
    """What the runtime needs from a device model (BlkDevice, NetDevice)."""

    @property
    def device_id(self) -> int: ...
    @property
    def device_features(self) -> int: ...
    @property
    def num_queues(self) -> int: ...
    @property
    def queue_num_max(self) -> int: ...

    def config_space(self) -> bytearray: ...
    def process_queue(self, index: int, queue: SplitQueue, budget: int) -> bool: ...
    def extra_fds(self) -> list[int]: ...
    def on_fd_readable(self, fd: int) -> list[int]: ...
    def tick(self) -> None: ...
    def reset(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class LaunchSpec:
    """Everything the device process is started with (fd numbers are valid in the child)."""

    name: str
    kind: str
    config: dict[str, Any]
    guest_fd: int
    guest_size: int
    iommu_fd: int
    iova_pages: int
    control_fd: int
    irq_fd: int
    doorbell_fds: dict[int, int]
    pool_fd: int | None = None
    extra_fds: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["doorbell_fds"] = {str(k): v for k, v in self.doorbell_fds.items()}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> LaunchSpec:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"launch spec must be a JSON object, got {text[:80]!r}")
        d["doorbell_fds"] = {int(k): int(v) for k, v in d.get("doorbell_fds", {}).items()}
        spec = cls(**d)
        if spec.kind not in KINDS:
            raise ValueError(f"device kind must be one of {KINDS}, got {spec.kind!r}")
        return spec


def build_model(kind: str, config: dict[str, Any], dma: DmaView) -> DeviceModel:
    """Instantiate the device model of `kind` from its JSON config."""
    if kind == "blk":
        from ptmig.devices.blk import BlkConfig, BlkDevice

        return BlkDevice(BlkConfig.from_json(config), dma)
    if kind == "net":
        from ptmig.devices.net import NetConfig, NetDevice

        return NetDevice(NetConfig.from_json(config), dma)
    raise ValueError(f"device kind must be one of {KINDS}, got {kind!r}")


class CommandError(PtmigError):
    """A control command that cannot be carried out (bad arguments, wrong state)."""


class DeviceRuntime:
    """The device's event loop, register file, queues and control-channel server."""

    def __init__(
        self,
        name: str,
        kind: str,
        model: DeviceModel,
        dma: DmaView,
        control: socket.socket,
        doorbells: dict[int, int],
        irq_fd: int,
        native: NativePath | None = None,
    ) -> None:
        self.name, self.kind, self.model, self.dma = name, kind, model, dma
        self.native = native  # when set, its thread runs the data path (see nativepath)
        self.control, self.doorbells, self.irq_fd = control, doorbells, irq_fd
        self.regs = VirtioMmioRegisters(
            model.device_id,
            model.device_features,
            model.num_queues,
            model.queue_num_max,
            model.config_space(),
        )
        self.regs.on_queue_ready = self._queue_ready
        self.regs.on_queue_disable = lambda i: self._drop_queue(i)
        self.regs.on_notify = self._kick
        self.regs.on_reset = self._on_reset
        self.regs.on_driver_ok = self._kick_all
        self.regs.on_interrupt = lambda _status: self._signal_irq()
        self.queues: dict[int, SplitQueue] = {}
        self.pending: set[int] = set()
        self.quiesced = False
        self.broken: str | None = None
        self.running = True
        self.log_bitmap: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self.counters = {
            "requests": 0,
            "faults": 0,
            "interrupts": 0,
            "doorbells": 0,
            "control_requests": 0,
        }
        self._decoder = FrameDecoder()
        self._sel = selectors.DefaultSelector()
        self._tick_interval: float | None = getattr(model, "tick_interval", None)
        self._next_tick = time.monotonic()

    # -- hooks from the register file --------------------------------------------------------
    def _queue_ready(self, index: int, state: QueueState) -> None:
        self.queues[index] = SplitQueue(state, self.dma)
        self.pending.add(index)

    def _drop_queue(self, index: int) -> None:
        self.queues.pop(index, None)
        self.pending.discard(index)

    def _on_reset(self) -> None:
        self.queues.clear()
        self.pending.clear()
        self.broken = None
        self.model.reset()
        if self.native is not None:
            self.native.reset()

    def _kick(self, index: int) -> None:
        self.pending.add(index)

    def _kick_all(self) -> None:
        self.pending.update(self.queues)

    def _signal_irq(self) -> None:
        self.counters["interrupts"] += 1
        eventfd.signal(self.irq_fd)

    # -- the data path -----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.regs.driver_ok and not self.quiesced and self.broken is None

    def run_pending(self) -> None:
        """One pass over the kicked queues: at most BATCH chains each, one interrupt."""
        if not self.active or not self.pending or self.native is not None:
            return
        completed = 0
        for index in sorted(self.pending):
            queue = self.queues.get(index)
            if queue is None:
                self.pending.discard(index)
                continue
            before = queue.next_used
            try:
                more = self.model.process_queue(index, queue, BATCH)
            except (QueueError, DmaFault) as exc:
                completed += (queue.next_used - before) & 0xFFFF
                self._fault(index, exc)
                break
            completed += (queue.next_used - before) & 0xFFFF
            if not more:
                self.pending.discard(index)
        self.counters["requests"] += completed
        if completed:
            self.regs.raise_interrupt()

    def _fault(self, index: int, exc: QueueError | DmaFault) -> None:
        reason = exc.reason if isinstance(exc, QueueError) else str(exc)
        iova = exc.iova if isinstance(exc, DmaFault) else None
        self._report_fault(index, reason, iova, type(exc).__name__)

    def _break(self, reason: str, register_reason: str) -> None:
        """Stop using the rings until the driver resets the device: DEVICE_NEEDS_RESET, and a
        configuration change interrupt if the driver is running (virtio 1.x, 2.1.2)."""
        self.broken = reason
        self.pending.clear()
        self.regs.needs_reset(register_reason)

    def _report_fault(self, index: int, reason: str, iova: int | None, error: str) -> None:
        self.counters["faults"] += 1
        log.warning("%s: queue %d: %s; device needs reset", self.name, index, reason)
        self._break(reason, f"queue {index}: {reason}")
        self.send(
            Event(
                "fault",
                {
                    "device": self.name,
                    "queue": index,
                    "reason": reason,
                    "iova": iova,
                    "error": error,
                },
            )
        )
        self.send(Event("needs_reset", {"device": self.name, "reason": reason}))

    # -- the event loop ----------------------------------------------------------------------
    def run(self) -> None:
        self._sel.register(self.control, selectors.EVENT_READ, ("control", 0))
        if self.native is not None:  # its thread waits on the doorbells (and the backend)
            self._sel.register(self.native.event_fd, selectors.EVENT_READ, ("native", 0))
        else:
            for index, fd in self.doorbells.items():
                self._sel.register(fd, selectors.EVENT_READ, ("doorbell", index))
            for fd in self.model.extra_fds():
                self._sel.register(fd, selectors.EVENT_READ, ("model", fd))
        self.send(
            Event(
                "ready",
                {
                    "device": self.name,
                    "kind": self.kind,
                    "pid": os.getpid(),
                    "device_id": self.model.device_id,
                    "num_queues": self.model.num_queues,
                },
            )
        )
        if self.native is not None:
            self.native.start()
        while self.running:
            for key, _ in self._sel.select(self._timeout()):
                what, arg = key.data
                if what == "native":
                    eventfd.drain(key.fd)
                    self._native_events()
                elif what == "doorbell":
                    self.counters["doorbells"] += eventfd.drain(key.fd)
                    self._kick(arg)
                elif what == "model":
                    for index in self.model.on_fd_readable(arg):
                        self._kick(index)
                    if arg not in self.model.extra_fds():  # e.g. a backend that hung up
                        self._sel.unregister(arg)
                else:
                    self._read_control()
                if not self.running:
                    break
            self._maybe_tick()
            self.run_pending()

    def _timeout(self) -> float | None:
        if self.active and self.pending and self.native is None:
            return 0.0
        if self._tick_interval is None:
            return None
        return max(0.0, self._next_tick - time.monotonic())

    def _maybe_tick(self) -> None:
        if self._tick_interval is not None and time.monotonic() >= self._next_tick:
            self._next_tick = time.monotonic() + self._tick_interval
            self.model.tick()

    # -- the control channel -----------------------------------------------------------------
    def send(self, msg: Response | Event) -> None:
        try:
            self.control.sendall(encode(msg))
        except OSError as exc:
            log.warning("%s: control channel send failed (%s); stopping", self.name, exc)
            self.running = False

    def _read_control(self) -> None:
        try:
            data = self.control.recv(1 << 16)
        except OSError as exc:
            log.warning("%s: control channel read failed (%s); stopping", self.name, exc)
            self.running = False
            return
        if not data:
            log.info("%s: control channel closed by the VMM; stopping", self.name)
            self.running = False
            return
        try:
            self._decoder.feed(data)
            while self.running and (msg := self._decoder.next_message()) is not None:
                if not isinstance(msg, Request):
                    raise ControlProtocolError(f"device got a {type(msg).__name__}, not a request")
                with self._native_section():
                    response = self.handle(msg)
                self.send(response)
        except ControlProtocolError as exc:
            log.error("%s: bad control message (%s); stopping", self.name, exc)
            self.running = False

    @contextmanager
    def _native_section(self) -> Iterator[None]:
        """Around a control command: the native thread between passes, its state pulled into
        the Python objects before and pushed back after (see `ptmig.devices.nativepath`)."""
        native = self.native
        if native is None:
            yield
            return
        with native.locked():
            bits = native.pull(self.queues)
            if bits:
                self.regs.note_interrupt(bits)
            try:
                yield
            finally:
                native.push(self.queues, enabled=self.active, log=self.dma.write_log)

    def _native_events(self) -> None:
        """The native thread stopped the device on a fault, or has something to say."""
        assert self.native is not None
        with self._native_section():
            fault = self.native.take_fault()
            if fault is not None and self.broken is None:
                if fault.dma:
                    self.dma.fault_count += 1
                self._report_fault(
                    fault.queue, fault.reason, fault.iova, "DmaFault" if fault.dma else "QueueError"
                )
            for notice in self.native.notices():
                log.warning("%s: %s", self.name, notice)

    def handle(self, req: Request) -> Response:
        """Carry out one control command and build its response (never raises)."""
        self.counters["control_requests"] += 1
        handler = getattr(self, f"cmd_{req.cmd}", None)
        if handler is None:
            return Response(req.id, False, error=f"command {req.cmd!r} is not implemented")
        try:
            result, payload = handler(req.args)
        except (CommandError, ValueError, KeyError, TypeError) as exc:
            return Response(req.id, False, error=f"{req.cmd}: {exc}")
        return Response(req.id, True, result, payload=payload)

    # Each cmd_* takes the JSON args and returns (result, binary payload).
    def cmd_mmio_read(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        return {"value": self.regs.read(_arg(a, "offset"), _arg(a, "size"))}, b""

    def cmd_mmio_write(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        self.regs.write(_arg(a, "offset"), _arg(a, "size"), _arg(a, "value"))
        return {}, b""

    def cmd_reset(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        self.regs.reset()
        return {}, b""

    def cmd_quiesce(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        # Chains are completed synchronously: nothing is popped-but-unpushed at this point.
        self.quiesced = True
        return {"in_flight": 0, "queues": self._queue_json()}, b""

    def cmd_resume(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        self.quiesced = False
        self._kick_all()
        return {}, b""

    def cmd_iotlb_invalidate(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        pfn = a.get("iova_pfn")
        if pfn is not None:
            generation = self.dma.invalidate_iotlb(_arg(a, "iova_pfn"), _arg(a, "count"))
        else:
            generation = self.dma.invalidate_iotlb()
        return {"generation": generation}, b""

    def cmd_get_state(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        state = DeviceState(
            self.kind, self.regs.snapshot(), {i: q.state() for i, q in self.queues.items()}
        )
        return {"state": state.to_json()}, b""

    def cmd_set_state(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        state = DeviceState.from_json(a.get("state"))
        if state.kind != self.kind:
            raise CommandError(f"state of a {state.kind} device given to a {self.kind} device")
        queues: dict[int, SplitQueue] = {}
        for i, regs in enumerate(state.mmio.queues):
            saved = state.queues.get(i)
            if not regs.ready:
                continue
            if saved is None:
                raise CommandError(f"queue {i} is ready in the registers but has no state")
            expected = regs.queue_state()
            if (saved.size, saved.desc_addr, saved.avail_addr, saved.used_addr) != (
                expected.size,
                expected.desc_addr,
                expected.avail_addr,
                expected.used_addr,
            ):
                raise CommandError(f"queue {i} state {saved} disagrees with its registers {regs}")
            queues[i] = SplitQueue(saved, self.dma)
        self.regs.restore(state.mmio)  # validates; raises ValueError before anything changes
        self.queues = queues  # (a net RX backlog is kept: those frames are still on the link)
        self.broken = self.regs.needs_reset_reason
        self.pending = set(queues)
        return {}, b""

    def cmd_needs_reset(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """The VMM could not give the device a state it can run from (leaving shadow mode
        failed half-way): the rings are not touched again until the driver resets it."""
        reason = a.get("reason")
        if not isinstance(reason, str) or not reason:
            raise CommandError(f"argument 'reason' must be a non-empty string, got {reason!r}")
        log.warning("%s: %s; device needs reset", self.name, reason)
        self._break(reason, reason)
        self.send(Event("needs_reset", {"device": self.name, "reason": reason}))
        return {}, b""

    def cmd_dma_log_start(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        pages = -(-self.dma.guest_size // PAGE_SIZE)
        self.log_bitmap = np.zeros(-(-pages // 8), dtype=np.uint8)
        self.dma.write_log = self.log_bitmap
        return {"pages": pages}, b""

    def cmd_dma_log_stop(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        self.dma.write_log = None
        return {}, b""

    def cmd_dma_log_harvest(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        if self.log_bitmap is None:
            raise CommandError("DMA write logging was never started")
        payload = self.log_bitmap.tobytes()
        dirty = int(np.unpackbits(self.log_bitmap).sum())
        self.log_bitmap[:] = 0
        return {"dirty_pages": dirty, "pages": -(-self.dma.guest_size // PAGE_SIZE)}, payload

    def cmd_stats(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        model = self.model.stats()
        counters = dict(self.counters)
        if self.native is not None:  # the frame path's own counts replace the idle model's
            model = self.native.device_counters()
            for key, value in self.native.runtime_counters().items():
                counters[key] = counters.get(key, 0) + value
        return {
            **counters,
            "bytes": model.get("bytes", 0),
            "datapath": "native" if self.native is not None else "python",
            "dma_faults": self.dma.fault_count,
            "iotlb_hits": self.dma.iotlb_hits,
            "iotlb_misses": self.dma.iotlb_misses,
            "quiesced": self.quiesced,
            "broken": self.broken,
            "status": self.regs.status,
            "bad_register_accesses": self.regs.bad_reads + self.regs.bad_writes,
            "device": model,
            "queues": self._queue_positions(),
        }, b""

    def cmd_announce(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        announce = getattr(self.model, "announce", None)
        if announce is None:
            raise CommandError(f"a {self.kind} device has nothing to announce")
        announce()
        return {}, b""

    def cmd_shutdown(self, a: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        self.running = False
        return {}, b""

    def _queue_positions(self) -> dict[str, dict[str, int]]:
        """Each ready queue's positions with the ring addresses the driver wrote (guest
        addresses even while the device works on shadow rings): for a stall report."""
        regs = self.regs.snapshot().queues
        return {
            str(i): {
                "size": q.size,
                "next_avail": q.next_avail,
                "next_used": q.next_used,
                "avail_addr": regs[i].driver,
                "used_addr": regs[i].device,
            }
            for i, q in self.queues.items()
            if i < len(regs)
        }

    def _queue_json(self) -> dict[str, dict[str, int]]:
        return {
            str(i): {"next_avail": q.next_avail, "next_used": q.next_used}
            for i, q in self.queues.items()
        }


class ControlLogHandler(logging.Handler):
    """Forwards the device's WARNING-and-above log records as ``log`` events."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        super().__init__(logging.WARNING)
        self.runtime = runtime
        self._busy = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._busy or not self.runtime.running:
            return  # a failing send logs a warning itself: never recurse
        self._busy = True
        try:
            self.runtime.send(
                Event(
                    "log",
                    {
                        "device": self.runtime.name,
                        "level": record.levelname,
                        "message": record.getMessage(),
                    },
                )
            )
        finally:
            self._busy = False


def _arg(args: dict[str, Any], key: str) -> int:
    value = args.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandError(f"argument {key!r} must be an integer, got {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    if len(argv) != 1:
        print("usage: python -m ptmig.devices.process LAUNCH_SPEC_JSON", file=sys.stderr)
        return 2
    spec = LaunchSpec.from_json(argv[0])
    if spec.kind == "net":  # woken per frame: take bursts whole, do not preempt the sender
        use_batch_scheduling()
    control = socket.socket(fileno=spec.control_fd)
    try:
        guest = mmap.mmap(
            spec.guest_fd, spec.guest_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        pool = None
        if spec.pool_fd is not None:
            pool = mmap.mmap(
                spec.pool_fd,
                os.fstat(spec.pool_fd).st_size,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
            )
        table = IommuTable.attach(spec.iommu_fd, spec.iova_pages)
        dma = DmaView(table, guest, pool, name=spec.name)
        model = build_model(spec.kind, spec.config, dma)
    except Exception as exc:  # report any startup failure to the VMM, then exit
        log.error("%s: cannot start: %s", spec.name, exc)
        try:
            control.sendall(
                encode(Event("startup_failed", {"device": spec.name, "reason": str(exc)}))
            )
        except OSError:
            pass
        return 1
    native = native_path(spec, model, guest, pool, table)
    runtime = DeviceRuntime(
        spec.name, spec.kind, model, dma, control, spec.doorbell_fds, spec.irq_fd, native
    )
    logging.getLogger().addHandler(ControlLogHandler(runtime))
    try:
        runtime.run()
    finally:
        if native is not None:  # its thread uses the backend or image fd: stop it first
            native.close()
        model.close()
    return 0


def native_path(
    spec: LaunchSpec,
    model: DeviceModel,
    guest: mmap.mmap,
    pool: mmap.mmap | None,
    table: IommuTable,
) -> NativePath | None:
    """The native data path of a device whose config asks for it (the default), or None: then
    the model's Python data path runs (saying why once, if the native one was asked for)."""
    from ptmig.devices.blk import BlkDevice
    from ptmig.devices.net import NetDevice

    if getattr(getattr(model, "cfg", None), "datapath", "python") != "native":
        return None
    iommu = table.entries
    try:
        if isinstance(model, NetDevice):
            return NetPath(
                guest=guest,
                pool=pool,
                iommu=iommu,
                backend=model.backend,
                doorbells=spec.doorbell_fds,
                irq_fd=spec.irq_fd,
            )
        if isinstance(model, BlkDevice):
            return BlkPath(
                guest=guest,
                pool=pool,
                iommu=iommu,
                image_fd=model.fd,
                capacity=model.capacity,
                readonly=model.cfg.readonly,
                serial=model.cfg.serial.encode(),
                doorbells=spec.doorbell_fds,
                irq_fd=spec.irq_fd,
            )
    except (NativeLibraryError, OSError) as exc:
        log.info("%s: native data path unavailable (%s); using the Python one", spec.name, exc)
    return None


if __name__ == "__main__":
    sys.exit(main())
