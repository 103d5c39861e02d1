"""Fault: the NodeHost actor (``nodes:<shard>``) holding a connected node dies while two
commands to that node are running: one sent over REST, one an execution's node step.
What must hold: the REST call waiting on it gets 503 (never 500, never a hang); the
execution's attempt fails as retryable and a new attempt completes the step (the server
the first attempt started is adopted, not started twice); the agent reconnects by itself
and the node is online again in the new host; a command sent afterwards completes;
nothing answers 500 meanwhile."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import httpx
import ray

from actors import NAMESPACE, node_shard_of
from aiwm.settings import Settings
from tests.conftest import wait_for
from tests.faults.conftest import Loop, Outcome, Recorder, actor_pid, sessions
from tests.integration.nodes_helpers import AgentProcess, Node
from tests.support import model_server


def slow_server(seconds: float) -> list[str]:
    """A model server that takes ``seconds`` to listen: deployment.create runs that long."""
    return ["sh", "-c", f"sleep {seconds}; exec {sys.executable} {model_server.__file__} "
            "--port {port}"]


def _command_timeout(o: Outcome) -> bool:
    """A command the node did not answer within its own timeout (it was reconnecting)."""
    return o.status == 504 and isinstance(o.body, dict) and o.body.get("code") == "command_timeout"


def test_node_host_killed_mid_command_agent_comes_back(
    api: httpx.Client, client_for: Callable[..., httpx.Client], agent: tuple[Node, AgentProcess],
    settings: Settings, unique: Callable[[str], str], recorder: Recorder,
) -> None:
    node, process = agent
    shard = node_shard_of(node.id, settings.node_proxy_shards)
    host = ray.get_actor(f"nodes:{shard}", namespace=NAMESPACE)
    before = cast(dict[str, Any], ray.get(host.call.remote(node.id, "org-a", "status")))
    assert before["connected"] is True
    pid_before, sessions_before = actor_pid(host), sessions(process)
    dep, step_dep = unique("dep"), unique("dep")
    r = api.post("/executions", json={"name": step_dep, "steps": [{
        "name": "start", "kind": "node", "nodeId": node.id, "command": "deployment.create",
        "timeoutSeconds": 60, "backoff": {"initialSeconds": 0.5},
        "data": {"deploymentId": step_dep, "runtime": "process", "command": slow_server(4)}}]})
    assert r.status_code == 201, r.text
    execution_id = r.json()["id"]
    prober = client_for("admin", "org-a", sub=unique("prober"))

    def probe(_: int, i: int) -> None:  # the node's other routes while its host dies
        recorder.call("get node", lambda: prober.get(f"/nodes/{node.id}"))
        recorder.call("health check", lambda: prober.post(
            f"/nodes/{node.id}/commands", json={"type": "system.healthCheck", "timeout": 5}))

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(recorder.call, "slow command", lambda: api.post(
            f"/nodes/{node.id}/commands", json={"type": "deployment.create", "timeout": 60, "data": {
                "deploymentId": dep, "runtime": "process", "command": slow_server(4)}}))
        wait_for(lambda: f"started {dep} as pid" in process.log()
                 and f"started {step_dep} as pid" in process.log(), timeout=20,
                 what="the agent to be running both slow commands")
        loop = Loop(probe, pause=0.1)
        try:
            ray.kill(host, no_restart=False)  # mid-command
            killed_at = time.monotonic()
            in_flight = slow.result(30)
            wait_for(lambda: sessions(process) > sessions_before, timeout=30,
                     what="the agent to reconnect by itself")
            wait_for(lambda: any(o.ok and o.what == "health check" and o.at > killed_at
                                 for o in recorder.outcomes), timeout=30,
                     what="a command to complete after the host restarted")
        finally:
            loop.stop()
    try:
        assert in_flight.status == 503, f"the command in flight ended {in_flight}"
        assert time.monotonic() - killed_at < 60
        recorder.assert_only_unavailable(allow=_command_timeout)
        new_host = ray.get_actor(f"nodes:{shard}", namespace=NAMESPACE)
        assert actor_pid(new_host) != pid_before, "the node host was not restarted"
        status: dict[str, Any] = ray.get(new_host.call.remote(node.id, "org-a", "status"))
        assert status["connected"] is True and status["online"] is True
        assert node.get()["status"] == "online"
        r = api.post(f"/nodes/{node.id}/commands", json={"type": "system.healthCheck", "timeout": 20})
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        doc = api.get(f"/executions/{execution_id}/wait", params={"timeout": 60}, timeout=70).json()
        assert doc["status"] == "completed", doc
        step = doc["steps"][0]
        # The attempt in flight failed with the host; a later one (a new command) adopted
        # the server the first one had started.
        assert step["attempts"] >= 2 and step["commandId"] != f"{execution_id}_0_1"
        assert step["result"]["adopted"] is True
        assert process.log().count(f"started {step_dep} as pid") == 1
    finally:  # the servers keep running (the lost command's included): stop them
        for d in (dep, step_dep):
            r = api.post(f"/nodes/{node.id}/commands", json={"type": "deployment.stop",
                                                              "data": {"deploymentId": d}})
            assert r.status_code == 200 and r.json()["success"] is True, r.text
