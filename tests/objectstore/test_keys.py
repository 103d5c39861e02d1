"""Pure rules: object keys, prefixes, download names, endpoints, the store factory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from aiwm.errors import ValidationFailed
from aiwm.objectstore import (
    LocalStore,
    S3Store,
    model_file_key,
    object_store_for,
    safe_filename,
    split_endpoint,
    validate_key,
    validate_prefix,
    version_prefix,
)
from aiwm.objectstore.base import content_disposition
from aiwm.settings import Settings

GOOD_KEYS = [
    "models/org/model/v1/config.json",
    "models/org/model/v1/.gitattributes",
    "models/org/model/v12/onnx/model.onnx",
    "models/org/model/v1/sub dir/ünï code.bin",
    "a",
    "...",  # a name, not a parent reference
]
BAD_KEYS = [
    "", "/etc/passwd", "a//b", "a/", "a/../b", "..", "../a", "./a", "a/./b", "a\\b",
    "C:\\x", "a\x00b", "a\nb", "a\x1fb", "a\x7fb", "x" * 1025, "é" * 513,
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_good_keys_pass(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationFailed) as e:
        validate_key(key)
    assert e.value.extra["errors"][0]["field"] == "key"


segment = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


@given(st.lists(segment, min_size=1, max_size=6))
def test_an_accepted_key_never_leaves_the_root(parts: list[str]) -> None:
    key = "/".join(parts)
    try:
        validate_key(key)
    except ValidationFailed:
        return
    root = Path("/srv/objects")
    resolved = Path(os.path.normpath(root / key))
    assert root in resolved.parents


def test_prefixes_name_folders() -> None:
    assert validate_prefix("models/o/m/v1/") == "models/o/m/v1/"
    for bad in ("models/o/m/v1", "/", "", "a//", "../"):
        with pytest.raises(ValidationFailed):
            validate_prefix(bad)


def test_model_keys() -> None:
    assert version_prefix("org1", "m1", 3) == "models/org1/m1/v3/"
    assert model_file_key("org1", "m1", 3, "onnx/model.onnx") == "models/org1/m1/v3/onnx/model.onnx"
    with pytest.raises(ValidationFailed):
        model_file_key("org1", "m1", 3, "../../other/v1/x")
    with pytest.raises(ValidationFailed):
        version_prefix("org/1", "m1", 1)
    with pytest.raises(ValidationFailed):
        version_prefix("org1", "m1", 0)


@pytest.mark.parametrize(("raw", "clean"), [
    ("model.safetensors", "model.safetensors"),
    ("onnx/model.onnx", "model.onnx"),
    ("..\\..\\boot.ini", "boot.ini"),
    ('a"b\r\n.bin', "ab.bin"),
    ("", None), (None, None), ("..", None), ("dir/", None),
])
def test_safe_filename(raw: str | None, clean: str | None) -> None:
    assert safe_filename(raw) == clean


def test_content_disposition() -> None:
    assert content_disposition("model.bin") == 'attachment; filename="model.bin"'
    value = content_disposition("ünï model.bin")
    assert value.startswith('attachment; filename="')
    assert "filename*=UTF-8''%C3%BCn%C3%AF%20model.bin" in value
    assert value.isascii()


@pytest.mark.parametrize(("value", "expected"), [
    ("minio", ("minio:9000", False)),
    ("minio:9100", ("minio:9100", False)),
    ("10.0.0.5", ("10.0.0.5:9000", False)),
    ("[::1]", ("[::1]:9000", False)),
    ("[::1]:9100", ("[::1]:9100", False)),
    ("https://s3.example.com", ("s3.example.com:443", True)),
    ("http://s3.example.com:8080/", ("s3.example.com:8080", False)),
])
def test_split_endpoint(value: str, expected: tuple[str, bool]) -> None:
    assert split_endpoint(value, default_port=9000, default_secure=False) == expected


@pytest.mark.parametrize("value", ["", "ftp://x", "http://x/bucket", "host/path", "http://x:port",
                                   "http://user:pw@x"])
def test_split_endpoint_refuses(value: str) -> None:
    with pytest.raises(ValidationFailed):
        split_endpoint(value, default_port=9000, default_secure=False)


def test_factory_picks_local_without_minio(tmp_path: Path) -> None:
    settings = Settings(aiwm_home=tmp_path, jwt_secret=SecretStr("s" * 32), minio_endpoint=None)
    store = object_store_for(settings, public_url="http://api:3003/")
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path / "objects"
    assert store.public_url == "http://api:3003"
    assert not store.root.exists()  # nothing happens before ensure_ready()


def test_factory_picks_s3_with_minio() -> None:
    settings = Settings(jwt_secret=SecretStr("s" * 32), minio_endpoint="minio", minio_port=9100,
                        minio_bucket="models-x")
    store = object_store_for(settings, public_url="http://api:3003")
    assert isinstance(store, S3Store)
    assert (store.endpoint, store.bucket) == ("minio:9100", "models-x")
