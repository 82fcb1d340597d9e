"""The VMM-core benchmarks (section `core`).

- `storebw.*`: store bandwidth of the same C loop (guest/storebw_loop.c) run by the firmware at
  CPL 3 and natively by the host program; guest and native runs alternate (and swap who goes
  first) so noise hits both, and the ratio is taken per run.
- `exit.pio`, `exit.mmio`: round trip of one port-I/O / MMIO exit handled in Python, from a
  hand-assembled guest looping N times; a 0-iteration run of the same guest is the baseline
  that removes VM start-up and the exit hypercall. `exit.pio.kvm_run_floor` is the same guest
  driven by a bare KVM_RUN loop: the platform's share of the round trip, without the VMM's.
  (Their per-run difference is not reported: two separately timed, noisy numbers, whose
  difference came out negative in some runs.)
- `harvest.*`: `Vm.dirty.harvest()` on a 1 GiB guest while the `dirty` workload runs (every
  20 ms, and after a 0.5 s backlog), and on the same guest paused (nothing dirty).
- `harvest.fault_us`: what dirty logging costs the guest per page it writes after a re-arm
  (the write fault that puts the page back in the log, and everything it brings: the exit, the
  re-mapping, the harvest's TLB flushes). The `dirty` workload writes one word per page,
  scattered over a working set, as fast as it can: first for a window with nothing re-armed
  (its pages per second), then for a window with every page re-armed at the start and by a
  harvest every 300 ms (pre-copy's pace). The second window's time beyond what its pages take
  at the first window's speed, divided by the pages its harvests reported (each reported page
  took exactly one fault), is the cost. A host with hardware dirty logging (Intel's PML) makes
  it small; software write-protection under shadow paging, and nested virtualization, make it
  large. Times `bandwidth.dirty_log.rate` (the kv guest's pages per second), it is the share of
  a vCPU that a pre-copy's dirty log takes from that guest.
- `pause.*`: what `Vm.pause()` returns (request → every vCPU out of the guest), median and p99,
  with vCPUs spinning in the `dirty` workload and with vCPUs halted in the HALT hypercall.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..firmware import FirmwareImage, build_firmware, build_host_storebw, load_firmware_image
from ..kvm import Exit
from ..layout import ABI_FW_LOAD_GPA, ABI_PORT_HYPERCALL
from ..vm import Vm, VmSpec
from . import guests, progress
from .harness import (
    BenchConfig,
    BenchError,
    Goal,
    Result,
    load_average,
    measured,
    paired_ratios,
)

SECTION = "core"

GOAL_STOREBW_RATIO = Goal(">=", 0.9)
GOAL_EXIT_US = Goal("<=", 30, "µs")
GOAL_HARVEST_MS = Goal("<=", 5, "ms")
GOAL_PAUSE_US = Goal("<=", 1000, "µs")

STOREBW_REPORT_MAGIC = 0x3150455257425453  # "STBWREP1", struct storebw_report in guest/abi.h
DIRTY_REPORT_MAGIC = 0x3150525954524944  # "DIRTYRP1", struct dirty_report
_STOREBW_REPORT = struct.Struct("<6Q")  # magic, size, passes, bytes, ticks, tsc_khz
_HOST_STOREBW_LINE = re.compile(r"storebw: (\d+) bytes in (\d+) ticks")

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class CoreParams:
    """Sizes and counts of the core benchmarks."""

    storebw_memory: int = 256 * MiB
    storebw_size: int = 64 * MiB
    storebw_passes: int = 8
    exits: int = 20000
    harvest_memory: int = 1 * GiB
    harvest_ws: int = 256 * MiB
    harvests_per_run: int = 4
    harvest_gap_s: float = 0.02
    harvest_backlog_s: float = 0.5
    fault_memory: int = 256 * MiB
    fault_ws: int = 64 * MiB  # TLB reach of the host's shadow tables: plain writes stay cheap
    fault_window_s: float = 2.0
    fault_period_s: float = 0.3
    fault_settle_s: float = 0.5  # pages re-armed by the last window fault once more first
    pause_memory: int = 64 * MiB
    pause_ws: int = 16 * MiB
    pause_cycles: int = 30
    pause_gap_s: float = 0.01
    guest_timeout_s: float = 120.0

    @classmethod
    def for_config(cls, config: BenchConfig) -> CoreParams:
        if config.quick:
            return cls(storebw_passes=4, exits=10000, harvests_per_run=3, pause_cycles=20)
        return cls()

    @classmethod
    def tiny(cls) -> CoreParams:
        """Small enough for a test: every benchmark runs, in a few seconds."""
        return cls(
            storebw_memory=32 * MiB,
            storebw_size=4 * MiB,
            storebw_passes=2,
            exits=300,
            harvest_memory=64 * MiB,
            harvest_ws=8 * MiB,
            harvests_per_run=2,
            harvest_gap_s=0.01,
            harvest_backlog_s=0.05,
            fault_memory=32 * MiB,
            fault_ws=4 * MiB,
            fault_window_s=0.3,
            fault_period_s=0.1,
            fault_settle_s=0.1,
            pause_memory=32 * MiB,
            pause_ws=4 * MiB,
            pause_cycles=6,
            pause_gap_s=0.005,
            guest_timeout_s=60.0,
        )


def run(config: BenchConfig) -> list[Result]:
    """The `core` section with the sizes for `config` (quick or full)."""
    return run_core(config, CoreParams.for_config(config))


def run_core(config: BenchConfig, params: CoreParams) -> list[Result]:
    firmware = load_firmware_image(build_firmware())
    host_storebw = build_host_storebw()
    results: list[Result] = []
    results += bench_storebw(config, params, firmware, host_storebw)
    results += bench_exits(config, params)
    results += bench_harvest(config, params, firmware)
    results += bench_write_fault(config, params, firmware)
    results += bench_pause(config, params, firmware)
    return results


# ---- helpers --------------------------------------------------------------------------------


def _boot(code: bytes, entry: int, entry_ap: int, memory: int, vcpus: int, cmdline: str) -> Vm:
    vm = Vm(VmSpec(memory=memory, vcpus=vcpus, cmdline=cmdline, name="bench"))
    try:
        vm.boot(code, entry, entry_ap)
    except BaseException:
        vm.close()
        raise
    return vm


def _boot_firmware(fw: FirmwareImage, memory: int, vcpus: int, cmdline: str) -> Vm:
    return _boot(fw.data, fw.entry, fw.entry_ap, memory, vcpus, cmdline)


def _run_to_exit(vm: Vm, timeout: float, what: str) -> float:
    """Start the guest and wait for exit(0); returns the wall seconds start → exit."""
    t0 = time.perf_counter()
    vm.start()
    code = vm.wait(timeout)
    took = time.perf_counter() - t0
    if code != 0:
        tail = " | ".join(list(vm.console.lines)[-5:])
        status = "did not exit" if code is None else f"exited with code {code}"
        raise BenchError(
            f"{what}: guest {status} within {timeout}s (error: {vm.error}; console: {tail!r})"
        )
    return took


def _wait_for_magic(vm: Vm, magic: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while struct.unpack_from("<Q", vm.workload_area(8))[0] != magic:
        if vm.wait(0) is not None or time.monotonic() > deadline:
            raise BenchError(
                f"{what}: the workload never published its report (magic {magic:#x}); state "
                f"{vm.state.value}, error {vm.error}, console {list(vm.console.lines)[-3:]!r}"
            )
        time.sleep(0.01)


# ---- store bandwidth ------------------------------------------------------------------------


def _guest_storebw(fw: FirmwareImage, p: CoreParams) -> tuple[int, int, int]:
    """(bytes, ticks, tsc_khz) of one guest run."""
    cmdline = f"storebw size={p.storebw_size} passes={p.storebw_passes}"
    vm = _boot_firmware(fw, p.storebw_memory, 1, cmdline)
    try:
        _run_to_exit(vm, p.guest_timeout_s, "storebw guest")
        magic, _size, _passes, nbytes, ticks, tsc_khz = _STOREBW_REPORT.unpack_from(
            vm.workload_area(_STOREBW_REPORT.size)
        )
    finally:
        vm.close()
    if magic != STOREBW_REPORT_MAGIC or ticks == 0:
        raise BenchError(f"storebw guest report is invalid: magic {magic:#x}, ticks {ticks}")
    return nbytes, ticks, tsc_khz


def _native_storebw(program: Path, p: CoreParams) -> tuple[int, int]:
    """(bytes, ticks) of one native run."""
    out = subprocess.run(
        [str(program), str(p.storebw_size), str(p.storebw_passes)],
        capture_output=True,
        text=True,
        timeout=p.guest_timeout_s,
        check=False,
    )
    m = _HOST_STOREBW_LINE.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise BenchError(
            f"native storebw exited {out.returncode}: stdout {out.stdout!r} stderr {out.stderr!r}"
        )
    return int(m.group(1)), int(m.group(2))


def gb_per_s(nbytes: int, ticks: int, tsc_khz: int) -> float:
    """Bytes over TSC ticks at tsc_khz, in 10^9 bytes per second."""
    if ticks <= 0 or tsc_khz <= 0:
        raise BenchError(f"cannot compute bandwidth from ticks={ticks}, tsc_khz={tsc_khz}")
    return nbytes * tsc_khz * 1e3 / ticks / 1e9


def bench_storebw(
    config: BenchConfig, p: CoreParams, fw: FirmwareImage, program: Path
) -> list[Result]:
    guest: list[float] = []
    native_raw: list[tuple[int, int]] = []
    tsc_khz = 0
    for i in range(config.runs):
        progress.step("store bandwidth, guest and native", i + 1, config.runs)
        order: list[str] = ["guest", "native"] if i % 2 == 0 else ["native", "guest"]
        for side in order:
            if side == "guest":
                nbytes, ticks, tsc_khz = _guest_storebw(fw, p)
                guest.append(gb_per_s(nbytes, ticks, tsc_khz))
            else:
                native_raw.append(_native_storebw(program, p))
    # The host and the guest count the same TSC (no TSC scaling on these hosts), so the
    # guest-reported tsc_khz converts both.
    native_gbs = [gb_per_s(b, t, tsc_khz) for b, t in native_raw]
    extra = {
        "size": p.storebw_size,
        "passes": p.storebw_passes,
        "tsc_khz": tsc_khz,
        "guest_memory": p.storebw_memory,
    }
    return [
        measured(SECTION, "storebw.guest", guest, "GB/s", extra=extra),
        measured(SECTION, "storebw.native", native_gbs, "GB/s", extra=extra),
        measured(
            SECTION,
            "storebw.ratio",
            paired_ratios(guest, native_gbs),
            "guest/native",
            GOAL_STOREBW_RATIO,
            extra=extra,
        ),
    ]


# ---- exit round trip ------------------------------------------------------------------------


def _exit_loop(make: Callable[[int], bytes], iterations: int, p: CoreParams, what: str) -> float:
    """Wall seconds for a loop guest doing `iterations` exits, checked against the VM's count."""
    vm = _boot(make(iterations), ABI_FW_LOAD_GPA, ABI_FW_LOAD_GPA, 16 * MiB, 1, "bench")
    try:
        took = _run_to_exit(vm, p.guest_timeout_s, what)
        if vm.unhandled_io != iterations:
            raise BenchError(
                f"{what}: the VM counted {vm.unhandled_io} unhandled accesses, expected "
                f"{iterations}: the guest did not do what the benchmark measures"
            )
    finally:
        vm.close()
    return took


