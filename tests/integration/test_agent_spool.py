"""The agent keeps results on disk until acknowledged: a restart loses none.

The controller side here is a scripted WebSocket server, so the test decides exactly
when acknowledgements do (not) arrive; the agent is the real `aiwm-node` process.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.server import Server, ServerConnection, serve

from aiwm.protocol import make_frame
from tests.conftest import free_port, wait_for
from tests.integration.nodes_helpers import AgentProcess, Node


class ScriptedController:
    """Accepts agents; records what they send; sends what the test queues."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict] = queue.Queue()
        self.to_send: queue.Queue[dict] = queue.Queue()
        self.ack_results = False
        self.port = free_port()
        self.server: Server = serve(self._handle, "127.0.0.1", self.port)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handle(self, ws: ServerConnection) -> None:
        register = json.loads(ws.recv())
        self.received.put(register)
        ws.send(json.dumps(make_frame("session.welcome", {
            "protocolVersion": 1, "sessionId": "s", "heartbeatInterval": 60000,
            "metricsInterval": 60000})))
        while True:
            try:
                while not self.to_send.empty():
                    ws.send(json.dumps(self.to_send.get_nowait()))
                raw = ws.recv(timeout=0.1)
            except TimeoutError:
                continue
            except Exception:
                return
            frame = json.loads(raw)
            self.received.put(frame)
            if frame["type"] == "command.result" and self.ack_results:
                ws.send(json.dumps(make_frame("command.ack", correlation_id=frame["messageId"])))

    def next_of(self, kind: str, timeout: float = 20) -> dict:
        def find() -> dict | None:
            try:
                frame = self.received.get(timeout=0.2)
            except queue.Empty:
                return None
            return frame if frame["type"] == kind else None

        return wait_for(find, timeout=timeout, what=f"a {kind} frame", every=0)  # type: ignore[no-any-return]


@pytest.fixture()
def controller() -> Iterator[ScriptedController]:
    c = ScriptedController()
    yield c
    c.server.shutdown()


def test_an_unacknowledged_result_is_sent_again_after_an_agent_restart(
    controller: ScriptedController, tmp_path: Path
) -> None:
    node = Node(id="node-spool", token="any", api=None)  # type: ignore[arg-type]
    url = f"ws://127.0.0.1:{controller.port}/ws/node"
    agent = AgentProcess(ws_url=url, node=node, state_dir=tmp_path).start()
    try:
        assert controller.next_of("node.register")["data"]["nodeId"] == "node-spool"
        command = make_frame("system.healthCheck", {})
        controller.to_send.put(command)
        assert controller.next_of("command.ack")["correlationId"] == command["messageId"]
        first = controller.next_of("command.result")
        assert first["correlationId"] == command["messageId"]
        spooled = list((tmp_path / "results").glob("*.json"))
        assert len(spooled) == 1  # kept: nobody acknowledged it

        agent.kill()
        agent = AgentProcess(ws_url=url, node=node, state_dir=tmp_path).start()
        controller.ack_results = True
        controller.next_of("node.register")
        again = controller.next_of("command.result")
        assert again["messageId"] == first["messageId"] and again["data"] == first["data"]
        wait_for(lambda: not list((tmp_path / "results").glob("*.json")), timeout=10,
                 what="the acknowledged result to leave the spool")
    finally:
        agent.kill()
