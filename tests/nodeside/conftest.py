"""Real parts for the node-side tests: a Docker daemon, the model-server test image, real
subprocesses. No Ray, no controller, no database."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import pytest

from nodeside.deployments import DeploymentHandlers
from nodeside.runtimes.docker import LABEL, DockerRuntime
from nodeside.runtimes.process import ProcessRuntime
from tests.support import model_server

# The file, not ``-m``: the child then finds it whatever the working directory is.
MODEL_SERVER_CMD = [sys.executable, model_server.__file__, "--port", "{port}"]
ADVERTISE = "203.0.113.7"  # a documentation address: endpoints must use it, never dial it
WEIGHTS = bytes(range(256)) * (6 * 1024)  # 1.5 MiB: more than one download chunk


class FileServer:
    """Serves ``files`` by path, honouring ``Range: bytes=N-`` (206) unless
    ``ignore_range``; ``/stall/<name>`` sends half of a file, then waits until ``release``
    is set; ``/cut/<name>`` sends a third of what was asked for and drops the connection,
    ``cuts`` times (then it serves whole answers); ``/dead/<name>`` drops the connection
    before any byte of the body. Records each request's path and Range header."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        self.ranges: list[str | None] = []
        self.release = threading.Event()
        self.cuts = 0
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                server.ranges.append(self.headers.get("Range"))
                mode, _, rest = self.path.lstrip("/").partition("/")
                if mode not in ("stall", "cut", "dead"):
                    mode, rest = "", self.path.lstrip("/")
                data = server.files.get("/" + rest)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                asked = self.headers.get("Range", "")
                if asked.startswith("bytes=") and asked.endswith("-") and not server.ignore_range:
                    start = int(asked[len("bytes="):-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "stall":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    server.release.wait(30)
                    self.close_connection = True
                    return
                if mode == "dead" or (mode == "cut" and server.cuts > 0):
                    if mode == "cut":
                        server.cuts -= 1
                        self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class Emitted:
    """The ``emit`` callback of the handlers: records every frame."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.frames.append((kind, data))

    def statuses(self, deployment_id: str) -> list[str]:
        return [d["status"] for k, d in self.frames
                if k == "deployment.status" and d["deploymentId"] == deployment_id]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for k, d in self.frames if k == kind]


async def wait_until(predicate: Callable[[], Awaitable[Any] | Any], *, timeout: float = 20,
                     what: str = "a condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Ids:
    """Deployment ids unique to this test, so a shared daemon's other containers are never
    touched; the handler fixtures remove what was made under them."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.made: list[str] = []

    def __call__(self) -> str:
        self.made.append(f"test-{self.run}-{len(self.made)}")
        return self.made[-1]


@pytest.fixture()
def deployment_id() -> Ids:
    return Ids()


@pytest.fixture()
def emitted() -> Emitted:
    return Emitted()


@pytest.fixture()
def docker_client(dockerd: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=f"unix://{dockerd}", timeout=60)
    yield client
    client.close()


async def _cleanup(made: DeploymentHandlers, ids: Ids) -> None:
    await made.aclose()
    for runtime in made.runtimes.values():
        if runtime.present():
            for deployment in ids.made:
                await runtime.remove(deployment)


@pytest.fixture()
async def handlers(tmp_path: Path, dockerd: str, model_server_image: str, emitted: Emitted,
                   deployment_id: Ids) -> AsyncIterator[DeploymentHandlers]:
    """Deployment handlers over both runtimes with a real dockerd, as the agent builds them."""
    made = make_handlers(tmp_path, dockerd, emitted)
    yield made
    await _cleanup(made, deployment_id)


@pytest.fixture()
async def process_handlers(tmp_path: Path, emitted: Emitted,
                           deployment_id: Ids) -> AsyncIterator[DeploymentHandlers]:
    """Deployment handlers of a host without Docker (its socket does not exist)."""
    made = make_handlers(tmp_path, str(tmp_path / "no-docker.sock"), emitted)
    yield made
    await _cleanup(made, deployment_id)


def make_handlers(state_dir: Path, socket_path: str, emit: Emitted, *, start_timeout: float = 30,
                  stop_grace: float = 5.0) -> DeploymentHandlers:
    return DeploymentHandlers(
        runtimes={"docker": DockerRuntime(socket_path=socket_path, stop_grace=stop_grace),
                  "process": ProcessRuntime(state_dir=state_dir, stop_grace=stop_grace)},
        model_dir=state_dir / "models", advertise_host=ADVERTISE, emit=emit,
        start_timeout=start_timeout)


def containers_of(client: docker.DockerClient, deployment_id: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"{LABEL}={deployment_id}"})
