"""`ptmig run` end to end: a real VMM process driven by the real `qemu.qmp` client."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

ROOT = Path(__file__).resolve().parent.parent


def ptmig(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ptmig.cli", *args], **kw)


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"ptmig exited early: {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError("QMP socket never appeared")
        time.sleep(0.05)


def run_dirty(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`ptmig run` of the dirty example with its QMP socket (up when this returns) and its
    console in `tmp_path`: (the process, the socket's path)."""
    sock = tmp_path / "qmp.sock"
    proc = ptmig(
        "run",
        str(ROOT / "examples/dirty.toml"),
        "--qmp",
        f"unix:{sock}",
        "--console",
        str(tmp_path / "console.txt"),
    )
    try:
        wait_for_socket(sock, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, sock


@pytest.mark.kvm
def test_hello_exit_status_and_console_file(tmp_path: Path) -> None:
    console = tmp_path / "console.txt"
    hello = str(ROOT / "examples/hello.toml")
    out = subprocess.run(
        [sys.executable, "-m", "ptmig.cli", "run", hello, "--console", str(console)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "hello from ptmig guest" in console.read_text()


@pytest.mark.kvm
def test_stop_cont_quit_over_qmp_with_the_qemu_client(tmp_path: Path) -> None:
    proc, sock = run_dirty(tmp_path)
    try:

        async def drive() -> list[str]:
            qmp = QMPClient("test")
            await qmp.connect(str(sock))

            async def query(command: str) -> dict[str, Any]:
                reply = await qmp.execute(command)
                assert isinstance(reply, dict), reply
                return reply

            for _ in range(200):  # the socket is up before the guest starts running
                if (await query("query-status"))["status"] == "running":
                    break
                await asyncio.sleep(0.05)
            events: list[str] = []
            listener_task = None

            async def listen() -> None:
                async for ev in qmp.events:
                    events.append(str(ev["event"]))

            listener_task = asyncio.create_task(listen())
            st = await query("query-status")
            assert st["status"] == "running" and st["running"] is True
            await qmp.execute("stop")
            st = await query("query-status")
            assert st == {"status": "paused", "running": False, "singlestep": False}
            s1 = await query("x-query-guest-stats")
            await asyncio.sleep(0.2)
            s2 = await query("x-query-guest-stats")
            assert s1["vcpus"][0]["iterations"] == s2["vcpus"][0]["iterations"]
            await qmp.execute("cont")
            await asyncio.sleep(0.3)
            s3 = await query("x-query-guest-stats")
            assert s3["vcpus"][0]["iterations"] > s2["vcpus"][0]["iterations"]
            with pytest.raises(Exception, match="not been found"):
                await qmp.execute("no-such-command")
            await qmp.execute("quit")
            await asyncio.sleep(0.3)
            listener_task.cancel()
            try:
                await qmp.disconnect()
            except EOFError:
                pass  # the VMM closed the socket after quit, as QEMU does
            return events

        events = asyncio.run(drive())
        assert "STOP" in events and "RESUME" in events
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()


def next_reply(f) -> dict:
    """The next QMP reply on `f`, past any asynchronous event (RESUME, STOP, ...) the VMM
    emitted in between: events may interleave with replies at any point."""
    while "event" in (msg := json.loads(f.readline())):
        pass
    return msg


@pytest.mark.kvm
def test_malformed_qmp_input_keeps_the_vmm_running(tmp_path: Path) -> None:
    proc, sock = run_dirty(tmp_path)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)  # a missing reply fails the test instead of hanging it
        s.connect(str(sock))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting (before any event)
        for bad in (
            b"{not json\n",
            b"[1,2]\n",
            b'{"execute": 5}\n',
            b'{"execute": "qmp_capabilities", "arguments": {"bogus": 1}}\n',
        ):
            f.write(bad)
            f.flush()
            reply = next_reply(f)
            assert "error" in reply and reply["error"]["desc"]
        f.write(b'{"execute": "qmp_capabilities"}\n')
        f.flush()
        assert next_reply(f) == {"return": {}}
        status = None
        for _ in range(200):  # the socket is up before the guest starts running
            f.write(b'{"execute": "query-status"}\n')
            f.flush()
            status = next_reply(f)["return"]["status"]
            if status == "running":
                break
            time.sleep(0.05)
        assert status == "running"
        f.write(b'{"execute": "stop", "arguments": {"now": true}}\n')
        f.flush()
        assert next_reply(f)["error"]["class"] == "GenericError"
        f.write(b'{"execute": "quit"}\n')
        f.flush()
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()


def test_malformed_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[vm]\nmemory = "256M"\nvcpus = 2\nvcpu = 3\n[workload]\nname = "hello"\n')
    out = subprocess.run(
        [sys.executable, "-m", "ptmig.cli", "run", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "vcpu" in out.stderr and "bad.toml" in out.stderr
    assert "Traceback" not in out.stderr
