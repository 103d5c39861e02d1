"""The node channel end to end: real agent processes, the relay, NodeProxy actors."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from aiwm.auth import issue_node_token
from aiwm.protocol import make_frame
from aiwm.settings import Settings
from tests.conftest import wait_for
from tests.integration.nodes_helpers import (
    AgentProcess,
    Node,
    SilentSocket,
    frames_until,
    make_node,
    raw_socket,
    register,
    wait_status,
)


def _last(frames: Iterator[dict]) -> dict:
    *_, last = frames
    return last


@pytest.fixture(scope="session")
def ws_url(cluster: str) -> str:
    return cluster.replace("http://", "ws://") + "/ws/node"


@pytest.fixture()
def agents(ws_url: str, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(node: Node, state: str = "agent", **env: str) -> AgentProcess:
        directory = tmp_path / state
        directory.mkdir(exist_ok=True)
        agent = AgentProcess(ws_url=ws_url, node=node, state_dir=directory, extra_env=env).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()


def test_agent_registers_reports_and_runs_commands(
    api: httpx.Client, unique: Callable[[str], str], agents: Callable[..., AgentProcess]
) -> None:
    node = make_node(api, unique)
    assert node.get()["status"] == "pending"
    agents(node)
    doc = wait_status(node, "online")
    assert doc["agentVersion"] and doc["cpuCores"] >= 1 and doc["ramTotal"] > 0
    assert doc["gpuSummary"] == {"count": 2, "memoryTotal": 2 * 80 * 1024**3,
                                 "names": ["Mock NVIDIA H100 80GB HBM3"], "mock": True}
    first = doc["lastHeartbeatAt"]
    wait_for(lambda: node.get()["lastHeartbeatAt"] != first, timeout=10, what="a later heartbeat")
    listed = api.get("/nodes", params={"status": "online"}).json()["data"]
    assert node.id in {n["id"] for n in listed}

    metrics = wait_for(lambda: (r := api.get(f"/nodes/{node.id}/metrics")).status_code == 200
                       and r.json(), timeout=10, what="metrics")
    assert metrics["latest"]["ramTotal"] > 0
    assert [g["mock"] for g in metrics["latest"]["gpus"]] == [True, True]
    assert api.get(f"/nodes/{node.id}/containers").json()["containers"] == []

    r = api.post(f"/nodes/{node.id}/commands", json={"type": "system.healthCheck"})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["success"] is True
    checks = result["result"]["checks"]
    assert checks["disk"]["ok"] is True and checks["disk"]["freeBytes"] > 0
    assert checks["docker"]["ok"] is False and "no socket" in checks["docker"]["error"]
    assert checks["gpus"] == {"ok": True, "count": 2, "mock": True}
    assert result["result"]["healthy"] is False  # no Docker here, and it says so

    r = api.post(f"/nodes/{node.id}/commands", json={"type": "deployment.create"})
    assert r.status_code == 422  # the command's data is checked before it is sent
    assert any(e["field"].endswith("deploymentId") for e in r.json()["errors"])
    r = api.post(f"/nodes/{node.id}/commands", json={
        "type": "deployment.create", "data": {"deploymentId": "d1", "image": "srv:1"}})
    assert r.status_code == 200 and r.json()["success"] is False
    assert r.json()["error"]["code"] == "docker_unavailable"  # this agent has no Docker
    r = api.post(f"/nodes/{node.id}/commands", json={"type": "node.explode"})
    assert r.status_code == 422 and r.json()["code"] == "validation_failed"


def test_killed_agent_goes_offline_and_comes_back_as_the_same_node(
    api: httpx.Client, unique: Callable[[str], str], agents: Callable[..., AgentProcess]
) -> None:
    node = make_node(api, unique)
    agent = agents(node)
    wait_status(node, "online")
    agent.kill()
    killed = time.monotonic()
    wait_status(node, "offline", timeout=15)
    assert time.monotonic() - killed < 10  # 3 missed 300 ms beats, checked at least every s
    agents(node)
    wait_status(node, "online")
    events = api.get(f"/nodes/{node.id}/events").json()["data"]
    assert [e["type"] for e in events][:3] == ["node.online", "node.offline", "node.online"]
    assert len(api.get("/nodes", params={"q": node.get()["name"]}).json()["data"]) == 1


def test_command_sent_while_offline_is_delivered_after_reconnect(
    api: httpx.Client, unique: Callable[[str], str], agents: Callable[..., AgentProcess]
) -> None:
    node = make_node(api, unique)
    r = api.post(f"/nodes/{node.id}/commands", json={"type": "system.healthCheck", "timeout": 1})
    assert r.status_code == 504
    body = r.json()
    assert body["code"] == "command_timeout" and body["queued"] is True
    assert "not connected" in body["detail"]
    agents(node)
    done = api.get(f"/nodes/{node.id}/commands/{body['commandId']}", params={"wait": 20})
    assert done.status_code == 200, done.text
    assert done.json()["success"] is True and "checks" in done.json()["result"]


def test_results_survive_an_agent_restart_and_duplicates_are_dropped(
    api: httpx.Client, unique: Callable[[str], str], ws_url: str
) -> None:
    node = make_node(api, unique)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, raw_socket(ws_url, node.token) as ws:
        assert register(ws, node.id)["type"] == "session.welcome"
        pending = pool.submit(api.post, f"/nodes/{node.id}/commands",
                              json={"type": "system.healthCheck", "timeout": 20})
        command = _last(frames_until(ws, "system.healthCheck"))
        ws.send(json.dumps(make_frame("command.ack", correlation_id=command["messageId"])))
        result = make_frame("command.result", {"success": True, "result": {"n": 1}},
                            correlation_id=command["messageId"])
        again = make_frame("command.result", {"success": True, "result": {"n": 2}},
                           correlation_id=command["messageId"])
        for frame in (result, result, again):  # the same result twice, then a second one
            ws.send(json.dumps(frame))
            receipt = _last(frames_until(ws, "command.ack"))
            assert receipt["correlationId"] == frame["messageId"]
        answer = pending.result(30)
    assert answer.status_code == 200 and answer.json()["result"] == {"n": 1}


@pytest.mark.parametrize("case", ["expired", "revoked", "superseded", "user", "missing", "garbage"])
def test_bad_tokens_are_refused_at_connect(
    case: str, api: httpx.Client, unique: Callable[[str], str], ws_url: str, settings: Settings,
    make_token: Callable[..., str],
) -> None:
    node = make_node(api, unique)
    token: str | None = node.token
    if case == "expired":
        past = __import__("datetime").datetime(2020, 1, 1, tzinfo=__import__("datetime").UTC)
        token, _ = issue_node_token(secret=settings.secret(), node_id=node.id, org_id="org-a",
                                    token_id="x", expires_in=60, now=lambda: past)
    elif case == "revoked":
        assert api.delete(f"/nodes/{node.id}/token").status_code == 200
    elif case == "superseded":
        assert api.post(f"/nodes/{node.id}/token", json={}).status_code == 201
    elif case == "user":
        token = make_token("admin", "org-a")
    elif case == "missing":
        token = None
    else:
        token = "not.a.jwt"
    with raw_socket(ws_url, token) as ws:
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["data"]["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


@pytest.mark.parametrize("origin, allowed", [
    ("https://console.example.com", True), ("HTTP://LOCALHOST:3000/", True),
    ("https://evil.example", False), ("null", False)])
def test_a_node_socket_from_a_browser_page_needs_an_allowed_origin(
        origin: str, allowed: bool, api: httpx.Client, unique: Callable[[str], str],
        ws_url: str) -> None:
    """The test stack sets WS_CORS_ORIGIN to two origins; agents send no Origin at all."""
    node = make_node(api, unique)
    with raw_socket(ws_url, node.token, origin=origin) as ws:
        if allowed:
            assert register(ws, node.id)["type"] == "session.welcome"
            return
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["data"]["code"] == "forbidden"
        assert "WS_CORS_ORIGIN" in error["data"]["message"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    assert api.get(f"/nodes/{node.id}").json()["status"] == "pending"  # it never got in


def test_the_relay_pings_node_sockets_and_drops_one_that_stops_answering(
        api: httpx.Client, unique: Callable[[str], str], ws_url: str, settings: Settings) -> None:
    """WS_PING_INTERVAL and WS_PING_TIMEOUT (2 s and 4 s in the test stack, not uvicorn's
    20 s and 20 s): a socket whose peer stops answering is dropped, one that answers stays."""
    interval, timeout = settings.ws_ping_interval / 1000, settings.ws_ping_timeout / 1000
    assert (interval, timeout) == (2, 4)
    healthy = make_node(api, unique)
    frozen = make_node(api, unique)
    with raw_socket(ws_url, healthy.token) as answering:  # websockets answers pings itself
        assert register(answering, healthy.id)["type"] == "session.welcome"
        silent = SilentSocket(ws_url, frozen.token)
        try:
            silent.send_text(json.dumps(make_frame("node.register", {
                "nodeId": frozen.id, "agentVersion": "test", "hostname": "frozen",
                "cpuCores": 1, "ramTotal": 1, "heartbeatInterval": 60000})))
            opened = time.monotonic()
            deadline = opened + interval + timeout + 10
            kinds: list[int] = []
            pinged = None
            with pytest.raises(EOFError):
                while True:
                    kind, payload = silent.frame(deadline)
                    kinds.append(kind)
                    if kind == SilentSocket.TEXT:
                        assert json.loads(payload)["type"] == "session.welcome"
                    elif kind == SilentSocket.PING and pinged is None:
                        pinged = time.monotonic()
                    assert time.monotonic() < deadline, f"still open; frames {kinds}"
            dropped = time.monotonic()
        finally:
            silent.close()
        assert kinds[0] == SilentSocket.TEXT and pinged is not None, kinds
        assert pinged - opened < interval + 3, f"first ping after {pinged - opened:.1f} s"
        # uvicorn drops the connection once the pong is `timeout` late, with no close frame.
        assert timeout - 0.5 < dropped - pinged < timeout + 5, f"dropped {dropped - pinged:.1f} s after"
        # The socket that answered every ping is still open: a bad frame still gets its error.
        answering.send("{not json")
        assert json.loads(answering.recv(timeout=10))["type"] == "error"
    assert frozen.get()["status"] == "online"  # offline comes from missed heartbeats, as before


def test_revoking_a_token_ends_the_open_session(
    api: httpx.Client, unique: Callable[[str], str], ws_url: str
) -> None:
    node = make_node(api, unique)
    with raw_socket(ws_url, node.token) as ws:
        assert register(ws, node.id)["type"] == "session.welcome"
        assert api.delete(f"/nodes/{node.id}/token").status_code == 200
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4410
    meta = node.get()["tokenMetadata"]
    assert meta["revokedAt"] is not None and meta["description"] == "test"


def test_deleting_a_connected_node_ends_its_session_and_its_commands(
    api: httpx.Client, unique: Callable[[str], str], ws_url: str,
    client_for: Callable[..., httpx.Client]
) -> None:
    node = make_node(api, unique)
    with raw_socket(ws_url, node.token) as ws:
        assert register(ws, node.id)["type"] == "session.welcome"
        # A live session does not open the node to another org.
        other = client_for("admin", "org-b").post(f"/nodes/{node.id}/commands",
                                                  json={"type": "system.healthCheck", "timeout": 2})
        assert other.status_code == 404, other.text
        assert api.delete(f"/nodes/{node.id}").status_code == 200
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    # The proxy had a live session a moment ago; it must not vouch for a deleted node.
    r = api.post(f"/nodes/{node.id}/commands", json={"type": "system.healthCheck", "timeout": 2})
    assert r.status_code == 404, r.text
    with raw_socket(ws_url, node.token) as ws:  # and it cannot come back
        assert json.loads(ws.recv(timeout=10))["data"]["code"] in ("not_found", "unauthorized")


def test_a_node_cannot_speak_for_another_and_node_tokens_cannot_call_the_api(
    api: httpx.Client, unique: Callable[[str], str], ws_url: str, cluster: str
) -> None:
    node, other = make_node(api, unique), make_node(api, unique)
    with raw_socket(ws_url, node.token) as ws:
        error = register(ws, other.id)
        assert error["type"] == "error" and error["data"]["code"] == "node_mismatch"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    assert other.get()["status"] == "pending"  # nothing was recorded for the other node
    r = httpx.get(f"{cluster}/api/nodes", headers={"Authorization": f"Bearer {node.token}"})
    assert r.status_code == 401


def test_bad_frames_get_error_frames_and_the_session_survives(
    api: httpx.Client, unique: Callable[[str], str], ws_url: str
) -> None:
    node = make_node(api, unique)
    with raw_socket(ws_url, node.token) as ws:
        assert register(ws, node.id)["type"] == "session.welcome"
        bad = ["{not json", "[1, 2]", json.dumps({"type": "node.explode", "messageId": "m1"}),
               json.dumps(make_frame("telemetry.heartbeat", {"uptimeSeconds": 1}) | {"data": 7})]
        codes = []
        for raw in bad:
            ws.send(raw)
            codes.append(json.loads(ws.recv(timeout=10))["data"]["code"])
        assert codes == ["malformed_json", "invalid_frame", "unknown_type", "invalid_frame"]
        # Still alive: a good frame is accepted and answered.
        assert register(ws, node.id)["type"] == "session.welcome"


def test_too_many_bad_frames_or_an_oversized_frame_end_the_session(
    api: httpx.Client, unique: Callable[[str], str], ws_url: str, settings: Settings
) -> None:
    node = make_node(api, unique)
    with raw_socket(ws_url, node.token) as ws:
        register(ws, node.id)
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(settings.ws_max_protocol_errors + 1):
                ws.send("garbage")
                ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4400
    with raw_socket(ws_url, node.token) as ws:
        register(ws, node.id)
        ws.send("x" * (settings.ws_max_frame_bytes + 1))
        error = json.loads(ws.recv(timeout=10))
        assert error["data"]["code"] == "too_large"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def _api_replicas() -> list:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "#api#" in a["name"]]
    return [ray.get_actor(a["name"], namespace="serve") for a in names]


def test_killing_the_relay_replicas_loses_no_command(
    api: httpx.Client, unique: Callable[[str], str], agents: Callable[..., AgentProcess],
    cluster: str,
) -> None:
    import ray

    node = make_node(api, unique)
    agent = agents(node)
    wait_status(node, "online")
    sessions_before = agent.log().count("registered as")
    replicas = _api_replicas()
    assert replicas, "no API replicas found"
    for replica in replicas:
        ray.kill(replica, no_restart=True)  # Serve replaces them
    wait_for(lambda: _healthy(cluster), timeout=90, what="the API to come back")
    wait_for(lambda: agent.log().count("registered as") > sessions_before, timeout=60,
             what="the agent to reconnect")
    r = api.post(f"/nodes/{node.id}/commands", json={"type": "system.healthCheck", "timeout": 20})
    assert r.status_code == 200 and r.json()["success"] is True
    assert node.get()["status"] == "online"


def _healthy(cluster: str) -> bool:
    try:
        return httpx.get(f"{cluster}/api/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_node_left_online_by_a_restarted_host_is_swept_offline(
    api: httpx.Client, unique: Callable[[str], str], ws_url: str, cluster: str,
    settings: Settings,
) -> None:
    import ray

    from actors import node_shard_of

    node = make_node(api, unique)
    with raw_socket(ws_url, node.token) as ws:
        register(ws, node.id)  # declares a 60 s heartbeat interval
        wait_status(node, "online")
    shard = node_shard_of(node.id, settings.node_proxy_shards)
    # The host restarts and forgets the node, which never comes back.
    ray.kill(ray.get_actor(f"nodes:{shard}", namespace="aiwm"), no_restart=False)
    wait_for(lambda: _healthy(cluster), timeout=60, what="the node host to restart")
    assert node.get()["status"] == "online"  # its 60 s x 3 window has not passed yet
    later = __import__("datetime").datetime.now(__import__("datetime").UTC) \
        + __import__("datetime").timedelta(minutes=5)
    swept = ray.get(ray.get_actor(f"nodes:{shard}", namespace="aiwm").sweep.remote(later))
    assert node.id in swept
    assert node.get()["status"] == "offline"
    events = api.get(f"/nodes/{node.id}/events").json()["data"]
    assert events[0]["type"] == "node.offline" and events[0]["data"] == {"sweptBy": shard}
