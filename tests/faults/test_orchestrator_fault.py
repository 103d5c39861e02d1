"""Fault: the ExecutionOrchestrator dies while executions are running (controller steps,
and a node step on a real agent whose result arrives while no orchestrator is there)
and more are being created. What must hold: every execution the API acknowledged (201)
is kept and ends (here: completes; succeeded steps never run again; the running step
runs again as the same attempt, and a node step's command, having the same id, is
neither sent twice nor its result lost); every execution that was stored at all, even
one whose create answered 503, ends too: none stays pending or running; a failed
create is a 503 problem+json, never a 500."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import ray

from actors import NAMESPACE, ORCHESTRATOR_NAME
from tests.conftest import wait_for
from tests.faults.conftest import Loop, Recorder, actor_pid
from tests.faults.test_node_host_fault import slow_server
from tests.integration.nodes_helpers import AgentProcess, Node

TERMINAL = ("completed", "failed", "cancelled")


def ctl(name: str, seconds: float, *after: str) -> dict[str, Any]:
    return {"name": name, "kind": "controller", "command": "wait", "data": {"seconds": seconds},
            "dependsOn": list(after)}


def tagged(api: httpx.Client, tag: str) -> list[dict[str, Any]]:
    """Every stored execution of this test (whatever its create answered)."""
    found: list[dict[str, Any]] = []
    page = 1
    while True:
        r = api.get("/executions", params={"resourceType": "fault", "resourceId": tag,
                                           "limit": 100, "page": page})
        assert r.status_code == 200, r.text
        found += r.json()["data"]
        if len(found) >= r.json()["total"]:
            return found
        page += 1


def test_orchestrator_killed_with_executions_in_flight(
    api: httpx.Client, client_for: Callable[..., httpx.Client], unique: Callable[[str], str],
    recorder: Recorder, agent: tuple[Node, AgentProcess], request: pytest.FixtureRequest,
) -> None:
    node, process = agent
    tag = unique("orchfault")
    resource = {"type": "fault", "id": tag}
    dep = unique("dep")
    r = api.post("/executions", json={"name": "node step", "resource": resource, "steps": [{
        "name": "start", "kind": "node", "nodeId": node.id, "command": "deployment.create",
        "timeoutSeconds": 60, "data": {"deploymentId": dep, "runtime": "process",
                                       "command": slow_server(1.5)}}]})
    assert r.status_code == 201, r.text
    node_one = r.json()["id"]
    request.addfinalizer(lambda: api.post(f"/nodes/{node.id}/commands", json={
        "type": "deployment.stop", "data": {"deploymentId": dep}}))  # the server it starts
    long_ones = []
    for n in range(4):
        r = api.post("/executions", json={"name": f"long-{n}", "resource": resource, "steps": [
            ctl("before", 0.05), ctl("during", 2.5, "before"), ctl("after", 0.05, "during")]})
        assert r.status_code == 201, r.text
        long_ones.append(r.json()["id"])
    creator = client_for("admin", "org-a", sub=tag)

    def create(_: int, i: int) -> None:  # new executions keep coming while the orchestrator dies
        recorder.call("create", lambda: creator.post("/executions", json={
            "name": f"short-{i}", "resource": resource, "steps": [ctl("only", 0.3)]}))

    def middle_running() -> bool:
        for execution_id in long_ones:
            steps = api.get(f"/executions/{execution_id}/steps").json()["steps"]
            if steps[1]["status"] != "running":
                return False
        return True

    wait_for(middle_running, timeout=30, what="every long execution to be in its middle step")
    wait_for(lambda: f"started {dep} as pid" in process.log(), timeout=20,
             what="the agent to run the node step")
    orchestrator = ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE)
    pid_before = actor_pid(orchestrator)
    before = {e: api.get(f"/executions/{e}").json() for e in long_ones}
    loop = Loop(create, pause=0.05)
    try:
        time.sleep(0.3)
        ray.kill(orchestrator, no_restart=False)
        killed_at = time.monotonic()
        wait_for(lambda: sum(o.ok and o.at > killed_at + 0.5 for o in recorder.outcomes) >= 3,
                 timeout=60, what="creates to be acknowledged again after the kill")
    finally:
        loop.stop()
    assert actor_pid(ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE)) != pid_before
    recorder.assert_only_unavailable()

    acked = {o.body["id"] for o in recorder.outcomes if o.ok} | set(long_ones) | {node_one}

    def all_ended() -> Any:
        docs = tagged(api, tag)
        return all(d["status"] in TERMINAL for d in docs) and docs

    docs = {d["id"]: d for d in wait_for(all_ended, timeout=60, what="every execution to end")}
    lost = acked - set(docs)
    assert not lost, f"acknowledged executions lost: {lost}"
    not_completed = {i: d["status"] for i, d in docs.items() if d["status"] != "completed"}
    assert not not_completed, f"executions that did not complete: {not_completed}"
    for execution_id in long_ones:
        doc = api.get(f"/executions/{execution_id}").json()
        first, middle, last = doc["steps"]
        # The step that succeeded before the kill is not run again; the one that was
        # running runs again as the same attempt.
        assert first == before[execution_id]["steps"][0]
        assert middle["attempts"] == 1 and last["attempts"] == 1
        assert [m["direction"] for m in middle["messages"]].count("finished") == 1
    step = api.get(f"/executions/{node_one}").json()["steps"][0]
    assert step["attempts"] == 1 and step["commandId"] == f"{node_one}_0_1"
    assert step["result"]["adopted"] is False  # the first run's result, not a repeat's
    assert [m["type"] for m in step["messages"]].count("command.result") == 1
    assert process.log().count(f"started {dep} as pid") == 1
    print(f"orchestrator fault: {len(acked)} acknowledged, {len(docs)} stored, "
          f"{recorder.statuses()}")
