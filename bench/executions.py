"""Orchestration overhead per step, and 500 concurrent 3-step executions.

Against the real stack (SecantusDB, a local Ray cluster, the orchestrator, NodeHosts) and
simulated agents that answer every command at once (bench/sim_agents.py, real WebSockets).

- Overhead per step: executions of three node steps in a chain run one at a time; a
  step's cost is the time from the previous step's end to its own end (the stored
  finishedAt of each, written by the orchestrator when the result arrives). The
  baseline, measured in the same run, is the bare command round trip (send -> ack ->
  result) through the same NodeHost actors, with no orchestrator; overhead = step cost -
  baseline median. The first step of each execution also carries the execution's
  start (REST call, validation, insert, events): it is reported apart, as the start
  overhead (creation to the first step's end, minus the baseline median).
- Load: 500 executions of three chained node steps created at once (16 client
  threads); the time until every one is terminal, and how many completed (none lost).

Run: `python -m bench.executions` (about 2 minutes); `--concurrent 100` for a quicker run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from aiwm.settings import Settings
from bench.nodes import pct
from bench.stack import make_nodes, running_stack


def chain(name: str, node_ids: list[str]) -> dict[str, Any]:
    steps = []
    for i, node_id in enumerate(node_ids):
        steps.append({"name": f"s{i}", "kind": "node", "nodeId": node_id,
                      "command": "system.healthCheck", "timeoutSeconds": 120,
                      "dependsOn": [f"s{i - 1}"] if i else []})
    return {"name": name, "steps": steps}


def ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def step_costs(doc: dict[str, Any]) -> list[float]:
    """Milliseconds each step took from the end of the one before it; the first from
    the execution's creation."""
    previous = ts(doc["createdAt"])
    costs = []
    for step in doc["steps"]:
        end = ts(step["finishedAt"])
        costs.append((end - previous).total_seconds() * 1000)
        previous = end
    return costs


def baseline_rtts(settings: Settings, node_ids: list[str], n: int) -> list[float]:
    """Bare command round trips through the NodeHost actors, from this driver."""
    from actors import NodeClient

    async def run() -> list[float]:
        out = []
        for i in range(n):
            node = NodeClient(settings, node_ids[i % len(node_ids)], "bench")
            started = time.perf_counter()
            reply = await node.call("execute", "system.healthCheck", {}, 30.0)
            assert reply["success"], reply
            out.append((time.perf_counter() - started) * 1000)
        return out

    return asyncio.run(run())


def sequential(api: httpx.Client, node_ids: list[str], n: int) -> tuple[list[float], list[float]]:
    """(costs of the first steps, costs of the steps after them)."""
    firsts: list[float] = []
    later: list[float] = []
    for i in range(n):
        r = api.post("/executions", json=chain(f"seq-{i}", node_ids[:3]))
        r.raise_for_status()
        doc = api.get(f"/executions/{r.json()['id']}/wait", params={"timeout": 60}).json()
        if doc["status"] != "completed":
            raise RuntimeError(f"execution {doc['id']} ended {doc['status']}: {doc.get('error')}")
        first, *rest = step_costs(doc)
        firsts.append(first)
        later.extend(rest)
    return firsts, later


def concurrent_load(url: str, token: str, node_ids: list[str], n: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}

    def create(i: int) -> str:
        with httpx.Client(base_url=f"{url}/api", headers=headers, timeout=120) as c:
            nodes = [node_ids[(i + k) % len(node_ids)] for k in range(3)]
            r = c.post("/executions", json=chain(f"load-{i}", nodes))
            r.raise_for_status()
            return str(r.json()["id"])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(create, range(n)))
    created = time.perf_counter() - started
    api = httpx.Client(base_url=f"{url}/api", headers=headers, timeout=120)
    while True:
        unfinished = api.get("/executions", params={"status": "pending,running", "limit": 1})
        if unfinished.json()["total"] == 0:
            break
        if time.perf_counter() - started > 600:
            break
        time.sleep(0.2)
    finished = time.perf_counter() - started
    outcomes: dict[str, int] = {}
    for execution_id in ids:
        status = api.get(f"/executions/{execution_id}").json()["status"]
        outcomes[status] = outcomes.get(status, 0) + 1
    return {"n": n, "created_s": created, "finished_s": finished, "outcomes": outcomes,
            "lost": n - outcomes.get("completed", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--sequential", type=int, default=60, help="3-step executions, one by one")
    parser.add_argument("--concurrent", type=int, default=500)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp, running_stack(Path(tmp)) as stack:
        api = stack.api(timeout=120)
        nodes = make_nodes(api, args.nodes)
        spec = Path(tmp) / "nodes.json"
        spec.write_text(json.dumps(nodes))
        settings = stack.settings
        sim = subprocess.Popen(
            [sys.executable, "-m", "bench.sim_agents", "--url",
             stack.url.replace("http", "ws") + "/ws/node", "--nodes", str(spec),
             "--mongo", settings.database_uri, "--db", settings.database_name, "--beat", "5"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert sim.stdout is not None
            line = json.loads(sim.stdout.readline())
            if line["event"] != "connected":
                raise RuntimeError(f"simulated agents failed: {line}")
            node_ids = [n["nodeId"] for n in nodes]
            baseline_rtts(settings, node_ids, 30)  # warm-up
            sequential(api, node_ids, 5)
            base = baseline_rtts(settings, node_ids, 3 * args.sequential)
            firsts, costs = sequential(api, node_ids, args.sequential)
            load = concurrent_load(stack.url, stack.token, node_ids, args.concurrent)
        finally:
            if sim.stdin is not None:
                sim.stdin.write("quit\n")
                sim.stdin.flush()
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                sim.kill()
    median = pct(base, 0.5)
    overhead = [c - median for c in costs]
    print(f"\nExecutions, {os.cpu_count()} CPUs, {args.nodes} simulated agents; "
          f"ingress: {stack.ingress}")
    print(f"{'':<34} {'p50 ms':>8} {'p95 ms':>8} {'samples':>8}")
    print(f"{'baseline: bare command round trip':<34} {median:>8.1f} {pct(base, 0.95):>8.1f} "
          f"{len(base):>8}")
    print(f"{'step cost in a chain (2nd, 3rd)':<34} {pct(costs, 0.5):>8.1f} {pct(costs, 0.95):>8.1f} "
          f"{len(costs):>8}")
    print(f"{'orchestration overhead per step':<34} {pct(overhead, 0.5):>8.1f} "
          f"{pct(overhead, 0.95):>8.1f} {len(overhead):>8}")
    start = [c - median for c in firsts]
    print(f"{'start overhead (create + 1st step)':<34} {pct(start, 0.5):>8.1f} "
          f"{pct(start, 0.95):>8.1f} {len(start):>8}")
    print(f"\n{load['n']} concurrent 3-step executions: created in {load['created_s']:.1f} s, "
          f"all finished after {load['finished_s']:.1f} s; outcomes {load['outcomes']}; "
          f"lost {load['lost']}")
    print("Target: overhead p95 < 20 ms per step; none of the concurrent executions lost.")


if __name__ == "__main__":
    main()
