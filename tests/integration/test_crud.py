"""CRUD over HTTP through Ray Serve for every catalog entity, against SecantusDB."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest


def make_node(api: httpx.Client, unique: Callable[[str], str], **extra: Any) -> dict:
    r = api.post("/nodes", json={"name": unique("gpu"), "hostname": "gpu-01.local", **extra})
    assert r.status_code == 201, r.text
    return r.json()


def make_model(api: httpx.Client, unique: Callable[[str], str], **extra: Any) -> dict:
    r = api.post("/models", json={"name": unique("llama"), "repository": "org/llama", **extra})
    assert r.status_code == 201, r.text
    return r.json()


def make_instruction(api: httpx.Client, unique: Callable[[str], str], **extra: Any) -> dict:
    body = {"name": unique("support"), "systemPrompt": "Be helpful.", "guidelines": ["Be brief"]}
    r = api.post("/instructions", json={**body, **extra})
    assert r.status_code == 201, r.text
    return r.json()


def bodies(api: httpx.Client, unique: Callable[[str], str]) -> dict[str, tuple[dict, dict]]:
    """For each entity: a valid create body and a valid PATCH."""
    node, model = make_node(api, unique), make_model(api, unique)
    conv = api.post("/conversations", json={"title": unique("chat")}).json()
    return {
        "nodes": ({"name": unique("n"), "role": "worker", "tags": ["a100"]}, {"role": "proxy"}),
        "models": ({"name": unique("m"), "type": "embedding"}, {"format": "gguf"}),
        "deployments": (
            {"name": unique("d"), "modelId": model["id"], "nodeId": node["id"],
             "image": "vllm/vllm-openai", "resources": {"gpus": 1}},
            {"port": 9000},
        ),
        "instructions": ({"name": unique("i"), "systemPrompt": "x"}, {"isActive": False}),
        "tools": ({"name": unique("t"), "endpoint": "http://127.0.0.1:9/mcp"}, {"transport": "sse"}),
        "agents": ({"name": unique("a")}, {"status": "inactive"}),
        "conversations": ({"title": unique("c")}, {"status": "archived"}),
        "messages": ({"conversationId": conv["id"], "role": "user", "content": "hi"},
                     {"content": "hello"}),
    }


def contains(actual: Any, expected: Any) -> bool:
    """``expected`` with defaults filled in by the server still matches ``actual``."""
    if isinstance(expected, dict):
        return all(contains(actual.get(k), v) for k, v in expected.items())
    return bool(actual == expected)


ENTITIES = ["nodes", "models", "deployments", "instructions", "tools", "agents",
            "conversations", "messages"]


# Deployments: creating and deleting one are executions (test_deployment_crud below).
@pytest.mark.parametrize("name", [e for e in ENTITIES if e != "deployments"])
def test_crud_round_trip(api: httpx.Client, unique: Callable[[str], str], name: str) -> None:
    create, patch = bodies(api, unique)[name]
    r = api.post(f"/{name}", json=create)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["version"] == 1 and doc["orgId"] == "org-a" and doc["createdBy"] == "tester"
    assert doc["deletedAt"] is None and doc["createdAt"] == doc["updatedAt"]

    got = api.get(f"/{name}/{doc['id']}")
    assert got.status_code == 200 and got.json() == doc
    assert list(got.json()) == list(doc)  # same field order as the write response

    field, value = next(iter(patch.items()))
    r = api.patch(f"/{name}/{doc['id']}", json={**patch, "version": 1})
    assert r.status_code == 200, r.text
    assert r.json()[field] == value and r.json()["version"] == 2
    assert all(contains(r.json()[k], v) for k, v in create.items() if k not in patch)

    listed = api.get(f"/{name}", params={"limit": 100}).json()
    assert doc["id"] in {d["id"] for d in listed["data"]} and listed["total"] >= 1

    r = api.delete(f"/{name}/{doc['id']}")
    assert r.status_code == 200 and r.json()["deletedAt"] is not None
    assert api.get(f"/{name}/{doc['id']}").status_code == 404
    listed = api.get(f"/{name}", params={"limit": 100}).json()
    assert doc["id"] not in {d["id"] for d in listed["data"]}


def test_deployment_crud(api: httpx.Client, unique: Callable[[str], str]) -> None:
    create, patch = bodies(api, unique)["deployments"]
    r = api.post("/deployments", json=create)
    assert r.status_code == 201, r.text
    dep, execution = r.json()["deployment"], r.json()["execution"]
    assert dep["version"] == 1 and dep["createdBy"] == "tester" and dep["executionId"] == execution["id"]
    assert execution["resource"] == {"type": "deployment", "id": dep["id"]}
    assert all(contains(dep[k], v) for k, v in create.items())
    got = api.get(f"/deployments/{dep['id']}").json()
    r = api.patch(f"/deployments/{dep['id']}", json={**patch, "version": got["version"]})
    assert r.status_code == 200, r.text
    field, value = next(iter(patch.items()))
    assert r.json()[field] == value and r.json()["version"] == 2  # status changes keep the version
    listed = api.get("/deployments", params={"limit": 100}).json()
    assert dep["id"] in {d["id"] for d in listed["data"]}
    # Its node never connects: cancel the deploy, then remove it without a stop.
    assert api.delete(f"/executions/{execution['id']}").json()["status"] == "cancelled"
    r = api.delete(f"/deployments/{dep['id']}", params={"force": "true"})
    assert r.status_code == 202 and r.json()["deployment"]["deletedAt"] is not None
    assert api.get(f"/deployments/{dep['id']}").status_code == 404


def test_put_replaces_every_writable_field(api: httpx.Client, unique: Callable[[str], str]) -> None:
    ins = make_instruction(api, unique, tags=["keep?"], description="old")
    body = {"name": ins["name"], "systemPrompt": "New prompt", "guidelines": []}
    r = api.put(f"/instructions/{ins['id']}", json=body, headers={"If-Match": "1"})
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["systemPrompt"] == "New prompt" and new["version"] == 2
    assert new["tags"] == [] and new["description"] is None  # PUT resets what it omits
    assert new["createdAt"] == ins["createdAt"] and new["id"] == ins["id"]


def test_stale_version_is_refused_and_nothing_is_lost(
    api: httpx.Client, unique: Callable[[str], str]
) -> None:
    ins = make_instruction(api, unique)
    first = api.patch(f"/instructions/{ins['id']}", json={"description": "A"},
                      headers={"If-Match": '"1"'})
    assert first.status_code == 200
    stale = api.patch(f"/instructions/{ins['id']}", json={"description": "B"},
                      headers={"If-Match": "1"})
    assert stale.status_code == 409
    assert stale.headers["content-type"].startswith("application/problem+json")
    assert stale.json()["code"] == "version_conflict" and stale.json()["currentVersion"] == 2
    stale_delete = api.delete(f"/instructions/{ins['id']}", headers={"If-Match": "1"})
    assert stale_delete.status_code == 409
    now = api.get(f"/instructions/{ins['id']}").json()
    assert now["description"] == "A" and now["version"] == 2 and now["deletedAt"] is None


def test_patch_that_would_break_the_document_is_refused(
    api: httpx.Client, unique: Callable[[str], str]
) -> None:
    ins = make_instruction(api, unique)
    r = api.patch(f"/instructions/{ins['id']}", json={"systemPrompt": None})
    assert r.status_code == 422
    assert any(e["field"] == "body.systemPrompt" for e in r.json()["errors"])
    assert api.get(f"/instructions/{ins['id']}").json()["version"] == 1


def test_pagination_filters_sort_and_search(
    client_for: Callable[..., httpx.Client], unique: Callable[[str], str]
) -> None:
    api = client_for("operator", org=unique("org-pages"))
    names = [f"inst-{i:02d}" for i in range(7)]
    for i, name in enumerate(names):
        r = api.post("/instructions", json={"name": name, "systemPrompt": "p",
                                            "isActive": i % 2 == 0, "tags": [f"t{i % 3}"]})
        assert r.status_code == 201
    page1 = api.get("/instructions", params={"limit": 3, "sort": "name"}).json()
    page3 = api.get("/instructions", params={"limit": 3, "page": 3, "sort": "name"}).json()
    assert [d["name"] for d in page1["data"]] == names[:3]
    assert [d["name"] for d in page3["data"]] == names[6:]
    assert page1["total"] == page3["total"] == 7 and page3["page"] == 3
    desc = api.get("/instructions", params={"sort": "-name", "limit": 2}).json()
    assert [d["name"] for d in desc["data"]] == names[:-3:-1]

    active = api.get("/instructions", params={"isActive": "true"}).json()
    assert active["total"] == 4 and all(d["isActive"] for d in active["data"])
    tagged = api.get("/instructions", params={"tags": "t0,t1"}).json()
    assert tagged["total"] == 5
    found = api.get("/instructions", params={"q": "INST-0"}).json()
    assert found["total"] == 7
    exact = api.get("/instructions", params={"q": "inst-05"}).json()
    assert [d["name"] for d in exact["data"]] == ["inst-05"]

    bad = api.get("/instructions", params={"colour": "red", "sort": "shoeSize"})
    assert bad.status_code == 422
    fields = {e["field"] for e in bad.json()["errors"]}
    assert fields == {"query.colour", "query.sort"}


def test_populate_instruction_on_get_and_list(
    api: httpx.Client, unique: Callable[[str], str]
) -> None:
    ins = make_instruction(api, unique)
    tool = api.post("/tools", json={"name": unique("search")}).json()
    agent = api.post("/agents", json={"name": unique("helper"), "instructionId": ins["id"],
                                      "toolIds": [tool["id"]]}).json()
    plain = api.get(f"/agents/{agent['id']}").json()
    assert "instruction" not in plain
    full = api.get(f"/agents/{agent['id']}", params={"populate": "instruction,tools"}).json()
    assert full["instruction"]["id"] == ins["id"]
    assert full["instruction"]["systemPrompt"] == "Be helpful."
    assert [t["id"] for t in full["tools"]] == [tool["id"]]
    listed = api.get("/agents", params={"populate": "instruction", "instructionId": ins["id"]})
    assert [a["instruction"]["name"] for a in listed.json()["data"]] == [ins["name"]]
    bad = api.get(f"/agents/{agent['id']}", params={"populate": "owner"})
    assert bad.status_code == 422 and "instruction" in bad.json()["detail"]


def test_conversation_messages_oldest_first(
    api: httpx.Client, unique: Callable[[str], str]
) -> None:
    conv = api.post("/conversations", json={"title": unique("chat")}).json()
    other = api.post("/conversations", json={"title": unique("other")}).json()
    for i in range(3):
        api.post("/messages", json={"conversationId": conv["id"], "role": "user",
                                    "content": f"m{i}"})
    api.post("/messages", json={"conversationId": other["id"], "role": "user", "content": "x"})
    r = api.get(f"/conversations/{conv['id']}/messages")
    assert r.status_code == 200
    assert [m["content"] for m in r.json()["data"]] == ["m0", "m1", "m2"]
    assert r.json()["total"] == 3
    assert api.get("/conversations/nope/messages").status_code == 404


def test_patch_merges_nested_objects(api: httpx.Client, unique: Callable[[str], str]) -> None:
    agent = api.post("/agents", json={"name": unique("a"),
                                      "llmConfig": {"temperature": 0.2, "maxTokens": 64}}).json()
    r = api.patch(f"/agents/{agent['id']}", json={"llmConfig": {"maxTokens": 128}})
    assert r.status_code == 200, r.text
    assert r.json()["llmConfig"] == {"temperature": 0.2, "maxTokens": 128, "topP": 1.0}


def test_server_managed_state_is_stored_and_filterable(
    client_for: Callable[..., httpx.Client], unique: Callable[[str], str]
) -> None:
    api = client_for("operator", org=unique("org-state"))
    node = api.post("/nodes", json={"name": unique("n")}).json()
    assert node["status"] == "pending" and node["gpuDevices"] == []
    assert api.get("/nodes", params={"status": "pending"}).json()["total"] == 1
    assert api.get("/nodes", params={"status": "online"}).json()["total"] == 0
    # Clients cannot write server-managed fields.
    r = api.patch(f"/nodes/{node['id']}", json={"status": "online"})
    assert r.status_code == 422


def test_integers_the_database_cannot_hold_are_refused_and_nothing_is_written(
        api: httpx.Client, unique: Callable[[str], str]) -> None:
    big = 10**20  # JSON allows it; BSON stops at 2^63-1
    name = unique("huge")
    for r in (
        api.post("/models", json={"name": name, "source": "upload", "sizeBytes": big}),
        api.post("/models", json={"name": name, "source": "upload", "metadata": {"n": -big}}),
        api.post("/executions", json={"name": "huge", "steps": [
            {"name": "w", "kind": "controller", "command": "wait",
             "data": {"seconds": 0, "n": big}}]}),
    ):
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "validation_failed" and "2^63-1" in r.json()["detail"]
    assert api.get("/models", params={"q": name}).json()["data"] == []
    created = api.post("/models", json={"name": name, "source": "upload"})
    assert created.status_code == 201, created.text  # the name was never taken
    made = created.json()
    stale = api.patch(f"/models/{made['id']}", json={"description": "x", "version": big})
    assert stale.status_code == 422, stale.text
    assert api.get(f"/models/{made['id']}").json()["version"] == made["version"]
    for r in (api.delete(f"/models/{made['id']}/versions/{big}"),
              api.get(f"/models/{made['id']}/download-url", params={"version": big})):
        assert r.status_code == 422, r.text
