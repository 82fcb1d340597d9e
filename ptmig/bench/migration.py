"""The live-migration benchmark (section `migration`): ptmig against a TCP stream and QEMU.

Per run, back to back:
- **ptmig**: two `ptmig run` processes (source; destination with `--incoming`), a 1 GiB guest
  running the `dirty` workload with a one-page working set, paced by halting (`halt=1`: a
  near-idle guest that leaves its CPU to the host, as QEMU's stopped guest does), whose RAM above
  `FILL_FROM` is first filled with random bytes by the VMM (QMP `x-debug-fill-ram`), so
  the destination receives real data, never holes or zero pages. It is migrated over loopback
  (no DMA tracking needed: no devices) with the default downtime limit, unlimited bandwidth,
  over `DATA_CHANNELS` parallel streams (QEMU's `multifd` capability, `multifd-channels`).
  Reported: total time, downtime, throughput = `ram.transferred` / `total-time`, and each VMM
  process's CPU seconds per GiB sent (user + system from `migrate` to `completed`, vCPU threads
  left out; `ptmig.cputime`). `total-time` runs from
  the `migrate` command to the switchover, as QEMU's does; it does not include the
  destination's start-up, during which it prefaults its guest RAM (on by default, like QEMU's
  `-mem-prealloc`; about 0.5 s per GiB here, long over by the time the source filled its RAM).
- **sealed**: the same ptmig migration under a pre-shared key (the default mode: every byte in
  AES-GCM records, see `migration.seal`), run right after the plain (`--insecure`) one;
  `ptmig.sealed/plain` is the throughput ratio of the two, per run, and
  `ptmig.sealed.cpu_per_gib.*` beside `ptmig.cpu_per_gib.*` shows what sealing costs each side
  (`cpu_results`). `ptmig.sealed/plain.cpu_bound` is plain ÷ sealed CPU per GiB of both VMMs
  together, per pair: the most `sealed/plain` can be where the two VMMs share cores they
  saturate (a 2-core host): AES-GCM is one more pass over every byte on each side.
- **stream**: a plain Python TCP loopback stream of the same number of bytes
  (`transport.measure_loopback_stream`); `ptmig/stream` is what the engine achieves of it.
- **QEMU** (when `qemu-system-x86_64` is installed; `make bench` installs it on Debian as root):
  two QEMU processes, `-m 1G` backed by a file of random bytes (`memory-backend-file,share=on`),
  source started with `-S`, the destination with `-incoming defer`, migrated through QMP with
  the same settings as ptmig: the `multifd` capability on both sides with `DATA_CHANNELS`
  `multifd-channels` (so both engines send on a main stream plus the same number of data
  streams), the same `downtime-limit` (`DOWNTIME_LIMIT_MS`) and no bandwidth limit
  (`max-bandwidth` very high: QEMU's default is 128 MiB/s). `ptmig/qemu` ratios are per run.
  When QEMU is missing or cannot migrate, a result named `qemu` says why (table and JSON), and
  the ptmig results stand.

What still differs between the two engines (the settings above are the same): QEMU's guest never
runs (`-S`), so it dirties nothing; ptmig's runs and halts between stores to one page. And the
same downtime limit means different things: QEMU may stop the guest in the middle of a pass as
soon as what is left fits in the limit at the measured bandwidth (its downtime is that last
stretch), while ptmig decides only at the end of a round, when after the first round of an idle
guest almost nothing is dirty, so its downtime is a few ms. `ptmig/qemu.downtime` compares the
two switchover policies as they are at one limit.

- **page scans**: the source's zero-page scan (`pages.split_zero_runs`, 64 MiB with every third
  page non-zero) and the verification digest (`verify.page_digests`, 1 GiB), in GB/s: both run
  on every page a migration moves, so each must keep well ahead of the link.

One extra verified ptmig migration (`x-verify`, not counted in the medians: the destination
hashes the stop-and-copy pages as they arrive, which adds to the downtime) checks that what
arrived is what was sent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import cputime
from ..migration.seal import new_key_file
from ..migration.transport import measure_loopback_stream
from ..vmmproc import QmpMonitor, VmmError, free_port, run_command, stop_process
from . import progress
from .harness import BenchConfig, BenchError, Goal, Result, measured, paired_ratios

SECTION = "migration"
MiB = 1 << 20
GiB = 1 << 30
FILL_FROM = 16 * MiB  # firmware, page tables, stacks and the workload's bitmap live below

GOAL_STREAM_RATIO = Goal(">=", 0.6)
GOAL_SEALED_RATIO = Goal(">=", 0.8)
GOAL_QEMU_THROUGHPUT_RATIO = Goal(">=", 3.0)
GOAL_DOWNTIME_MS = Goal("<=", 10, "ms")
GOAL_CPU_PER_GIB = Goal("<=", 1.0, "s/GiB")
DATA_CHANNELS = 2  # best of 0, 2, 4 measured on a 2-core host
QEMU_BINARY = "qemu-system-x86_64"
QEMU_MAX_BANDWIDTH = 1 << 40  # bytes/s: "unlimited" (QEMU's default is 128 MiB/s)
DOWNTIME_LIMIT_MS = 300  # both engines' default, set explicitly on both
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class MigrationBenchParams:
    memory: int = 1 * GiB
    start_timeout_s: float = 60.0
    migration_timeout_s: float = 120.0

    @classmethod
    def for_config(cls, config: BenchConfig) -> MigrationBenchParams:
        return cls()


@dataclass
class Sample:
    total_ms: float
    downtime_ms: float
    transferred: int
    info: dict[str, Any]
    cpu_source_s: float = float("nan")  # VMM CPU from migrate to completed, vCPU threads out
    cpu_destination_s: float = float("nan")

    def cpu_per_gib(self, side: str) -> float:
        """CPU seconds per GiB sent of the "source", the "destination", or "both" together."""
        used = {
            "source": self.cpu_source_s,
            "destination": self.cpu_destination_s,
            "both": self.cpu_source_s + self.cpu_destination_s,
        }[side]
        return used / (self.transferred / GiB) if self.transferred else float("nan")

    @property
    def gb_per_s(self) -> float:
        return self.transferred / (self.total_ms / 1000) / 1e9 if self.total_ms else 0.0


def run(config: BenchConfig) -> list[Result]:
    return run_migration_bench(config, MigrationBenchParams.for_config(config)) + page_scan_results(
        config
    )


def cpu_results(
    name: str, samples: list[Sample], extra: dict[str, Any], goal: Goal | None = None
) -> list[Result]:
    """`<name>.cpu_per_gib.source` / `.destination`: each VMM's CPU per GiB sent. Under a
    PSK the difference from the plain run is the AES-GCM records' cost (one pass over every
    byte on each side, besides the copies both runs make): on a host whose cores the two VMMs
    share, it is what bounds `ptmig.sealed/plain`."""
    return [
        measured(
            SECTION,
            f"{name}.cpu_per_gib.{side}",
            [s.cpu_per_gib(side) for s in samples],
            "s/GiB",
            goal,
            {
                **extra,
                "what": f"{side} VMM process CPU (user + system, vCPU threads "
                "left out) from migrate to completed, per GiB sent",
            },
        )
        for side in ("source", "destination")
    ]


def sealed_results(
    plain: list[Sample], sealed: list[Sample], extra: dict[str, Any]
) -> list[Result]:
    """The sealed (PSK) runs beside the plain ones of the same runs: throughput, CPU, downtime,
    `ptmig.sealed/plain` (the goal) and `ptmig.sealed/plain.cpu_bound`, plain ÷ sealed CPU per
    GiB of both VMMs together: what a host whose cores both VMMs saturate allows."""
    tp = [s.gb_per_s for s in plain]
    return [
        measured(
            SECTION, "ptmig.sealed.throughput", [s.gb_per_s for s in sealed], "GB/s", extra=extra
        ),
        *cpu_results("ptmig.sealed", sealed, extra),
        measured(
            SECTION, "ptmig.sealed.downtime", [s.downtime_ms for s in sealed], "ms", extra=extra
        ),
        measured(
            SECTION,
            "ptmig.sealed/plain",
            paired_ratios([s.gb_per_s for s in sealed], tp),
            "ratio",
            GOAL_SEALED_RATIO,
        ),
        measured(
            SECTION,
            "ptmig.sealed/plain.cpu_bound",
            paired_ratios(
                [s.cpu_per_gib("both") for s in plain],
                [s.cpu_per_gib("both") for s in sealed],
            ),
            "ratio",
            extra={
                "what": "plain ÷ sealed CPU per GiB of both VMMs together, per pair: the "
                "sealed/plain throughput a host whose cores both VMMs saturate allows"
            },
        ),
    ]


def run_migration_bench(config: BenchConfig, p: MigrationBenchParams) -> list[Result]:
    qemu = shutil.which(QEMU_BINARY)
    ptmig_s: list[Sample] = []
    sealed_s: list[Sample] = []
    stream: list[float] = []
    qemu_s: list[Sample] = []
    qemu_accel: str | None = None
    qemu_error: str | None = None
    with tempfile.TemporaryDirectory(prefix="ptmig-bench-mig-") as d:
        tmp = Path(d)
        try:
            for i in range(config.runs):
                progress.step("ptmig migration, then the plain stream", i + 1, config.runs)
                ptmig_s.append(ptmig_migration(tmp, p))
                sealed_s.append(ptmig_migration(tmp, p, sealed=True))
                stream.append(measure_loopback_stream(ptmig_s[-1].transferred) / 1e9)
                if qemu is not None and qemu_error is None:
                    progress.step("QEMU migration", i + 1, config.runs)
                    try:
                        sample, qemu_accel = qemu_migration(tmp, qemu, p, qemu_accel)
                    except BenchError as e:  # keep ptmig's numbers; say why QEMU's are missing
                        qemu_error = f"QEMU could not be measured: {e}"
                        continue
                    qemu_s.append(sample)
        finally:
            remove_qemu_ram_files()
        progress.step("one verified ptmig migration")
        verified = ptmig_migration(tmp, p, verify=True, sealed=True).info.get("x-verify", {})
    extra = {
        "memory_mib": p.memory // MiB,
        "filled_mib": (p.memory - FILL_FROM) // MiB,
        "verify": verified,
    }
    tp = [s.gb_per_s for s in ptmig_s]
    out = [
        measured(SECTION, "ptmig.total", [s.total_ms for s in ptmig_s], "ms", extra=extra),
        measured(
            SECTION,
            "ptmig.downtime",
            [s.downtime_ms for s in ptmig_s],
            "ms",
            GOAL_DOWNTIME_MS,
            extra=extra,
        ),
        measured(SECTION, "ptmig.throughput", tp, "GB/s", extra=extra),
        measured(SECTION, "stream.throughput", stream, "GB/s"),
        measured(SECTION, "ptmig/stream", paired_ratios(tp, stream), "ratio", GOAL_STREAM_RATIO),
        *cpu_results("ptmig", ptmig_s, extra, GOAL_CPU_PER_GIB),
        *sealed_results(ptmig_s, sealed_s, extra),
    ]
    if qemu is None or qemu_error is not None or not qemu_s:
        why = (
            f"{QEMU_BINARY} is not installed (`make bench` installs qemu-system-x86 on "
            "Debian when run as root)"
            if qemu is None
            else qemu_error or "no QEMU run"
        )
        out.append(Result(SECTION, "qemu", float("nan"), "", None, None, [], {"skipped": why}))
        return out
    qx = {"accel": qemu_accel, "binary": qemu}
    qtp = [s.gb_per_s for s in qemu_s]
    out += [
        measured(SECTION, "qemu.total", [s.total_ms for s in qemu_s], "ms", extra=qx),
        measured(SECTION, "qemu.downtime", [s.downtime_ms for s in qemu_s], "ms", extra=qx),
        measured(SECTION, "qemu.throughput", qtp, "GB/s", extra=qx),
        measured(
            SECTION,
            "ptmig/qemu.throughput",
            paired_ratios(tp, qtp),
            "ratio",
            GOAL_QEMU_THROUGHPUT_RATIO,
        ),
        measured(
            SECTION,
            "ptmig/qemu.total",
            paired_ratios([s.total_ms for s in ptmig_s], [s.total_ms for s in qemu_s]),
            "ratio",
        ),
        measured(
            SECTION,
            "ptmig/qemu.downtime",
            paired_ratios(
                [s.downtime_ms for s in ptmig_s], [max(s.downtime_ms, 1.0) for s in qemu_s]
            ),
            "ratio",
            extra={
                "compares": f"both: 1 + {DATA_CHANNELS} streams (multifd), downtime-limit "
                f"{DOWNTIME_LIMIT_MS} ms, no bandwidth limit; QEMU: paused guest, may switch "
                "mid-pass once the rest fits the limit; ptmig: running (halting) guest, "
                "switches only at a round's end"
            },
        ),
    ]
    return out


# ---- helpers ------------------------------------------------------------------------------


def _connect(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> QmpMonitor:
    """A connected QMP client once the socket exists (the process's log lies beside it)."""
    monitor = QmpMonitor(path, path.stem)
    monitor.connect(proc, timeout)
    return monitor


def _completed(q: QmpMonitor, timeout: float) -> dict[str, Any]:
    """The final `query-migrate` of a migration that must complete."""
    info = q.wait_migration(timeout, poll_s=0.01)
    if info["status"] != "completed":
        raise BenchError(f"migration {info['status']}: {info.get('error-desc')}")
    return info


def _stop(proc: subprocess.Popen[bytes], q: QmpMonitor | None) -> None:
    stop_process(proc, (lambda: q.execute("quit")) if q is not None else None)
    if q is not None:
        q.close()


def fill_random(path: Path | str, offset: int, length: int, seed: int = 1) -> None:
    """Write `length` random bytes at `offset` of a file (or a memfd through /proc)."""
    import mmap

    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < offset + length:
            os.ftruncate(fd, offset + length)
        with mmap.mmap(fd, offset + length, mmap.MAP_SHARED) as mm:
            chunk = 64 * MiB
            for pos in range(offset, offset + length, chunk):
                n = min(chunk, offset + length - pos)
                mm[pos : pos + n] = rng.bytes(n)
    finally:
        os.close(fd)


# ---- ptmig ----------------------------------------------------------------------------------


def _ptmig_config(tmp: Path, memory: int) -> Path:
    path = tmp / "idle.toml"
    path.write_text(
        f'[vm]\nname = "benchmig"\nmemory = "{memory // MiB}M"\nvcpus = 1\n\n'
        '[workload]\nname = "dirty"\nargs = { ws = "4K", rate = 1, halt = 1 }\n'
    )
    return path


def _ptmig(tmp: Path, name: str, config: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x)
    qmp = tmp / f"{name}.qmp"
    if qmp.exists():
        qmp.unlink()
    with open(tmp / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            run_command(config, qmp, tmp / f"{name}.con", *extra),
            stdout=log,
            stderr=log,
            env=env,
        )


def ptmig_migration(
    tmp: Path, p: MigrationBenchParams, verify: bool = False, sealed: bool = False
) -> Sample:
    """One migration: plain (`--insecure`, like QEMU's tcp:) or sealed under a fresh PSK."""
    config = _ptmig_config(tmp, p.memory)
    port = free_port()
    auth = ("--psk-file", str(new_key_file(tmp / "migration.key"))) if sealed else ("--insecure",)
    src = _ptmig(tmp, "src", config, *auth)
    dst = _ptmig(tmp, "dst", config, "--incoming", f"tcp:127.0.0.1:{port}", *auth)
    qs = qd = None
    try:
        qs = _connect(tmp / "src.qmp", src, p.start_timeout_s)
        qd = _connect(tmp / "dst.qmp", dst, p.start_timeout_s)
        qs.wait_status("running", p.start_timeout_s)
        qs.execute("x-debug-fill-ram", {"gpa": FILL_FROM, "size": p.memory - FILL_FROM})
        qs.execute(
            "migrate-set-parameters",
            {
                "x-dma-tracking": "none",
                "max-bandwidth": 0,
                "downtime-limit": DOWNTIME_LIMIT_MS,
                "multifd-channels": DATA_CHANNELS,
            },
        )
        qs.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "x-verify", "state": verify},
                    {"capability": "multifd", "state": True},
                ]
            },
        )
        before = (cputime.sample(src.pid), cputime.sample(dst.pid))
        qs.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = _completed(qs, p.migration_timeout_s)
        after = (cputime.sample(src.pid), cputime.sample(dst.pid))
        qd.wait_status("running", 10)
        if verify and info.get("x-verify", {}).get("mismatched"):
            raise BenchError(f"verified migration found differing pages: {info['x-verify']}")
        used = [
            cputime.migration_cpu_s(a, b) if a is not None and b is not None else float("nan")
            for a, b in zip(before, after, strict=True)
        ]
        return Sample(
            float(info["total-time"]),
            float(info["downtime"]),
            int(info["ram"]["transferred"]),
            info,
            used[0],
            used[1],
        )
    finally:
        _stop(src, qs)
        _stop(dst, qd)


