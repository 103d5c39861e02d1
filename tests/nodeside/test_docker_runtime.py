"""The deployment commands on the docker runtime, against a real dockerd and the
model-server test image (tests/support/images.py)."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import docker
import pytest

from nodeside.deployments import DeploymentHandlers
from nodeside.handlers import CommandFailed
from nodeside.models import COMPLETE
from tests.nodeside.conftest import ADVERTISE, Emitted, Ids, containers_of, make_handlers
from tests.support.images import MODEL_SERVER_IMAGE


def spec(deployment_id: str, **extra: Any) -> dict[str, Any]:
    return {"deploymentId": deployment_id, "runtime": "docker", "image": MODEL_SERVER_IMAGE,
            "port": 8000, **extra}


async def call(handlers: DeploymentHandlers, deployment_id: str, method: str = "GET",
               path: str = "/health", body: Any = None) -> dict[str, Any]:
    data = {"deploymentId": deployment_id, "method": method, "path": path,
            "headers": {"Content-Type": "application/json"}}
    if body is not None:
        data["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return await handlers.request(data)


def decoded(answer: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(answer["body"]))


async def test_create_request_logs_stats_stop(handlers: DeploymentHandlers, emitted: Emitted,
                                              deployment_id: Ids,
                                              docker_client: docker.DockerClient) -> None:
    dep = deployment_id()
    created = await handlers.create(spec(dep))
    assert set(created) == {"deploymentId", "runtime", "containerId", "hostPort", "endpoint",
                            "adopted"}
    assert created["deploymentId"] == dep and created["runtime"] == "docker"
    assert created["adopted"] is False
    assert isinstance(created["hostPort"], int) and created["hostPort"] > 0
    assert created["endpoint"] == f"http://{ADVERTISE}:{created['hostPort']}"
    assert emitted.statuses(dep) == ["starting", "running"]
    assert emitted.of("deployment.status")[-1]["endpoint"] == created["endpoint"]

    health = await call(handlers, dep)
    assert health["status"] == 200 and decoded(health) == {"status": "ok"}
    assert health["headers"]["content-type"] == "application/json"
    models = decoded(await call(handlers, dep, path="/v1/models"))
    assert models["data"][0]["id"] == "test-model"
    chat = await call(handlers, dep, "POST", "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hello node"}]})
    assert chat["status"] == 200
    assert decoded(chat)["choices"][0]["message"]["content"] == "echo: hello node"
    assert (await call(handlers, dep, path="/nope"))["status"] == 404

    logs = await handlers.get_logs({"deploymentId": dep, "tail": 50})
    assert logs["deploymentId"] == dep
    assert any("listening on port 8000" in line for line in logs["lines"])
    assert "POST /v1/chat/completions 200" in logs["lines"]
    assert len((await handlers.get_logs({"deploymentId": dep, "tail": 2}))["lines"]) == 2

    stats = await handlers.get_stats({"deploymentId": dep})
    assert stats["status"] == "running" and stats["restartCount"] == 0
    assert isinstance(stats["cpuPercent"], float)
    assert isinstance(stats["memoryBytes"], int) and stats["memoryBytes"] > 0
    started = dt.datetime.fromisoformat(stats["startedAt"])
    assert abs((dt.datetime.now(dt.UTC) - started).total_seconds()) < 300

    again = await handlers.create(spec(dep))  # idempotent: the same container, adopted
    assert again == {**created, "adopted": True}

    assert await handlers.stop({"deploymentId": dep}) == {"deploymentId": dep, "stopped": True,
                                                         "found": True}
    assert emitted.statuses(dep)[-1] == "stopped"
    assert containers_of(docker_client, dep) == []
    assert await handlers.stop({"deploymentId": dep}) == {"deploymentId": dep, "stopped": False,
                                                         "found": False}
    for gone in (handlers.get_logs({"deploymentId": dep}), handlers.get_stats({"deploymentId": dep}),
                 call(handlers, dep)):
        with pytest.raises(CommandFailed) as info:
            await gone
        assert info.value.code == "not_found"


async def test_container_settings(handlers: DeploymentHandlers, deployment_id: Ids,
                                  docker_client: docker.DockerClient, tmp_path: Path) -> None:
    dep = deployment_id()
    model = tmp_path / "models" / "m-1"
    model.mkdir(parents=True)
    (model / "weights.bin").write_bytes(b"w")
    # The server lists its model dir first: proof of the mount and of MODEL_DIR.
    await handlers.create(spec(dep, modelId="m-1", memoryMb=256, cpus=0.5, gpus=1,
                               env={"MODEL_NAME": "tiny"},
                               command=["/bin/sh", "-c", "ls $MODEL_DIR; exec /bin/sh /srv/serve.sh"]))
    [container] = containers_of(docker_client, dep)
    attrs = container.attrs
    assert container.name == f"aiwm-{dep}"
    assert container.labels["aiwm.deployment"] == dep and container.labels["aiwm.managed"] == "true"
    host = attrs["HostConfig"]
    assert host["Init"] is True
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["Memory"] == 256 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert not host.get("DeviceRequests")  # no real GPUs here: none asked of Docker
    assert {"MODEL_DIR=/models", "PORT=8000", "MODEL_NAME=tiny"} <= set(attrs["Config"]["Env"])
    [mount] = attrs["Mounts"]
    assert (mount["Source"], mount["Destination"], mount["RW"]) == (str(model), "/models", False)
    assert "weights.bin" in (await handlers.get_logs({"deploymentId": dep}))["lines"]
    models = decoded(await call(handlers, dep, path="/v1/models"))
    assert models["data"][0]["id"] == "tiny"
    assert await handlers.model_dirs_in_use() >= {model}

    # Deploying a stored version: its own folder is mounted, and since the spec changed,
    # create replaces the container instead of adopting the old one.
    (model / "v3").mkdir()
    (model / "v3" / "v3.bin").write_bytes(b"w3")
    (model / "v3" / COMPLETE).touch()  # as a finished download leaves it
    first = container.id
    await handlers.create(spec(dep, modelId="m-1", modelVersion=3, env={"MODEL_NAME": "tiny"},
                               command=["/bin/sh", "-c", "ls $MODEL_DIR; exec /bin/sh /srv/serve.sh"]))
    [container] = containers_of(docker_client, dep)
    assert container.id != first
    assert [m["Source"] for m in container.attrs["Mounts"]] == [str(model / "v3")]
    assert "v3.bin" in (await handlers.get_logs({"deploymentId": dep}))["lines"]
    used = await handlers.model_dirs_in_use()
    assert model / "v3" in used and model not in used


async def test_a_new_agent_adopts_running_containers(handlers: DeploymentHandlers,
                                                     deployment_id: Ids, dockerd: str,
                                                     tmp_path: Path) -> None:
    dep = deployment_id()
    created = await handlers.create(spec(dep))
    emitted = Emitted()
    # A new runtime and handlers with no memory of the first: an agent after a restart.
    restarted = make_handlers(tmp_path / "restarted", dockerd, emitted)
    try:
        adopted = await restarted.create(spec(dep))
        assert adopted == {**created, "adopted": True}
        assert emitted.statuses(dep) == []  # nothing started, nothing to report
        assert (await call(restarted, dep))["status"] == 200
        assert (await restarted.get_stats({"deploymentId": dep}))["status"] == "running"
        assert (await restarted.stop({"deploymentId": dep}))["found"] is True
    finally:
        await restarted.aclose()


async def test_restart_replaces_the_container(handlers: DeploymentHandlers, emitted: Emitted,
                                              deployment_id: Ids) -> None:
    dep = deployment_id()
    first = await handlers.create(spec(dep))
    second = await handlers.restart(spec(dep, env={"MODEL_NAME": "v2"}))
    assert second["adopted"] is False
    assert second["containerId"] != first["containerId"]
    assert decoded(await call(handlers, dep, path="/v1/models"))["data"][0]["id"] == "v2"
    missing = deployment_id()
    made = await handlers.restart(spec(missing))  # nothing there: made from the spec
    assert made["adopted"] is False and (await call(handlers, missing))["status"] == 200
    assert emitted.statuses(dep) == ["starting", "running", "starting", "running"]


async def test_a_server_that_exits_fails_with_its_last_log_lines(
    handlers: DeploymentHandlers, emitted: Emitted, deployment_id: Ids,
    docker_client: docker.DockerClient
) -> None:
    dep = deployment_id()
    with pytest.raises(CommandFailed) as info:
        await handlers.create(spec(dep, command=["/bin/sh", "-c",
                                                 "echo loading; echo no weights found >&2; exit 3"]))
    assert info.value.code == "start_failed"
    assert "no weights found" in info.value.message and "loading" in info.value.message
    assert emitted.statuses(dep) == ["starting", "failed"]
    assert "no weights found" in emitted.of("deployment.status")[-1]["message"]
    assert containers_of(docker_client, dep) == []  # no crash loop left behind


async def test_docker_errors_have_stable_codes(handlers: DeploymentHandlers, deployment_id: Ids,
                                               tmp_path: Path, emitted: Emitted) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        (spec(deployment_id(), image="aiwm-test/absent:1"), "image_not_found"),
        (spec(deployment_id(), image=None), "invalid_spec"),
        (spec(deployment_id(), port=0), "invalid_spec"),
        (spec(deployment_id(), modelId="../etc"), "invalid_spec"),
        (spec(deployment_id(), command=["/no/such/program"]), "start_failed"),
    ]
    for data, code in cases:
        with pytest.raises(CommandFailed) as info:
            await handlers.create(data)
        assert info.value.code == code, info.value.message
    no_docker = make_handlers(tmp_path, str(tmp_path / "absent.sock"), emitted)
    with pytest.raises(CommandFailed) as info:
        await no_docker.create(spec(deployment_id()))
    assert info.value.code == "docker_unavailable"
    # A host without Docker still answers for deployments it does not have.
    assert (await no_docker.stop({"deploymentId": "x"}))["found"] is False


async def test_the_watcher_reports_changes_made_behind_its_back(
    handlers: DeploymentHandlers, emitted: Emitted, deployment_id: Ids,
    docker_client: docker.DockerClient
) -> None:
    dep = deployment_id()
    await handlers.create(spec(dep))
    await handlers.check()
    assert emitted.statuses(dep) == ["starting", "running"]  # no change, nothing new
    [container] = containers_of(docker_client, dep)
    container.stop(timeout=5)
    await handlers.check()
    assert emitted.statuses(dep)[-1] == "exited"
    container.remove()
    await handlers.check()
    assert emitted.statuses(dep)[-1] == "stopped"
    assert emitted.of("deployment.status")[-1]["message"] == "removed outside the agent"
    await handlers.check()
    assert emitted.statuses(dep).count("stopped") == 1
