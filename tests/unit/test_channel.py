"""actors/channel.py: the NodeHost's direct socket, over real TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from actors.channel import (
    ChannelClient,
    ChannelServer,
    NoConnection,
    NotJson,
    encode,
    read_message,
)
from aiwm.errors import AiwmError, NotFound, Unavailable, ValidationFailed


class Host:
    """Stands in for NodeHost: the channel calls its methods by name."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[Any]]] = []
        self.release = asyncio.Event()

    async def handle(self, method: str, args: list[Any]) -> Any:
        self.seen.append((method, args))
        if method == "command" and args[0] == "missing":
            raise NotFound("no node 'missing'")
        if method == "command" and args[0] == "crash":
            raise RuntimeError("kaboom")
        if method == "command" and args[0] == "slow":
            await self.release.wait()
        if method == "on_frames":
            return [{"error": ValidationFailed("bad", extra={"errors": [1]})}, {"frames": []}]
        return {"echo": args}


@pytest.fixture()
async def served() -> AsyncIterator[tuple[Host, ChannelServer]]:
    host = Host()
    server = ChannelServer(host.handle)
    await server.start("127.0.0.1")
    yield host, server
    await server.close()


def _client(server: ChannelServer, key: str | None = None) -> ChannelClient:
    async def locate() -> dict[str, Any]:
        assert server.address is not None
        return {"host": server.address[0], "port": server.address[1], "key": key or server.key}

    return ChannelClient(locate)


async def test_calls_answers_and_errors_cross_as_themselves(
        served: tuple[Host, ChannelServer]) -> None:
    host, server = served
    client = _client(server)
    assert await client.request("command", ["ok", {"a": [1, 2]}, 1.5]) == {
        "echo": ["ok", {"a": [1, 2]}, 1.5]}
    with pytest.raises(NotFound, match="missing"):
        await client.request("command", ["missing"])
    with pytest.raises(AiwmError, match="RuntimeError: kaboom"):
        await client.request("command", ["crash"])
    answers = await client.request("on_frames", [])
    assert isinstance(answers[0]["error"], ValidationFailed)
    assert answers[0]["error"].extra == {"errors": [1]} and answers[1] == {"frames": []}
    with pytest.raises(AiwmError, match="no method"):
        await client.request("attach", [])  # only the hot-path methods are served
    assert [m for m, _ in host.seen] == ["command", "command", "command", "on_frames"]
    await client.close()


async def test_concurrent_calls_share_one_connection(served: tuple[Host, ChannelServer]) -> None:
    host, server = served
    client = _client(server)
    slow = asyncio.ensure_future(client.request("command", ["slow"]))
    fast = [await client.request("command", [f"n{i}"]) for i in range(3)]
    assert [f["echo"][0] for f in fast] == ["n0", "n1", "n2"]  # not stuck behind the slow one
    assert not slow.done()
    host.release.set()
    assert (await slow) == {"echo": ["slow"]}
    await client.close()


def test_only_well_formed_error_objects_decode_as_errors() -> None:
    import json

    from actors.channel import _hook

    decoded = json.loads(encode({"x": NotFound("gone", extra={"a": 1})})[4:], object_hook=_hook)
    assert isinstance(decoded["x"], NotFound) and decoded["x"].extra == {"a": 1}
    for data in ({"__aiwm_error__": 1}, {"__aiwm_error__": {"type": 5}},
                 {"__aiwm_error__": {"type": "NotFound", "detail": "d"}, "more": 1}):
        assert json.loads(json.dumps(data), object_hook=_hook) == data


async def test_not_json_is_not_sent(served: tuple[Host, ChannelServer]) -> None:
    host, server = served

    @dataclass
    class Identity:
        node_id: str

    with pytest.raises(NotJson):
        await _client(server).request("call", ["n", "o", "attach", "s", Identity("n")])
    assert host.seen == []


async def test_wrong_key_or_no_server_means_no_connection(
        served: tuple[Host, ChannelServer]) -> None:
    host, server = served
    intruder = _client(server, key="0" * 64)
    with pytest.raises((Unavailable, NoConnection)):
        await intruder.request("command", ["x"])
    assert host.seen == []
    await server.close()
    assert server.address is not None

    async def gone() -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": server.address[1], "key": server.key}  # type: ignore[index]

    with pytest.raises(NoConnection):
        await ChannelClient(gone).request("command", ["x"])


async def test_a_lost_connection_fails_waiting_calls_and_the_next_call_reconnects(
        served: tuple[Host, ChannelServer]) -> None:
    host, server = served
    client = _client(server)
    waiting = asyncio.ensure_future(client.request("command", ["slow"]))
    await asyncio.sleep(0.05)
    assert client._writer is not None
    client._writer.transport.abort()  # the connection drops mid-call
    with pytest.raises(Unavailable, match="lost the connection"):
        await waiting
    host.release.set()
    assert await client.request("command", ["again"]) == {"echo": ["again"]}
    await client.close()


async def test_garbage_on_the_wire_closes_only_that_connection(
        served: tuple[Host, ChannelServer]) -> None:
    host, server = served
    assert server.address is not None
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(encode({"key": server.key}) + b"\x00\x00\x00\x05[1,2]")
    await writer.drain()
    assert await reader.read() == b""  # closed by the server
    with pytest.raises(asyncio.IncompleteReadError):
        await read_message(reader)
    assert await _client(server).request("command", ["fine"]) == {"echo": ["fine"]}
