"""Benchmark section `devices`: the passthrough devices under real guest workloads.

- `kv.*`: the kv guest (virtio-net on the UDP backend through a `ptmig switch`, virtio-blk
  write-ahead log) driven by the load client, in a fresh `ptmig run` VMM per run: ops/s and
  p50/p99 latency unthrottled (`--max`): `kv.max.*` without the durable flag (a PUT is
  acknowledged once its record is written to the image), `kv.durable.*` with it (acknowledged
  after a FLUSH, i.e. fdatasync of the image, too); then `kv.half.*`, non-durable, paced at
  half the unthrottled rate, for the latency goal. Every run must lose nothing (the client
  reads every acknowledged key back).
- `blk.seqwrite`: the `blkbench` guest writing its disk sequentially in 64 KiB requests, MB/s.
- On a vhost-user disk (a qemu-storage-daemon the VMM spawns; run only where it is installed),
  alternating with the builtin runs: `kv.vhost_user.max.*` and `blk.seqwrite.vhost_user`, and
  the paired ratios `kv.vhost_user_vs_builtin.ops` and `blk.vhost_user_vs_builtin`.
- `idle.cpu`: CPU the device processes burn while the kv guest is idle (% of one core, read
  from /proc/PID/stat over a few seconds): a passthrough device must sleep when idle.
- `load.client_alone.ops`: the load client against a trivial kv server (another process,
  plain UDP on loopback, a dict): the client must outrun the guest, so that every kv figure
  above measures the guest, not the client.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..devices.handle import DeviceHandle
from ..devices.vhost_user.daemon import PROGRAM, find_program
from ..devices.vhost_user.frontend import VhostUserBlk
from ..firmware import FirmwareImage, build_firmware, load_firmware_image
from ..iommu import IommuTable
from ..layout import BootDevice, mmio_gpa
from ..load import LoadOptions, LoadResult, run_load
from ..net.switch import probe_switch
from ..vm import Vm, VmSpec
from ..vmmproc import free_port, ptmig_command
from . import progress
from .harness import BenchConfig, BenchError, Goal, Result, measured, median, paired_ratios

SECTION = "devices"
MiB = 1 << 20
GOAL_KV_OPS = Goal(">=", 20000, "ops/s")
GOAL_KV_P99_MS = Goal("<=", 2.0, "ms")
GOAL_IDLE_CPU_PCT = Goal("<=", 1.0, "%")
_BLKBENCH = re.compile(r"blkbench: (\d+) bytes in (\d+) ticks, (\d+) requests, tsc_khz (\d+)")


@dataclass(frozen=True)
class DevicesParams:
    kv_seconds: float = 5.0
    kv_memory: str = "512M"  # the kv table grows with RAM: room for every key of a run
    blk_size: int = 64 * MiB
    blk_req: int = 64 * 1024
    idle_seconds: float = 3.0

    @classmethod
    def for_config(cls, config: BenchConfig) -> DevicesParams:
        return cls(kv_seconds=2.0, blk_size=32 * MiB, idle_seconds=2.0) if config.quick else cls()


def run(config: BenchConfig) -> list[Result]:
    return run_devices(config, DevicesParams.for_config(config))


def run_devices(config: BenchConfig, p: DevicesParams) -> list[Result]:
    results = bench_kv(config, p)
    results += bench_blk(config, p, load_firmware_image(build_firmware()))
    results += bench_idle_cpu(config, p)
    results += bench_client_alone(config, p)
    return results


# ---- the load client alone ----------------------------------------------------------------------

# A kv server that does nothing but keep a dict: PUT stores, GET answers (kv wire protocol).
TRIVIAL_KV_SERVER = r"""
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
req, rep = struct.Struct("<IIBBHHH"), struct.Struct("<IIBBH")
store = {}
while True:
    d, a = s.recvfrom(2048)
    magic, rid, op, flags, klen, vlen, _ = req.unpack_from(d)
    key = d[16:16 + klen]
    if op == 1:
        store[key] = d[16 + klen:]
        s.sendto(rep.pack(0x3152564B, rid, 0, 0, 0), a)
    else:
        v = store.get(key)
        s.sendto(rep.pack(0x3152564B, rid, 1 if v is None else 0, 0, len(v or b"")) + (v or b""),
                 a)
