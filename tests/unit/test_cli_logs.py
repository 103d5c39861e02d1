"""`aiwm logs`: filtering and rendering this host's JSON log file."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from aiwm.cli import app

LINES = [
    {"ts": "2026-12-04T02:00:00.000Z", "level": "INFO", "logger": "aiwm.registry",
     "message": "model m1 created", "process": "registry", "correlationId": "req-1",
     "entity": "models", "id": "m1"},
    {"ts": "2026-12-04T02:00:01.000Z", "level": "INFO", "logger": "aiwm.nodes",
     "message": "command system.healthCheck sent", "process": "nodes:0",
     "correlationId": "req-2", "nodeId": "n1", "commandId": "c1"},
    {"ts": "2026-12-04T02:00:02.000Z", "level": "WARNING", "logger": "aiwm.executions",
     "message": "step 0 a of ex1: failed", "process": "orchestrator",
     "correlationId": "req-3", "executionId": "ex1", "nodeId": "n2"},
    {"ts": "2026-12-04T02:00:03.000Z", "level": "ERROR", "logger": "aiwm.node",
     "message": "command model.download failed", "process": "node:n1",
     "correlationId": "req-2", "exc": "Traceback ...\nValueError: x"},
]


def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "aiwm.log"
    text = "\n".join(json.dumps(x) for x in LINES[:2]) + "\nnot json at all\n"
    path.write_text(text + "\n".join(json.dumps(x) for x in LINES[2:]) + "\n")
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["logs", *args])
    return result.exit_code, result.output


def test_lines_of_one_correlation_id_are_rendered_in_order(tmp_path: Path) -> None:
    code, out = run("--file", str(log_file(tmp_path)), "--id", "req-2")
    assert code == 0
    first, second, traceback = out.splitlines()[:3]
    assert first == ("2026-12-04T02:00:01.000Z INFO nodes:0 [req-2] command "
                     "system.healthCheck sent  nodeId=n1 commandId=c1")
    assert second.startswith("2026-12-04T02:00:03.000Z ERROR node:n1 [req-2] command "
                             "model.download failed")
    assert traceback == "Traceback ..."
    assert "req-1" not in out and "not json" not in out


def test_filters_by_node_execution_and_level_and_prints_json(tmp_path: Path) -> None:
    path = str(log_file(tmp_path))
    code, out = run("--file", path, "--node", "n1", "--json")
    assert code == 0
    assert [json.loads(x)["message"] for x in out.splitlines()] == [
        "command system.healthCheck sent", "command model.download failed"]  # about, and from
    assert "ex1" in run("--file", path, "--execution", "ex1")[1]
    code, out = run("--file", path, "--level", "warning")
    assert [line.split()[1] for line in out.splitlines() if line.startswith("2026")] == [
        "WARNING", "ERROR"]


def test_bad_level_and_missing_file_are_clear_errors(tmp_path: Path) -> None:
    code, out = run("--file", str(log_file(tmp_path)), "--level", "loud")
    assert code == 2 and "--level" in out
    code, out = run("--file", str(tmp_path / "nope.log"))
    assert code == 1 and "no log file" in out
