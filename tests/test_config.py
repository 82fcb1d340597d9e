"""VM config: the shipped examples load, every rule rejects what it should with a message that
names the file, the key path and the bad value, and the derived views (guest command line,
device slots, compat fingerprint) are what the VMM and the migration expect."""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptmig.config import (
    ConfigError,
    DiskConfig,
    NetConfig,
    TapBackend,
    UdpBackend,
    VmConfig,
    fingerprint_mismatches,
    load_config,
    parse_backend,
    parse_config,
    parse_size,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ----------------------------------------------------------------------------- helpers


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(v)  # str and int: JSON spelling is valid TOML here


def to_toml(doc: dict[str, Any]) -> str:
    """A tiny TOML writer for the shapes a VM config uses."""
    lines: list[str] = []
    for name, section in doc.items():
        if isinstance(section, list):
            for table in section:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {_value(v)}" for k, v in table.items()]
        elif isinstance(section, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {_value(v)}" for k, v in section.items()]
        else:
            lines.append(f"{name} = {_value(section)}")
    return "\n".join(lines) + "\n"


BASE: dict[str, Any] = {
    "vm": {"name": "kv", "memory": "256M", "vcpus": 2},
    "workload": {"name": "kv", "args": {"port": 7000}},
    "net": [
        {
            "id": "net0",
            "mac": "52:54:00:12:34:56",
            "ip": "10.0.0.2/24",
            "backend": "udp:127.0.0.1:7800",
            "switch": "auto",
        }
    ],
    "disk": [{"id": "disk0", "path": "run/kv.img", "size": "64M", "serial": "ptmig-disk0"}],
}


def parse(doc: dict[str, Any], base_dir: Path = Path("/base")) -> VmConfig:
    return parse_config(to_toml(doc), source="test.toml", base_dir=base_dir)


def edited(edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    edit(doc)
    return doc


def rejects(edit: Callable[[dict[str, Any]], object], key: str, *fragments: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(edited(edit))
    err = info.value
    assert err.source == "test.toml"
    assert err.key == key, str(err)
    text = str(err)
    assert text.startswith(f"test.toml: {key}: ") if key else text.startswith("test.toml: ")
    for fragment in fragments:
        assert fragment in text, text


def setter(path: str, value: Any) -> Callable[[dict[str, Any]], object]:
    """setter("net.0.mac", v) sets doc["net"][0]["mac"] = v."""

    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[last] = value

    return edit


def deleter(path: str) -> Callable[[dict[str, Any]], object]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        del node[last]

    return edit


# ----------------------------------------------------------------------------- examples


@pytest.mark.parametrize("name", ["hello", "dirty", "kv", "kv-tap"])
def test_every_example_loads(name: str) -> None:
    config = load_config(EXAMPLES / f"{name}.toml")
    assert config.name == name
    assert config.source.endswith(f"{name}.toml")


def test_example_hello() -> None:
    config = load_config(EXAMPLES / "hello.toml")
    assert (config.memory_bytes, config.vcpus) == (64 << 20, 1)
    assert config.guest_cmdline() == "hello"
    assert config.devices == ()


def test_example_dirty() -> None:
    config = load_config(EXAMPLES / "dirty.toml")
    assert (config.memory_bytes, config.vcpus) == (256 << 20, 2)
    assert config.guest_cmdline() == "dirty ws=64M"


def test_example_kv() -> None:
    config = load_config(EXAMPLES / "kv.toml")
    assert (config.memory_bytes, config.vcpus) == (256 << 20, 1)
    assert config.guest_cmdline() == "kv ip=10.0.0.2 mask=24 port=7000"
    (net,) = config.net
    assert net.backend == UdpBackend("127.0.0.1", 7800)
    assert net.switch == "auto"
    assert net.ip == ipaddress.IPv4Interface("10.0.0.2/24")
    (disk,) = config.disk
    # relative to the examples/ directory, normalised
    assert disk.path == EXAMPLES.parent / "run" / "kv.img"
    assert (disk.size, disk.serial) == (64 << 20, "ptmig-disk0")


def test_example_kv_tap_differs_from_kv_only_in_backend() -> None:
    kv, tap = load_config(EXAMPLES / "kv.toml"), load_config(EXAMPLES / "kv-tap.toml")
    assert tap.net[0].backend == TapBackend("ptmig0")
    assert tap.net[0].switch == "none"
    assert tap.guest_cmdline() == kv.guest_cmdline()
    assert tap.compat_fingerprint() == kv.compat_fingerprint()


# ----------------------------------------------------------------------------- derived views


def test_devices_are_net_then_disk_with_mmio_windows() -> None:
    doc = edited(
        lambda d: (
            d["disk"].append({"id": "disk1", "path": "b.img", "size": 4096}),
            d["net"].append(
                {"id": "net1", "mac": "52:54:00:00:00:02", "ip": "10.0.1.2/24", "backend": "tap:t1"}
            ),
        )
    )
    config = parse(doc)
    slots = config.devices
    assert [(s.index, s.kind, s.id) for s in slots] == [
        (0, "net", "net0"),
        (1, "net", "net1"),
        (2, "disk", "disk0"),
        (3, "disk", "disk1"),
    ]
    assert [s.mmio_base for s in slots] == [0xD0000000, 0xD0001000, 0xD0002000, 0xD0003000]
    assert isinstance(slots[0].config, NetConfig) and isinstance(slots[3].config, DiskConfig)


def test_compat_fingerprint_contents() -> None:
    fp = parse(BASE).compat_fingerprint()
    assert fp == {
        "memory": 256 << 20,
        "vcpus": 2,
        "devices": [
            {"index": 0, "kind": "net", "id": "net0", "mac": "52:54:00:12:34:56"},
            {"index": 1, "kind": "disk", "id": "disk0", "size": 64 << 20},
        ],
    }
    json.dumps(fp)  # it crosses the wire in the migration handshake


def test_fingerprint_ignores_what_may_differ_between_hosts() -> None:
    # Backend, switch policy, disk path, the VM name and the workload are per-host choices.
    other = edited(
        lambda d: (
            d["vm"].update(name="other"),
            d["net"][0].update(backend="tap:ptmig1"),
            d["net"][0].pop("switch"),
            d["disk"][0].update(path="/elsewhere/kv.img"),
        )
    )
    assert (
        fingerprint_mismatches(parse(BASE).compat_fingerprint(), parse(other).compat_fingerprint())
        == []
    )


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (setter("vm.memory", "128M"), "memory"),
        (setter("vm.vcpus", 1), "vcpus"),
        (setter("net.0.mac", "52:54:00:12:34:57"), "devices[0]"),
        (setter("disk.0.size", "32M"), "devices[1]"),
        (deleter("disk"), "devices: source has 2, destination has 1"),
    ],
)
def test_fingerprint_mismatches_name_the_difference(
    edit: Callable[[dict[str, Any]], object], fragment: str
) -> None:
    problems = fingerprint_mismatches(
        parse(BASE).compat_fingerprint(), parse(edited(edit)).compat_fingerprint()
    )
    assert len(problems) == 1 and fragment in problems[0], problems


def test_cmdline_ip_and_mask_given_explicitly_when_they_agree() -> None:
    doc = edited(setter("workload.args", {"ip": "10.0.0.2", "mask": 24, "port": 7000}))
    assert parse(doc).guest_cmdline() == "kv ip=10.0.0.2 mask=24 port=7000"


def test_cmdline_booleans_and_order() -> None:
    doc = edited(setter("workload.args", {"verify": True, "ws": "8M", "quiet": False}))
    assert parse(doc).guest_cmdline() == "kv ip=10.0.0.2 mask=24 verify=1 ws=8M quiet=0"


def test_cmdline_at_the_limit_is_accepted_and_one_past_is_rejected() -> None:
    prefix = len("kv ip=10.0.0.2 mask=24 pad=")
    ok = edited(setter("workload.args", {"pad": "x" * (1023 - prefix)}))
    assert len(parse(ok).guest_cmdline()) == 1023
    rejects(
        setter("workload.args", {"pad": "x" * (1024 - prefix)}),
        "workload.args",
        "1024 bytes",
        "at most 1023",
    )


def test_name_defaults_to_file_name(tmp_path: Path) -> None:
    doc = edited(lambda d: d["vm"].pop("name"))
    path = tmp_path / "my-vm.toml"
    path.write_text(to_toml(doc))
    assert load_config(path).name == "my-vm"
    assert parse_config(to_toml(doc)).name == "vm"


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    doc = edited(
        lambda d: (
            d["disk"][0].update(path="../images/a.img"),
            d.update(
                migration={
                    "tls_cert": "c.pem",
                    "tls_key": "k.pem",
                    "tls_ca": "/etc/ca.pem",
                    "psk_file": "psk",
                }
            ),
        )
    )
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "vm.toml"
    path.write_text(to_toml(doc))
    config = load_config(path)
    assert config.disk[0].path == tmp_path / "images" / "a.img"
    m = config.migration
    assert (m.tls_cert, m.tls_key, m.tls_ca, m.psk_file) == (
        tmp_path / "conf" / "c.pem",
        tmp_path / "conf" / "k.pem",
        Path("/etc/ca.pem"),
        tmp_path / "conf" / "psk",
    )
    assert m.tls


def test_minimal_config_defaults() -> None:
    config = parse_config('[vm]\nmemory = 16777216\nvcpus = 1\n[workload]\nname = "hello"\n')
    assert config.memory_bytes == 16 << 20
    assert config.net == () and config.disk == ()
    assert not config.migration.tls and config.migration.psk_file is None


def test_defaults_for_optional_device_keys() -> None:
    doc = edited(lambda d: (d["net"][0].pop("switch"), d["disk"][0].pop("serial")))
    config = parse(doc)
    assert config.net[0].switch == "auto"
    assert config.disk[0].serial == "ptmig-disk0"


def test_mac_is_normalised_to_lower_case() -> None:
    config = parse(edited(setter("net.0.mac", "52:54:00:AB:CD:EF")))
    assert config.net[0].mac == "52:54:00:ab:cd:ef"
    assert config.net[0].mac_bytes == bytes([0x52, 0x54, 0x00, 0xAB, 0xCD, 0xEF])


def test_config_objects_are_frozen() -> None:
    config = parse(BASE)
    with pytest.raises(AttributeError):
        config.vcpus = 4  # type: ignore[misc]


# ----------------------------------------------------------------------------- error paths


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config(tmp_path / "missing.toml")
    assert str(tmp_path / "missing.toml") in str(info.value)


def test_toml_syntax_error() -> None:
    with pytest.raises(ConfigError, match=r"^x\.toml: TOML syntax error"):
        parse_config("[vm\nmemory = 1", source="x.toml")


ERROR_CASES: list[tuple[str, Callable[[dict[str, Any]], object], str, tuple[str, ...]]] = [
    # unknown keys, with a suggestion for typos
    ("top-level", setter("vmm", {}), "vmm", ("unknown key", "allowed here")),
    ("vm typo", setter("vm.memroy", "1G"), "vm.memroy", ("unknown key", "did you mean 'memory'")),
    ("net typo", setter("net.0.backnd", "x"), "net[0].backnd", ("did you mean 'backend'",)),
    ("disk unknown", setter("disk.0.readonly", True), "disk[0].readonly", ("unknown key",)),
    ("workload unknown", setter("workload.cmd", "x"), "workload.cmd", ("unknown key",)),
    ("migration unknown", setter("migration", {"tls": "x"}), "migration.tls", ("unknown key",)),
    # sections
    ("no vm", deleter("vm"), "vm", ("missing required section [vm]",)),
    ("vm not table", setter("vm", 3), "vm", ("must be a table",)),
    ("no workload", deleter("workload"), "workload", ("missing required section",)),
    ("net not array", setter("net", {"id": "x"}), "net", ("array of tables",)),
    # vm
    ("memory missing", deleter("vm.memory"), "vm.memory", ("missing required key",)),
    ("memory small", setter("vm.memory", "8M"), "vm.memory", ("8388608", "16M..255G")),
    ("memory big", setter("vm.memory", "256G"), "vm.memory", ("274877906944", "16M..255G")),
    ("memory align", setter("vm.memory", "17M"), "vm.memory", ("multiples of 2M",)),
    ("memory unit", setter("vm.memory", "256MB"), "vm.memory", ("'256MB'", "K, M, G")),
    ("memory bool", setter("vm.memory", True), "vm.memory", ("True", "not a size")),
    ("memory negative", setter("vm.memory", -2), "vm.memory", ("negative",)),
    ("vcpus zero", setter("vm.vcpus", 0), "vm.vcpus", ("out of range", "1..16")),
    ("vcpus 17", setter("vm.vcpus", 17), "vm.vcpus", ("17", "1..16")),
    ("vcpus str", setter("vm.vcpus", "2"), "vm.vcpus", ("must be an integer", "'2'")),
    ("vcpus bool", setter("vm.vcpus", True), "vm.vcpus", ("must be an integer",)),
    ("vcpus missing", deleter("vm.vcpus"), "vm.vcpus", ("missing required key",)),
    ("name bad", setter("vm.name", "my vm"), "vm.name", ("'my vm'", "not a valid name")),
    ("name type", setter("vm.name", 5), "vm.name", ("must be a string",)),
    # workload
    (
        "workload name",
        setter("workload.name", "linux"),
        "workload.name",
        ("'linux'", "hello, dirty, storebw, kv"),
    ),
    ("workload no name", deleter("workload.name"), "workload.name", ("missing",)),
    ("args not table", setter("workload.args", "port=1"), "workload.args", ("table",)),
    ("arg key", setter("workload.args", {"Port": 1}), "workload.args.Port", ("argument names",)),
    (
        "arg space",
        setter("workload.args", {"msg": "a b"}),
        "workload.args.msg",
        ("'a b'", "without spaces"),
    ),
    ("arg equals", setter("workload.args", {"msg": "a=b"}), "workload.args.msg", ("'='",)),
    ("arg empty", setter("workload.args", {"msg": ""}), "workload.args.msg", ("non-empty",)),
    (
        "arg non-ascii",
        setter("workload.args", {"msg": "é"}),
        "workload.args.msg",
        ("printable ASCII",),
    ),
    (
        "arg list",
        setter("workload.args", {"l": [1, 2]}),
        "workload.args.l",
        ("string, integer or boolean",),
    ),
    (
        "arg ip disagrees",
        setter("workload.args", {"ip": "10.0.0.3"}),
        "workload.args.ip",
        ("'10.0.0.3'", "net[0].ip = 10.0.0.2/24"),
    ),
    (
        "arg mask disagrees",
        setter("workload.args", {"mask": 16}),
        "workload.args.mask",
        ("16", "expected '24'"),
    ),
    # net
    ("net id missing", deleter("net.0.id"), "net[0].id", ("missing required key",)),
    ("net id bad", setter("net.0.id", "0net"), "net[0].id", ("'0net'", "not a valid id")),
    (
        "mac format",
        setter("net.0.mac", "52-54-00-12-34-56"),
        "net[0].mac",
        ("'52-54-00-12-34-56'", "like 52:54:00:12:34:56"),
    ),
    ("mac short", setter("net.0.mac", "52:54:00:12:34"), "net[0].mac", ("not a MAC",)),
    ("mac multicast", setter("net.0.mac", "01:00:5e:00:00:01"), "net[0].mac", ("multicast",)),
    ("mac broadcast", setter("net.0.mac", "ff:ff:ff:ff:ff:ff"), "net[0].mac", ("multicast",)),
    ("mac zero", setter("net.0.mac", "00:00:00:00:00:00"), "net[0].mac", ("all zero",)),
    ("ip no prefix", setter("net.0.ip", "10.0.0.2"), "net[0].ip", ("needs a prefix",)),
    ("ip bad", setter("net.0.ip", "10.0.0.300/24"), "net[0].ip", ("'10.0.0.300/24'",)),
    ("ip v6", setter("net.0.ip", "fd00::2/64"), "net[0].ip", ("not an IPv4",)),
    ("ip network", setter("net.0.ip", "10.0.0.0/24"), "net[0].ip", ("network or broadcast",)),
    ("ip broadcast", setter("net.0.ip", "10.0.0.255/24"), "net[0].ip", ("broadcast",)),
    (
        "backend kind",
        setter("net.0.backend", "vde:x"),
        "net[0].backend",
        ("'vde:x'", "udp:HOST:PORT or tap:IFNAME"),
    ),
    (
        "backend no port",
        setter("net.0.backend", "udp:127.0.0.1"),
        "net[0].backend",
        ("expected udp:HOST:PORT",),
    ),
    (
        "backend port 0",
        setter("net.0.backend", "udp:127.0.0.1:0"),
        "net[0].backend",
        ("port '0'", "1..65535"),
    ),
    ("backend port big", setter("net.0.backend", "udp:h:65536"), "net[0].backend", ("65536",)),
    ("backend host", setter("net.0.backend", "udp:a_b:1"), "net[0].backend", ("'a_b'",)),
    ("backend v6", setter("net.0.backend", "udp:[zz::1]:1"), "net[0].backend", ("not an IPv6",)),
    (
        "tap long",
        setter("net.0.backend", "tap:" + "x" * 16),
        "net[0].backend",
        ("1..15 bytes", "IFNAMSIZ"),
    ),
    ("tap empty", setter("net.0.backend", "tap:"), "net[0].backend", ("1..15 bytes",)),
    (
        "tap slash",
        setter("net.0.backend", "tap:a/b"),
        "net[0].backend",
        ("not a valid Linux interface name",),
    ),
    ("tap dots", setter("net.0.backend", "tap:.."), "net[0].backend", ("not a valid",)),
    ("switch value", setter("net.0.switch", "on"), "net[0].switch", ("'on'", "auto, none")),
    (
        "switch on tap",
        lambda d: d["net"][0].update(backend="tap:t0", switch="auto"),
        "net[0].switch",
        ("only meaningful with a udp: backend",),
    ),
    # disk
    ("disk path missing", deleter("disk.0.path"), "disk[0].path", ("missing",)),
    ("disk path empty", setter("disk.0.path", ""), "disk[0].path", ("must not be empty",)),
    ("disk size missing", deleter("disk.0.size"), "disk[0].size", ("missing",)),
    (
        "disk size align",
        setter("disk.0.size", 1000),
        "disk[0].size",
        ("1000 bytes", "multiples of 512"),
    ),
    ("disk size zero", setter("disk.0.size", 0), "disk[0].size", ("512..1T",)),
    ("serial long", setter("disk.0.serial", "s" * 21), "disk[0].serial", ("at most 20 bytes",)),
    ("serial control", setter("disk.0.serial", "a\tb"), "disk[0].serial", ("printable ASCII",)),
    # across devices
    ("dup id", setter("disk.0.id", "net0"), "disk[0].id", ("'net0'", "already used by net[0]")),
    (
        "dup mac",
        lambda d: d["net"].append(dict(d["net"][0], id="net1")),
        "net[1].mac",
        ("already used by net[0]",),
    ),
    (
        "dup path",
        lambda d: d["disk"].append(dict(d["disk"][0], id="disk1")),
        "disk[1].path",
        ("already used by disk[0]",),
    ),
    (
        "too many",
        lambda d: d["disk"].extend(
            {"id": f"d{i}", "path": f"{i}.img", "size": 512} for i in range(8)
        ),
        "net",
        ("1 net + 9 disk", "limit of 8"),
    ),
    # migration
    (
        "tls partial",
        setter("migration", {"tls_cert": "c", "tls_key": "k"}),
        "migration.tls_ca",
        ("go together", "tls_ca missing"),
    ),
    (
        "tls empty",
        setter("migration", {"psk_file": ""}),
        "migration.psk_file",
        ("must not be empty",),
    ),
    ("tls type", setter("migration", {"psk_file": 3}), "migration.psk_file", ("must be a string",)),
]


@pytest.mark.parametrize(
    "edit, key, fragments", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_rejected(
    edit: Callable[[dict[str, Any]], object], key: str, fragments: tuple[str, ...]
) -> None:
    rejects(edit, key, *fragments)


def test_base_document_is_valid() -> None:
    # Every error case above is BASE with one thing broken; BASE itself must pass.
    config = parse(BASE)
    assert config.name == "kv" and len(config.devices) == 2


def test_eight_devices_are_allowed() -> None:
    doc = edited(
        lambda d: d["disk"].extend(
            {"id": f"d{i}", "path": f"{i}.img", "size": 512} for i in range(6)
        )
    )
    assert len(parse(doc).devices) == 8


# ----------------------------------------------------------------------------- value parsers


@pytest.mark.parametrize(
    "text, size",
    [(4096, 4096), ("4096", 4096), ("64K", 64 << 10), ("256m", 256 << 20), (" 3G ", 3 << 30)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5G", "1T", "-1M", "0x10", None, 1.0])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["", "K", "M", "G"]))
def test_size_roundtrip(n: int, unit: str) -> None:
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    assert parse_size(f"{n}{unit}") == n * scale


@pytest.mark.parametrize(
    "text, backend",
    [
        ("udp:127.0.0.1:7800", UdpBackend("127.0.0.1", 7800)),
        ("udp:switch.local:1", UdpBackend("switch.local", 1)),
        ("udp:[::1]:65535", UdpBackend("::1", 65535)),
        ("tap:ptmig0", TapBackend("ptmig0")),
        ("tap:" + "x" * 15, TapBackend("x" * 15)),
    ],
)
def test_backends_parse_and_print_back(text: str, backend: object) -> None:
    assert parse_backend(text) == backend
    assert str(backend) == text
