"""The node relay: ``/ws/node`` WebSockets, attached to each node's NodeProxy.

The relay holds no state worth keeping: it authenticates the socket, forwards each
parsed frame to the node's NodeProxy (inside the NodeHost actor ``nodes:<shard>``) and
pumps its outgoing frames back. If a replica dies the agent reconnects (to any replica)
and the NodeProxy carries on where it was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from actors import NodeClient
from actors.node_proxy import token_problem
from aiwm.auth import NodeIdentity, decode_node_token
from aiwm.errors import AiwmError, Unauthorized
from aiwm.protocol import NODE_TO_CONTROLLER, ProtocolError, error_frame, parse_frame
from serve.deps import AppState
from serve.frame_batch import FrameBatcher

log = logging.getLogger("aiwm.relay")
router = APIRouter()

UNAUTHORIZED = 4401
FORBIDDEN = 4403
PROTOCOL = 4400
TOO_BIG = 1009
UNAVAILABLE = 1013  # try again later
PULL_WAIT = 20.0
# Frames whose handling answers nothing the node waits for: the read loop hands them on
# (in batches across sessions, serve/frame_batch.py) and reads the next frame at once, so
# a command's result is not held up behind its ack or a heartbeat's database write
# (bench/nodes.py). At most IN_FLIGHT of them per session at a time.
BACKGROUND = frozenset({"command.ack", "telemetry.heartbeat", "telemetry.metrics"})
IN_FLIGHT = 16


def _token(ws: WebSocket) -> str | None:
    header = ws.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return ws.query_params.get("token")


class Session:
    """One socket: sends are serialised because two tasks write to it."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, frame: dict[str, Any]) -> None:
        async with self._lock:
            if not self.closed:
                await self.ws.send_text(json.dumps(frame, separators=(",", ":")))

    async def close(self, code: int, reason: str) -> None:
        async with self._lock:
            if not self.closed:
                self.closed = True
                await self.ws.close(code, reason[:120])


async def _authenticate(state: AppState, token: str | None) -> NodeIdentity:
    if not token:
        raise Unauthorized("missing node token: send 'Authorization: Bearer <node token>'")
    identity = decode_node_token(token, secret=state.settings.secret())
    node = await state.store.documents("nodes").get(identity.org_id, identity.node_id)
    problem = token_problem(node, identity.token_id)
    if problem:
        raise Unauthorized(problem)
    return identity


@router.websocket("/ws/node")
async def node_socket(ws: WebSocket) -> None:
    state: AppState = ws.app.state.aiwm
    settings = state.settings
    await ws.accept()
    session = Session(ws)
    origin = ws.headers.get("origin")
    if not settings.ws_origin_allowed(origin):
        # A page in a browser trying to open a node socket: accepted only to say why.
        detail = f"origin {origin!r} may not open node sockets (WS_CORS_ORIGIN)"
        log.warning("node socket refused: %s", detail)
        await session.send(error_frame("forbidden", detail))
        await session.close(FORBIDDEN, detail)
        return
    try:
        identity = await _authenticate(state, _token(ws))
    except AiwmError as e:
        await session.send(error_frame(e.code, e.detail))
        await session.close(UNAUTHORIZED if e.status in (401, 403, 404) else UNAVAILABLE, e.detail)
        return
    proxy = state.node(identity.node_id, identity.org_id)
    session_id = uuid.uuid4().hex
    try:
        await proxy.call("attach", session_id, identity)
    except AiwmError as e:
        await session.send(error_frame(e.code, e.detail))
        await session.close(UNAUTHORIZED if e.status == 401 else UNAVAILABLE, e.detail)
        return
    pump = asyncio.create_task(_pump(session, proxy, session_id))
    try:
        await _read(session, proxy, session_id, settings.ws_max_frame_bytes,
                    settings.ws_max_protocol_errors, state.frames)
    except WebSocketDisconnect:
        pass
    except AiwmError as e:  # the actor or database went away mid-session
        await session.close(UNAVAILABLE, e.detail)
    finally:
        pump.cancel()
        try:
            await proxy.call("detach", session_id)
        except AiwmError:
            pass


async def _read(session: Session, proxy: NodeClient, session_id: str, max_bytes: int,
                max_errors: int, batcher: FrameBatcher) -> None:
    pending: set[asyncio.Task[bool]] = set()
    try:
        await _read_frames(session, proxy, session_id, max_bytes, max_errors, pending, batcher)
    finally:
        # What the node sent before it went is handled, not dropped.
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _read_frames(session: Session, proxy: NodeClient, session_id: str, max_bytes: int,
                       max_errors: int, pending: set[asyncio.Task[bool]],
                       batcher: FrameBatcher) -> None:
    errors = 0
    while not session.closed:
        message = await session.ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        size = len(raw.encode()) if isinstance(raw, str) and len(raw) * 4 > max_bytes else len(raw)
        if size > max_bytes:
            await session.send(error_frame("too_large", f"frame of {size} bytes is over "
                                                        f"the {max_bytes}-byte limit"))
            await session.close(TOO_BIG, f"frame over {max_bytes} bytes")
            return
        try:
            frame = parse_frame(raw, allowed=NODE_TO_CONTROLLER, storable=True)
        except ProtocolError as e:
            errors += 1
            await session.send(error_frame(e.code, e.message, e.message_id))
            if errors >= max_errors:
                await session.close(PROTOCOL, f"{errors} bad frames in a row")
                return
            continue
        errors = 0
        data = frame.model_dump(mode="json")
        if frame.type in BACKGROUND:
            if len(pending) >= IN_FLIGHT:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(_deliver(session, proxy, session_id, data, batch=batcher))
            pending.add(task)
            task.add_done_callback(pending.discard)
            continue
        if await _deliver(session, proxy, session_id, data, raise_errors=True):
            return


async def _deliver(session: Session, proxy: NodeClient, session_id: str, frame: dict[str, Any],
                   *, raise_errors: bool = False, batch: FrameBatcher | None = None) -> bool:
    """Hand one frame to the NodeProxy (in a batch, if given) and send its replies; True if
    the session closed."""
    try:
        if batch is not None:
            out = await batch.submit(proxy.node_id, proxy.org_id, session_id, frame)
        else:
            out = await proxy.call("on_frame", session_id, frame)
    except AiwmError as e:
        if raise_errors:
            raise
        # The actor or database went away: end the session; the agent reconnects and
        # sends again what it has not had acknowledged.
        log.warning("node session %s: %s failed: %s", session_id, frame["type"], e.detail)
        await session.close(UNAVAILABLE, e.detail)
        return True
    for reply in out["frames"]:
        await session.send(reply)
    if out.get("close"):
        await session.close(*out["close"])
        return True
    return False


async def _pump(session: Session, proxy: NodeClient, session_id: str) -> None:
    try:
        while not session.closed:
            out = await proxy.call("pull", session_id, PULL_WAIT)
            for frame in out.get("frames", []):
                await session.send(frame)
            if out.get("close"):
                await session.close(*out["close"])
                return
    except asyncio.CancelledError:
        raise
    except Exception as e:  # the socket or the actor is gone: end the session
        log.info("node session %s pump ended: %s", session_id, e)
        try:
            await session.close(UNAVAILABLE, "relay lost its node proxy; reconnect")
        except Exception:
            pass
