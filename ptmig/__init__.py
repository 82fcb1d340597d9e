"""ptmig: a KVM virtual machine monitor that live-migrates VMs with passthrough DMA devices.

The technique: while a migration runs, every DMA buffer a passthrough device uses is shadowed
(the guest keeps the vCPU buffer, the device is pointed at a device buffer) and the DMA work
requests are intercepted, so every byte the device writes reaches guest RAM through the
hypervisor and is dirty-tracked. Outside migration the device DMAs directly.
"""

__version__ = "0.1.0"
