"""Settings, read from the environment once when a program starts.

Call :func:`load_settings` in ``main()`` (CLI, job entry point, test session) and pass
the result down: actors and Serve deployments receive it as a constructor argument, so
nothing reads ``os.environ`` at import time and every process agrees on one config.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRET_FILE = "jwt_secret"


class Settings(BaseSettings):
    """Every knob AIWM has. Names match the seed plan's environment variables."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # Service
    port: int = Field(3003, description="HTTP port of the REST API and the node relay")
    host: str = Field("0.0.0.0", description="Interface the HTTP proxy binds")
    aiwm_upload_port: int = Field(
        3004, ge=0, le=65535, description="port on HOST where each API replica also takes "
        "uploads, past the HTTP proxy; 0: none (uploads go through PORT)")
    aiwm_upload_url: str | None = Field(
        None, description="the upload route's URL as clients reach it (a proxy in front); "
        "default http://<the API host the client named>:AIWM_UPLOAD_PORT/api/models/upload")
    node_env: str = "development"
    git_commit_sha: str = ""
    aiwm_home: Path = Field(default_factory=lambda: Path.home() / ".aiwm")

    # Logs
    log_level: str = Field("INFO", pattern=r"(?i)^(debug|info|warning|error|critical)$")
    aiwm_log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object a line, with the correlation id")
    aiwm_log_file: str = Field(
        "", description="file every AIWM process on this host appends its log lines to; "
        "default AIWM_HOME/logs/aiwm.log; 'off' for none (stderr only)")

    # Database
    mongodb_uri: SecretStr | None = Field(None, description="It may hold a password")
    mongodb_db: str = Field("aiwm", description="Database name when the URI names none")
    aiwm_db_port: int = Field(27217, description="Port of the embedded SecantusDB")

    # Redis (notification queue, later issues)
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_password: SecretStr | None = None
    redis_db: int = 0

    # Object storage
    minio_endpoint: str | None = None
    minio_port: int = 9000
    minio_access_key: str = "minioadmin"
    minio_secret_key: SecretStr = SecretStr("minioadmin")
    minio_use_ssl: bool = False
    minio_bucket: str = "aiwm-models"
    minio_region: str | None = Field(None, description="the bucket's region (MinIO: any)")
    minio_public_endpoint: str | None = Field(
        None, description="host:port (or URL) nodes use to reach MinIO, if not MINIO_ENDPOINT; "
        "signed URLs are made for it")
    minio_noncurrent_days: int = Field(
        7, ge=0, le=36500, description="days the bucket keeps an object version once deleted "
        "or replaced (a lifecycle rule AIWM sets); 0: AIWM sets no rule")
    aiwm_max_upload_bytes: int = Field(200 * 2**30, gt=0, description="largest uploaded file")
    aiwm_upload_direct_io: bool = Field(True, description="write uploads to disk with O_DIRECT "
                                        "where the file system allows it")
    aiwm_public_url: str | None = Field(
        None, description="the API's URL as nodes reach it, for signed download URLs of the "
        "embedded store; default http://<this host's address>:PORT")
    aiwm_download_url_ttl: int = Field(
        7 * 3600, gt=0, le=7 * 86400, description="seconds a signed model download URL lives")
    aiwm_import_staging_ttl: int = Field(
        7 * 86400, ge=60, description="seconds a failed import's fetched files are kept for a "
        "retry to resume from, counted from the last write")

    # Auth
    jwt_secret: SecretStr | None = None
    jwt_expires_in: int = Field(86400, gt=0, description="Default token lifetime, seconds")

    # HuggingFace
    huggingface_api_key: SecretStr | None = None
    hf_endpoint: str | None = None

    # HTTP
    allowed_origins: str = "http://localhost:3000,http://localhost:3001"
    aiwm_max_body_bytes: int = Field(1024 * 1024, gt=0)
    aiwm_rate_limit: float = Field(
        100.0, ge=0, description="requests/s per bearer token and API replica; 0 turns it off")
    aiwm_rate_burst: int = Field(200, ge=1, description="requests a token may send at once")
    aiwm_request_timeout: float = Field(
        30.0, ge=0, description="s a handler may take to start its answer (504 after); 0: none")

    # WebSocket
    ws_cors_origin: str = Field("*", description="origins a node socket may come from: * for "
                                "any, or a comma-separated list; a socket without Origin "
                                "(an agent, not a browser) is always let in")
    ws_ping_interval: int = Field(30000, gt=0, description="milliseconds")
    ws_ping_timeout: int = Field(10000, gt=0, description="milliseconds")

    # Node channel
    node_heartbeat_interval: int = Field(
        30000, gt=0, description="ms; used until a node registers with its own interval")
    node_missed_heartbeats: int = Field(3, ge=1, description="missed beats before offline")
    ws_max_frame_bytes: int = Field(1024 * 1024, gt=0, description="larger frames end the session")
    ws_max_protocol_errors: int = Field(
        10, ge=1, description="consecutive bad frames before the session is closed")
    node_offline_min_seconds: float = Field(
        10.0, ge=0, description="s; a node is never marked offline sooner than this after its "
        "last heartbeat, whatever its interval (stops flapping when the controller is busy)")
    node_heartbeat_persist: float = Field(
        5.0, ge=0, description="s; lastHeartbeatAt is written at most this often per node "
        "(liveness itself is tracked in memory on every beat)")
    node_proxy_shards: int = Field(2, ge=1, le=256, description="NodeHost actors")
    node_token_expires_in: int = Field(30 * 86400, gt=0, description="default node token lifetime, s")

    # Executions
    execution_max_retries: int = Field(3, ge=0)
    execution_timeout_check_interval: int = Field(30000, gt=0, description="milliseconds")

    # Ray
    aiwm_api_replicas: int = Field(2, ge=1, le=64, description="Serve replicas of the API")
    aiwm_access_log: bool = Field(
        False, description="one log line per API request (method, path, status, ms)")
    aiwm_ray_port: int = Field(6390, description="GCS port of a head that `aiwm up` starts")
    aiwm_dashboard_port: int = 8265

    @field_validator("port", "aiwm_db_port", "aiwm_ray_port", "aiwm_dashboard_port")
    @classmethod
    def _valid_port(cls, v: int) -> int:
        if not 0 < v < 65536:
            raise ValueError("must be a TCP port (1-65535)")
        return v

    @field_validator("aiwm_upload_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        try:
            parsed = urlparse(v)
            parsed.port  # noqa: B018 - raises ValueError for a port that is no number
        except ValueError as e:
            raise ValueError(f"not a URL: {e}") from None
        if parsed.scheme.lower() not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return v

    @model_validator(mode="after")
    def _upload_port_apart(self) -> Settings:
        others = {"PORT": self.port, "AIWM_DB_PORT": self.aiwm_db_port,
                  "AIWM_RAY_PORT": self.aiwm_ray_port,
                  "AIWM_DASHBOARD_PORT": self.aiwm_dashboard_port}
        clash = [name for name, port in others.items() if port == self.aiwm_upload_port]
        if self.aiwm_upload_port and clash:
            raise ValueError(f"AIWM_UPLOAD_PORT {self.aiwm_upload_port} is also {clash[0]}: "
                             "give the upload port a port of its own (or 0 for none)")
        return self

    @field_validator("mongodb_uri", "jwt_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def embedded_db(self) -> bool:
        """True when AIWM runs its own SecantusDB (no MONGODB_URI given)."""
        return not self.mongodb_uri

    @property
    def database_uri(self) -> str:
        if self.mongodb_uri:
            return self.mongodb_uri.get_secret_value()
        return f"mongodb://127.0.0.1:{self.aiwm_db_port}"

    @property
    def database_name(self) -> str:
        if self.mongodb_uri:
            path = urlparse(self.mongodb_uri.get_secret_value()).path.lstrip("/")
            if path:
                return path
        return self.mongodb_db

    @property
    def origins(self) -> list[str]:
        return [o.strip() for o in self.allowed_origins.split(",") if o.strip()]

    def ws_origin_allowed(self, origin: str | None) -> bool:
        """Whether a node socket whose handshake carried this ``Origin`` may connect."""
        if origin is None:
            return True  # agents send none; only browsers do
        allowed = [o.strip().rstrip("/").lower() for o in self.ws_cors_origin.split(",")]
        return "*" in allowed or origin.strip().rstrip("/").lower() in allowed

    def public_url(self) -> str:
        """Where nodes reach the API: AIWM_PUBLIC_URL, else this host's outward address."""
        if self.aiwm_public_url:
            return self.aiwm_public_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else _outward_address()
        return f"http://{host}:{self.port}"

    def log_file(self) -> Path | None:
        """Where this host's AIWM processes append their logs (None: stderr only)."""
        if self.aiwm_log_file.strip().lower() in ("off", "none", "false", "0", "-"):
            return None
        if self.aiwm_log_file.strip():
            return Path(self.aiwm_log_file).expanduser()
        return self.aiwm_home / "logs" / "aiwm.log"

    def secret(self) -> str:
        """The JWT signing key. :func:`load_settings` guarantees it is set."""
        if self.jwt_secret is None:
            raise RuntimeError("JWT secret not loaded; build Settings with load_settings()")
        return self.jwt_secret.get_secret_value()


def _outward_address() -> str:
    """The address this host uses toward other hosts (no packet is sent)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _persisted_secret(home: Path) -> str:
    """Read the generated JWT secret from AIWM_HOME, creating it (mode 0600) once."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        value = path.read_text().strip()
        if value:
            return value
        raise RuntimeError(f"{path} is empty; delete it to generate a new secret") from None
    with os.fdopen(fd, "w") as f:
        value = secrets.token_urlsafe(48)
        f.write(value + "\n")
    return value


def load_settings(**overrides: object) -> Settings:
    """Read the environment (plus ``overrides``) and fill in the JWT secret."""
    settings = Settings(**overrides)  # type: ignore[arg-type]
    settings.aiwm_home = settings.aiwm_home.expanduser()
    if settings.jwt_secret is None:
        settings.jwt_secret = SecretStr(_persisted_secret(settings.aiwm_home))
    return settings
