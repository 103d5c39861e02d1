"""Real node agents (subprocesses) and raw WebSocket clients for the node-channel tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from aiwm.protocol import make_frame
from tests.conftest import wait_for


@dataclass
class Node:
    id: str
    token: str
    api: httpx.Client

    def get(self) -> dict:
        r = self.api.get(f"/nodes/{self.id}")
        assert r.status_code == 200, r.text
        return r.json()


def make_node(api: httpx.Client, unique: Callable[[str], str]) -> Node:
    node = api.post("/nodes", json={"name": unique("gpu")}).json()
    token = api.post(f"/nodes/{node['id']}/token", json={"description": "test"})
    assert token.status_code == 201, token.text
    return Node(id=node["id"], token=token.json()["token"], api=api)


@dataclass
class AgentProcess:
    """``python -m nodeside.agent`` as an operator would run it, configured by env."""

    ws_url: str
    node: Node
    state_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        env = {**os.environ, "CONTROLLER_URL": self.ws_url, "NODE_TOKEN": self.node.token,
               "NODE_ID": self.node.id, "HEARTBEAT_INTERVAL": "300", "METRICS_INTERVAL": "500",
               "GPU_MOCK_MODE": "true", "AIWM_NODE_STATE_DIR": str(self.state_dir),
               "AIWM_NODE_MAX_BACKOFF": "0.5", "DOCKER_SOCKET": str(self.state_dir / "no.sock"),
               "LOG_LEVEL": "INFO", **self.extra_env}
        log = open(self.state_dir / "agent.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "nodeside.agent"], env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return (self.state_dir / "agent.log").read_text(errors="replace")


def wait_status(node: Node, status: str, timeout: float = 20) -> dict:
    return wait_for(lambda: (doc := node.get())["status"] == status and doc, timeout=timeout,
                    what=f"node {node.id} to be {status}")


def raw_socket(ws_url: str, token: str | None, **options: Any) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(ws_url, additional_headers=headers, open_timeout=10, max_size=None,
                   **options)


def register(ws: ClientConnection, node_id: str) -> dict[str, Any]:
    ws.send(json.dumps(make_frame("node.register", {
        "nodeId": node_id, "agentVersion": "test", "hostname": "raw", "cpuCores": 1,
        "ramTotal": 1, "heartbeatInterval": 60000})))
    return json.loads(ws.recv(timeout=10))


def frames_until(ws: ClientConnection, kind: str, timeout: float = 10) -> Iterator[dict]:
    while True:
        frame = json.loads(ws.recv(timeout=timeout))
        yield frame
        if frame["type"] == kind:
            return
