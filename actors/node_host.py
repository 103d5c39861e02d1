"""NodeHost: the NodeProxy objects of many nodes in one actor process.

One actor per node cost ~65 MB and a database connection pool per node, and at 50
simulated nodes on two cores the database stopped answering in time (bench/nodes.py,
docs/architecture.md). Nodes are spread over a fixed number of hosts by a hash of their
id, and a host's NodeProxy objects share one database client. Each NodeProxy keeps the
per-node behaviour (session, outbox, liveness) exactly as before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import zlib
from typing import Any

import ray

from actors.channel import ChannelServer
from actors.node_proxy import NodeProxy, offline_after
from aiwm.errors import AiwmError, Unauthorized
from aiwm.metrics import metrics
from aiwm.settings import Settings
from aiwm.store import Store, utcnow

log = logging.getLogger("aiwm.nodes")
SWEEP_SECONDS = 5.0


def node_shard_of(node_id: str, shards: int) -> int:
    """Which NodeHost holds ``node_id``."""
    return zlib.crc32(node_id.encode()) % shards

METHODS = frozenset({"attach", "detach", "pull", "on_frame", "send", "execute", "run",
                     "result", "progress", "cancel", "revoke", "status"})


class NodeHost:
    def __init__(self, *, settings: Settings, shard: int) -> None:
        self._settings = settings
        self._shard = shard
        self._store: Store | None = None
        self._proxies: dict[str, NodeProxy] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._channel: ChannelServer | None = None

    def _proxy(self, node_id: str, org_id: str) -> NodeProxy:
        proxy = self._proxies.get(node_id)
        if proxy is None:
            if self._store is None:
                self._store = Store.for_settings(self._settings)
            proxy = self._proxies[node_id] = NodeProxy(
                settings=self._settings, node_id=node_id, org_id=org_id, store=self._store)
        elif proxy.org_id != org_id:
            raise Unauthorized(f"node {node_id!r} belongs to another org")
        return proxy

    async def call(self, node_id: str, org_id: str, method: str, *args: Any) -> Any:
        """Run ``method`` of the node's NodeProxy (created on first use)."""
        if method not in METHODS:
            raise ValueError(f"NodeProxy has no remote method {method!r}")
        self._ensure_sweeper()
        return await getattr(self._proxy(node_id, org_id), method)(*args)

    async def channel(self) -> dict[str, Any]:
        """Where this host's direct channel listens, and its key (started on first ask)."""
        if self._channel is None:
            self._channel = ChannelServer(self._channel_call)
        host = "127.0.0.1"
        if ray.is_initialized():
            host = ray.util.get_node_ip_address()
        host, port = await self._channel.start(host)
        return {"host": host, "port": port, "key": self._channel.key}

    async def _channel_call(self, method: str, args: list[Any]) -> Any:
        return await getattr(self, method)(*args)

    async def on_frames(self, items: list[tuple[str, str, str, dict[str, Any]]]
                        ) -> list[dict[str, Any]]:
        """Many nodes' frames in one call (see serve/frame_batch.py): each item is
        ``(node_id, org_id, session_id, frame)`` and gets what ``on_frame`` answered, or
        ``{"error": AiwmError}``. Each node's frames are handled in order; nodes in parallel."""
        answers: list[dict[str, Any]] = [{} for _ in items]
        by_node: dict[str, list[int]] = {}
        for i, (node_id, *_rest) in enumerate(items):
            by_node.setdefault(node_id, []).append(i)

        async def one_node(indices: list[int]) -> None:
            for i in indices:
                node_id, org_id, session_id, frame = items[i]
                try:
                    answers[i] = await self.call(node_id, org_id, "on_frame", session_id, frame)
                except AiwmError as e:
                    answers[i] = {"error": e}

        await asyncio.gather(*(one_node(indices) for indices in by_node.values()))
        return answers

    async def command(self, node_id: str, org_id: str, kind: str, data: dict[str, Any] | None,
                      timeout: float) -> dict[str, Any]:
        """Send a command to a node of ``org_id`` and wait for its result (the REST path).

        A node with a live session here was checked against the database when it attached
        (deleting it or revoking its token ends that session), so only a node without one
        costs a database read, which answers NotFound for a node that is not there."""
        proxy = self._proxies.get(node_id)
        if proxy is None or proxy.org_id != org_id or not proxy.connected:
            if self._store is None:
                self._store = Store.for_settings(self._settings)
            await self._store.documents("nodes").get(org_id, node_id)
        return await self.call(node_id, org_id, "execute", kind, data, timeout)  # type: ignore[no-any-return]

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_forever())

    async def census(self) -> dict[str, Any]:
        """Counts; also (re)starts the sweeper: deploy and /api/health call it."""
        self._ensure_sweeper()
        return {"shard": self._shard, "nodes": len(self._proxies),
                "connected": sum(1 for p in self._proxies.values() if p.connected)}

    async def sweep(self, now: dt.datetime | None = None) -> list[str]:
        """Mark offline the nodes of this shard that the database says are online but that
        no proxy here is watching (e.g. after a restart) and whose heartbeats stopped."""
        if self._store is None:
            self._store = Store.for_settings(self._settings)
        now = now or utcnow()
        nodes = self._store.documents("nodes")
        swept = []
        for node in await nodes.find({"status": "online", "deletedAt": None}):
            node_id = node["id"]
            if node_shard_of(node_id, self._settings.node_proxy_shards) != self._shard:
                continue
            proxy = self._proxies.get(node_id)
            if proxy is not None and proxy.watching:
                continue
            interval = (node.get("heartbeatInterval") or self._settings.node_heartbeat_interval)
            window = offline_after(interval / 1000, self._settings)
            last = node.get("lastHeartbeatAt")
            if last is None or (now - last).total_seconds() > window:
                await nodes.set_state(node["orgId"], node_id, {"status": "offline"})
                await self._store.events.record(
                    org_id=node["orgId"], kind="node.offline", at=now,
                    resource={"type": "node", "id": node_id}, data={"sweptBy": self._shard})
                swept.append(node_id)
        return swept

    def report(self) -> dict[str, int]:
        """Connected nodes and commands without a result, for the metrics (and census)."""
        connected = sum(1 for p in self._proxies.values() if p.connected)
        in_flight = sum(p.in_flight for p in self._proxies.values())
        shard = str(self._shard)
        metrics.set("aiwm_nodes_connected", connected, shard=shard)
        metrics.set("aiwm_node_commands_in_flight", in_flight, shard=shard)
        return {"connected": connected, "inFlight": in_flight}

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.report()
            try:
                await self.sweep()
            except AiwmError as e:
                log.warning("node sweep failed: %s", e.detail)
