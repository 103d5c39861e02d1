"""The Serve replicas run as AIWM tunes them: normal CPU priority and remembered routes."""

from __future__ import annotations

import os

import httpx
import psutil


def api_replicas() -> list[psutil.Process]:
    found = [p for p in psutil.process_iter(["cmdline"])
             if "ServeReplica:aiwm:api" in " ".join(p.info["cmdline"] or [])]
    assert found, "no API replica process found"
    return found


def test_api_replicas_run_at_normal_priority(cluster: str) -> None:
    # Ray's default worker niceness (15) tripled the API's p99 under load (bench/rest.py).
    for replica in api_replicas():
        assert replica.nice() == os.getpriority(os.PRIO_PROCESS, 0) == 0


def test_requests_answer_the_same_on_a_remembered_route(api: httpx.Client) -> None:
    # The replica names each request's route once per (method, path); repeated and
    # different requests must still reach their own handlers.
    for _ in range(3):
        assert api.get("/instructions").status_code == 200
        missing = api.get("/instructions/does-not-exist")
        assert missing.status_code == 404
        nodes = api.get("/nodes")
        assert nodes.status_code == 200 and "data" in nodes.json()
