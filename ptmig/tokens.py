"""Random tokens, constant-time comparison and SHA-256 without OpenSSL's libcrypto.

`hashlib`, `hmac` and `secrets` load OpenSSL's libcrypto through `_hashlib` when they are
imported (0.5-0.9 MiB of a VMM's private memory), though what a VMM needs of them is small: a
session token or migration id (`token_hex`, from `os.urandom` as `secrets` draws it), a
comparison of a token a peer sent that takes the same time wherever it differs
(`compare_digest`, CPython's own constant-time comparison that `hmac` falls back to), and the
SHA-256 that names a cached firmware build (`sha256`, the interpreter's built-in
implementation, as `random` takes its SHA-512). A sealed channel's handshake MACs with
`cryptography`, which it loads anyway.
"""

from __future__ import annotations

import os
from _operator import _compare_digest
from typing import TYPE_CHECKING, AnyStr

if TYPE_CHECKING:
    from hashlib import _Hash

try:
    from _sha256 import sha256 as _builtin_sha256  # type: ignore[import-not-found]
except ImportError:  # an interpreter built without its own SHA-256
    _builtin_sha256 = None


def token_hex(nbytes: int) -> str:
    """`nbytes` random bytes from the kernel, as hex (as `secrets.token_hex`)."""
    return os.urandom(nbytes).hex()


def compare_digest(a: AnyStr, b: AnyStr) -> bool:
    """Whether `a` equals `b`, taking the same time wherever they differ (as `hmac`'s)."""
    return bool(_compare_digest(a, b))


def sha256() -> _Hash:
    """A SHA-256 hash object (the built-in one; `hashlib`'s where the interpreter lacks it)."""
    if _builtin_sha256 is not None:
        return _builtin_sha256()  # type: ignore[no-any-return]
    import hashlib

    return hashlib.sha256()
