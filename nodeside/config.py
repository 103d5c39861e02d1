"""The agent's settings, from the environment (names as in the seed plan)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    controller_url: str = Field("ws://localhost:3003/ws/node", description="the relay's URL")
    node_token: SecretStr = Field(description="from POST /api/nodes/{id}/token")
    node_id: str = Field(min_length=1)
    node_name: str | None = None
    node_hostname: str = Field(default_factory=socket.gethostname)
    heartbeat_interval: int = Field(30000, gt=0, le=3_600_000, description="milliseconds")
    metrics_interval: int = Field(60000, gt=0, le=86_400_000, description="milliseconds")
    gpu_mock_mode: bool = False
    log_level: str = Field("INFO", pattern=r"(?i)^(debug|info|warning|error|critical)$")
    aiwm_log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object a line, with the correlation id")
    docker_socket: str = "/var/run/docker.sock"
    aiwm_node_state_dir: Path = Field(default_factory=lambda: Path.home() / ".aiwm-node",
                                      description="results not yet acknowledged are kept here")
    aiwm_node_max_backoff: float = Field(30.0, gt=0, description="longest reconnect wait, s")
    aiwm_node_model_dir: Path | None = Field(None, description="models; default <state dir>/models")
    aiwm_node_model_cache_max: ByteSize | None = Field(
        None, gt=0, description="most the model cache may hold (200GB, 1.5TiB or bytes); "
                                "default: as much as its disk has free")
    aiwm_node_advertise_host: str | None = Field(
        None, description="host in deployment endpoints; default the node's IP, else 127.0.0.1")
    aiwm_node_publish_host: str = Field("0.0.0.0", description="where containers' ports bind")
    aiwm_node_start_timeout: float = Field(60.0, gt=0, description="s until a server must listen")
    aiwm_node_stop_grace: float = Field(10.0, ge=0, description="s between SIGTERM and SIGKILL")
    aiwm_node_watch_interval: float = Field(5.0, gt=0, description="s between deployment checks")

    @property
    def model_dir(self) -> Path:
        return self.aiwm_node_model_dir or self.aiwm_node_state_dir / "models"

    def advertise_host(self, node_ip: str | None) -> str:
        """The host the controller should use to reach deployments on this node."""
        return self.aiwm_node_advertise_host or node_ip or "127.0.0.1"
