"""Node frames that need no prompt answer, sent to their NodeHost in batches.

Heartbeats, metrics and command receipts from every session on a replica used to cost
one actor call each; at 50 nodes the call submissions alone were 29% of a relay
replica's CPU (py-spy, bench/nodes.py), and 50 agents beating in step queued a command's
result behind 50 calls. Here frames bound for one NodeHost go in one call: while a batch
is in flight the next one gathers, so a batch is as large as the host is slow.
"""

from __future__ import annotations

import asyncio
from typing import Any

from actors import node_host_client
from actors.node_host import node_shard_of
from aiwm.errors import AiwmError, Unavailable
from aiwm.settings import Settings

Item = tuple[str, str, str, dict[str, Any]]  # node id, org id, session id, frame
MAX_BATCH = 256


class FrameBatcher:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._queues: dict[int, list[tuple[Item, asyncio.Future[dict[str, Any]]]]] = {}
        self._senders: dict[int, asyncio.Task[None]] = {}

    def submit(self, node_id: str, org_id: str, session_id: str,
               frame: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Queue one frame; the future gets what ``NodeProxy.on_frame`` answered, or the
        :class:`AiwmError` that kept it from being handled."""
        shard = node_shard_of(node_id, self._settings.node_proxy_shards)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(shard, []).append(((node_id, org_id, session_id, frame), answer))
        sender = self._senders.get(shard)
        if sender is None or sender.done():
            self._senders[shard] = asyncio.create_task(self._send(shard))
        return answer

    async def _send(self, shard: int) -> None:
        queue = self._queues[shard]
        host = node_host_client(self._settings, shard)
        while queue:
            batch, queue[:] = queue[:MAX_BATCH], queue[MAX_BATCH:]
            try:
                answers = await host.call("on_frames", [item for item, _ in batch])
            except AiwmError as e:
                answers = [{"error": e} for _ in batch]
            except Exception as e:  # noqa: BLE001 - every waiter must hear of it
                failure = Unavailable(f"node host {shard} failed a batch: {type(e).__name__}: {e}")
                answers = [{"error": failure} for _ in batch]
            for (_, future), answer in zip(batch, answers, strict=True):
                if future.done():
                    continue
                error = answer.get("error")
                if isinstance(error, AiwmError):
                    future.set_exception(error)
                elif error is not None:
                    future.set_exception(Unavailable(str(error)))
                else:
                    future.set_result(answer)