def _per_exit_us(
    make: Callable[[int], bytes], run: int, p: CoreParams, what: str
) -> tuple[float, float]:
    """(µs per exit, baseline ms) of one run: N exits minus the 0-exit baseline."""
    if run % 2 == 0:
        base = _exit_loop(make, 0, p, what)
        full = _exit_loop(make, p.exits, p, what)
    else:
        full = _exit_loop(make, p.exits, p, what)
        base = _exit_loop(make, 0, p, what)
    return (full - base) / p.exits * 1e6, base * 1e3


def _kvm_run_floor_us(p: CoreParams) -> float:
    """µs per port-I/O exit of a bare KVM_RUN loop on this thread: no vCPU thread, no park
    check, no dispatch. What is left of `exit.pio` once the VMM's exit path is gone."""
    vm = _boot(guests.port_io_loop(p.exits), ABI_FW_LOAD_GPA, ABI_FW_LOAD_GPA, 16 * MiB, 1, "bench")
    try:
        fd = vm.vcpus[0].fd
        fd.run()  # the first exit: entry costs stay out of the timing
        exits = 0
        t0 = time.perf_counter()
        while True:
            fd.run()
            if fd.run_struct.exit_reason != Exit.IO:
                raise BenchError(
                    f"KVM_RUN floor: unexpected exit reason {fd.run_struct.exit_reason}"
                )
            if fd.run_struct.exit.io.port == ABI_PORT_HYPERCALL:
                break
            exits += 1
        took = time.perf_counter() - t0
    finally:
        vm.close()
    if exits != p.exits - 1:
        raise BenchError(f"KVM_RUN floor: {exits} exits, expected {p.exits - 1}")
    return took / exits * 1e6


