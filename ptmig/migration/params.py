"""Migration parameters, capabilities and the `query-migrate` status, with QEMU's names.

`MigrationParams` and `MigrationCapabilities` are what `migrate-set-parameters` /
`migrate-set-capabilities` change; `MigrationInfo` is what `query-migrate` returns. Field names
on the wire are QEMU's (`downtime-limit`, `max-bandwidth`, `ram.dirty-sync-count`, ...); ptmig's
own additions carry the `x-` prefix, as QEMU's experimental fields do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

DMA_TRACKING = ("none", "all-dirty", "device-log", "shadow", "intercept")


class Status(Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"
    # The destination may have started the guest and its answer was lost: the source stays
    # paused until `x-migrate-resolve` names the winner (see protocol.GuestOwnership).
    UNRESOLVED = "x-unresolved"
    # Post-copy: the destination runs the guest while the source sends the rest; paused when
    # the link broke meanwhile (the source keeps the pages not sent; see `postcopy`).
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"  # reconnecting (see `recovery`)

    @property
    def finished(self) -> bool:
        """The migration thread is done (an unresolved one waits for the operator, not it)."""
        return self in (
            Status.CANCELLED,
            Status.COMPLETED,
            Status.FAILED,
            Status.UNRESOLVED,
            Status.POSTCOPY_PAUSED,
        )


@dataclass
class MigrationParams:
    downtime_limit_ms: int = 300
    max_bandwidth: int = 0  # bytes/s, 0 = unlimited
    x_dma_tracking: str = "shadow"
    x_timeout_s: float = 120.0  # give up (and resume the source) after this long
    x_max_stalled_rounds: int = 5  # rounds without progress before forcing switchover
    # Parallel TCP streams for pre-copy RAM while the `multifd` capability is on (QEMU's
    # multifd-channels). Two keep both ends busy on a small host (the copies run in the kernel,
    # outside the GIL).
    multifd_channels: int = 2
    # How long the source waits for the destination's answer to Complete; past it the switchover
    # is unresolved (the source may not resume: the destination may have committed).
    x_switchover_timeout_s: float = 30.0
    # With `postcopy-ram`: switch to post-copy once this many pre-copy rounds are done (0:
    # never by count), or once this many rounds in a row made no progress (0: never).
    x_postcopy_after_rounds: int = 0
    x_postcopy_stalled_rounds: int = 2

    def set(self, **kw: Any) -> None:
        """Apply `migrate-set-parameters` arguments (already type-checked by the QMP schema)."""
        if "downtime_limit" in kw:
            v = kw["downtime_limit"]
            if not 1 <= v <= 2_000_000:
                raise ValueError(f"downtime-limit must be in [1, 2000000] ms, got {v}")
            self.downtime_limit_ms = v
        if "max_bandwidth" in kw:
            v = kw["max_bandwidth"]
            if v < 0:
                raise ValueError(f"max-bandwidth must be >= 0 bytes/s, got {v}")
            self.max_bandwidth = v
        if "x_dma_tracking" in kw:
            v = kw["x_dma_tracking"]
            if v not in DMA_TRACKING:
                raise ValueError(
                    f"x-dma-tracking must be one of {', '.join(DMA_TRACKING)}, got {v!r}"
                )
            self.x_dma_tracking = v
        if "multifd_channels" in kw:
            # the protocol's own cap (its module loads with the parameters of a migration)
            from .protocol import MAX_DATA_CHANNELS

            v = kw["multifd_channels"]
            if not 1 <= v <= MAX_DATA_CHANNELS:
                raise ValueError(f"multifd-channels must be in [1, {MAX_DATA_CHANNELS}], got {v}")
            self.multifd_channels = v
        if "x_timeout" in kw:
            v = kw["x_timeout"]
            if not 1 <= v <= 86400:
                raise ValueError(f"x-timeout must be in [1, 86400] s, got {v}")
            self.x_timeout_s = float(v)
        if "x_switchover_timeout" in kw:
            v = kw["x_switchover_timeout"]
            if not 1 <= v <= 3600:
                raise ValueError(f"x-switchover-timeout must be in [1, 3600] s, got {v}")
            self.x_switchover_timeout_s = float(v)
        for name in ("x_postcopy_after_rounds", "x_postcopy_stalled_rounds"):
            if name in kw:
                v = kw[name]
                if not 0 <= v <= 1000:
                    raise ValueError(f"{name.replace('_', '-')} must be in [0, 1000], got {v}")
                setattr(self, name, v)

    def to_qmp(self) -> dict[str, Any]:
        return {
            "downtime-limit": self.downtime_limit_ms,
            "max-bandwidth": self.max_bandwidth,
            "x-dma-tracking": self.x_dma_tracking,
            "x-timeout": int(self.x_timeout_s),
            "multifd-channels": self.multifd_channels,
            "x-switchover-timeout": int(self.x_switchover_timeout_s),
            "x-postcopy-after-rounds": self.x_postcopy_after_rounds,
            "x-postcopy-stalled-rounds": self.x_postcopy_stalled_rounds,
        }


PARAMS_SCHEMA = {
    "*downtime-limit": int,
    "*max-bandwidth": int,
    "*x-dma-tracking": DMA_TRACKING,
    "*x-timeout": int,
    "*multifd-channels": int,
    "*x-switchover-timeout": int,
    "*x-postcopy-after-rounds": int,
    "*x-postcopy-stalled-rounds": int,
}


@dataclass
class MigrationCapabilities:
    auto_converge: bool = False
    # QEMU's `multifd`: pre-copy RAM on `multifd-channels` parallel streams. On by default here
    # (QEMU's default is off), because two streams are what keeps a small host's link busy.
    multifd: bool = True
    x_verify: bool = False
    postcopy_ram: bool = False  # QEMU's: the source may switch to post-copy (see `postcopy`)

    NAMES = ("auto-converge", "multifd", "x-verify", "postcopy-ram")

    def data_channels(self, params: MigrationParams) -> int:
        """Parallel streams a migration opens besides the main one (0: multifd is off)."""
        return params.multifd_channels if self.multifd else 0

    def set(self, capabilities: list[dict[str, Any]]) -> None:
        for cap in capabilities:
            name, state = cap.get("capability"), cap.get("state")
            if name not in self.NAMES or not isinstance(state, bool):
                raise ValueError(
                    f"capability must be {{'capability': one of {self.NAMES}, 'state': bool}}, "
                    f"got {cap!r}"
                )
            setattr(self, name.replace("-", "_"), state)

    def to_qmp(self) -> list[dict[str, Any]]:
        return [{"capability": n, "state": getattr(self, n.replace("-", "_"))} for n in self.NAMES]


@dataclass
class RamStats:
    total: int = 0
    transferred: int = 0
    remaining: int = 0
    duplicate: int = 0  # zero pages (sent as markers)
    normal: int = 0  # pages sent with data
    normal_bytes: int = 0
    dirty_pages_rate: int = 0  # pages/s
    mbps: float = 0.0
    dirty_sync_count: int = 0
    pages_per_round: list[int] = field(default_factory=list)
    postcopy_requests: int = 0  # page requests the destination sent during post-copy


@dataclass
class MigrationInfo:
    status: Status = Status.NONE
    start: float = 0.0
    end: float | None = None
    setup_time_ms: int = 0
    setup_parts_ms: dict[str, float] | None = None  # load, connect, handshake, dma-tracking
    downtime_ms: int | None = None
    expected_downtime_ms: int = 0
    throttle_pct: int = 0
    ram: RamStats = field(default_factory=RamStats)
    error: str | None = None
    verify: dict[str, Any] | None = None
    shadow: dict[str, Any] | None = None
    dma_tracking: str = "shadow"
    forced_switchover: bool = False
    guest_owner: str | None = None  # the source's protocol.Owner, once it migrates
    migration_id: str | None = None  # its Hello's x-migration-id (what a fate query names)
    # Unresolved: the source's own fate queries ("asking" while it still asks, "queries"
    # made, "last" outcome); a management layer waits for "asking" to end
    fate_query: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    postcopy: dict[str, Any] | None = None  # why and how post-copy ran
    # Each VMM's CPU seconds from the migration's start to the switchover, vCPU threads left
    # out (`cputime.MigrationMeter`; the destination's from its ack, None if it sent none)
    cpu_s: dict[str, float | None] | None = None

    def total_time_ms(self) -> int:
        end = self.end if self.end is not None else time.monotonic()
        return int((end - self.start) * 1000) if self.start else 0

    def to_qmp(self) -> dict[str, Any]:
        if self.status == Status.NONE:
            return {}  # as QEMU: no migration has happened, so there is no status to report
        out: dict[str, Any] = {"status": self.status.value}
        r = self.ram
        out["total-time"] = self.total_time_ms()
        out["setup-time"] = self.setup_time_ms
        if self.setup_parts_ms is not None:
            out["x-setup-ms"] = dict(self.setup_parts_ms)
        if self.downtime_ms is not None:
            out["downtime"] = self.downtime_ms
        else:
            out["expected-downtime"] = self.expected_downtime_ms
        out["ram"] = {
            "transferred": r.transferred,
            "remaining": r.remaining,
            "total": r.total,
            "duplicate": r.duplicate,
            "normal": r.normal,
            "normal-bytes": r.normal_bytes,
            "dirty-pages-rate": r.dirty_pages_rate,
            "mbps": round(r.mbps, 3),
            "dirty-sync-count": r.dirty_sync_count,
            "page-size": 4096,
        }
        if self.postcopy is not None:
            out["ram"]["postcopy-requests"] = r.postcopy_requests
            out["x-postcopy"] = self.postcopy
        if self.throttle_pct:
            out["cpu-throttle-percentage"] = self.throttle_pct
        if self.error:
            out["error-desc"] = self.error
        out["x-dma-tracking"] = self.dma_tracking
        if self.guest_owner is not None:
            out["x-guest-owner"] = self.guest_owner
        if self.migration_id is not None:
            out["x-migration-id"] = self.migration_id
        if self.fate_query is not None:
            out["x-fate-query"] = dict(self.fate_query)
        out["x-rounds"] = self.rounds
        if self.forced_switchover:
            out["x-forced-switchover"] = True
        if self.verify is not None:
            out["x-verify"] = self.verify
        if self.shadow is not None:
            out["x-shadow"] = self.shadow
        if self.cpu_s is not None:
            out["x-cpu-s"] = {k: v for k, v in self.cpu_s.items() if v is not None}
        return out
