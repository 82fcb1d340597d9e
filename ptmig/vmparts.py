"""What migration, shadowing and device attachment need from a VM, as narrow interfaces.

`ptmig.machine.Machine` composes a VM, its devices, the shadow pool, disk locks, QMP and the
migration control; the packages it composes never import it. Each takes one of these
`Protocol`s instead, naming only the parts it uses (in the spirit of cloud-hypervisor's
Pausable / Snapshottable / Migratable traits):

- `Guest`: the VM (guest RAM, its dirty log, vCPUs that pause and resume) and its devices:
  what a DMA-tracking strategy reads and quiesces.
- `ShadowHost`: a `Guest` plus the pool the shadow engine's device buffers come from.
- `MigratingVm`: what either side of a migration needs besides: the config (its compatibility
  fingerprint), the disk locks, the QMP server for events, and the hooks run when the guest
  moves.

Attaching devices takes `ptmig.devices.attach.DeviceHost`, defined beside its one user. The
Machine satisfies all of them; tests can satisfy them with small fakes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import VmConfig
    from .devices.attach import AttachedDevice
    from .disklock import DiskLocks
    from .qmp.server import QmpServer
    from .shadow.pool import ShadowPool
    from .vm import Vm


class Guest(Protocol):
    """The guest's VM and the devices attached to it."""

    vm: Vm
    devices: list[AttachedDevice]


class ShadowHost(Guest, Protocol):
    """A guest whose device DMA can be shadowed: the device buffers come from `shadow_pool`."""

    shadow_pool: ShadowPool


class MigratingVm(ShadowHost, Protocol):
    """What the source or the destination of a migration needs from the VMM."""

    cfg: VmConfig
    disk_locks: DiskLocks
    qmp: QmpServer | None

    def announce_nics(self) -> None: ...
    def migrated_away(self) -> None: ...
    def after_incoming(self) -> None: ...
    def shadowed_by_hand(self) -> bool: ...
    def measuring_dirty_log(self) -> bool: ...
