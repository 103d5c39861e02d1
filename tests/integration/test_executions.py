"""Executions end to end: the REST API, the orchestrator actor, controller and node steps."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.integration.nodes_helpers import AgentProcess, Node, wait_status


class Flaky:
    """A real HTTP server whose paths fail a given number of times, then answer 200."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.hits: dict[str, list[float]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                import time

                outer.hits.setdefault(self.path, []).append(time.monotonic())
                left = outer.failures.get(self.path, 0)
                if left:
                    outer.failures[self.path] = left - 1
                self.send_response(500 if left else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if left else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, fail: int = 0) -> str:
        self.failures[path] = fail
        return f"http://127.0.0.1:{self.server.server_port}{path}"


@pytest.fixture(scope="module")
def flaky() -> Iterator[Flaky]:
    f = Flaky()
    yield f
    f.server.shutdown()


def run(api: httpx.Client, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """Create an execution and wait until it finishes."""
    r = api.post("/executions", json=body)
    assert r.status_code == 201, r.text
    return finish(api, r.json()["id"], timeout)


def finish(api: httpx.Client, execution_id: str, timeout: float = 60) -> dict[str, Any]:
    r = api.get(f"/executions/{execution_id}/wait", params={"timeout": timeout}, timeout=timeout + 10)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] in ("completed", "failed", "cancelled"), doc
    return doc


def wait_step(api: httpx.Client, execution_id: str, index: int, status: str) -> dict[str, Any]:
    def check() -> Any:
        steps = api.get(f"/executions/{execution_id}/steps").json()["steps"]
        return steps[index]["status"] == status and steps[index]

    return wait_for(check, timeout=30, what=f"step {index} to be {status}")


def ctl(name: str, command: str = "wait", **fields: Any) -> dict[str, Any]:
    return {"name": name, "kind": "controller", "command": command, **fields}


def ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def test_steps_run_in_dependency_order_and_independent_ones_overlap(api: httpx.Client) -> None:
    doc = run(api, {"name": "diamond", "steps": [
        ctl("first", data={"seconds": 0.05}),
        ctl("left", data={"seconds": 0.6}, dependsOn=["first"]),
        ctl("right", data={"seconds": 0.6}, dependsOn=["first"]),
        ctl("last", data={"seconds": 0.05}, dependsOn=["left", "right"]),
    ]})
    assert doc["status"] == "completed" and doc["progress"] == 100
    first, left, right, last = doc["steps"]
    assert ts(left["startedAt"]) >= ts(first["finishedAt"])
    assert ts(left["startedAt"]) < ts(right["finishedAt"]) and ts(right["startedAt"]) < ts(left["finishedAt"])
    assert ts(last["startedAt"]) >= max(ts(left["finishedAt"]), ts(right["finishedAt"]))
    assert [m["direction"] for m in left["messages"]] == ["started", "finished"]


def test_a_step_that_fails_twice_then_succeeds_is_retried_with_backoff(
        api: httpx.Client, flaky: Flaky) -> None:
    url = flaky.url("/twice", fail=2)
    doc = run(api, {"name": "flaky", "steps": [ctl("check", "http.check", data={"url": url},
        maxRetries=3, backoff={"initialSeconds": 0.2, "factor": 2, "maxSeconds": 5})]})
    assert doc["status"] == "completed"
    step = doc["steps"][0]
    assert step["attempts"] == 3 and step["result"]["status"] == 200
    hits = flaky.hits["/twice"]
    assert hits[1] - hits[0] >= 0.2 and hits[2] - hits[1] >= 0.4  # 0.2 s, then 0.4 s


def test_an_optional_step_may_fail_without_failing_the_execution(
        api: httpx.Client, flaky: Flaky) -> None:
    doc = run(api, {"name": "optional", "steps": [
        ctl("warmup", "http.check", data={"url": flaky.url("/never", fail=99)}, optional=True,
            maxRetries=0),
        ctl("main", data={"seconds": 0.01}),
    ]})
    assert doc["status"] == "completed"
    assert [s["status"] for s in doc["steps"]] == ["failed", "succeeded"]
    assert doc["steps"][0]["error"]["code"] == "unexpected_status"


def test_a_step_that_hangs_times_out_and_fails_the_execution(api: httpx.Client) -> None:
    doc = run(api, {"name": "hang", "steps": [
        ctl("hang", data={"seconds": 30}, timeoutSeconds=0.5, maxRetries=1,
            backoff={"initialSeconds": 0.1}),
        ctl("after", dependsOn=["hang"]),
    ]})
    assert doc["status"] == "failed"
    hang, after = doc["steps"]
    assert hang["status"] == "failed" and hang["error"]["code"] == "timeout"
    assert hang["attempts"] == 2
    assert after["status"] == "skipped"
    assert "hang" in doc["error"]["message"]


def test_the_execution_deadline_stops_everything(api: httpx.Client) -> None:
    doc = run(api, {"name": "deadline", "timeoutSeconds": 0.5, "steps": [
        ctl("slow", data={"seconds": 30}), ctl("next", dependsOn=["slow"])]})
    assert doc["status"] == "failed" and doc["error"]["code"] == "deadline_exceeded"
    assert [s["status"] for s in doc["steps"]] == ["cancelled", "skipped"]


