"""What only the S3 store does, against moto's server."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import S3Error
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from aiwm.errors import Unavailable, ValidationFailed
from aiwm.objectstore import S3Store
from aiwm.objectstore.s3 import LIFECYCLE_RULE
from tests.objectstore.conftest import s3_store
from tests.support.moto_server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, PresignGateway, free_port


async def test_ensure_ready_makes_a_versioned_bucket_once(moto: MotoServer,
                                                         presign_gateway: PresignGateway) -> None:
    bucket = f"aiwm-ready-{uuid.uuid4().hex[:8]}"
    client = Minio(moto.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False,
                   region=REGION)
    assert not client.bucket_exists(bucket)
    store = s3_store(moto, presign_gateway, bucket=bucket)
    await store.ensure_ready()
    await store.ensure_ready()
    assert client.bucket_exists(bucket)
    assert client.get_bucket_versioning(bucket).status == "Enabled"


async def test_ensure_ready_keeps_a_lifecycle_rule_of_its_own(
        moto: MotoServer, presign_gateway: PresignGateway, caplog: pytest.LogCaptureFixture) -> None:
    bucket = f"aiwm-life-{uuid.uuid4().hex[:8]}"
    client = Minio(moto.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False,
                   region=REGION)

    def rules() -> dict[str, Rule]:
        config = client.get_bucket_lifecycle(bucket)
        return {str(r.rule_id): r for r in (config.rules if config else [])}

    await s3_store(moto, presign_gateway, bucket=bucket).ensure_ready()  # the default: 7 days
    found = rules()
    assert set(found) == {LIFECYCLE_RULE}
    ours = found[LIFECYCLE_RULE]
    assert ours.rule_filter is not None and ours.rule_filter.prefix == "models/"
    assert ours.noncurrent_version_expiration is not None
    assert ours.noncurrent_version_expiration.noncurrent_days == 7
    assert ours.expiration is not None and ours.expiration.expired_object_delete_marker
    assert ours.abort_incomplete_multipart_upload is not None
    assert ours.abort_incomplete_multipart_upload.days_after_initiation == 1
    # Another number of days replaces it; 0 days takes it off.
    await s3_store(moto, presign_gateway, bucket=bucket, noncurrent_days=30).ensure_ready()
    assert rules()[LIFECYCLE_RULE].noncurrent_version_expiration.noncurrent_days == 30  # type: ignore[union-attr]
    await s3_store(moto, presign_gateway, bucket=bucket, noncurrent_days=0).ensure_ready()
    assert rules() == {}
    await s3_store(moto, presign_gateway, bucket=bucket, noncurrent_days=0).ensure_ready()
    assert rules() == {}
    assert "lifecycle" not in caplog.text
    with pytest.raises(ValidationFailed):
        s3_store(moto, presign_gateway, bucket=bucket, noncurrent_days=-1)


async def test_a_bucket_with_lifecycle_rules_of_its_own_is_left_alone(
        moto: MotoServer, presign_gateway: PresignGateway, caplog: pytest.LogCaptureFixture) -> None:
    """The client reads some rule shapes back only in part, so AIWM never rewrites them."""
    bucket = f"aiwm-theirs-{uuid.uuid4().hex[:8]}"
    client = Minio(moto.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False,
                   region=REGION)
    client.make_bucket(bucket)
    theirs = Rule(ENABLED, rule_filter=Filter(prefix="logs/"), rule_id="logs",
                  expiration=Expiration(days=30))
    client.set_bucket_lifecycle(bucket, LifecycleConfig([theirs]))
    with caplog.at_level(logging.WARNING, logger="aiwm.objectstore"):
        await s3_store(moto, presign_gateway, bucket=bucket).ensure_ready()
    config = client.get_bucket_lifecycle(bucket)
    assert config is not None and [r.rule_id for r in config.rules] == ["logs"]
    assert "lifecycle rules AIWM did not make (logs)" in caplog.text
    assert "after 7 day(s)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aiwm.objectstore"):
        await s3_store(moto, presign_gateway, bucket=bucket, noncurrent_days=0).ensure_ready()
    assert caplog.text == ""  # nothing of AIWM's wanted, nothing of AIWM's there


async def test_storage_that_refuses_the_lifecycle_rule_is_used_all_the_same(
        moto: MotoServer, presign_gateway: PresignGateway, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    """Credentials that may not change a bucket's lifecycle: a warning, and the store works."""
    store = s3_store(moto, presign_gateway, bucket=f"aiwm-denied-{uuid.uuid4().hex[:8]}")
    refusal = S3Error(None, "AccessDenied", "Access Denied.", "/", "r1", "h1")  # type: ignore[arg-type]

    def refuse(*_: object, **__: object) -> None:
        raise refusal

    store._client.set_bucket_lifecycle = refuse  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="aiwm.objectstore"):
        await store.ensure_ready()
    assert "could not set its lifecycle rule" in caplog.text and "AccessDenied" in caplog.text
    source = tmp_path / "w.bin"
    source.write_bytes(b"weights")
    assert (await store.put_file("models/o/m/v1/w.bin", source)).size == 7


async def test_sha256_is_kept_as_object_metadata(moto: MotoServer, presign_gateway: PresignGateway,
                                                 tmp_path: Path) -> None:
    store = s3_store(moto, presign_gateway)
    await store.ensure_ready()
    src = tmp_path / "m.bin"
    src.write_bytes(b"meta")
    stored = await store.put_file(f"models/o/{uuid.uuid4().hex}/v1/m.bin", src)
    client = Minio(moto.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False,
                   region=REGION)
    head = client.stat_object(store.bucket, stored.key)
    assert head.metadata is not None
    assert head.metadata["x-amz-meta-sha256"] == stored.sha256


async def test_an_unreachable_store_is_unavailable() -> None:
    store = S3Store(endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b",
                    secure=False, bucket="aiwm-nowhere", region=REGION)
    with pytest.raises(Unavailable):
        await store.stat("models/o/m/v1/x.bin")


async def test_ping_fails_for_a_missing_bucket_or_storage_that_is_not_there(
        moto: MotoServer, presign_gateway: PresignGateway) -> None:
    missing = s3_store(moto, presign_gateway, bucket="no-such-bucket-for-ping")
    with pytest.raises(Unavailable, match="'no-such-bucket-for-ping' does not exist"):
        await missing.ping()
    nobody = S3Store(endpoint=f"127.0.0.1:{free_port()}", access_key=ACCESS_KEY,
                     secret_key=SECRET_KEY, secure=False, bucket="aiwm-nowhere", region=REGION)
    with pytest.raises(Unavailable, match="unreachable"):
        await nobody.ping()
