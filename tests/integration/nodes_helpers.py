"""Real node agents (subprocesses) and raw WebSocket clients for the node-channel tests."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


class SilentSocket:
    """A WebSocket client written on a bare TCP socket that never answers pings, as a node
    whose host froze or whose network dropped without a FIN looks to the controller
    (the ``websockets`` client answers pings by itself, from a thread)."""

    PING, TEXT, CLOSE = 0x9, 0x1, 0x8

    def __init__(self, ws_url: str, token: str) -> None:
        url = urlsplit(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Authorization: Bearer {token}\r\n\r\n").encode())
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].split()[1] == b"101", head

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self._buffer += data

    def _take(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        size = len(payload)
        head = bytes([0x80 | self.TEXT]) + (bytes([0x80 | size]) if size < 126
                                             else bytes([0x80 | 126]) + struct.pack("!H", size))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def frame(self, deadline: float) -> tuple[int, bytes]:
        """The next frame from the server as (opcode, payload); EOFError once it hangs up."""
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        first, second = self._take(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._take(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._take(8))[0]
        return first & 0x0F, self._take(size)

    def close(self) -> None:
        self.sock.close()
