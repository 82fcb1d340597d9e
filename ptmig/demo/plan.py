"""What a demo run is made of, decided before anything starts: sizes, durations, ports, files.

`DemoOptions` is what the command line asks for; `DemoPlan` adds the free ports and the run
directory, and writes the VM config that both VMMs load (the same file on both sides: the disk
image is "shared storage", as on two hosts with a shared datastore). Pure apart from
`write_configs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..migration.params import DMA_TRACKING

GUEST_IP = "10.0.0.2/24"
GUEST_MAC = "52:54:00:12:34:56"
KV_PORT = 7000
# The kv log's disk (sparse). The guest checkpoints its log when an area (half the log) fills,
# and serves nothing while it does (0.3-0.9 s at 65,536 keys on a busy 2-core host): with 64 MiB
# that came every ~326,000 PUTs, inside most unpaced runs, and looked like a pause of the
# migration's. 512 MiB moves it past ~2.6 million PUTs; one that still happens is reported.
DISK_SIZE = "512M"
#: `--disk`: ptmig's own virtio-blk device process, or a qemu-storage-daemon it spawns as the
#: disk's vhost-user backend
DISK_BACKENDS = ("builtin", "vhost-user")


@dataclass(frozen=True)
class DemoOptions:
    memory: str = "1G"
    dma_tracking: str = "shadow"
    warmup_s: float = 4.0  # load before the migration starts
    after_s: float = 4.0  # load after the switchover (however long the migration took)
    rate: float | None = None  # offered kv load in ops/s; None: as fast as the client can
    max_bandwidth_mib: float = 100.0  # about a 1 GbE link; 0 = unlimited
    downtime_limit_ms: int = 300
    # QEMU's auto-converge: on an idle host the unpaced client dirties memory faster than a
    # 100 MiB/s link carries it, and without it pre-copy ends in a forced switchover over the
    # downtime limit
    auto_converge: bool = True
    tap: bool = False
    json_path: Path | None = None
    report_dir: Path | None = None
    bench_json: Path | None = None
    run_dir: Path | None = None  # default: a fresh temporary directory, removed afterwards
    live: bool = True  # rich live view when stdout is a terminal
    disk: str = "builtin"  # one of DISK_BACKENDS

    def check(self) -> None:
        if self.dma_tracking not in DMA_TRACKING:
            raise ValueError(
                f"dma tracking must be one of {', '.join(DMA_TRACKING)}, got {self.dma_tracking!r}"
            )
        if self.disk not in DISK_BACKENDS:
            raise ValueError(
                f"disk backend must be one of {', '.join(DISK_BACKENDS)}, got {self.disk!r}"
            )
        if self.warmup_s <= 0:
            raise ValueError(f"warm-up must be positive, got {self.warmup_s} s")
        if self.after_s < 1:
            raise ValueError(
                f"the load after the switchover must last at least 1 s, to "
                f"measure it; got {self.after_s} s"
            )
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"the offered load must be positive, got {self.rate} ops/s")
        if self.max_bandwidth_mib < 0:
            raise ValueError(f"max bandwidth must be >= 0 MiB/s, got {self.max_bandwidth_mib}")
        if not 1 <= self.downtime_limit_ms <= 2_000_000:
            raise ValueError(f"downtime limit must be 1..2000000 ms, got {self.downtime_limit_ms}")

    @classmethod
    def quick(cls, **kw: object) -> DemoOptions:
        """The small version the tests run: 256 MiB, 2 s of load before the migration and 3 s
        after the switchover."""
        base: dict[str, object] = {"memory": "256M", "warmup_s": 2.0, "after_s": 3.0}
        base.update(kw)
        return cls(**base)  # type: ignore[arg-type]


def latency_path(load_json: Path) -> Path:
    """Where the load client puts its per-request record, next to its result document."""
    return load_json.with_name(load_json.name.removesuffix(".json") + ".lat.npy")


@dataclass
class DemoPlan:
    opts: DemoOptions
    run_dir: Path
    switch_port: int  # UDP
    migration_port: int  # TCP
    tap_names: tuple[str, str] | None = None  # (source, destination) with --tap
    files: dict[str, Path] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def qmp_src(self) -> Path:
        return self.path("src.qmp")

    @property
    def qmp_dst(self) -> Path:
        return self.path("dst.qmp")


def config_text(
    memory: str,
    backend: str,
    disk: str,
    *,
    switch_auto: bool = False,
    disk_backend: str = "builtin",
) -> str:
    """The kv VM: 1 vCPU, a virtio-net on `backend`, a virtio-blk log on `disk` (served by
    ptmig's own device, or by a spawned qemu-storage-daemon with `disk_backend` vhost-user)."""
    disk_lines = (
        'backend = "vhost-user"\nspawn = "qemu-storage-daemon"\n'
        if disk_backend == "vhost-user"
        else 'serial = "ptmig-disk0"\n'
    )
    switch = (
        '\nswitch = "auto"'
        if switch_auto
        else ('\nswitch = "none"' if backend.startswith("udp:") else "")
    )
    return (
        "# Written by `ptmig demo`: the kv VM that is migrated under load.\n"
        f'[vm]\nmemory = "{memory}"\nvcpus = 1\n\n'
        f'[workload]\nname = "kv"\nargs = {{ port = {KV_PORT} }}\n\n'
        f'[[net]]\nid = "net0"\nmac = "{GUEST_MAC}"\nip = "{GUEST_IP}"\n'
        f'backend = "{backend}"{switch}\n\n'
        f'[[disk]]\nid = "disk0"\npath = "{disk}"\nsize = "{DISK_SIZE}"\n{disk_lines}'
    )


def write_configs(plan: DemoPlan) -> tuple[Path, Path]:
    """The source's and the destination's config (the same file unless TAP needs two)."""
    disk, opts = "kv.img", plan.opts
    if plan.tap_names is None:
        cfg = plan.path("kv.toml")
        net = f"udp:127.0.0.1:{plan.switch_port}"
        cfg.write_text(config_text(opts.memory, net, disk, disk_backend=opts.disk))
        plan.files["config"] = cfg
        return cfg, cfg
    src = plan.path("kv-src.toml")
    dst = plan.path("kv-dst.toml")
    for path, tap in ((src, plan.tap_names[0]), (dst, plan.tap_names[1])):
        path.write_text(config_text(opts.memory, f"tap:{tap}", disk, disk_backend=opts.disk))
    plan.files["config"] = src
    return src, dst
