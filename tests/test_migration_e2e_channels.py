"""Parallel data channels (QEMU's `multifd`, `multifd-channels`) on real KVM: slow, failing
and hostile migrations.

During a pre-copy round the pages travel on the data channels and the main stream is silent:
the destination's watchdog must count progress on every stream, and the source must notice at
once when the destination gives up or disappears, even with every sender asleep in the
`max-bandwidth` rate limit. A data channel that does not belong to the migration (wrong token,
an index already taken or out of range) is refused, and the source hears why.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
from pkirig import make_pki
from vmmrig import (
    TcpProxy,
    Vmm,
    assert_still_waiting,
    dirty_config,
    free_port,
    iterations_increase,
    migration_key,
    migration_pair,
)

from ptmig.config import load_config
from ptmig.migration import Abort, Connection, HelloAck, Role, RoundStart, hello, transport
from ptmig.migration.protocol import (
    DATA_CHANNEL_JOIN_CAPABILITY,
    DATA_CHANNELS_OFFER_CAPABILITY,
    channel_capability,
)

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(150)]

CHANNELS = 2
WATCHDOG_S = 30.0  # the destination's inactivity timeout (`transport.listen`'s default)


def _migrate(src: Vmm, port: int, *, max_bandwidth: int, downtime_limit: int = 50) -> None:
    src.cmd("migrate-set-parameters", {"multifd-channels": CHANNELS})
    src.cmd(
        "migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]}
    )
    src.migrate(port, max_bandwidth=max_bandwidth, downtime_limit=downtime_limit)


def _wait_active_with(src: Vmm, nbytes: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = src.cmd("query-migrate")
        assert info["status"] in ("setup", "active"), info
        if info["status"] == "active" and info["ram"]["transferred"] >= nbytes:
            return
        assert time.monotonic() < deadline, f"migration stalled: {info}"
        time.sleep(0.02)


def test_a_round_longer_than_the_watchdog_completes_over_data_channels(tmp_path: Path) -> None:
    """Round 0 crawls at 80 KiB/s (about 3 MiB to send) for longer than the destination's
    30 s watchdog: the main stream carries nothing all that time, the data channels carry the
    pages, paced."""
    cfg = dirty_config(tmp_path, memory="64M", vcpus=1, ws="4M")
    with migration_pair(tmp_path, cfg) as (src, dst, port):
        # The switchover follows round 0: whatever is left goes in the stop-and-copy.
        _migrate(src, port, max_bandwidth=80 << 10, downtime_limit=600_000)
        info = src.wait_migration(timeout=120)
        assert info["status"] == "completed", info
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
        assert info["x-rounds"][0]["seconds"] > WATCHDOG_S, info["x-rounds"]
        assert dst.status() == "running"
        assert iterations_increase(dst)


@pytest.mark.parametrize("how", ["kill-destination", "cut-link"])
def test_losing_the_destination_mid_round_fails_at_once(tmp_path: Path, how: str) -> None:
    """At 256 KiB/s the senders spend the round asleep in the rate limit; the source still
    fails the migration within a few seconds and its guest keeps running."""
    cfg = dirty_config(tmp_path, memory="64M", vcpus=1, ws="16M")
    port = free_port()
    src = Vmm(tmp_path, "src", cfg)
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
    proxy = TcpProxy(port)  # the link to cut (a killed destination is connected directly)
    try:
        dst.wait_incoming()
        src.wait_running()
        _migrate(src, port if how == "kill-destination" else proxy.port, max_bandwidth=256 << 10)
        _wait_active_with(src, 512 << 10)
        t0 = time.monotonic()
        if how == "kill-destination":
            dst.proc.kill()
        else:
            proxy.cut()
        info = src.wait_migration(timeout=60)
        took = time.monotonic() - t0
        assert info["status"] == "failed", info
        assert took < 3.0, (took, info)
        assert src.status() == "running"
        assert iterations_increase(src)
        assert "downtime" not in info
    finally:
        src.stop()
        dst.stop()


class FakeSource:
    """The source's side of a migration's handshakes, to present bad data channels."""

    def __init__(self, cfg: Path, port: int, psk: bytes) -> None:
        self.port, self.psk = port, psk
        config = load_config(cfg)
        self.fingerprint = config.compat_fingerprint()
        self.pages = config.memory_bytes // 4096
        self.token = secrets.token_hex(16)
        self.main, self.conn = self._stream(
            channel_capability(DATA_CHANNELS_OFFER_CAPABILITY, CHANNELS, self.token), None
        )

    def _stream(self, capability: str, index: int | None) -> tuple[transport.Channel, Connection]:
        """The main stream (index None) or data channel `index`, joined to its session."""
        join = None
        if index is not None:
            assert self.main.session is not None  # (the main stream's handshake made it)
            join = (self.main.session, index)
        ch = transport.connect(
            "127.0.0.1", self.port, psk=self.psk, inactivity_timeout=20, join=join
        )
        conn = Connection(Role.SOURCE, guest_pages=self.pages, data_channel=index is not None)
        transport.send_event(ch, conn, hello(self.fingerprint, (capability,)))
        ack = transport.recv_event(ch, conn)
        assert isinstance(ack, HelloAck), ack
        self.last_ack = ack
        return ch, conn

    def data_channel(
        self, index: int, token: str | None = None
    ) -> tuple[transport.Channel, Connection]:
        cap = channel_capability(DATA_CHANNEL_JOIN_CAPABILITY, index, token or self.token)
        return self._stream(cap, index)

    def abort_reason(self) -> str:
        """The reason of the destination's Abort on the main stream."""
        ev = transport.recv_event(self.main, self.conn)
        assert isinstance(ev, Abort), ev
        return ev.reason


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        pytest.param(0, "wrong-token", "data channel without this migration's token", id="token"),
        pytest.param(0, 0, "data channel index 0 is not a free one of 2", id="duplicate"),
        pytest.param(1, 7, "data channel index 7 is not a free one of 2", id="out-of-range"),
    ],
)
def test_a_data_channel_that_is_not_the_migrations_is_refused(
    tmp_path: Path, first: int, second: int | str, message: str
) -> None:
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    port = free_port()
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
    try:
        dst.wait_incoming()
        src = FakeSource(cfg, port, migration_key(tmp_path).read_bytes().strip())
        assert src.last_ack.accepted, src.last_ack
        src.data_channel(first)
        assert src.last_ack.accepted, src.last_ack
        if second == "wrong-token":
            src.data_channel(1, token=secrets.token_hex(16))
        else:
            src.data_channel(int(second))
        assert not src.last_ack.accepted and src.last_ack.reason == message, src.last_ack
        assert message in src.abort_reason()
        assert_still_waiting(dst, message)
    finally:
        dst.stop()


