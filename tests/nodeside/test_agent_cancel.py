"""The agent with its real handlers against a scripted controller (a WebSocket server in
this process): ``command.cancel`` ends a running command with a ``cancelled`` result, and
progress and status frames reach the controller while connected."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from aiwm.protocol import make_frame
from nodeside.agent import Agent
from nodeside.config import AgentSettings
from nodeside.models import ModelHandlers
from tests.nodeside.conftest import MODEL_SERVER_CMD, WEIGHTS, FileServer, wait_until


class Controller:
    """Welcomes one agent at a time, records every frame it sends and sends what the test
    asks for."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.ws: ServerConnection | None = None
        self.server: Server | None = None

    async def handle(self, ws: ServerConnection) -> None:
        self.received.append(json.loads(await ws.recv()))
        await ws.send(json.dumps(make_frame("session.welcome", {
            "protocolVersion": 1, "sessionId": "s-1", "heartbeatInterval": 60000,
            "metricsInterval": 60000})))
        self.ws = ws
        with contextlib.suppress(Exception):
            async for raw in ws:
                self.received.append(json.loads(raw))

    async def send(self, kind: str, data: dict[str, Any] | None = None, *,
                   correlation_id: str | None = None) -> dict[str, Any]:
        frame = make_frame(kind, data, correlation_id=correlation_id)
        assert self.ws is not None
        await self.ws.send(json.dumps(frame))
        return frame

    def of(self, kind: str, correlation_id: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.received if f["type"] == kind
                and (correlation_id is None or f.get("correlationId") == correlation_id)]

    async def result_of(self, command_id: str) -> dict[str, Any]:
        [result] = await wait_until(lambda: self.of("command.result", command_id),
                                    what=f"the result of {command_id}")
        return result  # type: ignore[no-any-return]


@pytest.fixture()
async def controller() -> AsyncIterator[Controller]:
    c = Controller()
    async with serve(c.handle, "127.0.0.1", 0) as server:
        c.server = server
        yield c


@pytest.fixture()
async def agent(controller: Controller, tmp_path: Path) -> AsyncIterator[Agent]:
    assert controller.server is not None
    port = next(iter(controller.server.sockets)).getsockname()[1]
    settings = AgentSettings(  # type: ignore[call-arg]
        controller_url=f"ws://127.0.0.1:{port}/ws/node", node_token="t", node_id="node-1",
        gpu_mock_mode=True, aiwm_node_state_dir=tmp_path / "state",
        docker_socket=str(tmp_path / "no-docker.sock"), aiwm_node_advertise_host="10.9.8.7",
        heartbeat_interval=60000, metrics_interval=200, aiwm_node_watch_interval=0.1)
    made = Agent(settings=settings)
    running = asyncio.create_task(made.run_forever())
    await wait_until(lambda: controller.ws is not None and made.sessions, what="a session")
    yield made
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    await made.aclose()
    if made.deployments is not None:  # the process runtime's servers outlive agents
        for runtime in made.deployments.runtimes.values():
            if runtime.present():
                for instance in await runtime.list():
                    await runtime.remove(instance.deployment_id)


@pytest.fixture()
async def files() -> AsyncIterator[FileServer]:
    server = FileServer({"/weights.bin": WEIGHTS})
    yield server
    server.close()


async def test_cancel_ends_a_running_command_with_a_cancelled_result(
    agent: Agent, controller: Controller, files: FileServer, tmp_path: Path
) -> None:
    stalled = {"modelId": "m", "files": [{"name": "w.bin", "url": files.url + "/stall/weights.bin"}]}
    command = await controller.send("model.download", stalled)
    command_id = command["messageId"]
    assert await wait_until(lambda: controller.of("command.ack", command_id), what="the ack")
    partial = tmp_path / "state" / "models" / "m"
    await wait_until(lambda: list(partial.glob("*.part")), what="the download to be under way")

    await controller.send("command.cancel", correlation_id=command_id)
    result = await controller.result_of(command_id)
    assert result["data"] == {"success": False, "result": {}, "error": {
        "code": "cancelled", "message": "model.download cancelled by the controller"}}
    assert list(partial.iterdir()) == []  # the partial file went with it
    assert agent.spool.get(command_id) == result  # spooled like any result until acked
    assert command_id not in agent._running

    await controller.send("command.cancel", correlation_id=command_id)  # finished: ignored
    await controller.send("command.cancel", correlation_id="never-sent")  # unknown: ignored
    check = await controller.send("system.healthCheck", {})
    assert "healthy" in (await controller.result_of(check["messageId"]))["data"]["result"]
    assert len(controller.of("command.result", command_id)) == 1


