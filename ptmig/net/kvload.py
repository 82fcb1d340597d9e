"""The kv load engine: a single-threaded request window over a `Datapath`.

Owns the client's behaviour: a bounded key space `{prefix}-{slot}` (the n-th PUT writes slot
n mod `keys` with a self-checking value naming n, so a guest's table never fills however long
the run), a window of outstanding requests, pacing (`rate`) or none, timeout with exponential
backoff and retransmission of the very same request (same req_id, key and value: a
retransmitted PUT is idempotent), the latest acknowledged PUT of every key, the read-back of
every written key at the end, and the measurements: latency percentiles, the longest gap
between two successful replies (the client-observed outage), and completed operations per
100 ms.

At most one request per key is outstanding at any time: a retransmitted older PUT can then
never land after a newer one, so the value the guest holds for a key is exactly the latest
acknowledged one, and anything else read back (an older value, a torn one) is wrong. Only a
PUT still unanswered when the drain gave up leaves a key with two acceptable values.

Phases: LOAD (new requests until the duration ends) → DRAIN (finish the outstanding ones) →
VERIFY (GET every acknowledged key and compare with the value that was acknowledged).
"""

from __future__ import annotations

import heapq
import os
import random
import selectors
import time
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from ptmig.net.hoststack import Datapath
from ptmig.net.kvproto import (
    FLAG_DURABLE,
    MAX_KEY,
    MAX_VALUE,
    REPLY_HEADER,
    REPLY_MAGIC,
    REQUEST_HEADER,
    REQUEST_MAGIC,
)

from ..errors import PtmigError

OP_PUT, OP_GET = 1, 2
ST_OK, ST_NOT_FOUND = 0, 1
BUCKET_S = 0.1
GAP_MIN_S = 0.002  # gaps between successful replies at least this long are kept (`gaps`)
GAPS_KEPT = 4096  # the longest ones, when there are more
RETRANSMIT_SCAN_S = 0.01
DEFAULT_KEYS = 65536  # fits the table of the smallest kv guest (114,688 keys at 256 MiB)
_FILLER = bytes(range(0x30, 0x7B)) * 16  # printable, long enough for any value


def make_key(prefix: bytes, n: int) -> bytes:
    return b"%s-%d" % (prefix, n)


def make_value(key: bytes, n: int, size: int) -> bytes:
    """`key|n|filler...crc32hex`: a wrong or torn value fails `value_is_consistent` and
    differs from what `make_value` gives for any other key or counter."""
    head = b"%s|%d|" % (key, n)
    fill = max(0, size - len(head) - 8)
    off = n % 61
    body = head + _FILLER[off : off + fill]
    return body + b"%08x" % zlib.crc32(body)


def value_is_consistent(value: bytes) -> bool:
    return len(value) >= 8 and b"%08x" % zlib.crc32(value[:-8]) == value[-8:]


@dataclass
class EngineConfig:
    window: int = 128
    rate: float | None = None  # ops/s; None: as fast as the window allows
    duration_s: float = 10.0
    prefix: bytes = b"k"
    keys: int = DEFAULT_KEYS  # key space: PUT n writes key n % keys
    value_size: int = 64
    read_ratio: float = 0.0  # fraction of load-phase ops that GET an acknowledged key
    durable: bool = True
    rto_s: float = 0.2  # first retransmit timeout; doubles up to max_rto_s
    max_rto_s: float = 1.0
    drain_timeout_s: float = 30.0
    verify: bool = True
    verify_stall_s: float = 30.0  # give up verifying after this long without a reply
    ready_timeout_s: float = 30.0

    def check(self) -> None:
        if not 1 <= self.window <= 65536:
            raise ValueError(f"window must be 1..65536, got {self.window}")
        if not self.window < self.keys <= 1 << 32:
            raise ValueError(
                f"key space must be larger than the window ({self.window}) "
                f"and at most 2**32, got {self.keys}"
            )
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.duration_s <= 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        if self.drain_timeout_s <= 0:
            raise ValueError(f"drain timeout must be positive, got {self.drain_timeout_s}")
        if len(self.prefix) > MAX_KEY - 24:
            raise ValueError(f"key prefix is {len(self.prefix)} bytes, max {MAX_KEY - 24}")
        needed = len(make_value(make_key(self.prefix, 10**12), 10**12, 0))
        if not needed <= self.value_size <= MAX_VALUE:
            raise ValueError(
                f"value size must be {needed}..{MAX_VALUE} for prefix "
                f"{self.prefix!r}, got {self.value_size}"
            )
        if not 0.0 <= self.read_ratio < 1.0:
            raise ValueError(f"read ratio must be in [0, 1), got {self.read_ratio}")


