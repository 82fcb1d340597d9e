"""The root of ptmig's exceptions.

Every exception ptmig raises on purpose derives from `PtmigError`, so a caller (a management
layer, a test, the CLI) can tell ptmig's own failures from bugs with one `except`. Each package
keeps its own base below this one (`DeviceError`, `TransportError`, `ProtocolError`,
`ShadowError`...); a class that was also a `ValueError`, `RuntimeError` or `OSError` stays one,
so existing handlers keep catching it. The message is the documentation: it names what went
wrong and with which value.
"""

from __future__ import annotations


class PtmigError(Exception):
    """Base of every exception ptmig defines."""
