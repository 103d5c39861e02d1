"""Health reports each dependency, goes 503 while one is down, and recovers by itself."""

from __future__ import annotations

import httpx
import ray

from actors import NAMESPACE, REGISTRY_NAME
from aiwm.settings import Settings
from tests.conftest import Database, wait_for


def _health(cluster: str) -> httpx.Response:
    return httpx.get(f"{cluster}/api/health", timeout=10)


def test_health_is_green_with_each_dependency(cluster: str) -> None:
    r = _health(cluster)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert {k: v["status"] for k, v in r.json()["checks"].items()} == {
        "database": "up", "registry": "up", "nodeHosts": "up", "orchestrator": "up",
        "objectStore": "up"}


def test_health_503_while_the_object_store_cannot_take_files(
        cluster: str, settings: Settings) -> None:
    staging = settings.aiwm_home / "objects" / "tmp"
    away = staging.with_name("tmp.away")
    staging.rename(away)
    staging.write_text("a file where the store's folder should be")
    try:
        down = _health(cluster)
        assert down.status_code == 503 and down.json()["status"] == "degraded"
        check = down.json()["checks"]["objectStore"]
        assert check["status"] == "down" and "object store's folder" in check["error"]
        assert down.json()["checks"]["database"]["status"] == "up"
    finally:
        staging.unlink()
        away.rename(staging)
    assert _health(cluster).status_code == 200


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


def test_api_follows_actors_replaced_while_it_runs(
    cluster: str, api: httpx.Client, settings: Settings
) -> None:
    """`aiwm up` on a running cluster replaces the Registry and NodeHosts while the
    Serve replicas keep running: the replicas must find the new actors by themselves."""
    from actors import ensure_node_host, ensure_registry, release_node_hosts

    ensure_registry(settings, replace=True)
    release_node_hosts()
    for shard in range(settings.node_proxy_shards):
        ensure_node_host(settings, shard)
    wait_for(lambda: api.post("/tools", json={"name": "after-replace"}).status_code == 201,
             timeout=30, what="writes to reach the new registry")
    wait_for(lambda: _health(cluster).status_code == 200, timeout=30,
             what="health to see the new actors")
