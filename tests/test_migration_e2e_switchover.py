"""The switchover on real KVM when its last message is lost: the guest runs in one place only.

A relay between source and destination goes dark for the destination's replies once the
migration is under way, so the switchover acknowledgement never reaches the source. Whether the
source then times out or is cancelled, it must not resume: the destination committed and runs
the guest. The source stays paused in `x-unresolved` until the operator's `x-migrate-resolve`
names the winner, and the disk image has one writer throughout: its OFD lock (whose holder the
owner record names) and its checksum, which only the side running the guest changes.

A destination that gives up before its commit (here: SIGTERM while the source, past Complete,
is in doubt) says so in an Abort, and the source resumes at once instead of staying unresolved.
A SIGTERM injected exactly at the commit point (the destination held there by
`PTMIG_TEST_HOLD`): just before it, the same Abort; just after it (acknowledged, not started),
the destination starts the guest and then stops like any running VM, and the source, handed
over, never resumes.

Also here: `cont` on a migrated source is refused (and `x-force` cannot take the disk from a
running destination), and a second `ptmig run` on a locked image fails at start.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    kv_config,
    kv_migration,
    migration_pair,
    recv_exact,
)

from ptmig.disklock import DiskLock, Holder, lock_holder, read_holder

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]


def _wait_migrate(vmm: Vmm, check: Any, what: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = vmm.cmd("query-migrate")
        if check(info):
            return info
        assert time.monotonic() < deadline, f"migration never {what}: {info}"
        time.sleep(0.02)


def _holder_pid(image: Path) -> int | None:
    """The pid of the process holding the image's lock, None if nobody holds it."""
    if lock_holder(image) is None:
        return None
    record = read_holder(image)
    assert record is not None
    return record.pid


def _wait_holder(image: Path, pid: int) -> None:
    """Until `pid` holds the image's lock and says so (a destination writes its owner record
    just after its guest starts)."""
    deadline = time.monotonic() + 10
    while (holder := _holder_pid(image)) != pid:
        assert time.monotonic() < deadline, f"the lock of {image} is held by {holder}, not {pid}"
        time.sleep(0.01)


def _wait_dropped(relay: TcpProxy) -> None:
    deadline = time.monotonic() + 30
    while relay.dropped == 0:
        assert time.monotonic() < deadline, "the destination's reply never reached the relay"
        time.sleep(0.01)


def _digest(image: Path) -> str:
    return hashlib.sha256(image.read_bytes()).hexdigest()


def _migrate_into_the_dark(src: Vmm, relay: TcpProxy, timeout_s: int) -> None:
    """Start a migration through `relay` and darken its replies once it is active: the
    destination's SwitchoverAck will be lost."""
    src.cmd("migrate-set-parameters", {"x-switchover-timeout": timeout_s})
    # capped, so that the migration is still in its rounds when the poll sees it active (an
    # uncapped 128 MiB guest can complete in the few ms between two polls on a fast host)
    src.migrate(relay.port, tracking="device-log", verify=False, max_bandwidth=16 << 20)
    _wait_migrate(src, lambda i: i["status"] in ("active", "device"), "became active")
    relay.replies_dark.set()


def test_lost_ack_then_timeout_leaves_the_source_paused_until_destination_wins(
    tmp_path: Path,
) -> None:
    image = tmp_path / "kv.img"
    with kv_migration(tmp_path) as (cfg, src, dst, port):
        assert _holder_pid(image) == src.proc.pid  # the destination opened it unlocked
        relay = TcpProxy(port)
        load = Load(cfg, 6.0, tmp_path / "load.json").start()
        time.sleep(1.0)
        _migrate_into_the_dark(src, relay, timeout_s=2)
        info = _wait_migrate(src, lambda i: i["status"] == "x-unresolved", "unresolved")
        assert "no switchover acknowledgement" in info["error-desc"], info
        assert "x-migrate-resolve" in info["error-desc"], info
        assert info["x-guest-owner"] == "unresolved"
        # The destination committed: it runs the guest, holds the disk, serves the load.
        dst.wait_running()
        _wait_dropped(relay)  # its acknowledgement was sent, and lost
        _wait_holder(image, dst.proc.pid)
        assert src.status() == "finish-migrate"
        with pytest.raises(RuntimeError, match="switchover is unresolved"):
            src.cmd("cont")
        result = load.result()
        assert result["lost"] == 0 and result["wrong"] == 0, result["output"]
        after = Load(cfg, 2.0, tmp_path / "after.json").start().result()  # the destination's
        assert after["acked"] > 0 and after["lost"] == 0, after["output"]
        assert src.status() == "finish-migrate"  # still paused after all that
        assert {"event": "MIGRATION", "status": "x-unresolved"} in [
            {"event": e["event"], "status": e.get("data", {}).get("status")} for e in src.events
        ]
        src.cmd("x-migrate-resolve", {"winner": "destination"})
        info = src.cmd("query-migrate")
        assert info["status"] == "completed" and info["x-guest-owner"] == "destination"
        assert src.status() == "postmigrate"
        with pytest.raises(RuntimeError, match="no unresolved switchover"):
            src.cmd("x-migrate-resolve", {"winner": "source"})
        # One writer: once the destination is gone, the image stays as it left it.
        assert dst.stop() == 0
        written = _digest(image)
        assert _holder_pid(image) is None
        assert src.stop() == 0
        assert _digest(image) == written


