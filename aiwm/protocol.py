"""The node protocol: one envelope, one pydantic model per message type.

Both sides import this module: the controller (relay, NodeProxy) and the node agent,
which installs without Ray. Every frame is a JSON object::

    {type: "<resource>.<action>", messageId, timestamp, resource?, data, correlationId?,
     traceId?}

:func:`parse_frame` turns text into a typed frame or raises :class:`ProtocolError` with a
stable ``code``; the receiver answers that with an ``error`` frame and carries on.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import operator
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})


class ProtocolError(Exception):
    """A frame that cannot be used. ``code``: malformed_json, unknown_type, invalid_frame,
    too_large, unexpected."""

    def __init__(self, code: str, message: str, *, message_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.message_id = message_id


class Data(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer agents may send more


class ResourceRef(BaseModel):
    type: str = Field(min_length=1, max_length=50)
    id: str = Field(min_length=1, max_length=200)


class Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    messageId: str = Field(min_length=1, max_length=100)
    timestamp: dt.datetime
    resource: ResourceRef | None = None
    correlationId: str | None = Field(None, max_length=100)
    # The correlation id of the work a command was sent for (aiwm/logs.py): the agent
    # logs under it and copies it into the command's ack and result.
    traceId: str | None = Field(None, max_length=100, pattern=r"^[\x20-\x7e]+$")
    data: Any


# --- data of node -> controller messages ---------------------------------------------


# A bound, so that the node's gpuSummary.memoryTotal (the sum over at most 64 GPUs) fits
# in the 64-bit integer the database stores.
MAX_GPU_MEMORY = 2**50


class GpuInfo(Data):
    index: int
    uuid: str | None = None
    name: str
    memoryTotal: int = Field(ge=0, le=MAX_GPU_MEMORY, description="bytes")
    mock: bool = False


class RegisterData(Data):
    nodeId: str = Field(min_length=1, max_length=100)
    protocolVersion: int = PROTOCOL_VERSION
    agentVersion: str = Field(max_length=50)
    name: str | None = Field(None, max_length=200)
    hostname: str = Field(max_length=255)
    ipAddress: str | None = Field(None, max_length=64)
    publicIpAddress: str | None = Field(None, max_length=64)
    os: dict[str, Any] = Field(default_factory=dict)
    cpuCores: int = Field(ge=0)
    cpuModel: str | None = Field(None, max_length=300)
    ramTotal: int = Field(ge=0, description="bytes")
    gpuDevices: list[GpuInfo] = Field(default_factory=list, max_length=64)
    containerRuntime: dict[str, Any] = Field(default_factory=dict)
    heartbeatInterval: int = Field(30000, gt=0, le=3_600_000, description="milliseconds")
    metricsInterval: int = Field(60000, gt=0, le=86_400_000, description="milliseconds")


class HeartbeatData(Data):
    uptimeSeconds: float = Field(ge=0)
    runningCommands: int = Field(0, ge=0)


class GpuMetrics(Data):
    index: int
    utilization: float = Field(ge=0, le=100)
    memoryUsed: int = Field(ge=0)
    memoryTotal: int = Field(ge=0)
    temperature: float | None = None
    powerWatts: float | None = None
    mock: bool = False


class ContainerInfo(Data):
    id: str
    name: str
    image: str | None = None
    status: str
    deploymentId: str | None = None


class CachedModel(Data):
    """One model version (or, ``version`` null, a download that named none) in the
    node's model cache."""

    modelId: str = Field(max_length=200)
    version: int | None = Field(None, ge=1)
    files: int = Field(ge=0)
    bytes: int = Field(ge=0)
    complete: bool | None = Field(None, description="the version's download finished")


class MetricsData(Data):
    cpuPercent: float = Field(ge=0, le=100)
    ramUsed: int = Field(ge=0)
    ramTotal: int = Field(ge=0)
    diskUsed: int = Field(ge=0)
    diskTotal: int = Field(ge=0)
    gpus: list[GpuMetrics] = Field(default_factory=list, max_length=64)
    containers: list[ContainerInfo] = Field(default_factory=list, max_length=1000)
    models: list[CachedModel] = Field(default_factory=list, max_length=1000,
                                      description="what the model cache holds")
    modelDirFree: int | None = Field(None, ge=0, description="free bytes where models go")
    modelCacheMax: int | None = Field(None, gt=0, description="the cache's size limit, if any")


class DeploymentStatusData(Data):
    deploymentId: str
    status: str
    message: str | None = None
    endpoint: str | None = None


class DeploymentLogsData(Data):
    deploymentId: str
    lines: list[str] = Field(max_length=10_000)
    reason: str | None = Field(None, max_length=50, description="why they were sent: exited")


class DownloadProgressData(Data):
    modelId: str
    bytesDone: int = Field(ge=0)
    bytesTotal: int | None = Field(None, ge=0)
    filesDone: int = Field(0, ge=0)
    filesTotal: int | None = Field(None, ge=0)
    commandId: str | None = Field(None, max_length=200,
                                  description="the model.download command it reports on")


