"""Fixtures the integration tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.nodes_helpers import AgentProcess, Node, make_node, wait_status


@pytest.fixture()
def agent(api: httpx.Client, unique: Callable[[str], str], cluster: str,
          tmp_path: Path) -> Iterator[tuple[Node, AgentProcess]]:
    """A new node with a real agent process, online; its state under ``tmp_path``."""
    node = make_node(api, unique)
    process = AgentProcess(ws_url=cluster.replace("http://", "ws://") + "/ws/node", node=node,
                           state_dir=tmp_path).start()
    wait_status(node, "online")
    yield node, process
    process.kill()