def bench_exits(config: BenchConfig, p: CoreParams) -> list[Result]:
    """Per run, back to back: port I/O through the VMM, the bare KVM_RUN floor, MMIO."""
    pio: list[float] = []
    floor: list[float] = []
    mmio: list[float] = []
    pio_base: list[float] = []
    mmio_base: list[float] = []
    for i in range(config.runs):
        progress.step("exit round trips (port I/O, KVM_RUN floor, MMIO)", i + 1, config.runs)
        us, base = _per_exit_us(guests.port_io_loop, i, p, "exit.pio")
        pio.append(us)
        pio_base.append(base)
        floor.append(_kvm_run_floor_us(p))
        us, base = _per_exit_us(guests.mmio_store_loop, i, p, "exit.mmio")
        mmio.append(us)
        mmio_base.append(base)
    extra = {"exits_per_run": p.exits}
    return [
        measured(
            SECTION, "exit.pio", pio, "µs", GOAL_EXIT_US, {**extra, "baseline_ms_runs": pio_base}
        ),
        measured(
            SECTION, "exit.mmio", mmio, "µs", GOAL_EXIT_US, {**extra, "baseline_ms_runs": mmio_base}
        ),
        measured(
            SECTION,
            "exit.pio.kvm_run_floor",
            floor,
            "µs",
            extra={**extra, "what": "bare KVM_RUN loop on one thread, no VMM exit path"},
        ),
    ]