"""


def client_alone_run(seconds: float, json_path: Path | None = None) -> LoadResult:
    """One load run against `TRIVIAL_KV_SERVER` in a child process."""
    server = subprocess.Popen([sys.executable, "-c", TRIVIAL_KV_SERVER], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        return run_load(
            LoadOptions(target=f"127.0.0.1:{port}", duration_s=seconds, json_path=json_path)
        )
    finally:
        server.kill()
        server.wait()


def bench_client_alone(config: BenchConfig, p: DevicesParams) -> list[Result]:
    runs = [client_alone_run(p.kv_seconds) for _ in range(config.runs)]
    bad = [r for r in runs if r.exit_status != 0]
    if bad:
        raise BenchError(f"the load client lost values against a trivial server: {bad[0]}")
    return [
        measured(
            SECTION,
            "load.client_alone.ops",
            [r.ops_per_s for r in runs],
            "ops/s",
            GOAL_KV_OPS,
            {"seconds": p.kv_seconds},
        )
    ]


# ---- a kv VMM in its own process --------------------------------------------------------------


class KvVmm:
    """`ptmig run` of a kv guest on a fresh disk and its own switch port; a context manager."""

    def __init__(self, memory: str, *, qmp: bool = False, disk: str = "builtin") -> None:
        """`disk`: the kv log on ptmig's own device, or ("vhost-user") on a qemu-storage-daemon
        the VMM spawns."""
        self._tmp = tempfile.TemporaryDirectory(prefix="ptmig-bench-kv-")
        tmp = Path(self._tmp.name)
        self.qmp_socket = tmp / "qmp.sock" if qmp else None
        self.switch_port = free_port(socket.SOCK_DGRAM)
        self.config = tmp / "kv.toml"
        self.console = tmp / "console.txt"
        self.config.write_text(
            f'[vm]\nmemory = "{memory}"\nvcpus = 1\n[workload]\nname = "kv"\n'
            f'[[net]]\nid = "net0"\nmac = "52:54:00:b0:00:01"\nip = "10.0.0.2/24"\n'
            f'backend = "udp:127.0.0.1:{self.switch_port}"\nswitch = "auto"\n'
            f'[[disk]]\nid = "disk0"\npath = "{tmp / "kv.img"}"\nsize = "256M"\n'
            + (
                'backend = "vhost-user"\nspawn = "qemu-storage-daemon"\n'
                if disk != "builtin"
                else ""
            )
        )
        self.proc = subprocess.Popen(
            ptmig_command(
                "run",
                str(self.config),
                "--console",
                str(self.console),
                *(["--qmp", f"unix:{self.qmp_socket}"] if self.qmp_socket else []),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def qmp_path(self) -> Path:
        if self.qmp_socket is None:
            raise BenchError("this kv VMM was started without a QMP socket")
        return self.qmp_socket

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "kv: serving on" not in (self.console.read_text() if self.console.exists() else ""):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode()[-1000:] if self.proc.stderr else ""
                raise BenchError(f"kv VMM never started serving (exit {self.proc.poll()}): {err}")
            time.sleep(0.05)

    def device_pids(self) -> list[int]:
        pids = []
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            text = Path(f"/proc/{self.proc.pid}/task/{task}/children").read_text()
            for pid in map(int, text.split()):
                try:
                    if b"ptmig.devices.process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        pids.append(pid)
                except FileNotFoundError:
                    pass
        if not pids:
            raise BenchError(f"no device process under VMM pid {self.proc.pid}")
        return pids

    def __enter__(self) -> KvVmm:
        try:
            self.wait_serving()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop_switch()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()

    def _stop_switch(self) -> None:
        """End the switch `ptmig run` started for this VM: it is detached (it outlives its
        VMM on purpose, other VMs may share it, and only ends itself a minute after the last
        one) and every run here has its own port, so without this each run would leave one
        behind for that minute, taking CPU from the next ones."""
        pid = probe_switch("127.0.0.1", self.switch_port, timeout=0.1, tries=2)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _disks() -> list[str]:
    """The disks the device rows run on: ptmig's own, and vhost-user where it is installed."""
    return ["builtin"] + (["vhost-user"] if find_program() is not None else [])


