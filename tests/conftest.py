"""Session-wide real parts: one SecantusDB process, one local Ray cluster, one Serve app.

Pure unit tests use none of these fixtures, so they run without starting anything.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiwm import embedded_db
from aiwm.auth import issue_token
from aiwm.settings import Settings, load_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The CLI tests start and stop their own Ray head with `ray stop`, which ends every
    # Ray process on the machine: run them before the session cluster exists.
    items.sort(key=lambda item: 0 if "tests/cli/" in str(item.path).replace(os.sep, "/") else 1)


@dataclass
class Database:
    home: Path
    port: int

    def stop(self) -> None:
        embedded_db.stop(self.home)

    def start(self) -> None:
        embedded_db.start(self.home, self.port)


@pytest.fixture(scope="session")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    home = tmp_path_factory.mktemp("aiwm-home")
    db = Database(home=home, port=free_port())
    db.start()
    yield db
    db.stop()


@pytest.fixture(scope="session")
def hub() -> Iterator[Any]:
    """A local HTTP server speaking the part of the HuggingFace Hub API that imports use;
    the session's settings point HF_ENDPOINT at it."""
    from tests.support.hf_hub import FakeHub

    with FakeHub() as fake:
        yield fake


@pytest.fixture(scope="session")
def settings(database: Database, hub: Any) -> Settings:
    port = free_port()
    return load_settings(
        hf_endpoint=hub.url,
        aiwm_public_url=f"http://127.0.0.1:{port}",
        aiwm_home=database.home,
        aiwm_db_port=database.port,
        mongodb_uri=None,
        port=port,
        aiwm_upload_port=free_port(),
        jwt_secret="test-secret-not-for-production-use-0123456789",
        aiwm_max_body_bytes=64 * 1024,
        ws_max_frame_bytes=64 * 1024,
        ws_max_protocol_errors=5,
        ws_cors_origin="https://console.example.com, http://localhost:3000",
        ws_ping_interval=2000,  # the relay pings each node socket every 2 s,
        ws_ping_timeout=4000,  # and drops one whose pong is 4 s late
        node_offline_min_seconds=0,  # the tests' agents beat every 300 ms
    )


@pytest.fixture(scope="session")
def cluster(settings: Settings) -> Iterator[str]:
    """A local Ray cluster with the Registry actor and the Serve app; yields the API URL."""
    from serve.ingress import ray_environment

    ray_environment()  # the production ingress path and worker priority
    import ray

    from serve.ingress import deploy
    from tests.support import leftovers

    leftovers.plant(settings.aiwm_home)  # for the orchestrator's first sweep
    ray.init(address="local", namespace="aiwm", include_dashboard=False, log_to_driver=False)
    try:
        deploy(settings)
        url = f"http://127.0.0.1:{settings.port}"
        wait_for(lambda: _status(f"{url}/api/health") == 200, timeout=120, what="/api/health")
        yield url
    finally:
        ray.shutdown()  # ends the Serve controller, proxies and HAProxy with the cluster


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="session")
def make_token(settings: Settings) -> Callable[..., str]:
    def make(role: str = "admin", org: str = "org-a", sub: str = "tester", expires_in: int = 600) -> str:
        token, _ = issue_token(secret=settings.secret(), sub=sub, org_id=org, roles=[role],
                               expires_in=expires_in)
        return token

    return make


@pytest.fixture(scope="session")
def client_for(cluster: str, make_token: Callable[..., str]) -> Iterator[Callable[..., httpx.Client]]:
    clients: list[httpx.Client] = []

    def make(role: str = "admin", org: str = "org-a", sub: str = "tester") -> httpx.Client:
        c = httpx.Client(base_url=f"{cluster}/api", timeout=30,
                         headers={"Authorization": f"Bearer {make_token(role, org, sub)}"})
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def api(client_for: Callable[..., httpx.Client]) -> httpx.Client:
    """An operator-and-admin client in org-a."""
    return client_for("admin", "org-a")


@pytest.fixture()
def unique() -> Callable[[str], str]:
    """Unique names, so tests sharing the session database never collide."""
    counter = iter(range(1_000_000))
    stamp = f"{time.time_ns():x}"

    def make(prefix: str) -> str:
        return f"{prefix}-{stamp}-{next(counter)}"

    return make


@pytest.fixture(scope="session")
def dockerd() -> Iterator[str]:
    """The socket path of a Docker daemon that answers: the host's, or one dockerd started
    for the whole session and shared by every test that needs Docker. Without Docker the
    tests fail (CI installs docker.io), they are not skipped."""
    from tests.support.dockerd import DockerdUnavailable, start_dockerd

    try:
        daemon = start_dockerd()
    except DockerdUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    yield daemon.socket
    daemon.stop()


@pytest.fixture(scope="session")
def model_server_image(dockerd: str) -> str:
    """The docker-imported test image of a tiny OpenAI-style model server."""
    from tests.support.images import ensure_model_server_image

    return ensure_model_server_image(dockerd)
