"""serve.limits.RequestLimits: per-token rate limits (429) and handler time limits (504)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from serve.limits import RequestLimits, TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _app(*, rate: float = 0, burst: int = 1, timeout: float = 0,
         clock: Clock | None = None) -> FastAPI:
    app = FastAPI()

    @app.get("/fast")
    async def fast() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(1.0)
        return {"ok": True}

    @app.get("/wait/slow")
    async def waiting() -> dict[str, bool]:
        await asyncio.sleep(0.3)
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(3):
                await asyncio.sleep(0.1)
                yield b"x"
        return StreamingResponse(body())

    app.add_middleware(RequestLimits, rate=rate, burst=burst, timeout=timeout,
                       untimed=(r"/wait/.*",), clock=clock or Clock())
    return app


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_a_token_over_its_rate_gets_429_with_retry_after() -> None:
    clock = Clock()
    async with _client(_app(rate=2, burst=3, clock=clock)) as c:
        a = {"Authorization": "Bearer token-a"}
        assert [(await c.get("/fast", headers=a)).status_code for _ in range(3)] == [200] * 3
        refused = await c.get("/fast", headers=a)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "rate_limited" and refused.headers["retry-after"] == "1"
        # Another token, and calls without one (health, docs, signed files), go ahead.
        assert (await c.get("/fast", headers={"Authorization": "Bearer token-b"})).status_code == 200
        assert (await c.get("/fast")).status_code == 200
        clock.now += 0.5  # one more request's worth at 2/s
        assert (await c.get("/fast", headers=a)).status_code == 200
        assert (await c.get("/fast", headers=a)).status_code == 429


def test_buckets_refill_to_the_burst_and_forget_the_oldest() -> None:
    clock = Clock()
    buckets = TokenBuckets(10, 2, size=2, clock=clock)
    assert [buckets.take("a") for _ in range(2)] == [0, 0]
    assert buckets.take("a") == 0.1  # one request at 10/s
    clock.now += 60  # a long pause refills to the burst, not beyond
    assert [buckets.take("a") > 0 for _ in range(3)] == [False, False, True]
    buckets.take("b")
    buckets.take("c")  # "a" is forgotten: it starts again with a full bucket
    assert buckets.take("a") == 0 and len(buckets._buckets) == 2


async def test_a_slow_handler_gets_504_but_untimed_and_started_answers_finish() -> None:
    async with _client(_app(timeout=0.2)) as c:
        slow = await c.get("/slow")
        assert slow.status_code == 504 and slow.json()["code"] == "request_timeout"
        assert (await c.get("/fast")).json() == {"ok": True}
        assert (await c.get("/wait/slow")).status_code == 200  # waits as long as asked
        streamed = await c.get("/stream")  # started in time; its body takes 0.3 s
        assert streamed.status_code == 200 and streamed.content == b"xxx"


async def test_limits_off() -> None:
    async with _client(_app(rate=0, timeout=0)) as c:
        a = {"Authorization": "Bearer a"}
        assert {(await c.get("/fast", headers=a)).status_code for _ in range(50)} == {200}
        assert (await c.get("/slow")).status_code == 200