# ---- dirty-log harvest ----------------------------------------------------------------------


def _timed_harvests(vm: Vm, count: int, gap_s: float) -> tuple[list[float], list[int]]:
    times_ms: list[float] = []
    dirty_pages: list[int] = []
    for _ in range(count):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        bm = vm.dirty.harvest()
        times_ms.append((time.perf_counter() - t0) * 1e3)
        dirty_pages.append(bitmap_popcount(bm))
    return times_ms, dirty_pages


def bitmap_popcount(bm: np.ndarray) -> int:
    """Number of set bits (dirty pages) in a harvested bitmap."""
    return int(np.unpackbits(np.ascontiguousarray(bm).view(np.uint8)).sum())


def bench_harvest(config: BenchConfig, p: CoreParams, fw: FirmwareImage) -> list[Result]:
    progress.step("dirty-log harvest")
    count = config.runs * p.harvests_per_run
    vm = _boot_firmware(fw, p.harvest_memory, 1, f"dirty ws={p.harvest_ws}")
    try:
        vm.start()
        _wait_for_magic(vm, DIRTY_REPORT_MAGIC, p.guest_timeout_s, "harvest (dirty workload)")
        vm.dirty.harvest()
        running, running_pages = _timed_harvests(vm, count, p.harvest_gap_s)
        backlog, backlog_pages = _timed_harvests(vm, config.runs, p.harvest_backlog_s)
        if vm.state.value != "running":
            raise BenchError(f"harvest: the dirty guest stopped ({vm.state.value}, {vm.error})")
        vm.pause()
        vm.dirty.harvest()
        idle, idle_pages = _timed_harvests(vm, count, p.harvest_gap_s)
    finally:
        vm.close()
    common = {"guest_memory": p.harvest_memory, "ws": p.harvest_ws, "vcpus": 1, "samples": count}
    gib = p.harvest_memory / GiB
    label = f"{gib:g}g" if gib >= 1 else f"{p.harvest_memory // MiB}m"
    return [
        measured(
            SECTION,
            f"harvest.{label}.running",
            running,
            "ms",
            GOAL_HARVEST_MS,
            {**common, "gap_s": p.harvest_gap_s, "dirty_pages": running_pages},
        ),
        measured(
            SECTION,
            f"harvest.{label}.backlog",
            backlog,
            "ms",
            GOAL_HARVEST_MS,
            {
                **common,
                "samples": config.runs,
                "gap_s": p.harvest_backlog_s,
                "dirty_pages": backlog_pages,
            },
        ),
        measured(
            SECTION,
            f"harvest.{label}.idle",
            idle,
            "ms",
            GOAL_HARVEST_MS,
            {**common, "dirty_pages": idle_pages},
        ),
    ]


def _written(vm: Vm) -> int:
    return vm.vcpu_stats()[0].pages_written


