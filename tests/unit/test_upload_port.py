"""serve.upload_port.UploadPort on a real socket, with a small ASGI app in place of the API:
what it serves, idle and half-sent connections, a port another program holds, and the
stop at the start of a replica's shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import httpx
import pytest

import serve.upload_port
from serve.model_files import UPLOAD_PATH
from serve.upload_port import UploadPort, close_upload_ports_on_shutdown
from tests.conftest import free_port


class SlowApp:
    """Reads the whole body, waits for ``gate``, answers 201 with the body's length."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.started.set()
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await self.gate.wait()
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": str(size).encode()})


@pytest.fixture()
async def port() -> Any:
    app = SlowApp()
    listener = UploadPort(app, host="127.0.0.1", port=free_port())
    assert await listener.start() and listener.bound
    yield listener, app
    await listener.stop(timeout=2)
    assert not listener.bound


def url(listener: UploadPort, path: str = UPLOAD_PATH) -> str:
    return f"http://127.0.0.1:{listener._port}{path}"


async def test_it_serves_the_upload_route_alone(port: Any) -> None:
    listener, _ = port
    async with httpx.AsyncClient(timeout=10) as client:
        done = await client.post(url(listener), content=b"x" * 300_000,
                                 headers={"X-Request-Id": "req-1"})
        assert (done.status_code, done.text) == (201, "300000")
        assert done.headers["x-request-id"] == "req-1"  # as the API port returns it
        other = await client.get(url(listener, "/api/models"), headers={"X-Request-Id": "req-2"})
        assert other.status_code == 404
        assert other.headers["content-type"] == "application/problem+json"
        body = other.json()
        assert body["code"] == "not_found" and "upload port" in body["detail"]
        assert body["correlationId"] == other.headers["x-request-id"] == "req-2"
        fresh = await client.get(url(listener, "/"))
        assert fresh.json()["correlationId"] == fresh.headers["x-request-id"] != ""


async def test_a_connection_that_sends_no_headers_in_time_is_closed(
        port: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    listener, _ = port
    monkeypatch.setattr(serve.upload_port, "HEADERS_TIMEOUT", 0.3)
    loop = asyncio.get_running_loop()
    for opening in (b"", b"POST /api/models/upload HTTP/1.1\r\nHost: x\r\n"):  # idle; half
        reader, writer = await asyncio.open_connection("127.0.0.1", listener._port)
        writer.write(opening)
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server hung up
        assert loop.time() - started < 3
        writer.close()
    # A whole request in time is served as usual, on the same kind of connection.
    reader, writer = await asyncio.open_connection("127.0.0.1", listener._port)
    writer.write(b"POST /api/models/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 201")
    writer.close()


async def test_stop_accepting_refuses_new_uploads_and_finishes_those_under_way(
        port: Any) -> None:
    listener, app = port
    app.gate.clear()
    async with httpx.AsyncClient(timeout=10) as client:
        under_way = asyncio.create_task(client.post(url(listener), content=b"y" * 1000))
        await asyncio.wait_for(app.started.wait(), 5)
        listener.stop_accepting()
        assert not serve.upload_port._OPEN and not listener.bound
        await asyncio.sleep(0.3)  # uvicorn looks at its flag every 0.1 s
        with pytest.raises(httpx.ConnectError):
            await client.post(url(listener), content=b"z")
        app.gate.set()
        done = await under_way
        assert (done.status_code, done.text) == (201, "1000")


async def test_a_port_another_program_holds_is_passed_over_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody may share it
    holder.listen()
    try:
        listener = UploadPort(SlowApp(), host="127.0.0.1", port=holder.getsockname()[1])
        with caplog.at_level(logging.WARNING, logger="aiwm.api"):
            assert await listener.start() is False
        assert not listener.bound and "cannot be bound" in caplog.text
        await listener.stop()  # nothing to stop
    finally:
        holder.close()


async def test_the_replicas_share_the_port() -> None:
    number = free_port()
    first = UploadPort(SlowApp(), host="127.0.0.1", port=number)
    second = UploadPort(SlowApp(), host="127.0.0.1", port=number)
    try:
        assert await first.start() and await second.start()
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(4):
                assert (await client.post(url(first), content=b"abc")).text == "3"
    finally:
        await first.stop(timeout=2)
        await second.stop(timeout=2)


async def test_a_replica_shutdown_closes_the_port_first(
        port: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve._private import replica

    listener, _ = port
    seen: list[bool] = []

    async def original(self: Any) -> None:  # Serve's own: the drain, then the rest
        seen.append(listener in serve.upload_port._OPEN)

    monkeypatch.setattr(replica.Replica, "_perform_graceful_shutdown", original)
    assert close_upload_ports_on_shutdown() and close_upload_ports_on_shutdown()  # once
    # The way Serve's controller stops a replica: its public method, which runs the
    # private one (a Replica never initialised: only the two fields that method reads).
    stand_in = replica.Replica.__new__(replica.Replica)
    stand_in._graceful_shutdown_task = None
    stand_in._event_loop = asyncio.get_running_loop()
    await replica.Replica.perform_graceful_shutdown(stand_in)
    assert seen == [False]  # closed before Serve's drain began
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(timeout=5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(url(listener), content=b"z")
