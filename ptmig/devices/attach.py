"""Attaching the configured devices to a VM, the way a VMM attaches passthrough hardware.

For each `[[net]]` / `[[disk]]` in the config: an IOMMU domain (identity map of guest RAM), the
device process, its doorbells bound to QueueNotify with KVM_IOEVENTFD (datamatch = queue index,
so a guest doorbell reaches the device without a VMM exit), its MSI eventfd added to what wakes
a halted vCPU, and its register window routed to the control channel.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..config import DiskConfig, NetConfig, UdpBackend
from ..iommu import IommuTable
from .handle import DeviceEvent, DeviceHandle
from .vhost_user.frontend import VhostUserBlk
from .virtio.constants import REG_QUEUE_NOTIFY

if TYPE_CHECKING:
    from ..config import VmConfig
    from ..shadow.pool import ShadowPool
    from ..vm import Vm

log = logging.getLogger(__name__)

KIND = {"net": "net", "disk": "blk"}


@dataclass
class AttachedDevice:
    """A device as the machine holds it: config, IOMMU domain, process handle."""

    id: str
    kind: str  # "net" | "disk"
    index: int
    config: NetConfig | DiskConfig
    iommu: IommuTable
    handle: DeviceHandle | VhostUserBlk
    direct_doorbells: bool = True
    #: A vhost-user device's view of the shadow pool (`ShadowPool.view_base`): its backend
    #: translates addresses by the memory table alone, so shadowing maps it a view of device
    #: buffers laid out like guest RAM. None for a device process (its IOMMU domain remaps).
    view: int | None = None
    #: While shadowed, register writes go through this first; it returns True when it consumed
    #: the write (a trapped doorbell) so the device never sees it directly.
    mmio_hook: Callable[[int, int, int], bool] | None = None

    @property
    def mmio_base(self) -> int:
        return self.handle.mmio_base

    # MMIO forwarding (the VM calls these on KVM_EXIT_MMIO inside the window)
    def mmio_read(self, offset: int, size: int) -> int:
        return self.handle.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        hook = self.mmio_hook
        if hook is not None and hook(offset, size, value):
            return
        self.handle.mmio_write(offset, size, value)

    def close(self) -> None:
        self.handle.close()
        self.iommu.close()


def device_process_config(cfg: NetConfig | DiskConfig) -> dict[str, Any]:
    if isinstance(cfg, NetConfig):
        return {"mac": cfg.mac, "backend": str(cfg.backend)}
    return {"path": str(cfg.path), "size": cfg.size, "serial": cfg.serial}


def bind_doorbells(vm: Vm, dev: AttachedDevice, *, deassign: bool = False) -> None:
    """(Un)bind the device's doorbell eventfds to its QueueNotify register."""
    addr = dev.mmio_base + REG_QUEUE_NOTIFY
    for queue, fd in dev.handle.doorbell_eventfds.items():
        vm.vmfd.ioeventfd(fd, addr, 4, datamatch=queue, deassign=deassign)
    dev.direct_doorbells = not deassign


class DeviceHost(Protocol):
    """What attaching the configured devices needs from the VMM: the config, the VM (memory,
    KVM fds), the shadow pool every device process maps, and where device events go."""

    cfg: VmConfig
    vm: Vm
    shadow_pool: ShadowPool

    def device_event(self, dev: AttachedDevice, ev: DeviceEvent) -> None: ...


def attach_devices(
    machine: DeviceHost,
) -> tuple[list[AttachedDevice], subprocess.Popen[bytes] | None]:
    """The configured devices, attached; and the network switch process started for them, if
    one had to be (the caller owns both)."""
    from ..net.switch import ensure_switch

    vm = machine.vm
    out: list[AttachedDevice] = []
    views = 0
    switch_process: subprocess.Popen[bytes] | None = None
    try:
        for slot in machine.cfg.devices:
            cfg = slot.config
            if (
                isinstance(cfg, NetConfig)
                and isinstance(cfg.backend, UdpBackend)
                and cfg.switch == "auto"
            ):
                proc = ensure_switch(cfg.backend.host, cfg.backend.port)
                if proc is not None:
                    switch_process = proc
            if isinstance(cfg, DiskConfig):
                cfg.path.parent.mkdir(parents=True, exist_ok=True)
            iommu = IommuTable.create(vm.memory.npages)
            iommu.map_identity_ranges(vm.memory.page_ranges(), writable=True)
            try:
                handle = _open_handle(machine, slot.id, slot.kind, slot.index, cfg, iommu)
            except Exception:
                iommu.close()
                raise
            dev = AttachedDevice(slot.id, slot.kind, slot.index, cfg, iommu, handle)
            if isinstance(handle, VhostUserBlk):
                dev.view, views = views, views + 1
            handle.on_event(_forward_events(machine, dev))
            bind_doorbells(vm, dev)
            vm.attach_device(slot.index, dev)
            vm.wake_fds.append(handle.irq_eventfd)
            out.append(dev)
    except Exception:
        for dev in out:
            dev.close()
        raise
    return out, switch_process


def _open_handle(
    machine: DeviceHost,
    name: str,
    kind: str,
    index: int,
    cfg: NetConfig | DiskConfig,
    iommu: IommuTable,
) -> DeviceHandle | VhostUserBlk:
    """The device's process, or for a vhost-user disk the frontend of its backend (the
    memory table it sends plays the IOMMU's role; `iommu` maps the same guest RAM)."""
    mem = machine.vm.memory
    if isinstance(cfg, DiskConfig) and cfg.backend == "vhost-user":
        return VhostUserBlk.open(
            name, index, mem, socket_path=cfg.socket, image=cfg.path, size=cfg.size, spawn=cfg.spawn
        )
    return DeviceHandle.spawn(
        KIND[kind],
        index,
        device_process_config(cfg),
        mem.fd,
        mem.size,
        iommu,
        machine.shadow_pool.fd,
        name=name,
    )


def _forward_events(machine: DeviceHost, dev: AttachedDevice) -> Callable[[DeviceEvent], None]:
    def forward(ev: DeviceEvent) -> None:
        machine.device_event(dev, ev)

    return forward


def describe_event(dev: AttachedDevice, ev: DeviceEvent) -> str:
    return f"device {dev.id}: {ev.name} {ev.data}"
