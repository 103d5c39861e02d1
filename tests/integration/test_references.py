"""The Registry enforces references and refuses to delete what is still in use."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.integration.test_crud import make_instruction, make_model, make_node


def test_deployment_needs_existing_model_and_node(
    api: httpx.Client, unique: Callable[[str], str]
) -> None:
    node = make_node(api, unique)
    r = api.post("/deployments", json={"name": unique("d"), "modelId": "mdl-missing",
                                       "nodeId": node["id"]})
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "invalid_reference"
    assert body["errors"] == [{"field": "body.modelId", "message": "no model with id 'mdl-missing'",
                               "type": "invalid_reference"}]
    r = api.post("/deployments", json={"name": unique("d"), "modelId": "x", "nodeId": "y"})
    assert {e["field"] for e in r.json()["errors"]} == {"body.modelId", "body.nodeId"}


def test_reference_to_another_orgs_document_is_invalid(
    api: httpx.Client, client_for: Callable[..., httpx.Client], unique: Callable[[str], str]
) -> None:
    ins = make_instruction(api, unique)
    other = client_for("operator", org=unique("org-x"))
    r = other.post("/agents", json={"name": "a", "instructionId": ins["id"]})
    assert r.status_code == 422 and r.json()["code"] == "invalid_reference"


def test_deleting_an_instruction_in_use_names_its_users(
    api: httpx.Client, unique: Callable[[str], str]
) -> None:
    ins = make_instruction(api, unique)
    agents = [api.post("/agents", json={"name": unique("agent"), "instructionId": ins["id"]}).json()
              for _ in range(2)]
    r = api.delete(f"/instructions/{ins['id']}")
    assert r.status_code == 409
    body = r.json()
    assert body["code"] == "in_use"
    assert body["usedBy"][0]["entity"] == "agents" and body["usedBy"][0]["count"] == 2
    assert set(body["usedBy"][0]["ids"]) == {a["id"] for a in agents}
    assert agents[0]["id"] in body["detail"]
    # Once nothing uses it, it can go.
    for a in agents:
        assert api.patch(f"/agents/{a['id']}", json={"instructionId": None}).status_code == 200
    assert api.delete(f"/instructions/{ins['id']}").status_code == 200


def test_deleting_a_model_in_use_by_a_deployment_is_refused(
    api: httpx.Client, unique: Callable[[str], str]
) -> None:
    model, node = make_model(api, unique), make_node(api, unique)
    dep = api.post("/deployments", json={"name": unique("d"), "modelId": model["id"],
                                         "nodeId": node["id"]}).json()["deployment"]
    for path in (f"/models/{model['id']}", f"/nodes/{node['id']}"):
        r = api.delete(path)
        assert r.status_code == 409 and r.json()["usedBy"][0]["ids"] == [dep["id"]]
    assert api.delete(f"/deployments/{dep['id']}", params={"force": "true"}).status_code == 202
    assert api.delete(f"/models/{model['id']}").status_code == 200
    # A deleted model can no longer be referenced.
    r = api.post("/deployments", json={"name": unique("d"), "modelId": model["id"],
                                       "nodeId": node["id"]})
    assert r.status_code == 422


def test_deleting_a_conversation_removes_its_messages(
    api: httpx.Client, unique: Callable[[str], str]
) -> None:
    conv = api.post("/conversations", json={"title": unique("chat")}).json()
    msg = api.post("/messages", json={"conversationId": conv["id"], "role": "user",
                                      "content": "hi"}).json()
    assert api.delete(f"/conversations/{conv['id']}").status_code == 200
    assert api.get(f"/messages/{msg['id']}").status_code == 404


def test_names_are_unique_per_org_among_live_documents(
    api: httpx.Client, client_for: Callable[..., httpx.Client], unique: Callable[[str], str]
) -> None:
    name = unique("whisper")
    first = api.post("/models", json={"name": name})
    assert first.status_code == 201
    dup = api.post("/models", json={"name": name})
    assert dup.status_code == 409 and dup.json()["code"] == "already_exists"
    assert dup.json()["existingId"] == first.json()["id"]
    # Another org may use the same name; after a delete the name is free again.
    assert client_for("operator", org=unique("org-y")).post("/models", json={"name": name}).status_code == 201
    assert api.delete(f"/models/{first.json()['id']}").status_code == 200
    assert api.post("/models", json={"name": name}).status_code == 201
