"""Guest RAM above 4 GiB: the layout's regions, the page tables and boot information that
describe them, the checks that keep every access out of the MMIO gap, and — on real KVM — a
guest that writes on both sides of the gap and is harvested and migrated page-exactly."""

from __future__ import annotations

import ctypes
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from shadowrig import GuestStores, attached, device_state

from ptmig import bitmap, boot, layout
from ptmig.devices.virtio.queue import SplitQueue
from ptmig.devices.virtio.testing import Buffer, DriverQueue
from ptmig.dirty import KvmDirtyLog
from ptmig.iommu import DmaFault, DmaView, IommuTable
from ptmig.layout import (
    ABI_HIGH_RAM_GPA,
    ABI_LOW_RAM_MAX,
    ABI_PML4_GPA,
    ABI_WORKLOAD_STATS_GPA,
    PAGE_SIZE,
    RamRegion,
)
from ptmig.memory import GuestMemory, GuestMemoryError, check_host_memory
from ptmig.migration.events import RemoteProtocolError, make_runs
from ptmig.migration.pages import validate_runs

GIB = 1 << 30
MIB = 1 << 20
HIGH_PAGE = ABI_HIGH_RAM_GPA // PAGE_SIZE
LOW_PAGES = ABI_LOW_RAM_MAX // PAGE_SIZE


# --- layout ------------------------------------------------------------------------------------


def test_small_guests_have_one_region_from_zero() -> None:
    assert layout.ram_regions(64 * MIB) == (RamRegion(0, 64 * MIB),)
    assert layout.ram_regions(3 * GIB) == (RamRegion(0, 3 * GIB),)
    assert layout.ram_top(3 * GIB) == 3 * GIB


def test_larger_guests_continue_at_4_gib() -> None:
    regions = layout.ram_regions(8 * GIB)
    assert regions == (RamRegion(0, 3 * GIB), RamRegion(4 * GIB, 5 * GIB))
    assert layout.ram_top(8 * GIB) == 9 * GIB
    assert sum(r.size for r in regions) == 8 * GIB
    assert layout.ram_regions(3 * GIB + 2 * MIB)[1] == RamRegion(4 * GIB, 2 * MIB)


@given(st.integers(8, layout.MAX_MEMORY >> 21))
def test_regions_hold_all_ram_and_never_touch_the_mmio_windows(units: int) -> None:
    memory = units << 21
    regions = layout.ram_regions(memory)
    assert sum(r.size for r in regions) == memory
    for r in regions:
        assert r.end <= layout.ABI_MMIO_BASE_GPA or r.gpa >= ABI_HIGH_RAM_GPA
        assert r.first_page % 64 == 0  # the dirty log of each slot is whole bitmap words
    assert layout.ram_top(memory) <= layout.RAM_TOP_MAX


def test_boot_info_lists_the_regions() -> None:
    page = layout.pack_boot_info(1, 8 * GIB, 1000, "hello", [])
    magic, version, _, mem_size, _, _, _, nr_ram = struct.unpack_from("<QIIQQQII", page)
    assert magic == layout.BOOT_INFO_MAGIC and version == layout.BOOT_INFO_VERSION == 2
    assert mem_size == 3 * GIB and nr_ram == 2
    off = layout.BOOT_INFO_REGIONS_OFFSET
    assert off == 1200  # struct boot_info.ram in guest/abi.h
    assert struct.unpack_from("<4Q", page, off) == (0, 3 * GIB, 4 * GIB, 5 * GIB)


def _translate(mem: GuestMemory, va: int) -> int | None:
    """Walk the VMM-built page tables as the CPU would (4-level, 2 MiB leaves)."""
    pml4e = mem.read_u64(ABI_PML4_GPA + ((va >> 39) & 511) * 8)
    if not pml4e & 1:
        return None
    pdpte = mem.read_u64((pml4e & ~0xFFF) + ((va >> 30) & 511) * 8)
    if not pdpte & 1:
        return None
    pde = mem.read_u64((pdpte & ~0xFFF & ((1 << 52) - 1)) + ((va >> 21) & 511) * 8)
    if not pde & 1 or not pde & boot.PTE_PS or not pde & boot.PTE_US:
        return None
    return (pde & ~((1 << 21) - 1) & ((1 << 52) - 1)) | (va & ((1 << 21) - 1))


