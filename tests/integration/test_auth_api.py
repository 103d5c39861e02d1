"""Bearer tokens, roles and org isolation, over HTTP."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable

import httpx
import pytest

from aiwm.auth import issue_token
from aiwm.settings import Settings
from tests.integration.test_crud import make_instruction


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _get(cluster: str, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(f"{cluster}/api{path}", headers=headers, timeout=30)


def test_missing_expired_and_forged_tokens_get_401(cluster: str, settings: Settings) -> None:
    assert _get(cluster, "/instructions", None).status_code == 401
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    expired, _ = issue_token(secret=settings.secret(), sub="u", org_id="org-a", roles=["admin"],
                             expires_in=60, now=lambda: past)
    forged, _ = issue_token(secret="not-the-secret-but-just-as-long-as-one", sub="u",
                            org_id="org-a", roles=["admin"], expires_in=60)
    claims = {"sub": "u", "orgId": "org-a", "roles": ["admin"], "exp": 4102444800}
    unsigned = _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(claims) + "."
    for token, needle in ((expired, "expired"), (forged, "signature"), (unsigned, "invalid"),
                          ("abc.def.ghi", "invalid"), ("", "missing")):
        if not token:
            r = httpx.get(f"{cluster}/api/instructions", headers={"Authorization": "Bearer"})
            assert r.status_code == 401 and "missing" in r.json()["detail"]
            continue
        r = _get(cluster, "/instructions", token)
        assert r.status_code == 401, token
        assert r.json()["code"] == "unauthorized" and needle in r.json()["detail"]
    bad_scheme = httpx.get(f"{cluster}/api/instructions", headers={"Authorization": "Basic eDp5"})
    assert bad_scheme.status_code == 401


def test_health_and_docs_need_no_token(cluster: str) -> None:
    health = httpx.get(f"{cluster}/api/health")
    assert health.status_code == 200
    stored = health.json()["checks"]["objectStore"]
    assert stored["status"] == "up" and stored["backend"] == "local" and stored["freeBytes"] > 0
    docs = httpx.get(f"{cluster}/api-docs")
    assert docs.status_code == 200 and "/api-docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()  # usable on a site without Internet
    script = httpx.get(f"{cluster}/api-docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    schema = httpx.get(f"{cluster}/api/openapi.json").json()
    assert "/api/instructions" in schema["paths"] and "/api/agents/{doc_id}" in schema["paths"]


@pytest.mark.parametrize("method,path,body", [
    ("post", "/instructions", {"name": "x", "systemPrompt": "y"}),
    ("patch", "/instructions/ins-1", {"name": "x"}),
    ("delete", "/instructions/ins-1", None),
])
def test_viewer_reads_but_cannot_write(
    client_for: Callable[..., httpx.Client], method: str, path: str, body: dict | None
) -> None:
    viewer = client_for("viewer", "org-a")
    assert viewer.get("/instructions").status_code == 200
    r = viewer.request(method.upper(), path, json=body)
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    assert "operator" in r.json()["detail"]


def test_only_admins_issue_tokens_and_only_for_their_org(
    client_for: Callable[..., httpx.Client], cluster: str
) -> None:
    operator = client_for("operator", "org-a")
    assert operator.post("/tokens", json={"sub": "bob", "roles": ["viewer"]}).status_code == 403
    admin = client_for("admin", "org-a")
    r = admin.post("/tokens", json={"sub": "bob", "roles": ["viewer"], "expiresIn": 120})
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["orgId"] == "org-a" and issued["expiresIn"] == 120
    assert _get(cluster, "/instructions", issued["token"]).status_code == 200
    other = admin.post("/tokens", json={"sub": "eve", "roles": ["admin"], "orgId": "org-b"})
    assert other.status_code == 403


def test_orgs_never_see_or_change_each_other(
    client_for: Callable[..., httpx.Client], unique: Callable[[str], str]
) -> None:
    org_a, org_b = client_for("operator", unique("org-iso-a")), client_for("operator", unique("org-iso-b"))
    ins = make_instruction(org_a, unique)
    assert org_b.get(f"/instructions/{ins['id']}").status_code == 404
    assert org_b.get("/instructions").json()["total"] == 0
    assert org_b.patch(f"/instructions/{ins['id']}", json={"name": "hijack"}).status_code == 404
    assert org_b.put(f"/instructions/{ins['id']}",
                     json={"name": "hijack", "systemPrompt": "x"}).status_code == 404
    assert org_b.delete(f"/instructions/{ins['id']}").status_code == 404
    still = org_a.get(f"/instructions/{ins['id']}").json()
    assert still["name"] == ins["name"] and still["version"] == 1


def test_bad_bodies_get_422_with_every_bad_field(api: httpx.Client) -> None:
    r = api.post("/agents", json={"name": "", "llmConfig": {"temperature": 5}, "colour": "red",
                                  "toolIds": "not-a-list"})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    fields = {e["field"] for e in r.json()["errors"]}
    assert fields == {"body.name", "body.llmConfig.temperature", "body.colour", "body.toolIds"}
    r = api.post("/agents", content=b'{"name": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["type"] == "json_invalid"
    r = api.post("/agents", json=["not", "an", "object"])
    assert r.status_code == 422
    r = api.patch("/instructions/x", json={"name": "a"}, headers={"If-Match": "soon"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "header.if-match"


def test_oversized_body_is_refused_with_413(api: httpx.Client, settings: Settings) -> None:
    big = "x" * (settings.aiwm_max_body_bytes + 1)
    r = api.post("/instructions", json={"name": "big", "systemPrompt": big})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


def test_unknown_route_is_a_problem_document(api: httpx.Client) -> None:
    r = api.get("/does-not-exist")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