@dataclass
class EngineStats:
    ops: int = 0  # load-phase requests completed (any status)
    puts_acked: int = 0
    keys_written: int = 0  # distinct keys with an acknowledged PUT
    gets_ok: int = 0
    errors: int = 0  # BAD_REQUEST / IO_ERROR replies, and PUTs answered NOT_FOUND
    timeouts: int = 0  # retransmit-timer expiries
    retransmits: int = 0
    stray_replies: int = 0  # late duplicates of already-answered requests
    malformed_replies: int = 0
    unanswered: int = 0  # load-phase requests still unanswered when the drain gave up
    lost: int = 0
    wrong: int = 0
    verified: int = 0  # keys read back (each key once, against its latest acknowledged PUT)
    unverified: int = 0
    max_gap_s: float = 0.0
    max_gap_at_s: float = 0.0
    load_elapsed_s: float = 0.0
    verify_elapsed_s: float = 0.0
    latencies_ms: array = field(default_factory=lambda: array("d"))
    completed_at: array = field(default_factory=lambda: array("d"))  # s since t0, per latency
    gaps: list[tuple[float, float]] = field(default_factory=list)  # heap of (length, start)
    series: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # first few lost/wrong keys


class _Pending:
    __slots__ = ("first", "deadline", "rto", "payload", "op", "n", "phase")

    def __init__(
        self, first: float, rto: float, payload: bytes, op: int, n: int, phase: int
    ) -> None:
        self.first = first
        self.deadline = first + rto
        self.rto = rto
        self.payload = payload
        self.op = op
        self.n = n
        self.phase = phase


LOAD, DRAIN, VERIFY, DONE = 0, 1, 2, 3


class NotReadyError(PtmigError, TimeoutError):
    """The data path never became ready (the peer never answered ARP)."""


