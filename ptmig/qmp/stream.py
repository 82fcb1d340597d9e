"""QMP input as a byte stream: cutting it into JSON texts and decoding one strictly.

QMP input has no framing (clients send JSON objects back to back), so :class:`JsonSplitter`
finds where each top-level text ends and recovers from garbage the way QEMU's lexer does, and
:func:`parse_json` decodes one text (UTF-8, no NaN/Infinity). Pure logic, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 20  # bytes of one request (clients send no newline: QMP input is a stream)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(message: bytes) -> Any:
    """Decode one strict-JSON text (UTF-8; NaN and Infinity refused); ValueError if invalid."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("nesting too deep") from exc


# Bytes that are never valid in JSON text: QEMU treats them as lexical errors that reset its
# parser, and the spec tells clients to send one to get the parser back into a known state.
_BAD = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff"
# Inside a string (and right after its backslash) every control byte is an error, tab and
# line ends too: JSON strings carry them escaped only, and QEMU's lexer accepts 0x20-0xFD
# there. So a line end always closes a broken string, wherever a quote in garbage opened it.
_STRING_BAD = rb"\x00-\x1f\xfe\xff"
_STRING_STOP = re.compile(rb'["\\' + _STRING_BAD + rb"]")
# Inside a structure, outside strings: stop at anything that is not part of a number, a
# keyword (true/false/null) or a separator — structural bytes and quotes, and garbage.
_NESTED_STOP = re.compile(rb"[^ \t\r\n0-9:,.+\-eEtrufalsn]")
_SCALAR_END = re.compile(rb'[\s{}\[\]"' + _BAD + rb"]")
_RESYNC = re.compile(rb"[{\[\x00-\x08\x0a-\x1f\xfe\xff]")  # not '\t': QEMU skips it too
_BAD_BYTES = frozenset(
    list(range(0x00, 0x09)) + [0x0B, 0x0C] + list(range(0x0E, 0x20)) + [0xFE, 0xFF]
)
_WHITESPACE = frozenset(b" \t\r\n")


@dataclass(frozen=True)
class InputError:
    """Input that is not a JSON text. ``fatal``: the connection must be dropped (oversize)."""

    desc: str
    fatal: bool = False


class JsonSplitter:
    """Cuts a byte stream into top-level JSON texts, the way QEMU's JSON streamer does.

    QMP input has no framing: clients (``qemu.qmp`` among them) send JSON objects back to back
    with no newline. A text ends when its outermost brace or bracket closes (strings and escapes
    are tracked so braces inside strings do not count); a top-level scalar ends at the next
    whitespace or structural character. A control byte, 0xFE or 0xFF anywhere (inside a string,
    where tab and line ends count too, escaped or not), or a byte that cannot appear in JSON
    outside a string (``{not json``), reports one error and discards the partial text; then, as
    QEMU's lexer recovers, input is skipped up to a point where a new command can start: '{',
    '[', a line end or another control byte (QEMU also stops at '}', ']', ':' and ','; here
    those are skipped too, as at the top level they could only produce more errors, each an
    extra reply that would put a client that pairs replies with commands out of step). So the
    rest of a broken command (``op"}``) is never read as the start of a string that swallows the
    next command, which is answered.
    A text longer than ``max_size`` is fatal.
    Texts are returned unparsed; :func:`parse_json` decides whether they are valid.
    """

    def __init__(self, max_size: int = MAX_MESSAGE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0  # next byte of _buf to examine
        self._recovering = False  # after an invalid byte: drop input up to a resync point
        self._forget()

    def _forget(self) -> None:
        self._start = -1  # index of the current text's first byte; -1 between texts
        self._depth = 0
        self._in_string = False
        self._scalar = False

    def feed(self, data: bytes) -> list[bytes | InputError]:
        """Add received bytes; return the texts (and errors) they complete, in order."""
        buf = self._buf
        buf += data
        out: list[bytes | InputError] = []
        i, n = self._pos, len(buf)

        def emit(end: int) -> None:
            if end - self._start > self.max_size:
                out.append(self._too_big())
            else:
                out.append(bytes(buf[self._start : end]))
            self._forget()

        def bad(at: int) -> None:
            out.append(
                InputError(
                    f"JSON parse error, invalid byte 0x{buf[at]:02x} at offset "
                    f"{at - max(self._start, 0)}; input discarded"
                )
            )
            self._forget()
            self._recovering = True

        while i < n:
            if self._recovering:
                m = _RESYNC.search(buf, i)
                if m is None:
                    i = n
                    break
                self._recovering = False
                i = m.start()  # the resync byte is read again, at the top level
                continue
            if self._start < 0:
                c = buf[i]
                if c in _WHITESPACE:
                    i += 1
                    continue
                self._start = i
                if c in b"{[":
                    self._depth, i = 1, i + 1
                elif c == 0x22:  # '"'
                    self._in_string, i = True, i + 1
                elif c in b"}]":
                    out.append(InputError(f"JSON parse error, unexpected '{chr(c)}'"))
                    self._forget()
                    i += 1
                elif c in _BAD_BYTES:
                    bad(i)
                    i += 1
                else:
                    self._scalar = True
                continue
            if self._in_string:
                m = _STRING_STOP.search(buf, i)
                if m is None:
                    i = n
                    break
                j = m.start()
                if buf[j] == 0x5C:  # backslash: skip the escaped byte, or wait for it
                    if j + 1 >= n:
                        i = j
                        break
                    if buf[j + 1] < 0x20 or buf[j + 1] >= 0xFE:
                        bad(j + 1)
                        i = j + 2
                        continue
                    i = j + 2
                elif buf[j] == 0x22:
                    self._in_string, i = False, j + 1
                    if self._depth == 0:
                        emit(i)
                else:
                    bad(j)
                    i = j + 1
                continue
            if self._scalar:
                m = _SCALAR_END.search(buf, i)
                if m is None:
                    i = n
                    break
                emit(m.start())
                i = m.start()  # the delimiter starts the next text (or is whitespace)
                continue
            m = _NESTED_STOP.search(buf, i)
            if m is None:
                i = n
                break
            j = m.start()
            c, i = buf[j], j + 1
            if c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    emit(i)
            elif c == 0x22:
                self._in_string = True
            else:
                bad(j)  # not JSON at all (``{not json``), or a control byte
        if self._start >= 0 and n - self._start > self.max_size:
            out.append(self._too_big())
            self._forget()
            i = n
        keep = self._start if self._start >= 0 else i
        del buf[:keep]
        self._pos = i - keep
        if self._start >= 0:
            self._start = 0
        return out

    def _too_big(self) -> InputError:
        return InputError(
            f"QMP input exceeds {self.max_size} bytes; closing the connection", fatal=True
        )
