"""Deployments end to end: a real agent process, a real dockerd and a docker-imported model
server image, the orchestrator's executions and the gateway through the node's socket."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import psutil
import pytest

from tests.conftest import wait_for
from tests.integration.nodes_helpers import AgentProcess, Node, make_node, wait_status
from tests.support import model_server

SERVER_CMD = [sys.executable, model_server.__file__, "--port", "{port}"]


@pytest.fixture()
def node_agent(api: httpx.Client, unique: Callable[[str], str], cluster: str, tmp_path: Path,
               dockerd: str) -> Iterator[tuple[Node, AgentProcess]]:
    node = make_node(api, unique)
    agent = AgentProcess(ws_url=cluster.replace("http://", "ws://") + "/ws/node", node=node,
                         state_dir=tmp_path, extra_env={
                             "DOCKER_SOCKET": dockerd, "AIWM_NODE_ADVERTISE_HOST": "127.0.0.1",
                             "AIWM_NODE_PUBLISH_HOST": "127.0.0.1",
                             "AIWM_NODE_WATCH_INTERVAL": "0.3"}).start()
    wait_status(node, "online")
    yield node, agent
    agent.kill()


@pytest.fixture()
def model(api: httpx.Client, unique: Callable[[str], str]) -> dict[str, Any]:
    r = api.post("/models", json={"name": unique("echo"), "source": "custom"})
    assert r.status_code == 201, r.text
    return r.json()


def wait_deployment(api: httpx.Client, dep_id: str, *statuses: str, timeout: float = 90) -> dict:
    def check() -> Any:
        r = api.get(f"/deployments/{dep_id}")
        return r.status_code == 200 and r.json()["status"] in statuses and r.json()

    return wait_for(check, timeout=timeout, what=f"deployment {dep_id} to be {statuses}")


def finished(api: httpx.Client, execution_id: str) -> dict[str, Any]:
    r = api.get(f"/executions/{execution_id}/wait", params={"timeout": 120}, timeout=140)
    assert r.status_code == 200, r.text
    return r.json()


def test_docker_deploy_call_through_the_gateway_stop_and_remove(
        api: httpx.Client, node_agent: tuple[Node, AgentProcess], model: dict[str, Any],
        model_server_image: str, dockerd: str, unique: Callable[[str], str], cluster: str) -> None:
    node, _ = node_agent
    r = api.post("/deployments", json={"name": unique("dep"), "modelId": model["id"],
                                        "nodeId": node.id, "runtime": "docker", "image": model_server_image,
                                        "port": 8000, "resources": {"memoryMb": 64}})
    assert r.status_code == 201, r.text
    dep, execution = r.json()["deployment"], r.json()["execution"]
    assert dep["executionId"] == execution["id"]
    assert [s["name"] for s in execution["steps"]] == ["download", "start", "route", "health"]
    done = finished(api, execution["id"])
    assert done["status"] == "completed", done
    running = wait_deployment(api, dep["id"], "running")
    assert running["route"] == f"/api/models/{model['name']}/invoke/"
    assert running["endpoint"].startswith("http://127.0.0.1:")

    # The container carries the deployment's labels and limits.
    container = docker.DockerClient(base_url=f"unix://{dockerd}").containers.get(running["runtimeId"])
    assert container.labels["aiwm.deployment"] == dep["id"]
    assert container.attrs["HostConfig"]["Memory"] == 64 * 2**20
    assert container.attrs["HostConfig"]["Init"] is True

    # Through the gateway, by path and OpenAI style.
    health = api.get(f"/models/{model['name']}/invoke/health")
    assert health.status_code == 200 and health.headers["x-aiwm-deployment"] == dep["id"]
    gateway = httpx.Client(base_url=cluster,
                           headers={"Authorization": api.headers["Authorization"]}, timeout=30)
    listed = gateway.get("/v1/models").json()
    assert model["name"] in [m["id"] for m in listed["data"]]
    chat = gateway.post("/v1/chat/completions", json={
        "model": model["name"], "messages": [{"role": "user", "content": "hello there"}]})
    assert chat.status_code == 200, chat.text
    assert "hello there" in chat.json()["choices"][0]["message"]["content"]
    missing = gateway.post("/v1/chat/completions", json={"model": "no-such-model"})
    assert missing.status_code == 404
    assert gateway.post("/v1/chat/completions", content=b"not json").status_code == 422

    logs = api.get(f"/deployments/{dep['id']}/logs", params={"tail": 50})
    assert logs.status_code == 200 and logs.json()["lines"], logs.text
    metrics = api.get(f"/deployments/{dep['id']}/metrics")
    assert metrics.status_code == 200 and metrics.json()["runtime"]["status"] == "running"

    stop = api.post(f"/deployments/{dep['id']}/stop")
    assert stop.status_code == 202
    assert finished(api, stop.json()["execution"]["id"])["status"] == "completed"
    stopped = wait_deployment(api, dep["id"], "stopped")
    assert stopped["route"] is None and stopped["endpoint"] is None
    with pytest.raises(docker.errors.NotFound):
        docker.DockerClient(base_url=f"unix://{dockerd}").containers.get(running["runtimeId"])
    assert api.get(f"/models/{model['name']}/invoke/health").status_code == 503

    deleted = api.delete(f"/deployments/{dep['id']}")
    assert deleted.status_code == 202
    assert finished(api, deleted.json()["execution"]["id"])["status"] == "completed"
    assert api.get(f"/deployments/{dep['id']}").status_code == 404
    events = api.get("/executions", params={"resourceType": "deployment",
                                              "resourceId": dep["id"]}).json()
    assert events["total"] == 3  # deploy, stop, delete


def test_process_runtime_deploy_restart_and_delete(
        api: httpx.Client, node_agent: tuple[Node, AgentProcess], model: dict[str, Any],
        unique: Callable[[str], str]) -> None:
    node, _ = node_agent
    r = api.post("/deployments", json={"name": unique("proc"), "modelId": model["id"],
                                        "nodeId": node.id, "runtime": "process",
                                        "command": SERVER_CMD, "env": {"GREETING": "hi"}})
    assert r.status_code == 201, r.text
    dep = r.json()["deployment"]
    assert finished(api, r.json()["execution"]["id"])["status"] == "completed"
    first = wait_deployment(api, dep["id"], "running")
    env = api.get(f"/models/{model['name']}/invoke/env/GREETING")
    assert env.status_code == 200 and env.json()["value"] == "hi"

    # An answer larger than a frame (64 KiB in the tests) is refused with a reason, and
    # the session goes on.
    big = api.get(f"/models/{model['name']}/invoke/big", params={"bytes": 200_000})
    assert big.status_code == 503 and "result_too_large" in big.json()["detail"]
    assert api.get(f"/models/{model['name']}/invoke/health").status_code == 200

    restart = api.post(f"/deployments/{dep['id']}/restart")
    assert restart.status_code == 202
    assert finished(api, restart.json()["execution"]["id"])["status"] == "completed"
    second = wait_deployment(api, dep["id"], "running")
    assert second["runtimeId"] != first["runtimeId"]  # a new process
    assert api.get(f"/models/{model['name']}/invoke/health").status_code == 200

    deleted = api.delete(f"/deployments/{dep['id']}")
    assert finished(api, deleted.json()["execution"]["id"])["status"] == "completed"
    assert api.get(f"/deployments/{dep['id']}").status_code == 404


def test_a_server_that_cannot_start_fails_the_deployment_with_the_reason(
        api: httpx.Client, node_agent: tuple[Node, AgentProcess], model: dict[str, Any],
        unique: Callable[[str], str]) -> None:
    node, _ = node_agent
    r = api.post("/deployments", json={
        "name": unique("broken"), "modelId": model["id"], "nodeId": node.id,
        "runtime": "process", "command": [sys.executable, "-c", "print('no weights'); exit(3)"]})
    assert r.status_code == 201
    done = finished(api, r.json()["execution"]["id"])
    assert done["status"] == "failed"
    start = done["steps"][1]
    assert start["error"]["code"] == "start_failed" and "no weights" in start["error"]["message"]
    failed = wait_deployment(api, r.json()["deployment"]["id"], "failed")
    assert "start_failed" in failed["error"] or "no weights" in failed["error"]
    # Removing a failed deployment whose server never ran works, and so does force.
    forced = api.delete(f"/deployments/{failed['id']}", params={"force": "true"})
    assert forced.status_code == 202 and forced.json()["execution"] is None
    assert api.get(f"/deployments/{failed['id']}").status_code == 404


def test_deployments_refuse_bad_references_and_the_model_in_use(
        api: httpx.Client, node_agent: tuple[Node, AgentProcess], model: dict[str, Any],
        unique: Callable[[str], str]) -> None:
    node, _ = node_agent
    bad = api.post("/deployments", json={"name": unique("x"), "modelId": "mdl-nope",
                                          "nodeId": node.id, "runtime": "process",
                                          "command": SERVER_CMD})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_reference"
    r = api.post("/deployments", json={"name": unique("x"), "modelId": model["id"],
                                        "nodeId": node.id, "runtime": "process",
                                        "command": SERVER_CMD})
    assert r.status_code == 201
    in_use = api.delete(f"/models/{model['id']}")
    assert in_use.status_code == 409 and in_use.json()["code"] == "in_use"
    finished(api, r.json()["execution"]["id"])
    deleted = api.delete(f"/deployments/{r.json()['deployment']['id']}")
    assert finished(api, deleted.json()["execution"]["id"])["status"] == "completed"


def test_a_server_that_dies_on_its_own_fails_its_deployment_until_it_is_back(
        api: httpx.Client, node_agent: tuple[Node, AgentProcess], model: dict[str, Any],
        unique: Callable[[str], str]) -> None:
    import os
    import signal

    node, _ = node_agent
    r = api.post("/deployments", json={"name": unique("dies"), "modelId": model["id"],
                                        "nodeId": node.id, "runtime": "process",
                                        "command": SERVER_CMD})
    dep = r.json()["deployment"]
    assert finished(api, r.json()["execution"]["id"])["status"] == "completed"
    running = wait_deployment(api, dep["id"], "running")
    os.kill(int(running["runtimeId"]), signal.SIGKILL)
    failed = wait_deployment(api, dep["id"], "failed", timeout=30)
    assert failed["error"].startswith(f"the server exited on node {node.id}")
    # Its last log lines are on record, at the node's events.
    events = api.get(f"/nodes/{node.id}/events").json()["data"]
    [last] = [e["data"] for e in events
              if e["type"] == "deployment.logs" and e["data"]["deploymentId"] == dep["id"]]
    assert last["reason"] == "exited" and last["lines"][0].startswith("listening on ")
    restart = api.post(f"/deployments/{dep['id']}/restart")
    assert finished(api, restart.json()["execution"]["id"])["status"] == "completed"
    assert wait_deployment(api, dep["id"], "running")["error"] is None
    deleted = api.delete(f"/deployments/{dep['id']}")
    assert finished(api, deleted.json()["execution"]["id"])["status"] == "completed"


def test_an_agent_killed_mid_step_finishes_the_step_after_it_reconnects(
        api: httpx.Client, node_agent: tuple[Node, AgentProcess], model: dict[str, Any],
        unique: Callable[[str], str]) -> None:
    node, agent = node_agent
    # Slow enough to start that the kill lands before the server is up, even when a
    # loaded machine answers the polling below late; the marker finds its process.
    marker = unique("slow-start")
    slow = ["sh", "-c",
            f": {marker}; sleep 8; exec {sys.executable} {model_server.__file__} --port $PORT"]
    r = api.post("/deployments", json={"name": unique("slow"), "modelId": model["id"],
                                        "nodeId": node.id, "runtime": "process", "command": slow})
    execution_id = r.json()["execution"]["id"]

    def starting() -> Any:
        steps = api.get(f"/executions/{execution_id}/steps").json()["steps"]
        return steps[1]["status"] == "running" and steps[1]

    wait_for(starting, timeout=30, what="the start step to run")

    def spawned() -> bool:  # the step runs once the command is sent; the kill must come
        return any(marker in " ".join(p.info["cmdline"] or [])  # after the agent started it
                   for p in psutil.process_iter(["cmdline"]))

    wait_for(spawned, timeout=30, what="the agent to start the server process")
    time.sleep(0.5)  # and to record it
    agent.kill()  # while the server is still starting
    agent.start()  # the same node: the command comes again; the server is adopted
    done = finished(api, execution_id)
    assert done["status"] == "completed", done
    start = done["steps"][1]
    assert start["attempts"] == 1 and start["result"]["adopted"] is True
    deleted = api.delete(f"/deployments/{r.json()['deployment']['id']}")
    assert finished(api, deleted.json()["execution"]["id"])["status"] == "completed"
