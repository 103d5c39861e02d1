"""The agent's settings, from the environment (names as in the seed plan)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr
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
    log_level: str = "INFO"
    docker_socket: str = "/var/run/docker.sock"
    aiwm_node_state_dir: Path = Field(default_factory=lambda: Path.home() / ".aiwm-node",
                                      description="results not yet acknowledged are kept here")
    aiwm_node_max_backoff: float = Field(30.0, gt=0, description="longest reconnect wait, s")
