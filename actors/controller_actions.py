"""Controller steps: the actions an execution runs inside the controller, by name.

Each action gets an :class:`ActionContext` and returns the step's result, or raises
:class:`StepFailure` (retryable or not). Actions must be safe to run twice: after an
orchestrator restart, an attempt that was running is run again.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from aiwm.errors import AiwmError
from aiwm.execution import Execution, Step, StepError
from aiwm.store import Store


class StepFailure(Exception):
    def __init__(self, code: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.error = StepError(code=code, message=message, retryable=retryable)


class Node(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...


@dataclass
class ActionContext:
    execution: Execution
    step: Step
    store: Store
    node: Callable[[str, str], Node]  # (node id, org id) -> the node's NodeProxy

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
}
