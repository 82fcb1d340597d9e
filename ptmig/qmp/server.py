"""The QMP server: a selector loop in its own thread serving clients on a unix socket.

The VMM's vCPU threads block in KVM_RUN, so the loop runs apart from them. It is plain
``selectors`` on non-blocking sockets (no asyncio: its import alone costs the VMM a few MiB of
private memory, and a VMM's memory besides guest RAM is one of the project's goals). Handlers
run on a small pool of worker threads, started as commands need them, so a slow command does
not stall other clients; each client has at most one command in flight, so its commands are
answered in the order it sent them. Replies and events reach the loop through one FIFO queue
and a wake-up pipe, so an event emitted by a handler goes out before that handler's reply. A
client that stops reading is dropped once its unsent output passes a cap. The protocol itself
lives in :mod:`ptmig.qmp.session`, the input splitting in :mod:`ptmig.qmp.stream`.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import stat
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ptmig import __version__

from .session import (
    ArgSchema,
    Call,
    Command,
    CommandTable,
    ErrorClass,
    Handler,
    QmpSession,
    encode,
    failure,
    run_call,
    timestamp,
    version_info,
)
from .stream import MAX_MESSAGE, InputError, JsonSplitter

log = logging.getLogger(__name__)


MAX_OUTPUT_BACKLOG = 8 << 20  # unsent bytes to a client that does not read before we drop it
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
RECV_SIZE = 65536
CLOSE_TIMEOUT_S = 10.0


class _Client:
    """One connection: its session, its unparsed input, unsent output and queued texts."""

    def __init__(self, sock: socket.socket, commands: CommandTable, max_message: int) -> None:
        self.sock = sock
        self.session = QmpSession(commands)
        self.splitter = JsonSplitter(max_message)
        self.pending: deque[bytes | InputError] = deque()  # texts not yet handled
        self.out = bytearray()
        self.busy = False  # a command of this client is running on a worker
        self.closing = False  # send what is queued, then disconnect (after a fatal error)
        self.dropped = False


class _Workers:
    """Threads that run handlers, started as needed up to `limit`; idle ones wait for work."""

    def __init__(self, limit: int, done: Callable[[_Client, bytes], None]) -> None:
        self._limit = limit
        self._done = done
        self._jobs: queue.SimpleQueue[tuple[_Client, Call] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, client: _Client, call: Call) -> None:
        with self._lock:
            start = self._idle == 0 and self._threads < self._limit
            if start:
                self._threads += 1
            else:
                self._idle -= 1  # one idle worker (or a later free one) takes it
        self._jobs.put((client, call))
        if start:
            threading.Thread(target=self._work, name="qmp-handler", daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            client, call = job
            self._done(client, run_call(call))
            with self._lock:
                self._idle += 1

    def stop(self) -> None:
        """Ask every worker to exit once its current handler returns (not waited for)."""
        with self._lock:
            n, self._threads = self._threads, 0
        for _ in range(n):
            self._jobs.put(None)


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
        if workers < 1:
            raise ValueError(f"QMP server needs at least one worker thread, got {workers}")
        self.max_message = max_message
        self.commands = CommandTable()
        self._version = version_info(version)
        self._worker_limit = workers
        self._workers: _Workers | None = None
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._selector: selectors.DefaultSelector | None = None
        self._wake_r = self._wake_w = -1
        self._wake_lock = threading.Lock()  # the wake-up pipe is closed under it, once
        # (client or None for every negotiated client, bytes) in the order they were produced
        self._outbox: deque[tuple[_Client | None, bytes]] = deque()
        self._stopping = False
        self._clients: dict[int, _Client] = {}
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
        self._listener = self._bind()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._workers = _Workers(self._worker_limit, self._reply_ready)
        self._thread = threading.Thread(target=self._run, name=f"qmp:{self.path}", daemon=True)
        self._thread.start()

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

    def close(self) -> None:
        """Disconnect every client, stop the thread, remove the socket file. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("QmpServer.close() must not be called from the server thread")
        self._stopping = True
        self._wake()
        thread.join(timeout=CLOSE_TIMEOUT_S)
        if thread.is_alive():
            log.error("QMP server thread for %s did not stop in %.0f s", self.path, CLOSE_TIMEOUT_S)
        if self._workers is not None:
            self._workers.stop()
        self._remove_socket()
        self._thread = None

    def _remove_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            os.unlink(self.path)

    def __enter__(self) -> QmpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- other threads talk to the loop through the outbox

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
        if self._thread is None or self._stopping:
            return
        self._outbox.append((None, line))
        self._wake()

    def _reply_ready(self, client: _Client, reply: bytes) -> None:
        self._outbox.append((client, reply))
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return  # the loop has stopped: nobody to tell
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: the loop is already due to wake

    # -- the loop (server thread only from here on)

    def _run(self) -> None:
        sel = self._selector
        assert sel is not None
        try:
            while not self._stopping:
                for key, mask in sel.select():
                    self._dispatch(key, mask)
                self._drain_outbox()
        except Exception:
            log.exception("QMP server loop for %s failed", self.path)
        finally:
            self._shut_down()

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.fileobj is self._listener:
            self._accept()
        elif key.fileobj == self._wake_r:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        else:
            client: _Client = key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    self._flush(client)
                if mask & selectors.EVENT_READ and not client.dropped:
                    self._read(client)
            except Exception:
                log.exception("QMP client connection failed")
                self._drop(client)

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("QMP accept on %s failed: %s", self.path, exc)
            return
        sock.setblocking(False)
        client = _Client(sock, self.commands, self.max_message)
        self._clients[sock.fileno()] = client
        self._selector.register(sock, selectors.EVENT_READ, client)
        self._send(client, encode(client.session.greeting(self._version)))

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.pending.extend(client.splitter.feed(data))
        self._advance(client)

    def _advance(self, client: _Client) -> None:
        """Handle the client's queued texts until one needs a worker (or none is left)."""
        while client.pending and not client.busy and not client.closing and not client.dropped:
            item = client.pending.popleft()
            if isinstance(item, InputError):
                self._send(client, encode(failure(ErrorClass.GENERIC_ERROR, item.desc)))
                if item.fatal:
                    client.closing = True
                    client.pending.clear()
                    self._flush(client)
                continue
            outcome = client.session.handle_message(item)
            if isinstance(outcome, Call):
                client.busy = True
                assert self._workers is not None
                self._workers.submit(client, outcome)
            else:
                self._send(client, encode(outcome))

    def _drain_outbox(self) -> None:
        while self._outbox:
            client, line = self._outbox.popleft()
            if client is None:
                for c in list(self._clients.values()):
                    if c.session.negotiated:
                        self._send(c, line)
            elif not client.dropped:
                client.busy = False
                self._send(client, line)
                self._advance(client)

    def _send(self, client: _Client, data: bytes) -> None:
        if client.dropped:
            return
        if len(client.out) + len(data) > MAX_OUTPUT_BACKLOG:
            log.warning("QMP client is not reading (%d bytes queued); dropping it", len(client.out))
            self._drop(client)
            return
        client.out += data
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        """Write what the socket takes; watch for writability while output remains."""
        assert self._selector is not None
        if client.dropped:
            return
        try:
            while client.out:
                sent = client.sock.send(client.out)
                del client.out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(client)
            return
        if not client.out and client.closing:
            self._drop(client)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        if self._selector.get_key(client.sock).events != events:
            self._selector.modify(client.sock, events, client)

    def _drop(self, client: _Client) -> None:
        if client.dropped:
            return
        client.dropped = True
        assert self._selector is not None
        self._clients.pop(client.sock.fileno(), None)
        self._selector.unregister(client.sock)
        client.sock.close()

    def _shut_down(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        if self._selector is not None:
            self._selector.close()
        if self._listener is not None:
            self._listener.close()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
