"""examples/kv-tap.toml on real KVM and real Linux networking: the host side of the TAP
interface gets 10.0.0.1/24, and the system's own `ping` reaches the guest at 10.0.0.2 (its ARP
and ICMP echo code answering the host kernel).

The host only resolves and answers ARP on a TAP interface that is up and has an address in the
guest's subnet: without the address the kernel has no route to 10.0.0.2 and never asks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmmrig import Vmm

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(120)]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kv-tap.toml"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def tap() -> Iterator[str]:
    """A TAP interface with 10.0.0.1/24 on the host side, up; deleted afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` tool (iproute2) is not installed")
    name = f"ptmigt{os.getpid() % 100000}"
    _ip("tuntap", "add", "dev", name, "mode", "tap")
    try:
        _ip("addr", "add", "10.0.0.1/24", "dev", name)
        _ip("link", "set", name, "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_real_ping_reaches_the_kv_guest_over_tap(tmp_path: Path, tap: str) -> None:
    if shutil.which("ping") is None:
        pytest.skip(
            "`ping` is not installed (iputils-ping; `make test` installs it as root "
            "when the package registry is reachable)"
        )
    text = EXAMPLE.read_text()
    text = re.sub(r'backend = "tap:[^"]*"', f'backend = "tap:{tap}"', text)
    text = re.sub(r'path = "[^"]*"', f'path = "{tmp_path / "kv.img"}"', text)
    cfg = tmp_path / "kv-tap.toml"
    cfg.write_text(text)
    vmm = Vmm(tmp_path, "tap", cfg)
    try:
        vmm.wait_ready()
        console = tmp_path / "tap.console"
        deadline = time.monotonic() + 30
        while "kv: serving on" not in (console.read_text() if console.exists() else ""):
            assert time.monotonic() < deadline, "the kv guest never came up"
            time.sleep(0.05)
        ping = subprocess.run(
            ["ping", "-c", "3", "-W", "2", "-I", tap, "10.0.0.2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        vmm.stop()
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert " 0% packet loss" in ping.stdout, ping.stdout