def test_page_tables_map_ram_above_4_gib_identity() -> None:
    mem = GuestMemory(6 * GIB)
    try:
        boot.write_page_tables(mem)
        for va in (
            0x600000,
            ABI_LOW_RAM_MAX - 8,
            layout.ABI_MMIO_BASE_GPA,
            ABI_HIGH_RAM_GPA,
            ABI_HIGH_RAM_GPA + 0x12345678,
            mem.size - 8,
        ):
            assert _translate(mem, va) == va, hex(va)
        assert _translate(mem, mem.size) is None  # nothing past the end of RAM
    finally:
        mem.close()


# --- guest memory: the gap is not RAM ------------------------------------------------------------


def test_guest_memory_refuses_the_gap_and_allocates_none_of_it() -> None:
    mem = GuestMemory(5 * GIB)
    try:
        assert mem.size == 6 * GIB and mem.ram == 5 * GIB
        mem.write(ABI_HIGH_RAM_GPA + 4096, b"above 4G")
        assert mem.read(ABI_HIGH_RAM_GPA + 4096, 8) == b"above 4G"
        for gpa, n in (
            (ABI_LOW_RAM_MAX, 1),
            (ABI_LOW_RAM_MAX - 4, 8),
            (ABI_HIGH_RAM_GPA - 1, 2),
            (mem.size, 1),
        ):
            with pytest.raises(GuestMemoryError, match="outside guest RAM"):
                mem.write(gpa, bytes(n))
        assert mem.holes() == [(LOW_PAGES, HIGH_PAGE - LOW_PAGES)]
        ram = bitmap.to_bool(mem.ram_bitmap(), mem.npages)
        assert ram.sum() == 5 * GIB // PAGE_SIZE
        assert not ram[LOW_PAGES:HIGH_PAGE].any() and ram[HIGH_PAGE:].all()
        alloc = mem.allocated()
        assert alloc[HIGH_PAGE + 1] and alloc.sum() == 1 and not alloc[LOW_PAGES:HIGH_PAGE].any()
    finally:
        mem.close()


def test_host_memory_limit_is_refused_with_the_numbers() -> None:
    check_host_memory(8 * GIB, available=9 * GIB)
    with pytest.raises(
        GuestMemoryError,
        match=r"8192 MiB is more than the host has available "
        r"\(4096 MiB MemAvailable\)",
    ):
        check_host_memory(8 * GIB, available=4 * GIB)


def test_a_peer_cannot_send_pages_into_the_gap() -> None:
    mem_pages = layout.ram_top(5 * GIB) // PAGE_SIZE
    holes = [(LOW_PAGES, HIGH_PAGE - LOW_PAGES)]
    ok = make_runs([LOW_PAGES - 2, HIGH_PAGE], [2, 3])
    assert validate_runs(ok, mem_pages, holes=holes) == 5 * PAGE_SIZE
    for start, n in ((LOW_PAGES - 1, 2), (LOW_PAGES + 7, 1), (HIGH_PAGE - 1, 1)):
        bad = make_runs([start], [n])
        with pytest.raises(RemoteProtocolError, match="MMIO gap"):
            validate_runs(bad, mem_pages, holes=holes)


def test_device_dma_above_4_gib_is_served_and_the_gap_faults() -> None:
    mem = GuestMemory(5 * GIB)
    table = IommuTable.create(mem.npages)
    try:
        table.map_identity_ranges(mem.page_ranges())
        dma = DmaView(table, mem.mmap)
        dma.write(ABI_HIGH_RAM_GPA + 0x1000, b"rx frame")
        assert mem.read(ABI_HIGH_RAM_GPA + 0x1000, 8) == b"rx frame"
        # a buffer straddling the top of low RAM reaches into the gap: refused, nothing written
        with pytest.raises(DmaFault, match="not mapped"):
            dma.write(ABI_LOW_RAM_MAX - 4, b"12345678")
        assert mem.read(ABI_LOW_RAM_MAX - 4, 4) == bytes(4)
        assert not mem.allocated()[LOW_PAGES:HIGH_PAGE].any()
        dma.close()
    finally:
        table.close()
        mem.close()


