"""serve.ingress.remember_routes: the replica's route naming, once per method and path."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from ray.serve._private import replica

from serve.ingress import remember_routes


class _Replica:
    _route_prefix = "/"

    def __init__(self, app: FastAPI) -> None:
        self._user_callable_asgi_app = app


def _scope(method: str, path: str) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": "",
            "headers": [], "query_string": b""}


def test_routes_are_named_as_before_and_matched_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = replica.Replica._determine_http_route

    def counting(self: Any, scope: dict[str, Any]) -> str:
        calls.append(scope["path"])
        return original(self, scope)  # type: ignore[no-any-return]

    monkeypatch.setattr(replica.Replica, "_determine_http_route", counting)
    app = FastAPI()

    @app.get("/api/items/{item_id}")
    def item(item_id: str) -> str:
        return item_id

    @app.post("/api/items")
    def create() -> str:
        return "made"

    remember_routes(size=2)
    determine = replica.Replica._determine_http_route
    assert determine is not counting and getattr(determine, "_aiwm_routes", False)
    me = _Replica(app)
    assert determine(me, _scope("GET", "/api/items/a")) == "/api/items/{item_id}"
    assert determine(me, _scope("GET", "/api/items/a")) == "/api/items/{item_id}"
    assert calls == ["/api/items/a"]  # the second answer was remembered
    assert determine(me, _scope("POST", "/api/items")) == "/api/items"
    assert determine(me, _scope("GET", "/api/items/b")) == "/api/items/{item_id}"
    assert determine(me, _scope("GET", "/api/items/a")) == "/api/items/{item_id}"
    assert calls == ["/api/items/a", "/api/items", "/api/items/b", "/api/items/a"]  # bounded
    remember_routes()  # a second call does not wrap twice
    assert replica.Replica._determine_http_route is determine