def test_a_data_channel_failing_mid_round_is_reported_on_the_main_stream(tmp_path: Path) -> None:
    """The destination does not wait for the source's next frame on the (silent) main stream:
    a broken data channel ends the migration at once and the source is told why."""
    cfg = dirty_config(tmp_path, memory="64M", ws="8M")
    port = free_port()
    dst = Vmm(tmp_path, "dst", cfg, incoming_port=port)
    try:
        dst.wait_incoming()
        src = FakeSource(cfg, port, migration_key(tmp_path).read_bytes().strip())
        channels = [src.data_channel(i) for i in range(CHANNELS)]
        transport.send_event(src.main, src.conn, RoundStart(0, 0))
        bad, _ = channels[1]
        bad.sendall(b"\xff" * 64)  # not a frame
        t0 = time.monotonic()
        reason = src.abort_reason()
        assert time.monotonic() - t0 < 5
        assert reason.startswith("data channel 1 failed:"), reason
        assert_still_waiting(dst, "data channel 1 failed")
    finally:
        dst.stop()


def _guest_ram_rss(pid: int) -> int:
    """Bytes of the guest RAM mapping (the memfd) resident in process `pid`'s page tables."""
    rss, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and not line.endswith(":"):  # a mapping's header
            inside = "/memfd:" in line and "-ram" in line  # vm.py names it <vm>-ram
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
    return rss


def test_data_channels_never_read_the_sources_untouched_ram(tmp_path: Path) -> None:
    """A round's holes map is made once and every data channel uses it, also when a channel's
    share of the round is small enough to be listed sparsely: the source never reads a page the
    guest never touched, which would allocate it (a shmem hole read through the mapping)."""
    cfg = dirty_config(tmp_path, memory="256M", ws="8M")  # 2 × 32,768 pages: sparse shares
    with migration_pair(tmp_path, cfg) as (src, _, port):
        assert iterations_increase(src)  # the working set is touched
        before = _guest_ram_rss(src.proc.pid)
        assert 0 < before < 64 << 20, before
        _migrate(src, port, max_bandwidth=0)
        assert src.wait_migration()["status"] == "completed"
        assert _guest_ram_rss(src.proc.pid) < before + (64 << 20)  # not the whole 256 MiB


def test_data_channels_join_under_psk_and_tls_together(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Mutual TLS and a pre-shared key at once: TLS protects every stream, and the data
    channels join the main stream's PSK session with its proof, so the destination ties them
    to the migration and the pages they carry arrive verified."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    cfg = dirty_config(tmp_path, memory="64M", vcpus=1, ws="4M")
    with cfg.open("a") as f:  # one certificate for both sides (valid for 127.0.0.1)
        f.write(
            f'\n[migration]\ntls_cert = "{pki / "server.pem"}"\n'
            f'tls_key = "{pki / "server.key"}"\ntls_ca = "{pki / "ca.pem"}"\n'
        )
    with migration_pair(tmp_path, cfg) as (src, dst, port):
        _migrate(src, port, max_bandwidth=0, downtime_limit=600_000)
        info = src.wait_migration(timeout=120)
        assert info["status"] == "completed", info
        assert info["x-verify"]["mismatched"] == 0, info["x-verify"]
        assert info["x-rounds"][0]["channels"] == CHANNELS, info["x-rounds"]
        assert "rejected an incoming migration" not in dst.output(), dst.output()
        assert iterations_increase(dst)
