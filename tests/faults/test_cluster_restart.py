"""Fault: the whole Ray cluster stops while executions are running (the Ray head goes,
and the Registry, the NodeHosts and the orchestrator with it) and a new one is started
over the same database, as ``aiwm up`` does. What must hold: the new
orchestrator resumes every unfinished execution and each completes; steps that had
succeeded are not run again; the step that was running is run again as the same attempt.

The clusters are the test's own, started and ended in a subprocess with their own
database, so the session's cluster (and any other on the machine) is never touched."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from aiwm import embedded_db
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def own_database(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    home, port = tmp_path / "home", free_port()
    embedded_db.start(home, port)
    try:
        yield home, port
    finally:
        embedded_db.stop(home)


def ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def two_clusters(overrides: dict[str, Any]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.cluster_phase", json.dumps(overrides)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group: the Ray processes it starts too
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # never leave that cluster behind
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"the clusters failed:\n{stdout}\n{stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))  # type: ignore[no-any-return]


def test_whole_cluster_restarted_with_executions_in_flight(
    own_database: tuple[Path, int], settings: Any,
) -> None:
    home, db_port = own_database
    overrides = {"aiwm_home": str(home), "aiwm_db_port": db_port, "mongodb_uri": None,
                 "port": free_port(), "jwt_secret": settings.secret(), "node_proxy_shards": 1}
    both = two_clusters(overrides)
    first, second = both["first"], both["second"]  # the first ended with its steps running
    before = {d["id"]: d for d in first["before"]}
    assert all(d["status"] == "running" for d in before.values())
    after = {d["id"]: d for d in second["after"]}
    assert set(after) == set(before)
    for execution_id, doc in after.items():
        assert doc["status"] == "completed", doc
        first_step, middle, last = doc["steps"]
        assert first_step == before[execution_id]["steps"][0]  # not run again
        assert middle["attempts"] == 1 and last["attempts"] == 1
        assert middle["startedAt"] == before[execution_id]["steps"][1]["startedAt"]
        # It was the new cluster that finished the step that was running.
        assert ts(middle["finishedAt"]) > ts(second["clusterStarted"])
        assert ts(last["startedAt"]) > ts(second["clusterStarted"])
    print(f"cluster restart: up in {first['upSeconds']:.1f}s and {second['upSeconds']:.1f}s")
