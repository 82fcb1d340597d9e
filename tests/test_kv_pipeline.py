"""The kv service's pipelined group commit on real KVM: a burst of PUTs and GETs sent without
waiting is answered in arrival order, every GET sees exactly the PUTs received before it, and
the batches written while others were in flight replay after a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_firmware_kv import GUEST_IP, GUEST_MAC, HOST_IP, HOST_MAC, KvGuest, disk, start

__all__ = ["disk", "start"]  # the fixtures, shared with test_firmware_kv

from ptmig.net import frames as fr
from ptmig.net import kvproto as kp

pytestmark = pytest.mark.kvm


def send_burst(g: KvGuest, requests: list[kp.KvRequest]) -> None:
    for req in requests:
        g.host.send(
            fr.udp_frame(
                HOST_MAC, GUEST_MAC, HOST_IP, GUEST_IP, 40000, 7000, kp.encode_request(req)
            )
        )


def collect(g: KvGuest, count: int, timeout: float = 20.0) -> list[kp.KvReply]:
    replies: list[kp.KvReply] = []
    deadline = time.monotonic() + timeout
    while len(replies) < count and (f := g.frame(max(0.0, deadline - time.monotonic()))):
        eth = fr.parse_ethernet(f)
        if eth.ethertype != 0x0800:
            continue
        ip = fr.parse_ipv4(eth.payload)
        replies.append(kp.decode_reply(fr.parse_udp(ip.payload, ip.src, ip.dst).payload))
    return replies


@pytest.mark.parametrize("flags", [0, kp.FLAG_DURABLE])
def test_burst_is_answered_in_order_and_gets_see_earlier_puts(
    start, disk: Path, flags: int
) -> None:
    g = start(disk)
    # 3 keys overwritten in turn, a GET of a key after every PUT, a STATS at the end
    requests: list[kp.KvRequest] = []
    expect: list[tuple[int, bytes | None]] = []  # (status, value) per request
    latest: dict[bytes, bytes] = {}
    rid = 1000
    for n in range(100):  # 200 frames: within the 256-entry RX ring, nothing is dropped
        key = b"k%d" % (n % 3)
        value = b"v%d-" % n + bytes([65 + n % 26]) * (n % 40)
        requests.append(kp.KvRequest(rid, kp.Op.PUT, key, value, flags))
        expect.append((0, b""))
        latest[key] = value
        rid += 1
        probe = b"k%d" % ((n + 1) % 3)
        requests.append(kp.KvRequest(rid, kp.Op.GET, probe, b""))
        expect.append((0, latest[probe]) if probe in latest else (1, b""))
        rid += 1
    send_burst(g, requests)
    replies = collect(g, len(requests))
    assert len(replies) == len(requests), g.console()
    assert [r.req_id for r in replies] == [r.req_id for r in requests]  # arrival order
    assert [(r.status, r.value) for r in replies] == expect
    commits = g.vm.vcpu_stats()[0].workload[9]  # w[9]: log batches submitted
    assert 1 <= commits < 100  # group-committed: batches formed while others were written
    g.close()

    again = start(disk)  # everything acknowledged is in the log, in order
    for key, value in latest.items():
        reply = again.request(kp.Op.GET, key)
        assert reply is not None and (reply.status, reply.value) == (0, value)