def test_cancel_mid_run_stops_running_steps(api: httpx.Client) -> None:
    r = api.post("/executions", json={"name": "to cancel", "steps": [
        ctl("long", data={"seconds": 30}), ctl("later", dependsOn=["long"])]})
    execution_id = r.json()["id"]
    wait_step(api, execution_id, 0, "running")
    cancelled = api.delete(f"/executions/{execution_id}", params={"reason": "operator said so"})
    assert cancelled.status_code == 200, cancelled.text
    doc = cancelled.json()
    assert doc["status"] == "cancelled"
    assert [s["status"] for s in doc["steps"]] == ["cancelled", "cancelled"]
    assert doc["error"]["message"] == "operator said so"
    again = api.delete(f"/executions/{execution_id}")
    assert again.status_code == 200 and again.json()["version"] == doc["version"]  # no change


def test_retry_reruns_only_the_failed_steps(api: httpx.Client, flaky: Flaky) -> None:
    url = flaky.url("/retry-me", fail=1)
    doc = run(api, {"name": "retry", "steps": [
        ctl("prepare", data={"seconds": 0.01}),
        ctl("check", "http.check", data={"url": url}, dependsOn=["prepare"], maxRetries=0),
        ctl("after", dependsOn=["check"], data={"seconds": 0.01}),
    ]})
    assert doc["status"] == "failed" and doc["progress"] == 33
    prepared = doc["steps"][0]
    assert api.post(f"/executions/{doc['id']}/retry").status_code == 200
    again = finish(api, doc["id"])
    assert again["status"] == "completed" and again["retryCount"] == 1
    assert again["steps"][0] == prepared  # not run again
    assert again["steps"][1]["attempts"] == 1 and again["steps"][2]["status"] == "succeeded"
    conflict = api.post(f"/executions/{doc['id']}/retry")
    assert conflict.status_code == 409 and conflict.json()["code"] == "invalid_state"


def test_bad_executions_are_refused_with_every_problem_named(api: httpx.Client) -> None:
    r = api.post("/executions", json={"name": "bad", "steps": [
        ctl("a", dependsOn=["b"]), ctl("b", dependsOn=["a"])]})
    assert r.status_code == 422 and "cycle" in r.json()["detail"]
    r = api.post("/executions", json={"name": "bad", "steps": [
        ctl("a", "no.such.action", dependsOn=["zzz"]),
        {"name": "n", "kind": "node", "command": "system.healthCheck"}]})
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["errors"]}
    assert {"body.steps.0.command", "body.steps.0.dependsOn", "body.steps.1.nodeId"} <= fields
    r = api.post("/executions", json={"name": "bad", "steps": [
        {"name": "n", "kind": "node", "nodeId": "node-nope", "command": "system.healthCheck"}]})
    assert r.status_code == 422 and r.json()["code"] == "invalid_reference"
    assert api.post("/executions", json={"name": "x", "steps": []}).status_code == 422


def test_lists_filter_by_status_and_resource(api: httpx.Client, unique: Callable[[str], str]) -> None:
    rid = unique("res")
    done = run(api, {"name": "r1", "resource": {"type": "thing", "id": rid},
                     "steps": [ctl("s", data={"seconds": 0})]})
    page = api.get("/executions", params={"resourceType": "thing", "resourceId": rid}).json()
    assert page["total"] == 1 and page["data"][0]["id"] == done["id"]
    assert "messages" not in page["data"][0]["steps"][0] or not page["data"][0]["steps"][0]["messages"]
    completed = api.get("/executions", params={"status": "completed", "limit": 100}).json()
    assert all(e["status"] == "completed" for e in completed["data"])
    assert api.get("/executions", params={"status": "bogus"}).status_code == 422


def test_other_orgs_cannot_see_or_touch_an_execution(
        api: httpx.Client, client_for: Callable[..., httpx.Client]) -> None:
    doc = run(api, {"name": "mine", "steps": [ctl("s", data={"seconds": 0})]})
    other = client_for("admin", "org-b")
    assert other.get(f"/executions/{doc['id']}").status_code == 404
    assert other.delete(f"/executions/{doc['id']}").status_code == 404
    viewer = client_for("viewer", "org-a")
    assert viewer.post("/executions", json={"name": "v", "steps": [ctl("s")]}).status_code == 403


def test_patch_changes_only_the_description(api: httpx.Client) -> None:
    doc = run(api, {"name": "named", "steps": [ctl("s", data={"seconds": 0})]})
    r = api.patch(f"/executions/{doc['id']}", json={"name": "renamed", "metadata": {"k": 1}})
    assert r.status_code == 200 and r.json()["name"] == "renamed"
    assert r.json()["steps"][0]["status"] == "succeeded"
    assert api.patch(f"/executions/{doc['id']}", json={"steps": []}).status_code == 422


# --- node steps with a real agent -------------------------------------------------------


