"""The virtio core, pure logic: constants, the split-virtqueue parser (`queue`), the
virtio-mmio v2 register file (`mmio`) and the driver-side helper for tests (`testing`)."""

from ptmig.devices.virtio.mmio import MmioState, QueueRegisters, VirtioMmioRegisters
from ptmig.devices.virtio.queue import (
    Descriptor,
    DescriptorChain,
    QueueError,
    QueueState,
    RingMemory,
    SplitQueue,
    read_avail_entries,
    walk_chain,
)

__all__ = [
    "Descriptor",
    "DescriptorChain",
    "MmioState",
    "QueueError",
    "QueueRegisters",
    "QueueState",
    "RingMemory",
    "SplitQueue",
    "VirtioMmioRegisters",
    "read_avail_entries",
    "walk_chain",
]
