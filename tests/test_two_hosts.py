"""Two hosts for real: source and destination VMMs in their own network namespaces.

    ns C (client 10.0.0.100) ── veth ── ns A: br0 [192.168.50.1] ── veth ── ns B: br0 [192.168.50.2]
                                          └ tap ptmig0 (guest, source)       └ tap ptmig0 (dest)

The guest's NIC is a TAP bridged on each host, so both hosts share the guest's L2 segment, as
in a datacenter. The kv guest is migrated from A to B under load with `shadow` over a
PSK-authenticated TCP connection between the hosts' own addresses; afterwards the guest must
answer at the same IP and MAC from host B (host A's bridge now forwards its MAC towards B,
because the destination announced it) and no acknowledged value may be lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vmmrig import Monitor, free_port

pytestmark = [pytest.mark.kvm, pytest.mark.root]

MAC = "52:54:00:12:34:77"


def sh(*args: str, check: bool = True) -> str:
    out = subprocess.run(args, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


@pytest.fixture
def hosts():
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip) to build the network namespaces")
    tag = f"{os.getpid() % 10000}"
    a, b, c = f"ptA{tag}", f"ptB{tag}", f"ptC{tag}"
    try:
        for ns in (a, b, c):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"ab{tag}", "type", "veth", "peer", "name", f"ba{tag}")
        sh("ip", "link", "set", f"ab{tag}", "netns", a)
        sh("ip", "link", "set", f"ba{tag}", "netns", b)
        sh("ip", "link", "add", f"ac{tag}", "type", "veth", "peer", "name", f"ca{tag}")
        sh("ip", "link", "set", f"ac{tag}", "netns", a)
        sh("ip", "link", "set", f"ca{tag}", "netns", c)
        for ns, ports, addr in (
            (a, [f"ab{tag}", f"ac{tag}"], "192.168.50.1/24"),
            (b, [f"ba{tag}"], "192.168.50.2/24"),
        ):
            sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", ns, "link", "set", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "br0")
            sh("ip", "netns", "exec", ns, "ip", "tuntap", "add", "ptmig0", "mode", "tap")
            for port in [*ports, "ptmig0"]:
                sh("ip", "-n", ns, "link", "set", port, "master", "br0")
                sh("ip", "-n", ns, "link", "set", port, "up")
        sh("ip", "-n", c, "addr", "add", "10.0.0.100/24", "dev", f"ca{tag}")
        sh("ip", "-n", c, "link", "set", f"ca{tag}", "up")
        yield a, b, c, f"ab{tag}"
    finally:
        for ns in (a, b, c):
            sh("ip", "netns", "del", ns, check=False)


def in_ns(ns: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], **kw)


def wait_sock(path: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "QMP socket never appeared"
        time.sleep(0.05)


def wait_status(monitor: Monitor, wanted: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (status := monitor.status()) != wanted:
        assert time.monotonic() < deadline, f"{monitor.name}: still {status!r}, not {wanted!r}"
        time.sleep(0.05)


def test_migrate_between_two_hosts_under_load(hosts, tmp_path: Path) -> None:
    a, b, c, a_to_b = hosts
    cfg = tmp_path / "kv.toml"
    cfg.write_text(f"""
[vm]
memory = "128M"
vcpus = 1
[workload]
name = "kv"
[[net]]
id = "net0"
mac = "{MAC}"
ip = "10.0.0.2/24"
backend = "tap:ptmig0"
[[disk]]
id = "disk0"
path = "{tmp_path / "kv.img"}"
size = "64M"
""")
    psk = tmp_path / "psk"
    psk.write_text("a secret both hosts were given\n")
    port = free_port(kind=1)
    procs = []
    monitors: list[Monitor] = []
    try:
        src_sock, dst_sock = tmp_path / "src.qmp", tmp_path / "dst.qmp"
        src_log, dst_log = tmp_path / "src.log", tmp_path / "dst.log"
        src = in_ns(
            a,
            "-m",
            "ptmig.cli",
            "run",
            str(cfg),
            "--qmp",
            f"unix:{src_sock}",
            "--psk-file",
            str(psk),
            "--console",
            str(tmp_path / "src.console"),
            stdout=open(src_log, "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(src)
        dst = in_ns(
            b,
            "-m",
            "ptmig.cli",
            "run",
            str(cfg),
            "--qmp",
            f"unix:{dst_sock}",
            "--psk-file",
            str(psk),
            "--incoming",
            f"tcp:192.168.50.2:{port}",
            "--console",
            str(tmp_path / "dst.console"),
            stdout=open(dst_log, "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(dst)
        wait_sock(src_sock, src, src_log)
        wait_sock(dst_sock, dst, dst_log)
        source, dest = Monitor(src_sock, "src"), Monitor(dst_sock, "dst")
        monitors += [source, dest]
        wait_status(source, "running")
        wait_status(dest, "inmigrate")
        load_json = tmp_path / "load.json"
        load = in_ns(
            c,
            "-m",
            "ptmig.load",
            "--target",
            "10.0.0.2:7000",
            "--duration",
            "10",
            "--rate",
            "200",
            "--json",
            str(load_json),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(load)
        deadline = time.monotonic() + 30  # the load is being served before we migrate
        while source.cmd("x-query-guest-stats")["vcpus"][0]["workload"][0] < 200:
            assert time.monotonic() < deadline and load.poll() is None, load.poll()
            time.sleep(0.05)
        source.cmd("migrate-set-parameters", {"x-dma-tracking": "shadow"})
        source.cmd(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-verify", "state": True}]},
        )
        source.cmd("migrate", {"uri": f"tcp:192.168.50.2:{port}"})
        st = source.wait_migration(timeout=120)
        assert st["status"] == "completed", (st, dst_log.read_text()[-2000:])
        assert st["x-verify"]["mismatched"] == 0
        assert dest.status() == "running"
        source.cmd("quit")
        out, _ = load.communicate(timeout=120)
        summary = json.loads(load_json.read_text())
        assert summary["acked"] > 0 and summary["lost"] == 0 and summary["wrong"] == 0, out
        # The guest answers from host B at the same IP and MAC ...
        after = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                c,
                sys.executable,
                "-m",
                "ptmig.load",
                "--target",
                "10.0.0.2:7000",
                "--duration",
                "1",
                "--rate",
                "100",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert after.returncode == 0, after.stdout + after.stderr
        assert MAC in sh("ip", "-n", c, "neigh", "show", "10.0.0.2")
        # ... and host A's bridge now sends that MAC towards host B.
        fdb = sh("bridge", "-n", a, "fdb", "show", "br", "br0")
        line = next((ln for ln in fdb.splitlines() if ln.startswith(MAC)), "")
        assert f"dev {a_to_b}" in line, fdb
        if shutil.which("ping"):
            ping = subprocess.run(
                ["ip", "netns", "exec", c, "ping", "-c", "3", "-W", "2", "10.0.0.2"],
                capture_output=True,
                text=True,
            )
            assert ping.returncode == 0, ping.stdout
    finally:
        for m in monitors:
            m.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
