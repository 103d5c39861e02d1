"""Controller steps: the actions an execution runs inside the controller, by name.

Each action gets an :class:`ActionContext` and returns the step's result, or raises
:class:`StepFailure` (retryable or not). Actions must be safe to run twice: after an
orchestrator restart, an attempt that was running is run again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from aiwm.errors import AiwmError, NotFound
from aiwm.execution import Execution, Step, StepError
from aiwm.model_import import ImportProgress, RepoFile, fetch_repo, list_repo_files
from aiwm.objectstore.base import version_prefix
from aiwm.store import Store


class StepFailure(Exception):
    def __init__(self, code: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.error = StepError(code=code, message=message, retryable=retryable)


class Node(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...


async def _no_progress(progress: dict[str, Any]) -> None:
    return None


@dataclass
class ActionContext:
    execution: Execution
    step: Step
    store: Store
    node: Callable[[str, str], Node]  # (node id, org id) -> the node's NodeProxy
    objects: Any = None  # the object store of model files (aiwm.objectstore)
    settings: Any = None
    # Report how far the attempt got (stored as the step's progress; call at most ~1/s).
    progress: Callable[[dict[str, Any]], Coroutine[Any, Any, None]] = _no_progress

    def step_named(self, name: str) -> Step:
        for step in self.execution.steps:
            if step.name == name:
                return step
        raise StepFailure("invalid_step", f"no step named {name!r}", retryable=False)


Action = Callable[[ActionContext], Awaitable[dict[str, Any]]]


async def wait(ctx: ActionContext) -> dict[str, Any]:
    """Sleep ``data.seconds`` (a delay between steps)."""
    seconds = _number(ctx.step.data, "seconds", 1.0, 0, 7 * 86400)
    await asyncio.sleep(seconds)
    return {"waited": seconds}


async def http_check(ctx: ActionContext) -> dict[str, Any]:
    """``data.url`` answers with a status in ``data.expect`` (default: any 2xx)."""
    url = ctx.step.data.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise StepFailure("invalid_step", "http.check needs data.url (http or https)",
                          retryable=False)
    expect = ctx.step.data.get("expect")
    method = str(ctx.step.data.get("method", "GET")).upper()
    timeout = _number(ctx.step.data, "timeout", 10.0, 0.1, 600)
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.request(method, url)
    except httpx.HTTPError as e:
        raise StepFailure("unreachable", f"{method} {url}: {type(e).__name__}: {e}") from None
    ok = response.status_code in expect if isinstance(expect, list) else response.is_success
    if not ok:
        raise StepFailure("unexpected_status", f"{method} {url} answered {response.status_code}")
    return {"status": response.status_code, "body": response.text[:1000]}


async def gateway_configure(ctx: ActionContext) -> dict[str, Any]:
    """Record where the deployment's server answers, for the gateway to route to."""
    dep_id = ctx.step.data["deploymentId"]
    started = ctx.step_named(ctx.step.data.get("fromStep", "start")).result or {}
    if "hostPort" not in started:
        raise StepFailure("invalid_step", "the start step reported no hostPort", retryable=False)
    deployment = await ctx.store.documents("deployments").get(ctx.execution.orgId, dep_id)
    model = await ctx.store.documents("models").get(ctx.execution.orgId, deployment["modelId"])
    route = f"/api/models/{model['name']}/invoke/"
    await ctx.store.documents("deployments").set_state(ctx.execution.orgId, dep_id, {
        "endpoint": started.get("endpoint"), "hostPort": started["hostPort"], "route": route,
        "runtimeId": started.get("containerId") or started.get("pid")})
    return {"route": route, "endpoint": started.get("endpoint")}


async def gateway_remove(ctx: ActionContext) -> dict[str, Any]:
    dep_id = ctx.step.data["deploymentId"]
    await ctx.store.documents("deployments").set_state(ctx.execution.orgId, dep_id,
                                                       {"route": None})
    return {"removed": True}


async def deployment_health(ctx: ActionContext) -> dict[str, Any]:
    """GET the server's health path through the node's socket (as the gateway will)."""
    data = ctx.step.data
    path = str(data.get("path") or "/health")
    node = ctx.node(data["nodeId"], ctx.execution.orgId)
    try:
        reply = await node.call("execute", "deployment.request",
                                {"deploymentId": data["deploymentId"], "method": "GET",
                                 "path": path, "timeout": 10.0}, 15.0)
    except AiwmError as e:
        raise StepFailure(e.code, e.detail) from None
    if not reply.get("success"):
        err = reply.get("error") or {}
        raise StepFailure(err.get("code", "health_failed"), err.get("message", "no answer"))
    status = int(reply["result"]["status"])
    if not 200 <= status < 300:
        body = base64.b64decode(reply["result"].get("body") or "")[:200]
        raise StepFailure("unhealthy", f"GET {path} answered {status}: {body!r}")
    return {"status": status}


