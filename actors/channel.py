"""A direct socket between the API replicas and a NodeHost, for the node channel's hot path.

A Ray actor call costs 1.4-2.9 ms each way on the two-core machines this runs on (Serve
replica to NodeHost, measured with timestamps at each hop), and a command's round trip
crossed four such legs: REST replica -> NodeHost -> relay (the waiting pull) -> agent ->
relay -> NodeHost -> REST replica. Over this channel each leg is one small write on a TCP
connection that stays open.

The NodeHost actor stays the owner of every NodeProxy; only the transport changes, and
only for calls whose arguments and answers are plain JSON (``HOST_METHODS``). Anything
else, and every call while the channel cannot be reached, goes through Ray as before.

Wire format: a 4-byte big-endian length, then UTF-8 JSON. The first message on a
connection must carry the host's key, a random secret handed out through the actor
(`NodeHost.channel`); without it the connection is closed. Requests are
``{"id", "method", "args", "cid"?}`` (``cid``: the caller's correlation id, see
aiwm/logs.py); answers are ``{"id", "ok"}`` or ``{"id", "error"}``.
:class:`~aiwm.errors.AiwmError` instances travel as ``{"__aiwm_error__": ...}`` and come
out as the same class on the other side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiwm.errors import AiwmError, Unavailable
from aiwm.logs import bound, valid_correlation_id
from aiwm.logs import current as current_correlation

log = logging.getLogger("aiwm.channel")

HOST_METHODS = frozenset({"call", "command", "on_frames"})
MAX_MESSAGE = 64 * 2**20
_LENGTH = struct.Struct(">I")
CONNECT_TIMEOUT = 3.0


# --- encoding --------------------------------------------------------------------------


def _error_classes() -> dict[str, type[AiwmError]]:
    found: dict[str, type[AiwmError]] = {"AiwmError": AiwmError}
    todo = [AiwmError]
    while todo:
        for sub in todo.pop().__subclasses__():
            found[sub.__name__] = sub
            todo.append(sub)
    return found


def _default(o: Any) -> Any:
    if isinstance(o, AiwmError):
        return {"__aiwm_error__": {"type": type(o).__name__, "detail": o.detail,
                                   "extra": o.extra}}
    raise TypeError(f"{type(o).__name__} is not JSON")


def _hook(d: dict[str, Any]) -> Any:
    err = d.get("__aiwm_error__")
    if (len(d) == 1 and isinstance(err, dict) and isinstance(err.get("type"), str)
            and isinstance(err.get("detail"), str)):
        extra = err.get("extra")
        cls = _error_classes().get(err["type"], AiwmError)
        return cls(err["detail"], extra=extra if isinstance(extra, dict) else {})
    return d  # anything else is data, whatever its keys (frames refuse the key anyway)


def encode(message: dict[str, Any]) -> bytes:
    """One framed message; TypeError if something in it is not plain JSON."""
    body = json.dumps(message, default=_default, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"channel message of {len(body)} bytes is over {MAX_MESSAGE}")
    return _LENGTH.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > MAX_MESSAGE:
        raise ValueError(f"channel message of {size} bytes is over {MAX_MESSAGE}")
    decoded = json.loads(await reader.readexactly(size), object_hook=_hook)
    if not isinstance(decoded, dict):
        raise ValueError("a channel message must be a JSON object")
    return decoded


# --- the NodeHost side -------------------------------------------------------------------


class ChannelServer:
    """Serves ``handler(method, args)`` to clients that know the key."""

    def __init__(self, handler: Callable[[str, list[Any]], Awaitable[Any]]) -> None:
        self._handler = handler
        self.key = secrets.token_hex(32)
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str) -> tuple[str, int]:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self.address = (host, int(port))
        assert self.address is not None
        return self.address

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            hello = await asyncio.wait_for(read_message(reader), CONNECT_TIMEOUT)
            if not secrets.compare_digest(str(hello.get("key", "")), self.key):
                log.warning("channel: a connection from %s had the wrong key",
                            writer.get_extra_info("peername"))
                return
            while True:
                request = await read_message(reader)
                task = asyncio.create_task(self._answer(request, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the client went away (or never said hello): its calls end with it
        except ValueError as e:
            log.warning("channel: bad message, closing the connection: %s", e)
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def _answer(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        rid = request.get("id")
        try:
            method, args = request.get("method"), request.get("args")
            if method not in HOST_METHODS or not isinstance(args, list):
                raise AiwmError(f"channel: no method {method!r}")
            with bound(valid_correlation_id(request.get("cid"))):
                answer: dict[str, Any] = {"id": rid, "ok": await self._handler(method, args)}
        except AiwmError as e:
            answer = {"id": rid, "error": e}
        except Exception as e:  # noqa: BLE001 - the caller hears of every failure
            log.exception("channel: %s failed", request.get("method"))
            answer = {"id": rid, "error": AiwmError(f"node host failed: {type(e).__name__}: {e}")}
        try:
            data = encode(answer)
        except (TypeError, ValueError) as e:
            data = encode({"id": rid, "error": AiwmError(f"node host answer not sendable: {e}")})
        if not writer.is_closing():
            writer.write(data)
            await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


# --- the replica side --------------------------------------------------------------------


class NotSent(Exception):
    """The request never left this process: the caller may send it another way."""


class NotJson(NotSent):
    """The call's arguments are not plain JSON (e.g. a NodeIdentity): use Ray for it."""


class NoConnection(NotSent):
    """The host's channel could not be reached."""


class ChannelClient:
    """One connection to one NodeHost, shared by every call of this process."""

    def __init__(self, locate: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._locate = locate  # asks the actor (through Ray) where it listens
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._connecting: asyncio.Lock | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def _connect(self) -> asyncio.StreamWriter:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                where = await self._locate()
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(where["host"], where["port"]), CONNECT_TIMEOUT)
                writer.write(encode({"key": where["key"]}))
                await writer.drain()
            except (OSError, TimeoutError, AiwmError, KeyError) as e:
                raise NoConnection(f"{type(e).__name__}: {e}") from None
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read(reader, writer))
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason = "closed"
        try:
            while True:
                answer = await read_message(reader)
                future = self._pending.pop(answer.get("id"), None)  # type: ignore[arg-type]
                if future is None or future.done():
                    continue
                if "error" in answer:
                    error = answer["error"]
                    future.set_exception(error if isinstance(error, AiwmError)
                                         else AiwmError(str(error)))
                else:
                    future.set_result(answer.get("ok"))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(Unavailable(
                        f"lost the connection to the node host ({reason}); it restarts by "
                        "itself, retry"))

    async def request(self, method: str, args: list[Any]) -> Any:
        """Send one call and wait for its answer. :class:`NotSent` if it could not be sent
        (not JSON, or no connection); :class:`Unavailable` if the connection broke after."""
        self._next += 1
        rid = self._next
        try:
            message: dict[str, Any] = {"id": rid, "method": method, "args": args}
            cid = current_correlation()
            if cid:
                message["cid"] = cid
            data = encode(message)
        except (TypeError, ValueError) as e:
            raise NotJson(str(e)) from None
        writer = await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            writer.write(data)
        except (ConnectionError, RuntimeError) as e:
            self._pending.pop(rid, None)
            raise NoConnection(f"{type(e).__name__}: {e}") from None
        try:
            return await future
        finally:
            self._pending.pop(rid, None)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
