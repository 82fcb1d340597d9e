"""The IOMMU table and the device's DMA view: translation, permissions, faults, IOTLB, log."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptmig.iommu import (
    PAGE_SIZE,
    TARGET_POOL,
    TARGET_RAM,
    DmaFault,
    DmaView,
    IommuError,
    IommuTable,
    Mapping,
    decode_entry,
    encode_entry,
)

GUEST_PAGES = 16
POOL_PAGES = 4


@pytest.fixture
def table() -> Iterator[IommuTable]:
    t = IommuTable.create(32)
    yield t
    t.close()


def make_view(table: IommuTable, *, log: bool = False) -> tuple[DmaView, bytearray, bytearray]:
    ram = bytearray(os.urandom(GUEST_PAGES * PAGE_SIZE))
    pool = bytearray(POOL_PAGES * PAGE_SIZE)
    bitmap = np.zeros(GUEST_PAGES // 8, dtype=np.uint8) if log else None
    return DmaView(table, ram, pool, bitmap, name="testdev"), ram, pool


def test_entry_encoding_round_trips() -> None:
    e = encode_entry(TARGET_POOL, 0x12345, read=True, write=False)
    assert e == 0x12345 << 12 | 0b1011
    assert decode_entry(7, e) == Mapping(7, TARGET_POOL, 0x12345, True, False)
    assert decode_entry(7, e & ~1) is None
    with pytest.raises(IommuError, match="target must be"):
        encode_entry(2, 0, True, True)


def test_identity_map_read_write(table: IommuTable) -> None:
    table.map_identity(GUEST_PAGES)
    dev, ram, _ = make_view(table)
    dev.write(0x1234, b"passthrough")
    assert ram[0x1234 : 0x1234 + 11] == b"passthrough"
    ram[0x5000:0x5004] = b"abcd"
    assert dev.read(0x5000, 4) == b"abcd"
    buf = bytearray(4)
    dev.read_into(0x5000, buf)
    assert buf == b"abcd"
    assert table.lookup(3) == Mapping(3, TARGET_RAM, 3, True, True)
    assert table.lookup(GUEST_PAGES) is None


def test_write_to_read_only_faults_and_leaves_memory(table: IommuTable) -> None:
    table.map_identity(GUEST_PAGES, writable=False)
    dev, ram, _ = make_view(table)
    before = bytes(ram)
    with pytest.raises(DmaFault, match="not writable") as info:
        dev.write(0x2000, b"x" * 10)
    assert (info.value.device, info.value.iova, info.value.length, info.value.write) == (
        "testdev",
        0x2000,
        10,
        True,
    )
    assert bytes(ram) == before
    assert dev.fault_count == 1 and dev.last_fault is info.value
    assert dev.read(0x2000, 10) == before[0x2000:0x200A]  # reads still allowed


def test_unmapped_faults(table: IommuTable) -> None:
    table.map(0, 2, TARGET_RAM, 0)
    dev, _, _ = make_view(table)
    with pytest.raises(DmaFault, match="IOVA page 0x5 is not mapped"):
        dev.read(0x5000, 1)
    with pytest.raises(DmaFault, match="IOVA limit"):
        dev.read(table.iova_limit - 2, 4)
    with pytest.raises(DmaFault):
        dev.read(-1, 1)
    assert dev.fault_count == 3


def test_a_zero_length_access_touches_nothing_and_never_faults(table: IommuTable) -> None:
    """As the native paths (vq_dma): an empty access reads or writes no page, so neither an
    unmapped page nor one past the IOVA limit is a fault (the differential fuzz found the two
    paths disagreeing here)."""
    dev, _, _ = make_view(table)
    assert dev.read(table.iova_limit + 1, 0) == b""
    dev.write(0x5000, b"")
    assert dev.fault_count == 0


def test_straddling_into_unmapped_page_writes_nothing(table: IommuTable) -> None:
    table.map(0, 4, TARGET_RAM, 0)
    table.unmap(2)
    dev, ram, _ = make_view(table)
    before = bytes(ram)
    with pytest.raises(DmaFault, match="0x2 is not mapped"):
        dev.write(2 * PAGE_SIZE - 8, b"y" * 16)
    assert bytes(ram) == before
    with pytest.raises(DmaFault):
        dev.segments(PAGE_SIZE, 2 * PAGE_SIZE, write=True)


def test_write_only_mapping_refuses_reads(table: IommuTable) -> None:
    table.map(0, 1, TARGET_RAM, 0, read=False, write=True)
    dev, ram, _ = make_view(table)
    dev.write(0, b"ok")
    assert ram[:2] == b"ok"
    with pytest.raises(DmaFault, match="not readable"):
        dev.read(0, 2)


def test_remap_to_pool_lands_in_pool(table: IommuTable) -> None:
    table.map_identity(GUEST_PAGES)
    table.map(5, 1, TARGET_POOL, 2)
    dev, ram, pool = make_view(table)
    before = bytes(ram)
    dev.write(5 * PAGE_SIZE + 100, b"device buffer")
    assert pool[2 * PAGE_SIZE + 100 : 2 * PAGE_SIZE + 113] == b"device buffer"
    assert bytes(ram) == before
    assert dev.read(5 * PAGE_SIZE + 100, 13) == b"device buffer"


def test_target_outside_memory_faults(table: IommuTable) -> None:
    table.map(0, 1, TARGET_POOL, POOL_PAGES)  # one past the pool
    table.map(1, 1, TARGET_RAM, GUEST_PAGES)  # one past guest RAM
    dev, _, _ = make_view(table)
    with pytest.raises(DmaFault, match="shadow pool"):
        dev.read(0, 1)
    with pytest.raises(DmaFault, match="guest RAM"):
        dev.write(PAGE_SIZE, b"z")
    no_pool = DmaView(table, bytearray(GUEST_PAGES * PAGE_SIZE), name="nopool")
    with pytest.raises(DmaFault, match="shadow pool"):
        no_pool.read(0, 1)


def test_segments_are_contiguous_target_runs(table: IommuTable) -> None:
    table.map(0, 2, TARGET_RAM, 3)  # IOVA 0-1 -> RAM 3-4 (contiguous)
    table.map(2, 1, TARGET_POOL, 0)  # IOVA 2 -> pool 0
    table.map(3, 1, TARGET_RAM, 9)  # IOVA 3 -> RAM 9
    dev, ram, pool = make_view(table)
    segs = dev.segments(100, 4 * PAGE_SIZE - 200, write=True)
    assert [len(s) for s in segs] == [2 * PAGE_SIZE - 100, PAGE_SIZE, PAGE_SIZE - 100]
    for seg, fill in zip(segs, b"ABC", strict=True):
        seg[:] = bytes([fill]) * len(seg)
    del segs
    assert ram[3 * PAGE_SIZE + 100 : 5 * PAGE_SIZE] == b"A" * (2 * PAGE_SIZE - 100)
    assert pool[:PAGE_SIZE] == b"B" * PAGE_SIZE
    assert ram[9 * PAGE_SIZE : 10 * PAGE_SIZE - 100] == b"C" * (PAGE_SIZE - 100)
    assert dev.read(100, 4 * PAGE_SIZE - 200) == (
        b"A" * (2 * PAGE_SIZE - 100) + b"B" * PAGE_SIZE + b"C" * (PAGE_SIZE - 100)
    )


def test_write_log_marks_exactly_written_guest_pages(table: IommuTable) -> None:
    table.map_identity(GUEST_PAGES)
    table.map(12, 1, TARGET_POOL, 0)
    dev, _, _ = make_view(table, log=True)
    dev.write(1 * PAGE_SIZE + 4000, b"x" * 200)  # pages 1 and 2
    dev.write(9 * PAGE_SIZE, b"y")  # page 9
    dev.write(12 * PAGE_SIZE, b"pool")  # pool page: not a guest page
    dev.read(5 * PAGE_SIZE, 100)  # reads never log
    with pytest.raises(DmaFault):
        dev.write(15 * PAGE_SIZE, b"z" * (PAGE_SIZE + 1))  # faults: logs nothing
    log = dev.write_log
    assert log is not None
    pages = np.flatnonzero(np.unpackbits(log, bitorder="little"))
    assert pages.tolist() == [1, 2, 9]
    dev.segments(14 * PAGE_SIZE, 10, write=True)
    assert np.flatnonzero(np.unpackbits(log, bitorder="little")).tolist() == [1, 2, 9, 14]
    dev.write_log = None
    dev.write(0, b"q")
    assert np.flatnonzero(np.unpackbits(log, bitorder="little")).tolist() == [1, 2, 9, 14]


def test_write_log_accepts_u64_kvm_layout(table: IommuTable) -> None:
    table.map_identity(GUEST_PAGES)
    words = np.zeros(1, dtype=np.uint64)
    dev = DmaView(table, bytearray(GUEST_PAGES * PAGE_SIZE), write_log=words)
    dev.write(10 * PAGE_SIZE, b"1")
    assert int(words[0]) == 1 << 10
    with pytest.raises(ValueError, match="write log has"):
        DmaView(table, bytearray(128 * PAGE_SIZE), write_log=np.zeros(1, np.uint64))


def test_iotlb_keeps_stale_translation_until_invalidated(table: IommuTable) -> None:
    table.map_identity(GUEST_PAGES)
    dev, ram, pool = make_view(table)
    dev.write(4 * PAGE_SIZE, b"before")  # caches IOVA page 4 -> RAM page 4
    gen = table.generation
    table.map(4, 1, TARGET_POOL, 1)
    assert table.generation == gen + 1
    dev.write(4 * PAGE_SIZE, b"stale!")  # the device may still use the cached entry
    assert ram[4 * PAGE_SIZE : 4 * PAGE_SIZE + 6] == b"stale!"
    assert dev.invalidate_iotlb() == table.generation
    dev.write(4 * PAGE_SIZE, b"fresh!")
    assert pool[PAGE_SIZE : PAGE_SIZE + 6] == b"fresh!"
    assert ram[4 * PAGE_SIZE : 4 * PAGE_SIZE + 6] == b"stale!"


def test_unmap_needs_invalidate_and_new_maps_need_none(table: IommuTable) -> None:
    table.map(0, 1, TARGET_RAM, 0)
    dev, _, _ = make_view(table)
    dev.read(0, 1)
    with pytest.raises(DmaFault):
        dev.read(PAGE_SIZE, 1)
    table.map(1, 1, TARGET_RAM, 1)
    dev.read(PAGE_SIZE, 1)  # faults are not cached: a new mapping is visible at once
    table.unmap(0)
    dev.read(0, 1)  # stale until invalidated
    dev.invalidate_iotlb(0, 1)
    with pytest.raises(DmaFault):
        dev.read(0, 1)


def test_owner_checks_ranges_and_device_cannot_modify(table: IommuTable) -> None:
    with pytest.raises(IommuError, match="outside the table"):
        table.map(30, 3, TARGET_RAM, 0)
    with pytest.raises(IommuError):
        table.unmap(-1)
    with pytest.raises(IommuError, match="iova_pages"):
        IommuTable.create(0)
    dev_side = IommuTable.attach(table.fd, 32)
    try:
        with pytest.raises(IommuError, match="only the owner"):
            dev_side.map(0, 1, TARGET_RAM, 0)
        with pytest.raises(IommuError, match="bytes, expected"):
            IommuTable.attach(table.fd, 64)
    finally:
        dev_side.close()


def test_writable_guest_pfns(table: IommuTable) -> None:
    table.map(0, 4, TARGET_RAM, 0, write=False)
    table.map(4, 2, TARGET_RAM, 10)
    table.map(6, 2, TARGET_POOL, 0)
    table.map(8, 1, TARGET_RAM, 10)  # aliases page 10 again
    assert table.writable_guest_pfns().tolist() == [10, 11]


def test_mark_writable_guest_sets_the_writable_ram_pages_only(table: IommuTable) -> None:
    table.map(0, 4, TARGET_RAM, 0, write=False)  # read-only: not marked
    table.map(4, 2, TARGET_RAM, 10)
    table.map(6, 2, TARGET_POOL, 0)  # the shadow pool, not guest RAM
    table.map(8, 1, TARGET_RAM, 10)  # aliases page 10 again
    table.map(9, 2, TARGET_RAM, 15)  # page 16 is past the flags' end: left out
    table.map(12, 1, TARGET_RAM, 3)
    table.unmap(12)  # unmapped again
    flags = np.zeros(GUEST_PAGES, dtype=bool)
    flags[1] = True  # marks add to what the flags already say
    table.mark_writable_guest(flags)
    assert np.flatnonzero(flags).tolist() == [1, 10, 11, 15]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 31),  # IOVA page
            st.integers(1, 8),  # pages
            st.sampled_from([TARGET_RAM, TARGET_POOL]),
            st.integers(0, 40),  # target page
            st.booleans(),  # writable
        ),
        max_size=12,
    ),
    st.integers(1, 48),
)
def test_mark_writable_guest_agrees_with_the_sorted_list(
    maps: list[tuple[int, int, int, int, bool]], npages: int
) -> None:
    t = IommuTable.create(32)
    try:
        for iova, count, target, pfn, write in maps:
            t.map(iova, min(count, 32 - iova), target, pfn, write=write)
        flags = np.zeros(npages, dtype=bool)
        t.mark_writable_guest(flags)
        listed = t.writable_guest_pfns()
        assert np.flatnonzero(flags).tolist() == listed[listed < npages].tolist()
    finally:
        t.close()


_CHILD = textwrap.dedent("""
    import mmap, sys
    from ptmig.iommu import DmaView, IommuTable, PAGE_SIZE
    table_fd, ram_fd, pages, guest_pages = map(int, sys.argv[1:5])
    table = IommuTable.attach(table_fd, pages)
    ram = mmap.mmap(ram_fd, guest_pages * PAGE_SIZE)
    m = table.lookup(3)
    print(table.generation, m.target_pfn, m.write)
    dev = DmaView(table, ram, name="child")
    dev.write(3 * PAGE_SIZE + 10, b"from the device process")
    try:
        dev.write(0, b"no")
    except Exception as e:
        print(type(e).__name__)
