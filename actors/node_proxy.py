"""NodeProxy: one node's live session, command outbox and telemetry.

A plain class, one object per node, living in a NodeHost actor (actors/node_host.py).
The relay (in a Serve replica) owns the WebSocket and calls it: ``attach`` a session,
``on_frame`` for each frame the node sends, ``pull`` for frames to send to the node.
It outlives relay restarts and agent reconnects, so the outbox survives both.

Delivery: a command stays in the outbox until its *result* arrives, and is sent again
on every new session; the agent answers a repeated command from its own record. Each
result reaches its waiting caller once: results are de-duplicated by command id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from aiwm.auth import NodeIdentity
from aiwm.errors import (
    Cancelled,
    CommandTimeout,
    NotFound,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    field_errors,
)
from aiwm.logs import bound
from aiwm.logs import current as current_correlation
from aiwm.metrics import metrics
from aiwm.protocol import COMMANDS, LIVE_COMMANDS, SUPPORTED_VERSIONS, error_frame, make_frame
from aiwm.settings import Settings
from aiwm.store import Store, utcnow

log = logging.getLogger("aiwm.nodes")
REPLACED = (4409, "replaced by a newer connection of this node")
REVOKED = (4410, "node token revoked")
DELETED = (4404, "node deleted")
MISMATCH = (4403, "this token belongs to another node")
BAD_VERSION = (4400, "unsupported protocol version")
DONE_MEMORY = 10_000  # command ids whose result already arrived (duplicate filter)
OUTBOX_LIMIT = 1000  # commands waiting for a result, per node
PROGRESS_FIELDS = ("bytesDone", "bytesTotal", "filesDone", "filesTotal")
# The fields a stored metrics report is filed under (aiwm/store/node_metrics.py): a report's
# own fields of these names would file it under another node, or another org.
RECORD_FIELDS = frozenset({"_id", "orgId", "nodeId", "at"})


def offline_after(interval_s: float, settings: Settings) -> float:
    """Seconds of silence after which a node counts as offline."""
    return max(interval_s * settings.node_missed_heartbeats, settings.node_offline_min_seconds)


def token_problem(node: dict[str, Any], token_id: str) -> str | None:
    """Why ``token_id`` may not open a session for ``node`` (None: it may)."""
    meta = node.get("tokenMetadata") or {}
    if meta.get("tokenId") != token_id:
        return "token superseded: a newer node token was generated"
    if meta.get("revokedAt"):
        return "node token revoked"
    return None


class NodeProxy:
    def __init__(
        self,
        *,
        settings: Settings,
        node_id: str,
        org_id: str,
        store: Store | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._node_id = node_id
        self._org = org_id
        self._clock = clock
        self._monotonic = monotonic
        self._store = store
        self._session: str | None = None
        self._registered = False
        self._closed: OrderedDict[str, list[Any]] = OrderedDict()  # session -> [code, reason]
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._progress: dict[str, dict[str, Any]] = {}  # command id -> its latest progress
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._results: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._done: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._online = False
        self._last_heartbeat: float | None = None
        self._persisted_at = float("-inf")
        self._heartbeat_ms = settings.node_heartbeat_interval
        self._monitor: asyncio.Task[None] | None = None

    @property
    def org_id(self) -> str:
        return self._org

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def in_flight(self) -> int:
        """Commands sent or queued that have no result yet."""
        return len(self._outbox)

    @property
    def watching(self) -> bool:
        """True while this proxy's own heartbeat watcher tracks the node."""
        return self._online and self._monitor is not None and not self._monitor.done()

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.for_settings(self._settings, clock=self._clock)
        return self._store

    # --- sessions -------------------------------------------------------------------

    async def attach(self, session_id: str, identity: NodeIdentity) -> None:
        """Make ``session_id`` the node's session; an older one is told to close."""
        if identity.node_id != self._node_id or identity.org_id != self._org:
            raise Unauthorized(MISMATCH[1])
        node = await self.store.documents("nodes").get(self._org, self._node_id)
        problem = token_problem(node, identity.token_id)
        if problem:
            raise Unauthorized(problem)
        if self._session is not None:
            self._close_current(*REPLACED)
        self._session = session_id
        self._registered = False  # commands wait until the node has registered
        self._queue = asyncio.Queue()
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._watch_heartbeats())

    async def detach(self, session_id: str) -> None:
        if session_id == self._session:
            self._session = None
            self._queue.put_nowait({"close": [1000, "session ended"]})

    async def pull(self, session_id: str, wait: float = 20.0) -> dict[str, Any]:
        """Frames to send on ``session_id``: ``{"frames": [...]}`` or ``{"close": [code, reason]}``."""
        if session_id != self._session:
            return {"close": self._closed.get(session_id, list(REPLACED))}
        queue = self._queue
        try:
            first = await asyncio.wait_for(queue.get(), wait)
        except TimeoutError:
            return {"frames": []}
        if "close" in first:
            return first
        frames = [first]
        while not queue.empty() and len(frames) < 100:
            nxt = queue.get_nowait()
            if "close" in nxt:
                queue.put_nowait(nxt)  # deliver what came before, close on the next pull
                break
            frames.append(nxt)
        return {"frames": frames}

    async def revoke(self, deleted: bool = False) -> None:
        """The node's token was revoked, or the node deleted: end its session now."""
        if self._session is not None:
            self._close_current(*(DELETED if deleted else REVOKED))

    def _close_current(self, code: int, reason: str) -> None:
        self._queue.put_nowait({"close": [code, reason]})
        if self._session is not None:
            self._closed[self._session] = [code, reason]
            while len(self._closed) > 100:
                self._closed.popitem(last=False)
        self._session = None

    # --- frames from the node -------------------------------------------------------

    async def on_frame(self, session_id: str, frame: dict[str, Any]) -> dict[str, Any]:
        """Handle one parsed frame; returns ``{"frames": replies, "close": [code, reason]?}``."""
        if session_id != self._session:
            return {"frames": [], "close": self._closed.get(session_id, list(REPLACED))}
        kind, data = frame["type"], frame["data"]
        if kind == "node.register":
            return await self._register(data)
        if kind == "telemetry.heartbeat":
            await self._heartbeat()
        elif kind == "telemetry.metrics":
            await self._metrics(data)
        elif kind == "command.ack":
            ack = self._acks.get(frame.get("correlationId") or "")
            if ack is not None and not ack.done():
                ack.set_result(None)
        elif kind == "command.result":
            return self._result(frame)
        else:  # deployment.status, deployment.logs, model.downloadProgress
            await self.store.events.record(
                org_id=self._org, kind=kind, resource={"type": "node", "id": self._node_id},
                at=self._clock(), data=data)
            if kind == "deployment.status":
                await self._deployment_status(data)
            elif kind == "model.downloadProgress":
                self._download_progress(data)
        return {"frames": []}

    def _download_progress(self, data: dict[str, Any]) -> None:
        """Keep the latest progress of a ``model.download`` this node still owes a result
        for (the orchestrator shows it on the command's step); any other is only an event."""
        command_id = data.get("commandId")
        if not isinstance(command_id, str):
            return
        sent = self._outbox.get(command_id)
        if sent is not None and sent.get("type") == "model.download":
            self._progress[command_id] = {k: data.get(k) for k in PROGRESS_FIELDS}

    async def progress(self, command_id: str) -> dict[str, Any] | None:
        """The latest progress the node reported for a command still running, if any."""
        return self._progress.get(command_id)

    async def _deployment_status(self, data: dict[str, Any]) -> None:
        """A server that died (or came back) on its own changes its deployment's status;
        changes the orchestrator is making itself (deploying, stopping) are left alone."""
        dep_id, status = str(data.get("deploymentId") or ""), data.get("status")
        deployments = self.store.documents("deployments")
        match = {"nodeId": self._node_id}
        if status in ("exited", "failed"):
            why = f"the server {status} on node {self._node_id}: {data.get('message') or status}"
            await deployments.set_state_if(self._org, dep_id, {**match, "status": "running"},
                                           {"status": "failed", "error": why})
        elif status == "running":
            await deployments.set_state_if(
                self._org, dep_id, {**match, "status": "failed",
                                    "error": {"$regex": "^the server (exited|failed) on node"}},
                {"status": "running", "error": None})

    async def _register(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("nodeId") != self._node_id:
            return {"frames": [error_frame("node_mismatch", MISMATCH[1])], "close": list(MISMATCH)}
        version = data.get("protocolVersion")
        if version not in SUPPORTED_VERSIONS:
            message = f"protocol version {version} is not supported; use {sorted(SUPPORTED_VERSIONS)}"
            return {"frames": [error_frame("unsupported_version", message)],
                    "close": list(BAD_VERSION)}
        self._heartbeat_ms = int(data.get("heartbeatInterval") or self._heartbeat_ms)
        gpus = data.get("gpuDevices") or []
        reported = ("hostname", "ipAddress", "publicIpAddress", "os", "cpuCores", "cpuModel",
                    "ramTotal", "containerRuntime", "agentVersion")
        state = {k: data[k] for k in reported if data.get(k) is not None}  # never blank a field
        state |= {
            "gpuDevices": gpus,
            "gpuSummary": {"count": len(gpus),
                           "memoryTotal": sum(int(g.get("memoryTotal") or 0) for g in gpus),
                           "names": sorted({str(g.get("name")) for g in gpus}),
                           "mock": any(g.get("mock") for g in gpus)},
            "protocolVersion": version,
            "heartbeatInterval": self._heartbeat_ms,
        }
        await self.store.documents("nodes").set_state(self._org, self._node_id, state)
        await self._heartbeat()
        welcome = make_frame("session.welcome", {
            "protocolVersion": version, "sessionId": self._session or "",
            "heartbeatInterval": self._heartbeat_ms,
            "metricsInterval": int(data.get("metricsInterval") or 60000),
            "maxFrameBytes": self._settings.ws_max_frame_bytes})
        # One queue keeps the order: the welcome, then every command without a result.
        self._queue.put_nowait(welcome)
        for frame in self._outbox.values():
            self._queue.put_nowait(frame)
        self._registered = True
        return {"frames": []}

    async def _heartbeat(self) -> None:
        previous, now = self._last_heartbeat, self._monotonic()
        self._last_heartbeat = now
        if previous is not None and self._online:
            metrics.observe("aiwm_heartbeat_gap_seconds", now - previous)
        state: dict[str, Any] = {"lastHeartbeatAt": self._clock()}
        nodes = self.store.documents("nodes")
        if self._online:
            # The hot path. Liveness is judged in memory on every beat; the database gets
            # the timestamp at most every NODE_HEARTBEAT_PERSIST seconds.
            if now - self._persisted_at >= self._settings.node_heartbeat_persist:
                await nodes.touch(self._org, self._node_id, state)
                self._persisted_at = now
            return
        self._persisted_at = now
        await nodes.set_state(self._org, self._node_id, state | {"status": "online"})
        if not self._online:
            self._online = True
            await self._event("node.online")

    async def _metrics(self, data: dict[str, Any]) -> None:
        report = {k: v for k, v in data.items() if k not in RECORD_FIELDS}
        await self.store.node_metrics.add(org_id=self._org, node_id=self._node_id,
                                          at=self._clock(), metrics=report)

    def _result(self, frame: dict[str, Any]) -> dict[str, Any]:
        command_id = frame.get("correlationId") or ""
        receipt = make_frame("command.ack", correlation_id=frame["messageId"])
        if command_id in self._done or command_id not in self._outbox:
            return {"frames": [receipt]}  # a duplicate, or no such command: acknowledged, dropped
        sent = self._outbox.pop(command_id)
        self._progress.pop(command_id, None)
        data = frame["data"] if isinstance(frame["data"], dict) else {}
        with bound(sent.get("traceId")):  # ours, not whatever the node wrote back
            if data.get("success"):
                log.info("command %s succeeded", sent["type"], extra={
                    "nodeId": self._node_id, "commandId": command_id})
            else:
                error = data.get("error") or {}
                log.warning("command %s failed: %s", sent["type"], error.get("message"), extra={
                    "nodeId": self._node_id, "commandId": command_id,
                    "errorCode": error.get("code")})
        self._done[command_id] = frame["data"]
        while len(self._done) > DONE_MEMORY:
            self._done.popitem(last=False)
        ack = self._acks.pop(command_id, None)
        if ack is not None and not ack.done():
            ack.set_result(None)  # a result implies receipt
        waiter = self._results.pop(command_id, None)  # waiters hold it; _done answers later ones
        if waiter is not None and not waiter.done():
            waiter.set_result(frame["data"])
        return {"frames": [receipt]}

    # --- commands to the node -------------------------------------------------------

    async def send(self, kind: str, data: dict[str, Any] | None = None,
                   resource: dict[str, str] | None = None, timeout: float = 10.0,
                   command_id: str | None = None) -> str:
        """Queue a command; return its id once the node acknowledges it.

        If the node does not acknowledge within ``timeout`` (it may be offline) the command
        stays queued and is delivered when the node reconnects; :class:`CommandTimeout`
        says so, with the command id to wait on. Queries (``LIVE_COMMANDS``) are not kept
        for an offline node: they fail at once with :class:`Unavailable`.

        Sending again with the same ``command_id`` is safe: a command still queued is not
        queued twice, and one already answered is not sent again (the orchestrator relies
        on this after a restart; the agent also answers a repeat from its own record).
        """
        if kind not in COMMANDS:
            raise ValidationFailed(f"unknown command {kind!r}; known: {', '.join(COMMANDS)}",
                                   extra={"errors": [{"field": "body.type", "type": "unknown_command",
                                                      "message": f"one of {', '.join(COMMANDS)}"}]})
        if command_id is not None and command_id in self._done:
            return command_id
        live = kind in LIVE_COMMANDS
        connected = self._session is not None and self._registered
        if live and not connected:
            raise Unavailable(f"node {self._node_id} is not connected; {kind} needs a live node")
        if command_id is None or command_id not in self._outbox:
            if len(self._outbox) >= OUTBOX_LIMIT:
                raise Unavailable(f"node {self._node_id} has {len(self._outbox)} commands without "
                                  "a result; wait for it to catch up (is it connected?)")
            try:
                frame = make_frame(kind, data or {}, resource=resource, message_id=command_id,
                                   trace_id=current_correlation())
            except ValidationError as e:
                raise ValidationFailed(f"invalid data for {kind}",
                                       extra={"errors": field_errors(e.errors(), "body")}) from None
            command_id = frame["messageId"]
            loop = asyncio.get_running_loop()
            self._outbox[command_id] = frame
            self._acks[command_id] = loop.create_future()
            self._results[command_id] = loop.create_future()
            if connected:
                self._queue.put_nowait(frame)
            log.info("command %s %s", kind, "sent" if connected else "queued for when the node "
                     "reconnects", extra={"nodeId": self._node_id, "commandId": command_id})
        ack = self._acks.get(command_id)
        if ack is None:
            return command_id  # acknowledged before
        try:
            await asyncio.wait_for(asyncio.shield(ack), timeout)
            self._acks.pop(command_id, None)
        except TimeoutError:
            if live:
                self._forget(command_id)
                raise CommandTimeout(f"node {self._node_id} did not acknowledge {kind} within "
                                     f"{timeout:g}s", extra={"commandId": command_id,
                                                             "queued": False}) from None
            where = "is connected" if self._session else "is not connected"
            raise CommandTimeout(
                f"node {self._node_id} {where} and did not acknowledge {kind} within "
                f"{timeout:g}s; the command stays queued and is delivered when it reconnects",
                extra={"commandId": command_id, "queued": True}) from None
        return command_id

    async def run(self, kind: str, data: dict[str, Any], resource: dict[str, str] | None,
                  command_id: str, timeout: float) -> dict[str, Any]:
        """Send (idempotently, by ``command_id``) and wait up to ``timeout`` for the result,
        in one call: ``{"acknowledged": bool, "result": {...}}``. An offline node's command
        stays queued; :class:`CommandTimeout` if no result came in time (call again to
        keep waiting: nothing is sent twice)."""
        started = self._monotonic()
        acknowledged = True
        try:
            await self.send(kind, data, resource, min(timeout, 10.0), command_id)
        except CommandTimeout:
            if kind in LIVE_COMMANDS:
                raise  # a query is not kept: the caller may send it again
            acknowledged = False  # queued for when the node is back; the result decides
        remaining = max(0.001, timeout - (self._monotonic() - started))
        return {"acknowledged": acknowledged, "result": await self.result(command_id, remaining)}

    async def cancel(self, command_id: str) -> bool:
        """Stop a command: it leaves the outbox (never sent again) and, if the node is
        connected, is told to stop; its result, if one still comes, is dropped.
        Returns whether the command was still waiting for a result."""
        waiting = command_id in self._outbox
        self._forget(command_id)
        if waiting and self._session is not None and self._registered:
            self._queue.put_nowait(make_frame("command.cancel", correlation_id=command_id))
        return waiting

    def _forget(self, command_id: str) -> None:
        self._outbox.pop(command_id, None)
        self._progress.pop(command_id, None)
        for futures in (self._acks, self._results):
            future = futures.pop(command_id, None)
            if future is not None and not future.done():
                future.set_exception(Cancelled(f"command {command_id} was cancelled"))
                future.exception()  # retrieved: nobody may be waiting

    async def execute(self, kind: str, data: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> dict[str, Any]:
        """:meth:`send` then :meth:`result` in one call (one actor round trip less)."""
        started = self._monotonic()
        command_id = await self.send(kind, data, None, timeout)
        remaining = max(0.001, timeout - (self._monotonic() - started))
        try:
            result = await self.result(command_id, remaining)
        except CommandTimeout:
            if kind in LIVE_COMMANDS:
                await self.cancel(command_id)  # a late answer to a query helps nobody
            raise
        return {"commandId": command_id, **result}

    async def result(self, command_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The node's result for ``command_id``: the first one to arrive (duplicates are
        dropped); asking again returns the same result while it is remembered."""
        if command_id in self._done:
            return self._done[command_id]
        waiter = self._results.get(command_id)
        if waiter is None:
            raise ValidationFailed(f"no command {command_id!r} on node {self._node_id}")
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise CommandTimeout(
                f"node {self._node_id} acknowledged the command but sent no result within "
                f"{timeout:g}s", extra={"commandId": command_id, "queued": False}) from None

    async def status(self) -> dict[str, Any]:
        return {"nodeId": self._node_id, "connected": self._session is not None,
                "online": self._online, "outbox": len(self._outbox),
                "heartbeatInterval": self._heartbeat_ms}

    # --- liveness -------------------------------------------------------------------

    async def _watch_heartbeats(self) -> None:
        while True:
            interval = self._heartbeat_ms / 1000
            await asyncio.sleep(min(1.0, max(0.05, interval / 4)))
            if not self._online or self._last_heartbeat is None:
                continue
            silent = self._monotonic() - self._last_heartbeat
            if silent > offline_after(interval, self._settings):
                try:
                    await self.store.documents("nodes").set_state(
                        self._org, self._node_id, {"status": "offline"})
                    self._online = False
                    await self._event("node.offline", {"silentSeconds": round(silent, 1)})
                except Unavailable:
                    continue  # database down: try again on the next tick
                except NotFound:
                    return  # the node was deleted: nothing left to watch

    async def _event(self, kind: str, data: dict[str, Any] | None = None) -> None:
        if kind in ("node.online", "node.offline"):
            metrics.inc("aiwm_node_events_total", event=kind.split(".", 1)[1])
        await self.store.events.record(org_id=self._org, kind=kind,
                                       resource={"type": "node", "id": self._node_id},
                                       at=self._clock(), data=data)
