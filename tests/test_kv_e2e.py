"""The kv workload end to end on real KVM, driven over the UDP backend by the load client: no
acknowledged PUT is lost or wrong, and the write-ahead log brings every key back after the VMM
is restarted on the same disk. Also: a device process that dies is reported (QMP
X_DEVICE_EVENT `gone`) and the VMM and the other device keep working."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient
from vmmrig import Vmm, kv_config

from ptmig.load import LoadOptions, open_datapath
from ptmig.net import kvproto as kp
from ptmig.net.hoststack import Datapath
from ptmig.net.kvload import EngineConfig, LoadEngine, make_value

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(300)]

VALUE_SIZE = 48


def _wait_ready(dp: Datapath, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not dp.ready():
        assert time.monotonic() < deadline, "the guest never answered ARP"
        dp.tick(time.monotonic(), 0.0)
        time.sleep(0.05)
        dp.recv_batch()


def _call(
    dp: Datapath, requests: list[kp.KvRequest], timeout: float = 20.0, window: int = 32
) -> dict[int, kp.KvReply]:
    """Send every request (at most `window` outstanding, resending after 0.3 s of silence);
    return the replies by request id."""
    _wait_ready(dp)
    todo = list(reversed(requests))
    sent: dict[int, tuple[kp.KvRequest, float]] = {}
    replies: dict[int, kp.KvReply] = {}
    sel = selectors.DefaultSelector()
    sel.register(dp.fileno(), selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while todo or sent:
            now = time.monotonic()
            assert now < deadline, f"{len(todo) + len(sent)} requests never answered"
            while todo and len(sent) < window:
                req = todo.pop()
                dp.send(kp.encode_request(req))
                sent[req.req_id] = (req, now)
            for rid, (req, at) in list(sent.items()):
                if now - at > 0.3:
                    dp.send(kp.encode_request(req))
                    sent[rid] = (req, now)
            sel.select(0.05)
            for data in dp.recv_batch():
                reply = kp.decode_reply(data)
                if sent.pop(reply.req_id, None) is not None:
                    replies[reply.req_id] = reply
            dp.tick(time.monotonic(), 0.0)
    finally:
        sel.close()
    return replies


LOAD_RATE = 20000  # ops/s: a 3 s run fits the table of a 512M guest and its 16M log disk


def _load(cfg: Path, prefix: bytes, seconds: float) -> LoadEngine:
    dp = open_datapath(LoadOptions(config=cfg))
    try:
        engine = LoadEngine(
            dp,
            EngineConfig(
                window=64, duration_s=seconds, prefix=prefix, value_size=VALUE_SIZE, rate=LOAD_RATE
            ),
        )
        engine.run()
    finally:
        dp.close()
    return engine


def test_kv_udp_load_loses_nothing_and_the_log_replays_after_restart(tmp_path: Path) -> None:
    cfg = kv_config(tmp_path, memory="512M")  # room for every key the load can write
    vmm = Vmm(tmp_path, "first", cfg)
    try:
        vmm.wait_ready()
        engine = _load(cfg, b"restart", 3.0)
    finally:
        vmm.stop()
    st = engine.stats
    assert st.puts_acked > 200, f"only {st.puts_acked} PUTs acknowledged in 3 s"
    assert (st.lost, st.wrong, st.errors) == (0, 0, 0), st.problems
    assert st.verified == st.keys_written and st.unverified == 0

    vmm = Vmm(tmp_path, "second", cfg)
    try:
        vmm.wait_ready()
        acked = [engine.latest[slot] for slot in engine.acked]  # each key's latest PUT
        reqs = [kp.KvRequest(i + 1, kp.Op.GET, engine.key_of(n)) for i, n in enumerate(acked)]
        dp = open_datapath(LoadOptions(config=cfg))
        try:
            replies = _call(dp, reqs)
            stats = _call(dp, [kp.KvRequest(len(reqs) + 1, kp.Op.STATS)])
        finally:
            dp.close()
    finally:
        vmm.stop()
    bad = [
        n
        for i, n in enumerate(acked)
        if replies[i + 1].status != kp.Status.OK
        or replies[i + 1].value != make_value(engine.key_of(n), n, VALUE_SIZE)
    ]
    assert not bad, f"{len(bad)} acknowledged keys lost or wrong after the restart: {bad[:5]}"
    replayed = int.from_bytes(stats[len(reqs) + 1].value[56:64], "little")
    assert replayed >= len(acked)
    console = (tmp_path / "second.console").read_text()
    assert "log found" in console, console[-1000:]


def _device_pid(vmm: Vmm, device: str) -> int:
    """The pid of the device process `device` among the VMM's children."""
    for task in os.listdir(f"/proc/{vmm.proc.pid}/task"):
        children = Path(f"/proc/{vmm.proc.pid}/task/{task}/children").read_text().split()
        for pid in map(int, children):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"ptmig.devices.process" in cmd and f'"name": "{device}"'.encode() in cmd:
                return pid
    raise AssertionError(f"no device process {device!r} under VMM pid {vmm.proc.pid}")


def test_killed_device_is_reported_and_the_vmm_stays_responsive(tmp_path: Path) -> None:
    cfg = kv_config(tmp_path)
    vmm = Vmm(tmp_path, "vmm", cfg)
    try:
        vmm.wait_ready()
        dp = open_datapath(LoadOptions(config=cfg))
        try:
            put = _call(dp, [kp.KvRequest(1, kp.Op.PUT, b"before", b"kill")])
            assert put[1].status == kp.Status.OK

            async def kill_and_watch() -> tuple[dict[str, object], dict[str, object]]:
                client = QMPClient("test")
                await client.connect(str(vmm.qmp_path))
                try:
                    os.kill(_device_pid(vmm, "disk0"), signal.SIGKILL)
                    while True:
                        ev = await asyncio.wait_for(client.events.get(), 20)
                        data = ev["data"] if ev["event"] == "X_DEVICE_EVENT" else None
                        if isinstance(data, dict) and data["event"] == "gone":
                            break
                    status = await client.execute("query-status")
                    assert isinstance(status, dict), status
                    return dict(data), dict(status)
                finally:
                    await client.disconnect()

            event, status = asyncio.run(kill_and_watch())
            assert event["device"] == "disk0"
            assert status["status"] == "running"
            # the NIC still works: a GET needs no disk (the PUT before the kill is in the table)
            got = _call(dp, [kp.KvRequest(2, kp.Op.GET, b"before")])
            assert (got[2].status, got[2].value) == (kp.Status.OK, b"kill")
        finally:
            dp.close()
        assert vmm.status() == "running"
    finally:
        vmm.stop()
