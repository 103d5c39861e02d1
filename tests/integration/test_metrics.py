"""AIWM's metrics reach Ray's Prometheus endpoint from the actors that count them."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import ray

from tests.conftest import wait_for
from tests.integration.nodes_helpers import make_node, raw_socket, register


def _scrape() -> str:
    port = ray._private.worker.global_worker.node.metrics_export_port
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _total(text: str, name: str, **tags: str) -> float:
    """The sum of a metric's samples whose tags include ``tags``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(labels.get(k) == v for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_execution_and_node_host_metrics_are_exported(
        api: httpx.Client, unique: Callable[[str], str], cluster: str) -> None:
    before = _total(_scrape(), "ray_aiwm_executions_total", status="completed")
    node = make_node(api, unique)  # a node comes online: counted by its NodeProxy
    with raw_socket(cluster.replace("http", "ws") + "/ws/node", node.token) as ws:
        assert register(ws, node.id)["type"] == "session.welcome"
    r = api.post("/executions", json={"name": "metered", "steps": [
        {"name": "pause", "kind": "controller", "command": "wait", "data": {"seconds": 0.2}}]})
    assert r.status_code == 201, r.text
    done = api.get(f"/executions/{r.json()['id']}/wait", params={"timeout": 30}, timeout=40)
    assert done.json()["status"] == "completed"

    def exported() -> bool:
        text = _scrape()
        return (_total(text, "ray_aiwm_executions_total", status="completed") >= before + 1
                and _total(text, "ray_aiwm_execution_steps_total", kind="controller",
                           command="wait", status="succeeded") >= 1
                and _total(text, "ray_aiwm_execution_seconds_count", status="completed") >= 1
                and "ray_aiwm_nodes_connected{" in text  # every NodeHost reports its gauge
                and _total(text, "ray_aiwm_node_events_total", event="online") >= 1
                and "ray_aiwm_node_commands_in_flight{" in text)

    wait_for(exported, timeout=60, every=2, what="AIWM's metrics on Ray's Prometheus endpoint")
