"""Settings: defaults, the environment, the persisted JWT secret. Every test owns its env."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from aiwm.settings import SECRET_FILE, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting leaks in from the machine's environment; HOME points at a temp dir."""
    names = {n.lower() for n in Settings.model_fields}
    for key in list(os.environ):
        if key.lower() in names:
            monkeypatch.delenv(key)
    home = tmp_path / "user-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# --- defaults and the database ------------------------------------------------------------


def test_defaults(clean_env: Path) -> None:
    s = Settings()
    assert s.port == 3003
    assert s.database_name == "aiwm"
    assert s.embedded_db is True
    assert s.database_uri == "mongodb://127.0.0.1:27217"
    assert s.jwt_secret is None
    assert s.aiwm_home == clean_env / ".aiwm"
    assert s.origins == ["http://localhost:3000", "http://localhost:3001"]


def test_env_is_read_case_insensitively(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "8080")
    monkeypatch.setenv("AIWM_DB_PORT", "28000")
    s = Settings()
    assert s.port == 8080
    assert s.database_uri == "mongodb://127.0.0.1:28000"


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("mongodb://db.example:27017/catalog", "catalog"),
        ("mongodb://u:p@db.example:27017/catalog?authSource=admin", "catalog"),
        ("mongodb://db.example:27017", "aiwm"),
        ("mongodb://db.example:27017/", "aiwm"),
        ("mongodb://db.example:27017/?replicaSet=rs0", "aiwm"),
    ],
)
def test_database_name_from_uri_path(monkeypatch: pytest.MonkeyPatch, uri: str, name: str) -> None:
    monkeypatch.setenv("MONGODB_URI", uri)
    s = Settings()
    assert s.database_name == name
    assert s.embedded_db is False
    assert s.database_uri == uri


def test_mongodb_db_is_the_fallback_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_DB", "other")
    assert Settings().database_name == "other"
    monkeypatch.setenv("MONGODB_URI", "mongodb://h/fromuri")
    assert Settings().database_name == "fromuri"


def test_empty_mongodb_uri_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "")
    s = Settings()
    assert s.embedded_db is True
    assert s.database_uri.startswith("mongodb://127.0.0.1:")


def test_origins_are_split_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_ORIGINS", " https://a.example , ,https://b.example,")
    assert Settings().origins == ["https://a.example", "https://b.example"]


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["0", "65536", "-1", "http"])
def test_invalid_port_is_rejected(monkeypatch: pytest.MonkeyPatch, port: str) -> None:
    monkeypatch.setenv("PORT", port)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert [e["loc"] for e in info.value.errors()] == [("port",)]


@pytest.mark.parametrize("field", ["port", "aiwm_db_port", "aiwm_ray_port", "aiwm_dashboard_port"])
def test_every_port_field_is_checked(field: str) -> None:
    with pytest.raises(ValidationError, match="TCP port"):
        Settings(**{field: 70000})
    assert getattr(Settings(**{field: 65535}), field) == 65535


@pytest.mark.parametrize("env", ["PORT", "AIWM_DB_PORT", "AIWM_RAY_PORT", "AIWM_DASHBOARD_PORT"])
def test_the_upload_port_must_be_a_port_of_its_own(monkeypatch: pytest.MonkeyPatch,
                                                   env: str) -> None:
    monkeypatch.setenv(env, "3004")  # the upload port's default
    with pytest.raises(ValidationError, match=f"AIWM_UPLOAD_PORT 3004 is also {env}"):
        Settings()
    monkeypatch.setenv("AIWM_UPLOAD_PORT", "0")  # none: no clash
    assert Settings().aiwm_upload_port == 0
    monkeypatch.setenv("AIWM_UPLOAD_PORT", "70000")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize(("given", "read"), [
    (None, None), ("  ", None), ("https://up.example/api/models/upload",
                                 "https://up.example/api/models/upload"),
    (" HTTP://10.0.0.5:3004/api/models/upload ", "HTTP://10.0.0.5:3004/api/models/upload")])
def test_the_upload_url_is_an_http_url_or_none(monkeypatch: pytest.MonkeyPatch,
                                               given: str | None, read: str | None) -> None:
    if given is not None:
        monkeypatch.setenv("AIWM_UPLOAD_URL", given)
    assert Settings().aiwm_upload_url == read