""")


def test_attach_from_another_process_sees_same_table(table: IommuTable) -> None:
    table.map_identity(GUEST_PAGES)
    table.map(0, 1, TARGET_RAM, 0, write=False)
    table.map(3, 1, TARGET_RAM, 7)
    ram_fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(ram_fd, GUEST_PAGES * PAGE_SIZE)
        ram = mmap.mmap(ram_fd, GUEST_PAGES * PAGE_SIZE)
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(table.fd), str(ram_fd), "32", str(GUEST_PAGES)],
            pass_fds=(table.fd, ram_fd),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert out.stdout.split() == [str(table.generation), "7", "True", "DmaFault"]
        assert ram[7 * PAGE_SIZE + 10 : 7 * PAGE_SIZE + 33] == b"from the device process"
        ram.close()
    finally:
        os.close(ram_fd)


def test_close_releases_the_mappings(table: IommuTable) -> None:
    table.map_identity(GUEST_PAGES)
    ram = mmap.mmap(-1, GUEST_PAGES * PAGE_SIZE)
    dev = DmaView(table, ram)
    dev.write(0, b"x")
    with pytest.raises(BufferError):
        ram.close()  # the device's view pins the mapping
    dev.close()
    ram.close()
    with pytest.raises(DmaFault, match="guest RAM"):
        dev.read(0, 1)


@pytest.mark.parametrize("addr", [0x2000, 0x2001, 0x2FFE, 0x2FFF])
def test_two_byte_reads_are_the_bytes_there_aligned_or_not(table: IommuTable, addr: int) -> None:
    """A 2-byte read at an even address is one 16-bit load (a ring index); it must give the
    same little-endian bytes as any other read, and an odd one (across a page too) still works."""
    table.map_identity(GUEST_PAGES)
    dev, ram, _ = make_view(table)
    assert dev.read(addr, 2) == bytes(ram[addr : addr + 2])
    ram[addr : addr + 2] = b"\x34\x12"
    assert int.from_bytes(dev.read(addr, 2), "little") == 0x1234


def test_all_dirty_round_set_is_every_page_a_device_may_write() -> None:
    """The all-dirty strategy's pages for a round: the union over the devices of the guest
    RAM pages their IOMMU tables let them write, as a bitmap of the guest's pages."""
    from types import SimpleNamespace

    from ptmig import bitmap
    from ptmig.migration.tracking import AllDirty

    net, disk = IommuTable.create(32), IommuTable.create(32)
    try:
        net.map(0, 3, TARGET_RAM, 4)  # pages 4-6
        net.map(3, 1, TARGET_RAM, 20, write=False)
        disk.map(0, 2, TARGET_RAM, 6)  # pages 6-7, 6 shared with the NIC
        disk.map(2, 1, TARGET_POOL, 9)
        disk.map(3, 2, TARGET_RAM, GUEST_PAGES - 1)  # the last page and one past the end
        guest = SimpleNamespace(
            vm=SimpleNamespace(memory=SimpleNamespace(npages=GUEST_PAGES)),
            devices=[SimpleNamespace(iommu=net), SimpleNamespace(iommu=disk)],
        )
        got = AllDirty().round_dirty(guest)  # type: ignore[arg-type]
        assert got is not None
        want = bitmap.from_pages([4, 5, 6, 7, GUEST_PAGES - 1], GUEST_PAGES)
        assert got.tolist() == want.tolist()
    finally:
        net.close()
        disk.close()