@given(st.integers(0, 700), st.integers(0, 300))
def test_set_range_sets_exactly_the_range(first: int, count: int) -> None:
    bm = bitmap.empty(1024)
    bitmap.set_range(bm, first, count)
    want = np.zeros(1024, dtype=bool)
    want[first : first + count] = True
    assert (bitmap.to_bool(bm, 1024) == want).all()


class _TwoSlotVm:
    """A VM fd's dirty-log calls over two memslots, recording what the harvest clears."""

    def __init__(self, logs: dict[int, np.ndarray]) -> None:
        self.logs = logs
        self.cleared: list[tuple[int, int]] = []

    def check_extension(self, cap: int) -> int:
        return 1

    def enable_cap(self, cap: int, arg: int) -> None:
        pass

    def get_dirty_log(self, slot: int, addr: int) -> None:
        src = self.logs[slot]
        np.ctypeslib.as_array((ctypes.c_uint64 * src.size).from_address(addr))[:] = src

    def clear_dirty_log(self, slot: int, first: int, n: int, addr: int) -> None:
        self.cleared.append((slot, n))


def test_the_harvest_places_each_slot_log_at_its_gpa() -> None:
    low_pages, high_pages = LOW_PAGES, 2 * GIB // PAGE_SIZE
    span = HIGH_PAGE + high_pages
    logs = {
        0: bitmap.from_pages([0, 5, low_pages - 1], low_pages),
        1: bitmap.from_pages([0, 77, high_pages - 1], high_pages),
    }
    fake = _TwoSlotVm(logs)
    log = KvmDirtyLog(fake, [(0, 0, low_pages), (1, HIGH_PAGE, high_pages)], span)  # type: ignore[arg-type]
    got = bitmap.pages(log.harvest(), span).tolist()
    assert got == [0, 5, low_pages - 1, HIGH_PAGE, HIGH_PAGE + 77, span - 1]
    assert fake.cleared == [(0, low_pages), (1, high_pages)]


def test_the_final_harvest_adds_to_the_unsent_pages_and_each_harvest_has_only_its_own() -> None:
    """The stop-and-copy's harvest goes into the bitmap of pages still unsent (KVM's logs of
    both slots and the VMM's writes added, the pages already there kept); the slot logs reuse
    one scratch bitmap, so a later harvest must hold only what its own logs report."""
    from ptmig.dirty import DirtyTracker

    high_pages = 2 * GIB // PAGE_SIZE
    mem = GuestMemory(ABI_LOW_RAM_MAX + 2 * GIB)
    try:
        logs = {
            0: bitmap.from_pages([5], LOW_PAGES),
            1: bitmap.from_pages([77, high_pages - 1], high_pages),
        }
        slots = [(0, 0, LOW_PAGES), (1, HIGH_PAGE, high_pages)]
        tracker = DirtyTracker(KvmDirtyLog(_TwoSlotVm(logs), slots, mem.npages), mem)  # type: ignore[arg-type]
        mem.mark_dirty(ABI_HIGH_RAM_GPA + 9 * PAGE_SIZE, 1)
        pending = bitmap.from_pages([1, HIGH_PAGE + 3], mem.npages)
        tracker.harvest_into(pending)
        assert bitmap.pages(pending, mem.npages).tolist() == [
            1,
            5,
            HIGH_PAGE + 3,
            HIGH_PAGE + 9,
            HIGH_PAGE + 77,
            mem.npages - 1,
        ]
        logs[0][:] = bitmap.from_pages([6], LOW_PAGES)
        logs[1][:] = 0
        assert bitmap.pages(tracker.harvest(), mem.npages).tolist() == [6]
    finally:
        mem.close()


# --- on real KVM ---------------------------------------------------------------------------------

