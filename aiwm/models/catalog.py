"""The catalog entities of the seed plan: what clients write, and what the server adds."""

from __future__ import annotations

import datetime as dt
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, Field, HttpUrl, WithJsonSchema

from aiwm.models.base import EntitySpec, FilterField, Input, Name, Reference, Tags, read_model

Text = Field(None, max_length=5000)


# --- nodes -------------------------------------------------------------------------


class NodeRole(str, Enum):
    worker = "worker"
    proxy = "proxy"
    controller = "controller"


class NodeStatus(str, Enum):
    pending = "pending"
    online = "online"
    offline = "offline"


class NodeIn(Input):
    name: str = Name
    description: str | None = Text
    role: NodeRole = NodeRole.worker
    hostname: str | None = Field(None, max_length=255)
    ipAddress: str | None = Field(None, max_length=64)
    publicIpAddress: str | None = Field(None, max_length=64)
    tags: list[str] = Tags
    labels: dict[str, str] = Field(default_factory=dict)


class GpuDevice(BaseModel):
    index: int
    uuid: str | None = None
    name: str
    memoryTotal: int = Field(description="bytes")
    mock: bool = False


class GpuSummary(BaseModel):
    count: int
    memoryTotal: int = Field(description="bytes, all GPUs")
    names: list[str]
    mock: bool


class TokenMetadata(BaseModel):
    tokenId: str | None = None
    lastGenerated: dt.datetime | None = None
    expiresAt: dt.datetime | None = None
    description: str | None = None
    revokedAt: dt.datetime | None = None


NodeOut = read_model(
    "Node",
    NodeIn,
    status=(NodeStatus, NodeStatus.pending),
    lastHeartbeatAt=(dt.datetime | None, None),
    os=(dict[str, Any] | None, None),
    cpuCores=(int | None, None),
    cpuModel=(str | None, None),
    ramTotal=(int | None, None),
    gpuDevices=(list[GpuDevice], []),
    containerRuntime=(dict[str, Any] | None, None),
    agentVersion=(str | None, None),
    protocolVersion=(int | None, None),
    heartbeatInterval=(int | None, Field(None, description="ms, as the node declared")),
    gpuSummary=(GpuSummary | None, None),
    tokenMetadata=(TokenMetadata | None, None),
)


# --- models ------------------------------------------------------------------------


class ModelType(str, Enum):
    llm = "llm"
    embedding = "embedding"
    vision = "vision"
    speech = "speech"
    image = "image"
    other = "other"


class ModelSource(str, Enum):
    huggingface = "huggingface"
    upload = "upload"
    custom = "custom"


class ModelIn(Input):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = Text
    type: ModelType = ModelType.llm
    source: ModelSource = ModelSource.huggingface
    repository: str | None = Field(None, max_length=300, description="e.g. a HuggingFace repo id")
    revision: str = Field("main", max_length=200)
    format: str | None = Field(None, max_length=50, description="safetensors, gguf, onnx...")
    framework: str | None = Field(None, max_length=50, description="vllm, llama.cpp, tgi...")
    sizeBytes: int | None = Field(None, ge=0)
    tags: list[str] = Tags
    metadata: dict[str, Any] = Field(default_factory=dict)


ModelOut = read_model("Model", ModelIn, status=(str, "registered"))


# --- deployments -------------------------------------------------------------------


class Runtime(str, Enum):
    docker = "docker"
    process = "process"


class DeploymentStatus(str, Enum):
    pending = "pending"
    deploying = "deploying"
    running = "running"
    stopping = "stopping"
    stopped = "stopped"
    failed = "failed"


class Resources(Input):
    gpus: int = Field(0, ge=0, le=64)
    memoryMb: int | None = Field(None, gt=0)
    cpus: float | None = Field(None, gt=0)


class DeploymentIn(Input):
    name: str = Name
    description: str | None = Text
    modelId: str = Field(min_length=1, max_length=100)
    nodeId: str = Field(min_length=1, max_length=100)
    runtime: Runtime = Runtime.docker
    image: str | None = Field(None, max_length=300)
    command: list[str] = Field(default_factory=list, max_length=100)
    env: dict[str, str] = Field(default_factory=dict)
    port: int = Field(8000, gt=0, lt=65536, description="Port the model server listens on")
    healthPath: str = Field("/health", max_length=500, pattern=r"^/",
                            description="answers 2xx once the server is ready")
    resources: Resources = Field(default_factory=Resources)
    tags: list[str] = Tags


DeploymentOut = read_model(
    "Deployment",
    DeploymentIn,
    status=(DeploymentStatus, DeploymentStatus.pending),
    endpoint=(str | None, Field(None, description="where the server answers on its node")),
    route=(str | None, Field(None, description="the gateway path that reaches it")),
    hostPort=(int | None, None),
    runtimeId=(str | int | None, Field(None, description="container id or process id")),
    executionId=(str | None, Field(None, description="the latest deploy/stop/restart run")),
    modelVersion=(int | None, Field(None, description="the model version it runs, set when a "
                                                      "deploy completes; a restart starts it")),
    error=(str | None, None),
)


# --- instructions ------------------------------------------------------------------


class InstructionIn(Input):
    name: str = Name
    description: str | None = Text
    systemPrompt: str = Field(min_length=1, max_length=100_000)
    guidelines: list[str] = Field(default_factory=list, max_length=200)
    tags: list[str] = Tags
    isActive: bool = True


InstructionOut = read_model("Instruction", InstructionIn)


# --- tools -------------------------------------------------------------------------


class ToolType(str, Enum):
    mcp = "mcp"
    builtin = "builtin"
    api = "api"


class ToolTransport(str, Enum):
    stdio = "stdio"
    sse = "sse"
    http = "http"