def test_all_dirty_sees_every_change_to_the_tables_between_rounds() -> None:
    """all-dirty reads a table again only after it changed (its generation moved): a page
    mapped writable after a round is in the next round, one unmapped is not; an unchanged
    table gives the same pages, and a caller changing its copy changes no later round."""
    from types import SimpleNamespace

    from ptmig.migration.tracking import AllDirty

    net, disk = IommuTable.create(32), IommuTable.create(32)
    try:
        net.map(0, 2, TARGET_RAM, 4)  # pages 4-5
        guest = SimpleNamespace(
            vm=SimpleNamespace(memory=SimpleNamespace(npages=GUEST_PAGES)),
            devices=[SimpleNamespace(iommu=net), SimpleNamespace(iommu=disk)],
        )
        strategy = AllDirty()

        def pages() -> list[int]:
            got = strategy.round_dirty(guest)  # type: ignore[arg-type]
            assert got is not None
            flags = np.unpackbits(got.view(np.uint8), bitorder="little")[:GUEST_PAGES]
            got[:] = 0  # the caller's to change
            return np.flatnonzero(flags).tolist()

        assert pages() == [4, 5]
        assert pages() == [4, 5]
        disk.map(0, 1, TARGET_RAM, 9)
        assert pages() == [4, 5, 9]
        net.unmap(1)
        assert pages() == [4, 9]
        net.map(1, 1, TARGET_RAM, 5, write=False)  # mapped again, read-only
        assert pages() == [4, 9]
    finally:
        net.close()
        disk.close()
