"""Fuzz harness for the split-virtqueue parser (ptmig.devices.virtio.queue).

Owns one entry point, `one_input(data)`: the bytes choose a queue size, the ring indices and
the parser limits, and fill the memory the rings live in; the device side then pops every chain
and returns it. The property: only QueueError / DmaFault escape, pop terminates, parsing writes
nothing, and used-ring writes stay inside the used ring.

With atheris installed (optional, not a dependency): ``python fuzz/fuzz_virtqueue.py [corpus]``
runs coverage-guided fuzzing; without it, ``python fuzz/fuzz_virtqueue.py --random N`` feeds N
random inputs. The test suite drives `one_input` with hypothesis (tests/test_virtqueue.py).
"""

from __future__ import annotations

import os
import struct
import sys

from ptmig.devices.virtio.queue import QueueError, SplitQueue, used_ring_size
from ptmig.devices.virtio.testing import DriverQueue, FlatMemory
from ptmig.iommu import DmaFault

MEM_SIZE = 1 << 16
_HEADER = struct.Struct("<BHHBI")  # size_log2, next_avail, avail_idx, max_chain, max_total


def one_input(data: bytes) -> None:
    """Parse a ring described by `data`; raise AssertionError if the parser misbehaves."""
    if len(data) < _HEADER.size:
        return
    size_log2, next_avail, avail_idx, max_chain, max_total = _HEADER.unpack_from(data)
    size = 1 << (size_log2 % 10)
    body = data[_HEADER.size:] or b"\0"
    mem = FlatMemory(MEM_SIZE)
    mem.buf[:] = (body * (MEM_SIZE // len(body) + 1))[:MEM_SIZE]
    drv = DriverQueue(mem, size, start_index=next_avail)
    drv.write_avail_idx(avail_idx)
    queue = SplitQueue(drv.state(), mem, max_chain_len=max_chain or None,
                       max_total_len=max_total or 1)
    mem.writes.clear()
    popped = []
    drained = False
    for _ in range(size + 1):  # every pop consumes an entry; at most `size` can be pending
        try:
            chain = queue.pop()
        except (QueueError, DmaFault) as e:
            if "ahead of next_avail" in str(e):
                drained = True  # nothing consumable: the device would now be marked broken
                break
            continue
        if chain is None:
            drained = True
            break
        assert 0 < len(chain.descriptors) <= size
        popped.append(chain)
    assert drained, "pop did not drain a ring of at most `size` entries"
    assert mem.writes == [], "the parser wrote guest memory"
    for chain in popped:
        queue.push_used(chain.head, chain.total_writable)
    lo, hi = drv.used_addr, drv.used_addr + used_ring_size(size)
    assert all(lo <= a and a + n <= hi for a, n in mem.writes), "used write outside the ring"


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[1] == "--random":
        for _ in range(int(argv[2])):
            one_input(os.urandom(int.from_bytes(os.urandom(2), "little") % 4096 + 16))
        return
    import atheris  # type: ignore[import-not-found]  # optional

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
