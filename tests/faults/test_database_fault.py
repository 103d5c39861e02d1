"""Fault: the database (SecantusDB) stops for about ten seconds in the middle of two
executions: a plain one whose step finishes during the outage, and a deployment's stop
whose last step's result (from a scripted node) arrives just after the database went.
What must hold: while it is gone the API answers 503 problem+json ``unavailable``
(reads and writes, catalog, nodes and executions), never 500; /api/health says 503
``degraded`` and turns green again by itself; results that arrived during the outage
are kept and both executions complete afterwards, and what the deployment's execution
does when it ends (its status, its event) is not lost to the outage."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from aiwm.protocol import make_frame
from tests.conftest import Database, wait_for
from tests.faults.conftest import Loop, Recorder, healthy
from tests.integration.nodes_helpers import make_node, raw_socket, register

OUTAGE = 10.0  # s


def ctl(name: str, seconds: float, *after: str) -> dict[str, Any]:
    return {"name": name, "kind": "controller", "command": "wait", "data": {"seconds": seconds},
            "dependsOn": list(after)}


def test_database_stopped_mid_execution(
    cluster: str, api: httpx.Client, client_for: Callable[..., httpx.Client],
    database: Database, unique: Callable[[str], str], recorder: Recorder, ws_url: str,
    request: pytest.FixtureRequest,
) -> None:
    tag = unique("dbfault")
    # A node the test speaks for (a raw socket: no heartbeats or metrics that would need
    # the database), with a deployment being stopped on it.
    scripted = make_node(api, unique)
    ws = raw_socket(ws_url, scripted.token)
    request.addfinalizer(ws.close)
    assert register(ws, scripted.id)["type"] == "session.welcome"
    model = api.post("/models", json={"name": unique("m"), "source": "custom"}).json()
    r = api.post("/deployments", json={"name": unique("d"), "modelId": model["id"],
                                        "nodeId": scripted.id, "runtime": "process",
                                        "command": ["true"]})
    assert r.status_code == 201, r.text
    deployment_id = r.json()["deployment"]["id"]
    r = api.post(f"/deployments/{deployment_id}/stop")  # supersedes the deploy
    assert r.status_code == 202, r.text
    stopping = r.json()["execution"]["id"]
    stop_command = wait_for(lambda: (f := json.loads(ws.recv(timeout=20)))["type"]
                            == "deployment.stop" and f, timeout=30, what="the stop command",
                            every=0)
    ws.send(json.dumps(make_frame("command.ack", correlation_id=stop_command["messageId"])))
    client = client_for("admin", "org-a", sub=tag)
    node = api.post("/nodes", json={"name": tag}).json()
    instruction = api.post("/instructions", json={"name": tag, "systemPrompt": "x"}).json()
    r = api.post("/executions", json={"name": tag, "steps": [
        ctl("before", 0.05), ctl("during", 2.0, "before"), ctl("after", 0.05, "during")]})
    assert r.status_code == 201, r.text
    execution_id = r.json()["id"]
    wait_for(lambda: api.get(f"/executions/{execution_id}/steps").json()["steps"][1]["status"]
             == "running", timeout=30, what="the middle step to run")
    routes: list[tuple[str, Callable[[], httpx.Response]]] = [
        ("GET instructions", lambda: client.get("/instructions")),
        ("GET instruction", lambda: client.get(f"/instructions/{instruction['id']}")),
        ("POST instruction", lambda: client.post("/instructions", json={
            "name": unique(tag), "systemPrompt": "x"})),
        ("PATCH instruction", lambda: client.patch(f"/instructions/{instruction['id']}",
                                                   json={"systemPrompt": "y"})),
        ("GET node", lambda: client.get(f"/nodes/{node['id']}")),
        ("POST node command", lambda: client.post(f"/nodes/{node['id']}/commands", json={
            "type": "system.healthCheck", "timeout": 2})),
        ("GET execution", lambda: client.get(f"/executions/{execution_id}")),
        ("GET executions", lambda: client.get("/executions")),
        ("POST execution", lambda: client.post("/executions", json={
            "name": "while down", "steps": [ctl("x", 0)]})),
        ("health", lambda: httpx.get(f"{cluster}/api/health", timeout=10)),
    ]
    health: list[httpx.Response] = []

    def probe(thread: int, _: int) -> None:
        what, send = routes[thread]
        outcome = recorder.call(what, send)
        assert outcome.status != 200, f"{what} answered 200 while the database was down"

    database.stop()
    stopped_at, stopped_wall = time.monotonic(), dt.datetime.now(dt.UTC)
    try:
        # The node answers now: its result reaches the orchestrator, which ends the
        # execution while the database is gone.
        ws.send(json.dumps(make_frame("command.result", {"success": True, "result": {
            "deploymentId": deployment_id, "found": True, "stopped": True}},
            correlation_id=stop_command["messageId"])))
        # Everything that needs the database says so, each route from its own thread.
        loop = Loop(probe, threads=len(routes), pause=0.2)
        try:
            time.sleep(OUTAGE)
        finally:
            loop.stop()
        health.append(httpx.get(f"{cluster}/api/health", timeout=10))
    finally:
        database.start()
    restarted_at, restarted_wall = time.monotonic(), dt.datetime.now(dt.UTC)
    assert OUTAGE <= restarted_at - stopped_at < OUTAGE + 15
    # Every probe failed, and failed as 503 unavailable with Retry-After.
    recorder.assert_only_unavailable(allow=lambda o: o.what == "health" and o.status == 503
                                     and o.body["status"] == "degraded"
                                     and o.body["checks"]["database"]["status"] == "down")
    assert {o.what for o in recorder.outcomes} == {what for what, _ in routes}
    down = health[0]
    assert down.status_code == 503 and down.json()["status"] == "degraded"
    assert down.json()["checks"]["database"]["status"] == "down"

    wait_for(lambda: healthy(cluster), timeout=60, what="health to turn green by itself")
    with ThreadPoolExecutor(1) as pool:  # the execution carries on, and completes
        done = pool.submit(wait_for, lambda: (d := api.get(f"/executions/{execution_id}").json())
                           ["status"] in ("completed", "failed", "cancelled") and d,
                           timeout=60, what="the execution to end after the outage")
        doc = done.result()
    assert doc["status"] == "completed", doc
    before, during, after = doc["steps"]
    assert during["attempts"] == 1 and during["status"] == "succeeded"
    assert after["status"] == "succeeded"
    # The middle step finished while the database was gone: its result was kept
    # through the outage, and arrived once.
    assert stopped_wall < dt.datetime.fromisoformat(during["finishedAt"]) < restarted_wall
    assert [m["direction"] for m in during["messages"]] == ["started", "finished"]
    r = client.post("/instructions", json={"name": unique(tag), "systemPrompt": "x"})
    assert r.status_code == 201, r.text

    # The deployment's stop ended during the outage; its end's effects are not lost.
    stop = api.get(f"/executions/{stopping}/wait", params={"timeout": 30}, timeout=40).json()
    assert stop["status"] == "completed", stop
    assert stopped_wall < dt.datetime.fromisoformat(stop["finishedAt"])
    assert [m["type"] for m in stop["steps"][1]["messages"]].count("command.result") == 1
    deployment = api.get(f"/deployments/{deployment_id}").json()
    assert deployment["status"] == "stopped", deployment
    assert deployment["executionId"] == stopping
    listed = api.get("/executions", params={"resourceType": "deployment",
                                            "resourceId": deployment_id}).json()["data"]
    assert {e["id"]: e["status"] for e in listed}[stopping] == "completed"
    print(f"database fault: {recorder.statuses()}")