# A working set that starts 16 MiB below the top of low RAM and continues from 4 GiB up.
ACROSS_THE_GAP = ABI_LOW_RAM_MAX - 16 * MIB
_DIRTY_REPORT = struct.Struct("<6Q")  # magic, bitmap_gpa, bitmap_bytes, ws_gpa, ws_pages, pass


@pytest.mark.kvm
@pytest.mark.bigmem(6)
def test_guest_writes_both_regions_and_the_harvest_has_every_page(firmware) -> None:
    from ptmig.vm import Vm, VmSpec

    vm = Vm(VmSpec(memory=5 * GIB, vcpus=1, cmdline=f"dirty at={ACROSS_THE_GAP:#x} ws=64M"))
    try:
        vm.boot(firmware.data, firmware.entry, firmware.entry_ap)
        vm.dirty.reset()
        vm.start()
        deadline = time.monotonic() + 30
        while vm.vcpu_stats()[0].workload[0] < 1:  # one whole pass over the working set
            assert time.monotonic() < deadline, list(vm.console.lines)[-5:]
            time.sleep(0.05)
        vm.pause()
        magic, bm_gpa, bm_bytes, ws_gpa, ws_pages, _ = _DIRTY_REPORT.unpack(
            vm.memory.read(ABI_WORKLOAD_STATS_GPA, _DIRTY_REPORT.size)
        )
        assert magic == 0x3150525954524944 and ws_gpa == ACROSS_THE_GAP
        assert bm_bytes == vm.memory.npages // 8
        truth = bitmap.to_bool(
            np.frombuffer(vm.memory.read(bm_gpa, bm_bytes), np.uint64), vm.memory.npages
        )
        written = np.flatnonzero(truth)
        low = ACROSS_THE_GAP // PAGE_SIZE
        expect = np.r_[low:LOW_PAGES, HIGH_PAGE : HIGH_PAGE + ws_pages - (LOW_PAGES - low)]
        assert np.array_equal(written, expect)
        harvested = bitmap.to_bool(vm.dirty.harvest(), vm.memory.npages)
        assert not np.flatnonzero(truth & ~harvested).size, "written pages not harvested"
        assert not harvested[LOW_PAGES:HIGH_PAGE].any()
        # the guest's stores landed where the VMM reads them: value = pass + page index
        top = vm.memory.read_u64(
            HIGH_PAGE * PAGE_SIZE + (ws_pages - (LOW_PAGES - low) - 1) * PAGE_SIZE
        )
        assert 0 <= top - (ws_pages - 1) < vm.vcpu_stats()[0].workload[0]
    finally:
        vm.close()


def _migrate_across_the_gap(tmp_path: Path, memory: str) -> dict:
    from vmmrig import Vmm, dirty_config, free_port

    config = dirty_config(
        tmp_path, memory=memory, vcpus=1, ws="64M", extra=f'at = "{ACROSS_THE_GAP:#x}"'
    )
    port = free_port()
    src = Vmm(tmp_path, "src", config)
    dst = Vmm(tmp_path, "dst", config, incoming_port=port)
    try:
        src.wait_ready()
        dst.wait_incoming(timeout=120)
        deadline = time.monotonic() + 30
        while src.cmd("x-query-guest-stats")["vcpus"][0]["workload"][0] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        src.migrate(port, tracking="none", verify=True)
        info = src.wait_migration(timeout=240)
        assert info["status"] == "completed", info
        # the guest runs on at the destination: a whole further pass over both regions
        passes = dst.cmd("x-query-guest-stats")["vcpus"][0]["workload"][0]
        deadline = time.monotonic() + 30
        while dst.cmd("x-query-guest-stats")["vcpus"][0]["workload"][0] < passes + 2:
            assert time.monotonic() < deadline, "the guest does not run at the destination"
            time.sleep(0.05)
        return info
    finally:
        src.stop()
        dst.stop()


@pytest.mark.kvm
@pytest.mark.bigmem(11)
@pytest.mark.timeout(300)
def test_5_gib_guest_writing_both_regions_migrates_verified(tmp_path: Path) -> None:
    info = _migrate_across_the_gap(tmp_path, "5G")
    assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
    assert info["x-verify"]["pages"] == layout.ram_top(5 * GIB) // PAGE_SIZE
    # round 0 covers every RAM page and none of the gap's
    assert info["x-rounds"][0]["pages"] == 5 * GIB // PAGE_SIZE
    assert info["ram"]["total"] == 5 * GIB


