"""The virtio-mmio v2 register file (virtio 1.x spec 4.2.2), as pure logic.

Owns the guest-visible registers of one virtio-mmio device: identification, feature
negotiation, the device status state machine, per-queue setup, interrupt status and the
device-specific config space at 0x100. A device model plugs in through hooks (queue ready,
notify, reset, driver ok, interrupt) and never parses a register access itself. The whole
register state round-trips through `snapshot()` / `restore()` for migration.

Rules enforced (the driver is untrusted):
* Accesses at unknown offsets, of a size other than 4 below 0x100, or past the config space
  are ignored (reads return 0) and counted; nothing here raises on guest input.
* FEATURES_OK is refused (the Status readback lacks it) unless the driver accepted
  VIRTIO_F_VERSION_1 and only features the device offers; after FEATURES_OK the driver
  features are frozen.
* QueueReady=1 builds a `QueueState` from the queue registers and validates it; an invalid
  queue (or one set up before FEATURES_OK) marks the device DEVICE_NEEDS_RESET.
* Status bits only accumulate; writing 0 resets the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from ptmig.devices.virtio import constants as c
from ptmig.devices.virtio.queue import QueueError, QueueState

VENDOR_ID = 0x4D544D50  # "PMTM" little-endian: ptmig's vendor id
_DRIVER_STATUS_BITS = (
    c.STATUS_ACKNOWLEDGE
    | c.STATUS_DRIVER
    | c.STATUS_DRIVER_OK
    | c.STATUS_FEATURES_OK
    | c.STATUS_FAILED
)


class ConfigSpace(Protocol):
    """Device-specific config bytes (a bytearray will do)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes | bytearray: ...


@dataclass
class QueueRegisters:
    """The driver-written registers of one queue."""

    num: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    ready: bool = False

    def queue_state(self) -> QueueState:
        return QueueState(self.num, self.desc, self.driver, self.device, 0, 0, True)


@dataclass
class MmioState:
    """All register state of a device, for migration (plain data, untrusted on restore)."""

    device_id: int
    device_features: int
    driver_features: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    queue_sel: int = 0
    status: int = 0
    interrupt_status: int = 0
    config_generation: int = 0
    needs_reset_reason: str | None = None
    queues: list[QueueRegisters] = field(default_factory=list)


