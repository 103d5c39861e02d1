"""Every REST request runs under a correlation id (see aiwm/logs.py).

The id is the request's ``X-Request-Id``: the client's own when it sends a usable one,
else the one Ray Serve's ingress put there, else a new one (so it is also the
``request_id`` of Serve's own log lines). Everything logged while the
request is handled carries it, in this replica and in the actors and node agents the
request reaches; the response returns it in ``X-Request-Id`` (and problem bodies in
``correlationId``), so a caller can quote it and an operator can grep for it.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aiwm.logs import CORRELATION_HEADER, bound, new_correlation_id, valid_correlation_id

access_log = logging.getLogger("aiwm.access")
_HEADER = CORRELATION_HEADER.encode()


class Correlation:
    """Pure ASGI: binds the correlation id; with ``access_log`` logs a line per request.

    ``echo``: return the id in the response. Under Ray Serve its own middleware already
    returns the request's X-Request-Id, so only an id this middleware made or replaced
    (one longer than 100 characters, or not printable ASCII) is added there."""

    def __init__(self, app: ASGIApp, *, access_log: bool = False, echo: bool = True) -> None:
        self.app = app
        self.access_log = access_log
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for key, value in scope["headers"]:
            if key == _HEADER:
                given = valid_correlation_id(value.decode("latin-1"))
                break
        cid = given or new_correlation_id()
        if given is None:  # handlers and Serve's own request record see the same id
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != _HEADER] + [
                (_HEADER, cid.encode())]
        started = time.perf_counter()
        status = 0
        echo = self.echo or given is None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if echo:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (_HEADER, cid.encode())]}
            await send(message)

        with bound(cid):
            failed = False
            try:
                await self.app(scope, receive, send_with_id)
            except BaseException:
                failed = True
                raise
            finally:
                if self.access_log or status >= 500 or failed:
                    level = logging.INFO if 0 < status < 500 and not failed else logging.WARNING
                    access_log.log(level, "%s %s %s", scope["method"], scope["path"],
                                   status or "no response", extra={
                                       "method": scope["method"], "path": scope["path"],
                                       "status": status,
                                       "ms": round((time.perf_counter() - started) * 1000, 2)})
