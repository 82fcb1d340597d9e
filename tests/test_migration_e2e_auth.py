"""Authenticated by default, on real KVM: a VMM started without credentials refuses to listen
for (or to send) a migration over TCP, loopback included, with a message that says what to do;
a unix: socket in a private directory needs no key, one in a shared directory is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmmrig import Vmm, dirty_config, free_port, iterations_increase

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]


def test_an_incoming_listener_without_credentials_is_refused_at_start(tmp_path: Path) -> None:
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    dst = Vmm(tmp_path, "dst", cfg, incoming=f"tcp:127.0.0.1:{free_port()}", keyless=True)
    try:
        assert dst.proc.wait(timeout=60) != 0
        out = dst.output()
        assert "without authentication" in out and "--insecure" in out, out
        assert "Traceback" not in out, out
    finally:
        dst.stop()


def test_a_source_without_credentials_refuses_to_send(tmp_path: Path) -> None:
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    src = Vmm(tmp_path, "src", cfg, keyless=True)
    try:
        src.wait_running()
        src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{free_port()}"})
        info = src.wait_migration()
        assert info["status"] == "failed" and "without authentication" in info["error-desc"]
        assert src.status() == "running" and iterations_increase(src)
    finally:
        src.stop()


def test_a_unix_socket_in_a_private_directory_migrates_without_a_key(tmp_path: Path) -> None:
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    private = tmp_path / "mig"
    private.mkdir(mode=0o700)
    uri = f"unix:{private}/sock"
    src = Vmm(tmp_path, "src", cfg, keyless=True)
    dst = Vmm(tmp_path, "dst", cfg, incoming=uri, keyless=True)
    try:
        dst.wait_incoming()
        src.wait_running()
        src.cmd("migrate", {"uri": uri})
        info = src.wait_migration()
        assert info["status"] == "completed", info
        assert iterations_increase(dst)
    finally:
        src.stop()
        dst.stop()


def test_a_unix_socket_in_a_shared_directory_is_refused(tmp_path: Path) -> None:
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    dst = Vmm(tmp_path, "dst", cfg, incoming=f"unix:{shared}/sock", keyless=True)
    try:
        assert dst.proc.wait(timeout=60) != 0
        out = dst.output()
        assert "only its owner" in out and "chmod 700" in out, out
    finally:
        dst.stop()
