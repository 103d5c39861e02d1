"""The upload port: each API replica also takes ``POST /api/models/upload`` on a port of its
own (AIWM_UPLOAD_PORT), straight from the client, past Ray Serve's ingress.

Through the API port an upload's bytes cross two loopback hops (client to HAProxy, HAProxy
to the replica) and HAProxy's own copies: on two CPUs that is about a fifth of the CPU an
upload costs (docs/performance.md). On the upload port the replica's own uvicorn reads the
socket, and the same FastAPI app, with the same authentication, limits and correlation
ids, handles the request; every other path answers 404 there. Every replica binds the
port with SO_REUSEPORT, so the kernel spreads connections over the replicas of a host,
and a replica that cannot bind it (a port in use by another program) logs a warning and
serves on without it: ``GET /api/models/upload-url`` then says so, and ``aiwm models
upload`` sends through the API port.

Start it from the app's lifespan, on the event loop that runs the app's handlers (they
share the replica's database client, which belongs to that loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from aiwm.logs import CORRELATION_HEADER, bound, new_correlation_id, valid_correlation_id
from serve.limits import send_problem
from serve.model_files import UPLOAD_PATH

log = logging.getLogger("aiwm.api")
_HEADER = CORRELATION_HEADER.lower().encode()
# Connections one replica holds on the upload port at once; uvicorn answers more with a
# plain 503 (each upload holds up to 8 MiB of buffers and two threads).
MAX_CONNECTIONS = 64
# Seconds a connection has to send a request's headers (from its first byte, or from
# when it opened): no HAProxy stands in front of this port to cut off idle sockets.
HEADERS_TIMEOUT = 10.0
_OPEN: set[UploadPort] = set()  # this process's listening upload ports


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's headers: a socket
    that opens and says nothing, or sends its headers a byte at a time, is closed after
    HEADERS_TIMEOUT instead of holding one of the port's connections for good."""

    _headers_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_deadline is None:  # the next request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._headers_deadline = self.loop.call_later(HEADERS_TIMEOUT, self._too_slow)

    def _disarm(self) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None

    def _too_slow(self) -> None:
        self._headers_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def only_uploads(app: ASGIApp) -> ASGIApp:
    """``app`` for the upload route alone; 404 problem+json for any other path. The
    response carries the request's X-Request-Id, as the API port's do."""

    async def uploads(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan (uvicorn runs it off) and no WebSockets here
        given = next((v for k, v in scope["headers"] if k == _HEADER), None)
        if scope["path"] != UPLOAD_PATH:
            cid = valid_correlation_id((given or b"").decode("latin-1")) or new_correlation_id()
            with bound(cid):
                await send_problem(send, 404, "not_found", "Not Found",
                                   f"the upload port serves POST {UPLOAD_PATH} only: send "
                                   "other requests to the API's port",
                                   headers=[(_HEADER, cid.encode())])
            return

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                # The app's Correlation swaps an unusable id in scope: echo what it kept.
                kept = next((v for k, v in scope["headers"] if k == _HEADER), given)
                if kept is not None and not any(k.lower() == _HEADER for k, _ in headers):
                    message = {**message, "headers": [*headers, (_HEADER, kept)]}
            await send(message)

        await app(scope, receive, with_id)

    return uploads


class UploadPort:
    """One replica's upload listener: :meth:`start` binds and serves, :meth:`stop` ends it.

    ``bound`` says whether it takes new uploads (False before start, once it stops or
    stops accepting, or when the port could not be bound)."""

    def __init__(self, app: ASGIApp, *, host: str, port: int, keep_alive_s: float = 5) -> None:
        self._app = only_uploads(app)
        self._host = host
        self._port = port
        self._keep_alive_s = keep_alive_s
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def bound(self) -> bool:
        return self._task is not None and not self._task.done() and \
            self._server is not None and not self._server.should_exit

    async def start(self) -> bool:
        """Bind the port (SO_REUSEPORT, shared with the host's other replicas) and serve it
        on the running loop; False, with a warning, when it cannot be bound or served."""
        try:
            sock = self._bind()
        except OSError as e:
            log.warning("the upload port %s:%d cannot be bound (%s): uploads go through the "
                        "API port only (AIWM_UPLOAD_PORT)", self._host, self._port, e)
            return False
        try:
            server = uvicorn.Server(uvicorn.Config(
                self._app, http=GuardedHttpTools, lifespan="off", access_log=False,
                log_config=None, log_level=None, ws="none", server_header=False,
                timeout_keep_alive=int(self._keep_alive_s), limit_concurrency=MAX_CONNECTIONS))
            # The replica's own signal handling stays: uvicorn would take SIGTERM and SIGINT
            # over when it runs on the main thread.
            server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
            task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
            deadline = asyncio.get_running_loop().time() + 10
            while not server.started and not task.done():
                if asyncio.get_running_loop().time() > deadline:
                    server.force_exit = server.should_exit = True
                    raise TimeoutError("it did not start within 10 s")
                await asyncio.sleep(0.01)
            if task.done():  # it ended while starting (uvicorn may even sys.exit there)
                error = None if task.cancelled() else task.exception()
                raise error if isinstance(error, Exception) else \
                    RuntimeError(f"it ended while starting ({error!r})")
        except Exception as e:  # noqa: BLE001 - the API serves on without the port
            sock.close()
            log.warning("the upload port %s:%d could not be served (%s): uploads go through "
                        "the API port only", self._host, self._port, e)
            return False
        task.add_done_callback(self._ended)
        self._server, self._task = server, task
        _OPEN.add(self)
        log.info("uploads also taken on %s:%d", self._host, self._port)
        return True

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        return sock

    def _ended(self, task: asyncio.Task[None]) -> None:
        _OPEN.discard(self)
        if not task.cancelled() and task.exception() is not None:
            log.warning("the upload port %s:%d stopped: %s", self._host, self._port,
                        task.exception())

    def stop_accepting(self) -> None:
        """Close the listener; uploads under way go on (thread-safe: a flag uvicorn polls)."""
        _OPEN.discard(self)
        if self._server is not None:
            self._server.should_exit = True

    async def stop(self, timeout: float = 10) -> None:
        """Stop taking uploads; those under way get ``timeout`` seconds to finish."""
        server, task = self._server, self._task
        self._server = self._task = None
        _OPEN.discard(self)
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            log.warning("the upload port stopped with uploads still under way")
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception as e:  # the server failed: nothing more to stop
            log.warning("the upload port stopped with an error: %s", e)


def close_upload_ports_on_shutdown() -> bool:
    """Make the replica close its upload port as soon as its graceful shutdown starts
    (call in the replica). Serve then keeps the replica up for its drain (30 s behind
    HAProxy) while it routes nothing new there, but knows nothing of the upload port:
    without this, the port would take new uploads until the replica is killed, cutting
    them off. Uploads already under way go on. It wraps a private Ray method: if a Ray
    upgrade moves it, nothing breaks here. True when applied."""
    from ray.serve._private import replica

    cls = getattr(replica, "Replica", None)
    original = getattr(cls, "_perform_graceful_shutdown", None)
    if original is None:
        return False
    if getattr(original, "_aiwm_uploads", False):
        return True

    @functools.wraps(original)
    async def shutdown(self: Any, *args: Any, **kwargs: Any) -> Any:
        for port in list(_OPEN):
            port.stop_accepting()
        return await original(self, *args, **kwargs)

    shutdown._aiwm_uploads = True  # type: ignore[attr-defined]
    cls._perform_graceful_shutdown = shutdown  # type: ignore[union-attr]
    return True
