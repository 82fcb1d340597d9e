"""The QMP control socket: a QEMU Machine Protocol server on a unix socket.

This module owns the wire protocol (greeting, capabilities negotiation, request checking, ``id``
echoing, error replies, timestamped events), argument checking against a small per-command
schema, and the server thread. It owns no VM state: the VMM registers its commands
(``query-status``, ``stop``, ``cont``, ``migrate``...) as plain callables and calls
:meth:`QmpServer.emit` for events. Existing QMP clients (``qemu.qmp``, ``qmp-shell``, libvirt's
monitor code) can drive ptmig through it.

Layers, pure first:

- :class:`JsonSplitter`, :func:`check_arguments` and :class:`QmpSession` are protocol logic with
  no I/O: the splitter cuts the unframed input stream into JSON texts, a session turns one text
  into either a ready reply or a :class:`Call` to run.
- :class:`QmpServer` is the I/O shell: an asyncio loop in its own thread (the VMM's vCPU threads
  block in KVM_RUN) accepts clients; handlers run in a worker pool so a slow command does not
  stall other clients; each client's commands are answered in the order it sent them.

Differences from QEMU, on purpose: no out-of-band execution (the greeting offers no ``oob``), no
single-quoted-string JSON extension, and a request longer than the cap (1 MiB) gets an error
reply and a disconnect (there is no way to resynchronise inside it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import re
import socket
import stat
import threading
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ptmig import __version__

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20  # bytes of one request (clients send no newline: QMP input is a stream)
MAX_OUTPUT_BACKLOG = 8 << 20  # unsent bytes to a client that does not read before we drop it
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


class ErrorClass(StrEnum):
    """QMP error classes (QEMU's ``QapiErrorClass``)."""

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QmpError(Exception):
    """Raised by a command handler: becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, error_class: ErrorClass | str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = str(error_class)
        self.desc = desc


class RunStatus(StrEnum):
    """QEMU's ``RunState`` values, as ``query-status`` reports them."""

    DEBUG = "debug"
    FINISH_MIGRATE = "finish-migrate"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"


def query_status_reply(status: RunStatus) -> dict[str, Any]:
    """The ``query-status`` return value; ``running`` is true only in the running state."""
    return {"status": str(status), "running": status is RunStatus.RUNNING, "singlestep": False}


def version_info(version: str = __version__) -> dict[str, Any]:
    """``query-version``'s shape (also the greeting's ``version``) for a "major.minor.micro"."""
    numbers = [int(p) if p.isdigit() else 0 for p in version.split(".")[:3]]
    major, minor, micro = (numbers + [0, 0, 0])[:3]
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"ptmig {version}",
    }


def timestamp(now: float | None = None) -> dict[str, int]:
    """An event timestamp: seconds and microseconds since the Unix epoch."""
    t = time.time() if now is None else now
    seconds = int(t)
    return {"seconds": seconds, "microseconds": int((t - seconds) * 1_000_000)}


# --------------------------------------------------------------------------- argument schema

# A schema maps an argument name to its type; a leading "*" marks it optional (QAPI's
# notation): {"uri": str, "*detach": bool, "*enable": list[str], "*mode": ("a", "b")}.
# Types: str, int, float (any JSON number), bool, dict, list, list[T], object (anything),
# or a tuple of strings (an enumeration).
ArgType = Any
ArgSchema = Mapping[str, ArgType]

_TYPE_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    object: "any",
}


def _type_name(kind: ArgType) -> str:
    if isinstance(kind, tuple):
        return "one of " + ", ".join(repr(v) for v in kind)
    if typing.get_origin(kind) is list:
        (inner,) = typing.get_args(kind)
        return f"array of {_type_name(inner)}"
    return _TYPE_NAMES[kind]


def _matches(value: Any, kind: ArgType) -> bool:
    if isinstance(kind, tuple):
        return isinstance(value, str) and value in kind
    if typing.get_origin(kind) is list:
        (inner,) = typing.get_args(kind)
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_schema(name: str, schema: ArgSchema) -> None:
    for key, kind in schema.items():
        base = typing.get_origin(kind) or kind
        ok = (
            isinstance(kind, tuple) and all(isinstance(v, str) for v in kind)
        ) or base in _TYPE_NAMES
        if base is list and typing.get_args(kind):
            ok = True
            _check_schema(name, {key: typing.get_args(kind)[0]})
        if not ok:
            raise TypeError(f"command {name!r}: argument {key!r} has unsupported type {kind!r}")