def test_migrate_cancel_while_waiting_for_the_ack_then_source_wins(tmp_path: Path) -> None:
    image = tmp_path / "kv.img"
    with kv_migration(tmp_path) as (cfg, src, dst, port):
        relay = TcpProxy(port)
        _migrate_into_the_dark(src, relay, timeout_s=120)
        _wait_migrate(src, lambda i: i.get("x-guest-owner") == "in-doubt", "in doubt")
        src.cmd("migrate_cancel")
        info = _wait_migrate(src, lambda i: i["status"] == "x-unresolved", "unresolved")
        assert "migration cancelled" in info["error-desc"], info
        dst.wait_running()
        _wait_dropped(relay)
        _wait_holder(image, dst.proc.pid)
        # The source cannot take the guest back while the destination holds the disk.
        with pytest.raises(RuntimeError, match=f"locked by ptmig pid {dst.proc.pid}"):
            src.cmd("x-migrate-resolve", {"winner": "source"})
        with pytest.raises(RuntimeError, match=f"locked by ptmig pid {dst.proc.pid}"):
            src.cmd("cont", {"x-force": True})
        assert src.cmd("query-migrate")["status"] == "x-unresolved"
        assert src.status() == "finish-migrate"
        # The operator stops the destination and gives the guest back to the source.
        assert dst.stop() == 0
        left_by_destination = _digest(image)
        assert _holder_pid(image) is None
        time.sleep(0.5)
        assert _digest(image) == left_by_destination  # the paused source wrote nothing
        src.cmd("x-migrate-resolve", {"winner": "source"})
        info = src.cmd("query-migrate")
        assert info["status"] == "failed" and info["x-guest-owner"] == "source", info
        assert "resolved by the operator" in info["error-desc"]
        assert src.status() == "running"
        assert _holder_pid(image) == src.proc.pid
        load = Load(cfg, 2.0, tmp_path / "load.json").start()  # the source serves again
        result = load.result()
        assert result["acked"] > 0 and result["lost"] == 0, result["output"]


def test_cont_on_a_migrated_source_is_refused_and_force_cannot_take_the_disk(
    tmp_path: Path,
) -> None:
    image = tmp_path / "kv.img"
    with kv_migration(tmp_path) as (_, src, dst, port):
        src.migrate(port, verify=False)
        info = src.wait_migration()
        assert info["status"] == "completed" and info["x-guest-owner"] == "destination", info
        assert src.status() == "postmigrate"
        with pytest.raises(RuntimeError) as err:
            src.cmd("cont")
        assert "Guest is in state 'postmigrate'" in str(err.value)
        assert "run it twice" in str(err.value) and "'x-force': true" in str(err.value)
        _wait_holder(image, dst.proc.pid)  # its record follows the completion by a moment
        with pytest.raises(RuntimeError, match=f"locked by ptmig pid {dst.proc.pid}"):
            src.cmd("cont", {"x-force": True})
        assert src.status() == "postmigrate"
        assert _holder_pid(image) == dst.proc.pid


def test_a_second_vmm_on_a_locked_image_fails_at_start(tmp_path: Path) -> None:
    cfg = kv_config(tmp_path)
    first = Vmm(tmp_path, "first", cfg)
    try:
        first.wait_running()
        second = Vmm(tmp_path, "second", cfg)
        assert second.proc.wait(timeout=60) != 0
        out = second.output()
        assert (
            f"disk image {tmp_path / 'kv.img'} is in use: it is locked by ptmig pid "
            f"{first.proc.pid}" in out
        ), out
        assert "Traceback" not in out, out
        assert first.status() == "running"
    finally:
        first.stop()


