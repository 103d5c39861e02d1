"""The gateway: users call a deployed model through AIWM.

``/api/models/{name}/<path>`` goes to ``<path>`` of a running deployment of that model;
``/v1/<path>`` (OpenAI style) picks the model from the JSON body's ``model`` field, and
``GET /v1/models`` lists the models that are running.

Traffic reaches the node through the node's own WebSocket (a ``deployment.request``
command), so a node behind NAT needs no inbound port: the same outbound connection that
carries its commands carries its requests. The cost is that a request and its answer
each travel as one frame (no streaming; bodies up to the frame limit, 1 MiB by default).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from aiwm.auth import Principal
from aiwm.errors import NotFound, PayloadTooLarge, Unavailable, ValidationFailed
from serve.deps import state, viewer
from serve.problems import AUTHENTICATED, responses

router = APIRouter(tags=["gateway"])
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "host", "content-length", "authorization", "proxy-authorization",
              "accept-encoding"}  # the answer comes back decoded: ask for none
_turn = itertools.count()  # round robin over a model's running deployments


PICK_DEPLOYMENT = "x-aiwm-deployment"  # request headers that narrow the choice; not passed on
PICK_VERSION = "x-aiwm-model-version"


def _picked(request: Request) -> dict[str, Any]:
    """The deployment filter the caller's ``X-AIWM-Deployment`` / ``X-AIWM-Model-Version``
    ask for (to call one version while two run side by side, say)."""
    match: dict[str, Any] = {}
    version = request.headers.get(PICK_VERSION)
    if version is not None:
        if not re.fullmatch(r"[0-9]{1,10}", version.strip()) or not 1 <= int(version) < 2**31:
            raise ValidationFailed(f"X-AIWM-Model-Version must be a version number, not "
                                   f"{version[:40]!r}", extra={"errors": [{
                                       "field": "header.x-aiwm-model-version",
                                       "type": "int_parsing", "message": "a number >= 1"}]})
        match["modelVersion"] = int(version)
    deployment = request.headers.get(PICK_DEPLOYMENT)
    if deployment is not None:
        match["id"] = deployment.strip()
    return match


async def _running(request: Request, org_id: str, model_name: str) -> dict[str, Any]:
    store = state(request).store
    picked = _picked(request)
    models = await store.documents("models").find(
        {"orgId": org_id, "deletedAt": None, "name": model_name}, limit=1)
    if not models:
        raise NotFound(f"no model named {model_name!r}")
    running = await store.documents("deployments").find(
        {"orgId": org_id, "deletedAt": None, "modelId": models[0]["id"], "status": "running",
         "route": {"$ne": None}, **picked}, sort=(("createdAt", 1),))
    if not running:
        which = ", ".join(f"{'version' if k == 'modelVersion' else 'deployment'} {v}"
                          for k, v in picked.items())
        raise Unavailable(f"model {model_name!r} has no running deployment"
                          + (f" with {which}" if which else "")
                          + "; deploy it with POST /api/deployments")
    return running[next(_turn) % len(running)]


async def _forward(request: Request, p: Principal, model_name: str, path: str,
                   body: bytes) -> Response:
    deployment = await _running(request, p.org_id, model_name)
    limit = state(request).settings.ws_max_frame_bytes * 3 // 4 - 4096  # base64 + envelope
    if len(body) > limit:
        raise PayloadTooLarge(f"the gateway carries bodies up to {limit} bytes")
    headers = {k: v for k, v in request.headers.items()
               if k.lower() not in HOP_BY_HOP and k.lower() not in (PICK_DEPLOYMENT, PICK_VERSION)}
    query = request.url.query
    data = {"deploymentId": deployment["id"], "method": request.method,
            "path": "/" + path.lstrip("/") + (f"?{query}" if query else ""),
            "headers": headers, "body": base64.b64encode(body).decode(), "timeout": 120.0}
    node = state(request).node(deployment["nodeId"], p.org_id)
    reply = await node.call("execute", "deployment.request", data, 130.0)
    if not reply.get("success"):
        err = reply.get("error") or {}
        raise Unavailable(f"deployment {deployment['id']} on node {deployment['nodeId']} did not "
                          f"answer: {err.get('code')}: {err.get('message')}")
    result = reply["result"]
    out_headers = {k: v for k, v in (result.get("headers") or {}).items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"}
    out_headers["X-AIWM-Deployment"] = deployment["id"]
    if deployment.get("modelVersion") is not None:
        out_headers["X-AIWM-Model-Version"] = str(deployment["modelVersion"])
    return Response(base64.b64decode(result.get("body") or ""), status_code=int(result["status"]),
                    headers=out_headers)


async def model_gateway(model_name: str, path: str, request: Request,
                        p: Principal = Depends(viewer)) -> Response:
    return await _forward(request, p, model_name, path, await request.body())


for _method in METHODS:  # a route per method: one route would give them one operationId
    router.add_api_route(
        "/api/models/{model_name}/invoke/{path:path}", model_gateway, methods=[_method],
        responses=responses(*AUTHENTICATED, 404, 413),
        summary="Call a running deployment of the model (any path of its server)")


@router.get("/v1/models", responses=responses(401, 403, 503),
            summary="OpenAI style: the models that have a running deployment")
async def openai_models(request: Request, p: Principal = Depends(viewer)) -> Any:
    store = state(request).store
    running = await store.documents("deployments").find(
        {"orgId": p.org_id, "deletedAt": None, "status": "running", "route": {"$ne": None}})
    ids = sorted({d["modelId"] for d in running})
    models = await store.documents("models").find(
        {"orgId": p.org_id, "deletedAt": None, "id": {"$in": ids}}) if ids else []
    return {"object": "list", "data": [
        {"id": m["name"], "object": "model", "owned_by": p.org_id,
         "created": int(m["createdAt"].timestamp())} for m in models]}


# The OpenAI-style body as documented: it goes on as sent, the gateway reads only `model`
OPENAI_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["model"],
    "properties": {"model": {"type": "string", "minLength": 1,
                             "description": "the name of a model with a running deployment"}}}}}}}


@router.api_route("/v1/{path:path}", methods=["POST"], responses=responses(*AUTHENTICATED, 404, 413),
                  openapi_extra=OPENAI_BODY,
                  summary="OpenAI style: the JSON body's `model` names the model to call")
async def openai_gateway(path: str, request: Request,
                         p: Principal = Depends(viewer)) -> Response:
    body = await request.body()
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        model = None
    if not isinstance(model, str) or not model:
        raise ValidationFailed("the body must be a JSON object naming the model in 'model'",
                               extra={"errors": [{"field": "body.model", "type": "missing",
                                                  "message": "the model's name"}]})
    return await _forward(request, p, model, f"v1/{path}", body)
