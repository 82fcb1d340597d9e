"""DMA shadowing: live migration with passthrough devices (the seed's technique).

While a migration runs, every DMA buffer a device uses exists twice: the **vCPU buffer** (the
guest's own pages, which the guest keeps using) and the **device buffer** (a copy in the VMM's
shadow pool, which the device is pointed at by remapping its IOMMU entries). The VMM keeps the
two in sync by intercepting the **DMA work requests**: on a doorbell it copies the request and
every byte of the request's buffers into the device buffer (what the device will read, and
what the guest's writable buffers hold) and forwards the doorbell; on the device's interrupt it
checks the used element against its own record of the request and copies the request's whole
device-writable area back (only the bytes that changed), then the used element with the
device's len and the used index, marking every guest page it changes dirty. The guest ends up
with exactly what direct DMA would have left, and every byte that reaches guest RAM is a VMM
write in the dirty set. Outside migration nothing here runs.

    pool      the shadow page pool (memfd shared with device processes)
    mapping   GPA page → device-buffer page, reference counts, the IOMMU remaps
    device    one shadowed device: its queues, submission and completion interception
    native    the data plane: per-request forwarding and syncing in C (native/dataplane.c),
              on a thread of its own that services trapped doorbells and interrupts
    reference the same per-request rules in Python: the oracle the native one is tested against
    engine    entering and leaving shadow mode; answers the data plane's calls for help
    strategy  the `shadow` value of x-dma-tracking, as the migration engine sees it
    restore   the destination side: program a fresh device from the interception log
"""