# ---- QEMU -----------------------------------------------------------------------------------


def _qemu(
    binary: str, tmp: Path, name: str, mem_file: Path, memory: int, accel: str, *extra: str
) -> subprocess.Popen[bytes]:
    qmp = tmp / f"{name}.qmp"
    if qmp.exists():
        qmp.unlink()
    args = [
        binary,
        "-machine",
        f"q35,memory-backend=ram0,accel={accel}",
        "-m",
        f"{memory // MiB}M",
        "-object",
        f"memory-backend-file,id=ram0,size={memory // MiB}M,mem-path={mem_file},share=on",
        "-nodefaults",
        "-nographic",
        "-vga",
        "none",
        "-S",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        *extra,
    ]
    with open(tmp / f"{name}.log", "wb") as log:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def qemu_migration(
    tmp: Path, binary: str, p: MigrationBenchParams, accel: str | None
) -> tuple[Sample, str]:
    """One QEMU migration; tries KVM first (then TCG) and remembers which one works."""
    ram_dir = SHM_DIR if SHM_DIR.is_dir() else tmp  # tmpfs, like ptmig's memfd
    src_mem = ram_dir / f"ptmig-bench-qemu-{os.getpid()}-src.ram"
    dst_mem = ram_dir / f"ptmig-bench-qemu-{os.getpid()}-dst.ram"
    if not src_mem.exists():
        fill_random(src_mem, 0, p.memory, seed=2)
    errors: list[str] = []
    for acc in [accel] if accel else ["kvm", "tcg"]:
        if dst_mem.exists():
            dst_mem.unlink()
        with open(dst_mem, "wb") as f:
            f.truncate(p.memory)
        port = free_port()
        src = _qemu(binary, tmp, "qsrc", src_mem, p.memory, acc)
        dst = _qemu(binary, tmp, "qdst", dst_mem, p.memory, acc, "-incoming", "defer")
        qs = qd = None
        try:
            qs = _connect(tmp / "qsrc.qmp", src, p.start_timeout_s)
            qd = _connect(tmp / "qdst.qmp", dst, p.start_timeout_s)
            for q in (qs, qd):  # multifd must be on at both ends before the stream starts
                q.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "multifd", "state": True}]},
                )
                q.execute("migrate-set-parameters", {"multifd-channels": DATA_CHANNELS})
            qs.execute(
                "migrate-set-parameters",
                {"max-bandwidth": QEMU_MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS},
            )
            qd.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
            qs.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = _completed(qs, p.migration_timeout_s)
            return (
                Sample(
                    float(info["total-time"]),
                    float(info.get("downtime", 0)),
                    int(info["ram"]["transferred"]),
                    info,
                ),
                acc,
            )
        except (BenchError, VmmError) as e:
            log = (tmp / "qsrc.log").read_text(errors="replace").strip()
            errors.append(f"accel={acc}: {e} {log[-300:]}")
        finally:
            _stop(src, qs)
            _stop(dst, qd)
    raise BenchError(f"QEMU could not migrate: {'; '.join(errors)}")