# pydantic's HttpUrl holds up to 2083 characters once normalised, and normalising can
# add a "/" ("http://host" -> "http://host/"): documented as 2082 where clients send
# one, every URL the schema allows is accepted.
HttpEndpoint = Annotated[HttpUrl, WithJsonSchema(
    {"type": "string", "format": "uri", "minLength": 1, "maxLength": 2082}, mode="validation")]


class ToolIn(Input):
    name: str = Name
    description: str | None = Text
    type: ToolType = ToolType.mcp
    transport: ToolTransport = ToolTransport.http
    endpoint: HttpEndpoint | None = None
    command: list[str] = Field(default_factory=list, max_length=100)
    env: dict[str, str] = Field(default_factory=dict)
    inputSchema: dict[str, Any] = Field(default_factory=dict)
    isActive: bool = True
    tags: list[str] = Tags


ToolOut = read_model("Tool", ToolIn)


# --- agents ------------------------------------------------------------------------


class AgentStatus(str, Enum):
    active = "active"
    inactive = "inactive"


class LlmConfig(Input):
    temperature: float = Field(0.7, ge=0, le=2)
    maxTokens: int = Field(1024, gt=0, le=1_000_000)
    topP: float = Field(1.0, gt=0, le=1)


class AgentIn(Input):
    name: str = Name
    description: str | None = Text
    instructionId: str | None = Field(None, max_length=100)
    modelId: str | None = Field(None, max_length=100)
    toolIds: list[str] = Field(default_factory=list, max_length=100)
    status: AgentStatus = AgentStatus.active
    llmConfig: LlmConfig = Field(default_factory=LlmConfig)
    tags: list[str] = Tags


AgentOut = read_model("Agent", AgentIn)


# --- conversations and messages ----------------------------------------------------


class ConversationStatus(str, Enum):
    active = "active"
    archived = "archived"


class ConversationIn(Input):
    title: str = Field(min_length=1, max_length=500)
    agentId: str | None = Field(None, max_length=100)
    status: ConversationStatus = ConversationStatus.active
    tags: list[str] = Tags


ConversationOut = read_model("Conversation", ConversationIn)


class MessageRole(str, Enum):
    system = "system"
    user = "user"
    assistant = "assistant"
    tool = "tool"


class MessageIn(Input):
    conversationId: str = Field(min_length=1, max_length=100)
    role: MessageRole
    content: str = Field("", max_length=500_000)
    toolCalls: list[dict[str, Any]] = Field(default_factory=list, max_length=100)
    toolCallId: str | None = Field(None, max_length=200)
    tokens: int | None = Field(None, ge=0)
    metadata: dict[str, Any] = Field(default_factory=dict)


MessageOut = read_model("Message", MessageIn)


# --- the table the generic machinery reads ------------------------------------------

TAGS = FilterField("tags")

ENTITIES: dict[str, EntitySpec] = {
    spec.name: spec
    for spec in (
        EntitySpec(
            name="nodes", singular="node", id_prefix="node", create=NodeIn, read=NodeOut,
            filters=(FilterField("status"), FilterField("role"), FilterField("hostname"), TAGS),
            sortable=("createdAt", "updatedAt", "name", "lastHeartbeatAt"),
            unique=("name",),
        ),
        EntitySpec(
            name="models", singular="model", id_prefix="mdl", create=ModelIn, read=ModelOut,
            filters=(FilterField("type"), FilterField("source"), FilterField("status"), TAGS),
            unique=("name",),
        ),
        EntitySpec(
            name="deployments", singular="deployment", id_prefix="dep",
            create=DeploymentIn, read=DeploymentOut,
            references=(
                Reference("modelId", "models", "model", required=True),
                Reference("nodeId", "nodes", "node", required=True),
            ),
            filters=(FilterField("status"), FilterField("modelId"), FilterField("nodeId"),
                     FilterField("runtime"), TAGS),
        ),
        EntitySpec(
            name="instructions", singular="instruction", id_prefix="ins",
            create=InstructionIn, read=InstructionOut,
            filters=(FilterField("isActive", "bool"), TAGS),
            search=("name", "description"),
        ),
        EntitySpec(
            name="tools", singular="tool", id_prefix="tool", create=ToolIn, read=ToolOut,
            filters=(FilterField("type"), FilterField("transport"),
                     FilterField("isActive", "bool"), TAGS),
        ),
        EntitySpec(
            name="agents", singular="agent", id_prefix="agt", create=AgentIn, read=AgentOut,
            references=(
                Reference("instructionId", "instructions", "instruction"),
                Reference("modelId", "models", "model"),
                Reference("toolIds", "tools", "tools", many=True),
            ),
            filters=(FilterField("status"), FilterField("instructionId"),
                     FilterField("modelId"), TAGS),
        ),
        EntitySpec(
            name="conversations", singular="conversation", id_prefix="conv",
            create=ConversationIn, read=ConversationOut,
            references=(Reference("agentId", "agents", "agent"),),
            filters=(FilterField("status"), FilterField("agentId"), FilterField("createdBy"),
                     TAGS),
            sortable=("createdAt", "updatedAt", "title"),
            search=("title",),
        ),
        EntitySpec(
            name="messages", singular="message", id_prefix="msg",
            create=MessageIn, read=MessageOut,
            references=(
                Reference("conversationId", "conversations", "conversation", required=True,
                          on_delete="cascade"),
            ),
            filters=(FilterField("conversationId"), FilterField("role")),
            sortable=("createdAt", "updatedAt"),
            search=("content",),
        ),
    )
}


def entity(name: str) -> EntitySpec:
    """The spec of a catalog entity, by its plural name."""
    try:
        return ENTITIES[name]
    except KeyError:
        raise KeyError(f"unknown entity {name!r}; known: {', '.join(ENTITIES)}") from None