async def test_a_cancelled_start_leaves_no_server_behind(
        agent: Agent, controller: Controller) -> None:
    assert agent.deployments is not None
    runtime = agent.deployments.runtimes["process"]
    never_listens = [sys.executable, "-c", "import time; time.sleep(120)"]
    command = await controller.send("deployment.create", {
        "deploymentId": "dep-slow", "runtime": "process", "command": never_listens})
    command_id = command["messageId"]
    [instance] = await wait_until(runtime.list, what="the server to be started")
    assert instance.pid and psutil.pid_exists(instance.pid)
    assert [f["data"]["status"] for f in controller.of("deployment.status")] == ["starting"]

    await controller.send("command.cancel", correlation_id=command_id)
    result = await controller.result_of(command_id)
    assert result["data"]["error"]["code"] == "cancelled"
    assert await runtime.list() == []
    assert not psutil.pid_exists(instance.pid) or \
        psutil.Process(instance.pid).status() == psutil.STATUS_ZOMBIE
    last = controller.of("deployment.status")[-1]["data"]
    assert last == {"deploymentId": "dep-slow", "status": "stopped",
                    "message": "cancelled while starting"}
    assert "dep-slow" not in agent.deployments._known  # the watcher has nothing to report


async def test_progress_and_status_frames_reach_the_controller(
    agent: Agent, controller: Controller, files: FileServer
) -> None:
    assert agent.models is not None
    agent.models.progress_interval = 0.0  # every chunk reports: no waiting for a clock
    data = WEIGHTS
    download = await controller.send("model.download", {"modelId": "m", "files": [{
        "name": "w.bin", "url": files.url + "/weights.bin",
        "sha256": hashlib.sha256(data).hexdigest()}]})
    result = await controller.result_of(download["messageId"])
    assert result["data"]["result"]["files"] == 1
    progress = [f["data"] for f in controller.of("model.downloadProgress")]
    assert progress and progress[-1]["bytesDone"] == len(data) and progress[-1]["filesDone"] == 1

    create = await controller.send("deployment.create", {
        "deploymentId": "dep-1", "runtime": "process", "command": MODEL_SERVER_CMD})
    created = (await controller.result_of(create["messageId"]))["data"]
    assert created["success"] is True, created
    assert created["result"]["endpoint"] == f"http://10.9.8.7:{created['result']['hostPort']}"
    statuses = [f["data"]["status"] for f in controller.of("deployment.status")]
    assert statuses[:2] == ["starting", "running"]

    def reported_in_metrics() -> list[dict[str, Any]]:
        return [c for f in controller.of("telemetry.metrics") for c in f["data"]["containers"]
                if c.get("deploymentId") == "dep-1"]

    [entry, *_] = await wait_until(reported_in_metrics, what="the deployment in the metrics")
    assert entry == {"id": f"pid-{created['result']['pid']}", "name": "aiwm-dep-1",
                     "status": "running", "deploymentId": "dep-1"}

    os.kill(created["result"]["pid"], signal.SIGKILL)  # dies behind the agent's back

    def reported_exit() -> bool:
        return [f["data"]["status"] for f in controller.of("deployment.status")][-1] == "exited"

    await wait_until(reported_exit, what="the agent's watcher to report the exit")

    stop = await controller.send("deployment.stop", {"deploymentId": "dep-1"})
    stopped = (await controller.result_of(stop["messageId"]))["data"]["result"]
    assert stopped == {"deploymentId": "dep-1", "stopped": False, "found": True}
    assert [f["data"]["status"] for f in controller.of("deployment.status")][-1] == "stopped"


async def test_emit_without_a_connection_drops_the_frame(tmp_path: Path) -> None:
    settings = AgentSettings(node_token="t", node_id="n", aiwm_node_state_dir=tmp_path)  # type: ignore[call-arg]
    lonely = Agent(settings=settings)
    await lonely.emit("deployment.status", {"deploymentId": "d", "status": "running"})  # no error
    assert isinstance(lonely.models, ModelHandlers)
    assert lonely.settings.model_dir == tmp_path / "models"
    await lonely.aclose()
