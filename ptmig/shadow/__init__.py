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

`x-dma-tracking intercept` runs on the same machinery with only the rings shadowed: the data
buffers stay where the guest put them (identity in the device's IOMMU view), the device writes
guest RAM itself, and the VMM -- which still sees every request and completion first -- marks
every page of a completed request's device-writable buffers dirty before the guest sees the
used element. It copies no data; it trusts the device to write only the buffers it was given
and to stop when quiesced (`strategy` says why nothing escapes, and where it could).

    pool      the shadow page pool (memfd shared with device processes)
    mapping   GPA page → device-buffer page, reference counts, the IOMMU remaps
    device    one shadowed device: its queues, submission and completion interception
    native    the data plane: per-request forwarding and syncing in C (native/dataplane.c),
              on a thread of its own that services trapped doorbells and interrupts
    reference the same per-request rules in Python: the oracle the native one is tested against
    engine    entering and leaving shadow mode; answers the data plane's calls for help
    strategy  the `shadow` and `intercept` values of x-dma-tracking, as the migration engine
              sees them
    restore   the destination side: program a fresh device from the interception log
"""
