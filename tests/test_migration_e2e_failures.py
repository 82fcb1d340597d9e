"""Live migration that fails, on real KVM: the source must keep the guest, intact.

A migration is slowed down with `max-bandwidth` so that it is surely in flight when the test
kills the destination, cuts the TCP link (through a proxy the test owns) or cancels it. In every
case the source guest runs again, its counters keep increasing and (kv) no acknowledged value is
lost. A hostile or broken stream makes the destination exit with a clear message, never a
traceback; a wrong pre-shared key is refused on both sides.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from vmmrig import (
    Load,
    TamperProxy,
    TcpProxy,
    Vmm,
    assert_still_waiting,
    dirty_config,
    free_port,
    iterations_increase,
    kv_migration,
    migration_pair,
)

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

SLOW = 16 << 20  # bytes/s: a 128 MiB guest with a 48 MiB working set takes ~3 s


def _wait_status(vmm: Vmm, wanted: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = vmm.cmd("query-migrate")
        if info["status"] == wanted:
            return info
        assert time.monotonic() < deadline, f"migration never reached {wanted!r}: {info}"
        time.sleep(0.02)


def _wait_transferred(vmm: Vmm, nbytes: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = vmm.cmd("query-migrate")
        assert info["status"] in ("setup", "active"), info
        if info["ram"]["transferred"] >= nbytes:
            return
        assert time.monotonic() < deadline, f"migration stalled: {info}"
        time.sleep(0.02)


def _assert_source_recovered(src: Vmm, info: dict, status: str) -> None:
    assert info["status"] == status, info
    assert src.status() == "running"
    assert iterations_increase(src)
    assert "downtime" not in info


def test_killing_the_destination_mid_migration_leaves_the_source_running(tmp_path: Path) -> None:
    cfg = dirty_config(tmp_path, ws="48M")
    with migration_pair(tmp_path, cfg) as (src, dst, port):
        src.migrate(port, max_bandwidth=SLOW)
        _wait_transferred(src, 8 << 20)
        dst.proc.kill()
        info = src.wait_migration()
        _assert_source_recovered(src, info, "failed")
        assert info["error-desc"]


def test_migrate_cancel_resumes_the_source_and_allows_a_new_migration(tmp_path: Path) -> None:
    cfg = dirty_config(tmp_path, ws="48M")
    with migration_pair(tmp_path, cfg) as (src, dst, port):
        src.migrate(port, max_bandwidth=SLOW)
        _wait_transferred(src, 4 << 20)
        src.cmd("migrate_cancel")
        info = src.wait_migration()
        _assert_source_recovered(src, info, "cancelled")
        # The destination saw the stream end early, refused the attempt, and waits on.
        assert_still_waiting(dst, "from 127.0.0.1")
        dst.stop()
        # A second destination takes the guest: the first attempt left nothing behind.
        port2 = free_port()
        dst2 = Vmm(tmp_path, "dst2", cfg, incoming_port=port2)
        try:
            dst2.wait_incoming()
            src.migrate(port2)
            info = src.wait_migration()
            assert info["status"] == "completed", info
            assert info["x-verify"]["mismatched"] == 0
            assert iterations_increase(dst2)
        finally:
            dst2.stop()


def test_cut_link_under_kv_load_loses_no_acknowledged_value(tmp_path: Path) -> None:
    with kv_migration(tmp_path) as (cfg, src, dst, port):
        proxy = TcpProxy(port, cut_after=128 << 10)  # in round 0: the guest has more
        load = Load(cfg, 5.0, tmp_path / "load.json").start()
        time.sleep(1.0)
        src.migrate(proxy.port, tracking="device-log", max_bandwidth=1 << 20)
        info = src.wait_migration()
        assert proxy.cut_done.is_set()
        assert info["status"] == "failed", info
        assert src.status() == "running"
        result = load.result()
        assert result["lost"] == 0 and result["wrong"] == 0, result["output"]
        assert result["acked"] > 0 and result["unverified"] == 0, result["output"]
        # Acknowledged after the failure too: the guest's devices were given back.
        assert result["series"][-1][1] > 0, result["series"]
        assert_still_waiting(dst, "from 127.0.0.1", timeout=40)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4, id="garbage"),
        pytest.param(b"", id="silent"),
    ],
)
def test_a_peer_without_the_key_is_refused_and_the_destination_waits_on(
    tmp_path: Path, garbage: bytes
) -> None:
    """A local process without credentials can neither feed a waiting destination (garbage,
    silence: refused, logged, reported) nor keep it from taking the real migration after."""
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    port = free_port()
    src = Vmm(tmp_path, "src", cfg)
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
    try:
        dst.wait_incoming()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(garbage)
            assert_still_waiting(dst, "PSK" if garbage else "timed out")
        src.wait_running()
        src.migrate(port)
        assert src.wait_migration()["status"] == "completed"
        assert iterations_increase(dst)
    finally:
        src.stop()
        dst.stop()


def test_a_source_cannot_be_made_to_send_ram_to_a_listener_without_the_key(tmp_path: Path) -> None:
    """A local process that took the port first receives the handshake, not guest RAM: the
    source refuses to go on, and its guest keeps running."""
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    src = Vmm(tmp_path, "src", cfg)
    thief = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def steal() -> None:
        conn, _ = thief.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(b"PTMIG-PSK2" + b"\x00" * 32)  # a challenge
            while len(got) < 65 and (chunk := conn.recv(1 << 16)):
                got.extend(chunk)
            conn.sendall(b"\x01" + os.urandom(32))  # "accepted", with a proof it cannot make
            try:
                while chunk := conn.recv(1 << 16):
                    got.extend(chunk)
            except OSError:
                pass

    t = threading.Thread(target=steal, daemon=True)
    t.start()
    try:
        src.wait_running()
        src.migrate(thief.getsockname()[1])
        info = src.wait_migration()
        assert info["status"] == "failed", info
        assert "server's proof does not match our key" in info["error-desc"], info
        t.join(15)
        assert len(got) <= 1 + 32 + 32 + 1, bytes(got)  # kind, nonce, proof, verdict: no RAM
        assert src.status() == "running" and iterations_increase(src)
    finally:
        thief.close()
        src.stop()


def test_wrong_pre_shared_key_is_refused_on_both_sides(tmp_path: Path) -> None:
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    key_src, key_dst = tmp_path / "src.key", tmp_path / "dst.key"
    key_src.write_text("a" * 32 + "\n")
    key_dst.write_text("b" * 32 + "\n")
    port = free_port()
    src = Vmm(tmp_path, "src", cfg, psk_file=key_src)
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port, psk_file=key_dst)
    try:
        dst.wait_incoming()
        src.wait_running()
        src.migrate(port)
        info = src.wait_migration()
        assert info["status"] == "failed", info
        assert "pre-shared key" in info["error-desc"], info
        assert src.status() == "running"
        assert iterations_increase(src)
        assert_still_waiting(dst, "PSK authentication failed")
    finally:
        src.stop()
        dst.stop()


@pytest.mark.parametrize(
    ("stream", "attack"),
    [
        pytest.param(1, "flip", id="flip-a-page-payload-bit"),
        pytest.param(1, "swap", id="swap-two-page-records"),
        pytest.param(1, "replay", id="replay-a-page-record"),
        pytest.param(0, "replay", id="replay-on-the-main-stream"),
    ],
)
def test_an_on_path_attacker_under_psk_is_refused_and_the_source_resumes(
    tmp_path: Path, stream: int, attack: str
) -> None:
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    port = free_port()
    src = Vmm(tmp_path, "src", cfg)
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
    relay = TamperProxy(port, stream, attack, min_size=64 << 10 if stream else 1)
    try:
        dst.wait_incoming()
        src.wait_running()
        src.migrate(relay.port)
        info = src.wait_migration()
        assert relay.tampered.is_set()
        assert info["status"] == "failed", info
        assert src.status() == "running" and iterations_increase(src)
        assert_still_waiting(dst, "failed authentication")
        if attack == "flip":  # the same destination then takes an untouched migration
            src.migrate(port)
            assert src.wait_migration()["status"] == "completed"
            assert iterations_increase(dst)
    finally:
        relay.cut()
        src.stop()
        dst.stop()


def test_incoming_timeout_ends_a_destination_no_valid_source_reached(tmp_path: Path) -> None:
    """`ptmig run --incoming-timeout`: a refused attempt does not extend the wait; once the
    time is up the destination exits 125, saying why, without a traceback."""
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    port = free_port()
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port, extra=["--incoming-timeout", "10"])
    try:
        dst.wait_incoming()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"not a migration, " * 8)  # more than a handshake: refused at once
            assert_still_waiting(dst, "PSK")
        assert dst.proc.wait(timeout=60) == 125
        out = dst.output()
        assert "no valid incoming migration within 10.0 s (1 refused)" in out, out
        assert "Traceback" not in out, out
    finally:
        dst.stop()
