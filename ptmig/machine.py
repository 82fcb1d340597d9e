"""The VMM process's top object: a VM built from a config, its devices, and its QMP commands.

`Machine` turns a `VmConfig` into a running guest (firmware built and loaded, devices spawned
and attached) or into an empty destination waiting for an incoming migration, and registers the
QMP commands a management layer drives it with. Migration commands are added by
`ptmig.migration.control`. The machine holds its disks' locks (`ptmig.disklock`) while its guest
may run here: from boot on, or from an incoming migration's commit point.

A role's modules load when the role starts, so a VM that only runs does not carry them: the
source's with `migrate`, the destination's with `--incoming` (`ptmig.cli`), shadowing's with
`x-shadow-start` or a migration that shadows, the devices' with a config that has devices.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .config import VmConfig
from .dirtyrate import DirtyRateError, DirtyRateMeter, Request
from .disklock import DiskLockError, DiskLocks, Holder
from .firmware import build_firmware, load_firmware_image
from .layout import ABI_MMIO_STRIDE, KV_REPORT_BYTES, BootDevice, KvLogReport
from .migration.control import MigrationControl
from .qmp.server import QmpServer
from .qmp.session import ErrorClass, QmpError, RunStatus, query_status_reply
from .shadow.pool import ShadowPool
from .vm import RunState, Vm, VmSpec

if TYPE_CHECKING:
    from .devices.attach import AttachedDevice
    from .devices.handle import DeviceEvent
    from .migration.destination import Incoming
    from .shadow.engine import ShadowEngine
    from .shadow.tracking import ShadowTracking

log = logging.getLogger(__name__)

VIRTIO_ID = {"net": 1, "disk": 2}
SHADOW_POOL_PAGES = 8192  # 32 MiB of device buffers while shadowing


class Machine:
    def __init__(
        self,
        cfg: VmConfig,
        *,
        console: TextIO | None = None,
        qmp_path: str | None = None,
        psk_file: Path | None = None,
        insecure: bool = False,
    ) -> None:
        self.cfg = cfg
        self.vm = Vm(
            VmSpec(cfg.memory_bytes, cfg.vcpus, cfg.guest_cmdline(), cfg.name), console=console
        )
        self.devices: list[AttachedDevice] = []
        self.shadow_pool = ShadowPool(
            SHADOW_POOL_PAGES,
            name=f"{cfg.name}-shadow-pool",
            views=sum(1 for d in cfg.disk if d.backend == "vhost-user"),
            view_pages=self.vm.memory.npages,
        )
        self.switch_process: subprocess.Popen[bytes] | None = None  # started for our NICs
        self.incoming: Incoming | None = None  # the migration this VMM receives its guest by
        self.manual_shadow: ShadowTracking | None = None  # what x-shadow-start began
        self.dirty_rate = DirtyRateMeter(self.vm.memory, self.vm.dirty)  # calc-dirty-rate's
        self.migration = MigrationControl(self, psk_file=psk_file, insecure=insecure)
        self.disk_locks = DiskLocks(
            (d.path for d in cfg.disk), Holder.this_process(cfg.name, qmp_path)
        )
        self.qmp: QmpServer | None = None
        self._quit = threading.Event()
        # Called after `quit` is requested over QMP: a destination's way to stop the incoming
        # migration its main thread runs as a stop request would (see `ptmig.cli.run`).
        self.on_quit: Callable[[], None] | None = None
        self._closing = False
        self.vm.on_state_change(self._on_state_change)
        if qmp_path is not None:
            self.qmp = QmpServer(qmp_path)
            self._register_qmp(self.qmp)
            self.migration.register(self.qmp)

    # --- life cycle -----------------------------------------------------------------------

    def boot_devices(self) -> list[BootDevice]:
        from .devices.attach import attach_devices

        self.devices, self.switch_process = attach_devices(self)
        return [BootDevice(d.mmio_base, ABI_MMIO_STRIDE, VIRTIO_ID[d.kind]) for d in self.devices]

    def boot(self) -> None:
        """A fresh guest: build and load the firmware, spawn the devices, lock the disks
        (DiskLockError, naming the holder, if another VMM runs a guest on one of them)."""
        image = load_firmware_image(build_firmware())
        boot_devices = self.boot_devices() if self.cfg.devices else []
        self.disk_locks.acquire()  # after the devices: they create a missing image
        self.vm.boot(image.data, image.entry, image.entry_ap, boot_devices)

    def start_qmp(self) -> None:
        if self.qmp is not None:
            self.qmp.start()

    def run(self) -> int:
        """Run the guest until it exits or `quit`; returns the exit status."""
        self.vm.start()
        return self.wait()

    def wait(self) -> int:
        while True:
            code = self.vm.wait(0.2)
            if code is not None:
                return code
            if self._quit.is_set():
                self.vm.shutdown(0, "quit")
                return 0

    @property
    def shadow(self) -> ShadowEngine | None:
        """The engine shadowing device DMA now (x-shadow-start's or the migration's), if any."""
        for tracking in (self.manual_shadow, self.migration.tracking()):
            if tracking is not None and tracking.engine is not None:
                return tracking.engine
        devices = self.incoming.postcopy_devices if self.incoming is not None else None
        return devices.engine if devices is not None else None  # a post-copy destination's

    def shadowed_by_hand(self) -> bool:
        """x-shadow-start is in effect (a migration cannot start then)."""
        return self.manual_shadow is not None

    def measuring_dirty_log(self) -> bool:
        """calc-dirty-rate harvests the dirty log now (a migration cannot start)."""
        return self.dirty_rate.holds_dirty_log()

    def migrated_away(self) -> None:
        """The destination runs the guest now; this VMM has nothing left to do but exit."""
        log.info("migration completed: the guest runs on the destination")

    def after_incoming(self) -> None:
        """Called on the destination once the guest runs."""

    def announce_nics(self) -> None:
        """Tell the network where the guest's MACs are now (it just started running here)."""
        for dev in self.devices:
            if dev.kind == "net":
                try:
                    dev.handle.announce()
                except Exception as e:
                    log.warning("announce on %s failed: %s", dev.id, e)

    def device_event(self, dev: AttachedDevice, ev: DeviceEvent) -> None:
        """An asynchronous event from a device process (fault, needs-reset, gone)."""
        if ev.name == "gone":
            if self._closing:
                return
            log.error("device %s is gone: %s", dev.id, ev.data.get("reason"))
        else:
            log.warning("device %s: %s %s", dev.id, ev.name, ev.data)
        if self.qmp is not None:
            self.qmp.emit(
                "X_DEVICE_EVENT", {"device": dev.id, "event": ev.name, "data": _jsonable(ev.data)}
            )

    def close(self) -> None:
        self._closing = True
        if self.incoming is not None:  # its listener may still answer fate queries
            self.incoming.close()
        engine = self.shadow
        if engine is not None:  # its data plane thread touches guest RAM: stop it first
            try:
                engine.close()
            except Exception:
                log.exception("stopping the shadow engine")
        self.vm.close()
        for d in self.devices:
            try:
                d.close()
            except Exception:
                log.exception("closing device %s", d.id)
        self.shadow_pool.close()
        self.disk_locks.release()  # the guest and its devices are gone
        if self.qmp is not None:
            self.qmp.close()

    # --- QMP ------------------------------------------------------------------------------

    def _on_state_change(self, old: RunState, new: RunState) -> None:
        if self.qmp is None:
            return
        if new == RunState.RUNNING:
            self.qmp.emit("RESUME")
        elif old == RunState.RUNNING and new in (
            RunState.PAUSED,
            RunState.FINISH_MIGRATE,
            RunState.POSTMIGRATE,
        ):
            self.qmp.emit("STOP")
        if new == RunState.SHUTDOWN:
            self.qmp.emit(
                "SHUTDOWN",
                {
                    "guest": self.vm.exit_code is not None and not self._quit.is_set(),
                    "reason": "guest-shutdown" if not self._quit.is_set() else "host-qmp-quit",
                },
            )

    def _register_qmp(self, qmp: QmpServer) -> None:
        qmp.register("query-status", self._qmp_query_status)
        qmp.register("stop", self._qmp_stop)
        qmp.register("cont", self._qmp_cont, args_schema={"*x-force": bool})
        qmp.register("quit", self._qmp_quit)
        qmp.register("x-query-guest-stats", self._qmp_guest_stats)
        qmp.register(
            "x-shadow-start",
            self._qmp_shadow_start,
            args_schema={"*x-dma-tracking": ("shadow", "intercept")},
        )
        qmp.register("x-shadow-stop", self._qmp_shadow_stop)
        qmp.register("x-query-shadow", self._qmp_query_shadow)
        qmp.register("x-query-memory", self._qmp_query_memory)
        qmp.register("x-query-devices", self._qmp_query_devices)
        qmp.register(
            "calc-dirty-rate",
            self._qmp_calc_dirty_rate,
            args_schema={
                "calc-time": int,
                "*calc-time-unit": ("second", "millisecond"),
                "*sample-pages": int,
                "*mode": ("page-sampling", "dirty-ring", "dirty-bitmap"),
            },
        )
        qmp.register("query-dirty-rate", lambda: self.dirty_rate.info())

    def _qmp_query_status(self) -> dict[str, Any]:
        return query_status_reply(RunStatus(self.vm.state.value))

    def _qmp_stop(self) -> None:
        if self.vm.state == RunState.RUNNING:
            self.vm.pause()

    def _qmp_cont(self, x_force: bool = False) -> None:
        if self.vm.state in (RunState.POSTMIGRATE, RunState.FINISH_MIGRATE):
            self._cont_after_migration(x_force)
            return
        if self.vm.state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                f"the guest is in state '{self.vm.state.value}' and cannot continue",
            )
        if self.vm.state == RunState.INMIGRATE:
            raise QmpError(ErrorClass.GENERIC_ERROR, "an incoming migration is in progress")
        self._refuse_cont_in_postcopy()
        if self.vm.state == RunState.PRELAUNCH:  # booting, or preparing to receive a guest
            raise QmpError(ErrorClass.GENERIC_ERROR, "the guest has not started yet")
        if self.vm.state != RunState.RUNNING:
            self.vm.resume()

    def _refuse_cont_in_postcopy(self) -> None:
        """A post-copy destination paused because its link broke: pages of the guest are only
        on the source, so its vCPUs cannot run here (they would wait for them for ever)."""
        pc = self.incoming.postcopy if self.incoming is not None else None
        if pc is None or pc.report.status != "postcopy-paused":
            return
        missing = pc.report.stats.missing if pc.report.stats is not None else "some"
        raise QmpError(
            ErrorClass.GENERIC_ERROR,
            f"Guest is in state '{self.vm.state.value}' with post-copy paused "
            f"(postcopy-paused: {pc.report.error}): {missing} of its pages are still on the "
            "source, so it cannot run here; see x-query-postcopy",
        )

    def _cont_after_migration(self, force: bool) -> None:
        """`cont` on a source that migrated (or is switching over, or unresolved): refused, as
        the guest may run on the destination. `x-force` resumes it anyway, disks permitting."""
        state = self.vm.state.value
        if self.migration.busy():
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                f"Guest is in state '{state}': a migration "
                "is switching over; use migrate_cancel, 'x-force' cannot help here",
            )
        if not force:
            what = (
                "the migration's switchover is unresolved (see query-migrate); end it with "
                "x-migrate-resolve"
                if self.migration.unresolved()
                else "the guest was migrated and may be running on the destination"
            )
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                f"Guest is in state '{state}': {what}. "
                "Resuming it here too would run it twice and corrupt its disks; "
                "'cont' with 'x-force': true does it anyway",
            )
        if self.migration.unresolved():
            self.migration.resolve("source")
            return
        try:
            self.disk_locks.acquire()
        except DiskLockError as e:
            raise QmpError(ErrorClass.GENERIC_ERROR, str(e)) from None
        log.warning("cont with x-force in state '%s': the guest runs here again", state)
        for dev in self.devices:
            if dev.handle.alive:
                dev.handle.resume()
        self.vm.resume()
        self.announce_nics()

    def _qmp_quit(self) -> None:
        self.request_quit()
        if self.on_quit is not None:
            self.on_quit()

    def request_quit(self) -> None:
        """Stop the guest and end `run`/`wait` (QMP `quit`, SIGTERM, SIGINT)."""
        self._quit.set()

    def _qmp_calc_dirty_rate(
        self,
        calc_time: int,
        calc_time_unit: str = "second",
        sample_pages: int | None = None,
        mode: str = "page-sampling",
    ) -> None:
        """QEMU's calc-dirty-rate (`ptmig.dirtyrate`); query-dirty-rate reads the result."""
        try:
            request = Request.parse(calc_time, calc_time_unit, mode, sample_pages)
            if self.incoming is not None and self.vm.state == RunState.INMIGRATE:
                raise DirtyRateError("an incoming migration is in progress: no guest runs here")
            if mode == "dirty-bitmap" and self.migration.busy():
                raise DirtyRateError(
                    "a migration is tracking dirty pages: dirty-bitmap would take its pages "
                    "(page-sampling can measure during a migration)"
                )
            self.dirty_rate.start(request)
        except DirtyRateError as e:
            raise QmpError(ErrorClass.GENERIC_ERROR, str(e)) from None

    # Shadow mode without a migration: to measure the data path's cost against direct DMA
    # on the same guest, or to debug it. A migration cannot start while it is on.

    def _qmp_shadow_start(self, x_dma_tracking: str = "shadow") -> None:
        if self.shadow is not None or self.migration.busy():
            raise QmpError(
                ErrorClass.GENERIC_ERROR, "DMA is already shadowed (x-shadow-start or a migration)"
            )
        if self.vm.state not in (RunState.RUNNING, RunState.PAUSED):
            raise QmpError(
                ErrorClass.GENERIC_ERROR,
                f"cannot shadow DMA of a guest in state '{self.vm.state.value}'",
            )
        # shadowing's modules (its engine, the data plane) load when it first starts
        from .shadow.tracking import make_tracking

        tracking = make_tracking(x_dma_tracking)
        try:
            tracking.begin(self)
        except Exception as e:
            tracking.abort(self)
            raise QmpError(ErrorClass.GENERIC_ERROR, f"entering shadow mode failed: {e}") from e
        self.manual_shadow = tracking

    def _qmp_shadow_stop(self) -> dict[str, Any]:
        tracking, self.manual_shadow = self.manual_shadow, None
        if tracking is None:
            raise QmpError(ErrorClass.GENERIC_ERROR, "DMA is not shadowed by x-shadow-start")
        tracking.abort(self)
        return tracking.stats() or {}

    def _qmp_query_shadow(self) -> dict[str, Any]:
        engine = self.shadow
        active = engine is not None and engine.active
        if engine is not None and active:
            return {"active": True, **engine.stats()}
        devices = self.incoming.postcopy_devices if self.incoming is not None else None
        last = devices.stats() if devices is not None else None
        # a post-copy destination's devices were shadowed until every page arrived
        return {"active": False, **({"x-postcopy": last} if last else {})}

    def _qmp_query_devices(self) -> dict[str, Any]:
        from .devdiag import devices_report

        return {"devices": devices_report(self.devices, self.vm.memory.read)}

    def _qmp_query_memory(self) -> dict[str, Any]:
        from .memstats import memory_report

        return memory_report(self)

    def _qmp_guest_stats(self) -> dict[str, Any]:
        stats = self.vm.vcpu_stats()
        return {
            "vcpus": [
                {
                    "cpu": s.cpu,
                    "valid": s.valid,
                    "iterations": s.iterations,
                    "max-gap-us": s.max_gap_tsc * 1000 // max(1, self.vm.tsc_khz),
                    "pages-written": s.pages_written,
                    "workload": list(s.workload),
                }
                for s in stats
            ],
            "console-tail": list(self.vm.console.lines)[-20:],
            **({"kv": kv.to_json()} if (kv := self._kv_report()) is not None else {}),
        }

    def _kv_report(self) -> KvLogReport | None:
        """The kv workload's log report, if that is the guest's workload."""
        return KvLogReport.unpack(self.vm.workload_area(KV_REPORT_BYTES))


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else repr(v)
    return out