async def model_import(ctx: ActionContext) -> dict[str, Any]:
    """Fetch a HuggingFace repo (resuming what an earlier attempt left in its staging
    folder), store its files as a new version; a failure leaves no version behind."""
    data, settings, org = ctx.step.data, ctx.settings, ctx.execution.orgId
    if ctx.objects is None or settings is None:
        raise StepFailure("invalid_step", "model.import needs the object store", retryable=False)
    # An attempt that stored its version but whose success was never recorded (the
    # orchestrator stopped in between) runs again: it answers with that version rather
    # than fetching the repo once more and making a second one.
    made = await ctx.store.model_versions.made_by(org, data["modelId"], ctx.execution.id)
    if made is not None:
        return _imported(made)
    tag = hashlib.sha256(f"{org}/{data['modelId']}/{data['repoId']}@{data.get('revision')}"
                         .encode()).hexdigest()[:16]
    staging = Path(settings.aiwm_home) / "imports" / tag  # the same for every attempt
    staging.mkdir(parents=True, exist_ok=True)
    os.utime(staging)  # in use again: aiwm.leftovers counts its age from the last write
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    last = [0.0]

    def report(p: ImportProgress) -> None:  # called from the download thread
        now = time.monotonic()
        if now - last[0] >= 1.0 or p.files_done == p.files_total:
            last[0] = now
            asyncio.run_coroutine_threadsafe(ctx.progress({
                "bytesDone": p.bytes_done, "bytesTotal": p.bytes_total,
                "filesDone": p.files_done, "filesTotal": p.files_total,
                "current": p.current}), loop)

    token = settings.huggingface_api_key.get_secret_value() if settings.huggingface_api_key \
        else None
    # Importing again what the latest version already holds (the same commit, the same
    # files) makes no new version: the answer names that one, with "unchanged".
    commit, listed = await asyncio.to_thread(
        list_repo_files, repo_id=data["repoId"], revision=data.get("revision") or "main",
        allow_patterns=data.get("allowPatterns"), endpoint=settings.hf_endpoint, token=token)
    same = await _latest_if_same(ctx.store, org, data, commit, listed)
    if same is not None:
        with contextlib.suppress(OSError):  # left alone if an earlier attempt's files are in it
            staging.rmdir()
        return {**_imported(same), "unchanged": True}
    try:
        commit, fetched = await asyncio.to_thread(
            fetch_repo, repo_id=data["repoId"], revision=data.get("revision") or "main",
            allow_patterns=data.get("allowPatterns"), staging_dir=staging,
            endpoint=settings.hf_endpoint, token=token, progress=report, cancel=cancel)
    except asyncio.CancelledError:
        cancel.set()  # the thread stops at its next chunk; what it fetched stays for a retry
        raise
    if not fetched:
        raise StepFailure("no_files", f"{data['repoId']} has no files matching "
                          f"{data.get('allowPatterns')}", retryable=False)
    version = await ctx.store.model_versions.allocate(org, data["modelId"])
    prefix = version_prefix(org, data["modelId"], version)
    stored = []
    try:
        for repo_file, path in fetched:
            obj = await ctx.objects.put_file(prefix + repo_file.name, path, move=True,
                                             sha256=repo_file.sha256)
            stored.append({"name": repo_file.name, "key": obj.key, "size": obj.size,
                           "sha256": obj.sha256})
        await ctx.store.model_versions.add(
            org_id=org, model_id=data["modelId"], version=version, by=ctx.execution.createdBy,
            source="huggingface", files=stored, at=ctx.execution.updatedAt,
            details={"repoId": data["repoId"], "revision": data.get("revision"),
                     "commit": commit, "executionId": ctx.execution.id})
    except BaseException:
        await ctx.objects.delete_prefix(prefix)
        raise
    await asyncio.to_thread(shutil.rmtree, staging, True)
    return _imported({"modelId": data["modelId"], "version": version, "commit": commit,
                      "files": stored})


async def _latest_if_same(store: Store, org_id: str, data: dict[str, Any], commit: str,
                          listed: list[RepoFile]) -> dict[str, Any] | None:
    """The model's latest version if it is this repo at this commit with these files."""
    try:
        latest = await store.model_versions.get(org_id, data["modelId"])
    except NotFound:
        return None
    if latest.get("source") != "huggingface" or latest.get("repoId") != data["repoId"] \
            or latest.get("commit") != commit:
        return None
    have = {f["name"]: f for f in latest["files"]}
    if set(have) != {f.name for f in listed}:
        return None
    for f in listed:
        if (f.size is not None and have[f.name]["size"] != f.size) or \
                (f.sha256 is not None and have[f.name]["sha256"] != f.sha256):
            return None
    return latest


def _imported(version: dict[str, Any]) -> dict[str, Any]:
    """model.import's result, from the version it made."""
    return {"modelId": version["modelId"], "version": version["version"],
            "commit": version.get("commit"), "files": len(version["files"]),
            "bytes": sum(int(f["size"]) for f in version["files"])}


def _number(data: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = data.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
        raise StepFailure("invalid_step", f"data.{key} must be a number from {lo:g} to {hi:g}",
                          retryable=False)
    return float(value)


ACTIONS: dict[str, Action] = {
    "wait": wait,
    "http.check": http_check,
    "gateway.configure": gateway_configure,
    "gateway.remove": gateway_remove,
    "deployment.healthCheck": deployment_health,
    "model.import": model_import,
}
