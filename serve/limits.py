"""Pure ASGI middlewares that bound what one request may cost: its body's size (413),
how often one token may call (429) and how long a handler may take to answer (504)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aiwm.logs import current as current_correlation


class BodyLimit:
    """Buffer the body up to ``max_bytes``; past that, answer 413 and never call the app."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, streaming: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streaming = streaming  # paths whose route streams the body under its own limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS")
                or scope["path"] in self.streaming):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        raw = json.dumps(problem_body(
            413, "payload_too_large", "Payload too large",
            f"request body is over the {self.max_bytes}-byte limit (AIWM_MAX_BODY_BYTES)")).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(raw)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": raw})


def problem_body(status: int, code: str, title: str, detail: str) -> dict[str, Any]:
    """The members every problem+json body has (serve/problems.py adds a code's extras),
    with the request's correlation id."""
    body: dict[str, Any] = {"type": f"urn:aiwm:error:{code}", "title": title, "status": status,
                            "code": code, "detail": detail}
    cid = current_correlation()
    if cid:
        body["correlationId"] = cid
    return body


async def send_problem(send: Send, status: int, code: str, title: str, detail: str,
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
    raw = json.dumps(problem_body(status, code, title, detail)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(raw)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": raw})


class TokenBuckets:
    """A token bucket per caller: ``rate`` requests a second, bursts of up to ``burst``.

    Callers are keyed by a digest of their bearer token, verified or not (a flood of bad
    tokens is limited like any other); at most ``size`` callers are remembered, the least
    recently seen forgotten first (a forgotten caller starts again with a full bucket)."""

    def __init__(self, rate: float, burst: int, *, size: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._size, self._clock = rate, burst, size, clock
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def take(self, token: str) -> float:
        """0 if the call may go ahead, else the seconds until it may."""
        key = hashlib.sha256(token.encode()).digest()[:16]
        now = self._clock()
        level, at = self._buckets.pop(key, (float(self.burst), now))
        level = min(float(self.burst), level + (now - at) * self.rate)
        wait = 0.0
        if level >= 1.0:
            level -= 1.0
        else:
            wait = (1.0 - level) / self.rate
        self._buckets[key] = (level, now)
        while len(self._buckets) > self._size:
            self._buckets.popitem(last=False)
        return wait


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class RequestLimits:
    """Per-token rate limiting (429 with Retry-After) and a time limit on handlers (504).

    Only requests that carry a bearer token are rate limited: health, the docs, signed
    file downloads and node sockets are not. The time limit runs until the response
    starts (a download that has started is not cut off) and does not apply to the paths
    in ``untimed``, which wait as long as their caller asked, within their own caps.
    A handler cut off by the limit may still finish what it started (a write through an
    actor, say): 504 means the outcome is unknown, as for any timeout."""

    def __init__(self, app: ASGIApp, *, rate: float, burst: int, timeout: float,
                 untimed: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.app = app
        self.buckets = TokenBuckets(rate, burst, clock=clock) if rate > 0 else None
        self.timeout = timeout
        self.untimed = re.compile("|".join(f"(?:{p})" for p in untimed)) if untimed else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is not None and self.buckets is not None:
            wait = self.buckets.take(token)
            if wait > 0:
                await send_problem(send, 429, "rate_limited", "Too many requests",
                                   f"over {self.buckets.rate:g} requests/s (bursts of "
                                   f"{self.buckets.burst}) for this token (AIWM_RATE_LIMIT); "
                                   f"retry after {wait:.2f}s",
                                   [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
                return
        if self.timeout <= 0 or (self.untimed is not None
                                 and self.untimed.fullmatch(scope["path"])):
            await self.app(scope, receive, send)
            return
        await self._timed(scope, receive, send)

    async def _timed(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A timer that cancels this very task, rather than a task per request: the limit
        # costs one timer handle on the hot path (bench/rest.py).
        task = asyncio.current_task()
        assert task is not None
        started = fired = False

        def expire() -> None:
            nonlocal fired
            if not started:
                fired = True
                task.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout, expire)

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                timer.cancel()
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            if not fired or task.uncancel() > 0:
                raise  # cancelled from outside (the client went away, shutdown): go on
        else:
            return
        finally:
            timer.cancel()
        await send_problem(send, 504, "request_timeout", "Request timeout",
                           f"no answer within {self.timeout:g}s (AIWM_REQUEST_TIMEOUT); "
                           "a change it was making may or may not have been applied")
