"""One correlation id, followed through the real stack: a REST request, the actors it
reaches, the node agent that runs its command, and the result on its way back.

The controller's processes (API replicas, Registry, NodeHosts, orchestrator) append JSON
lines to AIWM_HOME/logs/aiwm.log; the agent writes them to its own stderr (agent.log).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from aiwm.cli_logs import parse_line
from aiwm.settings import Settings
from tests.conftest import wait_for
from tests.integration.nodes_helpers import AgentProcess, Node


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a log (a library may print plain text among them)."""
    return [line for raw in text.splitlines() if (line := parse_line(raw)) is not None]


def tagged(path: Path, cid: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(path.read_text(errors="replace"))
            if line.get("correlationId") == cid]


def test_a_node_command_is_logged_under_the_requests_id_from_rest_to_agent_and_back(
        api: httpx.Client, agent: tuple[Node, AgentProcess], settings: Settings,
        unique: Callable[[str], str]) -> None:
    node, process = agent
    cid = unique("cmd").replace("-", "_")
    r = api.post(f"/nodes/{node.id}/commands", json={"type": "system.healthCheck"},
                 headers={"X-Request-Id": cid})
    assert r.status_code == 200, r.text
    assert r.headers.get_list("x-request-id") == [cid]
    command_id = r.json()["commandId"]
    log_file = settings.log_file()
    assert log_file is not None

    def controller_lines() -> list[dict[str, Any]]:
        lines = tagged(log_file, cid)
        return lines if any("succeeded" in x["message"] for x in lines) else []

    lines = wait_for(controller_lines, timeout=10, what="the command's lines in aiwm.log")
    sent = [x for x in lines if x["message"] == "command system.healthCheck sent"]
    assert sent and sent[0]["process"].startswith("nodes:")
    assert sent[0]["nodeId"] == node.id and sent[0]["commandId"] == command_id
    done = [x for x in lines if x["message"] == "command system.healthCheck succeeded"]
    assert done and done[0]["commandId"] == command_id

    agent_lines = wait_for(lambda: [x for x in json_lines(process.log())
                                    if x.get("correlationId") == cid], timeout=10,
                           what="the agent's lines for the command")
    messages = {x["message"] for x in agent_lines}
    assert {"command system.healthCheck received", "command system.healthCheck done"} <= messages
    assert all(x["commandId"] == command_id and x["process"] == f"node:{node.id}"
               for x in agent_lines)


def test_an_execution_keeps_the_id_of_the_request_that_created_it(
        api: httpx.Client, agent: tuple[Node, AgentProcess], settings: Settings,
        unique: Callable[[str], str]) -> None:
    node, process = agent
    cid = unique("exec").replace("-", "_")
    r = api.post("/executions", headers={"X-Request-Id": cid}, json={
        "name": "traced", "steps": [
            {"name": "health", "kind": "node", "nodeId": node.id, "command": "system.healthCheck"},
            {"name": "again", "kind": "node", "nodeId": node.id, "command": "system.healthCheck",
             "dependsOn": ["health"]}]})
    assert r.status_code == 201, r.text
    ex = r.json()
    assert ex["correlationId"] == cid
    done = api.get(f"/executions/{ex['id']}/wait", params={"timeout": 30}).json()
    assert done["status"] == "completed", done
    log_file = settings.log_file()
    assert log_file is not None

    def finished() -> list[dict[str, Any]]:
        lines = tagged(log_file, cid)
        return lines if any(x["message"] == f"execution {ex['id']} completed"
                            for x in lines) else []

    lines = wait_for(finished, timeout=10, what="the execution's lines in aiwm.log")
    orchestrator = [x for x in lines if x.get("process") == "orchestrator"]
    assert {f"step 0 health of {ex['id']}: succeeded",
            f"step 1 again of {ex['id']}: succeeded"} <= {x["message"] for x in orchestrator}
    assert all(x["executionId"] == ex["id"] for x in orchestrator)
    # Both steps' commands went out and came back under the same id, on the node as well.
    command_ids = {s["commandId"] for s in done["steps"]}
    assert {x["commandId"] for x in lines if x.get("process", "").startswith("nodes:")
            and x["message"].endswith("succeeded")} == command_ids
    agent_done = wait_for(lambda: {x["commandId"] for x in json_lines(process.log())
                                   if x.get("correlationId") == cid
                                   and x["message"].endswith(" done")} == command_ids,
                          timeout=10, what="the agent's lines for both steps")
    assert agent_done


def test_catalog_writes_and_errors_carry_the_id(api: httpx.Client, settings: Settings,
                                                unique: Callable[[str], str]) -> None:
    cid = unique("write").replace("-", "_")
    r = api.post("/models", json={"name": unique("m"), "source": "upload"},
                 headers={"X-Request-Id": cid})
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]
    log_file = settings.log_file()
    assert log_file is not None
    lines = wait_for(lambda: tagged(log_file, cid), timeout=10, what="the Registry's line")
    (line,) = [x for x in lines if x.get("process") == "registry"]
    assert (line["id"], line["entity"], line["by"]) == (model_id, "models", "tester")

    missing = api.get("/models/no-such-model", headers={"X-Request-Id": cid + "_404"})
    assert missing.status_code == 404
    assert missing.json()["correlationId"] == cid + "_404" == missing.headers["x-request-id"]
    made = api.get("/models/no-such-model")  # no id sent: one is made and returned
    assert made.json()["correlationId"] == made.headers["x-request-id"]


def test_an_unusable_request_id_is_replaced_and_only_the_new_one_comes_back(
        api: httpx.Client) -> None:
    for bad in ("x" * 101, "caf\u00e9-1"):
        r = api.get("/models/no-such-model",
                    headers=[("X-Request-Id", bad.encode("utf-8"))])
        assert r.status_code == 404
        (returned,) = r.headers.get_list("x-request-id")
        assert returned != bad and 1 <= len(returned) <= 100
        assert r.json()["correlationId"] == returned
    fine = "y" * 100  # the longest id that is kept
    r = api.get("/models/no-such-model", headers={"X-Request-Id": fine})
    assert r.headers.get_list("x-request-id") == [fine] and r.json()["correlationId"] == fine
