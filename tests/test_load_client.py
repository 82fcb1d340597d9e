"""The kv load client against a fake kv guest on a real UDP switch (loopback sockets).

The fake guest speaks Ethernet/ARP/IPv4/UDP and the kv protocol itself, through its own UDP
socket to the switch, and misbehaves on purpose: it drops requests, goes silent for a while
(and can come back behind another switch port, as a migrated VM does), forgets acknowledged
values or returns wrong ones. The client must measure the outage, keep going, and catch every
lost or wrong value with a non-zero exit status.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptmig import load
from ptmig.net import frames, kvproto, switchproto
from ptmig.net.switch import UdpSwitch

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = "10.0.0.2"


class FakeKvGuest(threading.Thread):
    """A kv guest on the switch. Knobs are plain attributes, read on every request."""

    def __init__(self, switch_addr: tuple[str, int], *, announce_on_move: bool = False) -> None:
        super().__init__(daemon=True)
        self.switch_addr = switch_addr
        self.ip = frames.ip_aton(GUEST_IP)
        self.store: dict[bytes, bytes] = {}
        self.drop_rate = 0.0
        self.outage: tuple[float, float] | None = None  # seconds after the first request
        self.move_after_outage = False
        self.announce_on_move = announce_on_move
        self.forget_every = 0  # forget every Nth acknowledged PUT
        self.corrupt_every = 0  # answer every Nth GET of a stored key with a wrong value
        self.stale_every = 0  # acknowledge every Nth overwrite but keep the old value
        self.overwrites = 0
        self.requests = 0
        self.acked_puts = 0
        self.gets = 0
        self.moved = False
        self.stop = threading.Event()
        self.rng = random.Random(1)
        self.first_request: float | None = None
        self.sock = self._new_socket()

    def _new_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.01)
        sock.sendto(switchproto.hello(None), self.switch_addr)
        return sock

    def _in_outage(self, now: float) -> bool:
        if self.outage is None or self.first_request is None:
            return False
        return self.outage[0] <= now - self.first_request < self.outage[1]

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            if (
                self.move_after_outage
                and not self.moved
                and self.outage is not None
                and self.first_request is not None
                and now - self.first_request >= self.outage[1]
            ):
                self._move()  # the old port is dead from now on, as the source VM is
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            if len(data) < frames.ETH_HEADER_LEN:
                continue  # HELLO_ACK
            if self._in_outage(time.monotonic()):
                continue
            self.handle(data)

    def _move(self) -> None:
        """Come back behind a new switch port, as a VM resumed on another host."""
        self.sock.close()
        self.sock = self._new_socket()
        self.moved = True
        if self.announce_on_move:
            self.send(frames.gratuitous_arp_frame(GUEST_MAC, self.ip))

    def send(self, frame: bytes) -> None:
        self.sock.sendto(frame, self.switch_addr)

    def handle(self, data: bytes) -> None:
        eth = frames.parse_ethernet(data)  # strict: a bad frame from the client fails loudly
        if eth.ethertype == frames.ETH_P_ARP:
            arp = frames.parse_arp(eth.payload)
            if arp.op == frames.ARP_REQUEST and arp.tpa == self.ip:
                self.send(frames.arp_reply_frame(GUEST_MAC, self.ip, arp.sha, arp.spa))
            return
        if eth.ethertype != frames.ETH_P_IPV4 or eth.dst != GUEST_MAC:
            return
        ip = frames.parse_ipv4(eth.payload)
        if ip.proto != frames.IPPROTO_UDP or ip.dst != self.ip:
            return
        udp = frames.parse_udp(ip.payload, ip.src, ip.dst)
        if udp.dst_port != kvproto.DEFAULT_PORT:
            return
        if self.first_request is None:
            self.first_request = time.monotonic()
        self.requests += 1
        if self.drop_rate and self.rng.random() < self.drop_rate:
            return
        req = kvproto.decode_request(udp.payload)
        reply = self.execute(req)
        payload = kvproto.encode_reply(reply)
        self.send(
            frames.udp_frame(
                GUEST_MAC,
                eth.src,
                self.ip,
                ip.src,
                udp.dst_port,
                udp.src_port,
                payload,
                checksum=True,
            )
        )

    def execute(self, req: kvproto.KvRequest) -> kvproto.KvReply:
        if req.op == kvproto.Op.PUT:
            if req.key in self.store:
                self.overwrites += 1
            if not (
                self.stale_every
                and req.key in self.store
                and self.overwrites % self.stale_every == 0
            ):
                self.store[req.key] = req.value  # else: a lost update, acknowledged
            self.acked_puts += 1
            if self.forget_every and self.acked_puts % self.forget_every == 0:
                del self.store[req.key]  # acknowledged, then lost
            return kvproto.KvReply(req.req_id, kvproto.Status.OK)
        if req.op == kvproto.Op.GET:
            value = self.store.get(req.key)
            if value is None:
                return kvproto.KvReply(req.req_id, kvproto.Status.NOT_FOUND)
            self.gets += 1
            if self.corrupt_every and self.gets % self.corrupt_every == 0:
                value = value[:-1] + bytes([value[-1] ^ 1])
            return kvproto.KvReply(req.req_id, kvproto.Status.OK, value)
        return kvproto.KvReply(req.req_id, kvproto.Status.BAD_REQUEST)


@pytest.fixture
def switch() -> Iterator[UdpSwitch]:
    sw = UdpSwitch("127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=sw.serve, args=(stop,), daemon=True)
    thread.start()
    yield sw
    stop.set()
    thread.join(timeout=5)
    sw.close()


@pytest.fixture
def guest(switch: UdpSwitch) -> Iterator[FakeKvGuest]:
    g = FakeKvGuest(switch.address)
    g.start()
    yield g
    g.stop.set()
    g.join(timeout=5)
    g.sock.close()


def options(switch: UdpSwitch, tmp_path: Path, **kw: object) -> load.LoadOptions:
    host, port = switch.address
    base: dict[str, object] = dict(
        switch=f"udp:{host}:{port}",
        guest_ip=f"{GUEST_IP}/24",
        duration_s=1.0,
        rate=2000.0,
        rto_s=0.05,
        verify_stall_s=5.0,
        ready_timeout_s=5.0,
        json_path=tmp_path / "load.json",
    )
    base.update(kw)
    return load.LoadOptions(**base)  # type: ignore[arg-type]


def test_clean_run_verifies_every_acknowledged_put(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    result = load.run_load(options(switch, tmp_path))
    assert result.exit_status == 0, load.summary(result)
    assert result.acked > 1000
    assert result.verified == result.keys_written == result.acked  # no key written twice
    assert result.lost == result.wrong == result.unverified == 0
    assert result.acked == len(guest.store)
    assert 1500 <= result.ops_per_s <= 2500  # paced to --rate 2000
    data = json.loads((tmp_path / "load.json").read_text())
    for key in (
        "ops",
        "ops_per_s",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "max_gap_ms",
        "timeouts",
        "acked",
        "lost",
        "wrong",
        "series",
    ):
        assert key in data
    assert data["acked"] == result.acked
    assert sum(n for _, n in data["series"]) == data["ops"]
    assert data["series"][3][0] == pytest.approx(0.3)


def test_drops_are_retransmitted_and_puts_stay_idempotent(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    guest.drop_rate = 0.2
    result = load.run_load(options(switch, tmp_path, rate=1000.0))
    assert result.exit_status == 0, load.summary(result)
    assert result.timeouts > 0 and result.retransmits > 0
    assert result.verified == result.acked > 500


def test_bounded_key_space_is_cycled_and_the_latest_values_verified(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    guest.drop_rate = 0.05  # retransmitted PUTs must never overwrite a newer value
    result = load.run_load(options(switch, tmp_path, keys=200, window=32, read_ratio=0.2))
    assert result.exit_status == 0, load.summary(result)
    assert len(guest.store) == result.keys_written == result.verified == 200
    assert result.acked > 5 * 200  # every key was overwritten several times
    assert result.retransmits > 0


def test_a_stale_value_after_an_overwrite_is_wrong(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    guest.stale_every = 7  # acknowledged overwrites that never happened
    result = load.run_load(options(switch, tmp_path, keys=200, window=32))
    assert result.wrong > 0 and result.lost == 0
    assert result.exit_status == load.EXIT_LOST_OR_WRONG
    assert any(p.startswith("wrong: ") for p in result.problems)


def test_key_space_must_exceed_the_window(switch: UdpSwitch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key space"):
        load.run_load(options(switch, tmp_path, keys=64, window=64))


@pytest.mark.parametrize("announce", [False, True], ids=["client-re-arps", "guest-announces"])
def test_outage_is_measured_and_the_client_carries_on(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path, announce: bool
) -> None:
    guest.outage = (0.5, 2.0)  # 1.5 s of silence, then the guest comes back on another port
    guest.move_after_outage = True
    guest.announce_on_move = announce
    result = load.run_load(options(switch, tmp_path, duration_s=3.5, rate=1000.0))
    assert guest.moved
    assert result.exit_status == 0, load.summary(result)
    assert 1400 <= result.max_gap_ms <= 3500
    assert 0.3 <= result.max_gap_at_s <= 0.8
    series = dict((round(t, 1), n) for t, n in result.series)
    assert sum(series.get(round(0.1 * i, 1), 0) for i in range(8, 19)) == 0  # silent
    assert sum(series.get(round(0.1 * i, 1), 0) for i in range(28, 34)) > 300  # back
    assert result.timeouts > 0


def test_the_drain_gives_up_after_its_timeout(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    """A guest that stops answering for good (a disk that cannot commit its PUTs, say): the
    client waits `drain_timeout_s` for what is outstanding, not its 30 s default, and counts
    what it gave up on as unanswered."""
    guest.outage = (0.3, 3600.0)
    t0 = time.monotonic()
    result = load.run_load(
        options(switch, tmp_path, duration_s=0.6, drain_timeout_s=0.5, verify=False)
    )
    assert time.monotonic() - t0 < 10  # (the default drain alone is 30 s)
    assert result.acked > 0 and result.unanswered > 0, load.summary(result)


def test_lost_values_are_detected_and_exit_non_zero(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    guest.forget_every = 97
    result = load.run_load(options(switch, tmp_path))
    assert result.lost == result.acked // 97 > 0
    assert result.wrong == 0
    assert result.exit_status == load.EXIT_LOST_OR_WRONG
    assert any(p.startswith("lost: ") for p in result.problems)


def test_wrong_values_are_detected_and_exit_non_zero(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    guest.corrupt_every = 50
    result = load.run_load(options(switch, tmp_path))
    # Every wrong value is one the guest corrupted; a reply lost on a busy host is not counted.
    assert 0 < result.wrong <= guest.gets // 50
    assert result.lost == 0
    assert result.exit_status == load.EXIT_LOST_OR_WRONG


def cli_load(args: list[str]) -> int:
    """`ptmig load ARGS` in this process; its exit status."""
    from click.testing import CliRunner

    from ptmig.cli import main

    return CliRunner().invoke(main, ["load", *args]).exit_code


def test_main_exit_status_and_json(switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path) -> None:
    guest.forget_every = 10
    host, port = switch.address
    out = tmp_path / "r.json"
    status = cli_load(
        [
            "--switch",
            f"udp:{host}:{port}",
            "--guest-ip",
            GUEST_IP,
            "--duration",
            "0.5",
            "--rate",
            "500",
            "--json",
            str(out),
        ]
    )
    assert status == load.EXIT_LOST_OR_WRONG
    assert json.loads(out.read_text())["lost"] > 0


def test_json_to_stdout_with_the_summary_on_stderr(switch: UdpSwitch, guest: FakeKvGuest) -> None:
    from click.testing import CliRunner

    from ptmig.cli import main

    host, port = switch.address
    r = CliRunner().invoke(
        main,
        [
            "load",
            "--switch",
            f"udp:{host}:{port}",
            "--guest-ip",
            GUEST_IP,
            "--duration",
            "0.3",
            "--rate",
            "300",
            "--json",
            "-",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # nothing but the document on stdout
    assert data["acked"] > 0 and data["exit_status"] == 0
    assert "acked PUTs" in r.stderr


def test_guest_found_from_the_vm_config(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    host, port = switch.address
    config = tmp_path / "vm.toml"
    config.write_text(f"""
