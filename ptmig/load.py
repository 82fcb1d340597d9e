"""`ptmig load`: drive the guest's kv service and prove no acknowledged write is lost.

Owns the load client's front end: `LoadOptions` (what the CLI passes), finding the guest from
the VM config (its IP, the switch it sits on, the kv port), attaching to the network (as a
host of its own on a UDP switch; through a plain socket for a TAP guest or with `--target`),
running the engine in `ptmig.net.kvload`, and the result: `LoadResult`, its JSON form and its
exit status (0 all good; 1 an acknowledged value was lost or wrong; 3 the run could not prove
it, e.g. some acknowledged keys could not be read back, or the guest never answered; see
`ptmig.cliconv`).

`ptmig load CONFIG.toml ...` (ptmig.cli) calls `main(LoadOptions)`; `run_load` is the same
without printing.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptmig.cliconv import CANNOT_RUN, FAILED, OK, json_to_stdout, write_json
from ptmig.net.backend import NetBackendError, open_backend, parse_host_port
from ptmig.net.frames import ip_aton, random_local_mac
from ptmig.net.hoststack import Datapath, EthernetHost, SocketDatapath
from ptmig.net.kvload import (
    BUCKET_S,
    DEFAULT_KEYS,
    EngineConfig,
    EngineStats,
    LoadEngine,
    NotReadyError,
)
from ptmig.net.kvproto import DEFAULT_PORT
from ptmig.net.sched import batch_scheduling

EXIT_OK, EXIT_LOST_OR_WRONG, EXIT_UNPROVEN = OK, FAILED, CANNOT_RUN
CLIENT_PORT = 47000


@dataclass
class LoadOptions:
    config: str | Path | None = None  # VM config TOML: guest IP, switch, kv port
    target: str | None = None  # HOST:PORT: plain UDP socket (guest reachable via TAP)
    switch: str | None = None  # udp:HOST:PORT override of the config's backend
    guest_ip: str | None = None  # "10.0.0.2" or "10.0.0.2/24"; overrides the config
    client_ip: str | None = None  # default: .200 of the guest's subnet (.201 if taken)
    kv_port: int | None = None
    rate: float | None = None  # ops/s; None = --max
    duration_s: float = 10.0
    window: int = 128
    keys_prefix: str | None = None  # default: random, so that runs never share keys
    keys: int = DEFAULT_KEYS  # key space the PUTs cycle through
    value_size: int = 64
    read_ratio: float = 0.0
    durable: bool = True
    rto_s: float = 0.2
    verify: bool = True
    verify_stall_s: float = 30.0
    ready_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0  # after the load: how long outstanding requests may take
    json_path: str | Path | None = None


@dataclass
class LoadResult:
    ops: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    max_gap_ms: float
    max_gap_at_s: float
    timeouts: int
    retransmits: int
    acked: int
    keys_written: int
    lost: int
    wrong: int
    verified: int
    unverified: int
    unanswered: int
    errors: int
    stray_replies: int
    malformed_replies: int
    duration_s: float
    verify_s: float
    series: list[list[float]]
    problems: list[str]

    @property
    def exit_status(self) -> int:
        if self.lost or self.wrong:
            return EXIT_LOST_OR_WRONG
        if self.unverified or (self.acked == 0 and self.ops == 0):
            return EXIT_UNPROVEN
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["exit_status"] = self.exit_status
        return data

    @classmethod
    def from_stats(cls, st: EngineStats) -> LoadResult:
        lat = np.frombuffer(st.latencies_ms, dtype=np.float64) if len(st.latencies_ms) else None
        p50, p99, mx = (
            np.percentile(lat, [50, 99]).tolist() + [float(lat.max())]
            if lat is not None
            else (0.0, 0.0, 0.0)
        )
        series = [[round(i * BUCKET_S, 1), n] for i, n in enumerate(st.series)]
        return cls(
            ops=st.ops,
            ops_per_s=st.ops / st.load_elapsed_s if st.load_elapsed_s else 0.0,
            p50_ms=float(p50),
            p99_ms=float(p99),
            max_ms=float(mx),
            max_gap_ms=st.max_gap_s * 1000.0,
            max_gap_at_s=st.max_gap_at_s,
            timeouts=st.timeouts,
            retransmits=st.retransmits,
            acked=st.puts_acked,
            keys_written=st.keys_written,
            lost=st.lost,
            wrong=st.wrong,
            verified=st.verified,
            unverified=st.unverified,
            unanswered=st.unanswered,
            errors=st.errors,
            stray_replies=st.stray_replies,
            malformed_replies=st.malformed_replies,
            duration_s=st.load_elapsed_s,
            verify_s=st.verify_elapsed_s,
            series=series,
            problems=list(st.problems),
        )


@dataclass(frozen=True)
class _Where:
    backend: str | None  # udp:HOST:PORT when attaching to a switch
    guest: ipaddress.IPv4Interface | None
    kv_port: int


def _from_config(path: str | Path) -> _Where:
    from ptmig.config import UdpBackend, load_config

    cfg = load_config(path)
    if not cfg.net:
        raise ValueError(f"{path}: the VM has no [[net]] device to load")
    nic = cfg.net[0]
    port = DEFAULT_PORT
    args = dict(cfg.workload.args)
    if isinstance(args.get("port"), int):
        port = int(args["port"])
    backend = str(nic.backend) if isinstance(nic.backend, UdpBackend) else None
    return _Where(backend, nic.ip, port)


def _interface(text: str) -> ipaddress.IPv4Interface:
    return ipaddress.IPv4Interface(text if "/" in text else f"{text}/24")


def _client_ip(guest: ipaddress.IPv4Interface, wanted: str | None) -> bytes:
    if wanted:
        return ip_aton(wanted.split("/")[0])
    hosts = guest.network.num_addresses
    for offset in (200, 201, 2, 1):
        if offset < hosts - 1:
            candidate = guest.network.network_address + offset
            if candidate != guest.ip:
                return candidate.packed
    raise ValueError(f"no free client address in {guest.network}; pass a client IP")


def open_datapath(opts: LoadOptions) -> Datapath:
    """Resolve where the guest is and attach to it."""
    where = _from_config(opts.config) if opts.config else _Where(None, None, DEFAULT_PORT)
    kv_port = opts.kv_port or where.kv_port
    if opts.target:
        host, port = parse_host_port(opts.target, what="--target")
        return SocketDatapath(host, port)
    guest = _interface(opts.guest_ip) if opts.guest_ip else where.guest
    if guest is None:
        raise ValueError("need a VM config (or --guest-ip), or --target HOST:PORT")
    backend = opts.switch or where.backend
    if backend is None:  # a TAP guest: reachable through the host's own network
        return SocketDatapath(str(guest.ip), kv_port)
    mac = random_local_mac()
    link = open_backend(backend, mac=mac)
    return EthernetHost(
        link,
        mac,
        _client_ip(guest, opts.client_ip),
        CLIENT_PORT + os.getpid() % 10000,
        guest.ip.packed,
        kv_port,
    )


def run_load(opts: LoadOptions) -> LoadResult:
    """Run the load, the drain and the read-back; write `opts.json_path` if set."""
    prefix = opts.keys_prefix or f"L{os.urandom(4).hex()}"
    cfg = EngineConfig(
        window=opts.window,
        rate=opts.rate,
        duration_s=opts.duration_s,
        prefix=prefix.encode(),
        keys=opts.keys,
        value_size=opts.value_size,
        read_ratio=opts.read_ratio,
        durable=opts.durable,
        rto_s=opts.rto_s,
        verify=opts.verify,
        verify_stall_s=opts.verify_stall_s,
        ready_timeout_s=opts.ready_timeout_s,
        drain_timeout_s=opts.drain_timeout_s,
    )
    cfg.check()
    datapath = open_datapath(opts)
    try:
        with batch_scheduling():  # send whole bursts: the switch must not preempt us per frame
            stats = LoadEngine(datapath, cfg).run()
    finally:
        datapath.close()
    result = LoadResult.from_stats(stats)
    if opts.json_path:
        write_json(result.to_json(), opts.json_path)
    return result


def summary(result: LoadResult) -> str:
    lines = [
        f"ops {result.ops} in {result.duration_s:.2f} s = {result.ops_per_s:,.0f} ops/s",
        f"latency p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
        f"max {result.max_ms:.1f} ms",
        f"longest gap between replies {result.max_gap_ms:.0f} ms "
        f"(at t={result.max_gap_at_s:.1f} s)",
        f"timeouts {result.timeouts}, retransmits {result.retransmits}, "
        f"errors {result.errors}, unanswered {result.unanswered}",
        f"acked PUTs {result.acked} to {result.keys_written} keys: verified "
        f"{result.verified} keys, lost {result.lost}, wrong {result.wrong}, "
        f"unverified {result.unverified}",
        *result.problems,
    ]
    return "\n".join(lines)


def main(opts: LoadOptions) -> int:
    """Run the load and print its summary; the exit status (`ptmig load`, see ptmig.cli)."""
    try:
        result = run_load(opts)
    except (ValueError, NetBackendError, NotReadyError, OSError) as exc:
        print(f"ptmig load: {exc}", file=sys.stderr)
        return EXIT_UNPROVEN
    print(summary(result), file=sys.stderr if json_to_stdout(opts.json_path) else sys.stdout)
    return result.exit_status


if __name__ == "__main__":  # `python -m ptmig.load ...` is `ptmig load ...`
    from ptmig.cli import main as cli_main

    cli_main(["load", *sys.argv[1:]])