@pytest.mark.parametrize("bad", ["ftp://host/x", "up.example:3004", "http://", "http://host:abc/x"])
def test_an_upload_url_that_is_none_is_refused(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("AIWM_UPLOAD_URL", bad)
    with pytest.raises(ValidationError, match="aiwm_upload_url"):
        Settings()


def test_non_positive_durations_are_rejected() -> None:
    with pytest.raises(ValidationError):
        Settings(jwt_expires_in=0)
    with pytest.raises(ValidationError):
        Settings(aiwm_max_body_bytes=0)


# --- the JWT secret ------------------------------------------------------------------------


def test_secret_before_loading_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="load_settings"):
        Settings().secret()


def test_secret_is_generated_once_with_mode_0600(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "nested" / "aiwm-home"  # does not exist yet
    monkeypatch.setenv("AIWM_HOME", str(home))
    first = load_settings()
    path = home / SECRET_FILE
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = first.secret()
    assert len(secret) >= 32
    assert path.read_text().strip() == secret

    second = load_settings()
    assert second.secret() == secret
    assert path.read_text().strip() == secret  # not rewritten


def test_different_homes_get_different_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AIWM_HOME", str(tmp_path / "a"))
    a = load_settings().secret()
    monkeypatch.setenv("AIWM_HOME", str(tmp_path / "b"))
    b = load_settings().secret()
    assert a != b


def test_existing_secret_file_is_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text("a-secret-written-by-someone-else\n")
    monkeypatch.setenv("AIWM_HOME", str(tmp_path))
    assert load_settings().secret() == "a-secret-written-by-someone-else"


def test_empty_secret_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text("\n")
    monkeypatch.setenv("AIWM_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="is empty"):
        load_settings()


def test_jwt_secret_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / SECRET_FILE).write_text("the-file-secret\n")
    monkeypatch.setenv("AIWM_HOME", str(tmp_path))
    monkeypatch.setenv("JWT_SECRET", "the-env-secret-which-is-long-enough")
    assert load_settings().secret() == "the-env-secret-which-is-long-enough"
    assert (tmp_path / SECRET_FILE).read_text() == "the-file-secret\n"


def test_jwt_secret_env_means_no_file_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("AIWM_HOME", str(home))
    monkeypatch.setenv("JWT_SECRET", "the-env-secret-which-is-long-enough")
    load_settings()
    assert not (home / SECRET_FILE).exists()


def test_override_wins_over_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JWT_SECRET", "from-env")
    s = load_settings(jwt_secret="from-override", aiwm_home=tmp_path)
    assert s.secret() == "from-override"


def test_aiwm_home_is_expanded(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    monkeypatch.setenv("AIWM_HOME", "~/custom-aiwm")
    s = load_settings()
    assert s.aiwm_home == clean_env / "custom-aiwm"
    assert (clean_env / "custom-aiwm" / SECRET_FILE).is_file()


# --- secrets stay secret -------------------------------------------------------------------

SECRETS = {
    "JWT_SECRET": "jwt-value-7f3a9c",
    "REDIS_PASSWORD": "redis-value-1b2c3d",
    "MINIO_SECRET_KEY": "minio-value-4e5f6a",
    "HUGGINGFACE_API_KEY": "hf-value-9d8e7f",
}


def test_secrets_are_not_in_repr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIWM_HOME", str(tmp_path))
    s = load_settings()
    assert s.secret() == SECRETS["JWT_SECRET"]
    assert s.minio_secret_key.get_secret_value() == SECRETS["MINIO_SECRET_KEY"]
    for text in (repr(s), str(s), s.model_dump_json()):
        for v in SECRETS.values():
            assert v not in text


def test_generated_secret_is_not_in_repr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIWM_HOME", str(tmp_path))
    s = load_settings()
    assert s.secret() not in repr(s)


def test_default_minio_secret_is_masked() -> None:
    assert "minioadmin" not in repr(Settings().minio_secret_key)


def test_database_password_is_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "mongodb://app:db-pass-5a6b7c@db.example:27017/aiwm")
    assert "db-pass-5a6b7c" not in repr(Settings())


def test_node_socket_origins() -> None:
    anyone = load_settings(ws_cors_origin="*")
    assert anyone.ws_origin_allowed("https://anything.example") and anyone.ws_origin_allowed(None)
    listed = load_settings(ws_cors_origin="https://a.example, http://b.example:8080/")
    assert listed.ws_origin_allowed(None)  # an agent: no Origin header
    assert listed.ws_origin_allowed("https://A.example") and listed.ws_origin_allowed("http://b.example:8080")
    assert not listed.ws_origin_allowed("https://a.example.evil")
    assert not listed.ws_origin_allowed("http://b.example")  # another port is another origin
    assert not listed.ws_origin_allowed("null")