def _fault_window(vm: Vm, p: CoreParams) -> tuple[float, int, int]:
    """One re-armed window: (seconds, pages written, pages reported = faults taken)."""
    vm.dirty.harvest()  # re-arms every page written so far: the window starts armed
    t0, w0, faults = time.perf_counter(), _written(vm), 0
    while time.perf_counter() - t0 < p.fault_window_s:
        time.sleep(p.fault_period_s)
        faults += bitmap_popcount(vm.dirty.harvest())
    return time.perf_counter() - t0, _written(vm) - w0, faults


def bench_write_fault(config: BenchConfig, p: CoreParams, fw: FirmwareImage) -> list[Result]:
    progress.step("dirty-log write fault")
    workload = f"dirty ws={p.fault_ws} scatter=1"
    vm = _boot_firmware(fw, p.fault_memory, 1, workload)
    costs_us: list[float] = []
    plain_rates: list[float] = []
    fault_rates: list[float] = []
    try:
        vm.start()
        _wait_for_magic(vm, DIRTY_REPORT_MAGIC, p.guest_timeout_s, "write fault (dirty workload)")
        for _ in range(config.runs):
            time.sleep(p.fault_settle_s)
            t0, w0 = time.perf_counter(), _written(vm)
            time.sleep(p.fault_window_s)
            plain = (_written(vm) - w0) / (time.perf_counter() - t0)
            took, written, faults = _fault_window(vm, p)
            if plain <= 0 or faults == 0:
                raise BenchError(
                    f"write fault: the dirty guest wrote {plain:.0f} pages/s unarmed and its "
                    f"harvests reported {faults} pages armed (state {vm.state.value}, "
                    f"error {vm.error})"
                )
            costs_us.append((took - written / plain) / faults * 1e6)
            plain_rates.append(plain)
            fault_rates.append(faults / took)
    finally:
        vm.close()
    extra = {
        "guest_memory": p.fault_memory,
        "workload": workload,
        "window_s": p.fault_window_s,
        "period_ms": p.fault_period_s * 1e3,
        "plain_pages_per_s": plain_rates,
        "faults_per_s": fault_rates,
        "what": "guest time lost per page written after a re-arm of KVM's dirty log",
    }
    return [measured(SECTION, "harvest.fault_us", costs_us, "µs", extra=extra)]


# ---- pause latency --------------------------------------------------------------------------


def _pause_cycles(vm: Vm, cycles: int, gap_s: float) -> list[float]:
    took_us = []
    for _ in range(cycles):
        time.sleep(gap_s)
        took_us.append(vm.pause() * 1e6)
        vm.resume()
    return took_us


def bench_pause(config: BenchConfig, p: CoreParams, fw: FirmwareImage) -> list[Result]:
    progress.step("vCPU pause")
    vcpus = 2
    cycles = max(p.pause_cycles, config.runs)
    load = load_average()  # 2 busy vCPU threads + this one: host load shows in the tail
    vm = _boot_firmware(fw, p.pause_memory, vcpus, f"dirty ws={p.pause_ws}")
    try:
        vm.start()
        _wait_for_magic(vm, DIRTY_REPORT_MAGIC, p.guest_timeout_s, "pause (dirty workload)")
        time.sleep(0.05)
        running = _pause_cycles(vm, cycles, p.pause_gap_s)
    finally:
        vm.close()
    code = guests.halt_forever()
    vm = _boot(code, ABI_FW_LOAD_GPA, ABI_FW_LOAD_GPA, 16 * MiB, vcpus, "bench")
    try:
        vm.start()
        time.sleep(0.05)
        halted = _pause_cycles(vm, cycles, p.pause_gap_s)
        halts = sum(v.counters.halts for v in vm.vcpus)
        if halts < vcpus:
            raise BenchError(f"pause (halted): only {halts} HALT hypercalls from {vcpus} vCPUs")
    finally:
        vm.close()
    out = []
    for name, samples, extra in (
        ("pause.running", running, {"workload": f"dirty ws={p.pause_ws}"}),
        ("pause.halted", halted, {"workload": "HALT hypercall loop", "halts": halts}),
    ):
        extra = {**extra, "vcpus": vcpus, "cycles": cycles, "loadavg": load}
        out.append(measured(SECTION, name, samples, "µs", GOAL_PAUSE_US, extra))
        out.append(measured(SECTION, f"{name}.p99", samples, "µs", extra=extra, statistic=99))
    return out
