"""calc-dirty-rate / query-dirty-rate (`ptmig.dirtyrate`): the arguments QEMU takes, the two
estimates, and (with KVM) a dirtying guest measured both ways and the exclusion with migration."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from vmmrig import Vmm, dirty_config, migration_pair

from ptmig.dirtyrate import (
    DirtyRateError,
    DirtyRateMeter,
    Request,
    checksums,
    sample_pages_of,
    sampled_rate,
)
from ptmig.memory import GuestMemory


def test_arguments_are_qemus() -> None:
    assert Request.parse(1) == Request(1000, "second", "page-sampling", 512)
    assert Request.parse(250, "millisecond", "dirty-bitmap") == Request(
        250, "millisecond", "dirty-bitmap", 0
    )
    assert Request.parse(2, sample_pages=4096).sample_pages == 4096
    for bad, match in (
        ((0,), "out of range"),
        ((61,), "out of range"),
        ((99, "millisecond"), "out of range"),
        ((1, "minute"), "calc-time-unit must be one of"),
        ((1, "second", "guess"), "mode must be one of"),
        ((1, "second", "dirty-ring"), "dirty-ring needs KVM's dirty ring"),
        ((1, "second", "dirty-bitmap", 512), "only applies to mode page-sampling"),
        ((1, "second", "page-sampling", 127), "sample-pages 127 is out of range"),
        ((1, "second", "page-sampling", 4097), "out of range"),
    ):
        with pytest.raises(DirtyRateError, match=match):
            Request.parse(*bad)  # type: ignore[arg-type]


def test_the_sample_is_distinct_ram_pages_in_proportion_to_the_ram() -> None:
    mem = GuestMemory(256 << 20)
    pages = sample_pages_of(mem, 512, seed=1)
    assert len(pages) == 128 and len(set(pages)) == 128 and pages == sorted(pages)
    assert all(mem.is_ram(p, 1) for p in pages)
    assert len(sample_pages_of(mem, 4096, seed=2)) == 1024
    mem.close()


def test_the_sampled_rate_scales_the_changed_share_to_the_ram() -> None:
    ram_pages = 262_144  # 1 GiB
    before = list(range(512))
    after = [x + 1 if i < 128 else x for i, x in enumerate(before)]  # a quarter changed
    assert sampled_rate(before, after, ram_pages, 2.0) == 128  # 256 MiB in 2 s
    assert sampled_rate(before, before, ram_pages, 2.0) == 0
    assert sampled_rate([], [], ram_pages, 2.0) == 0


def test_page_sampling_sees_any_writer_of_guest_ram() -> None:
    """No KVM here: the writer is a thread, like a device's DMA (which dirty-bitmap cannot
    see). A quarter of 64 MiB rewritten for 0.3 s reads as ~16 MiB / 0.3 s."""
    mem = GuestMemory(64 << 20)
    meter = DirtyRateMeter(mem, tracker=None)  # type: ignore[arg-type]  # sampling only
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            mem.array[: 16 << 20 : 4096] = n & 0xFF  # one byte in each page of the first 16 MiB
            time.sleep(0.005)

    t = threading.Thread(target=writer)
    t.start()
    try:
        meter.start(Request.parse(300, "millisecond", sample_pages=4096))
        with pytest.raises(DirtyRateError, match="already running"):
            meter.start(Request.parse(1))
        assert meter.info()["status"] == "measuring" and "dirty-rate" not in meter.info()
        assert meter.wait(10)
    finally:
        stop.set()
        t.join()
    info = meter.info()
    assert info["status"] == "measured" and info["mode"] == "page-sampling", info
    expected = 16 / (info["x-calc-ms"] / 1000)
    assert 0.6 * expected <= info["dirty-rate"] <= 1.4 * expected, info
    assert info["calc-time"] == 300 and info["calc-time-unit"] == "millisecond"
    mem.close()


def test_a_dirty_log_that_fails_ends_the_measurement_with_its_error() -> None:
    """The harvest ioctl failing (injected at the tracker the meter reads): the measurement
    ends as measured with the reason and no rate, and the next one can start."""

    class BrokenLog:
        def harvest(self) -> None:
            raise OSError(14, "Bad address")

    mem = GuestMemory(8 << 20)
    meter = DirtyRateMeter(mem, BrokenLog())  # type: ignore[arg-type]
    meter.start(Request.parse(100, "millisecond", "dirty-bitmap"))
    assert meter.wait(10)
    info = meter.info()
    assert info["status"] == "measured" and "dirty-rate" not in info, info
    assert "Bad address" in info["x-error"]
    meter.start(Request.parse(100, "millisecond"))  # page-sampling: the log is not needed
    assert meter.wait(10) and meter.info()["dirty-rate"] == 0
    mem.close()


def test_a_page_unchanged_reads_the_same() -> None:
    mem = GuestMemory(8 << 20)
    pages = sample_pages_of(mem, 4096, seed=3)
    first = checksums(mem, pages)
    assert checksums(mem, pages) == first
    mem.write(pages[0] * 4096 + 7, b"x")
    assert checksums(mem, pages)[0] != first[0] and checksums(mem, pages)[1:] == first[1:]
    mem.close()


def _measure(vmm: Vmm, args: dict[str, object]) -> dict[str, object]:
    vmm.cmd("calc-dirty-rate", args)
    deadline = time.monotonic() + 30
    while True:
        info: dict[str, object] = vmm.cmd("query-dirty-rate")
        if info["status"] == "measured":
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


@pytest.mark.kvm
@pytest.mark.timeout(120)
def test_a_dirtying_guest_measured_both_ways(tmp_path: Path) -> None:
    """The guest rewrites a 32 MiB working set over and over: in 0.5 s every page of it is
    dirty, so both modes read ~32 MiB / 0.5 s, and no more than the working set allows."""
    vmm = Vmm(tmp_path, "vm", dirty_config(tmp_path, memory="128M", vcpus=1, ws="32M"))
    try:
        vmm.wait_running()
        assert vmm.cmd("query-dirty-rate")["status"] == "unstarted"
        exact = _measure(
            vmm, {"calc-time": 500, "calc-time-unit": "millisecond", "mode": "dirty-bitmap"}
        )
        sampled = _measure(
            vmm, {"calc-time": 500, "calc-time-unit": "millisecond", "sample-pages": 4096}
        )
        # The exact count is bounded by the working set (and the few pages the firmware writes
        # besides); the sampled one is an estimate from 512 pages (4096 per GiB of 128 MiB) of
        # which a quarter changed: its standard error is 7.7 %, so it is allowed 4 of them.
        for info, over in ((exact, 1.1 * 33), (sampled, 1.31 * 32)):
            seconds = float(info["x-calc-ms"]) / 1000  # type: ignore[arg-type]
            assert 0.5 * 32 / seconds <= int(info["dirty-rate"]) <= over / seconds, info  # type: ignore[call-overload]
        assert exact["mode"] == "dirty-bitmap" and exact["sample-pages"] == 0
        assert sampled["mode"] == "page-sampling" and sampled["sample-pages"] == 4096
        with pytest.raises(RuntimeError, match="dirty-ring needs KVM's dirty ring"):
            vmm.cmd("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-ring"})
        assert vmm.status() == "running"
    finally:
        vmm.stop()


@pytest.mark.kvm
@pytest.mark.timeout(120)
def test_dirty_bitmap_and_a_migration_exclude_each_other(tmp_path: Path) -> None:
    """Both harvest the one dirty log: a migration started during a dirty-bitmap measurement
    would miss the pages the measurement takes, and the other way round."""
    with migration_pair(tmp_path, dirty_config(tmp_path)) as (src, dst, port):
        src.cmd("calc-dirty-rate", {"calc-time": 5, "mode": "dirty-bitmap"})
        with pytest.raises(RuntimeError, match="calc-dirty-rate .* is measuring"):
            src.migrate(port)
        assert src.cmd("query-migrate").get("status") in (None, "none")
        _measure_done(src)
        src.migrate(port, max_bandwidth=8 << 20)  # slow: still in pre-copy below
        with pytest.raises(RuntimeError, match="a migration is tracking dirty pages"):
            src.cmd("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-bitmap"})
        sampled = _measure(src, {"calc-time": 300, "calc-time-unit": "millisecond"})
        assert int(sampled["dirty-rate"]) > 0, sampled  # type: ignore[call-overload]
        src.cmd("migrate-set-parameters", {"max-bandwidth": 0})
        info = src.wait_migration()
        assert info["status"] == "completed", info
        assert dst.status() == "running"


def _measure_done(vmm: Vmm) -> None:
    deadline = time.monotonic() + 30
    while vmm.cmd("query-dirty-rate")["status"] != "measured":
        assert time.monotonic() < deadline
        time.sleep(0.05)
