"""The learning switch's forwarding database: pure logic, no sockets, time passed in.

Owns the decisions of a learning L2 switch whose ports are UDP endpoints:
- which endpoints are attached (any datagram or hello registers one; silence ages it out),
- which endpoint each source MAC sits behind (learned from frames; a MAC seen behind a new
  endpoint moves there at once, as a hardware switch does after a gratuitous ARP),
- where a frame goes: to the learned endpoint for a known unicast destination, to every other
  endpoint for broadcast, multicast and unknown destinations, nowhere if the destination sits
  behind the endpoint the frame came from.

A `Mirror` (the switch's native fast path) may keep a copy of the MAC table: it is told of
every entry after the table gains it and before the table loses or moves it, so the copy never
holds an entry the table does not; MACs it reports heard count as heard.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

DEFAULT_AGE_S = 300.0

Endpoint = Hashable  # a socket address such as ("127.0.0.1", 40000)


class Mirror(Protocol):
    """A copy of (part of) the MAC table kept elsewhere, e.g. by a native forwarding loop."""

    def put(self, mac: bytes, endpoint: Endpoint) -> None:
        """The table has `mac` behind `endpoint` (new, moved back, or heard again)."""

    def drop(self, mac: bytes) -> None:
        """The table is about to forget or move `mac`: stop using it before this returns."""

    def heard(self) -> Iterable[bytes]:
        """MACs that sent frames through the copy since the last call."""
        return ()


class NoMirror:
    """No copy: the table is the only forwarding state."""

    def put(self, mac: bytes, endpoint: Endpoint) -> None:
        pass

    def drop(self, mac: bytes) -> None:
        pass

    def heard(self) -> Iterable[bytes]:
        return ()


@dataclass
class FdbCounters:
    learned: int = 0
    moved: int = 0
    aged_macs: int = 0
    aged_endpoints: int = 0
    unicast: int = 0
    flooded: int = 0
    hairpin_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ForwardingDatabase:
    """MAC → endpoint table plus the set of live endpoints, both aged after `age_s`."""

    def __init__(
        self,
        age_s: float = DEFAULT_AGE_S,
        *,
        mirror: Mirror | None = None,
        on_change: Callable[[bytes, Endpoint | None, Endpoint], None] | None = None,
    ) -> None:
        if age_s <= 0:
            raise ValueError(f"age must be positive, got {age_s}")
        self.age_s = age_s
        # told (mac, old endpoint or None, new endpoint) when a MAC is learned or moves: rare
        # events an operator wants in the switch's log
        self.on_change = on_change
        self.mirror: Mirror = mirror if mirror is not None else NoMirror()
        self.endpoints: dict[Endpoint, float] = {}  # endpoint -> last heard
        self.macs: dict[bytes, tuple[Endpoint, float]] = {}  # mac -> (endpoint, last seen)
        self.counters = FdbCounters()

    def touch_endpoint(self, endpoint: Endpoint, now: float) -> None:
        self.endpoints[endpoint] = now

    def learn(self, mac: bytes, endpoint: Endpoint, now: float, *, move: bool = True) -> None:
        """Record that `mac` sits behind `endpoint`. With move=False (hellos) a MAC already
        known behind another live endpoint stays where it is."""
        if mac[0] & 1:  # a multicast source address is bogus: never learn it
            return
        entry = self.macs.get(mac)
        if entry is None or now - entry[1] > self.age_s:
            self.counters.learned += 1
        elif entry[0] != endpoint:
            if not move:
                return
            self.counters.moved += 1
        old = None if entry is None or now - entry[1] > self.age_s else entry[0]
        if entry is not None and entry[0] != endpoint:
            self.mirror.drop(mac)  # before the move: the copy must not run ahead of the table
        self.macs[mac] = (endpoint, now)
        self.mirror.put(mac, endpoint)
        if self.on_change is not None and old != endpoint:
            self.on_change(mac, old, endpoint)

    def lookup(self, mac: bytes, now: float) -> Endpoint | None:
        entry = self.macs.get(mac)
        if entry is None:
            return None
        if now - entry[1] > self.age_s:
            self.mirror.drop(mac)
            del self.macs[mac]
            self.counters.aged_macs += 1
            return None
        return entry[0]

    def flood_targets(self, source: Endpoint, now: float) -> list[Endpoint]:
        return [
            ep for ep, seen in self.endpoints.items() if ep != source and now - seen <= self.age_s
        ]

    def forward(self, source: Endpoint, frame: bytes, now: float) -> list[Endpoint]:
        """Learn from an Ethernet frame received from `source`; return where it must go."""
        self.touch_endpoint(source, now)
        self.learn(frame[6:12], source, now)
        dst = frame[0:6]
        if not dst[0] & 1:
            target = self.lookup(dst, now)
            if target is not None:
                if target == source:
                    self.counters.hairpin_dropped += 1
                    return []
                self.counters.unicast += 1
                return [target]
        self.counters.flooded += 1
        return self.flood_targets(source, now)

    def note_heard(self, now: float) -> None:
        """Count the MACs the mirror forwarded frames from (and their endpoints) as heard `now`:
        frames that never reached this table must still keep their senders from aging."""
        for mac in self.mirror.heard():
            entry = self.macs.get(mac)
            if entry is not None:
                self.macs[mac] = (entry[0], now)
                self.endpoints[entry[0]] = now

    def expire(self, now: float) -> None:
        """Drop aged endpoints (and the MACs behind them) and aged MACs."""
        self.note_heard(now)
        dead = [ep for ep, seen in self.endpoints.items() if now - seen > self.age_s]
        for ep in dead:
            del self.endpoints[ep]
        self.counters.aged_endpoints += len(dead)
        dead_set = set(dead)
        stale = [
            mac
            for mac, (ep, seen) in self.macs.items()
            if ep in dead_set or now - seen > self.age_s
        ]
        for mac in stale:
            self.mirror.drop(mac)
            del self.macs[mac]
        self.counters.aged_macs += len(stale)
