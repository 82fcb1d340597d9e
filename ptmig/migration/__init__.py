"""Live migration: the sans-I/O protocol, its wire format, page runs, transport, policies, verify.

    events     the protocol's events and errors
    frames     the wire format (preamble, frame header, metadata layouts, size caps)
    protocol   `Connection(role)`: the state machine, one transition table for both roles
    pages      dirty bitmap → page-run batches, zero pages, run validation (numpy, no page loops)
    transport  TCP (+ mutual TLS or a pre-shared-key handshake), scatter/gather sends
    policy     convergence, bandwidth estimate, auto-converge, rate limit, timeouts (pure)
    verify     per-page RAM digests for verified migrations

The engine that drives a VM through a migration lives elsewhere and uses these.

The names below are re-exported from their modules on first use (PEP 562): a VMM imports this
package for its parameters (`params`) without loading the protocol and numpy, which only a
VMM that migrates needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ptmig.migration.events import (
        NEED_DATA,
        RUN_DTYPE,
        Abort,
        Complete,
        DeviceStates,
        Event,
        Hello,
        HelloAck,
        LocalProtocolError,
        PageRuns,
        PageRunsHeader,
        ProtocolError,
        RemoteProtocolError,
        Role,
        RoundEnd,
        RoundStart,
        RunKind,
        SwitchoverAck,
        VcpuStates,
        VerifyDigests,
        VerifyReport,
        make_runs,
    )
    from ptmig.migration.frames import MAGIC, PROTOCOL_VERSION
    from ptmig.migration.protocol import (
        Connection,
        ConnectionClosed,
        State,
        check_hello,
        compare_fingerprints,
        hello,
    )

__all__ = [
    "MAGIC",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "RUN_DTYPE",
    "Abort",
    "Complete",
    "Connection",
    "ConnectionClosed",
    "DeviceStates",
    "Event",
    "Hello",
    "HelloAck",
    "LocalProtocolError",
    "PageRuns",
    "PageRunsHeader",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "RoundEnd",
    "RoundStart",
    "RunKind",
    "State",
    "SwitchoverAck",
    "VcpuStates",
    "VerifyDigests",
    "VerifyReport",
    "check_hello",
    "compare_fingerprints",
    "hello",
    "make_runs",
]

_SOURCE = {
    **dict.fromkeys(("MAGIC", "PROTOCOL_VERSION"), "frames"),
    **dict.fromkeys(
        ("Connection", "ConnectionClosed", "State", "check_hello", "compare_fingerprints", "hello"),
        "protocol",
    ),
}


def __getattr__(name: str) -> Any:
    """A re-exported name, imported from its module now (events unless `_SOURCE` says)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_SOURCE.get(name, 'events')}")
    value = getattr(module, name)
    globals()[name] = value
    return value
