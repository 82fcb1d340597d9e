"""Network backends: where a virtio-net device's frames go outside the VM.

Owns the `NetBackend` interface, its counters, the parsing of backend specs and the UDP
backend (`udp:HOST:PORT`: one Ethernet frame per datagram, exchanged with the learning switch
in `ptmig.net.switch`). The TAP backend lives in `ptmig.net.tap`.

Every backend is non-blocking: `send` never waits (a frame that cannot go out now is dropped
and counted, as a NIC drops on a full or dead link) and `recv` returns None when nothing is
pending. `fileno()` is for a selector.
"""

from __future__ import annotations

import errno
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Literal

from ptmig.net import switchproto
from ptmig.net.frames import ETH_HEADER_LEN, rarp_announce_frame

from ..errors import PtmigError

MAX_FRAME = 65507  # the largest UDP payload over IPv4
HELLO_INTERVAL_S = 5.0
SOCKET_BUFFER = 4 << 20


class NetBackendError(PtmigError, OSError):
    """A backend that cannot be opened or used, with the reason and the spec."""


@dataclass
class NetCounters:
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0
    hellos_sent: int = 0
    hello_acks: int = 0
    peer_unreachable: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class BackendSpec:
    """A parsed `udp:HOST:PORT` or `tap:IFNAME`."""

    kind: Literal["udp", "tap"]
    host: str = ""
    port: int = 0
    ifname: str = ""

    def __str__(self) -> str:
        if self.kind == "udp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"udp:{host}:{self.port}"
        return f"tap:{self.ifname}"


def parse_host_port(text: str, *, what: str = "address") -> tuple[str, int]:
    """`HOST:PORT` (or `[V6]:PORT`) into (host, port), with a clear error."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what} must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{what} port is not a number in {text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{what} port must be 1..65535, got {port} in {text!r}")
    return host, port


def validate_ifname(name: str) -> str:
    if not 1 <= len(name.encode()) <= 15:
        raise ValueError(f"interface name must be 1..15 bytes, got {name!r}")
    if any(c in name for c in "/: \t\n") or name in (".", ".."):
        raise ValueError(f"interface name contains a forbidden character: {name!r}")
    return name


def parse_backend_spec(spec: str) -> BackendSpec:
    kind, sep, rest = spec.partition(":")
    if kind == "udp" and sep:
        host, port = parse_host_port(rest, what=f"backend {spec!r}")
        return BackendSpec("udp", host=host, port=port)
    if kind == "tap" and sep:
        return BackendSpec("tap", ifname=validate_ifname(rest))
    raise ValueError(f"backend must be udp:HOST:PORT or tap:IFNAME, got {spec!r}")


class NetBackend(ABC):
    """One Ethernet link: whole frames in, whole frames out, never blocking."""

    def __init__(self, spec: BackendSpec, mac: bytes | None) -> None:
        if mac is not None and len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}: {mac!r}")
        self.spec = spec
        self.mac = mac
        self.counters = NetCounters()

    @abstractmethod
    def fileno(self) -> int: ...

    @abstractmethod
    def send(self, frame: bytes | bytearray | memoryview) -> None:
        """Send one frame now or drop it (counted in tx_dropped)."""

    @abstractmethod
    def recv(self) -> bytes | None:
        """The next received frame, or None if none is pending."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def maintain(self, now: float | None = None) -> None:
        """Periodic housekeeping (keepalives); call at least every few seconds."""

    def announce(self) -> None:
        """Tell the network this MAC is here now (after a migration's switchover): a
        broadcast RARP announcement, which switches learn from as from any frame."""
        if self.mac is None:
            raise NetBackendError(f"{self.spec}: cannot announce without a MAC")
        self.send(rarp_announce_frame(self.mac))

    def __enter__(self) -> NetBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UdpNetBackend(NetBackend):
    """Frames carried in UDP datagrams to and from the learning switch at HOST:PORT."""

    def __init__(
        self, spec: BackendSpec, mac: bytes | None = None, hello_interval: float = HELLO_INTERVAL_S
    ) -> None:
        super().__init__(spec, mac)
        try:
            infos = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise NetBackendError(f"{spec}: cannot resolve host {spec.host!r}: {exc}") from exc
        family, _, _, _, addr = infos[0]
        self.switch_addr = addr
        self.hello_interval = hello_interval
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                self._sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            self._sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
            self._sock.connect(addr)
            self._sock.setblocking(False)
        except OSError as exc:
            self._sock.close()
            raise NetBackendError(f"{spec}: cannot set up the UDP socket: {exc}") from exc
        self._last_hello = float("-inf")
        self.maintain()

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def fileno(self) -> int:
        return self._sock.fileno()

    def _send_raw(self, data: bytes | bytearray | memoryview) -> bool:
        try:
            self._sock.send(data)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionRefusedError:  # ICMP port unreachable: no switch right now
            self.counters.peer_unreachable += 1
            return False
        except OSError as exc:
            if exc.errno in (
                errno.ENOBUFS,
                errno.EHOSTUNREACH,
                errno.ENETUNREACH,
                errno.ENETDOWN,
                errno.EMSGSIZE,
            ):
                return False
            raise

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        n = len(frame)
        # A datagram shorter than an Ethernet header would be read as a control message.
        if n < ETH_HEADER_LEN or n > MAX_FRAME or not self._send_raw(frame):
            self.counters.tx_dropped += 1
            return
        self.counters.tx_frames += 1
        self.counters.tx_bytes += n

    def send_hello(self) -> None:
        self._last_hello = time.monotonic()
        if self._send_raw(switchproto.hello(self.mac)):
            self.counters.hellos_sent += 1

    def maintain(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._last_hello >= self.hello_interval:
            self.send_hello()

    def recv(self) -> bytes | None:
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionRefusedError:
                self.counters.peer_unreachable += 1
                continue
            n = len(data)
            if n < ETH_HEADER_LEN:
                if switchproto.is_control(data) and data[4] == switchproto.Msg.HELLO_ACK:
                    self.counters.hello_acks += 1
                else:
                    self.counters.rx_dropped += 1
                continue
            self.counters.rx_frames += 1
            self.counters.rx_bytes += n
            return data

    def close(self) -> None:
        self._sock.close()


def coerce_spec(spec: object) -> BackendSpec:
    """A BackendSpec from a spec string, a BackendSpec, or any object with `host`/`port`
    (UDP) or `ifname` (TAP) attributes, such as the VM config's parsed backends."""
    if isinstance(spec, BackendSpec):
        return spec
    if isinstance(spec, str):
        return parse_backend_spec(spec)
    ifname = getattr(spec, "ifname", None)
    if isinstance(ifname, str):
        return BackendSpec("tap", ifname=validate_ifname(ifname))
    host, port = getattr(spec, "host", None), getattr(spec, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return parse_backend_spec(f"udp:{host}:{port}")
    raise ValueError(f"not a network backend spec: {spec!r}")


def open_backend(spec: str | BackendSpec | object, *, mac: bytes | None = None) -> NetBackend:
    """Open `udp:HOST:PORT` or `tap:IFNAME` (or a parsed spec, see `coerce_spec`). `mac` is
    the VM's MAC (used for hellos and announcements). Raises NetBackendError when the backend
    cannot be opened, ValueError when the spec is malformed."""
    parsed = coerce_spec(spec)
    if parsed.kind == "udp":
        return UdpNetBackend(parsed, mac)
    from ptmig.net.tap import TapNetBackend

    return TapNetBackend(parsed, mac)
