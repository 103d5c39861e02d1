"""The API edge's error mapping: every failure becomes ``application/problem+json``.

Body: ``{type, title, status, detail, code, errors?, ...extra}``. ``code`` is stable;
clients switch on it, never on ``detail``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiwm.errors import AiwmError, Unavailable, field_errors
from aiwm.store.documents import UNREACHABLE

log = logging.getLogger("aiwm.api")
MEDIA_TYPE = "application/problem+json"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
               413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limited"}


def problem(
    status: int, code: str, title: str, detail: str, **extra: Any
) -> JSONResponse:
    body = {"type": f"urn:aiwm:error:{code}", "title": title, "status": status,
            "detail": detail, "code": code, **extra}
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def from_error(e: AiwmError) -> JSONResponse:
    return problem(e.status, e.code, e.title, e.detail, **e.extra)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(AiwmError)
    async def _domain(request: Request, e: AiwmError) -> JSONResponse:
        return from_error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = field_errors(list(e.errors()))
        detail = "; ".join(f"{x['field']}: {x['message']}" for x in errors[:5])
        return problem(422, "validation_failed", "Validation failed", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(e.status_code, f"http_{e.status_code}")
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /api-docs"
        return problem(e.status_code, code, code.replace("_", " ").capitalize(), detail)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        if isinstance(e, UNREACHABLE):
            return from_error(Unavailable(f"database unreachable: {type(e).__name__}"))
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal", "Internal error",
                       "an unexpected error occurred; it has been logged")
