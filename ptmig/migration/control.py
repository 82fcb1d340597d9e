"""Migration as a management layer drives it: the QMP commands and the `MIGRATION` event.

`MigrationControl` belongs to a `Machine`; it holds the parameters and capabilities
(`migrate-set-parameters`, `migrate-set-capabilities`), starts and cancels the outgoing
migration (`migrate`, `migrate_cancel`), and answers `query-migrate` with QEMU's field names.
`x-migrate-resolve` ends a switchover left unresolved (see `protocol.GuestOwnership`): with the
winner an operator names, or by asking the destination (`fate`).
`migrate-pause`, `migrate-recover` and `migrate`'s `resume` recover a broken post-copy (see
`recovery`).
`x-debug-fill-ram` is a benchmark hook that puts random bytes into guest RAM.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cputime import MigrationMeter
from ..errors import PtmigError
from ..layout import PAGE_SIZE
from ..qmp.server import QmpServer
from ..qmp.session import ErrorClass, QmpError
from ..vm import RunState
from . import background
from .params import PARAMS_SCHEMA, MigrationCapabilities, MigrationInfo, MigrationParams, Status

if TYPE_CHECKING:
    from ..vmparts import MigratingVm
    from .source import SourceMigration
    from .tracking import DmaTracking

FILL_CHUNK = 16 << 20


def _source_migration_class() -> type[SourceMigration]:
    from .source import SourceMigration

    return SourceMigration


class MigrationControl:
    def __init__(
        self, machine: MigratingVm, *, psk_file: Path | None = None, insecure: bool = False
    ) -> None:
        self.m = machine
        self.params = MigrationParams()
        self.caps = MigrationCapabilities()
        self.current: SourceMigration | None = None
        self.insecure = insecure
        cfg = machine.cfg.migration
        psk_path = psk_file or cfg.psk_file
        self.psk = psk_path.read_bytes().strip() if psk_path else None
        self.tls = None
        if cfg.tls:
            from .transport import TlsConfig

            self.tls = TlsConfig(str(cfg.tls_cert), str(cfg.tls_key), str(cfg.tls_ca))
        self._lock = threading.Lock()

    # --- the operations (also used directly by tests and the demo) ---------------------------

    def migrate(self, uri: str) -> SourceMigration:
        # The migration begins here: its clock and its CPU meter start with the command.
        accepted = time.monotonic()
        meter = MigrationMeter(self.m.vm.vcpu_thread_ids)
        meter.start()
        # The source's modules load with its first migration: a VMM that never sends its
        # guest away (or only receives one) does not carry them. Loading them (numpy, the
        # protocol, the transport: ~0.15 s of CPU, once per process) is the migration's own
        # work and has no deadline, so it runs below the guest's threads like pre-copy does
        # (measured: at normal priority it held kv requests 4-10 ms for ~100 ms before the
        # migration's clock even started), on a thread of its own: this one, QMP's, keeps its
        # priority whatever the process may do.
        self._refuse_if_measuring()  # at once, not after the modules' load (below the guest)
        SourceMigration = background.run_lowered(_source_migration_class)

        with self._lock:
            if self.current is not None and not self.current.info.status.finished:
                raise QmpError(ErrorClass.GENERIC_ERROR, "a migration is already in progress")
            if self.m.shadowed_by_hand():
                raise QmpError(
                    ErrorClass.GENERIC_ERROR,
                    "DMA is shadowed by x-shadow-start: x-shadow-stop first",
                )
            if self.m.vm.state not in (RunState.RUNNING, RunState.PAUSED):
                raise QmpError(
                    ErrorClass.GENERIC_ERROR,
                    f"cannot migrate a guest in state '{self.m.vm.state.value}'",
                )
            self._refuse_if_measuring()
            try:
                mig = SourceMigration(
                    self.m,
                    uri,
                    self.params_snapshot(),
                    self.caps_snapshot(),
                    psk=self.psk,
                    tls=self.tls,
                    insecure=self.insecure,
                    on_status=self._on_status,
                    accepted_at=accepted,
                    meter=meter,
                )
            except ValueError as e:
                raise QmpError(ErrorClass.GENERIC_ERROR, str(e)) from None
            self.current = mig
        mig.start()
        return mig

    def params_snapshot(self) -> MigrationParams:
        return dataclasses.replace(self.params)

    def caps_snapshot(self) -> MigrationCapabilities:
        return dataclasses.replace(self.caps)

    def tracking(self) -> DmaTracking | None:
        """The latest outgoing migration's DMA tracking (its shadow engine, for one)."""
        return self.current.strategy if self.current is not None else None

    def info(self) -> MigrationInfo:
        return self.current.info if self.current is not None else MigrationInfo()

    def _on_status(self, status: Status) -> None:
        if self.m.qmp is not None:
            self.m.qmp.emit("MIGRATION", {"status": status.value})
        if status == Status.COMPLETED:
            self.m.migrated_away()

    # --- QMP ---------------------------------------------------------------------------------

    def register(self, qmp: QmpServer) -> None:
        qmp.register(
            "migrate", self._qmp_migrate, args_schema={"uri": str, "*detach": bool, "*resume": bool}
        )
        qmp.register("migrate_cancel", self._qmp_cancel)
        qmp.register("migrate-start-postcopy", self._qmp_start_postcopy)
        qmp.register("x-query-postcopy", self._qmp_query_postcopy)
        qmp.register("migrate-pause", self._qmp_pause)
        qmp.register("migrate-recover", self._qmp_recover, args_schema={"uri": str})
        qmp.register("query-migrate", self._qmp_query)
        qmp.register("migrate-set-parameters", self._qmp_set_parameters, args_schema=PARAMS_SCHEMA)
        qmp.register("query-migrate-parameters", lambda: self.params.to_qmp())
        qmp.register(
            "migrate-set-capabilities",
            self._qmp_set_capabilities,
            args_schema={"capabilities": list},
        )
        qmp.register("query-migrate-capabilities", lambda: self.caps.to_qmp())
        qmp.register(
            "x-migrate-resolve", self.resolve, args_schema={"*winner": ("source", "destination")}
        )
        qmp.register(
            "x-debug-fill-ram",
            self._qmp_fill_ram,
            args_schema={"gpa": int, "size": int, "*seed": int},
        )

    def _qmp_migrate(self, uri: str, detach: bool = True, resume: bool = False) -> None:
        if resume:
            self.resume(uri)
        else:
            self.migrate(uri)

    def resume(self, uri: str) -> None:
        """`migrate` with `resume: true`: reconnect a post-copy paused on this source."""
        mig = self.current
        if mig is None:
            raise QmpError(ErrorClass.GENERIC_ERROR, "migrate resume: there is no migration")
        try:
            mig.resume(uri)
        except (PtmigError, ValueError) as e:
            raise QmpError(ErrorClass.GENERIC_ERROR, str(e)) from None

    def _qmp_pause(self) -> None:
        """QEMU's `migrate-pause`: break a post-copy link on purpose, on either side."""
        mig = self.current
        incoming = getattr(self.m, "incoming", None)
        if mig is not None and mig.info.status in (Status.POSTCOPY_ACTIVE, Status.POSTCOPY_RECOVER):
            pause = mig.pause
        elif incoming is not None and incoming.postcopy is not None:
            pause = incoming.pause_postcopy
        else:
            raise QmpError(
                ErrorClass.GENERIC_ERROR, "migrate-pause: there is no post-copy migration"
            )
        try:
            pause()
        except PtmigError as e:
            raise QmpError(ErrorClass.GENERIC_ERROR, str(e)) from None

    def _qmp_recover(self, uri: str) -> None:
        """QEMU's `migrate-recover`: the paused destination listens for the source's resume."""
        incoming = getattr(self.m, "incoming", None)
        if incoming is None or incoming.postcopy is None:
            raise QmpError(
                ErrorClass.GENERIC_ERROR, "migrate-recover: there is no incoming post-copy"
            )
        try:
            incoming.recover_postcopy(uri)
        except (PtmigError, ValueError) as e:
            raise QmpError(ErrorClass.GENERIC_ERROR, str(e)) from None

    def _qmp_query(self) -> dict[str, Any]:
        """QEMU's reply: `{}` before any migration, then the latest one's status and counters."""
        mig = self.current
        if mig is None:
            return self._incoming_query()
        if not mig.info.status.finished:
            mig.info.shadow = mig.strategy.stats()  # live counters while shadowing
        return mig.info.to_qmp()

    def _incoming_query(self) -> dict[str, Any]:
        """On a destination: the attempt in progress (`active`) or the migration whose guest it
        committed to run (`completed`, or its post-copy's status), with the migration id the
        source's `query-migrate` shows; `{}` while no source has been accepted yet."""
        incoming = getattr(self.m, "incoming", None)
        if incoming is None:
            return {}
        committed, attempt = incoming.fates.committed, incoming.migration_id
        if committed is not None and attempt in (None, committed):
            pc = incoming.postcopy
            status = pc.report.status if pc is not None else "none"
            return {
                "status": "completed" if status == "none" else status,
                "x-migration-id": committed,
            }
        if attempt is not None:
            return {"status": "active", "x-migration-id": attempt}
        return {}

    def _qmp_start_postcopy(self) -> None:
        """QEMU's `migrate-start-postcopy`: switch to post-copy at the next round end."""
        mig = self.current
        if mig is None or mig.info.status.finished:
            raise QmpError(ErrorClass.GENERIC_ERROR, "there is no migration to switch to post-copy")
        if not mig.caps.postcopy_ram:
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                "the migration was started without the postcopy-ram capability",
            )
        mig.postcopy_requested.set()

    def _qmp_query_postcopy(self) -> dict[str, Any]:
        """The destination's post-copy (status, pages, requests, fault latency); {} if none."""
        incoming = getattr(self.m, "incoming", None)
        pc = getattr(incoming, "postcopy", None)
        if pc is None:
            return {}
        devices = getattr(incoming, "postcopy_devices", None)  # shadowed, or why not
        return {**pc.live_report(), **({"x-devices": devices.report()} if devices else {})}

    def _qmp_cancel(self) -> None:
        if self.current is not None:
            self.current.cancel()

    def unresolved(self) -> bool:
        """The last migration's switchover is unresolved: the guest is paused here."""
        return self.current is not None and self.current.info.status == Status.UNRESOLVED

    def resolve(self, winner: str | None = None) -> None:
        """End an unresolved switchover: `winner` ('source' or 'destination') keeps the guest.
        Only an operator who knows which side runs it may say so. Without a winner, ask the
        destination over a new connection (`fate`); an error if it cannot say."""
        mig = self.current
        if mig is None:
            raise QmpError(ErrorClass.GENERIC_ERROR, "there is no migration to resolve")
        from .events import Role
        from .fate import Fate

        try:
            if winner is not None:
                mig.resolve(Role(winner))
                return
            answer = mig.ask_fate()
        except (ValueError, PtmigError) as e:  # a disk lock, the fate query, its transport
            raise QmpError(ErrorClass.GENERIC_ERROR, str(e)) from None
        if answer is Fate.UNKNOWN:
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                f"the destination does not know migration {mig.migration_id} (restarted?): "
                "name the winner",
            )

    def _refuse_if_measuring(self) -> None:
        if self.m.measuring_dirty_log():
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                "calc-dirty-rate (mode dirty-bitmap) is measuring with the dirty log: "
                "wait for query-dirty-rate to say 'measured'",
            )

    def busy(self) -> bool:
        """A migration is running (not yet completed, failed or cancelled)."""
        return self.current is not None and not self.current.info.status.finished

    def _qmp_set_parameters(self, **kw: Any) -> None:
        if self.busy() and "x_dma_tracking" in kw:
            raise QmpError(
                ErrorClass.GENERIC_ERROR, "x-dma-tracking cannot change while a migration runs"
            )
        try:
            self.params.set(**kw)
        except ValueError as e:
            raise QmpError(ErrorClass.GENERIC_ERROR, str(e)) from None
        if self.current is not None and self.busy():
            # As in QEMU, a running migration follows new limits at once.
            self.current.params.downtime_limit_ms = self.params.downtime_limit_ms
            self.current.params.max_bandwidth = self.params.max_bandwidth

    def _qmp_set_capabilities(self, capabilities: list[Any]) -> None:
        if self.busy():
            raise QmpError(
                ErrorClass.GENERIC_ERROR, "capabilities cannot change while a migration runs"
            )
        try:
            self.caps.set(capabilities)
        except (ValueError, AttributeError) as e:
            raise QmpError(ErrorClass.GENERIC_ERROR, str(e)) from None

    def _qmp_fill_ram(self, gpa: int, size: int, seed: int = 1) -> None:
        """Benchmark/test hook: fill guest RAM in [gpa, gpa+size) with pseudo-random bytes through
        the VMM's own (dirty-marking) write path, so a migration has real data to carry. It
        overwrites whatever the guest keeps there: only for a workload that leaves it unused."""
        if self.busy():
            raise QmpError(ErrorClass.GENERIC_ERROR, "cannot fill guest RAM while migrating")
        mem = self.m.vm.memory
        if size <= 0 or gpa < 0 or gpa % PAGE_SIZE or gpa + size > mem.size:
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                f"x-debug-fill-ram [{gpa:#x}, +{size:#x}) must start on a page "
                f"boundary, be non-empty and lie inside guest RAM [0, {mem.size:#x})",
            )
        for r in mem.regions:  # RAM only: the MMIO gap between regions is skipped
            start, end = max(gpa, r.gpa), min(gpa + size, r.end)
            for pos in range(start, end, FILL_CHUNK):
                mem.write(pos, fill_bytes(seed, pos, min(FILL_CHUNK, end - pos)))


def fill_bytes(seed: int, gpa: int, length: int) -> memoryview:
    """The `length` pseudo-random bytes `x-debug-fill-ram` puts at `gpa` (a multiple of 8).

    Word `i` of guest RAM (at gpa 8*i) gets splitmix64's output for `seed` at position i+1, so
    what a fill of a seed leaves at an address does not depend on where the fill began. It
    uses numpy's core (which a migration loads anyway) and not `numpy.random`: that package,
    with `hashlib` and OpenSSL's libcrypto it brings, kept 1.7 MiB of a source VMM's private
    memory resident for its lifetime -- memory a VMM that never ran the hook does not hold."""
    from .verify import splitmix_keys

    start = (seed + (gpa // 8) * 0x9E37_79B9_7F4A_7C15) % (1 << 64)
    return splitmix_keys((length + 7) // 8, start).data.cast("B")[:length]
