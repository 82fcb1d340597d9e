"""The VMM's side of one vhost-user-blk device: a virtio-mmio disk whose backend nobody here wrote.

Owns, for one `[[disk]] backend = "vhost-user"`:

* the guest-visible virtio-mmio register file (`VirtioMmioRegisters`, the same one ptmig's own
  devices use), with the backend's config space (GET_CONFIG) and the features both the backend
  and ptmig can pass through;
* the negotiation with the backend (features, protocol features, REPLY_ACK) and the memory table:
  guest RAM as one region of the guest memfd, by ADD_MEM_REG where CONFIGURE_MEM_SLOTS is offered,
  else SET_MEM_TABLE;
* the rings: at DRIVER_OK each ready queue is programmed with NUM, BASE, ADDR (the VMM's user
  addresses of the guest's rings), CALL, KICK and ENABLE. The kick eventfd is the queue's doorbell:
  `attach` binds it to QueueNotify with KVM_IOEVENTFD, so a guest notify reaches the backend
  without a VMM exit. The call eventfd is the device's MSI: the VMM adds it to what wakes a halted
  vCPU, exactly as a device process's interrupt eventfd;
* stopping the rings exactly (`quiesce`): GET_VRING_BASE does not wait for requests the backend
  has already taken, so with the vCPUs paused the frontend first waits until each used idx has
  caught up with its avail idx, then stops the ring; `resume` restarts it from that base;
* the backend's own dirty log (VHOST_F_LOG_ALL, SET_LOG_BASE with a shared memfd): harvested by
  swapping in a second log (SET_LOG_BASE again) and reading the one the backend has let go, so no
  bit set concurrently is lost. This relies on the backend no longer writing a log once it has
  answered the SET_LOG_BASE that replaces it (libvhost-user, hence qemu-storage-daemon, unmaps
  the old log inside the handler, on the thread that also completes requests).

It offers the interface of a device process's `DeviceHandle` (registers, quiesce/resume,
get/set state, DMA log, `gone` events), so the machine, the DMA-tracking strategies and QMP treat it
like any other device. A backend that closes its socket, exits or breaks the protocol is reported
as a ``gone`` device event and the device is marked DEVICE_NEEDS_RESET; the VMM stays up.

Shadowing (`set_backend_view`): the shadow engine stops the rings exactly (`quiesce`, vCPUs paused)
and hands over a `BackendView`, pool memory laid out like guest RAM (guest page g's device buffer
at view page g), holding shadow rings it built at the guest's ring addresses. The memory table
then becomes that view at GPA 0 and nothing of guest RAM: the backend reaches device buffers
only, at the addresses the guest's descriptors carry. The swap takes two SET_MEM_TABLEs, since
qemu-storage-daemon 7.2 remaps every ring it was ever given on each table (a table that misses
one makes it panic) and crashes at the next kick after a REM_MEM_REG of the ring region: first
[old at GPA 0, new above it], then every ring moved to its address in the new region (NUM, BASE,
ADDR; no kick, so no request runs under the mixed table), then [new at GPA 0]. `resume` then
restarts the rings (CALL, KICK) on the fds the engine's data plane waits on and rings. Leaving
is the same with `None`: back to guest RAM. For x-dma-tracking intercept the view is
`beside_ram`: the final table is guest RAM split around the ring pages, which come from the
view at the same addresses (the backend writes data buffers in guest RAM, and a buffer on a ring
page in the ring's device buffer, as an IOMMU would); the transition table in both directions
is [guest RAM, the whole view above it].
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from ...layout import ABI_MMIO_BASE_GPA, ABI_MMIO_STRIDE, PAGE_SHIFT, PAGE_SIZE
from .. import eventfd
from ..control import DeviceState
from ..handle import (
    DeviceCommandError,
    DeviceEvent,
    DeviceGoneError,
    DeviceTimeoutError,
    Liveness,
)
from ..virtio import constants as c
from ..virtio.mmio import VirtioMmioRegisters
from ..virtio.queue import QueueState, ring_regions
from . import codec
from .backend_channel import BackendChannel
from .codec import MemRegion, ProtocolFeature, Request
from .connection import VhostUserConnection, VhostUserError
from .daemon import StorageDaemon

if TYPE_CHECKING:
    from ...memory import GuestMemory

log = logging.getLogger(__name__)

QUEUE_NUM_MAX: Final = 256
#: virtio-blk config bytes asked for (qemu-storage-daemon 7.2 answers at most 60).
CONFIG_BYTES: Final = 60
#: virtio-blk features ptmig passes from the backend to the guest: the ones that change nothing
#: in how ptmig reads the rings (no EVENT_IDX, no INDIRECT_DESC, no MQ).
BLK_PASSTHROUGH_FEATURES: Final = c.feature_mask(1, 2, 6, 9, 10)  # SIZE_MAX SEG_MAX BLK_SIZE
#                                                                    FLUSH TOPOLOGY
WANTED_PROTOCOL: Final = (
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.MQ,
    ProtocolFeature.LOG_SHMFD,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.CONFIG,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
)
DRAIN_TIMEOUT: Final = 10.0
RESET_DRAIN_TIMEOUT: Final = 5.0


def _bit(word: int, bit: int) -> bool:
    return bool(word >> bit & 1)


@dataclass(frozen=True)
class BackendView:
    """Memory a backend may see in place of guest RAM: `size` bytes of `fd` from `offset`,
    laid out like guest RAM (GPA g at byte `offset` + g), mapped in this process as `mapping`
    (the whole of `fd`, at user address `user_addr` - `offset`). `beside_ram`: the backend keeps
    guest RAM and only the pages of its rings come from the view (x-dma-tracking intercept:
    the device writes the data buffers in guest RAM itself, and a buffer the driver keeps on
    a ring page is written in the ring's device buffer, as through an IOMMU)."""

    fd: int
    offset: int
    size: int
    user_addr: int
    mapping: mmap.mmap
    beside_ram: bool = False

    def read_u16(self, gpa: int) -> int:
        if not 0 <= gpa <= self.size - 2:
            raise ValueError(f"GPA {gpa:#x} is outside the DMA view of {self.size:#x} bytes")
        at = self.offset + gpa
        return int.from_bytes(self.mapping[at : at + 2], "little")


def _covering(
    before: list[tuple[MemRegion, int]], after: list[tuple[MemRegion, int]]
) -> list[tuple[MemRegion, int]]:
    """A memory table holding both `before` (at its addresses) and every region of `after` that
    `before` lacks, placed above `before`'s highest GPA: the table a backend is given while its
    rings move from one to the other (the user addresses of both stay covered)."""
    mapped = {(r.user_addr, r.size, r.mmap_offset) for r, _ in before}
    top = max(r.gpa + r.size for r, _ in before)
    out = list(before)
    for r, fd in after:
        if (r.user_addr, r.size, r.mmap_offset) not in mapped:
            out.append((MemRegion(top, r.size, r.user_addr, r.mmap_offset), fd))
            top += r.size
    return out


def _ring_pages(rings: Iterable[QueueState]) -> list[tuple[int, int]]:
    """The guest pages the rings occupy, as sorted, merged [first, end) page ranges."""
    pages = sorted(
        {
            p
            for qs in rings
            for addr, length in ring_regions(qs)
            for p in range(addr >> PAGE_SHIFT, ((addr + length - 1) >> PAGE_SHIFT) + 1)
        }
    )
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def _split_table(
    mem: GuestMemory, view: BackendView, remapped: list[tuple[int, int]]
) -> list[tuple[MemRegion, int]]:
    """Guest RAM at its addresses, except the page ranges `remapped`, which come from `view`
    at the same addresses: the memory table as an IOMMU that remaps only the ring pages."""
    out: list[tuple[MemRegion, int]] = []
    at = 0
    for first, end in remapped:
        start, stop = first * PAGE_SIZE, min(end * PAGE_SIZE, mem.size)
        if start >= stop:
            continue
        if start > at:
            out.append((MemRegion(at, start - at, mem.host_address + at, at), mem.fd))
        out.append(
            (MemRegion(start, stop - start, view.user_addr + start, view.offset + start), view.fd)
        )
        at = stop
    if at < mem.size:
        out.append((MemRegion(at, mem.size - at, mem.host_address + at, at), mem.fd))
    return out


class _LogBuffer:
    """One shared dirty-log memfd the backend can be pointed at."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.bits: npt.NDArray[np.uint8] = np.frombuffer(self.map, dtype=np.uint8)

    def take(self) -> npt.NDArray[np.uint8]:
        """Copy and clear (only once the backend no longer writes it)."""
        out = self.bits.copy()
        self.bits[:] = 0
        return out

    def close(self) -> None:
        del self.bits
        self.map.close()
        os.close(self.fd)


class VhostUserBlk(Liveness):
    """One vhost-user-blk device as the VMM holds it. Create with `open`."""

    kind = "blk"

    def __init__(
        self,
        name: str,
        index: int,
        conn: VhostUserConnection,
        memory: GuestMemory,
        daemon: StorageDaemon | None = None,
    ) -> None:
        self.name, self.index = name, index
        self.mmio_base = ABI_MMIO_BASE_GPA + index * ABI_MMIO_STRIDE
        self.mmio_size = ABI_MMIO_STRIDE
        self.timeout = conn.timeout
        self.doorbell_eventfds = {0: eventfd.create()}
        self.irq_eventfd = eventfd.create()
        self._conn, self._memory, self._daemon = conn, memory, daemon
        self._lock = threading.RLock()
        self._callbacks: list[Callable[[DeviceEvent], None]] = []
        self._gone: str | None = None
        self._closing = False
        self._started: dict[int, QueueState] = {}
        self._bases: dict[int, int] = {}  # stopped queues: where the backend stopped
        # quiesced: no ring starts until `resume` (`set_state` only records where they start)
        self._quiesced = False
        self._rings: dict[int, QueueState] = {}  # every ring the backend was given addresses of
        self._view: BackendView | None = None  # shadowing: the backend sees this, not guest RAM
        self._logs: list[_LogBuffer] = []
        self._backend_channel: BackendChannel | None = None
        self._logging = False
        self.counters = {"queue_starts": 0, "queue_stops": 0, "log_harvests": 0, "table_swaps": 0}
        conn.on_gone = self._backend_gone
        if daemon is not None:
            daemon.on_exit = self._backend_gone
        try:
            self._negotiate()
        except BaseException:
            if self._backend_channel is not None:
                self._backend_channel.close()
            self._close_fds()
            raise
        self.regs = VirtioMmioRegisters(
            c.VIRTIO_ID_BLOCK, self.device_features, 1, QUEUE_NUM_MAX, self.config
        )
        self.regs.on_driver_ok = self._driver_ok
        self.regs.on_queue_ready = self._queue_ready
        self.regs.on_queue_disable = self._queue_disable
        self.regs.on_reset = self._reset
        self.regs.on_notify = self.kick
        self.regs.on_interrupt = self._interrupt

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        name: str,
        index: int,
        memory: GuestMemory,
        *,
        socket_path: Path | None = None,
        image: Path | None = None,
        size: int | None = None,
        spawn: str | None = None,
        timeout: float = 10.0,
    ) -> VhostUserBlk:
        """Connect to the backend at `socket_path`, or start `spawn` on `image` and connect."""
        daemon: StorageDaemon | None = None
        if spawn is not None:
            assert image is not None
            run_dir = Path(tempfile.mkdtemp(prefix="ptmig-vhost-"))
            daemon = StorageDaemon(name, image, size, run_dir / f"{name}.sock", program=spawn)
            socket_path = daemon.socket_path
        assert socket_path is not None
        try:
            conn = VhostUserConnection.connect(
                str(socket_path), name, timeout=timeout, wait=timeout if daemon is not None else 0.0
            )
        except VhostUserError as exc:
            reason = daemon.exit_reason() if daemon is not None else None
            if daemon is not None:
                daemon.stop()
            raise DeviceGoneError(f"{exc}{f' ({reason})' if reason else ''}") from exc
        try:
            return cls(name, index, conn, memory, daemon)
        except BaseException:
            conn.close()
            if daemon is not None:
                daemon.stop()
            raise

    def _negotiate(self) -> None:
        features = self._u64(Request.GET_FEATURES)
        for bit, why in (
            (c.VIRTIO_F_VERSION_1, "virtio 1.x"),
            (codec.F_PROTOCOL_FEATURES, "protocol features (config space)"),
        ):
            if not _bit(features, bit):
                raise DeviceCommandError(
                    f"vhost-user backend {self.name} offers features "
                    f"{features:#x} without bit {bit} ({why})"
                )
        offered = self._u64(Request.GET_PROTOCOL_FEATURES)
        wanted = sum(1 << f for f in WANTED_PROTOCOL)
        self.protocol_features = offered & wanted
        if not _bit(self.protocol_features, ProtocolFeature.CONFIG):
            raise DeviceCommandError(
                f"vhost-user backend {self.name} does not offer the CONFIG "
                f"protocol feature (offers {offered:#x})"
            )
        self._call(Request.SET_PROTOCOL_FEATURES, codec.U64(self.protocol_features))
        self._conn.reply_ack = _bit(self.protocol_features, ProtocolFeature.REPLY_ACK)
        if _bit(self.protocol_features, ProtocolFeature.MQ):
            queues = self._u64(Request.GET_QUEUE_NUM)
            if queues < 1:
                raise DeviceCommandError(f"vhost-user backend {self.name} has {queues} queues")
        if _bit(self.protocol_features, ProtocolFeature.BACKEND_REQ):
            self._open_backend_channel()
        self._call(Request.SET_OWNER)
        self.backend_features = features
        self.device_features = (features & BLK_PASSTHROUGH_FEATURES) | (1 << c.VIRTIO_F_VERSION_1)
        self._call(Request.SET_FEATURES, codec.U64(self._feature_word(0)))
        self.config = self._read_config()
        self._send_memory_table()

    def _open_backend_channel(self) -> None:
        channel = BackendChannel.pair(
            self.name,
            on_config_change=self._config_changed,
            on_broken=self._backend_gone,
            reply_ack=self._conn.reply_ack,
        )
        self._backend_channel = channel
        self._call(Request.SET_BACKEND_REQ_FD, None, (channel.backend_fd,))
        channel.start()

    def _config_changed(self) -> bool:
        """The backend says its config space changed (backend channel): read it again and
        tell the guest (new generation, config-change interrupt). False if that failed."""
        try:
            fresh = self._read_config()
        except (DeviceCommandError, DeviceGoneError) as exc:
            log.warning("device %s: re-reading the changed config failed: %s", self.name, exc)
            return False
        with self._lock:
            self.config[:] = fresh
            regs: VirtioMmioRegisters | None = getattr(self, "regs", None)  # None: negotiating
            if regs is not None:
                regs.config_changed()
        return True

    def _interrupt(self, _status: int) -> None:
        """An interrupt the register file raised itself (config change, needs reset): the
        same MSI as the backend's completions."""
        eventfd.signal(self.irq_eventfd)

    def _read_config(self) -> bytearray:
        reply = self._call(
            Request.GET_CONFIG, codec.Config(0, CONFIG_BYTES, 0, bytes(CONFIG_BYTES))
        )
        assert isinstance(reply, codec.Config)
        if reply.size == 0:
            raise DeviceCommandError(
                f"vhost-user backend {self.name} refused GET_CONFIG of {CONFIG_BYTES} bytes"
            )
        return bytearray(reply.data)

    def _regions(self) -> list[tuple[MemRegion, int]]:
        """The memory table (region, fd): guest RAM, one region of the guest memfd; while
        shadowed, the DMA view in its place, or above it (`BackendView.beside_ram`)."""
        view = self._view
        mem = self._memory
        ram = (MemRegion(0, mem.size, mem.host_address, 0), mem.fd)
        if view is None:
            return [ram]
        if view.beside_ram:
            return _split_table(mem, view, _ring_pages(self._rings.values()))
        return [(MemRegion(0, view.size, view.user_addr, view.offset), view.fd)]

    def _beside(self, view: BackendView) -> list[tuple[MemRegion, int]]:
        """Guest RAM at GPA 0 and the whole of `view` above it: the table a backend holds while
        its rings move between guest RAM and a `beside_ram` view."""
        mem = self._memory
        ram = (MemRegion(0, mem.size, mem.host_address, 0), mem.fd)
        return [ram, (MemRegion(mem.size, view.size, view.user_addr, view.offset), view.fd)]

    def _set_mem_table(self, regions: list[tuple[MemRegion, int]]) -> None:
        self._call(
            Request.SET_MEM_TABLE,
            codec.MemTable(tuple(r for r, _ in regions)),
            tuple(fd for _, fd in regions),
        )

    def _send_memory_table(self) -> None:
        regions = self._regions()
        if _bit(self.protocol_features, ProtocolFeature.CONFIGURE_MEM_SLOTS):
            slots = self._u64(Request.GET_MAX_MEM_SLOTS)
            if slots < len(regions):
                raise DeviceCommandError(
                    f"vhost-user backend {self.name} has {slots} memory "
                    f"slots, guest RAM needs {len(regions)}"
                )
            for region, fd in regions:
                self._call(Request.ADD_MEM_REG, codec.SingleRegion(region), (fd,))
        else:
            self._set_mem_table(regions)

    # -- state ---------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._daemon.pid if self._daemon is not None else None

    def on_event(self, callback: Callable[[DeviceEvent], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    # -- messages ------------------------------------------------------------------------------
    def _call(
        self, request: Request, payload: codec.Payload | None = None, fds: tuple[int, ...] = ()
    ) -> codec.Payload | None:
        try:
            return self._conn.call(request, payload, fds)
        except VhostUserError as exc:
            if not self._conn.alive:
                raise DeviceGoneError(
                    f"device {self.name} is gone: {self._gone or self._conn.gone_reason}"
                ) from exc
            raise DeviceCommandError(f"device {self.name}: {exc}") from exc

    def _u64(self, request: Request) -> int:
        reply = self._call(request)
        assert isinstance(reply, codec.U64)
        return reply.value

    def _feature_word(self, driver_features: int) -> int:
        word = driver_features | 1 << c.VIRTIO_F_VERSION_1 | 1 << codec.F_PROTOCOL_FEATURES
        return word | (1 << codec.F_LOG_ALL if self._logging else 0)

    # -- registers (the VM calls these on KVM_EXIT_MMIO in the window) ---------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        with self._lock:
            return self.regs.read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self.regs.write(offset, size, value)

    def kick(self, queue_index: int) -> None:
        eventfd.signal(self.doorbell_eventfds[queue_index])

    def wait_interrupt(self, timeout: float) -> bool:
        import select

        readable, _, _ = select.select([self.irq_eventfd], [], [], timeout)
        return bool(readable) and eventfd.drain(self.irq_eventfd) > 0

    # -- hooks from the register file (under self._lock) ---------------------------------------
    def _driver_ok(self) -> None:
        for i in range(self.regs.num_queues):
            qs = self.regs.queue_state(i)
            if qs is not None:
                self._guarded(self._start_queue, i, qs, 0)

    def _queue_ready(self, index: int, state: QueueState) -> None:
        if self.regs.driver_ok:
            self._guarded(self._start_queue, index, state, 0)

    def _queue_disable(self, index: int) -> None:
        self._guarded(self._stop_queue, index)

    def _reset(self) -> None:
        # A request the backend still holds would complete after GET_VRING_BASE onto closed
        # fds (qemu-storage-daemon then drops the connection): give it a bounded time first.
        # The guest controls avail idx, hence the bound.
        self._drain(time.monotonic() + RESET_DRAIN_TIMEOUT)
        for i in list(self._started):
            self._guarded(self._stop_queue, i)
        self._bases.clear()
        # A reset while shadowed is trapped and the device leaves shadow mode before it, so a
        # view still here is one a failed leave could not take back: the driver's fresh rings
        # must start on guest RAM.
        if self._view is not None:
            self._guarded(self.set_backend_view, None)

    def _guarded(self, fn: Callable[..., object], *args: Any) -> None:
        """Run a backend step for a guest register write: a failure breaks the device (the guest
        sees DEVICE_NEEDS_RESET), never the VMM."""
        try:
            fn(*args)
        except (DeviceCommandError, DeviceGoneError, ValueError) as exc:
            log.warning("device %s: %s", self.name, exc)
            self.regs.needs_reset(str(exc))

    # -- rings ---------------------------------------------------------------------------------
    def _translate(self, gpa: int, length: int) -> int:
        """The VMM's user address of the ring bytes at [gpa, gpa+length) (the backend's ring
        addresses are frontend user addresses): in guest RAM, or while shadowed in the view,
        where the shadow rings sit at the guest's ring addresses; raises ValueError outside."""
        view = self._view
        regions = self._regions()
        if view is not None:
            regions = [(MemRegion(0, view.size, view.user_addr, view.offset), view.fd)]
        for region, _fd in regions:
            if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
                return region.user_addr + (gpa - region.gpa)
        raise ValueError(f"ring at GPA {gpa:#x}+{length:#x} is outside guest RAM")

    def _vring_addr(self, index: int, qs: QueueState) -> codec.VringAddr:
        n = qs.size
        return codec.VringAddr(
            index,
            codec.VRING_F_LOG,
            desc=self._translate(qs.desc_addr, c.DESC_SIZE * n),
            used=self._translate(qs.used_addr, 6 + c.USED_ELEM_SIZE * n),
            avail=self._translate(qs.avail_addr, 6 + 2 * n),
            log=qs.used_addr,
        )

    def _place_ring(self, index: int, qs: QueueState, base: int) -> None:
        """Give the backend ring `index`'s size, base and addresses (in the current table)."""
        addr = self._vring_addr(index, qs)  # validates before anything is sent
        self._call(Request.SET_VRING_NUM, codec.VringState(index, qs.size))
        self._call(Request.SET_VRING_BASE, codec.VringState(index, base))
        self._call(Request.SET_VRING_ADDR, addr)
        self._rings[index] = qs

    def _start_queue(self, index: int, qs: QueueState, base: int) -> None:
        """Program and start ring `index` (the backend then takes avail entries from `base`)."""
        self._vring_addr(index, qs)  # validates before anything is sent
        self._call(Request.SET_FEATURES, codec.U64(self._feature_word(self.regs.driver_features)))
        self._place_ring(index, qs, base)
        # CALL before KICK: a completion without a call fd makes qemu-storage-daemon panic
        self._call(Request.SET_VRING_CALL, codec.U64(index), (self.irq_eventfd,))
        self._call(Request.SET_VRING_KICK, codec.U64(index), (self.doorbell_eventfds[index],))
        self._call(Request.SET_VRING_ENABLE, codec.VringState(index, 1))
        self._started[index] = qs
        self._bases.pop(index, None)
        self.counters["queue_starts"] += 1
        self.kick(index)  # entries posted while it was stopped

    def _stop_queue(self, index: int) -> int:
        if index not in self._started:
            return self._bases.get(index, 0)
        self._started.pop(index)
        reply = self._call(Request.GET_VRING_BASE, codec.VringState(index, 0))
        assert isinstance(reply, codec.VringState)
        if reply.index != index or reply.num > 0xFFFF:
            raise DeviceCommandError(
                f"device {self.name}: GET_VRING_BASE({index}) answered "
                f"index {reply.index} num {reply.num}"
            )
        self._bases[index] = reply.num
        self.counters["queue_stops"] += 1
        return reply.num

    def _ring_indices(self, qs: QueueState) -> tuple[int, int]:
        """(avail idx, used idx) as they are now in the rings the backend reads: guest RAM, or
        the shadow rings of the DMA view."""
        mem: BackendView | GuestMemory = self._view if self._view is not None else self._memory
        return mem.read_u16(qs.avail_addr + 2), mem.read_u16(qs.used_addr + 2)

    # -- shadowing: what the backend's memory table maps ---------------------------------------
    @property
    def backend_view(self) -> BackendView | None:
        return self._view

    def set_backend_view(self, view: BackendView | None) -> None:
        """Make the backend see `view` instead of guest RAM (None: guest RAM again). The rings
        must be stopped (`quiesce`); `resume` restarts them in the new memory. A view must be
        laid out like guest RAM (its rings where the guest's are) and span as much of it."""
        with self._lock:
            self._require_alive()
            if self._started:
                raise DeviceCommandError(
                    f"device {self.name}: the memory table changes only with the rings "
                    f"stopped (quiesce); running: {sorted(self._started)}"
                )
            if view is not None and view.size < self._memory.size:
                raise DeviceCommandError(
                    f"device {self.name}: a DMA view of {view.size:#x} bytes cannot stand in "
                    f"for guest RAM of {self._memory.size:#x}"
                )
            before, old_view = self._regions(), self._view
            self._view = view
            after = self._regions()
            if len(after) > codec.MAX_REGIONS:
                self._view = old_view
                raise DeviceCommandError(
                    f"device {self.name}: its rings split guest RAM into {len(after)} memory "
                    f"regions, a table holds at most {codec.MAX_REGIONS}"
                )
            beside = next((v for v in (view, old_view) if v is not None and v.beside_ram), None)
            both = self._beside(beside) if beside is not None else _covering(before, after)
            # 1: both (the rings' current addresses stay covered), the new ones above the old
            if both != before:
                self._set_mem_table(both)
            # 2: every ring the backend holds moves to its place in the new memory, unkicked
            for i, qs in sorted(self._rings.items()):
                self._place_ring(i, qs, self._bases.get(i, 0))
            # 3: only the new memory, at the guest's addresses
            if after != both:
                self._set_mem_table(after)
            self.counters["table_swaps"] += 1

    def _drain(self, deadline: float) -> dict[int, int]:
        """Wait until every running ring's used idx has caught up with its avail idx; return
        the requests still in flight per queue (all 0 unless the deadline passed)."""
        left: dict[int, int] = {}
        while True:
            left = {}
            for i, qs in self._started.items():
                avail, used = self._ring_indices(qs)
                if avail != used:
                    left[i] = (avail - used) & 0xFFFF
            if not left or time.monotonic() >= deadline or not self.alive:
                return left
            time.sleep(0.0002)

    # -- the admin interface the migration uses ------------------------------------------------
    def quiesce(self) -> dict[str, Any]:
        """Stop every ring exactly: (vCPUs paused by the caller) wait for the backend to finish
        what it took, then GET_VRING_BASE. Returns the queues' positions."""
        with self._lock:
            self._require_alive()
            # A vCPU paused between publishing avail idx and its QueueNotify never kicks, and
            # the backend does not poll: kick each ring (an extra kick is harmless).
            for i in self._started:
                self.kick(i)
            in_flight = self._drain(time.monotonic() + DRAIN_TIMEOUT)
            if in_flight:
                raise DeviceTimeoutError(
                    f"device {self.name}: requests still in flight after "
                    f"{DRAIN_TIMEOUT} s: {in_flight}"
                )
            for i in list(self._started):
                self._stop_queue(i)
            self._quiesced = True
            return {
                "in_flight": 0,
                "queues": {
                    str(i): {"next_avail": b, "next_used": b} for i, b in self._bases.items()
                },
            }

    def resume(self) -> None:
        with self._lock:
            self._require_alive()
            self._quiesced = False
            for i in sorted(self._bases):
                qs = self.regs.queue_state(i)
                if qs is not None and self.regs.driver_ok:
                    self._start_queue(i, qs, self._bases[i])

    def needs_reset(self, reason: str) -> None:
        """Mark the device DEVICE_NEEDS_RESET (a configuration change interrupt for a running
        driver): `resume` starts no ring until the driver resets it."""
        with self._lock:
            log.warning("device %s: %s; device needs reset", self.name, reason)
            self.regs.needs_reset(reason)

    def get_state(self) -> dict[str, Any]:
        """Register file and ring positions; the rings must be stopped (`quiesce`)."""
        with self._lock:
            if self._started:
                raise DeviceCommandError(
                    f"device {self.name}: get_state needs the rings "
                    f"stopped (quiesce); running: {sorted(self._started)}"
                )
            queues: dict[int, QueueState] = {}
            for i in range(self.regs.num_queues):
                qs = self.regs.queue_state(i)
                if qs is not None:
                    base = self._bases.get(i, 0)
                    queues[i] = QueueState(
                        qs.size, qs.desc_addr, qs.avail_addr, qs.used_addr, base, base, True
                    )
            return DeviceState(self.kind, self.regs.snapshot(), queues).to_json()

    def set_state(self, state: dict[str, Any]) -> None:
        """Program this (fresh) device from `get_state` output of the other side (untrusted:
        validated by `DeviceState.from_json` and the register file), rings restarted from the
        migrated bases (SET_VRING_BASE). A quiesced device starts them on `resume` instead: the
        backend touches no ring before (a post-copy destination's rings may be pages still
        on the source; `postcopy_devices`)."""
        with self._lock:
            self._require_alive()
            try:
                parsed = DeviceState.from_json(state)
                if parsed.kind != self.kind:
                    raise ValueError(f"state of a {parsed.kind} device given to a blk device")
                self.regs.restore(parsed.mmio)
            except ValueError as exc:
                raise DeviceCommandError(f"device {self.name}: {exc}") from exc
            for i, qs in sorted(parsed.queues.items()):
                if self._quiesced:
                    self._bases[i] = qs.next_avail
                elif self.regs.queue_state(i) is not None and self.regs.driver_ok:
                    self._start_queue(i, qs, qs.next_avail)

    def reset(self) -> None:
        with self._lock:
            self.regs.reset()

    def iotlb_invalidate(self, iova_pfn: int | None = None, count: int = 1) -> int:
        """Nothing to flush: the backend's only translation is the memory table, which maps
        guest RAM or the whole DMA view (a device buffer is reachable once its bytes are
        written there, and a dropped one holds nothing of the guest's)."""
        return 0

    def announce(self) -> None:
        raise DeviceCommandError(f"a blk device ({self.name}) has nothing to announce")

    # -- the backend's own dirty log -----------------------------------------------------------
    def _log_size(self) -> int:
        end = max(r.gpa + r.size for r, _fd in self._regions())
        pages = -(-end // codec.LOG_PAGE)
        return -(-pages // 64) * 8  # whole u64 words

    def dma_log_start(self) -> None:
        """VHOST_F_LOG_ALL into a shared log memfd (SET_LOG_BASE)."""
        with self._lock:
            self._require_alive()
            if not (
                _bit(self.protocol_features, ProtocolFeature.LOG_SHMFD)
                and _bit(self.backend_features, codec.F_LOG_ALL)
            ):
                raise DeviceCommandError(
                    f"vhost-user backend {self.name} offers no dirty log "
                    f"(LOG_ALL and LOG_SHMFD needed)"
                )
            if not self._logs:
                size = self._log_size()
                self._logs = [_LogBuffer(size, f"{self.name}-vhost-log{i}") for i in (0, 1)]
                self._set_log_base(self._logs[0])
            self._logging = True
            self._call(
                Request.SET_FEATURES, codec.U64(self._feature_word(self.regs.driver_features))
            )

    def _set_log_base(self, buf: _LogBuffer) -> None:
        self._call(Request.SET_LOG_BASE, codec.LogBase(buf.size, 0), (buf.fd,))

    def dma_log_harvest(self) -> npt.NDArray[np.uint8]:
        """Pages the backend wrote since the last harvest (bit p%8 of byte p//8 = page p).

        The backend is pointed at the other log first; it lets go of the old one before it
        answers, so the old one is read and cleared with no write racing it."""
        with self._lock:
            if not self._logs:
                raise DeviceCommandError(f"device {self.name}: the dirty log was never started")
            self._require_alive()
            old, new = self._logs
            self._set_log_base(new)
            self._logs = [new, old]
            self.counters["log_harvests"] += 1
            return old.take()

    def dma_log_stop(self) -> None:
        with self._lock:
            self._logging = False
            if self.alive:
                self._call(
                    Request.SET_FEATURES, codec.U64(self._feature_word(self.regs.driver_features))
                )

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "backend": "vhost-user",
            "pid": self.pid,
            "messages": self._conn.messages_sent,
            "status": self.regs.status,
            "broken": self.regs.needs_reset_reason,
            "logging": self._logging,
            "running_queues": sorted(self._started),
            "shadowed": self._view is not None,
        }

    # -- death and teardown --------------------------------------------------------------------
    def _require_alive(self) -> None:
        if self._gone is not None:
            raise DeviceGoneError(f"device {self.name} is gone: {self._gone}")

    def _backend_gone(self, reason: str) -> None:
        if self._daemon is not None and "exited" not in reason and "signal" not in reason:
            deadline = time.monotonic() + 1.0
            while self._daemon.exit_reason() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            exit_reason = self._daemon.exit_reason()
            if exit_reason is not None:
                reason = f"{exit_reason} ({reason})"
        with self._lock:
            if self._gone is not None:
                return
            self._gone = reason
            closing = self._closing
            callbacks = list(self._callbacks)
            regs: VirtioMmioRegisters | None = getattr(self, "regs", None)  # None: negotiating
            if not closing and regs is not None:
                regs.needs_reset(f"vhost-user backend gone: {reason}")
        event = DeviceEvent(self.name, "gone", {"reason": reason, "expected": closing})
        threading.Thread(
            target=self._dispatch, args=(callbacks, event), daemon=True, name=f"{self.name}-gone"
        ).start()

    @staticmethod
    def _dispatch(callbacks: list[Callable[[DeviceEvent], None]], event: DeviceEvent) -> None:
        for cb in callbacks:
            try:
                cb(event)
            except Exception:
                log.exception("device %s: event callback failed", event.device)

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._conn.close()
        if self._backend_channel is not None:
            self._backend_channel.close()
        if self._daemon is not None:
            self._daemon.stop(timeout)
            try:
                self._daemon.socket_path.parent.rmdir()
            except OSError:
                pass
        if self._gone is None:
            self._gone = "closed by the VMM"
        for buf in self._logs:
            buf.close()
        self._logs = []
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (*self.doorbell_eventfds.values(), self.irq_eventfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> VhostUserBlk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
