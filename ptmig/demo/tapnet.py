"""`ptmig demo --tap`: real Linux networking between the host and the migrating guest (root).

Creates a bridge with the host's address on the guest's subnet and one TAP interface for each
VMM (a single-queue TAP can be held by one process at a time, and source and destination run
at the same time). The bridge is created with `ageing_time 0`, so it floods every frame to both
ports, as a switch that relearns at once would: after the switchover the host's frames reach
the destination without waiting for the guest to announce itself. Removed on `close()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from .plan import GUEST_IP, KV_PORT
from .procs import DemoError

HOST_IP = "10.0.0.1/24"


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise DemoError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")


@dataclass
class TapNetwork:
    bridge: str
    taps: tuple[str, str]

    @property
    def guest_target(self) -> str:
        return f"{GUEST_IP.split('/')[0]}:{KV_PORT}"

    @classmethod
    def create(cls) -> TapNetwork:
        if os.geteuid() != 0:
            raise DemoError(
                "--tap needs root (it creates a bridge and two TAP interfaces); "
                "without it the demo uses the unprivileged UDP network"
            )
        if shutil.which("ip") is None:
            raise DemoError("--tap needs the `ip` command (iproute2)")
        tag = os.urandom(3).hex()
        net = cls(f"ptbr{tag}", (f"pts{tag}", f"ptd{tag}"))
        try:
            _ip("link", "add", net.bridge, "type", "bridge", "ageing_time", "0")
            _ip("addr", "add", HOST_IP, "dev", net.bridge)
            _ip("link", "set", net.bridge, "up")
            for tap in net.taps:
                _ip("tuntap", "add", "dev", tap, "mode", "tap")
                _ip("link", "set", tap, "master", net.bridge)
                _ip("link", "set", tap, "up")
        except DemoError:
            net.close()
            raise
        return net

    def close(self) -> None:
        for name in (*self.taps, self.bridge):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
