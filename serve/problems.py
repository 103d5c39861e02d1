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
from starlette.routing import compile_path

from aiwm.errors import AiwmError, Unavailable, field_errors
from aiwm.store.documents import UNREACHABLE
from serve.limits import problem_body

log = logging.getLogger("aiwm.api")
MEDIA_TYPE = "application/problem+json"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
               413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limited"}


# The body of every problem: components/schemas/Problem in the OpenAPI document (see
# install(); FastAPI lists only the models it documents as application/json).
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "description": "stable: switch on this, never on detail"},
        "correlationId": {"type": "string", "description": "the request's X-Request-Id: "
                          "every log line about it carries this id"},
        "errors": {"type": "array", "description": "each bad field (422)", "items": {
            "type": "object", "required": ["field", "message", "type"],
            "properties": {"field": {"type": "string"}, "message": {"type": "string"},
                           "type": {"type": "string"}}}},
    },
}
_MEANINGS = {
    401: "Missing, invalid or expired bearer token (unauthorized)",
    403: "The token's role does not allow this (forbidden)",
    404: "No such resource in the caller's org (not_found)",
    409: "Conflicts with the resource's current state (version_conflict, already_exists, "
         "in_use, invalid_state)",
    413: "Request body over its size limit (payload_too_large)",
    422: "Invalid input; `errors` lists each bad field (validation_failed, invalid_reference)",
    503: "A dependency (database, actor) is down; retry after Retry-After (unavailable)",
}
AUTHENTICATED = (401, 403, 422, 503)  # what any route behind a bearer token may answer


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the problems a route answers with."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {status: {"description": _MEANINGS[status], "content": {MEDIA_TYPE: {"schema": schema}}}
            for status in statuses}


def problem(
    status: int, code: str, title: str, detail: str, **extra: Any
) -> JSONResponse:
    body = {**problem_body(status, code, title, detail), **extra}
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def from_error(e: AiwmError) -> JSONResponse:
    return problem(e.status, e.code, e.title, e.detail, **e.extra)


def invalid(errors: list[dict[str, str]]) -> JSONResponse:
    """The 422 for bad input; ``errors`` as :func:`aiwm.errors.field_errors` makes them."""
    detail = "; ".join(f"{x['field']}: {x['message']}" for x in errors[:5])
    return problem(422, "validation_failed", "Validation failed", detail, errors=errors)


def allowed_methods(request: Request, named: str) -> str:
    """A 405's ``Allow``: the methods the router ``named`` (those of the first route
    whose path matched) and those of every documented operation whose path matches too,
    since each method of a path is a route of its own."""
    path = request.url.path
    methods = {method.strip() for method in named.split(",") if method.strip()}
    methods |= {method.upper() for template, operations in request.app.openapi()["paths"].items()
                if compile_path(template)[0].match(path) for method in operations}
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``, and the Problem schema in its OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            document.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(AiwmError)
    async def _domain(request: Request, e: AiwmError) -> JSONResponse:
        return from_error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return invalid(field_errors(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400 and isinstance(e.__cause__, UnicodeDecodeError):
            # FastAPI's answer to a JSON body that is not UTF-8; other bad JSON is a 422
            return invalid([{"field": "body", "message": "not UTF-8 JSON", "type": "json_invalid"}])
        code = _HTTP_CODES.get(e.status_code, f"http_{e.status_code}")
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /api-docs"
        response = problem(e.status_code, code, code.replace("_", " ").capitalize(), detail)
        response.headers.update(e.headers or {})
        if e.status_code == 405:
            response.headers["Allow"] = allowed_methods(request, response.headers.get("Allow", ""))
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        if isinstance(e, UNREACHABLE):
            return from_error(Unavailable(f"database unreachable: {type(e).__name__}"))
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal", "Internal error",
                       "an unexpected error occurred; it has been logged")