@pytest.mark.kvm
@pytest.mark.bigmem(17)
@pytest.mark.timeout(600)
def test_8_gib_guest_writing_both_regions_migrates_verified(tmp_path: Path) -> None:
    info = _migrate_across_the_gap(tmp_path, "8G")
    assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
    assert info["x-rounds"][0]["pages"] == 8 * GIB // PAGE_SIZE


# --- device DMA into buffers above 4 GiB: direct, and under shadowing (Python and native) -----


def _rx_rig(mem: GuestMemory) -> tuple[IommuTable, DriverQueue, int]:
    iommu = IommuTable.create(mem.npages)
    iommu.map_identity_ranges(mem.page_ranges())
    drv = DriverQueue(GuestStores(mem), 16, base=0x10000, data_start=ABI_HIGH_RAM_GPA + 0x200000)
    rx = drv.alloc(2 * PAGE_SIZE, fill=b"G" * 2 * PAGE_SIZE, align=PAGE_SIZE)
    assert rx >= ABI_HIGH_RAM_GPA
    return iommu, drv, rx


def test_an_rx_buffer_above_4_gib_is_served_directly() -> None:
    mem = GuestMemory(5 * GIB)
    iommu, drv, rx = _rx_rig(mem)
    dma = DmaView(iommu, mem.mmap, name="dev0")
    try:
        head = drv.add_chain([Buffer(rx, 2 * PAGE_SIZE, writable=True)])
        dq = SplitQueue(drv.state(), dma)
        chain = dq.pop()
        assert chain is not None and chain.descriptors[0].addr == rx
        dma.write(rx, b"D" * (PAGE_SIZE + 10))
        dq.push_used(head, PAGE_SIZE + 10)
        assert drv.take_used() == [(head, PAGE_SIZE + 10)]
        assert mem.read(rx, PAGE_SIZE + 11) == b"D" * (PAGE_SIZE + 10) + b"G"
    finally:
        dma.close()
        iommu.close()
        mem.close()


