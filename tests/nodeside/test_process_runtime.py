"""The deployment commands on the process runtime: real subprocesses running
tests/support/model_server.py, on a host without Docker."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from nodeside.deployments import MAX_RESPONSE_BYTES, DeploymentHandlers
from nodeside.handlers import CommandFailed
from nodeside.models import COMPLETE
from tests.nodeside.conftest import (
    ADVERTISE,
    MODEL_SERVER_CMD,
    Emitted,
    Ids,
    make_handlers,
    wait_until,
)


def spec(deployment_id: str, **extra: Any) -> dict[str, Any]:
    return {"deploymentId": deployment_id, "runtime": "process", "command": MODEL_SERVER_CMD,
            **extra}


async def get(handlers: DeploymentHandlers, deployment_id: str, path: str,
              **extra: Any) -> dict[str, Any]:
    return await handlers.request({"deploymentId": deployment_id, "path": path, **extra})


def decoded(answer: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(answer["body"]))


_BORN: dict[int, float] = {}  # pid -> start time, so a reused pid is not taken for ours


def gone(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        born = _BORN.setdefault(pid, proc.create_time())
        return proc.status() == psutil.STATUS_ZOMBIE or abs(proc.create_time() - born) > 0.01
    except psutil.NoSuchProcess:
        return True


def remember(pid: int) -> int:
    """Note the start time of ``pid`` while it is surely ours."""
    _BORN[pid] = psutil.Process(pid).create_time()
    return pid


async def test_create_request_logs_stats_stop(process_handlers: DeploymentHandlers,
                                              emitted: Emitted, deployment_id: Ids,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_TOKEN", "agent-secret")  # the agent's, never the server's
    dep = deployment_id()
    (tmp_path / "models" / "m-1").mkdir(parents=True)
    created = await process_handlers.create(spec(dep, modelId="m-1", env={"MODEL_NAME": "tiny"}))
    remember(created["pid"])
    assert set(created) == {"deploymentId", "runtime", "pid", "hostPort", "endpoint", "adopted"}
    assert created["runtime"] == "process" and created["adopted"] is False
    assert created["endpoint"] == f"http://{ADVERTISE}:{created['hostPort']}"
    assert psutil.pid_exists(created["pid"])
    assert emitted.statuses(dep) == ["starting", "running"]

    chat = await process_handlers.request({
        "deploymentId": dep, "method": "POST", "path": "/v1/chat/completions",
        "headers": {"content-type": "application/json"},
        "body": base64.b64encode(json.dumps({"messages": [
            {"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": "second"}]}).encode()).decode()})
    assert decoded(chat)["choices"][0]["message"]["content"] == "echo: second"
    models = decoded(await get(process_handlers, dep, "/v1/models"))
    assert models["data"][0] == {"id": "tiny", "object": "model", "owned_by": "aiwm-test",
                                 "root": str(tmp_path / "models" / "m-1")}
    port = decoded(await get(process_handlers, dep, "/env/PORT"))["value"]
    assert port == str(created["hostPort"])  # {port} and $PORT agree
    assert decoded(await get(process_handlers, dep, "/env/NODE_TOKEN"))["value"] is None

    logs = await process_handlers.get_logs({"deploymentId": dep, "tail": 100})
    assert logs["lines"][0] == f"listening on {created['hostPort']}"
    assert any(line.startswith("POST /v1/chat/completions 200") for line in logs["lines"])
    stats = await process_handlers.get_stats({"deploymentId": dep})
    assert stats["status"] == "running" and stats["restartCount"] == 0
    assert stats["memoryBytes"] > 0 and stats["startedAt"]

    same = spec(dep, modelId="m-1", env={"MODEL_NAME": "tiny"})
    assert await process_handlers.create(same) == {**created, "adopted": True}
    # Another spec (here a model version): not the server asked for, so it is replaced.
    (tmp_path / "models" / "m-1" / "v2").mkdir()
    (tmp_path / "models" / "m-1" / "v2" / COMPLETE).touch()  # as a finished download leaves it
    replaced = await process_handlers.create(spec(dep, modelId="m-1", modelVersion=2))
    remember(replaced["pid"])
    assert replaced["adopted"] is False and gone(created["pid"])
    models = decoded(await get(process_handlers, dep, "/v1/models"))
    assert models["data"][0]["root"] == str(tmp_path / "models" / "m-1" / "v2")
    assert await process_handlers.model_dirs_in_use() == {tmp_path / "models" / "m-1" / "v2"}
    assert await process_handlers.stop({"deploymentId": dep}) == {
        "deploymentId": dep, "stopped": True, "found": True}
    assert gone(replaced["pid"])
    assert await process_handlers.model_dirs_in_use() == set()
    assert list((tmp_path / "deployments").iterdir()) == []
    assert emitted.statuses(dep)[-1] == "stopped"
    assert (await process_handlers.stop({"deploymentId": dep}))["found"] is False
    with pytest.raises(CommandFailed) as info:
        await process_handlers.get_logs({"deploymentId": dep})
    assert info.value.code == "not_found"


async def test_a_new_agent_adopts_a_live_process(process_handlers: DeploymentHandlers,
                                                 deployment_id: Ids, tmp_path: Path) -> None:
    dep = deployment_id()
    created = await process_handlers.create(spec(dep))
    remember(created["pid"])
    # Same state dir, new objects: the agent after a restart (the child is not its child).
    restarted = make_handlers(tmp_path, str(tmp_path / "no-docker.sock"), Emitted())
    try:
        assert await restarted.create(spec(dep)) == {**created, "adopted": True}
        assert (await get(restarted, dep, "/health"))["status"] == 200
        assert (await restarted.get_stats({"deploymentId": dep}))["status"] == "running"
        assert (await restarted.stop({"deploymentId": dep}))["stopped"] is True
        assert gone(created["pid"])
    finally:
        await restarted.aclose()


async def test_a_reused_pid_is_not_adopted(process_handlers: DeploymentHandlers,
                                           deployment_id: Ids, tmp_path: Path) -> None:
    dep = deployment_id()
    created = await process_handlers.create(spec(dep))
    remember(created["pid"])
    [state_file] = (tmp_path / "deployments").glob("*.json")
    state = json.loads(state_file.read_text())
    state["pid"] = os.getpid()  # as if the server died and its pid went to another program
    state_file.write_text(json.dumps(state))
    restarted = make_handlers(tmp_path, str(tmp_path / "no-docker.sock"), Emitted())
    try:
        assert (await restarted.get_stats({"deploymentId": dep}))["status"] == "exited"
    finally:
        await restarted.aclose()
    os.kill(created["pid"], signal.SIGKILL)  # the real one; the fixture cannot find it now


async def test_a_server_that_exits_fails_with_its_last_log_lines(
    process_handlers: DeploymentHandlers, emitted: Emitted, deployment_id: Ids, tmp_path: Path
) -> None:
    dep = deployment_id()
    with pytest.raises(CommandFailed) as info:
        await process_handlers.create(spec(dep, command=[
            sys.executable, "-c", "print('loading', flush=True); raise SystemExit('no weights')"]))
    assert info.value.code == "start_failed"
    assert "loading" in info.value.message and "no weights" in info.value.message
    assert emitted.statuses(dep) == ["starting", "failed"]
    assert list((tmp_path / "deployments").iterdir()) == []
    await process_handlers.check()
    assert emitted.statuses(dep) == ["starting", "failed"]  # nothing there, nothing to say


async def test_a_server_that_never_listens_times_out(deployment_id: Ids, tmp_path: Path) -> None:
    handlers = make_handlers(tmp_path, str(tmp_path / "no.sock"), Emitted(), start_timeout=0.5,
                             stop_grace=0.5)
    dep = deployment_id()
    try:
        with pytest.raises(CommandFailed) as info:
            await handlers.create(spec(dep, command=[
                sys.executable, "-c", "import time; print('thinking', flush=True); time.sleep(60)"]))
        assert info.value.code == "start_failed"
        assert "within 0.5s" in info.value.message and "thinking" in info.value.message
        assert list((tmp_path / "deployments").iterdir()) == []
    finally:
        await handlers.aclose()


async def test_a_server_still_loading_counts_as_started(process_handlers: DeploymentHandlers,
                                                        deployment_id: Ids) -> None:
    # It accepts connections: that is what create waits for; readiness is the caller's.
    dep = deployment_id()
    await process_handlers.create(spec(dep, command=[*MODEL_SERVER_CMD, "--fail-health", "3"]))
    assert (await get(process_handlers, dep, "/health"))["status"] == 503


async def test_stop_kills_a_server_that_ignores_sigterm(deployment_id: Ids, tmp_path: Path) -> None:
    handlers = make_handlers(tmp_path, str(tmp_path / "no.sock"), Emitted(), stop_grace=0.3)
    dep = deployment_id()
    try:
        created = await handlers.create(spec(dep, command=[*MODEL_SERVER_CMD, "--ignore-sigterm"]))
        remember(created["pid"])
        assert (await handlers.stop({"deploymentId": dep}))["stopped"] is True
        assert gone(created["pid"])
    finally:
        await handlers.aclose()


async def test_request_errors(process_handlers: DeploymentHandlers, deployment_id: Ids) -> None:
    dep = deployment_id()
    created = await process_handlers.create(spec(dep))
    remember(created["pid"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"path": "/slow?seconds=5", "timeout": 0.3}, "upstream_timeout"),
        ({"path": f"/big?bytes={MAX_RESPONSE_BYTES + 1}"}, "response_too_large"),
        ({"path": "/health", "body": "not base64!"}, "invalid_spec"),
        ({"path": "no-slash"}, "invalid_spec"),
    ]
    for extra, code in cases:
        with pytest.raises(CommandFailed) as info:
            await process_handlers.request({"deploymentId": dep, **extra})
        assert info.value.code == code, info.value.message
    exact = await get(process_handlers, dep, f"/big?bytes={MAX_RESPONSE_BYTES}")
    assert len(base64.b64decode(exact["body"])) == MAX_RESPONSE_BYTES
    os.kill(created["pid"], signal.SIGKILL)
    await wait_until(lambda: gone(created["pid"]), what="the server to die")
    with pytest.raises(CommandFailed) as info:
        await get(process_handlers, dep, "/health")
    assert info.value.code == "upstream_unreachable"


async def test_the_watcher_reports_a_server_that_died(process_handlers: DeploymentHandlers,
                                                      emitted: Emitted, deployment_id: Ids) -> None:
    dep = deployment_id()
    created = await process_handlers.create(spec(dep))
    remember(created["pid"])
    await process_handlers.check()
    assert emitted.statuses(dep) == ["starting", "running"]
    os.kill(created["pid"], signal.SIGKILL)

    async def reported() -> bool:
        await process_handlers.check()
        return emitted.statuses(dep)[-1] == "exited"

    await wait_until(reported, what="an exited status")
    # Its last log lines went first, so why it died is on record at the controller.
    [logs] = [d for d in emitted.of("deployment.logs") if d["deploymentId"] == dep]
    assert logs["reason"] == "exited" and logs["lines"][0] == f"listening on {created['hostPort']}"
    stats = await process_handlers.get_stats({"deploymentId": dep})
    assert (stats["status"], stats["cpuPercent"], stats["memoryBytes"]) == ("exited", None, None)
    recreated = await process_handlers.create(spec(dep))  # exited: started afresh
    assert recreated["adopted"] is False and recreated["pid"] != created["pid"]
    await process_handlers.announce()  # a new connection hears the current state
    assert emitted.statuses(dep)[-1] == "running"
    assert len(emitted.of("deployment.logs")) == 1  # announcing sends no old last words
    entries = await process_handlers.telemetry_entries()
    assert {"id": f"pid-{recreated['pid']}", "name": f"aiwm-{dep}", "status": "running",
            "deploymentId": dep} in entries


async def test_invalid_specs(process_handlers: DeploymentHandlers, deployment_id: Ids) -> None:
    for data in (spec(deployment_id(), command=[]), spec(deployment_id(), runtime="vm"),
                 {"runtime": "process"}):
        with pytest.raises(CommandFailed) as info:
            await process_handlers.create(data)
        assert info.value.code == "invalid_spec"
    with pytest.raises(CommandFailed) as info:
        await process_handlers.create(spec(deployment_id(), command=["/no/such/program"]))
    assert info.value.code == "start_failed"
    # A stored version that was never fetched here (or was deleted): said so, nothing started.
    missing = deployment_id()
    with pytest.raises(CommandFailed) as info:
        await process_handlers.create(spec(missing, modelId="m-9", modelVersion=4))
    assert info.value.code == "model_missing" and "version 4 of model m-9" in info.value.message
    assert await process_handlers.runtimes["process"].find(missing) is None
    # A folder whose download did not finish is no version to start either.
    (process_handlers.model_dir / "m-9" / "v4").mkdir(parents=True)
    (process_handlers.model_dir / "m-9" / "v4" / "half-a-shard.bin").write_bytes(b"x")
    with pytest.raises(CommandFailed) as info:
        await process_handlers.create(spec(missing, modelId="m-9", modelVersion=4))
    assert info.value.code == "model_missing" and "did not finish" in info.value.message
