"""One QMP client's protocol, no I/O: greeting, capabilities negotiation, request checking.

Owns the protocol's vocabulary (error classes, :class:`QmpError`, run statuses, replies and
event timestamps), argument checking against a small per-command schema (QAPI's notation), the
command table shared by all clients, and :class:`QmpSession`, which turns one JSON text into
either a ready reply or a :class:`Call` to run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ptmig import __version__

from ..errors import PtmigError
from .stream import parse_json

log = logging.getLogger(__name__)


class ErrorClass(StrEnum):
    """QMP error classes (QEMU's ``QapiErrorClass``)."""

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QmpError(PtmigError):
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