def test_a_destination_that_cannot_lock_the_disk_refuses_and_the_source_resumes(
    tmp_path: Path,
) -> None:
    """The destination's commit point needs the disk locks; someone else holds them (here the
    test, on the destination's copy of the image), so it refuses the switchover explicitly
    and the source, which knows then that the guest is still its own, takes its lock back and
    resumes."""
    with squatted_destination(tmp_path) as (_, src, dst, port):
        src.migrate(port, verify=False)
        info = src.wait_migration()
        assert info["status"] == "failed" and info["x-guest-owner"] == "source", info
        assert "refused the switchover: cannot take the disk locks" in info["error-desc"]
        assert "VM 'squatter'" in info["error-desc"], info
        assert src.status() == "running"
        assert _holder_pid(tmp_path / "kv.img") == src.proc.pid
        # the destination never ran the guest: it refused, and waits for a valid source
        assert_still_waiting(dst, "cannot take the disk locks")


@contextmanager
def squatted_destination(tmp_path: Path) -> Iterator[tuple[Path, Vmm, Vmm, int]]:
    """`kv_migration` whose destination has an image of its own, locked by the test: its
    commit point cannot take the disk lock."""
    theirs = tmp_path / "kv-dst.img"
    with theirs.open("wb") as f:
        f.truncate(64 << 20)  # the size kv_config gives the disk
    squatter = DiskLock(theirs, Holder.this_process("squatter", None))
    squatter.acquire()
    try:
        with kv_migration(tmp_path, dst_image=theirs) as vmms:
            yield vmms
    finally:
        squatter.release()


class CompleteHolder(TamperProxy):
    """A relay that forwards the source's main stream (sealed) up to its Complete and holds
    that record back: the source is then in doubt while the destination has not received
    Complete, so it has not committed. Complete is the main stream's only empty frame: its
    record is the 4-byte length, the 12-byte frame header and the 16-byte tag."""

    COMPLETE_RECORD = 4 + 12 + 16

    def __init__(self, target: int) -> None:
        self.held = threading.Event()
        super().__init__(target, stream=0, attack="hold")

    def _tamper(self, a: socket.socket, b: socket.socket, handshake: int) -> None:
        b.sendall(recv_exact(a, handshake - 1))  # the proof; the verdict follows the server's
        b.sendall(recv_exact(a, 1))
        while True:
            head = recv_exact(a, 4)
            record = head + recv_exact(a, int.from_bytes(head, "little"))
            if len(record) == self.COMPLETE_RECORD:
                self.held.set()
                return
            b.sendall(record)


def test_a_destination_stopped_before_its_commit_tells_the_doubting_source_which_resumes(
    tmp_path: Path,
) -> None:
    image = tmp_path / "kv.img"
    with kv_migration(tmp_path) as (cfg, src, dst, port):
        relay = CompleteHolder(port)
        src.cmd("migrate-set-parameters", {"x-switchover-timeout": 120})
        src.migrate(relay.port, verify=False)
        assert relay.held.wait(60), f"Complete never reached the relay: {src.cmd('query-migrate')}"
        _wait_migrate(src, lambda i: i.get("x-guest-owner") == "in-doubt", "in doubt")
        dst.proc.send_signal(signal.SIGTERM)  # it waits for Complete: it has not committed
        assert dst.proc.wait(timeout=30) == 128 + signal.SIGTERM, dst.output()
        info = _wait_migrate(src, lambda i: i["status"] in ("failed", "x-unresolved"), "ended")
        assert info["status"] == "failed" and info["x-guest-owner"] == "source", info
        assert "destination VMM is stopping" in info["error-desc"], info
        assert "did not commit" in info["error-desc"], info
        assert src.status() == "running"
        assert _holder_pid(image) == src.proc.pid  # it took its disk lock back
        result = Load(cfg, 2.0, tmp_path / "load.json").start().result()
        assert result["acked"] > 0 and result["lost"] == 0, result["output"]


def _hold(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, point: str) -> Path:
    """Make the destination (started after this) wait at `point` of its switchover until the
    returned file is removed (`PTMIG_TEST_HOLD`, see migration.destination)."""
    hold = tmp_path / f"hold-{point}"
    monkeypatch.setenv("PTMIG_TEST_HOLD", f"{point}:{hold}")
    return hold


