"""Fault: an ``api`` Serve replica process is SIGKILLed while clients are reading and
writing and an agent is connected. What must hold: requests either succeed, lose their
connection, or answer 503 problem+json; the app never answers 500 (a request that was on
the dying replica gets the ingress's gateway error, see ``in_flight_on_the_victim``, and
no other request does); every acknowledged write is kept;
the API keeps answering (the other replica) and Serve brings the replica count back by
itself, within a bound; the agent's node works again afterwards."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import httpx
import psutil

from aiwm.settings import Settings
from tests.conftest import wait_for
from tests.faults.conftest import PROBLEM, Loop, Outcome, Recorder, cluster_processes, sessions
from tests.integration.nodes_helpers import AgentProcess, Node

REPLICA = "ServeReplica:aiwm:api"
GAP = 15.0  # s: the longest the API may go without answering a request successfully
IN_FLIGHT = 2.0  # s: a request sent this close to a kill may be on (or sent to) the victim


def test_api_replica_sigkilled_under_load(
    api: httpx.Client, client_for: Callable[..., httpx.Client], unique: Callable[[str], str],
    agent: tuple[Node, AgentProcess], recorder: Recorder, settings: Settings,
) -> None:
    node, process = agent
    count = settings.aiwm_api_replicas
    replicas = cluster_processes(REPLICA)
    assert len(replicas) == count >= 2, f"expected the {count} api replicas of this cluster"
    tag = unique("replicafault")
    writer = client_for("admin", "org-a", sub=tag)

    def work(_: int, i: int) -> None:
        if i % 2:
            recorder.call("list", lambda: writer.get("/instructions", params={"limit": 5}))
            return
        name = f"{tag}-{i}"
        recorder.call("create", lambda: writer.post(
            "/instructions", json={"name": name, "systemPrompt": "x"}))

    recovered: list[float] = []
    kills: list[float] = []
    started = time.monotonic()
    loop = Loop(work, threads=4)
    try:
        wait_for(lambda: sum(o.ok for o in recorder.outcomes) >= 20, timeout=30,
                 what="requests to flow before the fault")
        sessions_before = sessions(process)
        # One after the other, so the replica that holds the agent's socket dies too,
        # and the API is never without a replica of its own doing.
        for victim in replicas:
            killed_at = time.monotonic()
            kills.append(killed_at)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            # Serve notices and starts a replacement; meanwhile the other replica serves.
            def replacement(gone: int = victim.pid) -> list[psutil.Process] | None:
                now = cluster_processes(REPLICA)
                return now if len(now) == count and gone not in {p.pid for p in now} else None

            replaced = wait_for(replacement, timeout=90, what="Serve to replace the replica")
            recovered.append(time.monotonic() - killed_at)
        wait_for(lambda: sum(o.ok and o.at > time.monotonic() - 2 for o in recorder.outcomes) >= 5,
                 timeout=30, what="requests to succeed after the replacement")
    finally:
        loop.stop()

    def in_flight_on_the_victim(o: Outcome) -> bool:
        """The ingress's own error for a request that was on the replica when it died (or
        was sent to it before the ingress noticed): Serve's HAProxy rewrites its 502 to a
        plain-text 500 (ray/serve/_private/haproxy.py, its ``500.http`` errorfile); no
        AIWM code sees that request. Tolerated only for requests sent around a kill, and
        never from the app itself (whose errors are problem+json)."""
        return (o.status == 500 and not o.content_type.startswith(PROBLEM)
                and o.body == "Internal Server Error"
                and any(abs(o.at - k) <= IN_FLIGHT for k in kills))

    recorder.assert_only_unavailable(transport_errors=True, allow=in_flight_on_the_victim,
                                     context=f"replicas killed at {kills}")
    ok_times = sorted(o.at for o in recorder.outcomes if o.ok)
    gaps = [b - a for a, b in zip(ok_times, ok_times[1:], strict=False) if b > started]
    assert max(gaps) < GAP, f"the API answered nothing for {max(gaps):.1f}s"
    acked = [o.body for o in recorder.outcomes if o.ok and o.what == "create"]
    for doc in acked:
        r = api.get(f"/instructions/{doc['id']}")
        assert r.status_code == 200 and r.json()["name"] == doc["name"], r.text
    # Its socket was on one of the dead replicas: the agent reconnected by itself.
    wait_for(lambda: sessions(process) > sessions_before, timeout=30,
             what="the agent to reconnect")
    r = api.post(f"/nodes/{node.id}/commands", json={"type": "system.healthCheck", "timeout": 30})
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert node.get()["status"] == "online"
    print(f"replica fault: replaced after {recovered}s by {[p.pid for p in replaced]}; "
          f"longest gap {max(gaps):.2f}s; agent sessions {sessions_before}->{sessions(process)}; "
          f"{recorder.statuses()}")
