"""VM configuration: the TOML file format, its validation, and the frozen objects it loads into.

This module owns the schema of a ptmig VM config file (``[vm]``, ``[workload]``, ``[[net]]``,
``[[disk]]``, ``[migration]``), every rule a value must satisfy, and the derived views the rest of
ptmig needs: the guest command line, the ordered device list with MMIO windows, and the
compatibility fingerprint source and destination compare before a migration.

Every rejection is a :class:`ConfigError` naming the file, the key path (``net[0].mac``), the bad
value and what is allowed. Unknown keys are errors: a typo must never be silently ignored.
Parsing is pure (no files are created, no sockets opened); only :func:`load_config` reads a file.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ptmig.layout import (
    ABI_MAX_DEVICES,
    ABI_MAX_VCPUS,
    ABI_MMIO_BASE_GPA,
    ABI_MMIO_STRIDE,
    CMDLINE_MAX,
    MAX_MEMORY,
    MIN_MEMORY,
)

from .errors import PtmigError

# Guest ABI numbers (docs/GUEST_ABI.md) come from ptmig.layout; the rest are config rules.
MMIO_BASE = ABI_MMIO_BASE_GPA
MMIO_STRIDE = ABI_MMIO_STRIDE
MIB = 1 << 20
MEMORY_MIN = MIN_MEMORY
MEMORY_MAX = MAX_MEMORY  # what the firmware's page tables can map (the host may give less)
MEMORY_ALIGN = 2 * MIB  # guest page tables map RAM with 2 MiB pages
VCPUS_MAX = ABI_MAX_VCPUS  # the statistics page has one slot per vCPU
DEVICES_MAX = ABI_MAX_DEVICES
CMDLINE_BYTES_MAX = CMDLINE_MAX - 1  # the boot-info field includes the terminating NUL
DISK_SIZE_MAX = 1 << 40
SECTOR = 512
SERIAL_MAX = 20  # virtio-blk GET_ID returns at most 20 bytes
IFNAMSIZ = 16  # Linux interface names: 15 bytes plus the terminating NUL
WORKLOADS = ("hello", "dirty", "storebw", "kv", "blkbench", "blkverify")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGkmg]?)\s*$")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_ARG_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")

ArgValue = str | int | bool
DeviceKind = Literal["net", "disk"]
DiskBackend = Literal["builtin", "vhost-user"]
VHOST_USER_SPAWN = ("qemu-storage-daemon",)
SwitchMode = Literal["auto", "none"]


class ConfigError(PtmigError, ValueError):
    """A config file is unreadable or a value in it is not allowed.

    ``source`` is the file (or ``"<string>"``), ``key`` the key path such as ``net[0].mac``
    (empty for whole-file problems), ``problem`` the human explanation.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)


# --------------------------------------------------------------------------- config objects