def check_arguments(schema: ArgSchema, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``arguments`` against ``schema``; return them keyed by Python names ('-' → '_').

    Raises QmpError(GenericError) for an unexpected, missing or wrongly typed argument, in
    QEMU's wording, with the offending value added.
    """
    wanted = {key.lstrip("*"): (kind, not key.startswith("*")) for key, kind in schema.items()}
    for key in arguments:
        if key not in wanted:
            raise QmpError(ErrorClass.GENERIC_ERROR, f"Parameter '{key}' is unexpected")
    result: dict[str, Any] = {}
    for key, (kind, required) in wanted.items():
        if key not in arguments:
            if required:
                raise QmpError(ErrorClass.GENERIC_ERROR, f"Parameter '{key}' is missing")
            continue
        value = arguments[key]
        if not _matches(value, kind):
            if isinstance(kind, tuple) and isinstance(value, str):
                allowed = ", ".join(kind)
                desc = f"Parameter '{key}' does not accept value '{value}' (allowed: {allowed})"
            else:
                desc = (
                    f"Invalid parameter type for '{key}', expected: {_type_name(kind)} "
                    f"(got {json.dumps(value)[:80]})"
                )
            raise QmpError(ErrorClass.GENERIC_ERROR, desc)
        result[key.replace("-", "_")] = value
    return result


# --------------------------------------------------------------------------- protocol (no I/O)

Handler = Callable[..., Any]


@dataclass(frozen=True)
class Command:
    """A registered command: its handler and argument schema."""

    name: str
    handler: Handler
    schema: ArgSchema = field(default_factory=dict)


class _NoId:
    """Marks a request that carried no ``id`` (distinct from ``"id": null``)."""

    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Any = _NoId()


@dataclass(frozen=True)
class Call:
    """A checked request, ready to run: ``command.handler(**kwargs)``."""

    command: Command
    kwargs: dict[str, Any]
    id: Any = NO_ID


def encode(message: Mapping[str, Any]) -> bytes:
    """One server message on the wire: ASCII JSON terminated by CRLF."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\r\n"


def success(value: Any, msg_id: Any = NO_ID) -> dict[str, Any]:
    reply: dict[str, Any] = {"return": {} if value is None else value}
    if msg_id is not NO_ID:
        reply["id"] = msg_id
    return reply


def failure(error_class: ErrorClass | str, desc: str, msg_id: Any = NO_ID) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": str(error_class), "desc": desc}}
    if msg_id is not NO_ID:
        reply["id"] = msg_id
    return reply


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
_STRING_STOP = re.compile(rb'["\\' + _BAD + rb"]")
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
    with no newline. A text ends when its outermost brace or bracket closes (strings and
    escapes are tracked so braces inside strings do not count); a top-level scalar ends at the
    next whitespace or structural character. A control byte, 0xFE or 0xFF anywhere (inside a
    string too), or a byte that cannot appear in JSON outside a string (``{not json``), reports
    one error and discards the partial text; then, as QEMU's lexer recovers, input is skipped
    up to a point where a new command can start: '{', '[', a line end or another control byte
    (QEMU also stops at '}', ']', ':' and ','; here those are skipped too, as at the top level
    they could only produce more errors, each an extra reply that would put a client that
    pairs replies with commands out of step). So the rest of a broken command (``op"}``) is
    never read as the start of a string that swallows the next command, which is answered.
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


class CommandTable:
    """The set of commands, shared by all sessions; safe to change while clients are served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commands: dict[str, Command] = {}

    def add(self, command: Command) -> None:
        _check_schema(command.name, command.schema)
        with self._lock:
            if command.name in self._commands:
                raise ValueError(f"QMP command {command.name!r} is already registered")
            self._commands[command.name] = command

    def get(self, name: str) -> Command | None:
        with self._lock:
            return self._commands.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._commands)


class QmpSession:
    """One client's protocol state: capabilities negotiation, then command mode."""

    def __init__(self, commands: CommandTable) -> None:
        self.commands = commands
        self.negotiated = False

    def greeting(self, version: Mapping[str, Any]) -> dict[str, Any]:
        return {"QMP": {"version": dict(version), "capabilities": []}}

    def handle_message(self, message: bytes) -> dict[str, Any] | Call:
        """One complete JSON text in; a reply to send now, or a Call whose result is the reply."""
        try:
            request = parse_json(message)
        except ValueError as exc:
            return failure(ErrorClass.GENERIC_ERROR, f"JSON parse error, {exc}")
        if not isinstance(request, dict):
            return failure(ErrorClass.GENERIC_ERROR, "QMP input must be a JSON object")
        msg_id = request.get("id", NO_ID)
        try:
            return self._dispatch(request, msg_id)
        except QmpError as exc:
            return failure(exc.error_class, exc.desc, msg_id)

    def _dispatch(self, request: dict[str, Any], msg_id: Any) -> dict[str, Any] | Call:
        generic = ErrorClass.GENERIC_ERROR
        for key, value in request.items():
            if key == "execute" and not isinstance(value, str):
                raise QmpError(generic, "QMP input member 'execute' must be a string")
            if key == "arguments" and not isinstance(value, dict):
                raise QmpError(generic, "QMP input member 'arguments' must be an object")
            if key == "exec-oob":
                raise QmpError(generic, "Out-of-band execution is not supported; use 'execute'")
            if key not in ("execute", "arguments", "id"):
                raise QmpError(generic, f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise QmpError(generic, "QMP input lacks member 'execute'")
        name: str = request["execute"]
        arguments: dict[str, Any] = request.get("arguments", {})
        not_found = ErrorClass.COMMAND_NOT_FOUND
        if name == "qmp_capabilities":
            if self.negotiated:
                raise QmpError(
                    not_found, "Capabilities negotiation is already complete, command ignored"
                )
            enable = check_arguments({"*enable": list[str]}, arguments).get("enable", [])
            for capability in enable:
                raise QmpError(generic, f"Capability '{capability}' not available")
            self.negotiated = True
            return success({}, msg_id)
        if not self.negotiated:
            raise QmpError(not_found, "Expecting capabilities negotiation with 'qmp_capabilities'")
        command = self.commands.get(name)
        if command is None:
            raise QmpError(not_found, f"The command {name} has not been found")
        return Call(command, check_arguments(command.schema, arguments), msg_id)


def run_call(call: Call) -> bytes:
    """Run a handler and encode its reply; never raises (a crash becomes a GenericError)."""
    name = call.command.name
    try:
        result = call.command.handler(**call.kwargs)
    except QmpError as exc:
        return encode(failure(exc.error_class, exc.desc, call.id))
    except Exception as exc:
        log.exception("QMP command %s failed", name)
        desc = f"internal error in '{name}': {type(exc).__name__}: {exc}"
        return encode(failure(ErrorClass.GENERIC_ERROR, desc, call.id))
    try:
        return encode(success(result, call.id))
    except (TypeError, ValueError) as exc:
        log.error("QMP command %s returned a value that is not JSON: %r", name, result)
        desc = f"command '{name}' returned a value that is not JSON: {exc}"
        return encode(failure(ErrorClass.GENERIC_ERROR, desc, call.id))


# --------------------------------------------------------------------------- the server


@dataclass
class _Client:
    writer: asyncio.StreamWriter
    session: QmpSession

    def send(self, data: bytes) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(data) > MAX_OUTPUT_BACKLOG:
            log.warning(
                "QMP client is not reading (%d bytes queued); dropping it",
                transport.get_write_buffer_size(),
            )
            transport.abort()
            return
        self.writer.write(data)


class QmpServer:
    """A QMP server on a unix socket, served from its own thread.

    ``register``/``command`` add handlers (before or after ``start``); ``emit`` is safe from any
    thread; ``close`` stops serving and removes the socket file. Usable as a context manager
    (``with QmpServer(path) as qmp:`` starts and closes it). Do not call ``close`` from inside
    a handler: the handler's own reply could not be sent; have the handler schedule it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        workers: int = 8,
        max_message: int = MAX_MESSAGE,
        version: str = __version__,
    ) -> None:
        self.path = os.fspath(path)
        if len(os.fsencode(self.path)) > SUN_PATH_MAX:
            raise ValueError(
                f"QMP socket path is {len(os.fsencode(self.path))} bytes, the limit is "
                f"{SUN_PATH_MAX}: {self.path!r}"
            )
        self.max_message = max_message
        self.commands = CommandTable()
        self._version = version_info(version)
        self._workers = workers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], _Client] = {}
        self._inode: tuple[int, int] | None = None
        self.register("query-commands", lambda: [{"name": n} for n in self._command_names()])
        self.register("query-version", lambda: dict(self._version))

    # -- registration

    def register(
        self, name: str, handler: Handler, *, args_schema: ArgSchema | None = None
    ) -> None:
        """Add a command. ``handler(**arguments)`` gets the arguments with '-' turned into '_'."""
        if name == "qmp_capabilities":
            raise ValueError("qmp_capabilities is built into the QMP server")
        self.commands.add(Command(name, handler, dict(args_schema or {})))

    def command(
        self, name: str, *, args_schema: ArgSchema | None = None
    ) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`."""

        def decorate(handler: Handler) -> Handler:
            self.register(name, handler, args_schema=args_schema)
            return handler

        return decorate

    def _command_names(self) -> list[str]:
        return sorted(["qmp_capabilities", *self.commands.names()])

    # -- lifecycle

    def start(self) -> None:
        """Bind the socket (errors raise here) and start serving in a background thread."""
        if self._thread is not None:
            raise RuntimeError(f"QMP server on {self.path} is already started")
        sock = self._bind()
        self._loop = asyncio.new_event_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self._workers, thread_name_prefix="qmp-handler"
        )
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(sock, ready), name=f"qmp:{self.path}", daemon=True
        )
        self._thread.start()
        ready.result()

    def _bind(self) -> socket.socket:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(f"QMP socket path {self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except ConnectionRefusedError:
                os.unlink(self.path)  # stale socket left by a process that died
            else:
                raise OSError(f"QMP socket {self.path} is in use by another server")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(16)
            sock.setblocking(False)
            st = os.lstat(self.path)
        except BaseException:
            sock.close()
            raise
        self._inode = (st.st_dev, st.st_ino)
        return sock

    def _run(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_unix_server(self._serve_client, sock=sock)
            )
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        loop.run_forever()

    def close(self) -> None:
        """Disconnect every client, stop the thread, remove the socket file. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("QmpServer.close() must not be called from the server thread")
        if not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                loop.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._remove_socket()
        self._loop = None

    def _remove_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            os.unlink(self.path)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._clients)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> QmpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events

    def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every negotiated client; safe from any thread; dropped if closed.

        The timestamp is taken now, in the caller's thread. ``data`` must be JSON-serialisable
        (ValueError/TypeError here otherwise).
        """
        message: dict[str, Any] = {"event": event}
        if data is not None:
            message["data"] = dict(data)
        message["timestamp"] = timestamp()
        line = encode(message)
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._broadcast, line)
        except RuntimeError:
            pass  # the loop closed between our check and the call: nobody to tell

    def _broadcast(self, line: bytes) -> None:
        for client in list(self._clients.values()):
            if client.session.negotiated:
                client.send(line)

    # -- one client

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        client = _Client(writer, QmpSession(self.commands))
        self._clients[task] = client
        try:
            client.send(encode(client.session.greeting(self._version)))
            await self._client_loop(reader, client)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("QMP client connection failed")
        finally:
            del self._clients[task]
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), timeout=1)
            except (TimeoutError, OSError, asyncio.CancelledError):
                pass

    async def _client_loop(self, reader: asyncio.StreamReader, client: _Client) -> None:
        loop = asyncio.get_running_loop()
        splitter = JsonSplitter(self.max_message)
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for item in splitter.feed(data):
                if isinstance(item, InputError):
                    client.send(encode(failure(ErrorClass.GENERIC_ERROR, item.desc)))
                    if item.fatal:
                        await client.writer.drain()
                        return
                    continue
                outcome = client.session.handle_message(item)
                if isinstance(outcome, Call):
                    assert self._executor is not None
                    reply = await loop.run_in_executor(self._executor, run_call, outcome)
                else:
                    reply = encode(outcome)
                client.send(reply)
                await client.writer.drain()


__all__ = [
    "Call",
    "Command",
    "CommandTable",
    "ErrorClass",
    "InputError",
    "JsonSplitter",
    "MAX_MESSAGE",
    "QmpError",
    "QmpServer",
    "QmpSession",
    "RunStatus",
    "check_arguments",
    "failure",
    "query_status_reply",
    "run_call",
    "success",
    "timestamp",
    "version_info",
]
