"""The sealed migration channel under a pre-shared key: handshake, key schedule, record layer.

This module owns the cryptography of PSK mode; `transport` owns the sockets and calls it.

Handshake (each TCP connection of a migration runs one, before any migration byte):

    server → client   GREETING + nonce_s (32 random bytes)
    client → server   kind (1 byte) + nonce_c (32) [+ session_id (16) + index (1) if kind=JOIN]
                      + proof_c (32)
    server → client   b"\\x01" + proof_s (32)    (b"\\x00" + 32 zero bytes: proof_c was wrong)
    client → server   b"\\x01" if proof_s is right, else b"\\x00"

    transcript = GREETING + nonce_s + everything the client sent before proof_c
    kind NEW  (the main stream): auth key = HKDF(psk, info="ptmig psk auth")
    kind JOIN (a data channel):  auth key = HKDF(session secret, info="ptmig join"): only a
              peer that completed this migration's main handshake can compute it
    proof_c = HMAC-SHA256(auth key, "client" + transcript), proof_s likewise with "server";
    both compared in constant time.

Key schedule. A NEW handshake starts a session: secret = HKDF(psk, salt=nonce_s + nonce_c,
info="ptmig session"), id = HKDF(secret, info="ptmig session id")[:16] (public: the name a
data channel joins). Every stream of the session (main = 0, data channel i = i + 1) gets one
AES-256-GCM key per direction: HKDF(secret, salt = that connection's nonce_s + nonce_c,
info = "ptmig stream" + direction + stream index). Fresh nonces make fresh keys per connection.

Records. After the handshake every byte each way travels in records:

    length (4 bytes, little-endian: ciphertext + 16-byte tag) + AES-GCM(plaintext)
    nonce = direction (1) + stream index (1) + 0 (2) + sequence number (8, from 0 per direction)
    associated data = the 4 length bytes

The sequence number is implicit: a record that was replayed, reordered, dropped, or moved from
another stream or direction fails its tag, as does a flipped bit anywhere. A record carries at
most `MAX_RECORD` plaintext bytes, so a receiver buffers a bounded amount before it can check
it. What records do not hide: the length of each record, the timing, and the end of a stream
(a cut after a complete record looks like a close; the migration protocol then refuses the
truncated conversation, see `protocol.CLOSABLE_STATES`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..errors import PtmigError
from ..tokens import compare_digest, token_hex

GREETING: Final = b"PTMIG-PSK2"
NONCE: Final = 32
MAC: Final = 32
SESSION_ID: Final = 16
KIND_NEW: Final = 0
KIND_JOIN: Final = 1
TAG: Final = 16
RECORD_HEADER: Final = struct.Struct("<I")
MAX_RECORD: Final = 1 << 20  # plaintext bytes per record
MIN_PSK: Final = 16
CLIENT_TO_SERVER: Final = 0
SERVER_TO_CLIENT: Final = 1


class SealError(PtmigError):
    """Authentication of the peer or of a record failed; the text says which and why."""


# `cryptography` is imported where a key is first derived or used, not with this module: a VMM
# that never runs a PSK channel does not carry it (about 1.5 MiB of its private memory).


def load_cryptography() -> None:
    """Import what this module uses of `cryptography` (about 9 ms on a quiet host). Each
    handshake calls it while the peer is busy (the server right after its challenge, the client
    before it reads it), so that the two VMMs' imports overlap instead of adding up on the
    migration's clock."""
    from cryptography.exceptions import InvalidTag  # noqa: F401
    from cryptography.hazmat.primitives import hashes  # noqa: F401
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: F401
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: F401


def _hkdf(ikm: bytes, info: bytes, salt: bytes | None = None, length: int = 32) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.hmac import HMAC

    mac = HMAC(key, hashes.SHA256())
    mac.update(label + transcript)
    return mac.finalize()


@dataclass(frozen=True)
class Session:
    """One migration's shared secret; its streams' keys derive from it."""

    secret: bytes
    id: bytes

    @classmethod
    def start(cls, psk: bytes, nonce_s: bytes, nonce_c: bytes) -> Session:
        secret = _hkdf(psk, b"ptmig session", salt=nonce_s + nonce_c)
        return cls(secret, _hkdf(secret, b"ptmig session id", length=SESSION_ID))

    def join_key(self) -> bytes:
        return _hkdf(self.secret, b"ptmig join")


class Sealer:
    """One direction of one stream: seals or opens records in order."""

    def __init__(self, key: bytes, direction: int, stream: int) -> None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self._invalid_tag = InvalidTag
        self._prefix = bytes([direction, stream, 0, 0])
        self.seq = 0

    def _nonce(self) -> bytes:
        nonce = self._prefix + self.seq.to_bytes(8, "little")
        self.seq += 1
        return nonce

    def seal_into(self, plaintext: memoryview, out: memoryview) -> None:
        """One record into `out` (exactly header + plaintext + tag bytes)."""
        n = plaintext.nbytes
        if n > MAX_RECORD or out.nbytes != RECORD_HEADER.size + n + TAG:
            raise ValueError(f"record of {n} bytes (limit {MAX_RECORD}) into {out.nbytes} bytes")
        header = RECORD_HEADER.pack(n + TAG)
        out[: RECORD_HEADER.size] = header
        self._aead.encrypt_into(self._nonce(), plaintext, header, out[RECORD_HEADER.size :])

    def open_into(self, header: bytes, body: memoryview, out: memoryview) -> None:
        """Check and decrypt one record's body (ciphertext + tag) into `out`. On failure `out`
        may hold unauthenticated bytes: the caller must discard the whole stream's work."""
        try:
            self._aead.decrypt_into(self._nonce(), body, header, out)
        except self._invalid_tag:
            raise SealError(
                f"record {self.seq - 1} ({len(body)} bytes) failed authentication: it was "
                "altered, replayed, reordered, dropped before, or belongs to another stream"
            ) from None