def test_an_rx_buffer_above_4_gib_is_served_under_shadowing() -> None:
    from ptmig.shadow.device import ShadowedDevice
    from ptmig.shadow.pool import ShadowPool

    mem = GuestMemory(5 * GIB)
    iommu, drv, rx = _rx_rig(mem)
    pool = ShadowPool(256)
    sd = ShadowedDevice(attached("dev0", iommu), pool, mem)  # the native data plane
    dma = DmaView(iommu, mem.mmap, pool=pool.mmap, name="dev0")
    try:
        head = drv.add_chain([Buffer(rx, 2 * PAGE_SIZE, writable=True)])
        sd.build(device_state(drv))
        assert sd.submit(0), sd.broken
        sd.flush_mappings()
        dma.invalidate_iotlb()
        sd.map.invalidated()
        # the device writes a shadow page in the pool, not guest RAM, until completion
        shadowed = iommu.lookup(rx // PAGE_SIZE)
        assert shadowed is not None and shadowed.target != 0
        dq = SplitQueue(drv.state(), dma)
        chain = dq.pop()
        assert chain is not None and chain.head == head
        sd.dataplane.take_dirty()
        dma.write(rx, b"D" * (PAGE_SIZE + 10))
        assert mem.read(rx, 1) == b"G"
        dq.push_used(head, PAGE_SIZE + 10)
        assert sd.complete() == 1
        assert mem.read(rx, 2 * PAGE_SIZE) == b"D" * (PAGE_SIZE + 10) + b"G" * (PAGE_SIZE - 10)
        assert drv.take_used() == [(head, PAGE_SIZE + 10)]
        dirty = bitmap.pages(sd.dataplane.take_dirty(), mem.npages)
        assert {rx // PAGE_SIZE, rx // PAGE_SIZE + 1} <= set(dirty.tolist())
    finally:
        sd.close()
        dma.close()
        iommu.close()
        pool.close()
        mem.close()


@pytest.mark.parametrize("tracking", ["shadow", "intercept"])
@pytest.mark.parametrize("path", ["native", "reference"])
@pytest.mark.parametrize(
    "where", [ABI_LOW_RAM_MAX + 0x1000, ABI_LOW_RAM_MAX - 8, ABI_HIGH_RAM_GPA - PAGE_SIZE]
)
def test_a_descriptor_into_the_mmio_gap_is_refused_by_the_data_plane(
    path: str, tracking: str, where: int
) -> None:
    """A hostile ring pointing into the gap between the RAM regions (or straddling its edge):
    the data plane itself refuses it like any address outside RAM -- it neither stalls for
    Python nor (intercept) hands it to the device -- and nothing in the gap is allocated,
    marked dirty or given a device buffer."""
    from ptmig.shadow.device import ShadowedDevice
    from ptmig.shadow.pool import ShadowPool
    from ptmig.shadow.reference import ReferenceDataplane

    mem = GuestMemory(5 * GIB)
    iommu, drv, rx = _rx_rig(mem)
    pool = ShadowPool(64)
    dp = ReferenceDataplane(mem, pool) if path == "reference" else None
    sd = ShadowedDevice(attached("dev0", iommu), pool, mem, dp, intercept=tracking == "intercept")
    try:
        sd.build(device_state(drv))
        drv.add_chain([Buffer(rx, 64, writable=False), Buffer(where, 16, writable=True)])
        ring_pages = pool.in_use
        with sd.dataplane.locked():
            assert sd.native.forward(0) == -1
        assert sd.broken is not None and "outside guest RAM" in sd.broken, sd.broken
        assert sd.queues[0].next_avail == 0 and sd.stats.requests_forwarded == 0
        assert pool.in_use == ring_pages
        gap = slice(LOW_PAGES, HIGH_PAGE)
        assert not mem.allocated()[gap].any()
        assert not bitmap.to_bool(sd.dataplane.take_dirty(), mem.npages)[gap].any()
        assert not (sd.map.slot[gap] >= 0).any()
    finally:
        sd.close()
        if dp is not None:
            dp.close()
        iommu.close()
        pool.close()
        mem.close()


@pytest.mark.kvm
@pytest.mark.bigmem(9)
@pytest.mark.timeout(300)
def test_kv_guest_of_4_gib_under_load_migrates_with_shadow_losing_nothing(tmp_path: Path) -> None:
    """The guest's heap takes RAM above 4 GiB first: its virtqueues, RX buffers and block
    buffers live there, so the devices DMA above 4 GiB directly, then under shadowing."""
    import socket

    from vmmrig import Load, Vmm, free_port, kv_config, switch

    sw = free_port(socket.SOCK_DGRAM)
    cfg = kv_config(tmp_path, sw, memory="4G")
    with switch(sw):
        port = free_port()
        src = Vmm(tmp_path, "src", cfg)
        dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
        try:
            src.wait_running()
            dst.wait_incoming(timeout=120)
            load = Load(cfg, 5.0, tmp_path / "load.json").start()
            time.sleep(1.0)
            report = src.cmd("x-query-memory")
            low, high = report["guest-ram"]["regions"]
            assert (low["gpa"], high["gpa"]) == (0, ABI_HIGH_RAM_GPA)
            assert high["resident"] > 0, "nothing of the guest lives above 4 GiB"
            assert report["vmm"]["total"] > 0 and len(report["vmm"]["devices"]) == 2
            src.migrate(port, tracking="shadow", verify=True, downtime_limit=100)
            info = src.wait_migration(timeout=120)
            result = load.result()
            assert info["status"] == "completed", info
            assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
            assert info["x-shadow"]["requests-forwarded"] > 0, info["x-shadow"]
            assert result["acked"] > 0 and result["unverified"] == 0, result["output"]
            assert result["lost"] == 0 and result["wrong"] == 0, result["output"]
            assert dst.status() == "running"
        finally:
            src.stop()
            dst.stop()


@given(st.lists(st.integers(0, 2000), max_size=300), st.integers(1, 2100))
def test_set_runs_agree_with_the_bit_by_bit_runs(pages_set: list[int], npages: int) -> None:
    from ptmig.migration.pages import bits_to_runs, set_runs

    bm = bitmap.from_pages(pages_set, 2048 + 64)
    want_s, want_c = bits_to_runs(bitmap.to_bits(bm, npages))
    got_s, got_c = set_runs(bm, npages)
    assert got_s.tolist() == want_s.tolist() and got_c.tolist() == want_c.tolist()
    assert (
        set_runs(bm.view(np.uint8)[:-3], None)[0].size
        == bits_to_runs(bitmap.to_bits(bm.view(np.uint8)[:-3]))[0].size
    )


# --- the scale bench's arithmetic ----------------------------------------------------------------


def test_scale_results_judge_linearity_downtime_harvest_and_memory() -> None:
    from ptmig.bench.scale import ScaleSample, results

    def sample(
        memory: int, total: float, downtime: float = 3.0, vmm: int = 10 * MIB
    ) -> ScaleSample:
        return ScaleSample(
            memory, total, downtime, memory, 100.0, [0.5, 1.5], vmm, vmm // 2, [40.0, 2.0]
        )

    rows = {
        r.name: r
        for r in results(
            {
                256 * MIB: [sample(256 * MIB, 500.0)],
                GIB: [sample(GIB, 1000.0)],
                2 * GIB: [sample(2 * GIB, 2000.0)],
                4 * GIB: [sample(4 * GIB, 6000.0, downtime=9.0, vmm=200 * MIB)],
            }
        )
    }
    assert rows["2G.total-per-GiB/1G"].value == 1.0 and rows["2G.total-per-GiB/1G"].ok
    assert rows["4G.total-per-GiB/1G"].value == 1.5 and rows["4G.total-per-GiB/1G"].ok is False
    assert rows["4G.idle-downtime"].ok is False and rows["4G.harvest-per-round"].ok
    assert rows["4G.harvest-per-round"].value == 1.0
    assert rows["4G.rearm"].value == 40.0 and rows["4G.rearm"].ok is None  # no goal
    assert rows["1G.vmm-memory/ram"].value == pytest.approx(100 * 10 / 1024)
    assert rows["4G.vmm-memory/ram"].ok is False  # 200 MiB of 4 GiB is 4.9 %
    assert rows["256M.vmm-memory/ram"].ok is None  # no goal below 1 GiB
    assert rows["1G.throughput"].value == pytest.approx(GIB / 1e9)


@pytest.mark.kvm
@pytest.mark.timeout(180)
def test_a_final_round_larger_than_one_frame_is_sent_in_several(tmp_path: Path) -> None:
    """A guest rewriting 100 MiB and a downtime limit that allows it: the stop-and-copy round
    holds about 25600 pages, fewer than the sparse-listing limit (32768) but more than one
    frame's payload cap (16384 pages); it used to fail with "exceeds the batch cap"."""
    from vmmrig import Vmm, dirty_config, free_port

    config = dirty_config(tmp_path, memory="256M", vcpus=1, ws="100M")
    port = free_port()
    src = Vmm(tmp_path, "src", config)
    dst = Vmm(tmp_path, "dst", config, incoming_port=port)
    try:
        src.wait_ready()
        dst.wait_incoming()
        time.sleep(1.0)  # the working set is written once, so every page holds data
        src.migrate(
            port, tracking="none", verify=True, downtime_limit=20_000, max_bandwidth=32 << 20
        )  # round 0 lasts seconds: all 100 MiB dirty again
        info = src.wait_migration(timeout=120)
        assert info["status"] == "completed", info
        assert info["x-verify"]["mismatched"] == 0
        assert info["x-rounds"][-1]["pages"] > 16384, info["x-rounds"]
    finally:
        src.stop()
        dst.stop()


def test_scale_loaded_rows_compare_4_gib_with_1_gib() -> None:
    from ptmig.bench.scale import loaded_results
    from ptmig.bench.strategies import CellRun

    def cell(memory: str, downtime: float, lost: float = 0) -> CellRun:
        return CellRun("shadow", memory, "completed", downtime_ms=downtime, lost=lost, mismatched=0)

    rows = {
        r.name: r
        for r in loaded_results({"1G": [cell("1G", 100)], "4G": [cell("4G", 120, lost=2)]})
    }
    assert rows["kv.shadow.downtime 4G/1G"].value == pytest.approx(1.2)
    assert rows["kv.shadow.downtime 4G/1G"].ok
    assert rows["kv-1G.shadow.lost+mismatched"].ok
    assert rows["kv-4G.shadow.lost+mismatched"].ok is False


def test_ptmig_run_refuses_more_memory_than_the_host_has(tmp_path: Path) -> None:
    import subprocess
    import sys

    from ptmig.cliconv import VMM_FAILED
    from ptmig.memory import host_available_memory

    available = host_available_memory()
    assert available is not None
    want = min(layout.MAX_MEMORY, (available + 4 * GIB) >> 21 << 21)
    if want <= available:
        pytest.skip(f"this host has {available >> 30} GiB available, more than ptmig can map")
    cfg = tmp_path / "big.toml"
    cfg.write_text(f'[vm]\nmemory = "{want >> 20}M"\nvcpus = 1\n\n[workload]\nname = "hello"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "ptmig.cli", "run", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == VMM_FAILED, proc.stderr  # ptmig run's own failure, not the guest's
    assert f"guest memory of {want >> 20} MiB is more than the host has available" in proc.stderr


def test_a_scale_size_that_does_not_fit_the_host_is_skipped_with_the_numbers() -> None:
    from ptmig.bench.scale import HEADROOM, GiB, memory_shortfall

    assert memory_shortfall(8 * GiB, 16 * GiB + HEADROOM) is None
    why = memory_shortfall(8 * GiB, 16 * GiB + HEADROOM - 1)
    assert why is not None and "8G" in why and "available" in why
    assert "19.0 GiB free" in why  # 2 x 8 GiB + 3 GiB of headroom


def test_scale_loaded_ratio_is_of_the_medians_with_forced_and_final_pages_rows() -> None:
    from ptmig.bench.scale import loaded_results
    from ptmig.bench.strategies import CellRun

    def cell(memory: str, downtime: float, forced: bool = False) -> CellRun:
        return CellRun(
            "shadow",
            memory,
            "completed",
            downtime_ms=downtime,
            lost=0,
            mismatched=0,
            forced=forced,
            downtime_parts={"final-pages": downtime * 10},
        )

    small = [cell("1G", d) for d in (100, 50, 200)]
    big = [cell("4G", d, forced=d > 250) for d in (300, 60, 90)]
    rows = {r.name: r for r in loaded_results({"1G": small, "4G": big}, 30000)}
    ratio = rows["kv.shadow.downtime 4G/1G"]
    assert ratio.value == pytest.approx(90 / 100)  # the medians' ratio, not the pairs' median
    assert ratio.runs == pytest.approx([3.0, 1.2, 0.45])  # run i of each size, for the spread
    assert ratio.ok
    assert rows["kv-4G.shadow.forced"].runs == [1.0, 0.0, 0.0]
    assert rows["kv-1G.shadow.final-pages"].value == 1000
    assert "30000 ops/s" in rows["kv-1G.shadow.downtime"].extra["load"]


def test_scale_loaded_cells_alternate_the_sizes_on_one_paced_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ptmig.bench import scale, strategies

    calls: list[tuple[str, float | None, bool]] = []

    def fake_cell(strategy: str, memory: str, p: strategies.StrategyBenchParams, run_dir: Path):
        calls.append((memory, p.rate, p.auto_converge))
        return strategies.CellRun(strategy, memory, "completed", downtime_ms=1.0)

    monkeypatch.setattr(strategies, "demo_cell", fake_cell)
    cells = scale.loaded_cells(tmp_path, 2, 12345)
    assert [c[0] for c in calls] == ["1G", "4G", "1G", "4G"]
    assert {c[1:] for c in calls} == {(12345, True)}
    assert [len(v) for v in cells.values()] == [2, 2]