class AckData(Data):
    """Receipt of the frame named by the envelope's ``correlationId`` (either direction)."""


class ErrorInfo(BaseModel):
    code: str
    message: str


class ResultData(Data):
    """The outcome of the command named by ``correlationId``."""

    success: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None


# --- data of controller -> node messages ---------------------------------------------


class CommandData(Data):
    """A command with no fields of its own (system.healthCheck, system.restart)."""


class ModelFile(Data):
    name: str = Field(min_length=1, max_length=500, description="relative path in the model")
    url: str = Field(min_length=1, max_length=4000, description="where the node fetches it")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    size: int | None = Field(None, ge=0, description="bytes")


class ModelDownloadData(Data):
    modelId: str = Field(min_length=1, max_length=100)
    name: str | None = Field(None, max_length=200)
    version: int | None = Field(None, ge=1, description="a stored version: its own folder")
    files: list[ModelFile] = Field(default_factory=list, max_length=10_000)
    keep: list[PositiveInt] = Field(default_factory=list, max_length=1000,
                                    description="other versions deployments here still use")
    spare: dict[str, Annotated[list[PositiveInt], Field(max_length=1000)]] | None = Field(
        None, max_length=1000, description=(
            "other models' versions this node still needs; given, a download that does not "
            "fit first evicts other models' versions not named here, oldest first"))


class ModelDeleteData(Data):
    modelId: str = Field(min_length=1, max_length=100)
    version: int | None = Field(None, ge=1, description="that version only; none: all of it")


class ModelPruneData(Data):
    modelId: str = Field(min_length=1, max_length=100)
    keep: list[PositiveInt] = Field(max_length=1000, description=(
        "the versions that stay; the model's other version folders go, but those a server "
        "on the node was given"))


class DeploymentSpecData(Data):
    """What the node needs to start (or adopt) a deployment's model server."""

    deploymentId: str = Field(min_length=1, max_length=100)
    runtime: Literal["docker", "process"] = "docker"
    image: str | None = Field(None, max_length=300, description="docker runtime")
    command: list[str] = Field(default_factory=list, max_length=100)
    env: dict[str, str] = Field(default_factory=dict)
    port: int = Field(8000, gt=0, lt=65536, description="port the server listens on")
    gpus: int = Field(0, ge=0, le=64)
    memoryMb: int | None = Field(None, gt=0)
    cpus: float | None = Field(None, gt=0)
    modelId: str | None = Field(None, max_length=100)
    modelVersion: int | None = Field(None, ge=1, description="the version's folder, not the model's")
    healthPath: str = Field("/health", max_length=500)


class DeploymentRefData(Data):
    deploymentId: str = Field(min_length=1, max_length=100)


class LogsRequestData(DeploymentRefData):
    tail: int = Field(200, ge=1, le=10_000, description="last lines")


class HttpRequestData(DeploymentRefData):
    """One HTTP request for the deployment's server, carried over the node's socket (the
    gateway's path to nodes behind NAT). ``body`` is base64."""

    method: str = Field("GET", pattern=r"^[A-Z]{3,7}$")
    path: str = Field("/", max_length=4000, pattern=r"^/")
    headers: dict[str, str] = Field(default_factory=dict)
    body: str = Field("", description="base64")
    timeout: float = Field(60.0, gt=0, le=600, description="seconds")


class WelcomeData(Data):
    protocolVersion: int
    sessionId: str
    heartbeatInterval: int = Field(description="milliseconds")
    metricsInterval: int = Field(description="milliseconds")
    maxFrameBytes: int | None = Field(None, gt=0, description="larger frames end the session")


class ErrorData(Data):
    code: str
    message: str
    refMessageId: str | None = None


def _frame(name: str, data: type[BaseModel], *types: str) -> Any:
    literal = Literal[types]  # type: ignore[valid-type]
    return type(name, (Frame,), {"__annotations__": {"type": literal, "data": data}})


NODE_TO_CONTROLLER: dict[str, type[BaseModel]] = {
    "node.register": RegisterData,
    "telemetry.heartbeat": HeartbeatData,
    "telemetry.metrics": MetricsData,
    "deployment.status": DeploymentStatusData,
    "deployment.logs": DeploymentLogsData,
    "model.downloadProgress": DownloadProgressData,
    "command.ack": AckData,
    "command.result": ResultData,
}
COMMAND_DATA: dict[str, type[BaseModel]] = {
    "deployment.create": DeploymentSpecData,
    "deployment.stop": DeploymentRefData,
    "deployment.restart": DeploymentSpecData,
    "deployment.getLogs": LogsRequestData,
    "deployment.getStats": DeploymentRefData,
    "deployment.request": HttpRequestData,
    "model.download": ModelDownloadData,
    "model.delete": ModelDeleteData,
    "model.prune": ModelPruneData,
    "system.healthCheck": CommandData,
    "system.restart": CommandData,
}
COMMANDS = tuple(COMMAND_DATA)
# Queries answer about now: they are not kept for an offline node, nor sent again later.
LIVE_COMMANDS = frozenset({"deployment.getLogs", "deployment.getStats", "deployment.request"})
CONTROLLER_TO_NODE: dict[str, type[BaseModel]] = {
    **COMMAND_DATA,
    "session.welcome": WelcomeData,
    "command.ack": AckData,
    "command.cancel": AckData,  # stop the command named by correlationId; it answers "cancelled"
    "error": ErrorData,
}