def _wait_exists(path: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.01)


def _wait_output(vmm: Vmm, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in (out := vmm.output()):
        assert time.monotonic() < deadline, f"{vmm.name} never said {text!r}:\n{out}"
        time.sleep(0.01)


def _quit(vmm: Vmm) -> None:
    """QMP `quit`; its reply may lose the race with the process's exit (as with QEMU)."""
    try:
        vmm.cmd("quit")
    except Exception:  # noqa: BLE001 - the connection closed under the reply
        pass


def _stop(vmm: Vmm, how: str) -> None:
    """A stop request to a destination: "SIGTERM" or QMP "quit" (the same rules)."""
    if how == "quit":
        _quit(vmm)
    else:
        vmm.proc.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("stop", ["SIGTERM", "quit"])
def test_a_destination_stopped_after_its_commit_starts_the_guest_then_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """SIGTERM (or QMP `quit`) between the destination's commit (acknowledged: the source has
    handed over) and its vm.start: the stop waits, the guest starts there, then stops as a
    running VM does (exit 0). The source never takes it back: it ran in exactly one place.
    Both sides' `query-migrate` name the same migration id."""
    image = tmp_path / "kv.img"
    hold = _hold(monkeypatch, tmp_path, "after-commit")
    with kv_migration(tmp_path) as (_, src, dst, port):
        src.migrate(port, verify=False)
        _wait_exists(hold, "the destination's commit")
        info = src.wait_migration()  # the acknowledgement left before the hold
        assert info["status"] == "completed" and info["x-guest-owner"] == "destination", info
        assert dst.status() == "inmigrate"  # committed, not started yet
        there = dst.cmd("query-migrate")
        assert there == {"status": "completed", "x-migration-id": info["x-migration-id"]}
        # The commit took the disk lock (its owner record waits for the start: it still names
        # the source, which released the lock before Complete).
        assert lock_holder(image) is not None
        _stop(dst, stop)
        _wait_output(dst, "stop requested (signal 15) during the switchover")
        assert dst.proc.poll() is None  # the request waits for the start
        hold.unlink()
        assert dst.proc.wait(timeout=60) == 0, dst.output()
        out = dst.output()
        assert "the guest runs here (the switchover had committed); now stopping it" in out, out
        assert "Traceback" not in out, out
        assert src.status() == "postmigrate"
        with pytest.raises(RuntimeError, match="Guest is in state 'postmigrate'"):
            src.cmd("cont")
        assert (
            _holder_pid(image) is None
        )  # the stopped destination let go; the source never took it


@pytest.mark.parametrize("stop", ["SIGTERM", "quit"])
def test_a_destination_stopped_after_complete_before_its_commit_lets_the_source_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """SIGTERM (or QMP `quit`, exit 0 then) after the destination received Complete and
    loaded the state, but before its commit began: it refuses the switchover (Abort: it did
    not commit) and exits; the source, in doubt until then, resumes with its disk lock back."""
    image = tmp_path / "kv.img"
    hold = _hold(monkeypatch, tmp_path, "before-commit")
    with kv_migration(tmp_path) as (cfg, src, dst, port):
        src.cmd("migrate-set-parameters", {"x-switchover-timeout": 120})
        src.migrate(port, verify=False)
        _wait_exists(hold, "the destination's arrival at its commit point")
        info = src.cmd("query-migrate")
        assert info["x-guest-owner"] == "in-doubt", info
        assert dst.cmd("query-migrate")["x-migration-id"] == info["x-migration-id"]
        assert _holder_pid(image) is None  # the source let go, the destination took nothing
        _stop(dst, stop)
        exit_status = 0 if stop == "quit" else 128 + signal.SIGTERM
        assert dst.proc.wait(timeout=30) == exit_status, dst.output()
        info = _wait_migrate(src, lambda i: i["status"] in ("failed", "x-unresolved"), "ended")
        assert info["status"] == "failed" and info["x-guest-owner"] == "source", info
        assert "did not commit" in info["error-desc"], info
        assert src.status() == "running"
        assert _holder_pid(image) == src.proc.pid
        result = Load(cfg, 2.0, tmp_path / "load.json").start().result()
        assert result["acked"] > 0 and result["lost"] == 0, result["output"]


def test_an_unresolved_source_asks_the_destination_which_committed_and_completes(
    tmp_path: Path,
) -> None:
    """The acknowledgement is lost, the source goes unresolved; once the link is back, its
    fate query over a new connection gets the destination's authenticated "committed", and
    the source completes (postmigrate) without an operator."""
    image = tmp_path / "kv.img"
    with kv_migration(tmp_path) as (_, src, dst, port):
        relay = TcpProxy(port)
        _migrate_into_the_dark(src, relay, timeout_s=2)
        info = _wait_migrate(src, lambda i: i["status"] == "x-unresolved", "unresolved")
        dst.wait_running()
        _wait_dropped(relay)
        assert src.status() == "finish-migrate"  # its fate queries go dark as well
        relay.replies_dark.clear()  # the link is back
        info = _wait_migrate(src, lambda i: i["status"] != "x-unresolved", "resolved")
        assert info["status"] == "completed" and info["x-guest-owner"] == "destination", info
        assert "the destination's answer to a fate query (committed)" in info["error-desc"]
        assert src.status() == "postmigrate"
        _wait_holder(image, dst.proc.pid)
        assert dst.status() == "running"


def test_an_unresolved_source_asks_the_destination_which_did_not_commit_and_resumes(
    tmp_path: Path,
) -> None:
    """The destination refuses the switchover (it cannot lock its disk) but the refusal is
    lost: the source goes unresolved. Its fate query reaches the destination, which waits for
    a source again, and gets "not-committed": the source resumes. The destination keeps
    waiting (a fate query is no failed attempt)."""
    with squatted_destination(tmp_path) as (cfg, src, dst, port):
        relay = TcpProxy(port)
        _migrate_into_the_dark(src, relay, timeout_s=2)
        _wait_migrate(src, lambda i: i["status"] == "x-unresolved", "unresolved")
        assert_still_waiting(dst, "cannot take the disk locks")
        relay.replies_dark.clear()
        info = _wait_migrate(src, lambda i: i["status"] != "x-unresolved", "resolved")
        assert info["status"] == "failed" and info["x-guest-owner"] == "source", info
        assert "fate query (not-committed)" in info["error-desc"], info
        assert src.status() == "running"
        assert _holder_pid(tmp_path / "kv.img") == src.proc.pid
        with pytest.raises(RuntimeError, match="no unresolved switchover"):
            src.cmd("x-migrate-resolve")  # nothing left to ask about
        assert dst.status() == "inmigrate"
        assert "answered a fate query for migration" in dst.output()
        result = Load(cfg, 2.0, tmp_path / "load.json").start().result()
        assert result["acked"] > 0 and result["lost"] == 0, result["output"]


def test_quit_on_a_waiting_destination_ends_it_at_once(tmp_path: Path) -> None:
    """No source yet: `quit` ends the destination (exit 0, like QEMU's quit) instead of
    leaving it waiting for a source it would then run the guest for."""
    dst = Vmm(tmp_path, "dst", kv_config(tmp_path), incoming_port=free_port())
    try:
        dst.wait_incoming()
        assert dst.cmd("query-migrate") == {}  # no source accepted yet
        _quit(dst)
        assert dst.proc.wait(timeout=30) == 0, dst.output()
        assert "Traceback" not in dst.output()
    finally:
        dst.kill()


def test_quit_on_a_destination_mid_round_aborts_and_the_source_keeps_running(
    tmp_path: Path,
) -> None:
    """`quit` while pages flow (a round held back by the bandwidth cap, on a guest that
    dirties 32 MiB): the destination tells the source it is stopping and exits 0; the
    source's migration fails and its guest never stopped running."""
    with migration_pair(tmp_path, dirty_config(tmp_path)) as (src, dst, port):
        src.migrate(port, verify=False, max_bandwidth=1 << 20)
        info = _wait_migrate(src, lambda i: i["ram"]["transferred"] > 256 << 10, "under way")
        assert info["status"] == "active", info
        mid = dst.cmd("query-migrate")
        assert mid == {"status": "active", "x-migration-id": info["x-migration-id"]}, mid
        _quit(dst)
        assert dst.proc.wait(timeout=30) == 0, dst.output()
        info = _wait_migrate(src, lambda i: i["status"] in ("failed", "x-unresolved"), "ended")
        assert info["status"] == "failed" and info["x-guest-owner"] == "source", info
        assert "destination VMM is stopping" in info["error-desc"], info
        assert src.status() == "running" and iterations_increase(src)
        assert "Traceback" not in dst.output()