def record_length(header: bytes) -> int:
    """Ciphertext bytes announced by a record header, checked before any is buffered."""
    (n,) = RECORD_HEADER.unpack(header)
    if not TAG <= n <= MAX_RECORD + TAG:
        raise SealError(f"sealed record announces {n} bytes, allowed {TAG}..{MAX_RECORD + TAG}")
    return n


@dataclass
class StreamKeys:
    """The outcome of a handshake: this stream's session, index, and sealers."""

    session: Session
    stream: int
    send: Sealer
    recv: Sealer


def _stream_keys(session: Session, stream: int, nonces: bytes, server: bool) -> StreamKeys:
    keys = [
        _hkdf(session.secret, b"ptmig stream" + bytes([d, stream]), salt=nonces)
        for d in (CLIENT_TO_SERVER, SERVER_TO_CLIENT)
    ]
    c2s = Sealer(keys[0], CLIENT_TO_SERVER, stream)
    s2c = Sealer(keys[1], SERVER_TO_CLIENT, stream)
    return StreamKeys(session, stream, *((s2c, c2s) if server else (c2s, s2c)))


def new_key_file(path: Path) -> Path:
    """Write a fresh random pre-shared key (64 hex digits) to `path`, readable by its owner
    only; for VMMs one program starts for itself (demo, bench, tests)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token_hex(32) + "\n")
    return path


def check_psk(psk: bytes) -> None:
    if len(psk) < MIN_PSK:
        raise ValueError(f"pre-shared key is {len(psk)} bytes; use at least {MIN_PSK}")


Send = Callable[[bytes], None]
Recv = Callable[[int, str], bytes]  # (exact byte count, what is awaited) → bytes


def server_handshake(
    send: Send, recv: Recv, psk: bytes, sessions: dict[bytes, Session]
) -> StreamKeys:
    """The listening side. `sessions`: the sessions this listener started, which data
    channels may join (a NEW handshake adds its session)."""
    nonce_s = os.urandom(NONCE)
    send(GREETING + nonce_s)
    load_cryptography()  # while the client does the same
    head = recv(1 + NONCE, "the client's PSK handshake")
    kind, nonce_c = head[0], head[1:]
    transcript = GREETING + nonce_s + head
    if kind == KIND_NEW:
        session = Session.start(psk, nonce_s, nonce_c)
        key, stream = _hkdf(psk, b"ptmig psk auth"), 0
    elif kind == KIND_JOIN:
        ref = recv(SESSION_ID + 1, "the data channel's session")
        transcript += ref
        known = sessions.get(ref[:SESSION_ID])
        if known is None:
            recv(MAC, "the client's PSK proof")
            send(b"\x00" + bytes(MAC))
            raise SealError(
                "a data channel asked to join a migration session this side does "
                "not know (a stale or forged session id)"
            )
        session, key, stream = known, known.join_key(), ref[SESSION_ID] + 1
    else:
        raise SealError(f"PSK handshake kind {kind} is neither new (0) nor join (1)")
    proof = recv(MAC, "the client's PSK proof")
    if not compare_digest(proof, _mac(key, b"client", transcript)):
        send(b"\x00" + bytes(MAC))
        raise SealError(
            "PSK authentication failed: the client's proof does not match our key "
            "(the two sides have different pre-shared keys)"
        )
    send(b"\x01" + _mac(key, b"server", transcript))
    if recv(1, "the client's PSK verdict") != b"\x01":
        raise SealError("PSK authentication failed: the client rejected our proof")
    if kind == KIND_NEW:
        sessions[session.id] = session
    return _stream_keys(session, stream, nonce_s + nonce_c, server=True)


def client_handshake(
    send: Send, recv: Recv, psk: bytes, join: tuple[Session, int] | None = None
) -> StreamKeys:
    """The connecting side: a new session (main stream), or `join=(session, index)` for
    data channel `index` of an existing one."""
    load_cryptography()  # while the server does the same
    hello = recv(len(GREETING) + NONCE, "the server's PSK challenge (does it use a PSK?)")
    if not hello.startswith(GREETING):
        raise SealError(
            f"expected a PSK challenge, got {hello[: len(GREETING)]!r}: the server "
            "is not using a pre-shared key (or speaks another version)"
        )
    nonce_s, nonce_c = hello[len(GREETING) :], os.urandom(NONCE)
    if join is None:
        session = Session.start(psk, nonce_s, nonce_c)
        sent, key, stream = bytes([KIND_NEW]) + nonce_c, _hkdf(psk, b"ptmig psk auth"), 0
    else:
        session, index = join
        if not 0 <= index < 255:
            raise ValueError(f"data channel index {index} outside 0..254")
        sent = bytes([KIND_JOIN]) + nonce_c + session.id + bytes([index])
        key, stream = session.join_key(), index + 1
    transcript = GREETING + nonce_s + sent
    send(sent + _mac(key, b"client", transcript))
    verdict = recv(1 + MAC, "the server's PSK verdict")
    if verdict[0] != 1:
        raise SealError(
            "PSK authentication failed: the server rejected our proof "
            "(the two sides have different pre-shared keys, or it does not know "
            "this migration)"
        )
    if not compare_digest(verdict[1:], _mac(key, b"server", transcript)):
        send(b"\x00")
        raise SealError("PSK authentication failed: the server's proof does not match our key")
    send(b"\x01")
    return _stream_keys(session, stream, nonce_s + nonce_c, server=False)