_models: dict[str, Any] = {}
for _direction in (NODE_TO_CONTROLLER, CONTROLLER_TO_NODE):
    for _type, _data in _direction.items():
        if _type not in _models:
            _name = "".join(p[:1].upper() + p[1:] for p in _type.replace(".", "_").split("_"))
            _models[_type] = _frame(f"{_name}Frame", _data, _type)

_UNION: Any = functools.reduce(operator.or_, _models.values())
AnyFrame: Any = Annotated[_UNION, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyFrame)


MAX_DEPTH = 64  # objects and arrays inside one another; pydantic stops near 255, MongoDB at 100
INT64 = (-(2**63), 2**63 - 1)
# actors/channel.py carries AiwmErrors as {"__aiwm_error__": ...} objects and reads every
# such object as one: in a frame, it would reach the node host as an error object (which
# the database cannot store), or fail to decode and drop the channel's connection, and
# with it the calls of every session on it.
RESERVED_KEY = "__aiwm_error__"


def _not_utf8(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check(obj: Any, *, storable: bool) -> str | None:
    """Raise for what makes a parsed frame unreadable (nesting beyond :data:`MAX_DEPTH`,
    lone surrogates); return, if ``storable``, why the controller could not store it
    (None: it could). One pass, each scalar checked where it is found."""
    unstorable: str | None = None
    low, high = INT64
    stack: list[tuple[Any, int]] = [([obj], 0)]
    while stack:
        container, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError("malformed_json",
                                f"frame is nested too deeply (over {MAX_DEPTH} levels)")
        if type(container) is dict:
            for key in container:
                if _not_utf8(key):
                    raise ProtocolError("malformed_json",
                                        "frame is not valid UTF-8: a lone surrogate in a key")
                if storable and unstorable is None and ("\x00" in key or key == RESERVED_KEY):
                    unstorable = f"field name {key[:40]!r} is not allowed"
            values = container.values()
        else:
            values = container
        for value in values:
            kind = type(value)
            if kind is dict or kind is list:
                stack.append((value, depth + 1))
            elif kind is str:
                if _not_utf8(value):
                    raise ProtocolError("malformed_json",
                                        "frame is not valid UTF-8: a lone surrogate")
            elif kind is int and storable and unstorable is None and not low <= value <= high:
                unstorable = f"integer {str(value)[:30]} does not fit in 64 bits"
    return unstorable


def parse_frame(raw: str | bytes, *, allowed: Mapping[str, Any], storable: bool = False) -> Frame:
    """Parse one frame that this side may receive (``allowed``: the other side's types).

    ``storable`` (the controller) also refuses what the database could not store, integers
    beyond 64 bits and field names holding NUL, and the channel's reserved field name
    ``__aiwm_error__``."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError("malformed_json", f"frame is not valid JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("malformed_json", "frame is nested too deeply") from None
    unstorable = _check(obj, storable=storable)
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_frame", "frame must be a JSON object")
    message_id = obj.get("messageId") if isinstance(obj.get("messageId"), str) else None
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in allowed:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {kind!r}; expected one of {', '.join(sorted(allowed))}",
            message_id=message_id,
        )
    if unstorable:
        raise ProtocolError("invalid_frame", f"invalid {kind} frame: {unstorable}",
                            message_id=message_id)
    try:
        frame: Frame = _ADAPTER.validate_python(obj)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'][1:])) or 'frame'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise ProtocolError("invalid_frame", f"invalid {kind} frame: {problems}",
                            message_id=message_id) from None
    return frame


def new_message_id() -> str:
    return uuid.uuid4().hex


def make_frame(
    kind: str,
    data: dict[str, Any] | BaseModel | None = None,
    *,
    correlation_id: str | None = None,
    trace_id: str | None = None,
    resource: dict[str, str] | None = None,
    message_id: str | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """A frame as a JSON-ready dict (validated against its type's model)."""
    if kind not in _models:
        raise ValueError(f"unknown message type {kind!r}")
    body = data.model_dump(mode="json") if isinstance(data, BaseModel) else (data or {})
    frame = _models[kind].model_validate({
        "type": kind,
        "messageId": message_id or new_message_id(),
        "timestamp": now or dt.datetime.now(dt.UTC),
        "resource": resource,
        "correlationId": correlation_id,
        "traceId": trace_id,
        "data": body,
    })
    return frame.model_dump(mode="json", exclude_none=True)  # type: ignore[no-any-return]


def error_frame(code: str, message: str, ref: str | None = None) -> dict[str, Any]:
    return make_frame("error", {"code": code, "message": message, "refMessageId": ref})
