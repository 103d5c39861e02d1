"""Model storage end to end: uploads, versions, signed URLs, HuggingFace imports, and a
deployment whose node downloads the model's files through those URLs."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from actors.controller_actions import ActionContext, model_import
from aiwm.execution import ExecutionIn, StepIn, new_execution
from aiwm.objectstore import object_store_for
from aiwm.settings import Settings
from aiwm.store import Store, utcnow
from tests.conftest import wait_for
from tests.integration.nodes_helpers import AgentProcess, Node, make_node, wait_status
from tests.nodeside.conftest import FileServer
from tests.support import leftovers, model_server

CONFIG = b'{"architectures": ["Echo"]}'
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture()
def model(api: httpx.Client, unique: Callable[[str], str]) -> dict[str, Any]:
    r = api.post("/models", json={"name": unique("stored"), "source": "upload"})
    assert r.status_code == 201, r.text
    return r.json()


def upload(api: httpx.Client, model_id: str | None, files: list[tuple[str, bytes]]) -> httpx.Response:
    data = {"modelId": model_id} if model_id else {}
    return api.post("/models/upload", data=data,
                    files=[("file", (name, content, "application/octet-stream"))
                           for name, content in files])


def test_upload_versions_and_signed_download_urls(api: httpx.Client, model: dict[str, Any]) -> None:
    r = upload(api, model["id"], [("config.json", CONFIG), ("weights/model.bin", WEIGHTS)])
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert v1["version"] == 1 and v1["source"] == "upload" and v1["bytes"] == len(CONFIG) + len(WEIGHTS)
    by_name = {f["name"]: f for f in v1["files"]}
    assert by_name["weights/model.bin"]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert api.get(f"/models/{model['id']}").json()["latestVersion"] == 1

    v2 = upload(api, model["id"], [("config.json", b"{}")]).json()
    assert v2["version"] == 2
    listed = api.get(f"/models/{model['id']}/versions").json()["data"]
    assert [v["version"] for v in listed] == [2, 1]

    latest = api.get(f"/models/{model['id']}/download-url").json()
    assert latest["version"] == 2 and [f["name"] for f in latest["files"]] == ["config.json"]
    first = api.get(f"/models/{model['id']}/download-url", params={"version": 1}).json()
    urls = {f["name"]: f["url"] for f in first["files"]}
    with httpx.Client(timeout=30) as plain:  # no token: the signature is the permission
        got = plain.get(urls["weights/model.bin"])
        assert got.status_code == 200 and got.content == WEIGHTS
        tail = plain.get(urls["weights/model.bin"], headers={"Range": f"bytes={len(WEIGHTS) - 10}-"})
        assert tail.status_code == 206 and tail.content == WEIGHTS[-10:]
        url = urls["config.json"]
        sig = url.split("sig=")[1][:64]
        tampered = url.replace(sig, sig[:-1] + ("0" if sig[-1] != "0" else "1"))
        assert plain.get(tampered).status_code == 403
        later = url.replace("expires=", "expires=9")  # a longer life is not for the taking
        assert plain.get(later).status_code == 403
        assert plain.get(url.replace("config.json", "weights/model.bin")).status_code == 403
    short = api.get(f"/models/{model['id']}/download-url", params={"version": 1, "expiresIn": 1})
    assert short.status_code == 200


def test_bad_uploads_are_refused_and_make_no_version(
        api: httpx.Client, model: dict[str, Any]) -> None:
    assert upload(api, None, [("a.bin", b"x")]).status_code == 422
    assert upload(api, "mdl-nope", [("a.bin", b"x")]).status_code == 404
    traversal = upload(api, model["id"], [("../../etc/passwd", b"x")])
    assert traversal.status_code == 422 and "leaves its folder" in traversal.json()["detail"]
    no_files = api.post("/models/upload", data={"modelId": model["id"]},
                        files=[("other", ("", b"", "text/plain"))])
    assert no_files.status_code == 422
    not_multipart = api.post("/models/upload", json={"modelId": model["id"]})
    assert not_multipart.status_code == 422
    assert api.get(f"/models/{model['id']}/versions").json()["data"] == []
    assert api.get(f"/models/{model['id']}/download-url").status_code == 404


def test_a_huggingface_import_runs_as_an_execution_and_makes_a_version(
        api: httpx.Client, model: dict[str, Any], hub: Any, unique: Callable[[str], str]) -> None:
    repo = f"acme/{unique('tiny')}"
    hub.add_repo(repo, {"config.json": CONFIG, "model.safetensors": WEIGHTS, "README.md": b"hi"})
    r = api.post("/models/download", json={"modelId": model["id"], "repoId": repo,
                                            "allowPatterns": ["*.json", "*.safetensors"]})
    assert r.status_code == 202, r.text
    execution = r.json()["execution"]
    done = api.get(f"/executions/{execution['id']}/wait", params={"timeout": 60}).json()
    assert done["status"] == "completed", done
    step = done["steps"][0]
    assert step["result"]["files"] == 2 and step["result"]["bytes"] == len(CONFIG) + len(WEIGHTS)
    assert step["progress"]["filesDone"] == step["progress"]["filesTotal"] == 2
    version = api.get(f"/models/{model['id']}/versions").json()["data"][0]
    assert version["source"] == "huggingface" and version["repoId"] == repo
    assert sorted(f["name"] for f in version["files"]) == ["config.json", "model.safetensors"]

    missing = api.post("/models/download", json={"modelId": model["id"], "repoId": "acme/none"})
    failed = api.get(f"/executions/{missing.json()['execution']['id']}/wait",
                     params={"timeout": 60}).json()
    assert failed["status"] == "failed" and failed["steps"][0]["error"]["code"] == "not_found"
    assert len(api.get(f"/models/{model['id']}/versions").json()["data"]) == 1  # none half-made
    bad = api.post("/models/download", json={"modelId": model["id"], "repoId": "../etc"})
    assert bad.status_code == 422


def finished(api: httpx.Client, action: httpx.Response) -> dict[str, Any]:
    assert action.status_code in (201, 202), action.text
    done = api.get(f"/executions/{action.json()['execution']['id']}/wait",
                   params={"timeout": 90}).json()
    assert done["status"] == "completed", done
    return done  # type: ignore[no-any-return]


def test_a_deployment_downloads_the_stored_version_to_its_node(
        api: httpx.Client, model: dict[str, Any], agent: tuple[Node, AgentProcess],
        unique: Callable[[str], str]) -> None:
    node, process = agent
    mid = model["id"]
    assert upload(api, mid, [("config.json", CONFIG), ("model.bin", WEIGHTS)]).status_code == 201
    spec = {"modelId": mid, "nodeId": node.id, "runtime": "process",
            "command": [sys.executable, model_server.__file__, "--port", "{port}"]}
    created = api.post("/deployments", json={"name": unique("dep"), **spec})
    done = finished(api, created)
    first = created.json()["deployment"]["id"]
    download = done["steps"][0]
    assert download["data"]["version"] == 1 and download["result"]["files"] == 2
    assert done["steps"][1]["data"]["modelVersion"] == 1
    cached = process.state_dir / "models" / mid / "v1" / "model.bin"
    assert cached.read_bytes() == WEIGHTS
    assert api.get(f"/deployments/{first}").json()["modelVersion"] == 1
    # The server sees the version's folder.
    env = api.get(f"/models/{model['name']}/invoke/env/MODEL_DIR").json()
    assert Path(env["value"]) == cached.parent
    # The node's metrics reports say what its cache holds (the latest report may have
    # been taken while the download ran: wait for one taken after it finished).
    def reported() -> dict[str, Any] | None:
        latest = api.get(f"/nodes/{node.id}/metrics").json().get("latest") or {}
        found = next((m for m in latest.get("models", []) if m["modelId"] == mid), None)
        return found if found and found["complete"] else None

    assert wait_for(reported, timeout=20, what="the cache in a metrics report") == {
        "modelId": mid, "version": 1, "files": 2, "bytes": len(CONFIG) + len(WEIGHTS),
        "complete": True}
    assert api.get(f"/nodes/{node.id}/metrics").json()["latest"]["modelDirFree"] > 0

    def model_dir_of(deployment_id: str) -> Path:  # what the node gave the server
        state = process.state_dir / "deployments" / f"{deployment_id}.json"
        return Path(json.loads(state.read_text())["modelDir"])

    # Stopped, the first deployment runs no server, but its record still names version 1.
    finished(api, api.post(f"/deployments/{first}/stop"))
    # A second deployment of the same model on the same node, with a newer version: it
    # runs from its own version's folder, and the first's files stay for it.
    assert upload(api, mid, [("model.bin", WEIGHTS[::-1])]).status_code == 201
    second = api.post("/deployments", json={"name": unique("dep"), **spec})
    done = finished(api, second)
    second_id = second.json()["deployment"]["id"]
    assert done["steps"][0]["result"]["removedVersions"] == []
    assert [s["name"] for s in done["steps"]] == ["download", "start", "route", "health", "tidy"]
    assert done["steps"][4]["result"]["removedVersions"] == []  # the stopped first names v1
    assert model_dir_of(second_id) == cached.parent.parent / "v2"
    assert (cached.parent.parent / "v2" / "model.bin").read_bytes() == WEIGHTS[::-1]
    assert cached.read_bytes() == WEIGHTS

    # A restart starts the version the deployment was deployed with, not the latest.
    finished(api, api.post(f"/deployments/{first}/restart"))
    assert model_dir_of(first) == cached.parent and cached.exists()

    # Both run now; a caller of the gateway may ask for a version, or a deployment.
    invoke = f"/models/{model['name']}/invoke"
    for version, folder, deployment in ((1, "v1", first), (2, "v2", second_id)):
        r = api.get(f"{invoke}/env/MODEL_DIR", headers={"X-AIWM-Model-Version": str(version)})
        assert r.status_code == 200 and Path(r.json()["value"]).name == folder
        assert r.headers["X-AIWM-Model-Version"] == str(version)
        assert r.headers["X-AIWM-Deployment"] == deployment
        pinned = api.get(f"{invoke}/headers", headers={"X-AIWM-Deployment": deployment})
        assert pinned.headers["X-AIWM-Deployment"] == deployment
        assert not any(h.startswith("x-aiwm") for h in pinned.json())  # not passed on
    none = api.get(f"{invoke}/health", headers={"X-AIWM-Model-Version": "7"})
    assert none.status_code == 503 and "with version 7" in none.json()["detail"]
    for wrong in ("latest", "0", "\u00b2", "99999999999"):  # \u00b2: a digit, not 0-9
        bad = api.get(f"{invoke}/health", headers={"X-AIWM-Model-Version": wrong.encode("latin-1")})
        assert bad.status_code == 422, wrong
        assert bad.json()["errors"][0]["field"] == "header.x-aiwm-model-version"

    # Deploying the first again upgrades it to the latest: a new server from v2. Its old
    # server ran from v1 while v2 was fetched; once the new one is healthy, the tidy
    # step removes v1, which nothing on the node uses any more.
    done = finished(api, api.post(f"/deployments/{first}/deploy"))
    assert done["steps"][0]["data"]["version"] == 2
    assert done["steps"][0]["result"]["removedVersions"] == []
    assert done["steps"][4]["result"]["removedVersions"] == ["v1"]
    assert model_dir_of(first) == cached.parent.parent / "v2"
    assert api.get(f"/deployments/{first}").json()["modelVersion"] == 2
    assert not cached.parent.exists()

    # Deployed again on the version it runs: nothing fetched, nothing removed.
    finished(api, api.delete(f"/deployments/{second_id}"))
    done = finished(api, api.post(f"/deployments/{first}/deploy"))
    assert done["steps"][0]["result"]["skipped"] == 1
    assert done["steps"][4]["result"]["removedVersions"] == []

    # Going back: a deploy may name an earlier version, fetched again from the store.
    done = finished(api, api.post(f"/deployments/{first}/deploy", json={"modelVersion": 1}))
    assert done["steps"][0]["data"]["version"] == 1 and done["steps"][1]["data"]["modelVersion"] == 1
    assert model_dir_of(first) == cached.parent and cached.read_bytes() == WEIGHTS
    assert done["steps"][4]["result"]["removedVersions"] == ["v2"]
    assert api.get(f"/deployments/{first}").json()["modelVersion"] == 1
    # Deleting a version a deployment runs: allowed (it runs on from the node's copy), and
    # the answer names it.
    assert upload(api, mid, [("model.bin", b"three")]).status_code == 201
    finished(api, api.post(f"/deployments/{first}/deploy", json={"modelVersion": 3}))
    gone = api.delete(f"/models/{mid}/versions/3")
    assert gone.status_code == 200 and gone.json()["deployments"] == [first]
    finished(api, api.post(f"/deployments/{first}/restart"))  # no download: still works
    assert model_dir_of(first) == cached.parent.parent / "v3"
    missing = api.post(f"/deployments/{first}/deploy", json={"modelVersion": 9})
    assert missing.status_code == 404 and "no version 9" in missing.json()["detail"]
    for bad in ({"modelVersion": 0}, {"modelVersion": "one"}, {"version": 1}):
        assert api.post(f"/deployments/{first}/deploy", json=bad).status_code == 422, bad
    assert api.get(f"/deployments/{first}").json()["modelVersion"] == 3  # none of them ran
    # Deleting the deployment frees the version it ran: nothing else on the node uses it.
    done = finished(api, api.delete(f"/deployments/{first}"))
    assert [s["name"] for s in done["steps"]] == ["unroute", "stop", "tidy"]
    assert done["steps"][2]["result"]["removedVersions"] == ["v3"]
    assert [p.name for p in cached.parent.parent.iterdir()] == []


def test_deleting_versions_frees_their_files_and_moves_the_latest_back(
        api: httpx.Client, model: dict[str, Any]) -> None:
    mid = model["id"]
    for content in (b"one", b"two", b"three"):
        assert upload(api, mid, [("model.bin", content)]).status_code == 201
    v3_url = api.get(f"/models/{mid}/download-url").json()["files"][0]["url"]
    with httpx.Client(timeout=30) as plain:
        assert plain.get(v3_url).content == b"three"
        r = api.delete(f"/models/{mid}/versions/3")
        assert r.status_code == 200, r.text
        assert r.json() == {"modelId": mid, "version": 3, "files": 1, "bytes": 5, "deleted": True,
                            "deployments": []}
        assert plain.get(v3_url).status_code == 404  # the file itself is gone
    assert api.get(f"/models/{mid}").json()["latestVersion"] == 2
    assert [v["version"] for v in api.get(f"/models/{mid}/versions").json()["data"]] == [2, 1]
    assert api.get(f"/models/{mid}/download-url").json()["version"] == 2
    assert api.get(f"/models/{mid}/download-url", params={"version": 3}).status_code == 404

    assert api.delete(f"/models/{mid}/versions/1").status_code == 200  # not the latest
    assert api.get(f"/models/{mid}").json()["latestVersion"] == 2
    again = api.delete(f"/models/{mid}/versions/1")
    assert again.status_code == 404 and again.json()["code"] == "not_found"
    assert api.delete(f"/models/{mid}/versions/0").status_code == 422
    assert api.delete("/models/no-such-model/versions/1").status_code == 404

    assert api.delete(f"/models/{mid}/versions/2").status_code == 200
    left = api.get(f"/models/{mid}").json()
    assert left["latestVersion"] is None and left["status"] == "registered"
    assert api.get(f"/models/{mid}/download-url").status_code == 404
    # Numbers are never reused: the next upload is version 4.
    assert upload(api, mid, [("model.bin", b"four")]).json()["version"] == 4
    assert api.get(f"/models/{mid}").json()["latestVersion"] == 4


def test_a_version_an_unfinished_deploy_downloads_is_not_deleted(
        api: httpx.Client, model: dict[str, Any], unique: Callable[[str], str]) -> None:
    mid = model["id"]
    assert upload(api, mid, [("model.bin", b"weights")]).status_code == 201
    node = api.post("/nodes", json={"name": unique("far")}).json()
    ex = api.post("/executions", json={"name": "slow deploy", "steps": [
        {"name": "pause", "kind": "controller", "command": "wait", "data": {"seconds": 120}},
        {"name": "download", "kind": "node", "nodeId": node["id"], "command": "model.download",
         "data": {"modelId": mid, "version": 1, "files": []}, "dependsOn": ["pause"]}]})
    assert ex.status_code == 201, ex.text
    refused = api.delete(f"/models/{mid}/versions/1")
    assert refused.status_code == 409, refused.text
    problem = refused.json()
    assert problem["code"] == "in_use" and ex.json()["id"] in problem["detail"]
    assert problem["usedBy"] == [{"entity": "executions", "id": ex.json()["id"]}]
    # Nothing changed: still listed, still the latest, its files still there.
    assert api.get(f"/models/{mid}").json()["latestVersion"] == 1
    url = api.get(f"/models/{mid}/download-url").json()["files"][0]["url"]
    with httpx.Client(timeout=30) as plain:
        assert plain.get(url).content == b"weights"
    assert api.delete(f"/executions/{ex.json()['id']}").status_code == 200
    assert api.get(f"/executions/{ex.json()['id']}/wait",
                   params={"timeout": 30}).json()["status"] == "cancelled"
    assert api.delete(f"/models/{mid}/versions/1").status_code == 200


def test_each_download_attempt_gets_fresh_urls(
        api: httpx.Client, model: dict[str, Any], agent: tuple[Node, AgentProcess]) -> None:
    node, process = agent
    mid = model["id"]
    assert upload(api, mid, [("model.bin", WEIGHTS)]).status_code == 201
    planned = api.get(f"/models/{mid}/download-url", params={"expiresIn": 1}).json()
    stale = planned["files"]
    time.sleep(2)  # what a deploy planned hours ago holds: URLs past their expiry
    with httpx.Client(timeout=30) as plain:
        assert plain.get(stale[0]["url"]).status_code == 403

    def download(version: int) -> dict[str, Any]:
        r = api.post("/executions", json={"name": "late download", "steps": [
            {"name": "download", "kind": "node", "nodeId": node.id, "command": "model.download",
             "data": {"modelId": mid, "version": version, "files": stale}}]})
        assert r.status_code == 201, r.text
        return api.get(f"/executions/{r.json()['id']}/wait", params={"timeout": 60}).json()

    done = download(1)
    assert done["status"] == "completed", done
    assert (process.state_dir / "models" / mid / "v1" / "model.bin").read_bytes() == WEIGHTS
    # The stored step keeps what was planned; only the command sent was signed anew.
    assert done["steps"][0]["data"]["files"][0]["url"] == stale[0]["url"]

    assert api.delete(f"/models/{mid}/versions/1").status_code == 200
    gone = download(1)
    assert gone["status"] == "failed"
    assert gone["steps"][0]["error"]["code"] == "not_found"
    assert "has no version 1" in gone["steps"][0]["error"]["message"]


async def test_an_import_run_again_after_it_stored_its_version_makes_no_second_one(
        api: httpx.Client, model: dict[str, Any], hub: Any, settings: Settings,
        unique: Callable[[str], str]) -> None:
    """The orchestrator stopped after model.import stored its version but before the
    step's success was saved: the step runs again, in the same execution."""
    repo = f"acme/{unique('again')}"
    hub.add_repo(repo, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    ex = new_execution(
        ExecutionIn(name="import", steps=[StepIn(
            name="import", kind="controller", command="model.import",
            data={"modelId": model["id"], "repoId": repo})]),
        execution_id=f"exe-{unique('imp')}", org_id=model["orgId"], created_by="tester",
        now=utcnow(), default_max_retries=0)
    store = Store.for_settings(settings)
    objects = object_store_for(settings, public_url=settings.public_url())
    ctx = ActionContext(execution=ex, step=ex.steps[0], store=store,
                        node=lambda *_: None,  # type: ignore[arg-type, return-value]
                        objects=objects, settings=settings)
    try:
        first = await model_import(ctx)
        served = hub.served(repo, "model.safetensors")
        assert served == len(WEIGHTS)
        again = await model_import(ctx)
        assert again == first and first["version"] == 1 and first["files"] == 2
        assert hub.served(repo, "model.safetensors") == served  # nothing fetched again
        versions = api.get(f"/models/{model['id']}/versions").json()["data"]
        assert [v["version"] for v in versions] == [1]
        assert versions[0]["executionId"] == ex.id
        # Another execution importing the same commit is told the latest already has it.
        other = ex.model_copy(update={"id": f"exe-{unique('imp2')}"})
        made = await model_import(ActionContext(
            execution=other, step=other.steps[0], store=store,
            node=lambda *_: None,  # type: ignore[arg-type, return-value]
            objects=objects, settings=settings))
        assert made == {**first, "unchanged": True}
    finally:
        await store.close()


def test_deleting_a_model_frees_the_files_of_all_its_versions(
        api: httpx.Client, model: dict[str, Any], settings: Settings) -> None:
    mid = model["id"]
    for content in (b"first", b"second"):
        assert upload(api, mid, [("model.bin", content)]).status_code == 201
    urls = [api.get(f"/models/{mid}/download-url", params={"version": v}).json()["files"][0]["url"]
            for v in (1, 2)]
    folder = settings.aiwm_home / "objects" / "data" / "models" / model["orgId"] / mid
    assert sorted(p.name for p in folder.iterdir()) == ["v1", "v2"]

    stale = api.delete(f"/models/{mid}", headers={"If-Match": '"99"'})
    assert stale.status_code == 409 and folder.is_dir()  # refused: nothing freed
    r = api.delete(f"/models/{mid}")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == mid and r.json()["deletedAt"]
    assert not folder.exists() or list(folder.rglob("*.bin")) == []
    with httpx.Client(timeout=30) as plain:
        assert [plain.get(u).status_code for u in urls] == [404, 404]
    assert api.get(f"/models/{mid}").status_code == 404
    assert api.delete(f"/models/{mid}").status_code == 404


def test_importing_what_the_latest_version_holds_makes_no_new_one(
        api: httpx.Client, model: dict[str, Any], hub: Any, unique: Callable[[str], str]) -> None:
    mid = model["id"]
    repo = f"acme/{unique('same')}"
    first_commit = hub.add_repo(repo, {"config.json": CONFIG, "model.safetensors": WEIGHTS})

    def imported() -> dict[str, Any]:
        r = api.post("/models/download", json={"modelId": mid, "repoId": repo})
        assert r.status_code == 202, r.text
        done = api.get(f"/executions/{r.json()['execution']['id']}/wait",
                       params={"timeout": 60}).json()
        assert done["status"] == "completed", done
        return done["steps"][0]["result"]  # type: ignore[no-any-return]

    v1 = imported()
    assert v1["version"] == 1 and "unchanged" not in v1
    fetched = hub.served(repo, "model.safetensors")
    again = imported()
    assert again == {**v1, "unchanged": True}
    assert hub.served(repo, "model.safetensors") == fetched  # nothing downloaded again
    assert [v["version"] for v in api.get(f"/models/{mid}/versions").json()["data"]] == [1]

    second_commit = hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": WEIGHTS})
    assert second_commit != first_commit
    v2 = imported()
    assert v2["version"] == 2 and v2["commit"] == second_commit and "unchanged" not in v2
    # An upload on top: importing the same commit again makes it the latest once more.
    assert upload(api, mid, [("model.bin", b"mine")]).json()["version"] == 3
    assert imported()["version"] == 4


def test_the_orchestrator_removes_abandoned_staging_folders(api: httpx.Client,
                                                             settings: Settings) -> None:
    """tests/conftest.py planted three folders in AIWM_HOME before the stack started; the
    orchestrator's first sweep removes the two abandoned ones."""
    home = settings.aiwm_home
    assert api.get("/executions").status_code == 200  # the orchestrator has started
    wait_for(lambda: not (home / leftovers.STALE_IMPORT).exists()
             and not (home / leftovers.STALE_UPLOAD).exists(),
             timeout=30, what="the sweep of abandoned staging folders")
    assert (home / leftovers.FRESH_IMPORT / "weights" / "part.bin").exists()


async def test_a_version_delete_that_stopped_half_way_is_finished_by_the_sweep(
        api: httpx.Client, model: dict[str, Any], settings: Settings) -> None:
    import ray

    from actors import NAMESPACE, ORCHESTRATOR_NAME

    mid = model["id"]
    for content in (b"one", b"two", b"three"):
        assert upload(api, mid, [("model.bin", content)]).status_code == 201
    folder = settings.aiwm_home / "objects" / "data" / "models" / model["orgId"] / mid
    store = Store.for_settings(settings)
    try:
        # Version 1 was hidden an hour ago by a delete whose replica died before the
        # files went (or whose object store was down); version 2 is being deleted now.
        await store.model_versions.hide(model["orgId"], mid, 1,
                                        utcnow() - dt.timedelta(hours=1))
        await store.model_versions.hide(model["orgId"], mid, 2, utcnow())
    finally:
        await store.close()
    assert (folder / "v1" / "model.bin").exists()
    orchestrator = ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE)
    swept = await orchestrator.sweep.remote()
    assert swept["versions"] >= 1
    assert not (folder / "v1").exists() or list((folder / "v1").rglob("*")) == []
    assert (folder / "v2" / "model.bin").exists()  # its own delete is still at work
    assert [v["version"] for v in api.get(f"/models/{mid}/versions").json()["data"]] == [3]
    assert api.delete(f"/models/{mid}/versions/1").status_code == 404  # the record went too
    assert api.delete(f"/models/{mid}/versions/2").status_code == 200  # finished by its own