def remove_qemu_ram_files() -> None:
    for f in SHM_DIR.glob(f"ptmig-bench-qemu-{os.getpid()}-*.ram"):
        f.unlink(missing_ok=True)


# ---- page scans ---------------------------------------------------------------------------

GOAL_SCAN_GBS = Goal(">=", 1.0, "GB/s")  # a page scan may cost at most 1 s per GB migrated


def _zero_scan_gbs() -> float:
    from ..migration.events import make_runs
    from ..migration.pages import PAGE_SIZE, split_zero_runs

    ram = bytearray(64 * MiB)
    np.frombuffer(ram, np.uint8).reshape(-1, PAGE_SIZE)[::3, 100] = 1
    runs = make_runs([0], [len(ram) // PAGE_SIZE])
    t = time.perf_counter()
    split_zero_runs(ram, runs)
    return len(ram) / (time.perf_counter() - t) / 1e9


def _digest_gbs() -> float:
    from ..migration.verify import page_digests

    ram = np.ones(GiB, dtype=np.uint8)
    page_digests(ram[:MiB])  # warm up
    t = time.perf_counter()
    page_digests(ram)
    return GiB / (time.perf_counter() - t) / 1e9


def page_scan_results(config: BenchConfig) -> list[Result]:
    zero = [_zero_scan_gbs() for _ in range(config.runs)]
    digest = [_digest_gbs() for _ in range(config.runs)]
    return [
        measured(
            SECTION,
            "pages.zero_scan",
            zero,
            "GB/s",
            GOAL_SCAN_GBS,
            {"ram_mib": 64, "nonzero": "every third page"},
        ),
        measured(SECTION, "verify.digest", digest, "GB/s", GOAL_SCAN_GBS, {"ram_mib": 1024}),
    ]
