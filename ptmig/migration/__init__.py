"""Live migration: the sans-I/O protocol, its wire format, page runs, transport, policies, verify.

    events     the protocol's events and errors
    frames     the wire format (preamble, frame header, metadata layouts, size caps)
    protocol   `Connection(role)`: the state machine, one transition table for both roles
    pages      dirty bitmap → page-run batches, zero pages, run validation (numpy, no page loops)
    transport  TCP (+ mutual TLS or a pre-shared-key handshake), scatter/gather sends
    policy     convergence, bandwidth estimate, auto-converge, rate limit, timeouts (pure)
    verify     per-page RAM digests for verified migrations

The engine that drives a VM through a migration lives elsewhere and uses these.
"""

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
