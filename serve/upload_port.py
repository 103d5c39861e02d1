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
import logging
import socket

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aiwm.logs import CORRELATION_HEADER
from serve.limits import send_problem
from serve.model_files import UPLOAD_PATH

log = logging.getLogger("aiwm.api")
_HEADER = CORRELATION_HEADER.lower().encode()
# Connections one replica holds on the upload port at once; uvicorn answers more with a
# plain 503 (each upload holds up to 8 MiB of buffers and two threads).
MAX_CONNECTIONS = 64


def only_uploads(app: ASGIApp) -> ASGIApp:
    """``app`` for the upload route alone; 404 problem+json for any other path. The
    response carries the request's X-Request-Id, as the API port's do."""

    async def uploads(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan (uvicorn runs it off) and no WebSockets here
        if scope["path"] != UPLOAD_PATH:
            await send_problem(send, 404, "not_found", "Not Found",
                               f"the upload port serves POST {UPLOAD_PATH} only: send other "
                               "requests to the API's port")
            return

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == _HEADER for k, _ in headers):
                    given = next((v for k, v in scope["headers"] if k == _HEADER), None)
                    if given is not None:
                        message = {**message, "headers": [*headers, (_HEADER, given)]}
            await send(message)

        await app(scope, receive, with_id)

    return uploads


class UploadPort:
    """One replica's upload listener: :meth:`start` binds and serves, :meth:`stop` ends it.

    ``bound`` says whether it listens (False before start, after stop, or when the port
    could not be bound)."""

    def __init__(self, app: ASGIApp, *, host: str, port: int, keep_alive_s: float = 5) -> None:
        self._app = only_uploads(app)
        self._host = host
        self._port = port
        self._keep_alive_s = keep_alive_s
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def bound(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> bool:
        """Bind the port (SO_REUSEPORT, shared with the host's other replicas) and serve it
        on the running loop; False, with a warning, when it cannot be bound."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._host, self._port))
        except OSError as e:
            sock.close()
            log.warning("the upload port %s:%d cannot be bound (%s): uploads go through the "
                        "API port only (AIWM_UPLOAD_PORT)", self._host, self._port, e)
            return False
        server = uvicorn.Server(uvicorn.Config(
            self._app, lifespan="off", access_log=False, log_config=None, log_level=None,
            ws="none", timeout_keep_alive=int(self._keep_alive_s), server_header=False,
            limit_concurrency=MAX_CONNECTIONS))
        # The replica's own signal handling stays: uvicorn would take SIGTERM and SIGINT
        # over when it runs on the main thread.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        await asyncio.sleep(0)
        log.info("uploads also taken on %s:%d", self._host, self._port)
        return True

    async def stop(self, timeout: float = 10) -> None:
        """Stop taking uploads; those under way get ``timeout`` seconds to finish."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout)  # cancels the server when it times out
        except TimeoutError:
            log.warning("the upload port stopped with uploads still under way")
        except Exception as e:  # the server failed: nothing more to stop
            log.warning("the upload port stopped with an error: %s", e)
