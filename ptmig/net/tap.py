"""The TAP backend (`tap:IFNAME`): frames exchanged with a Linux TAP interface.

Owns the /dev/net/tun plumbing: TUNSETIFF with IFF_TAP | IFF_NO_PI (creates the interface if
it does not exist, attaches to it if it does), bringing the link up (SIOCGIFFLAGS /
SIOCSIFFLAGS), and non-blocking whole-frame reads and writes. Needs CAP_NET_ADMIN.

The interface is not persistent: it disappears when the last descriptor is closed, unless it
was created persistent by someone else (e.g. `ip tuntap add`). Only one process at a time can
attach to a single-queue TAP interface; a second one gets a clear error.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from ptmig.net.backend import BackendSpec, NetBackend, NetBackendError, validate_ifname

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name + ifr_flags, 40 bytes in all


def _needs_admin(ifname: str, action: str, exc: OSError) -> NetBackendError:
    return NetBackendError(
        exc.errno,
        f"tap:{ifname}: {action} needs CAP_NET_ADMIN (run as root, or create the "
        f"interface beforehand with `ip tuntap add {ifname} mode tap user $USER`): {exc}",
    )


def bring_up(ifname: str) -> None:
    """Set IFF_UP on the interface (no-op if already up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = _IFREQ.pack(ifname.encode(), 0)
        try:
            flags = _IFREQ.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
            if not flags & IFF_UP:
                fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ.pack(ifname.encode(), flags | IFF_UP))
        except PermissionError as exc:
            raise _needs_admin(ifname, "bringing the interface up", exc) from exc
        except OSError as exc:
            raise NetBackendError(
                exc.errno, f"tap:{ifname}: cannot bring the interface up: {exc}"
            ) from exc


class TapNetBackend(NetBackend):
    """A TAP interface opened with IFF_TAP | IFF_NO_PI: each read/write is one frame."""

    def __init__(self, spec: BackendSpec, mac: bytes | None = None) -> None:
        super().__init__(spec, mac)
        self.ifname = validate_ifname(spec.ifname)
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NetBackendError(
                exc.errno,
                f"tap:{self.ifname}: {TUN_DEVICE} does not exist (load the tun kernel module)",
            ) from exc
        except PermissionError as exc:
            raise _needs_admin(self.ifname, f"opening {TUN_DEVICE}", exc) from exc
        try:
            try:
                fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(self.ifname.encode(), IFF_TAP | IFF_NO_PI))
            except PermissionError as exc:
                raise _needs_admin(
                    self.ifname, "creating/attaching the TAP interface", exc
                ) from exc
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise NetBackendError(
                        exc.errno,
                        f"tap:{self.ifname}: the interface is already attached to another process",
                    ) from exc
                if exc.errno == errno.EINVAL:
                    raise NetBackendError(
                        exc.errno,
                        f"tap:{self.ifname}: exists but is not a "
                        "TAP interface (or has other flags)",
                    ) from exc
                raise NetBackendError(
                    exc.errno, f"tap:{self.ifname}: TUNSETIFF failed: {exc}"
                ) from exc
            bring_up(self.ifname)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        try:
            os.write(self._fd, frame)
        except (BlockingIOError, InterruptedError):
            self.counters.tx_dropped += 1
            return
        except OSError as exc:
            # EIO: link down; EINVAL: bad frame size. Both are drops, not VMM failures.
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOBUFS):
                self.counters.tx_dropped += 1
                return
            raise
        self.counters.tx_frames += 1
        self.counters.tx_bytes += len(frame)

    def recv(self) -> bytes | None:
        try:
            data = os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return None
        self.counters.rx_frames += 1
        self.counters.rx_bytes += len(data)
        return data

    def maintain(self, now: float | None = None) -> None:
        """Nothing to keep alive: the kernel knows the interface as long as the fd is open."""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
