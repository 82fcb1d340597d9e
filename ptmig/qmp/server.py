"""The QMP server: an asyncio loop in its own thread serving clients on a unix socket.

The VMM's vCPU threads block in KVM_RUN, so the loop runs apart from them; handlers run in a
worker pool so a slow command does not stall other clients, and each client's commands are
answered in the order it sent them. A client that stops reading is dropped once its unsent
output passes a cap. The protocol itself lives in :mod:`ptmig.qmp.session`, the input
splitting in :mod:`ptmig.qmp.stream`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