def test_node_steps_run_on_the_agent_with_an_audit_trail(
        api: httpx.Client, agent: tuple[Node, AgentProcess]) -> None:
    node, _ = agent
    doc = run(api, {"name": "check node", "steps": [
        {"name": "health", "kind": "node", "nodeId": node.id, "command": "system.healthCheck"},
        {"name": "bogus", "kind": "node", "nodeId": node.id, "command": "model.delete",
         "data": {"modelId": "never-downloaded"}, "dependsOn": ["health"]},
    ]})
    assert doc["status"] == "completed", doc
    health = doc["steps"][0]
    assert "checks" in health["result"]
    kinds = [(m["direction"], m["type"]) for m in health["messages"]]
    assert kinds == [("sent", "system.healthCheck"), ("received", "command.ack"),
                     ("received", "command.result")]
    assert health["commandId"] == f"{doc['id']}_0_1"


def test_a_node_step_waits_for_an_offline_node_and_completes_when_it_returns(
        api: httpx.Client, agent: tuple[Node, AgentProcess]) -> None:
    node, process = agent
    process.kill()
    wait_status(node, "offline", timeout=30)
    r = api.post("/executions", json={"name": "later", "steps": [
        {"name": "health", "kind": "node", "nodeId": node.id, "command": "system.healthCheck",
         "timeoutSeconds": 60}]})
    execution_id = r.json()["id"]
    wait_step(api, execution_id, 0, "running")
    process.start()
    doc = finish(api, execution_id)
    assert doc["status"] == "completed" and doc["steps"][0]["attempts"] == 1


def test_an_agent_killed_mid_step_makes_the_step_time_out_not_hang(
        api: httpx.Client, agent: tuple[Node, AgentProcess]) -> None:
    node, process = agent
    process.kill()
    doc = run(api, {"name": "no agent", "steps": [
        {"name": "health", "kind": "node", "nodeId": node.id, "command": "system.healthCheck",
         "timeoutSeconds": 1, "maxRetries": 1, "backoff": {"initialSeconds": 0.1}}]})
    assert doc["status"] == "failed"
    assert doc["steps"][0]["error"]["code"] == "timeout" and doc["steps"][0]["attempts"] == 2


def test_the_orchestrator_killed_mid_execution_resumes_and_finishes(api: httpx.Client) -> None:
    import ray

    from actors import NAMESPACE, ORCHESTRATOR_NAME

    r = api.post("/executions", json={"name": "survivor", "steps": [
        ctl("before", data={"seconds": 0.01}),
        ctl("during", data={"seconds": 2}, dependsOn=["before"]),
        ctl("after", data={"seconds": 0.01}, dependsOn=["during"]),
    ]})
    execution_id = r.json()["id"]
    before = wait_step(api, execution_id, 1, "running")
    ray.kill(ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE), no_restart=False)

    def done() -> Any:
        doc = api.get(f"/executions/{execution_id}").json()
        return doc["status"] == "completed" and doc

    doc = wait_for(done, timeout=60, what="the execution to complete after the restart")
    first = doc["steps"][0]
    assert first["attempts"] == 1 and first["finishedAt"] == wait_step(api, execution_id, 0,
                                                                       "succeeded")["finishedAt"]
    assert doc["steps"][1]["attempts"] == before["attempts"]  # the same attempt, run again


def test_a_retried_node_step_sends_a_new_command(
        api: httpx.Client, agent: tuple[Node, AgentProcess]) -> None:
    import sys

    from tests.support import model_server

    node, _ = agent
    dep = f"retry-{node.id}"
    doc = run(api, {"name": "logs", "steps": [
        {"name": "logs", "kind": "node", "nodeId": node.id, "command": "deployment.getLogs",
         "data": {"deploymentId": dep}}]})
    assert doc["status"] == "failed" and doc["steps"][0]["error"]["code"] == "not_found"
    first = doc["steps"][0]["commandId"]
    created = api.post(f"/nodes/{node.id}/commands", json={"type": "deployment.create", "data": {
        "deploymentId": dep, "runtime": "process",
        "command": [sys.executable, model_server.__file__, "--port", "{port}"]}})
    assert created.status_code == 200 and created.json()["success"], created.text
    try:
        assert api.post(f"/executions/{doc['id']}/retry").status_code == 200
        again = finish(api, doc["id"])
        assert again["status"] == "completed", again
        assert again["steps"][0]["commandId"] != first and again["steps"][0]["commandId"].endswith("_r1")
        assert "lines" in again["steps"][0]["result"]
    finally:
        api.post(f"/nodes/{node.id}/commands", json={"type": "deployment.stop",
                                                      "data": {"deploymentId": dep}})


def test_node_step_data_is_checked_when_the_execution_is_created(
        api: httpx.Client, agent: tuple[Node, AgentProcess]) -> None:
    node, _ = agent
    r = api.post("/executions", json={"name": "bad data", "steps": [
        {"name": "s", "kind": "node", "nodeId": node.id, "command": "deployment.create",
         "data": {"port": "eighty"}}]})
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} == {"body.steps.0.data.deploymentId",
                                                        "body.steps.0.data.port"}