[vm]
memory = "64M"
vcpus = 1

[workload]
name = "kv"

[[net]]
id = "net0"
mac = "52:54:00:12:34:56"
ip = "{GUEST_IP}/24"
backend = "udp:{host}:{port}"
""")
    out = tmp_path / "cfg.json"
    status = cli_load([str(config), "--duration", "0.3", "--rate", "300", "--json", str(out)])
    data = json.loads(out.read_text())
    assert status == 0 and data["acked"] > 0 and data["verified"] == data["keys_written"]
    assert len(guest.store) == data["acked"]


def test_unreachable_guest_is_an_error_not_a_pass(switch: UdpSwitch, tmp_path: Path) -> None:
    host, port = switch.address
    status = cli_load(
        [
            "--switch",
            f"udp:{host}:{port}",
            "--guest-ip",
            "10.0.0.9",
            "--duration",
            "0.2",
            "--ready-timeout",
            "0.5",
        ]
    )
    assert status == load.EXIT_UNPROVEN


def test_client_alone_verifies_everything_against_a_trivial_server(tmp_path: Path) -> None:
    """The client against the trivial server the bench measures it with (its speed goal,
    >= 20k ops/s, is the bench's `devices` result `load.client_alone.ops`)."""
    from ptmig.bench.devices import client_alone_run

    result = client_alone_run(1.0, tmp_path / "fast.json")
    assert result.exit_status == 0, load.summary(result)
    assert result.acked > 0 and result.lost == result.wrong == 0, load.summary(result)
    assert result.verified == result.keys_written == min(result.acked, load.DEFAULT_KEYS)
    assert json.loads((tmp_path / "fast.json").read_text())["acked"] == result.acked


def test_the_command_line_defaults_are_the_load_options_defaults() -> None:
    from dataclasses import fields

    from ptmig.cli import LOAD_DEFAULTS
    from ptmig.load import LoadOptions

    defaults = {f.name: f.default for f in fields(LoadOptions)}
    assert {k: defaults[k] for k in LOAD_DEFAULTS} == LOAD_DEFAULTS


def test_the_command_line_rejects_bad_options_with_a_clear_error() -> None:
    from click.testing import CliRunner

    from ptmig.cli import main

    r = CliRunner().invoke(main, ["load", "--rate", "5", "--max"])
    assert r.exit_code == 2 and "exclude each other" in r.output
    for reads in ("1.5", "1"):  # (a load of GETs alone has no acknowledged key to read)
        r = CliRunner().invoke(main, ["load", "--reads", reads])
        assert r.exit_code == 2 and "--reads" in r.output, r.output
    r = CliRunner().invoke(main, ["load", "--drain-timeout", "0"])
    assert r.exit_code == 2 and "--drain-timeout" in r.output, r.output


def start_demo_load(switch: UdpSwitch, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """`python -m ptmig.demo.loadproc` against the fake guest, at most 60 s, 1000 ops/s."""
    host, port = switch.address
    config = tmp_path / "vm.toml"
    config.write_text(
        f'[vm]\nmemory = "64M"\nvcpus = 1\n\n[workload]\nname = "kv"\n\n'
        f'[[net]]\nid = "net0"\nmac = "52:54:00:12:34:56"\nip = "{GUEST_IP}/24"\n'
        f'backend = "udp:{host}:{port}"\n'
    )
    out = tmp_path / "load.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ptmig.demo.loadproc",
            str(config),
            "60",
            str(out),
            "--rate",
            "1000",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, out


def test_the_demo_load_process_runs_until_told_and_records_its_gaps(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    """`ptmig.demo.loadproc` loads until a `stop-at` line says when (not its 60 s limit), keeps
    the gap of an outage with its start, and records every request's completion and latency."""
    import numpy as np

    from ptmig.demo.plan import latency_path

    proc, out = start_demo_load(switch, tmp_path)
    assert proc.stdin is not None and proc.stdout is not None
    start = proc.stdout.readline().split()
    assert start[0] == "start", start
    t0 = float(start[1])
    guest.outage = (0.5, 0.9)  # 400 ms of silence, 0.5 s after the guest's first request
    proc.stdin.write(f"stop-at {t0 + 1.5}\n")
    proc.stdin.flush()
    proc.stdout.read()
    assert proc.wait(timeout=30) == 0
    doc = json.loads(out.read_text())
    assert doc["t0"] == pytest.approx(t0, abs=1e-3)
    assert 1.4 <= doc["result"]["duration_s"] < 30  # stopped when told, not at 60 s
    longest = max(doc["gaps"], key=lambda g: g[1])
    assert longest[1] >= 300 and 0.0 < longest[0] < 1.0
    assert all(length >= 2.0 for _, length in doc["gaps"])
    rows = np.load(latency_path(out))
    assert rows.shape == (doc["result"]["ops"], 2)
    assert (rows[:, 0] <= doc["result"]["duration_s"]).all() and (rows[:, 1] >= 0).all()


def test_the_demo_load_process_stops_when_the_demo_goes_away(
    switch: UdpSwitch, guest: FakeKvGuest, tmp_path: Path
) -> None:
    from ptmig.demo.loadproc import parse_control

    assert parse_control("stop-at 12.5\n") == 12.5
    assert parse_control("stop-at nan") is None and parse_control("stop-at x") is None
    assert parse_control("go 1") is None
    proc, out = start_demo_load(switch, tmp_path)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().startswith("start ")
    while not (line := proc.stdout.readline()).startswith("progress") or line.endswith(" 0\n"):
        assert line, "the load process ended on its own"
    proc.stdin.close()  # end of stdin: stop now, then drain and verify as usual
    proc.stdout.read()
    assert proc.wait(timeout=30) == 0
    assert json.loads(out.read_text())["result"]["duration_s"] < 30
