"""Split virtqueue parser: round trips, every validation rule, and hostile rings."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptmig.devices.virtio.constants import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from ptmig.devices.virtio.queue import (
    Descriptor,
    QueueError,
    QueueState,
    SplitQueue,
    avail_pending,
    read_avail_entries,
    read_used_entries,
    used_ring_size,
    walk_chain,
)
from ptmig.devices.virtio.testing import Buffer, DriverQueue, FlatMemory
from ptmig.iommu import PAGE_SIZE, DmaFault, DmaView, IommuTable

MEM_SIZE = 1 << 20


def setup(size: int = 16, start: int = 0) -> tuple[FlatMemory, DriverQueue, SplitQueue]:
    mem = FlatMemory(MEM_SIZE, base=0x10000)
    drv = DriverQueue(mem, size, start_index=start)
    return mem, drv, SplitQueue(drv.state(), mem)


# -- well-behaved drivers ----------------------------------------------------------------------
def test_pop_and_push_round_trip() -> None:
    mem, drv, q = setup()
    assert q.pending() == 0 and q.pop() is None
    h1 = drv.add_buffers([b"request-header", b"payload"], [512, 1])
    h2 = drv.add_buffers([], [1500])
    assert q.pending() == 2
    c1 = q.pop()
    assert c1 is not None and c1.head == h1
    assert [d.length for d in c1.readable] == [14, 7]
    assert mem.read(c1.readable[0].addr, 14) == b"request-header"
    assert (c1.total_readable, c1.total_writable) == (21, 513)
    assert len(c1.indices) == 4
    c2 = q.pop()
    assert c2 is not None and c2.head == h2 and c2.readable == ()
    assert q.pop() is None
    q.push_used(h2, 1500)
    q.push_used(h1, 513)
    assert drv.take_used() == [(h2, 1500), (h1, 513)]
    assert q.state().next_avail == 2 and q.state().next_used == 2


def test_push_used_writes_element_before_idx() -> None:
    mem, drv, q = setup(size=4)
    heads = [drv.add_buffers([], [8]) for _ in range(3)]
    for _ in heads:
        q.pop()
    mem.writes.clear()
    q.push_used_many([(h, 8) for h in heads])
    idx_write = (drv.used_addr + 2, 2)
    assert mem.writes[-1] == idx_write and idx_write not in mem.writes[:-1]
    assert len(mem.writes) == 4
    assert drv.take_used() == [(h, 8) for h in heads]


def test_indices_wrap_at_16_bits() -> None:
    mem, drv, q = setup(size=4, start=0xFFFE)
    for round_ in range(5):
        h = drv.add_buffers([bytes([round_])], [4])
        chain = q.pop()
        assert chain is not None and chain.head == h
        q.push_used(h, 4)
        assert drv.take_used() == [(h, 4)]
    assert q.next_avail == (0xFFFE + 5) & 0xFFFF == 3


def test_state_snapshot_and_restore() -> None:
    mem, drv, q = setup()
    drv.add_buffers([b"a"], [])
    drv.add_buffers([b"b"], [])
    first = q.pop()
    saved = q.state()
    q2 = SplitQueue(saved, mem)
    second = q2.pop()
    assert first is not None and second is not None and second.head != first.head
    q.set_state(saved)
    again = q.pop()
    assert again == second
    with pytest.raises(QueueError, match="not a power of 2"):
        q.set_state(QueueState(3, 0, 0, 0))


def test_interrupt_suppression_flag() -> None:
    _, drv, q = setup()
    assert not q.interrupt_suppressed()
    drv.write_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert q.interrupt_suppressed()


def test_walk_chain_and_avail_entries_standalone() -> None:
    mem, drv, _ = setup(size=8)
    h = drv.add_buffers([b"xy"], [16])
    state = drv.state(next_avail=0)
    assert avail_pending(mem, state) == 1
    assert read_avail_entries(mem, state, 1) == [h]
    by_addr = walk_chain(mem, drv.desc_addr, 8, h)
    by_state = walk_chain(mem, state, None, h)
    assert by_addr == by_state
    assert by_addr.descriptors[1] == Descriptor(by_addr.descriptors[1].addr, 16, True)
    with pytest.raises(QueueError, match="needs the queue size"):
        walk_chain(mem, drv.desc_addr, None, h)
    with pytest.raises(QueueError, match="disagrees"):
        walk_chain(mem, state, 16, h)


def test_rings_behind_an_iommu() -> None:
    table = IommuTable.create(64)
    try:
        table.map_identity(32)
        ram = bytearray(32 * PAGE_SIZE)
        dma = DmaView(table, ram, name="vq")
        flat = FlatMemory(32 * PAGE_SIZE)
        flat.buf = ram  # the driver writes the same bytes the device reads through the IOMMU
        drv = DriverQueue(flat, 8)
        h = drv.add_buffers([b"ping"], [64])
        q = SplitQueue(drv.state(), dma)
        chain = q.pop()
        assert chain is not None and dma.read(chain.readable[0].addr, 4) == b"ping"
        q.push_used(h, 64)
        assert drv.take_used() == [(h, 64)]
        table.unmap(0, 1)  # the descriptor table lives in page 0
        dma.invalidate_iotlb()
        drv.add_buffers([b"pong"], [])
        with pytest.raises(DmaFault):
            q.pop()
    finally:
        table.close()


# -- each validation rule ----------------------------------------------------------------------
def hostile(size: int = 8) -> tuple[FlatMemory, DriverQueue, SplitQueue]:
    return setup(size=size)


def test_avail_idx_too_far_ahead() -> None:
    _, drv, q = hostile()
    drv.write_avail_idx(9)
    with pytest.raises(QueueError, match="avail idx 9 is 9 entries ahead.*queue size 8"):
        q.pending()
    with pytest.raises(QueueError):
        q.pop()
    assert q.next_avail == 0


def test_head_out_of_range() -> None:
    _, drv, q = hostile()
    drv.write_avail_entry(0, 8)
    drv.write_avail_idx(1)
    with pytest.raises(QueueError, match="head 8, out of range for queue size 8"):
        q.pop()
    assert q.next_avail == 1 and q.pop() is None  # the bad entry was consumed


@pytest.mark.parametrize(
    ("descs", "message"),
    [
        ([(0x20000, 16, VIRTQ_DESC_F_NEXT, 70)], "descriptor 0 next=70 out of range"),
        (
            [(0x20000, 16, VIRTQ_DESC_F_NEXT, 1), (0x20000, 16, VIRTQ_DESC_F_NEXT, 0)],
            "longer than 8 descriptors",
        ),
        ([(0x20000, 16, VIRTQ_DESC_F_NEXT, 0)], "longer than 8 descriptors"),
        ([(0x20000, 0, 0, 0)], "descriptor 0 .* has length 0"),
        (
            [(0x20000, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (0x20000, 16, 0, 0)],
            "descriptor 1 .* device-readable after a device-writable",
        ),
        ([(0x20000, 16, VIRTQ_DESC_F_INDIRECT, 0)], "INDIRECT"),
        ([(0x20000, 16, 0x10, 0)], r"flags=0x10 has reserved bits"),
        ([(2**64 - 8, 16, 0, 0)], "wraps the address space"),
        (
            [(0x20000, 0xFFFFFFFF, VIRTQ_DESC_F_NEXT, 1), (0x20000, 0xFFFFFFFF, 0, 0)],
            "describes more than",
        ),
    ],
)
def test_bad_chains(descs: list[tuple[int, int, int, int]], message: str) -> None:
    _, drv, q = hostile()
    for i, d in enumerate(descs):
        drv.write_desc(i, *d)
    drv.publish(0)
    with pytest.raises(QueueError, match=message):
        q.pop()


def test_chain_length_cap() -> None:
    mem, drv, _ = hostile(size=16)
    drv.add_chain([Buffer(0x20000 + 16 * i, 16) for i in range(5)])
    q = SplitQueue(drv.state(), mem, max_chain_len=4)
    with pytest.raises(QueueError, match="longer than 4"):
        q.pop()
    assert walk_chain(mem, drv.state(), None, 0, max_chain_len=5).total_readable == 80


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (QueueState(0, 0, 0, 0), "not a power of 2"),
        (QueueState(65536, 0, 0, 0), "not a power of 2"),
        (QueueState(6, 0, 0, 0), "not a power of 2"),
        (QueueState(8, 8, 0, 0), "descriptor table address 0x8 is not 16-byte aligned"),
        (QueueState(8, 0, 1, 0), "avail ring address 0x1 is not 2-byte aligned"),
        (QueueState(8, 0, 0, 2), "used ring address 0x2 is not 4-byte aligned"),
        (QueueState(8, 2**64 - 16, 0, 0), "outside the 64-bit"),
        (QueueState(8, 0, 0, 0, next_avail=70000), "next_avail 70000"),
        (QueueState(8, 0, 0, 0, next_used=-1), "next_used -1"),
    ],
)
def test_state_validation(state: QueueState, message: str) -> None:
    with pytest.raises(QueueError, match=message):
        state.validate()


def test_used_entries_reader_validates_ids() -> None:
    mem, drv, q = setup(size=4)
    drv.add_buffers([], [4])
    q.pop()
    q.push_used(0, 3)
    assert read_used_entries(mem, q.state(), 0, 1) == [(0, 3)]
    mem.write(drv.used_addr + 4, struct.pack("<I", 99))
    with pytest.raises(QueueError, match="id 99"):
        read_used_entries(mem, q.state(), 0, 1)
    with pytest.raises(QueueError, match="id 4 out of range"):
        q.push_used(4, 0)
    with pytest.raises(QueueError, match="32 bits"):
        q.push_used(0, 2**32)


# -- hypothesis: valid rings round-trip ------------------------------------------------------
chain_st = st.tuples(
    st.lists(st.integers(1, 300), max_size=3),  # readable lengths
    st.lists(st.integers(1, 300), max_size=3),  # writable lengths
).filter(lambda c: len(c[0]) + len(c[1]) > 0)


@settings(max_examples=150, deadline=None)
@given(
    size_log2=st.integers(0, 6),
    start=st.integers(0, 0xFFFF),
    batches=st.lists(st.lists(chain_st, min_size=1, max_size=6), min_size=1, max_size=6),
    data=st.data(),
)
def test_random_valid_rings_round_trip(
    size_log2: int,
    start: int,
    batches: list[list[tuple[list[int], list[int]]]],
    data: st.DataObject,
) -> None:
    size = 1 << size_log2
    mem = FlatMemory(MEM_SIZE)
    drv = DriverQueue(mem, size, start_index=start)
    q = SplitQueue(drv.state(), mem)
    for batch in batches:
        expected = {}
        for readable, writable in batch:
            if len(readable) + len(writable) > len(drv._free) or q.pending() == size:
                break
            payloads = [data.draw(st.binary(min_size=n, max_size=n)) for n in readable]
            head = drv.add_buffers(payloads, writable)
            expected[head] = (payloads, writable)
        assert q.pending() == len(expected)
        done = []
        while (chain := q.pop()) is not None:
            payloads, writable = expected.pop(chain.head)
            assert [mem.read(d.addr, d.length) for d in chain.readable] == payloads
            assert [d.length for d in chain.writable] == writable
            done.append((chain.head, chain.total_writable))
        assert expected == {}
        q.push_used_many(done)
        assert drv.take_used() == done


# -- hypothesis: hostile rings -----------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size_log2=st.integers(0, 8),
    garbage=st.binary(min_size=64, max_size=8192),
    next_avail=st.integers(0, 0xFFFF),
    ahead=st.one_of(st.integers(0, 300), st.integers(0, 0xFFFF)),
    max_chain=st.one_of(st.none(), st.integers(1, 300)),
    max_total=st.integers(1, 1 << 33),
    plausible=st.booleans(),
)
def test_hostile_rings_only_raise_queue_errors(
    size_log2: int,
    garbage: bytes,
    next_avail: int,
    ahead: int,
    max_chain: int | None,
    max_total: int,
    plausible: bool,
) -> None:
    size = 1 << size_log2
    avail_idx = (next_avail + ahead) & 0xFFFF
    mem = FlatMemory(1 << 16)
    reps = -(-len(mem.buf) // len(garbage))
    mem.buf[:] = (garbage * reps)[: len(mem.buf)]
    drv = DriverQueue(mem, size, start_index=next_avail)
    drv.write_avail_idx(avail_idx)
    if plausible:  # garbage, but with heads/links mostly in range and modest lengths
        for i in range(size):
            addr, length, flags, nxt = struct.unpack_from("<QIHH", mem.buf, drv.desc_addr + 16 * i)
            drv.write_desc(i, addr & 0xFFFF, length & 0x1FFF, flags & 0xF, nxt % (size + 1))
            head = struct.unpack_from("<H", mem.buf, drv.avail_addr + 4 + 2 * i)[0]
            drv.write_avail_entry(i, head % (size + 1))
    mem.buf[drv.used_addr : drv.used_addr + 4] = garbage[:4].ljust(4, b"\0")
    q = SplitQueue(drv.state(), mem, max_chain_len=max_chain, max_total_len=max_total)
    mem.writes.clear()
    popped = []
    for _ in range(size + 2):  # pop terminates: at most `size` entries can ever be pending
        try:
            chain = q.pop()
        except (QueueError, DmaFault) as e:
            if "ahead of next_avail" in str(e):
                break  # nothing is consumed: the device would be marked broken here
            continue
        if chain is None:
            break
        assert 1 <= len(chain.descriptors) <= min(size, max_chain or size)
        assert chain.total_readable + chain.total_writable <= max_total
        assert all(not d.writable for d in chain.descriptors[: len(chain.readable)])
        popped.append(chain)
    assert mem.writes == []  # parsing never writes guest memory
    for chain in popped:
        q.push_used(chain.head, chain.total_writable)
    lo, hi = drv.used_addr, drv.used_addr + used_ring_size(size)
    assert all(lo <= a and a + n <= hi for a, n in mem.writes)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(-5, 70000),
    addrs=st.tuples(*[st.integers(-1, 2**64 + 1)] * 3),
    idx=st.tuples(st.integers(-2, 70000), st.integers(-2, 70000)),
)
def test_random_states_validate_or_raise(
    size: int, addrs: tuple[int, int, int], idx: tuple[int, int]
) -> None:
    state = QueueState(size, *addrs, *idx)
    try:
        state.validate()
    except QueueError:
        return
    assert size & (size - 1) == 0 and 0 < size <= 32768
    assert addrs[0] % 16 == 0 and addrs[1] % 2 == 0 and addrs[2] % 4 == 0


desc_st = st.tuples(
    st.one_of(st.integers(0, 1 << 16), st.integers(0, 2**64 - 1)),  # addr
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),  # len
    st.integers(0, 15) | st.integers(0, 0xFFFF),  # flags
    st.integers(0, 40),  # next
)


@settings(max_examples=300, deadline=None)
@given(
    size_log2=st.integers(0, 5),
    descs=st.lists(desc_st, min_size=32, max_size=32),
    heads=st.lists(st.integers(0, 40), min_size=32, max_size=32),
    ahead=st.integers(0, 40),
    max_total=st.integers(1, 1 << 33),
)
def test_structured_hostile_descriptors(
    size_log2: int,
    descs: list[tuple[int, int, int, int]],
    heads: list[int],
    ahead: int,
    max_total: int,
) -> None:
    """Plausible-looking descriptor tables: loops, bad links, bad flags, zero and huge lengths."""
    size = 1 << size_log2
    mem = FlatMemory(1 << 16)
    drv = DriverQueue(mem, size)
    for i in range(size):
        drv.write_desc(i, *descs[i])
        drv.write_avail_entry(i, heads[i])
    drv.write_avail_idx(ahead)
    q = SplitQueue(drv.state(), mem, max_total_len=max_total)
    if ahead > size:
        with pytest.raises(QueueError, match="ahead of next_avail"):
            q.pop()
        return
    outcomes = 0
    for _ in range(size + 2):
        try:
            chain = q.pop()
        except QueueError as e:
            assert e.reason
            outcomes += 1
            continue
        if chain is None:
            break
        outcomes += 1
        walked = [descs[i] for i in chain.indices]
        assert [d.length for d in chain.descriptors] == [w[1] for w in walked]
        assert all(w[1] > 0 and w[2] & ~3 == 0 for w in walked)
        assert len(set(chain.indices)) == len(chain.indices)
    assert outcomes == ahead  # each published entry yields one chain or one error


def _load_fuzz_harness():  # type: ignore[no-untyped-def]
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_virtqueue.py"
    spec = importlib.util.spec_from_file_location("fuzz_virtqueue", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FUZZ = _load_fuzz_harness()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=10, max_size=2048))
def test_fuzz_harness_with_hypothesis(data: bytes) -> None:
    """The fuzz target, driven by hypothesis: any byte string is a hostile ring."""
    _FUZZ.one_input(data)


def test_driver_side_helpers_feed_the_device_queue() -> None:
    """What the shadow engine does toward the device: publish heads in a (shadow) avail ring."""
    from ptmig.devices.virtio.queue import ring_regions, write_avail_entry, write_avail_idx

    mem, drv, q = setup(size=4, start=0xFFFF)
    state = drv.state()
    assert ring_regions(state) == ((drv.desc_addr, 64), (drv.avail_addr, 14), (drv.used_addr, 38))
    drv.write_desc(2, 0x20000, 32, 0, 0)
    drv.write_desc(3, 0x20100, 8, VIRTQ_DESC_F_WRITE, 0)
    write_avail_entry(mem, state, 0xFFFF, 3)
    write_avail_entry(mem, state, 0x10000, 2)
    write_avail_idx(mem, state, 0xFFFF + 2)
    assert [c.head for c in (q.pop(), q.pop()) if c is not None] == [3, 2]
    with pytest.raises(QueueError, match="avail head 4 out of range"):
        write_avail_entry(mem, state, 0, 4)
