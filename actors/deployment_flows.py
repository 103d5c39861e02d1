"""Deployments as executions: build the plan from the stored documents, and move the
deployment's status as its execution starts and ends (for the orchestrator)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from aiwm.deployment_plans import (
    PURPOSES,
    deploy_plan,
    restart_plan,
    status_after,
    status_on_start,
    stop_plan,
)
from aiwm.errors import NotFound, ValidationFailed
from aiwm.execution import Execution, ExecutionIn
from aiwm.objectstore.base import signed_files
from aiwm.store import Store


async def plan_for(store: Store, org_id: str, deployment: dict, purpose: str, *,
                   objects: Any = None, url_ttl: int = 7 * 3600,
                   version: int | None = None) -> ExecutionIn:
    """The execution for ``purpose``. A deploy downloads the model's latest version (or
    ``version``) from the object store through signed URLs (``url_ttl`` seconds); a model
    with no version yet deploys with no files (the server brings its own)."""
    if purpose not in PURPOSES:
        raise ValidationFailed(f"unknown deployment action {purpose!r}; one of {', '.join(PURPOSES)}")
    if version is not None and purpose != "deploy":
        raise ValidationFailed(f"only a deploy takes a model version, not a {purpose}")
    if purpose == "deploy":
        model = await store.documents("models").get(org_id, deployment["modelId"])
        files: list[dict[str, Any]] = []
        if (model.get("latestVersion") or version is not None) and objects is not None:
            found = await store.model_versions.get(org_id, model["id"], version)  # 404 if none
            version = found["version"]
            files = await signed_files(objects, found, url_ttl)
        elif version is not None:
            raise ValidationFailed("this server has no object store to deploy a version from")
        return deploy_plan(deployment, model, files, version)
    if purpose == "restart":
        return restart_plan(deployment)
    return stop_plan(deployment, purpose)


async def on_execution(store: Store, ex: Execution, *, started: bool,
                       clock: Callable[[], dt.datetime]) -> None:
    """Apply a deployment execution's start or end to the deployment, unless a newer
    execution has taken the deployment over."""
    purpose = ex.metadata.get("purpose")
    dep_id = ex.metadata.get("deploymentId")
    if purpose not in PURPOSES or not dep_id:
        return
    deployments = store.documents("deployments")
    try:
        dep = await deployments.get(ex.orgId, dep_id)
    except NotFound:
        return
    if dep.get("executionId") != ex.id:
        return  # superseded
    if started:
        if purpose == "deploy" and dep.get("status") == "running":
            return  # an upgrade: the server running now serves until the start step replaces it
        await deployments.set_state(ex.orgId, dep_id, {"status": status_on_start(purpose)})
        return
    fields = status_after(ex)
    if purpose == "deploy" and fields.get("status") == "failed" and dep.get("status") == "running" \
            and not _sent(ex, "deployment.create"):
        # An upgrade that failed before its start step was sent (a download that failed,
        # a cancel): the server it was to replace was never touched and still serves.
        version = dep.get("modelVersion")
        fields = {"error": f"{fields['error']}; the server that ran before still serves"
                           + (f" (model version {version})" if version else "")}
    if purpose == "deploy" and fields.get("status") == "running":
        fields["modelVersion"] = deploy_version(ex)  # what it runs now; restarts start it
    if fields.pop("deleted", False):
        await deployments.soft_delete(ex.orgId, dep_id, None)
        kind = "deployment.deleted"
    else:
        await deployments.set_state(ex.orgId, dep_id, fields)
        kind = {"running": "deployment.completed", "stopped": "deployment.stopped"}.get(
            fields.get("status", ""), "deployment.failed")
    await store.events.record(org_id=ex.orgId, kind=kind, at=clock(),
                              resource={"type": "deployment", "id": dep_id},
                              data={"executionId": ex.id, "purpose": purpose,
                                    "status": fields.get("status", dep.get("status")),
                                    "error": fields.get("error")})


def _sent(ex: Execution, command: str) -> bool:
    """Whether a step running ``command`` was sent at least once."""
    return any(s.command == command and s.attempts > 0 for s in ex.steps)


async def replacing_server(store: Store, org_id: str, deployment_id: str, execution_id: str,
                           version: Any) -> None:
    """Call before a deploy's start step is sent: from here its server is replaced, so the
    deployment is ``deploying`` (an upgrade kept it ``running`` while it downloaded), and
    its ``modelVersion`` is the version the new server starts from (a restart starts that
    one, even if this deploy fails later). Nothing for a deployment that another execution
    has taken over meanwhile."""
    fields: dict[str, Any] = {"status": "deploying"}
    if isinstance(version, int) and not isinstance(version, bool):
        fields["modelVersion"] = version
    await store.documents("deployments").set_state_if(
        org_id, deployment_id, {"executionId": execution_id}, fields)


def deploy_version(spec: ExecutionIn | Execution) -> int | None:
    """The model version a deploy plan downloads and starts (None: the model has none)."""
    version = next((s.data.get("version") for s in spec.steps if s.command == "model.download"),
                   None)
    return version if isinstance(version, int) else None


async def fresh_download(store: Store, objects: Any, org_id: str, node_id: str,
                         data: dict[str, Any], url_ttl: int) -> dict[str, Any]:
    """A ``model.download`` step's data with its URLs signed anew, for each attempt,
    ``keep``: the versions of the model that deployments on the node run (their
    ``modelVersion``) or other unfinished executions are fetching there (the node removes
    the model's other version folders), and ``spare``: the same for every other model on
    the node (what the node may not evict to make room).

    The URLs planned with a deploy expire (``AIWM_DOWNLOAD_URL_TTL``); an attempt sent
    later (a retry the next morning, a node that was away for the night) would be
    refused with 403. When the data names a stored version (``modelId`` and
    ``version``), every file of that version gets a new URL; other data is sent as it
    is. A version deleted meanwhile fails the step with ``not_found``."""
    model_id, version = data.get("modelId"), data.get("version")
    files = data.get("files")
    if objects is None or not isinstance(model_id, str) or not isinstance(version, int) \
            or isinstance(version, bool) or not 1 <= version < 2**63 \
            or not isinstance(files, list) or not files:
        return data
    found = await store.model_versions.get(org_id, model_id, version)
    fresh = {f["name"]: f for f in await signed_files(objects, found, url_ttl)}
    needed = await needed_on_node(store, org_id, node_id)
    keep = sorted(needed.pop(model_id, set()) - {version})
    fields: dict[str, Any] = {"keep": keep}
    if len(needed) <= SPARE_LIMIT:  # more than a frame's field may hold: no eviction
        fields["spare"] = {m: sorted(v) for m, v in sorted(needed.items())}
    return {**data, **fields,
            "files": [fresh.get(f.get("name"), f) if isinstance(f, dict) else f for f in files]}


SPARE_LIMIT = 1000  # models in a download's ``spare`` (aiwm.protocol.ModelDownloadData)


async def needed_on_node(store: Store, org_id: str, node_id: str, *, model_id: str | None = None,
                         besides: str | None = None) -> dict[str, set[int]]:
    """Model id -> the versions a node must keep (of ``model_id`` only, if given): those
    its live deployments record (``besides``: but that deployment), those unfinished
    executions are fetching there, and those the current execution of each of those
    deployments fetched there even if it failed (a retry starts from those files)."""
    deployments = store.documents("deployments")
    query = deployments.live(org_id, nodeId=node_id,
                             **({"modelId": model_id} if model_id is not None else {}))
    live = [d for d in await deployments.find(query) if d["id"] != besides]
    current = [str(d["executionId"]) for d in live if d.get("executionId")]
    needed = await store.executions.fetching_on(org_id, node_id, model_id, also=current)
    # Deployments read again after the executions: a deploy that ends between the reads has
    # recorded its version on its deployment before it is saved as finished.
    for d in await deployments.find(query):
        version = d.get("modelVersion")
        if isinstance(d.get("modelId"), str) and d["id"] != besides \
                and isinstance(version, int) and version >= 1:
            needed.setdefault(d["modelId"], set()).add(version)
    return needed


async def versions_needed(store: Store, org_id: str, model_id: str, node_id: str, *,
                          besides: str | None = None) -> set[int]:
    """The versions of a model on a node that must stay there: those its live deployments
    there run (their ``modelVersion``; ``besides``: except that deployment's) and those
    unfinished executions are fetching there."""
    needed = await needed_on_node(store, org_id, node_id, model_id=model_id, besides=besides)
    return needed.get(model_id, set())


async def fresh_tidy(store: Store, org_id: str, node_id: str, data: dict[str, Any],
                     resource: dict[str, str] | None, execution_id: str) -> dict[str, Any]:
    """A ``model.prune`` step's data with ``keep`` grown, when it is sent, by every version
    the node still needs (:func:`versions_needed`), so it never removes what a deployment
    records or a deploy under way fetches. A delete's tidy step leaves out the deployment
    it deletes, while that delete is the deployment's current execution (its server is
    stopped and removed by then)."""
    model_id, keep = data.get("modelId"), data.get("keep")
    if not isinstance(model_id, str) or not isinstance(keep, list):
        return data
    besides = None
    if resource and resource.get("type") == "deployment":
        try:
            dep = await store.documents("deployments").get(org_id, resource["id"])
        except NotFound:
            dep = {}
        if dep.get("executionId") == execution_id:
            besides = resource["id"]
    needed = await versions_needed(store, org_id, model_id, node_id, besides=besides)
    return {**data, "keep": sorted({v for v in keep if isinstance(v, int)} | needed)}
