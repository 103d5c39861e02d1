"""Model files: uploads, versions, signed download URLs, and HuggingFace imports.

Every upload or import makes a new version of the model, kept in the object store
(MinIO/S3, or a local directory served with signed URLs). A version becomes visible only
once all its files are stored.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect

from aiwm.auth import Principal
from aiwm.errors import InUse, Unavailable, ValidationFailed
from aiwm.leftovers import working_in
from aiwm.models import entity
from aiwm.objectstore.base import model_prefix, signed_files, version_prefix
from aiwm.store import utcnow
from aiwm.uploads import UploadParser
from serve.crud import IfMatch, if_match
from serve.deps import operator, state, viewer
from serve.problems import AUTHENTICATED, responses

log = logging.getLogger("aiwm.models")
router = APIRouter(prefix="/models", tags=["models"], responses=responses(*AUTHENTICATED))
UPLOAD_PATH = "/api/models/upload"
ModelId = PathParam(max_length=100, description="The model's id")
MAX_VERSION = 2**31 - 1  # version numbers count up from 1: far below this


def objects(request: Request) -> Any:
    store = getattr(request.app.state, "object_store", None)
    if store is None:
        raise Unavailable("this server has no object store configured")
    return store


class ModelFile(BaseModel):
    name: str
    key: str
    size: int
    sha256: str


class ModelVersion(BaseModel):
    modelId: str
    version: int
    source: str
    files: list[ModelFile]
    bytes: int
    createdAt: dt.datetime
    createdBy: str
    model_config = ConfigDict(extra="allow")


@router.post(
    "/upload", status_code=201, response_model=ModelVersion,
    summary="Upload files as a new version of a model (operator): multipart/form-data with "
            "`modelId` (send it first) and one or more `file` parts; streamed to disk, never "
            "held in memory")
async def upload(request: Request, p: Principal = Depends(operator)) -> Any:
    spool = state(request).settings.aiwm_home / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="upload-", dir=spool))
    with working_in(staging):  # a sweep removes only folders no upload works in
        return await _receive(request, p, staging)


async def _receive(request: Request, p: Principal, staging: Path) -> Any:
    s = state(request)
    store = objects(request)
    parser = UploadParser(request.headers.get("content-type", ""), staging=staging,
                          max_file_bytes=s.settings.aiwm_max_upload_bytes,
                          direct_io=s.settings.aiwm_upload_direct_io)
    try:
        checked = False
        try:
            async for chunk in request.stream():
                parser.feed(chunk)
                await parser.drain()  # waits for the disk without blocking other requests
                if not checked and "modelId" in parser.fields:  # fail early, not after 50 GB
                    await s.store.documents("models").get(p.org_id, parser.fields["modelId"])
                    checked = True
        except ClientDisconnect:
            raise ValidationFailed("the client went away before the upload finished") from None
        parser.finish()
        model_id = parser.fields.get("modelId")
        missing = [f for f, ok in (("modelId", bool(model_id)), ("file", bool(parser.files)))
                   if not ok]
        if missing:
            raise ValidationFailed(f"missing form field(s): {', '.join(missing)}", extra={
                "errors": [{"field": f"body.{f}", "message": "required", "type": "missing"}
                           for f in missing]})
        assert model_id is not None
        await s.store.documents("models").get(p.org_id, model_id)
        version = await s.store.model_versions.allocate(p.org_id, model_id)
        prefix = version_prefix(p.org_id, model_id, version)
        stored = []
        try:
            for f in parser.files:
                obj = await store.put_file(prefix + f.name, f.path, move=True, sha256=f.sha256)
                stored.append({"name": f.name, "key": obj.key, "size": f.size,
                               "sha256": f.sha256})
            return await s.store.model_versions.add(
                org_id=p.org_id, model_id=model_id, version=version, by=p.sub, source="upload",
                files=stored, at=utcnow())
        except BaseException:
            await store.delete_prefix(prefix)  # no half-made version stays behind
            raise
    finally:
        parser.close()
        shutil.rmtree(staging, ignore_errors=True)


class UploadTarget(BaseModel):
    url: str | None = Field(description="where to POST uploads past the HTTP proxy; null "
                                        "when this server has no upload port")
    reason: str | None = Field(None, description="why there is none")


@router.get(
    "/upload-url", response_model=UploadTarget,
    summary="Where to send uploads fastest (operator): the upload port's "
            "POST /api/models/upload, which takes the same requests as this API's, past its "
            "HTTP proxy; null when there is none (then upload here)")
async def upload_url(request: Request, p: Principal = Depends(operator)) -> Any:
    settings = state(request).settings
    port = getattr(request.app.state, "upload_port", None)
    if port is None or not port.bound:
        reason = ("AIWM_UPLOAD_PORT is 0" if not settings.aiwm_upload_port else
                  "this API replica takes no uploads on AIWM_UPLOAD_PORT now (it could not "
                  "bind or serve it, or it is stopping): see its log")
        return {"url": None, "reason": reason}
    if settings.aiwm_upload_url:
        return {"url": settings.aiwm_upload_url}
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    if request.url.scheme == "https" or forwarded == "https" or \
            "proto=https" in request.headers.get("forwarded", "").lower().replace(" ", ""):
        return {"url": None, "reason": "the API is reached over HTTPS and the upload port "
                                       "speaks plain HTTP: set AIWM_UPLOAD_URL to a TLS proxy "
                                       "in front of it"}
    host = request.url.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return {"url": f"http://{host}:{settings.aiwm_upload_port}{UPLOAD_PATH}"}  # plain HTTP there


@router.get("/{model_id}/versions", responses=responses(404),
            summary="The model's versions, newest first")
async def versions(request: Request, model_id: str = ModelId,
                   p: Principal = Depends(viewer)) -> Any:
    s = state(request)
    await s.store.documents("models").get(p.org_id, model_id)
    return {"modelId": model_id, "data": await s.store.model_versions.list(p.org_id, model_id)}


MODEL = entity("models")


# {doc_id} as in the CRUD routes' GET, PUT and PATCH (one path template, as OpenAPI wants)
@router.delete(
    "/{doc_id}", response_model=MODEL.read, responses=responses(404, 409),
    summary="Delete a model (soft; refused while a deployment uses it) and free its files: "
            "every version leaves the object store (operator)")
async def delete_model(request: Request,
                       doc_id: str = PathParam(max_length=100, description="The model's id"),
                       if_match_header: str = IfMatch,
                       p: Principal = Depends(operator)) -> Any:
    s = state(request)
    store = objects(request)
    deleted = await s.writer.call("delete", p, MODEL.name, doc_id, if_match(if_match_header))
    try:
        count = await s.store.model_versions.hide_all(p.org_id, doc_id, utcnow())
        if count:
            await store.delete_prefix(model_prefix(p.org_id, doc_id))
            await s.store.model_versions.remove(p.org_id, doc_id)
    except Unavailable as e:  # the model is deleted either way: say where its files stay
        log.warning("model %s deleted, but its files are still in the object store under "
                    "%s: %s", doc_id, model_prefix(p.org_id, doc_id), e.detail,
                    extra={"modelId": doc_id})
    return deleted


class DeletedVersion(BaseModel):
    modelId: str
    version: int
    files: int
    bytes: int
    deleted: bool = True
    deployments: list[str] = Field(default_factory=list, description=(
        "deployments last deployed with this version: they keep running from their nodes' "
        "copies, but cannot deploy it again"))


@router.delete(
    "/{model_id}/versions/{version}", response_model=DeletedVersion,
    responses=responses(404, 409),
    summary="Delete one version of a model and its files from the object store (operator). "
            "Refused (409) while an unfinished execution downloads that version; the next "
            "highest version becomes the latest")
async def delete_version(request: Request, model_id: str = ModelId,
                         version: int = PathParam(ge=1, le=MAX_VERSION,
                                                  description="The version number"),
                         p: Principal = Depends(operator)) -> Any:
    s = state(request)
    store = objects(request)
    await s.store.documents("models").get(p.org_id, model_id)
    # Hidden first, so no deploy planned from now on picks it; then checked for a deploy
    # planned before, which may still be fetching it.
    found = await s.store.model_versions.hide(p.org_id, model_id, version, utcnow())
    busy = await s.store.executions.downloading(p.org_id, model_id, version)
    if busy is not None:
        await s.store.model_versions.unhide(p.org_id, model_id, version)
        raise InUse(f"version {version} of model {model_id!r} is being deployed by execution "
                    f"{busy!r}, whose node may still be downloading it: wait for it to end "
                    "or cancel it", extra={"usedBy": [{"entity": "executions", "id": busy}]})
    await store.delete_prefix(version_prefix(p.org_id, model_id, version))
    await s.store.model_versions.remove(p.org_id, model_id, version)
    deployments = s.store.documents("deployments")
    using = await deployments.find(deployments.live(p.org_id, modelId=model_id,
                                                    modelVersion=version))
    return {"modelId": model_id, "version": version, "files": len(found.get("files", [])),
            "bytes": int(found.get("bytes", 0)), "deleted": True,
            "deployments": [d["id"] for d in using]}


@router.get("/{model_id}/download-url", responses=responses(404),
            summary="Signed, expiring URLs of each file of a version (the latest by default)")
async def download_url(request: Request, model_id: str = ModelId,
                       version: int | None = Query(None, ge=1, le=MAX_VERSION),
                       expiresIn: int | None = Query(None, gt=0, le=7 * 86400,
                                                     description="seconds; default "
                                                     "AIWM_DOWNLOAD_URL_TTL"),
                       p: Principal = Depends(viewer)) -> Any:
    s = state(request)
    await s.store.documents("models").get(p.org_id, model_id)
    found = await s.store.model_versions.get(p.org_id, model_id, version)
    ttl = expiresIn or s.settings.aiwm_download_url_ttl
    return {"modelId": model_id, "version": found["version"],
            "expiresAt": (utcnow() + dt.timedelta(seconds=ttl)).isoformat(),
            "files": await signed_files(objects(request), found, ttl)}


class ImportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modelId: str = Field(min_length=1, max_length=100)
    repoId: str = Field(min_length=1, max_length=200,
                        pattern=r"^[A-Za-z0-9]([\w-]|\.[\w-])*(/[A-Za-z0-9]([\w-]|\.[\w-])*)?$",
                        description="a HuggingFace repo id, e.g. Qwen/Qwen2-0.5B")
    revision: str = Field("main", min_length=1, max_length=200)
    allowPatterns: list[str] | None = Field(None, max_length=100,
                                            description="e.g. ['*.json', '*.safetensors']")


@router.post("/download", status_code=202, responses=responses(404, 413),
             summary="Import a HuggingFace repo into the store as a new version (operator); it "
                     "runs as an execution with progress in bytes and files, and resumes after "
                     "an interruption")
async def import_repo(body: ImportBody, request: Request, p: Principal = Depends(operator)) -> Any:
    s = state(request)
    await s.store.documents("models").get(p.org_id, body.modelId)
    if s.orchestrator is None:
        raise Unavailable("imports need the orchestrator actor, which this server lacks")
    data = body.model_dump()
    execution = await s.orchestrator.call("create", p, {
        "name": f"import {body.repoId}@{body.revision}",
        "resource": {"type": "model", "id": body.modelId},
        "timeoutSeconds": 7 * 3600,
        "metadata": {"purpose": "model.import", "repoId": body.repoId},
        "steps": [{"name": "import", "kind": "controller", "command": "model.import",
                   "data": data, "timeoutSeconds": 6 * 3600, "maxRetries": 3,
                   "backoff": {"initialSeconds": 5, "factor": 2, "maxSeconds": 120}}],
    })
    return {"modelId": body.modelId, "execution": execution}
