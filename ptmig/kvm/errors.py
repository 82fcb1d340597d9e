"""Errors raised by the KVM layer."""

from __future__ import annotations

import errno
import os

from ..errors import PtmigError


class KvmError(PtmigError, OSError):
    """A KVM ioctl failed; carries the errno and the name of the ioctl."""

    def __init__(self, ioctl_name: str, err: int, detail: str = "") -> None:
        self.ioctl_name = ioctl_name
        self.detail = detail
        msg = f"KVM_{ioctl_name} failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(err, msg)

    def __str__(self) -> str:
        return self.args[1]


class KvmUnavailable(PtmigError, RuntimeError):
    """/dev/kvm is absent, not accessible, or lacks a capability ptmig needs."""
