"""ptmig: a KVM virtual machine monitor that live-migrates VMs with passthrough DMA devices.

The technique: while a migration runs, every DMA buffer a passthrough device uses is shadowed
(the guest keeps the vCPU buffer, the device is pointed at a device buffer) and the DMA work
requests are intercepted, so every byte the device writes reaches guest RAM through the
hypervisor and is dirty-tracked. Outside migration the device DMAs directly.
"""

__version__ = "0.1.0"

import os as _os

# ptmig does no linear algebra: numpy's OpenBLAS needs no worker threads, which otherwise
# start one per core in every ptmig process (and were seen spinning in the bench driver).
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