class VirtioMmioRegisters:
    """One device's virtio-mmio v2 register window (offsets relative to its base)."""

    def __init__(
        self,
        device_id: int,
        device_features: int,
        num_queues: int,
        queue_num_max: int | Sequence[int],
        config: ConfigSpace,
        *,
        vendor_id: int = VENDOR_ID,
    ) -> None:
        if not device_features >> c.VIRTIO_F_VERSION_1 & 1:
            raise ValueError(
                f"a virtio-mmio v2 device must offer VIRTIO_F_VERSION_1; "
                f"features={device_features:#x}"
            )
        maxes = (
            [queue_num_max] * num_queues if isinstance(queue_num_max, int) else list(queue_num_max)
        )
        if len(maxes) != num_queues or not all(0 < m <= c.VIRTQ_MAX_SIZE for m in maxes):
            raise ValueError(
                f"queue_num_max {queue_num_max!r} must give {num_queues} sizes "
                f"in 1..{c.VIRTQ_MAX_SIZE}"
            )
        self.device_id = device_id
        self.device_features = device_features
        self.vendor_id = vendor_id
        self.queue_num_max = maxes
        self.config = config
        # hooks the device model sets
        self.on_queue_ready: Callable[[int, QueueState], None] | None = None
        self.on_queue_disable: Callable[[int], None] | None = None
        self.on_notify: Callable[[int], None] | None = None
        self.on_reset: Callable[[], None] | None = None
        self.on_driver_ok: Callable[[], None] | None = None
        self.on_interrupt: Callable[[int], None] | None = None
        self.on_config_write: Callable[[int, bytes], None] | None = None
        # counters of ignored accesses
        self.bad_reads = 0
        self.bad_writes = 0
        self.last_bad_access = ""
        self._state = self._initial_state()

    def _initial_state(self) -> MmioState:
        return MmioState(
            self.device_id,
            self.device_features,
            queues=[QueueRegisters(num=m) for m in self.queue_num_max],
        )

    # -- state the device model reads ------------------------------------------------------
    @property
    def status(self) -> int:
        return self._state.status

    @property
    def driver_features(self) -> int:
        return self._state.driver_features

    @property
    def interrupt_status(self) -> int:
        return self._state.interrupt_status

    @property
    def num_queues(self) -> int:
        return len(self._state.queues)

    @property
    def needs_reset_reason(self) -> str | None:
        return self._state.needs_reset_reason

    @property
    def driver_ok(self) -> bool:
        s = self._state.status
        return bool(s & c.STATUS_DRIVER_OK) and not s & c.STATUS_DEVICE_NEEDS_RESET

    def queue_state(self, index: int) -> QueueState | None:
        """The validated state of a ready queue (next indices 0), or None."""
        if not 0 <= index < self.num_queues or not self._state.queues[index].ready:
            return None
        return self._state.queues[index].queue_state()

    def feature_negotiated(self, bit: int) -> bool:
        return bool(self._state.driver_features >> bit & 1) and bool(
            self._state.status & c.STATUS_FEATURES_OK
        )

    # -- device-side actions -----------------------------------------------------------------
    def note_interrupt(self, bits: int) -> None:
        """Record interrupt status bits a data path raised (and signalled) on its own."""
        self._state.interrupt_status |= bits & 3

    def raise_interrupt(self, bits: int = c.INTERRUPT_USED_BUFFER) -> None:
        """Set interrupt status bits and tell the device model (which signals its MSI)."""
        self._state.interrupt_status |= bits & 3
        if self.on_interrupt is not None:
            self.on_interrupt(self._state.interrupt_status)

    def config_changed(self) -> None:
        """The device changed its config: new generation, config-change interrupt."""
        self._state.config_generation = (self._state.config_generation + 1) & 0xFFFFFFFF
        if self._state.status & c.STATUS_DRIVER_OK:
            self.raise_interrupt(c.INTERRUPT_CONFIG_CHANGE)

    def needs_reset(self, reason: str) -> None:
        """Mark the device broken (DEVICE_NEEDS_RESET); the driver must reset it."""
        if self._state.status & c.STATUS_DEVICE_NEEDS_RESET:
            return
        self._state.status |= c.STATUS_DEVICE_NEEDS_RESET
        self._state.needs_reset_reason = reason
        if self._state.status & c.STATUS_DRIVER_OK:
            self.raise_interrupt(c.INTERRUPT_CONFIG_CHANGE)

    def reset(self) -> None:
        """Device reset (driver wrote Status 0): everything back to power-on values."""
        self._state = self._initial_state()
        if self.on_reset is not None:
            self.on_reset()

    # -- migration ---------------------------------------------------------------------------
    def snapshot(self) -> MmioState:
        """A deep copy of the register state."""
        s = self._state
        return replace(s, queues=[replace(q) for q in s.queues])

    def restore(self, state: MmioState) -> None:
        """Load register state saved by `snapshot` (validated; hooks are not called)."""
        if state.device_id != self.device_id or state.device_features != self.device_features:
            raise ValueError(
                f"state of device id {state.device_id} features "
                f"{state.device_features:#x} does not fit device id "
                f"{self.device_id} features {self.device_features:#x}"
            )
        if len(state.queues) != self.num_queues:
            raise ValueError(f"state has {len(state.queues)} queues, device has {self.num_queues}")
        if state.driver_features & ~self.device_features:
            raise ValueError(
                f"driver features {state.driver_features:#x} include bits the "
                f"device does not offer ({self.device_features:#x})"
            )
        for i, q in enumerate(state.queues):
            if q.ready:
                try:
                    self._check_queue(i, q)
                except QueueError as e:
                    raise ValueError(f"saved queue {i} is invalid: {e}") from e
        self._state = replace(state, queues=[replace(q) for q in state.queues])

    # -- guest accesses ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """A guest read of `size` bytes at `offset`; bad accesses read 0 (and are counted)."""
        if offset >= c.REG_CONFIG:
            return self._config_read(offset - c.REG_CONFIG, size)
        if size != 4 or offset % 4:
            return self._bad_read(offset, size, "registers take aligned 32-bit accesses")
        s = self._state
        q = s.queues[s.queue_sel] if s.queue_sel < len(s.queues) else None
        if offset == c.REG_MAGIC_VALUE:
            return c.MMIO_MAGIC
        if offset == c.REG_VERSION:
            return c.MMIO_VERSION
        if offset == c.REG_DEVICE_ID:
            return self.device_id
        if offset == c.REG_VENDOR_ID:
            return self.vendor_id
        if offset == c.REG_DEVICE_FEATURES:
            sel = s.device_features_sel
            return (self.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if offset == c.REG_QUEUE_NUM_MAX:
            return self.queue_num_max[s.queue_sel] if q is not None else 0
        if offset == c.REG_QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == c.REG_INTERRUPT_STATUS:
            return s.interrupt_status
        if offset == c.REG_STATUS:
            return s.status
        if offset == c.REG_CONFIG_GENERATION:
            return s.config_generation
        return self._bad_read(offset, size, "not a readable register")

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write; bad accesses are ignored (and counted)."""
        if offset >= c.REG_CONFIG:
            self._config_write(offset - c.REG_CONFIG, size, value)
            return
        if size != 4 or offset % 4:
            self._bad_write(offset, size, "registers take aligned 32-bit accesses")
            return
        value &= 0xFFFFFFFF
        s = self._state
        if offset == c.REG_DEVICE_FEATURES_SEL:
            s.device_features_sel = value
        elif offset == c.REG_DRIVER_FEATURES_SEL:
            s.driver_features_sel = value
        elif offset == c.REG_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == c.REG_QUEUE_SEL:
            s.queue_sel = value
        elif offset in _QUEUE_REGS:
            self._write_queue_reg(offset, value)
        elif offset == c.REG_QUEUE_NOTIFY:
            self._notify(value)
        elif offset == c.REG_INTERRUPT_ACK:
            s.interrupt_status &= ~value
        elif offset == c.REG_STATUS:
            self._write_status(value)
        else:
            self._bad_write(offset, size, "not a writable register")

    # -- register semantics ------------------------------------------------------------------
    def _write_driver_features(self, value: int) -> None:
        s = self._state
        if s.status & c.STATUS_FEATURES_OK or not s.status & c.STATUS_DRIVER:
            self._bad_write(c.REG_DRIVER_FEATURES, 4, "features written outside negotiation")
            return
        if s.driver_features_sel >= 2:
            self._bad_write(
                c.REG_DRIVER_FEATURES,
                4,
                f"driver features word {s.driver_features_sel} does not exist",
            )
            return
        shift = 32 * s.driver_features_sel
        s.driver_features = (s.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_reg(self, offset: int, value: int) -> None:
        s = self._state
        if s.queue_sel >= len(s.queues):
            self._bad_write(offset, 4, f"queue {s.queue_sel} does not exist")
            return
        q = s.queues[s.queue_sel]
        if offset == c.REG_QUEUE_READY:
            self._write_queue_ready(s.queue_sel, q, value)
            return
        if q.ready:
            self._bad_write(offset, 4, f"queue {s.queue_sel} changed while ready")
            return
        if offset == c.REG_QUEUE_NUM:
            q.num = value
        else:
            attr, high = _QUEUE_REGS[offset]
            old = getattr(q, attr)
            new = ((old & 0xFFFFFFFF) | (value << 32)) if high else ((old & ~0xFFFFFFFF) | value)
            setattr(q, attr, new)

    def _write_queue_ready(self, index: int, q: QueueRegisters, value: int) -> None:
        if value == 0:
            if q.ready:
                q.ready = False
                if self.on_queue_disable is not None:
                    self.on_queue_disable(index)
            return
        if q.ready:
            return
        try:
            if not self._state.status & c.STATUS_FEATURES_OK:
                raise QueueError("queue made ready before FEATURES_OK")
            state = self._check_queue(index, q)
        except QueueError as e:
            self.needs_reset(f"queue {index}: {e}")
            return
        q.ready = True
        if self.on_queue_ready is not None:
            self.on_queue_ready(index, state)

    def _check_queue(self, index: int, q: QueueRegisters) -> QueueState:
        if q.num > self.queue_num_max[index]:
            raise QueueError(f"queue size {q.num} exceeds QueueNumMax {self.queue_num_max[index]}")
        return q.queue_state().validate()

    def _notify(self, value: int) -> None:
        s = self._state
        if value >= len(s.queues) or not s.queues[value].ready or not self.driver_ok:
            self._bad_write(c.REG_QUEUE_NOTIFY, 4, f"notify of queue {value} that is not live")
            return
        if self.on_notify is not None:
            self.on_notify(value)

    def _write_status(self, value: int) -> None:
        s = self._state
        if value == 0:
            self.reset()
            return
        old = s.status & _DRIVER_STATUS_BITS
        new = value & _DRIVER_STATUS_BITS
        if old & ~new:
            self._bad_write(c.REG_STATUS, 4, f"status {value:#x} clears bits of {old:#x}")
            return
        if new & c.STATUS_FEATURES_OK and not old & c.STATUS_FEATURES_OK:
            if not self._features_acceptable():
                new &= ~c.STATUS_FEATURES_OK
        if new & c.STATUS_DRIVER_OK and not new & c.STATUS_FEATURES_OK:
            self._bad_write(c.REG_STATUS, 4, "DRIVER_OK without FEATURES_OK")
            new &= ~c.STATUS_DRIVER_OK
        s.status = new | (s.status & c.STATUS_DEVICE_NEEDS_RESET)
        if new & c.STATUS_DRIVER_OK and not old & c.STATUS_DRIVER_OK:
            if self.on_driver_ok is not None:
                self.on_driver_ok()

    def _features_acceptable(self) -> bool:
        f = self._state.driver_features
        return bool(f >> c.VIRTIO_F_VERSION_1 & 1) and not f & ~self.device_features

    def _config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset + size > len(self.config):
            return self._bad_read(c.REG_CONFIG + offset, size, "outside the config space")
        return int.from_bytes(bytes(self.config[offset : offset + size]), "little")

    def _config_write(self, offset: int, size: int, value: int) -> None:
        if (
            size not in (1, 2, 4, 8)
            or offset + size > len(self.config)
            or self.on_config_write is None
        ):
            self._bad_write(c.REG_CONFIG + offset, size, "config space is not writable there")
            return
        self.on_config_write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def _bad_read(self, offset: int, size: int, why: str) -> int:
        self.bad_reads += 1
        self.last_bad_access = f"read offset={offset:#x} size={size}: {why}"
        return 0

    def _bad_write(self, offset: int, size: int, why: str) -> None:
        self.bad_writes += 1
        self.last_bad_access = f"write offset={offset:#x} size={size}: {why}"


# offset -> (QueueRegisters attribute, is the high half); QueueNum/QueueReady handled apart
_QUEUE_REGS: dict[int, tuple[str, bool]] = {
    c.REG_QUEUE_NUM: ("num", False),
    c.REG_QUEUE_READY: ("ready", False),
    c.REG_QUEUE_DESC_LOW: ("desc", False),
    c.REG_QUEUE_DESC_HIGH: ("desc", True),
    c.REG_QUEUE_DRIVER_LOW: ("driver", False),
    c.REG_QUEUE_DRIVER_HIGH: ("driver", True),
    c.REG_QUEUE_DEVICE_LOW: ("device", False),
    c.REG_QUEUE_DEVICE_HIGH: ("device", True),
}