class LoadEngine:
    def __init__(
        self, datapath: Datapath, config: EngineConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        config.check()
        self.dp = datapath
        self.cfg = config
        self.clock = clock
        self.stats = EngineStats()
        self.latest: array = array("q", [-1]) * config.keys  # per key: n of its latest ack
        self.acked: array = array("q")  # keys (slots) with an acknowledged PUT, first-ack order
        self._busy: set[int] = set()  # keys with a request outstanding
        self._unanswered: dict[int, int] = {}  # key -> n of a PUT the drain gave up on
        self._bad: set[int] = set()
        self.pending: dict[int, _Pending] = {}
        self._req_id = random.getrandbits(32)
        self._next_n = 0
        self._rng = random.Random(os.getpid())
        self._flags = FLAG_DURABLE if config.durable else 0
        self._last_ok = 0.0  # time of the last successful reply
        self._gap_floor = 0.0  # a gap up to this long is neither the longest nor kept
        self.t0: float | None = None  # the clock when the load started
        self._cap = float("inf")  # t0 + duration, once running
        self._end_load = float("inf")  # new requests stop here (`stop_at`, the duration)

    def stop_at(self, when: float) -> None:
        """End the load phase at `when` on the engine's clock (or at the end of the duration,
        whichever comes first); callable from another thread while `run` runs."""
        self._end_load = min(when, self._cap)
        self._verify_last = 0.0

    # ------------------------------------------------------------------ requests

    def key_of(self, n: int) -> bytes:
        """The key the n-th PUT writes (and a GET expecting value n reads)."""
        return make_key(self.cfg.prefix, n % self.cfg.keys)

    def _next_put(self) -> int:
        """The counter of the next PUT: the next n whose key has nothing outstanding (the key
        space is larger than the window, so one is always near)."""
        n, keys, busy = self._next_n, self.cfg.keys, self._busy
        while n % keys in busy:
            n += 1
        self._next_n = n + 1
        return n

    def _pick_get(self) -> int | None:
        """The latest acknowledged n of a random written key with nothing outstanding."""
        acked = self.acked
        for _ in range(4):
            slot = acked[int(self._rng.random() * len(acked))]
            if slot not in self._busy:
                return self.latest[slot]
        return None

    def _send_new(self, op: int, n: int, now: float, phase: int) -> None:
        """Send a PUT of value n, or a GET of n's key expecting value n."""
        rid = self._req_id = (self._req_id + 1) & 0xFFFFFFFF
        key = self.key_of(n)
        self._busy.add(n % self.cfg.keys)
        if op == OP_PUT:
            value = make_value(key, n, self.cfg.value_size)
            payload = (
                REQUEST_HEADER.pack(
                    REQUEST_MAGIC, rid, OP_PUT, self._flags, len(key), len(value), 0
                )
                + key
                + value
            )
        else:
            payload = REQUEST_HEADER.pack(REQUEST_MAGIC, rid, OP_GET, 0, len(key), 0, 0) + key
        self.pending[rid] = _Pending(now, self.cfg.rto_s, payload, op, n, phase)
        self.dp.send(payload)

    def _retransmit(self, now: float) -> None:
        max_rto = self.cfg.max_rto_s
        for p in self.pending.values():
            if now >= p.deadline:
                self.stats.timeouts += 1
                self.stats.retransmits += 1
                p.rto = min(p.rto * 2, max_rto)
                p.deadline = now + p.rto
                self.dp.send(p.payload)

    # ------------------------------------------------------------------ replies

    def _on_reply(self, data: bytes, now: float, t0: float) -> None:
        st = self.stats
        if len(data) < 12:
            st.malformed_replies += 1
            return
        magic, rid, status, _res, vlen = REPLY_HEADER.unpack_from(data)
        if magic != REPLY_MAGIC or len(data) != 12 + vlen:
            st.malformed_replies += 1
            return
        p = self.pending.pop(rid, None)
        if p is None:
            st.stray_replies += 1
            return
        slot = p.n % self.cfg.keys
        self._busy.discard(slot)
        if status > 3:
            st.malformed_replies += 1
        if status <= ST_NOT_FOUND:
            if now - self._last_ok > self._gap_floor:  # the hot path stays a subtraction
                self._gap(now, t0)
            self._last_ok = now
        if p.phase != VERIFY:
            st.ops += 1
            st.latencies_ms.append((now - p.first) * 1000.0)
            st.completed_at.append(now - t0)
            b = int((now - t0) / BUCKET_S)
            series = st.series
            if b >= len(series):
                series.extend([0] * (b + 1 - len(series)))
            series[b] += 1
        if p.op == OP_PUT:
            if status == ST_OK:
                st.puts_acked += 1
                if self.latest[slot] < 0:
                    self.acked.append(slot)
                    st.keys_written += 1
                self.latest[slot] = p.n  # one request per key at a time: acks come in order
            else:
                st.errors += 1
            return
        # GET of an acknowledged key
        if p.phase == VERIFY and status in (ST_OK, ST_NOT_FOUND):
            st.verified += 1
        if status == ST_OK:
            if self._value_ok(p.n, data[12:]):
                st.gets_ok += 1
            else:
                self._problem(p.n, "wrong", data[12:])
        elif status == ST_NOT_FOUND:
            self._problem(p.n, "lost", b"")
        else:
            st.errors += 1

    def _gap(self, now: float, t0: float) -> None:
        """The time since the last successful reply ends here: keep it if it is long."""
        st = self.stats
        gap = now - self._last_ok
        if gap > st.max_gap_s:
            st.max_gap_s, st.max_gap_at_s = gap, self._last_ok - t0
            self._gap_floor = min(GAP_MIN_S, gap)  # shorter gaps change nothing
        if gap >= GAP_MIN_S:
            item = (gap, self._last_ok - t0)
            if len(st.gaps) < GAPS_KEPT:
                heapq.heappush(st.gaps, item)
            elif item > st.gaps[0]:
                heapq.heapreplace(st.gaps, item)

    def _value_ok(self, n: int, value: bytes) -> bool:
        """Is `value` what n's key must hold: value n, or a PUT the drain gave up on?"""
        key, size = self.key_of(n), self.cfg.value_size
        if value == make_value(key, n, size):
            return True
        other = self._unanswered.get(n % self.cfg.keys)
        return other is not None and value == make_value(key, other, size)

    def _give_up_pending(self) -> None:
        """The drain timed out: an unanswered PUT may or may not have been applied."""
        for p in self.pending.values():
            if p.op == OP_PUT:
                self._unanswered[p.n % self.cfg.keys] = p.n
        self.pending.clear()
        self._busy.clear()

    def _problem(self, n: int, kind: str, value: bytes) -> None:
        slot = n % self.cfg.keys
        if slot in self._bad:
            return
        self._bad.add(slot)
        if kind == "lost":
            self.stats.lost += 1
        else:
            self.stats.wrong += 1
        if len(self.stats.problems) < 20:
            key = self.key_of(n).decode()
            self.stats.problems.append(f"{kind}: {key}" + (f" got {value[:48]!r}" if value else ""))

    # ------------------------------------------------------------------ loop

    def _wait_ready(self, sel: selectors.BaseSelector) -> None:
        deadline = self.clock() + self.cfg.ready_timeout_s
        while not self.dp.ready():
            now = self.clock()
            if now >= deadline:
                raise NotReadyError(f"peer did not answer ARP within {self.cfg.ready_timeout_s} s")
            self.dp.tick(now, 0.0)
            sel.select(0.05)
            self.dp.recv_batch()

    def run(self) -> EngineStats:
        cfg, st = self.cfg, self.stats
        sel = selectors.DefaultSelector()
        sel.register(self.dp.fileno(), selectors.EVENT_READ)
        try:
            self._wait_ready(sel)
            self._loop(sel)
        finally:
            sel.close()
        st.unverified = len(self.acked) - st.verified if cfg.verify else 0
        return st

    def _loop(self, sel: selectors.BaseSelector) -> None:
        cfg, st, pending = self.cfg, self.stats, self.pending
        clock, dp = self.clock, self.dp
        t0 = clock()
        self._last_ok = t0
        self.t0 = t0
        self._cap = t0 + cfg.duration_s
        self._end_load = min(self._end_load, self._cap)
        interval = 1.0 / cfg.rate if cfg.rate else 0.0
        next_send = t0
        next_scan = t0 + RETRANSMIT_SCAN_S
        next_tick = t0
        phase = LOAD
        phase_deadline = 0.0
        verify_idx = 0
        verify_t0 = 0.0
        window = cfg.window
        read_ratio = cfg.read_ratio
        rand = self._rng.random
        while phase != DONE:
            now = clock()
            for data in dp.recv_batch():
                self._on_reply(data, now, t0)
            if now >= next_scan:
                self._retransmit(now)
                next_scan = now + RETRANSMIT_SCAN_S
            if now >= next_tick:
                dp.tick(now, now - self._last_ok if pending else 0.0)
                next_tick = now + 0.05
            wait = 0.05
            if phase == LOAD:
                if now >= self._end_load:
                    phase, phase_deadline = DRAIN, now + cfg.drain_timeout_s
                    continue
                if interval and next_send < now - 0.1:
                    next_send = now - 0.1  # after a stall, catch up by at most 100 ms
                sent = 0
                while len(pending) < window and (not interval or next_send <= now) and sent < 64:
                    get = (
                        self._pick_get()
                        if read_ratio and self.acked and rand() < read_ratio
                        else None
                    )
                    if get is not None:
                        self._send_new(OP_GET, get, now, LOAD)
                    else:
                        self._send_new(OP_PUT, self._next_put(), now, LOAD)
                    next_send += interval
                    sent += 1
                if len(pending) < window:
                    wait = 0.0 if not interval else max(0.0, min(wait, next_send - now))
            elif phase == DRAIN:
                if not pending or now >= phase_deadline:
                    st.unanswered = len(pending)
                    st.load_elapsed_s = now - t0
                    self._gap(now, t0)
                    self._give_up_pending()
                    if not cfg.verify:
                        phase = DONE
                        continue
                    phase, verify_t0 = VERIFY, now
                    self._verify_last = now
                    continue
            else:  # VERIFY
                acked, latest = self.acked, self.latest
                while len(pending) < window and verify_idx < len(acked):
                    self._send_new(OP_GET, latest[acked[verify_idx]], now, VERIFY)
                    verify_idx += 1
                if verify_idx >= len(acked) and not pending:
                    phase = DONE
                    st.verify_elapsed_s = now - verify_t0
                    continue
                if self._last_ok > self._verify_last:
                    self._verify_last = self._last_ok
                if now - self._verify_last > cfg.verify_stall_s:
                    st.verify_elapsed_s = now - verify_t0
                    pending.clear()
                    phase = DONE
                    continue
            if wait > 0:
                sel.select(min(wait, max(0.0, next_scan - now)))