@dataclass(frozen=True)
class UdpBackend:
    """Ethernet frames carried in UDP datagrams to/from a ``ptmig switch`` at host:port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"udp:{host}:{self.port}"


@dataclass(frozen=True)
class TapBackend:
    """A Linux TAP interface (needs CAP_NET_ADMIN)."""

    ifname: str

    def __str__(self) -> str:
        return f"tap:{self.ifname}"


Backend = UdpBackend | TapBackend


@dataclass(frozen=True)
class NetConfig:
    """One virtio-net device. ``mac`` is normalised to lower case."""

    id: str
    mac: str
    ip: ipaddress.IPv4Interface
    backend: Backend
    switch: SwitchMode

    @property
    def mac_bytes(self) -> bytes:
        return bytes(int(part, 16) for part in self.mac.split(":"))


@dataclass(frozen=True)
class DiskConfig:
    """One virtio-blk device backed by a raw image; ``path`` is absolute.

    ``backend`` is ``"builtin"`` (ptmig's own device process) or ``"vhost-user"``: then exactly
    one of ``socket`` (a backend someone else runs, listening there) and ``spawn`` (the program
    ptmig starts and supervises on the image: ``qemu-storage-daemon``) is set."""

    id: str
    path: Path
    size: int
    serial: str
    backend: DiskBackend = "builtin"
    socket: Path | None = None
    spawn: str | None = None


@dataclass(frozen=True)
class WorkloadConfig:
    """The guest program and its ``key=value`` arguments, in file order."""

    name: str
    args: tuple[tuple[str, ArgValue], ...]


@dataclass(frozen=True)
class MigrationConfig:
    """Default credentials for migration; absolute paths or None."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    psk_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class DeviceSlot:
    """A device at its bus position: index i owns the MMIO window MMIO_BASE + i*MMIO_STRIDE."""

    index: int
    kind: DeviceKind
    config: NetConfig | DiskConfig

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def mmio_base(self) -> int:
        return MMIO_BASE + self.index * MMIO_STRIDE


@dataclass(frozen=True)
class VmConfig:
    """A validated VM configuration. Build it with :func:`load_config` or :func:`parse_config`."""

    source: str
    name: str
    memory_bytes: int
    vcpus: int
    workload: WorkloadConfig
    net: tuple[NetConfig, ...] = ()
    disk: tuple[DiskConfig, ...] = ()
    migration: MigrationConfig = MigrationConfig()

    @property
    def devices(self) -> tuple[DeviceSlot, ...]:
        """Net devices first, then disks, each with its MMIO index."""
        configs: list[tuple[DeviceKind, NetConfig | DiskConfig]] = [
            *(("net", n) for n in self.net),
            *(("disk", d) for d in self.disk),
        ]
        return tuple(DeviceSlot(i, kind, cfg) for i, (kind, cfg) in enumerate(configs))

    def guest_cmdline(self) -> str:
        """The firmware command line: workload name, the first NIC's ip/mask, then the args.

        ``ip``/``mask`` come from ``net[0].ip`` unless the args set them (validation has
        checked that they agree). Booleans are written as 1/0.
        """
        given = dict(self.workload.args)
        parts = [self.workload.name]
        if self.net:
            iface = self.net[0].ip
            if "ip" not in given:
                parts.append(f"ip={iface.ip}")
            if "mask" not in given:
                parts.append(f"mask={iface.network.prefixlen}")
        parts.extend(f"{k}={_arg_text(v)}" for k, v in self.workload.args)
        return " ".join(parts)

    def compat_fingerprint(self) -> dict[str, Any]:
        """What source and destination must agree on for a migration (JSON-serialisable)."""
        devices: list[dict[str, Any]] = []
        for slot in self.devices:
            entry: dict[str, Any] = {"index": slot.index, "kind": slot.kind, "id": slot.id}
            if isinstance(slot.config, NetConfig):
                entry["mac"] = slot.config.mac
            else:
                entry["size"] = slot.config.size
            devices.append(entry)
        return {"memory": self.memory_bytes, "vcpus": self.vcpus, "devices": devices}


def fingerprint_mismatches(source: Mapping[str, Any], dest: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two compat fingerprints (empty: compatible)."""
    problems = [
        f"{key}: source has {source.get(key)!r}, destination has {dest.get(key)!r}"
        for key in ("memory", "vcpus")
        if source.get(key) != dest.get(key)
    ]
    src_devs, dst_devs = list(source.get("devices", [])), list(dest.get("devices", []))
    if len(src_devs) != len(dst_devs):
        problems.append(f"devices: source has {len(src_devs)}, destination has {len(dst_devs)}")
    for i, (a, b) in enumerate(zip(src_devs, dst_devs, strict=False)):
        if a != b:
            problems.append(f"devices[{i}]: source has {a!r}, destination has {b!r}")
    return problems


def _arg_text(value: ArgValue) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# --------------------------------------------------------------------------- entry points


def load_config(path: str | os.PathLike[str]) -> VmConfig:
    """Read and validate a config file; relative paths in it are relative to its directory."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(file), "", f"cannot read config file: {exc}") from exc
    return parse_config(text, source=str(file), base_dir=file.absolute().parent)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> VmConfig:
    """Validate TOML text. ``base_dir`` (default: the current directory) anchors relative paths."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"TOML syntax error: {exc}") from exc
    return _Parser(source, base_dir if base_dir is not None else Path.cwd()).vm_config(doc)


# --------------------------------------------------------------------------- the validator


class _Parser:
    """Walks a decoded TOML document, raising ConfigError with the key path of each problem."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def table(self, doc: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for name in doc:
            if name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                maybe = f"; did you mean {hint[0]!r}?" if hint else ""
                where = f"{key}.{name}" if key else name
                raise self.fail(where, f"unknown key (allowed here: {', '.join(allowed)}){maybe}")

    def section(self, doc: Mapping[str, Any], key: str, required: bool) -> dict[str, Any]:
        value = doc.get(key)
        if value is None:
            if required:
                raise self.fail(key, f"missing required section [{key}]")
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table [{key}], got {value!r}")
        return value

    def array_of_tables(self, doc: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(key, f"must be an array of tables [[{key}]], got {value!r}")
        return value

    def string(
        self, doc: Mapping[str, Any], key: str, path: str, default: str | None = None
    ) -> str:
        if key not in doc:
            if default is None:
                raise self.fail(path, "missing required key")
            return default
        value = doc[key]
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {value!r}")
        return value

    def integer(self, doc: Mapping[str, Any], key: str, path: str, lo: int, hi: int) -> int:
        if key not in doc:
            raise self.fail(path, "missing required key")
        value = doc[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise self.fail(path, f"{value} is out of range (allowed: {lo}..{hi})")
        return value

    def size(self, doc: Mapping[str, Any], key: str, path: str) -> int:
        if key not in doc:
            raise self.fail(path, "missing required key")
        try:
            return parse_size(doc[key])
        except ValueError as exc:
            raise self.fail(path, str(exc)) from exc

    def path(self, value: str) -> Path:
        return Path(os.path.normpath(self.base_dir / Path(value).expanduser()))

    # -- sections

    def vm_config(self, doc: Mapping[str, Any]) -> VmConfig:
        self.table(doc, "", ("vm", "workload", "net", "disk", "migration"))
        vm = self.section(doc, "vm", required=True)
        self.table(vm, "vm", ("name", "memory", "vcpus"))
        default_name = Path(self.source).stem if not self.source.startswith("<") else "vm"
        name = self.string(vm, "name", "vm.name", default=default_name)
        if not _NAME_RE.match(name):
            raise self.fail(
                "vm.name",
                f"{name!r} is not a valid name (letters, digits, '.', '_', '-'; 1..64 chars)",
            )
        memory = self.size(vm, "memory", "vm.memory")
        if not MEMORY_MIN <= memory <= MEMORY_MAX or memory % MEMORY_ALIGN:
            raise self.fail(
                "vm.memory",
                f"{memory} bytes is not allowed (allowed: {MEMORY_MIN >> 20}M.."
                f"{MEMORY_MAX >> 30}G in multiples of 2M, and at most what the host has "
                "available when the VM starts)",
            )
        vcpus = self.integer(vm, "vcpus", "vm.vcpus", 1, VCPUS_MAX)
        net = tuple(self.net(n, i) for i, n in enumerate(self.array_of_tables(doc, "net")))
        disk = tuple(self.disk(d, i) for i, d in enumerate(self.array_of_tables(doc, "disk")))
        self.check_devices(net, disk)
        workload = self.workload(self.section(doc, "workload", required=True), net)
        migration = self.migration(self.section(doc, "migration", required=False))
        config = VmConfig(self.source, name, memory, vcpus, workload, net, disk, migration)
        self.check_cmdline(config.guest_cmdline())
        return config

    def workload(self, doc: Mapping[str, Any], net: tuple[NetConfig, ...]) -> WorkloadConfig:
        self.table(doc, "workload", ("name", "args"))
        name = self.string(doc, "name", "workload.name")
        if name not in WORKLOADS:
            raise self.fail(
                "workload.name", f"{name!r} is not a workload (allowed: {', '.join(WORKLOADS)})"
            )
        raw = doc.get("args", {})
        if not isinstance(raw, dict):
            raise self.fail("workload.args", f"must be a table of key = value, got {raw!r}")
        args: list[tuple[str, ArgValue]] = []
        for key, value in raw.items():
            path = f"workload.args.{key}"
            if not _ARG_KEY_RE.match(key):
                raise self.fail(
                    path, "argument names are lower-case letters, digits and '_' (max 32)"
                )
            if not isinstance(value, str | int | bool):
                raise self.fail(path, f"must be a string, integer or boolean, got {value!r}")
            text = _arg_text(value)
            if not text or any(c == "=" or not "!" <= c <= "~" for c in text):
                raise self.fail(
                    path, f"{text!r} must be non-empty printable ASCII without spaces or '='"
                )
            args.append((key, value))
        if net:
            iface = net[0].ip
            for key, want in (("ip", str(iface.ip)), ("mask", str(iface.network.prefixlen))):
                if key in raw and _arg_text(raw[key]) != want:
                    raise self.fail(
                        f"workload.args.{key}",
                        f"{raw[key]!r} disagrees with net[0].ip = {iface} (expected {want!r})",
                    )
        return WorkloadConfig(name, tuple(args))

    def net(self, doc: Mapping[str, Any], i: int) -> NetConfig:
        at = f"net[{i}]"
        self.table(doc, at, ("id", "mac", "ip", "backend", "switch"))
        dev_id = self.device_id(doc, at)
        mac = self.string(doc, "mac", f"{at}.mac")
        if not _MAC_RE.match(mac):
            raise self.fail(f"{at}.mac", f"{mac!r} is not a MAC address like 52:54:00:12:34:56")
        octets = bytes(int(p, 16) for p in mac.split(":"))
        if octets[0] & 1:
            raise self.fail(f"{at}.mac", f"{mac!r} is a multicast address (a NIC needs unicast)")
        if not any(octets):
            raise self.fail(f"{at}.mac", f"{mac!r} is all zero")
        ip_text = self.string(doc, "ip", f"{at}.ip")
        ip = self.interface(ip_text, f"{at}.ip")
        backend_text = self.string(doc, "backend", f"{at}.backend")
        try:
            backend = parse_backend(backend_text)
        except ValueError as exc:
            raise self.fail(f"{at}.backend", str(exc)) from exc
        switch: str
        if isinstance(backend, UdpBackend):
            switch = self.string(doc, "switch", f"{at}.switch", default="auto")
            if switch not in ("auto", "none"):
                raise self.fail(f"{at}.switch", f"{switch!r} is not allowed (allowed: auto, none)")
        else:
            switch = self.string(doc, "switch", f"{at}.switch", default="none")
            if switch != "none":
                raise self.fail(
                    f"{at}.switch", f"{switch!r} is only meaningful with a udp: backend (use none)"
                )
        return NetConfig(dev_id, mac.lower(), ip, backend, "auto" if switch == "auto" else "none")

    def interface(self, text: str, path: str) -> ipaddress.IPv4Interface:
        if "/" not in text:
            raise self.fail(path, f"{text!r} needs a prefix length, like 10.0.0.2/24")
        try:
            iface = ipaddress.IPv4Interface(text)
        except ValueError as exc:
            raise self.fail(path, f"{text!r} is not an IPv4 address/prefix: {exc}") from exc
        net = iface.network
        if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
            raise self.fail(path, f"{text!r} is the network or broadcast address of {net}")
        return iface

    def disk(self, doc: Mapping[str, Any], i: int) -> DiskConfig:
        at = f"disk[{i}]"
        self.table(doc, at, ("id", "path", "size", "serial", "backend", "socket", "spawn"))
        dev_id = self.device_id(doc, at)
        path_text = self.string(doc, "path", f"{at}.path")
        if not path_text:
            raise self.fail(f"{at}.path", "must not be empty")
        size = self.size(doc, "size", f"{at}.size")
        if not SECTOR <= size <= DISK_SIZE_MAX or size % SECTOR:
            raise self.fail(
                f"{at}.size", f"{size} bytes is not allowed (allowed: 512..1T in multiples of 512)"
            )
        serial = self.string(doc, "serial", f"{at}.serial", default=f"ptmig-{dev_id}"[:SERIAL_MAX])
        if not serial.isascii() or not serial.isprintable() or len(serial) > SERIAL_MAX:
            raise self.fail(
                f"{at}.serial", f"{serial!r} must be printable ASCII of at most {SERIAL_MAX} bytes"
            )
        backend = self.string(doc, "backend", f"{at}.backend", default="builtin")
        if backend == "builtin":
            for key in ("socket", "spawn"):
                if key in doc:
                    raise self.fail(f"{at}.{key}", 'is only meaningful with backend = "vhost-user"')
            return DiskConfig(dev_id, self.path(path_text), size, serial)
        if backend != "vhost-user":
            raise self.fail(
                f"{at}.backend", f"{backend!r} is not allowed (allowed: builtin, vhost-user)"
            )
        return self.vhost_user_disk(
            doc, at, DiskConfig(dev_id, self.path(path_text), size, serial, "vhost-user")
        )

    def vhost_user_disk(self, doc: Mapping[str, Any], at: str, disk: DiskConfig) -> DiskConfig:
        if ("socket" in doc) == ("spawn" in doc):
            raise self.fail(
                f"{at}.backend",
                'a "vhost-user" disk needs exactly one of socket = '
                'PATH (a running backend) and spawn = "qemu-storage-daemon"',
            )
        if "socket" in doc:
            sock = self.string(doc, "socket", f"{at}.socket")
            if not sock:
                raise self.fail(f"{at}.socket", "must not be empty")
            return replace(disk, socket=self.path(sock))
        spawn = self.string(doc, "spawn", f"{at}.spawn")
        if spawn not in VHOST_USER_SPAWN:
            raise self.fail(
                f"{at}.spawn", f"{spawn!r} is not allowed (allowed: {', '.join(VHOST_USER_SPAWN)})"
            )
        return replace(disk, spawn=spawn)

    def device_id(self, doc: Mapping[str, Any], at: str) -> str:
        dev_id = self.string(doc, "id", f"{at}.id")
        if not _ID_RE.match(dev_id):
            raise self.fail(
                f"{at}.id",
                f"{dev_id!r} is not a valid id (a letter, then letters, digits, '_', '-'; max 32)",
            )
        return dev_id

    def check_devices(self, net: tuple[NetConfig, ...], disk: tuple[DiskConfig, ...]) -> None:
        if len(net) + len(disk) > DEVICES_MAX:
            raise self.fail(
                "net",
                f"{len(net)} net + {len(disk)} disk devices exceed the limit of {DEVICES_MAX}",
            )
        seen: dict[str, str] = {}
        keyed = [(f"net[{i}]", n.id) for i, n in enumerate(net)]
        keyed += [(f"disk[{i}]", d.id) for i, d in enumerate(disk)]
        for at, dev_id in keyed:
            if dev_id in seen:
                raise self.fail(f"{at}.id", f"{dev_id!r} is already used by {seen[dev_id]}")
            seen[dev_id] = at
        macs: dict[str, int] = {}
        for i, n in enumerate(net):
            if n.mac in macs:
                raise self.fail(f"net[{i}].mac", f"{n.mac!r} is already used by net[{macs[n.mac]}]")
            macs[n.mac] = i
        paths: dict[Path, int] = {}
        for i, d in enumerate(disk):
            if d.path in paths:
                raise self.fail(
                    f"disk[{i}].path", f"{str(d.path)!r} is already used by disk[{paths[d.path]}]"
                )
            paths[d.path] = i

    def migration(self, doc: Mapping[str, Any]) -> MigrationConfig:
        self.table(doc, "migration", ("tls_cert", "tls_key", "tls_ca", "psk_file"))
        paths: dict[str, Path | None] = {}
        for key in ("tls_cert", "tls_key", "tls_ca", "psk_file"):
            if key in doc:
                text = self.string(doc, key, f"migration.{key}")
                if not text:
                    raise self.fail(f"migration.{key}", "must not be empty")
                paths[key] = self.path(text)
            else:
                paths[key] = None
        tls = [k for k in ("tls_cert", "tls_key", "tls_ca") if paths[k] is not None]
        if tls and len(tls) != 3:
            missing = sorted({"tls_cert", "tls_key", "tls_ca"} - set(tls))
            raise self.fail(
                f"migration.{missing[0]}",
                f"tls_cert, tls_key and tls_ca go together: {', '.join(tls)} given, "
                f"{', '.join(missing)} missing",
            )
        return MigrationConfig(**paths)

    def check_cmdline(self, cmdline: str) -> None:
        if len(cmdline.encode()) > CMDLINE_BYTES_MAX:
            raise self.fail(
                "workload.args",
                f"the guest command line is {len(cmdline.encode())} bytes "
                f"(allowed: at most {CMDLINE_BYTES_MAX})",
            )


# --------------------------------------------------------------------------- value parsers


def parse_size(value: object) -> int:
    """Bytes from an int or a string like "64K", "256M", "1G" (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f'{value!r} is not a size (use bytes or a string like "256M")')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    raise ValueError(f'{value!r} is not a size (use bytes or a string like "256M"; units K, M, G)')


def parse_backend(text: str) -> Backend:
    """``udp:HOST:PORT`` (IPv6 hosts in brackets) or ``tap:IFNAME``."""
    kind, sep, rest = text.partition(":")
    if kind == "tap" and sep:
        if not 0 < len(rest.encode()) < IFNAMSIZ:
            raise ValueError(
                f"{text!r}: interface name must be 1..{IFNAMSIZ - 1} bytes (IFNAMSIZ is {IFNAMSIZ})"
            )
        if rest in (".", "..") or any(c in "/:" or c.isspace() for c in rest):
            raise ValueError(f"{text!r}: {rest!r} is not a valid Linux interface name")
        return TapBackend(rest)
    if kind == "udp" and sep:
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{text!r}: expected udp:HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError as exc:
                raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from exc
        elif not _HOST_RE.match(host):
            raise ValueError(f"{text!r}: {host!r} is not a host name or IPv4 address")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port {port_text!r} is not in 1..65535")
        return UdpBackend(host, int(port_text))
    raise ValueError(f"{text!r} is not a backend (allowed: udp:HOST:PORT or tap:IFNAME)")
