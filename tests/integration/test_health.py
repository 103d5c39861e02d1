"""Health reports each dependency, goes 503 while one is down, and recovers by itself."""

from __future__ import annotations

import httpx
import ray

from actors import NAMESPACE, REGISTRY_NAME
from tests.conftest import Database, wait_for


def _health(cluster: str) -> httpx.Response:
    return httpx.get(f"{cluster}/api/health", timeout=10)


def test_health_is_green_with_each_dependency(cluster: str) -> None:
    r = _health(cluster)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert {k: v["status"] for k, v in r.json()["checks"].items()} == {
        "database": "up", "registry": "up", "nodeHosts": "up"}


def test_health_503_while_database_is_down_then_recovers(
    cluster: str, database: Database, api: httpx.Client
) -> None:
    database.stop()
    try:
        down = wait_for(lambda: (r := _health(cluster)).status_code == 503 and r, timeout=30,
                        what="health to report 503")
        assert down.json()["checks"]["database"]["status"] == "down"
        assert down.json()["checks"]["registry"]["status"] == "up"
        write = api.post("/instructions", json={"name": "while-down", "systemPrompt": "x"})
        assert write.status_code == 503 and write.json()["code"] == "unavailable"
        assert write.headers["retry-after"] == "5"
        read = api.get("/instructions")
        assert read.status_code == 503
    finally:
        database.start()
    wait_for(lambda: _health(cluster).status_code == 200, timeout=60, what="health to recover")
    r = api.post("/instructions", json={"name": "after-recovery", "systemPrompt": "x"})
    assert r.status_code == 201


def test_registry_actor_restarts_after_a_crash(cluster: str, api: httpx.Client) -> None:
    before = api.post("/tools", json={"name": "before-crash"}).json()
    ray.kill(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE), no_restart=False)
    wait_for(lambda: _health(cluster).status_code == 200
             and api.post("/tools", json={"name": "probe"}).status_code == 201,
             timeout=60, what="the registry to come back")
    assert api.get(f"/tools/{before['id']}").json()["name"] == "before-crash"
