"""One life of a whole AIWM Ray cluster, for tests/faults/test_cluster_restart.py.

Run as ``python -m tests.faults.cluster_phase SETTINGS_JSON`` in a subprocess. Each
phase starts its *own* local Ray cluster (never the test session's, never with ``ray
stop``), starts AIWM's actors on it as ``aiwm up`` does (not the stateless Serve app, to
save time: the orchestrator is called as the REST routes call it), and ends the whole
cluster with ``ray.shutdown()`` when it is over. The database is outside Ray and
outlives both clusters.

- ``start``: create executions, wait until each is in the middle of a step, then end the
  cluster mid-work.
- ``resume``: on a fresh cluster over the same database, wait for those executions.

Both results are printed as one JSON line.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any


def ctl(name: str, seconds: float, *after: str) -> dict[str, Any]:
    return {"name": name, "kind": "controller", "command": "wait", "data": {"seconds": seconds},
            "dependsOn": list(after)}


def main(phase: str, overrides: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    import ray

    from actors import ensure_node_host, ensure_orchestrator, ensure_registry
    from aiwm.auth import Principal, Role
    from aiwm.settings import load_settings

    settings = load_settings(**overrides)
    principal = Principal(sub="restart", org_id="org-a", roles=frozenset({Role.admin}))
    born = dt.datetime.now(dt.UTC).isoformat()
    ray.init(address="local", namespace="aiwm", include_dashboard=False, log_to_driver=False)
    try:
        began = time.monotonic()
        # What `aiwm up` starts in Ray (serve/ingress.py deploy), less the Serve app: the
        # API replicas hold no state, and the executions' REST routes only call these.
        ray.get(ensure_registry(settings, replace=True).start.remote(), timeout=60)
        ray.get([ensure_node_host(settings, shard).census.remote()
                 for shard in range(settings.node_proxy_shards)], timeout=60)
        orchestrator = ensure_orchestrator(settings, replace=True)
        ray.get(orchestrator.start.remote(), timeout=120)  # reloads what is unfinished
        up = time.monotonic() - began

        def get(execution_id: str, wait: float = 0.001) -> dict[str, Any]:
            return ray.get(orchestrator.wait.remote("org-a", execution_id, wait),  # type: ignore[no-any-return]
                           timeout=wait + 30)

        if phase == "start":
            for n in range(3):
                doc = ray.get(orchestrator.create.remote(principal, {
                    "name": f"restart-{n}", "steps": [
                        ctl("before", 0.05), ctl("during", 5, "before"),
                        ctl("after", 0.05, "during")]}), timeout=30)
                ids.append(doc["id"])
            deadline = time.monotonic() + 30
            while True:
                docs = [get(i) for i in ids]
                if all(d["steps"][1]["status"] == "running" and d["steps"][0]["status"] == "succeeded"
                       for d in docs):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the executions did not start: {docs}")
                time.sleep(0.1)
            return {"ids": ids, "before": docs, "upSeconds": up}
        return {"after": [get(i, 60) for i in ids], "upSeconds": up, "clusterStarted": born}
    finally:
        ray.shutdown()  # the whole cluster goes: GCS, raylet, every actor


if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    first = main("start", settings, [])  # the first cluster ends here, mid-work
    second = main("resume", settings, first["ids"])  # a second one, the same database
    print("RESULT " + json.dumps({"first": first, "second": second}), flush=True)