def test_a_node_download_shows_its_progress_on_the_step(
        api: httpx.Client, agent: tuple[Node, AgentProcess], unique: Callable[[str], str]) -> None:
    node, _ = agent
    weights = WEIGHTS * 8
    server = FileServer({"/weights.bin": weights})  # /stall/: half the file, then it waits
    try:
        ex = api.post("/executions", json={"name": "watched download", "steps": [
            {"name": "download", "kind": "node", "nodeId": node.id, "command": "model.download",
             "data": {"modelId": unique("watched"), "files": [
                 {"name": "weights.bin", "url": f"{server.url}/stall/weights.bin",
                  "size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}]}}]})
        assert ex.status_code == 201, ex.text

        def partway() -> dict[str, Any] | None:  # the node counts whole 1 MiB batches
            step = api.get(f"/executions/{ex.json()['id']}").json()["steps"][0]
            progress = step.get("progress") or {}
            return progress if progress.get("bytesDone") else None

        seen = wait_for(partway, timeout=30, what="the step's progress from the node")
        assert 0 < seen["bytesDone"] <= len(weights) // 2
        assert (seen["bytesTotal"], seen["filesDone"], seen["filesTotal"]) == (len(weights), 0, 1)
        # (Released, this server would send the rest half by half: cancel instead.)
        assert api.delete(f"/executions/{ex.json()['id']}").status_code == 200
        done = api.get(f"/executions/{ex.json()['id']}/wait", params={"timeout": 30}).json()
        assert done["status"] == "cancelled", done
        assert done["steps"][0]["progress"] == seen  # what it had got to stays on show
    finally:
        server.release.set()
        server.close()


def test_a_node_with_a_capped_cache_refuses_a_deploy_past_the_cap_and_reports_it(
        api: httpx.Client, model: dict[str, Any], unique: Callable[[str], str], cluster: str,
        tmp_path: Path) -> None:
    node = make_node(api, unique)
    cap = len(WEIGHTS)  # the version is a little more: its config too
    process = AgentProcess(ws_url=cluster.replace("http://", "ws://") + "/ws/node", node=node,
                           state_dir=tmp_path,
                           extra_env={"AIWM_NODE_MODEL_CACHE_MAX": str(cap)}).start()
    try:
        wait_status(node, "online")
        assert upload(api, model["id"], [("config.json", CONFIG),
                                         ("model.bin", WEIGHTS)]).status_code == 201
        created = api.post("/deployments", json={
            "name": unique("capped"), "modelId": model["id"], "nodeId": node.id,
            "runtime": "process",
            "command": [sys.executable, model_server.__file__, "--port", "{port}"]})
        assert created.status_code in (201, 202), created.text
        done = api.get(f"/executions/{created.json()['execution']['id']}/wait",
                       params={"timeout": 90}).json()
        assert done["status"] == "failed", done
        error = done["steps"][0]["error"]
        assert error["code"] == "insufficient_storage", error
        assert f"of the {cap} it may (AIWM_NODE_MODEL_CACHE_MAX)" in error["message"]
        assert not (tmp_path / "models" / model["id"] / "v1" / "model.bin").exists()

        def capped() -> dict[str, Any] | None:
            latest = api.get(f"/nodes/{node.id}/metrics").json().get("latest") or {}
            return latest if latest.get("modelCacheMax") else None

        assert wait_for(capped, timeout=20, what="a metrics report")["modelCacheMax"] == cap
    finally:
        process.kill()


def test_a_failed_upgrade_leaves_the_deployment_serving_its_version(
        api: httpx.Client, model: dict[str, Any], agent: tuple[Node, AgentProcess],
        settings: Settings, unique: Callable[[str], str]) -> None:
    node, process = agent
    mid = model["id"]
    assert upload(api, mid, [("model.bin", WEIGHTS)]).status_code == 201
    r = api.post("/deployments", json={
        "name": unique("dep"), "modelId": mid, "nodeId": node.id, "runtime": "process",
        "command": [sys.executable, model_server.__file__, "--port", "{port}"]})
    assert r.json()["deployment"]["modelVersion"] is None  # none runs until its start step
    finished(api, r)
    dep = r.json()["deployment"]["id"]
    assert api.get(f"/deployments/{dep}").json()["modelVersion"] == 1
    state_file = process.state_dir / "deployments" / f"{dep}.json"
    serving = json.loads(state_file.read_text())
    # Version 2's file rots in the store: every node download of it fails its checksum.
    assert upload(api, mid, [("model.bin", WEIGHTS[::-1])]).status_code == 201
    stored = settings.aiwm_home / "objects" / "data" / "models" / model["orgId"] / mid / "v2"
    (stored / "model.bin").write_bytes(WEIGHTS)
    upgrade = api.post(f"/deployments/{dep}/deploy")
    done = api.get(f"/executions/{upgrade.json()['execution']['id']}/wait",
                   params={"timeout": 90}).json()
    assert done["status"] == "failed"
    assert done["steps"][0]["error"]["code"] == "checksum_mismatch"
    assert done["steps"][1]["status"] == "skipped"  # the server was never touched
    # So the deployment still runs, and serves, version 1 from the same server.
    after = api.get(f"/deployments/{dep}").json()
    assert after["status"] == "running" and after["modelVersion"] == 1, after
    assert after["error"].startswith("deploy failed: step 'download' failed: model.bin: sha256")
    assert after["error"].endswith("the server that ran before still serves (model version 1)")
    assert json.loads(state_file.read_text())["pid"] == serving["pid"]
    invoked = api.get(f"/models/{model['name']}/invoke/env/MODEL_DIR")
    assert invoked.status_code == 200 and Path(invoked.json()["value"]).name == "v1"
    assert invoked.headers["X-AIWM-Model-Version"] == "1"
    # A restart starts what it ran: version 1, whole.
    restart = api.post(f"/deployments/{dep}/restart")
    finished(api, restart)
    state = json.loads(state_file.read_text())
    assert Path(state["modelDir"]).name == "v1"
    assert api.get(f"/deployments/{dep}").json()["error"] is None
    # Once an upgrade's start step replaces the server, the deployment is `deploying`, on
    # the version the new server runs (here while its health check waits out 503s).
    assert upload(api, mid, [("model.bin", WEIGHTS)]).status_code == 201  # v3, whole
    slow = [sys.executable, model_server.__file__, "--port", "{port}", "--fail-health", "4"]
    assert api.patch(f"/deployments/{dep}", json={"command": slow}).status_code == 200
    replaced = api.post(f"/deployments/{dep}/deploy")
    seen = set()
    while (ex := api.get(f"/executions/{replaced.json()['execution']['id']}").json())["status"] \
            not in ("completed", "failed", "cancelled"):
        now = api.get(f"/deployments/{dep}").json()
        seen.add((now["status"], now["modelVersion"]))
        time.sleep(0.05)
    assert ex["status"] == "completed" and ("deploying", 3) in seen, (ex["status"], seen)
    assert ("deploying", 1) not in seen  # from the start step on, it names the new version
    assert api.get(f"/deployments/{dep}").json()["status"] == "running"
    # v2's leftovers went before v3 was fetched; the tidy step, beside the health check,
    # dropped v1, which the old server had run from.
    assert ex["steps"][0]["result"]["removedVersions"] == ["v2"]
    assert ex["steps"][4]["result"]["removedVersions"] == ["v1"]
    # An upgrade that fails once its start step replaced the server fails the deployment.
    patched = api.patch(f"/deployments/{dep}", json={"command": [sys.executable, "-c", "exit(3)"]})
    assert patched.status_code == 200, patched.text
    again = api.post(f"/deployments/{dep}/deploy", json={"modelVersion": 1})
    broken = api.get(f"/executions/{again.json()['execution']['id']}/wait",
                     params={"timeout": 90}).json()
    assert broken["status"] == "failed" and broken["steps"][1]["error"]["code"] == "start_failed"
    after = api.get(f"/deployments/{dep}").json()
    assert after["status"] == "failed" and after["modelVersion"] == 1  # what its start used
    finished(api, api.delete(f"/deployments/{dep}"))


async def test_a_tidy_step_spares_what_other_deployments_and_deploys_on_the_node_need(
        settings: Settings, unique: Callable[[str], str]) -> None:
    """What the orchestrator sends in a deploy's tidy step (``model.delete`` with ``keep``),
    read from the database as it stands when the step is sent."""
    from actors.deployment_flows import fresh_tidy, needed_on_node
    from actors.orchestrator import _doc

    store = Store.for_settings(settings)
    org, mid, node = unique("org"), unique("mdl"), unique("node")
    deployments = store.documents("deployments")

    async def deployment(version: int, on: str = node) -> str:
        doc_id = unique("dep")
        await deployments.insert(org_id=org, doc_id=doc_id, by="tester", fields={
            "name": doc_id, "modelId": mid, "nodeId": on, "modelVersion": version,
            "status": "running", "executionId": f"exe-of-{doc_id}"})
        return doc_id

    await deployment(1)  # runs v1 here
    moving = await deployment(2)  # the one being deleted: its v2 may go
    other = unique("mdl")
    await deployments.insert(org_id=org, doc_id=unique("dep"), by="tester", fields={
        "name": unique("dep"), "modelId": other, "nodeId": node, "modelVersion": 3,
        "status": "stopped"})  # another model's deployment here, stopped: still needed
    await deployment(5, on=unique("elsewhere"))  # another node's business
    gone = await deployment(6)
    await deployments.soft_delete(org, gone, None)  # deleted: needs nothing
    fetching = new_execution(ExecutionIn(name="deploy", steps=[StepIn(
        name="download", nodeId=node, command="model.download",
        data={"modelId": mid, "version": 7, "files": []})]),
        execution_id=f"exe-{unique('tidy')}", org_id=org, created_by="tester", now=utcnow(),
        default_max_retries=0)
    await store.executions.insert(_doc(fetching))  # an unfinished deploy fetching v7 here
    for version, status, execution_id in ((8, "failed", "exe-done"), (9, "failed", f"exe-of-{moving}")):
        ended = new_execution(ExecutionIn(name="deploy", steps=[StepIn(
            name="download", nodeId=node, command="model.download",
            data={"modelId": mid, "version": version, "files": []})]),
            execution_id=execution_id, org_id=org, created_by="tester", now=utcnow(),
            default_max_retries=0)
        await store.executions.insert({**_doc(ended), "status": status})
    # v8: a failed deploy nobody follows, so nothing; v9: the failed current deploy of a
    # live deployment, whose retry would start from those files.

    planned = {"modelId": mid, "keep": [4]}
    about = {"type": "deployment", "id": moving}
    sent = await fresh_tidy(store, org, node, planned, about, f"exe-of-{moving}")
    assert sent == {"modelId": mid, "keep": [1, 4, 7]}
    # An execution the deployment no longer follows (superseded, then retried) keeps its
    # version; so does one about no deployment.
    assert (await fresh_tidy(store, org, node, planned, about, "exe-old"))["keep"] == [1, 2, 4, 7, 9]
    assert (await fresh_tidy(store, org, node, planned, None, "exe-x"))["keep"] == [1, 2, 4, 7, 9]
    # What a download there may not evict, model by model (fresh_download's `spare`).
    assert await needed_on_node(store, org, node) == {mid: {1, 2, 7, 9}, other: {3}}
    assert await needed_on_node(store, org, node, model_id=mid, besides=moving) == {mid: {1, 7}}
    # Data that is no prune's goes as it is.
    assert await fresh_tidy(store, org, node, {"modelId": mid}, None, "exe-x") == {"modelId": mid}
