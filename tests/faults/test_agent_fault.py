"""Fault: an agent is cut off in the middle of a command: its process killed while the
command runs, or its network link cut (the agent keeps running and finishes the command
while disconnected), then killed and restarted before the link comes back. What must
hold: the command's result reaches its caller exactly once (the model server the
command started is started once, and the result names it); a result produced while
disconnected is kept on the agent's disk and delivered after the reconnect; a command
sent while the node was cut off is delivered after the reconnect; the agent's spool is
empty once the controller has everything."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from nodeside.runtimes import safe_name
from tests.conftest import wait_for
from tests.faults.conftest import Link, sessions
from tests.integration.nodes_helpers import AgentProcess, Node, make_node, wait_status
from tests.support import model_server


def slow_server(seconds: float) -> list[str]:
    """A model server that takes ``seconds`` to listen: deployment.create runs that long."""
    return ["sh", "-c", f"sleep {seconds}; exec {sys.executable} {model_server.__file__} "
            "--port {port}"]


def started_pid(process: AgentProcess, dep: str) -> int:
    """The pid of the server the agent started for ``dep`` (from its state file)."""
    wait_for(lambda: starts(process, dep), timeout=20,
             what=f"the agent to start the server of {dep}")
    state = process.state_dir / "deployments" / f"{safe_name(dep)}.json"
    return int(json.loads(state.read_text())["pid"])


def starts(process: AgentProcess, dep: str) -> int:
    """How many times the agent (all its runs: they share the log) started ``dep``."""
    return process.log().count(f"started {dep} as pid")


def spooled(state_dir: Path) -> list[str]:
    return sorted(p.stem for p in (state_dir / "results").glob("*.json"))


def stop(api: httpx.Client, node: Node, dep: str) -> None:
    r = api.post(f"/nodes/{node.id}/commands", json={"type": "deployment.stop",
                                                      "data": {"deploymentId": dep}})
    assert r.status_code == 200 and r.json()["success"] is True, r.text


def test_agent_killed_mid_command_result_arrives_once_after_restart(
    api: httpx.Client, agent: tuple[Node, AgentProcess], unique: Callable[[str], str],
) -> None:
    node, process = agent
    dep = unique("dep")
    r = api.post(f"/nodes/{node.id}/commands", json={
        "type": "deployment.create", "timeout": 1,
        "data": {"deploymentId": dep, "runtime": "process", "command": slow_server(3)}})
    assert r.status_code == 504 and r.json()["code"] == "command_timeout", r.text
    command_id = r.json()["commandId"]
    pid = started_pid(process, dep)
    try:
        process.kill()  # mid-command: the server it started is still starting
        assert not spooled(process.state_dir)  # no result was produced
        process.start()  # the same node and state: the command comes again
        done = api.get(f"/nodes/{node.id}/commands/{command_id}", params={"wait": 30}, timeout=40)
        assert done.status_code == 200, done.text
        result = done.json()
        assert result["success"] is True, result
        # The repeated command adopted the server the first run started: started once.
        assert result["result"]["adopted"] is True and result["result"]["pid"] == pid
        assert starts(process, dep) == 1 and psutil.pid_exists(pid)
        again = api.get(f"/nodes/{node.id}/commands/{command_id}", params={"wait": 1})
        assert again.status_code == 200 and again.json() == result  # one result, remembered
        wait_for(lambda: not spooled(process.state_dir), timeout=10,
                 what="the agent's spool to empty once the result is acknowledged")
    finally:
        stop(api, node, dep)


def test_agent_cut_off_mid_command_result_kept_on_disk_and_delivered_once(
    api: httpx.Client, unique: Callable[[str], str], link: Link,
    agents: Callable[..., AgentProcess],
) -> None:
    node = make_node(api, unique)
    process = agents(node, link.url())
    wait_status(node, "online")
    dep = unique("dep")
    r = api.post("/executions", json={"name": dep, "steps": [{
        "name": "start", "kind": "node", "nodeId": node.id, "command": "deployment.create",
        "timeoutSeconds": 120, "maxRetries": 0,
        "data": {"deploymentId": dep, "runtime": "process", "command": slow_server(3)}}]})
    assert r.status_code == 201, r.text
    execution_id = r.json()["id"]
    command_id = f"{execution_id}_0_1"
    pid = started_pid(process, dep)
    try:
        link.cut()  # the agent runs on, alone
        wait_status(node, "offline", timeout=15)
        # It finishes the command while cut off: the result waits on its disk.
        wait_for(lambda: command_id in spooled(process.state_dir), timeout=30,
                 what="the result to be spooled while disconnected")
        # A command sent while the node is cut off is kept for it.
        r = api.post(f"/nodes/{node.id}/commands", json={"type": "system.healthCheck", "timeout": 1})
        assert r.status_code == 504 and r.json()["queued"] is True, r.text
        queued = r.json()["commandId"]
        # The agent dies too; the result survives on disk for the next one.
        sessions_before = sessions(process)
        process.kill()
        assert command_id in spooled(process.state_dir)
        process.start()
        link.mend()
        wait_for(lambda: sessions(process) > sessions_before, timeout=30,
                 what="the restarted agent to register")

        doc: dict[str, Any] = api.get(f"/executions/{execution_id}/wait", params={"timeout": 60},
                                      timeout=70).json()
        assert doc["status"] == "completed", doc
        step = doc["steps"][0]
        assert step["attempts"] == 1 and step["commandId"] == command_id
        received = [m for m in step["messages"] if m["type"] == "command.result"]
        assert len(received) == 1, step["messages"]  # delivered once (it was sent twice)
        # The result is the one the killed agent produced, not a second run's.
        assert step["result"]["pid"] == pid and step["result"]["adopted"] is False
        assert starts(process, dep) == 1 and psutil.pid_exists(pid)

        r = api.get(f"/nodes/{node.id}/commands/{queued}", params={"wait": 30}, timeout=40)
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        wait_status(node, "online")
        wait_for(lambda: not spooled(process.state_dir), timeout=10,
                 what="the agent's spool to empty once the results are acknowledged")
    finally:
        link.mend()
        stop(api, node, dep)