def _kv_run(
    p: DevicesParams, *, durable: bool, rate: float | None, disk: str = "builtin"
) -> LoadResult:
    progress.step(
        "kv "
        + ("durable" if durable else "unpaced" if rate is None else f"at {rate:,.0f} ops/s")
        + ("" if disk == "builtin" else f" ({disk} disk)")
    )
    with KvVmm(p.kv_memory, disk=disk) as vmm:
        result = run_load(
            LoadOptions(config=vmm.config, duration_s=p.kv_seconds, durable=durable, rate=rate)
        )
    if result.lost or result.wrong or result.unverified or result.errors:
        raise BenchError(
            f"kv run lost {result.lost}, wrong {result.wrong}, unverified "
            f"{result.unverified}, errors {result.errors}: {result.problems[:3]}"
        )
    return result


def bench_kv(config: BenchConfig, p: DevicesParams) -> list[Result]:
    out: list[Result] = []
    disks = _disks()
    by_disk: dict[str, list[LoadResult]] = {d: [] for d in disks}
    for _ in range(config.runs):  # alternating: a noisy neighbour hits both disks alike
        for disk in disks:
            by_disk[disk].append(_kv_run(p, durable=False, rate=None, disk=disk))
    fast = by_disk["builtin"]
    extra = {
        "seconds": p.kv_seconds,
        "window": LoadOptions().window,
        "durable": False,
        "backend": "udp",
    }
    out.append(
        measured(SECTION, "kv.max.ops", [r.ops_per_s for r in fast], "ops/s", GOAL_KV_OPS, extra)
    )
    out.append(measured(SECTION, "kv.max.p50", [r.p50_ms for r in fast], "ms", extra=extra))
    out.append(measured(SECTION, "kv.max.p99", [r.p99_ms for r in fast], "ms", extra=extra))
    if "vhost-user" in by_disk:
        out += _kv_vhost_user(by_disk["vhost-user"], fast, dict(extra, disk="vhost-user"))
    half = median([r.ops_per_s for r in fast]) / 2
    paced = [_kv_run(p, durable=False, rate=half) for _ in range(config.runs)]
    extra_half = dict(extra, rate=round(half))
    out.append(
        measured(SECTION, "kv.half.ops", [r.ops_per_s for r in paced], "ops/s", extra=extra_half)
    )
    out.append(measured(SECTION, "kv.half.p50", [r.p50_ms for r in paced], "ms", extra=extra_half))
    out.append(
        measured(
            SECTION, "kv.half.p99", [r.p99_ms for r in paced], "ms", GOAL_KV_P99_MS, extra_half
        )
    )
    durable = [_kv_run(p, durable=True, rate=None) for _ in range(config.runs)]
    extra_d = dict(extra, durable=True)
    out.append(
        measured(SECTION, "kv.durable.ops", [r.ops_per_s for r in durable], "ops/s", extra=extra_d)
    )
    out.append(
        measured(SECTION, "kv.durable.p50", [r.p50_ms for r in durable], "ms", extra=extra_d)
    )
    out.append(
        measured(SECTION, "kv.durable.p99", [r.p99_ms for r in durable], "ms", extra=extra_d)
    )
    return out


def _kv_vhost_user(
    runs: list[LoadResult], builtin: list[LoadResult], extra: dict[str, object]
) -> list[Result]:
    """kv --max with the log on qemu-storage-daemon, and its ops/s over the builtin disk's
    (run i of each back to back)."""
    ops = [r.ops_per_s for r in runs]
    return [
        measured(SECTION, "kv.vhost_user.max.ops", ops, "ops/s", extra=extra),
        measured(SECTION, "kv.vhost_user.max.p50", [r.p50_ms for r in runs], "ms", extra=extra),
        measured(SECTION, "kv.vhost_user.max.p99", [r.p99_ms for r in runs], "ms", extra=extra),
        measured(
            SECTION,
            "kv.vhost_user_vs_builtin.ops",
            paired_ratios(ops, [r.ops_per_s for r in builtin]),
            "ratio",
            extra=dict(extra, what="kv --max ops/s, vhost-user disk ÷ builtin, paired runs"),
        ),
    ]


# ---- virtio-blk sequential write ------------------------------------------------------------


def _blk_device(
    disk: str, tmp: str, p: DevicesParams, vm: Vm, iommu: IommuTable
) -> DeviceHandle | VhostUserBlk:
    """The benchmarked disk: ptmig's own device process, or a spawned qemu-storage-daemon."""
    if disk == "vhost-user":
        return VhostUserBlk.open(
            "disk0", 0, vm.memory, image=Path(tmp) / "disk.img", size=p.blk_size, spawn=PROGRAM
        )
    return DeviceHandle.spawn(
        "blk",
        0,
        {"path": f"{tmp}/disk.img", "size": p.blk_size},
        vm.memory.fd,
        vm.memory.size,
        iommu,
    )


def _blkbench_once(fw: FirmwareImage, p: DevicesParams, disk: str = "builtin") -> float:
    """MB/s of one `blkbench` run on a fresh image."""
    memory = 64 * MiB
    with tempfile.TemporaryDirectory(prefix="ptmig-bench-blk-") as tmp:
        vm = Vm(VmSpec(memory, 1, f"blkbench size={p.blk_size} req={p.blk_req}", "blkbench"))
        iommu = IommuTable.create(memory // 4096)
        iommu.map_identity(memory // 4096)
        handle = _blk_device(disk, tmp, p, vm, iommu)
        try:
            vm.attach_device(0, handle)
            vm.wake_fds.append(handle.irq_eventfd)
            vm.boot(fw.data, fw.entry, fw.entry_ap, [BootDevice(mmio_gpa(0), 0x1000, 2)])
            vm.start()
            code = vm.wait(300)
            lines = list(vm.console.lines)
        finally:
            vm.close()
            handle.close()
            iommu.close()
    match = next((m for m in map(_BLKBENCH.search, lines) if m), None)
    if code != 0 or match is None:
        raise BenchError(f"blkbench exited with {code}; console {lines[-3:]!r}")
    nbytes, ticks, _, khz = map(int, match.groups())
    return nbytes / (ticks / (khz * 1000.0)) / 1e6


def bench_blk(config: BenchConfig, p: DevicesParams, fw: FirmwareImage) -> list[Result]:
    progress.step("virtio-blk sequential write")
    disks = _disks()
    runs: dict[str, list[float]] = {d: [] for d in disks}
    for _ in range(config.runs):  # alternating, as the kv runs
        for disk in disks:
            runs[disk].append(_blkbench_once(fw, p, disk))
    extra = {"size": p.blk_size, "request": p.blk_req}
    out = [measured(SECTION, "blk.seqwrite", runs["builtin"], "MB/s", extra=extra)]
    if "vhost-user" in runs:
        vextra = dict(extra, disk="vhost-user")
        out += [
            measured(SECTION, "blk.seqwrite.vhost_user", runs["vhost-user"], "MB/s", extra=vextra),
            measured(
                SECTION,
                "blk.vhost_user_vs_builtin",
                paired_ratios(runs["vhost-user"], runs["builtin"]),
                "ratio",
                extra=vextra,
            ),
        ]
    return out


# ---- idle CPU --------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_idle_cpu(config: BenchConfig, p: DevicesParams) -> list[Result]:
    progress.step("idle CPU")
    runs: list[float] = []
    for _ in range(config.runs):
        with KvVmm(p.kv_memory) as vmm:
            time.sleep(0.5)
            pids = vmm.device_pids()
            before = sum(_cpu_seconds(pid) for pid in pids)
            t0 = time.monotonic()
            time.sleep(p.idle_seconds)
            used = sum(_cpu_seconds(pid) for pid in pids) - before
            runs.append(100.0 * used / (time.monotonic() - t0))
    return [
        measured(
            SECTION,
            "idle.cpu",
            runs,
            "%",
            GOAL_IDLE_CPU_PCT,
            {"seconds": p.idle_seconds, "what": "all device processes, % of a core"},
        )
    ]
